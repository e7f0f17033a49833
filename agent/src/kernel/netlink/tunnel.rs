//! The host's VXLAN device (`weft.vxlan`): making it as wanted, and its permanent neighbour and
//! FDB entries, one of each per remote host reached through it.

use std::collections::BTreeSet;
use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{LinkUnspec, LinkVxlan};

use super::links::link_by_name;
use super::{errno, nl, Netlink};
use crate::kernel::{Result, TunnelState, VxlanDevice};
use crate::model::{Mac, TUNNEL_DEVICE};

fn vxlan_info(link: &LinkMessage) -> Vec<InfoVxlan> {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                LinkInfo::Data(InfoData::Vxlan(v)) => Some(v.clone()),
                _ => None,
            }),
            _ => None,
        })
        .unwrap_or_default()
}

/// Whether the device's settings are the wanted ones (its address is checked apart).
fn matches(link: &LinkMessage, wanted: &VxlanDevice) -> bool {
    let info = vxlan_info(link);
    let has = |attr: InfoVxlan| info.contains(&attr);
    let local = match wanted.local {
        IpAddr::V4(ip) => has(InfoVxlan::Local(ip)),
        IpAddr::V6(ip) => has(InfoVxlan::Local6(ip)),
    };
    let attrs = &link.attributes;
    local
        && has(InfoVxlan::Id(wanted.vni))
        && has(InfoVxlan::Port(wanted.port))
        && has(InfoVxlan::Link(wanted.underlay_index))
        && has(InfoVxlan::Learning(false))
        && attrs.contains(&LinkAttribute::Mtu(wanted.mtu))
        && attrs.contains(&LinkAttribute::Address(wanted.mac.0.to_vec()))
}

/// The destination of a neighbour or FDB entry (the latter's comes undecoded: FDB messages are
/// of the bridge family).
fn neighbour_ip(msg: &NeighbourMessage) -> Option<IpAddr> {
    msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
        NeighbourAttribute::Destination(NeighbourAddress::Other(bytes)) => match bytes.len() {
            4 => <[u8; 4]>::try_from(bytes.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(bytes.as_slice())
                .ok()
                .map(IpAddr::from),
            _ => None,
        },
        _ => None,
    })
}

fn neighbour_mac(msg: &NeighbourMessage) -> Option<Mac> {
    msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(mac) => mac.as_slice().try_into().ok().map(Mac),
        _ => None,
    })
}

impl Netlink {
    pub(super) async fn read_tunnel(
        &self,
        wanted: Option<&VxlanDevice>,
    ) -> Result<Option<TunnelState>> {
        let Some(link) = link_by_name(self.handle(), TUNNEL_DEVICE)
            .await
            .map_err(nl(format!("looking up {TUNNEL_DEVICE}")))?
        else {
            return Ok(None);
        };
        let index = link.header.index;
        let up = link
            .header
            .flags
            .contains(netlink_packet_route::link::LinkFlags::Up);
        let addressed = match wanted {
            Some(w) => self.has_address(index, w.address).await?,
            None => true,
        };
        let matches = wanted.is_some_and(|w| matches(&link, w)) && up && addressed;
        // IP neighbours and bridge FDB entries are two dumps: an unspecified-family dump does
        // not include the FDB.
        let mut entries: Vec<NeighbourMessage> = vec![];
        for family in [AddressFamily::Unspec, AddressFamily::Bridge] {
            let _turn = self.dumping.lock().await;
            let dump: Vec<NeighbourMessage> = self
                .handle()
                .neighbours()
                .get()
                .set_address_family(family)
                .execute()
                .try_collect()
                .await
                .map_err(nl("listing neighbours"))?;
            entries.extend(dump);
        }
        let mut state = TunnelState {
            index,
            matches,
            neighbours: BTreeSet::new(),
            fdb: BTreeSet::new(),
        };
        for entry in entries
            .iter()
            .filter(|e| e.header.ifindex == index && e.header.state == NeighbourState::Permanent)
        {
            let (ip, mac) = (neighbour_ip(entry), neighbour_mac(entry));
            match (entry.header.family, ip, mac) {
                (AddressFamily::Bridge, Some(dst), Some(mac)) => {
                    state.fdb.insert((mac, dst));
                }
                (AddressFamily::Inet | AddressFamily::Inet6, Some(ip), Some(mac)) => {
                    state.neighbours.insert((ip, mac));
                }
                _ => {}
            }
        }
        Ok(Some(state))
    }

