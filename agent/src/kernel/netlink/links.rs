//! Links in the host namespace: creating a container's veth pair, deleting and retiring links,
//! listing ours, and the reaper that deletes retired links in batches.

use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::{LinkMessageBuilder, LinkUnspec};

use super::{errno, nl, Netlink};
use crate::kernel::netns::{NetlinkHandle, Netns};
use crate::kernel::sysctl;
use crate::kernel::{ContainerLink, KernelError, Result};
use crate::model::{Route, RouteTarget, HOST_VETH_MAC, LINK_PREFIX, RETIRED_GROUP};

const ENOENT: i32 = libc::ENOENT;
const ENODEV: i32 = libc::ENODEV;

/// Deletes retired links in the background, a whole batch per grace period, on its own thread
/// so that the wait blocks no async worker.
pub(super) struct Reaper {
    wake: std::sync::mpsc::Sender<()>,
}

impl Reaper {
    pub(super) fn start() -> io::Result<Self> {
        let (wake, woken) = std::sync::mpsc::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("weft-reaper".into())
            .spawn(move || runtime.block_on(reap(woken)))?;
        Ok(Self { wake })
    }

    pub(super) fn wake(&self) {
        let _ = self.wake.send(());
    }
}

async fn reap(woken: std::sync::mpsc::Receiver<()>) {
    let Ok(netlink) = NetlinkHandle::here() else {
        tracing::error!("link reaper cannot open netlink; retired links stay");
        return;
    };
    // A first pass clears links retired before a restart.
    loop {
        let delete = LinkUnspec::new_with_index(0)
            .link_group(RETIRED_GROUP)
            .build();
        match netlink
            .handle
            .link()
            .del_with_message(delete)
            .execute()
            .await
        {
            Ok(()) => {}
            Err(e) if matches!(errno(&e), Some(ENODEV) | Some(ENOENT)) => {}
            Err(e) => tracing::warn!(error = %e, "cannot delete retired links"),
        }
        // Sleep until the next retirement; drain what queued up meanwhile.
        if woken.recv().is_err() {
            return;
        }
        while woken.try_recv().is_ok() {}
    }
}

/// Whether a link is retired (awaiting deletion).
pub(super) fn is_retired(link: &LinkMessage) -> bool {
    link.attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::Group(g) if *g == RETIRED_GROUP))
}

pub(super) fn link_name(msg: &LinkMessage) -> Option<String> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

/// Looks a link up by name; `None` when it does not exist.
pub(super) async fn link_by_name(
    handle: &rtnetlink::Handle,
    name: &str,
) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    match handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(e) if matches!(errno(&e), Some(ENODEV) | Some(ENOENT)) => Ok(None),
        Err(e) => Err(e),
    }
}

impl Netlink {
    pub(super) async fn link_by_index(&self, index: u32) -> Result<Option<LinkMessage>> {
        match self
            .handle()
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await
        {
            Ok(link) => Ok(link),
            Err(e) if matches!(errno(&e), Some(ENODEV) | Some(ENOENT)) => Ok(None),
            Err(e) => Err(nl(format!("looking up link {index}"))(e)),
        }
    }

    /// Creates the veth pair with the peer born inside the container's namespace.
    pub(super) async fn add_veth(
        &self,
        netns: &Netns,
        link: &ContainerLink,
    ) -> Result<(), rtnetlink::Error> {
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(link.ifname.to_string())
            .address(link.mac.0.to_vec())
            .mtu(link.mtu)
            .setns_by_fd(netns.file().as_raw_fd())
            .build();
        // The host end is created up (one request fewer); the peer cannot be: it is registered
        // before its other half exists, and opening it then fails with ENOTCONN.
        let veth = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
            .name(link.host_ifname.clone())
            .address(HOST_VETH_MAC.to_vec())
            .mtu(link.mtu)
            .up()
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        self.handle().link().add(veth).execute().await
    }

    pub(super) async fn remove_link(&self, name: &str) -> Result<bool> {
        let Some(link) = link_by_name(self.handle(), name)
            .await
            .map_err(nl(format!("looking up {name}")))?
        else {
            return Ok(false);
        };
        match self.handle().link().del(link.header.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if matches!(errno(&e), Some(ENODEV) | Some(ENOENT)) => Ok(false),
            Err(e) => Err(nl(format!("deleting {name}"))(e)),
        }
    }

    pub(super) async fn retire(&self, name: &str, ip: IpAddr) -> Result<bool> {
        let Some(link) = link_by_name(self.handle(), name)
            .await
            .map_err(nl(format!("looking up {name}")))?
        else {
            return Ok(false);
        };
        let index = link.header.index;
        // The group first, in a request of its own: its notification tells the kernel monitor
        // that what goes next (routes, then the link) is ours to lose, not to repair.
        let steps = [
            LinkUnspec::new_with_index(index)
                .link_group(RETIRED_GROUP)
                .build(),
            LinkUnspec::new_with_index(index).down().build(),
        ];
        for step in steps {
            match self.handle().link().set(step).execute().await {
                Ok(()) => {}
                Err(e) if matches!(errno(&e), Some(ENODEV) | Some(ENOENT)) => return Ok(false),
                Err(e) => return Err(nl(format!("retiring {name}"))(e)),
            }
        }
        // Down, the link has lost its IPv4 routes; the host route is deleted by name too, so
        // none can outlive the retirement.
        self.delete(&Route::host(ip, RouteTarget::Dev(index)))
            .await?;
        if let Some(reaper) = &self.reaper {
            reaper.wake();
        }
        Ok(true)
    }

    /// Our container veths in service, by name; with `settings`, what the dump shows of their
    /// settings (and the neighbour table of their `proxy_delay`) is kept for the checks of a
    /// full pass.
    pub(super) async fn weft_links(&self, settings: bool) -> Result<BTreeMap<String, u32>> {
        let dumper = self.link_dumper.clone();
        let dumped = tokio::task::spawn_blocking(move || {
            // Container veths only: the tunnel device's name has a '.'.
            let ours = |name: &str| name.starts_with(LINK_PREFIX) && !name.contains('.');
            let mut dumper = dumper
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            dumper.dump(ours, settings)
        })
        .await
        .map_err(io::Error::other)
        .and_then(|dumped| dumped)
        .map_err(|source| KernelError::Io {
            what: "listing links".into(),
            source,
        })?;
        let in_service = dumped.into_iter().filter(|l| l.group != RETIRED_GROUP);
        if !settings {
            return Ok(in_service.map(|l| (l.name, l.index)).collect());
        }
        let mut found = BTreeMap::new();
        let mut known = std::collections::HashMap::new();
        // Unread delays are read from their files by whoever checks them.
        let delays = {
            let _turn = self.dumping.lock().await;
            super::neigh_parms::proxy_delays(self.handle())
                .await
                .unwrap_or_default()
        };
        for mut link in in_service {
            if let Some(delay) = delays.get(&link.index) {
                link.settings.push((sysctl::PROXY_DELAY, *delay as i32));
            }
            found.insert(link.name.clone(), link.index);
            known.insert(link.name, link.settings);
        }
        *self.dumped_settings.lock().unwrap() = known;
        Ok(found)
    }

    /// The index of a host link that must exist (just created).
    pub(super) async fn index_of(&self, name: &str) -> Result<u32> {
        link_by_name(self.handle(), name)
            .await
            .map_err(nl(format!("looking up {name}")))?
            .map(|m| m.header.index)
            .ok_or_else(|| KernelError::Io {
                what: format!("veth {name} vanished after creation"),
                source: io::Error::from_raw_os_error(ENODEV),
            })
    }
}