    async fn has_address(&self, index: u32, address: IpAddr) -> Result<bool> {
        use netlink_packet_route::address::AddressAttribute;
        let _turn = self.dumping.lock().await;
        let addrs = super::container::addresses_of(self.handle(), index, "").await?;
        Ok(addrs.iter().any(|m| {
            m.attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(ip) if *ip == address))
        }))
    }

    /// Makes the device as wanted: created if absent, made again if its settings differ (they
    /// cannot all be changed in place), up, with its address.
    pub(super) async fn make_tunnel(&self, wanted: &VxlanDevice) -> Result<u32> {
        let existing = link_by_name(self.handle(), TUNNEL_DEVICE)
            .await
            .map_err(nl(format!("looking up {TUNNEL_DEVICE}")))?;
        let index = match existing {
            Some(link) if matches(&link, wanted) => link.header.index,
            other => {
                if other.is_some() {
                    self.remove_link(TUNNEL_DEVICE).await?;
                }
                self.create_tunnel(wanted).await?
            }
        };
        self.handle()
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl(format!("bringing up {TUNNEL_DEVICE}")))?;
        let prefix = if wanted.address.is_ipv4() { 32 } else { 128 };
        match self
            .handle()
            .address()
            .add(index, wanted.address, prefix)
            .execute()
            .await
        {
            Err(e) if errno(&e) != Some(libc::EEXIST) => {
                return Err(nl(format!("adding {} to {TUNNEL_DEVICE}", wanted.address))(
                    e,
                ))
            }
            _ => {}
        }
        Ok(index)
    }

    async fn create_tunnel(&self, wanted: &VxlanDevice) -> Result<u32> {
        let builder = LinkVxlan::new(TUNNEL_DEVICE, wanted.vni)
            .dev(wanted.underlay_index)
            .port(wanted.port)
            .learning(false);
        let builder = match wanted.local {
            IpAddr::V4(ip) => builder.local(ip),
            IpAddr::V6(ip) => builder.local6(ip),
        };
        let message = builder
            .mtu(wanted.mtu)
            .address(wanted.mac.0.to_vec())
            .build();
        self.handle()
            .link()
            .add(message)
            .execute()
            .await
            .map_err(nl(format!("creating {TUNNEL_DEVICE}")))?;
        self.index_of(TUNNEL_DEVICE).await
    }

    pub(super) async fn neighbour(
        &self,
        index: u32,
        ip: IpAddr,
        mac: Mac,
        add: bool,
    ) -> Result<()> {
        let what = format!("neighbour {ip} lladdr {mac} dev {TUNNEL_DEVICE}");
        if add {
            return self
                .handle()
                .neighbours()
                .add(index, ip)
                .link_layer_address(&mac.0)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(nl(format!("adding {what}")));
        }
        let mut message = NeighbourMessage::default();
        message.header.family = if ip.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        message.header.ifindex = index;
        message
            .attributes
            .push(NeighbourAttribute::Destination(match ip {
                IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
                IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
            }));
        self.delete_neighbour(message, &what).await
    }

    pub(super) async fn fdb(&self, index: u32, mac: Mac, dst: IpAddr, add: bool) -> Result<()> {
        let what = format!("fdb {mac} dst {dst} dev {TUNNEL_DEVICE}");
        if add {
            return self
                .handle()
                .neighbours()
                .add_bridge(index, &mac.0)
                .destination(dst)
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(nl(format!("adding {what}")));
        }
        let mut message = NeighbourMessage::default();
        message.header.family = AddressFamily::Bridge;
        message.header.ifindex = index;
        message.header.flags = NeighbourFlags::Own;
        message
            .attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        message
            .attributes
            .push(NeighbourAttribute::Destination(match dst {
                IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
                IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
            }));
        self.delete_neighbour(message, &what).await
    }

    async fn delete_neighbour(&self, message: NeighbourMessage, what: &str) -> Result<()> {
        match self.handle().neighbours().del(message).execute().await {
            Err(e) if !matches!(errno(&e), Some(libc::ENOENT) | Some(libc::ESRCH)) => {
                Err(nl(format!("deleting {what}"))(e))
            }
            _ => Ok(()),
        }
    }
}
