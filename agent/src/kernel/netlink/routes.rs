//! `proto weft` routes over rtnetlink: building route messages, reading them back, and the
//! dump, replace and delete requests.

use std::net::IpAddr;

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::RouteMessageBuilder;

use super::{errno, nl, Netlink};
use crate::kernel::Result;
use crate::model::{Route, RouteTarget, RT_PROTO_WEFT};

/// The main routing table.
const MAIN_TABLE: u8 = 254;

pub(super) fn route_message(route: &Route) -> RouteMessage {
    let builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(route.dst.network(), route.dst.prefix())
        .expect("a prefix of its own family");
    let builder = match route.target {
        RouteTarget::Dev(index) => builder.output_interface(index).scope(RouteScope::Link),
        RouteTarget::Via(gateway) => builder.gateway(gateway).expect("a gateway of the family"),
        RouteTarget::Onlink { via, dev } => builder
            .gateway(via)
            .expect("a gateway of the family")
            .output_interface(dev)
            .onlink(),
        RouteTarget::Blackhole => builder.kind(RouteType::BlackHole),
    };
    builder
        .protocol(RouteProtocol::Other(RT_PROTO_WEFT))
        .build()
}

fn address(attr: &RouteAddress) -> Option<IpAddr> {
    match attr {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

/// A `proto weft` route of the main table, in either family; None for anything else.
pub(super) fn parse_weft_route(msg: &RouteMessage) -> Option<Route> {
    let header = &msg.header;
    let unspecified = match header.address_family {
        AddressFamily::Inet => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    if header.protocol != RouteProtocol::Other(RT_PROTO_WEFT) || header.table != MAIN_TABLE {
        return None;
    }
    let mut dst = unspecified;
    let mut gateway = None;
    let mut oif = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(a) => dst = address(a)?,
            RouteAttribute::Gateway(a) => gateway = address(a),
            RouteAttribute::Oif(index) => oif = Some(*index),
            _ => {}
        }
    }
    let onlink = header.flags.contains(RouteFlags::Onlink);
    let target = match (header.kind, gateway, oif) {
        (RouteType::BlackHole, _, _) => RouteTarget::Blackhole,
        (_, Some(via), Some(dev)) if onlink => RouteTarget::Onlink { via, dev },
        (_, Some(gateway), _) => RouteTarget::Via(gateway),
        (_, None, Some(index)) => RouteTarget::Dev(index),
        _ => return None,
    };
    Some(Route {
        dst: IpNetwork::new(dst, header.destination_prefix_length).ok()?,
        target,
    })
}

impl Netlink {
    /// Every route of both families (one dump).
    pub(super) async fn dump_routes(&self) -> Result<Vec<RouteMessage>> {
        let _turn = self.dumping.lock().await;
        self.handle()
            .route()
            .get(RouteMessageBuilder::<IpAddr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing routes"))
    }

    pub(super) async fn weft_routes(&self) -> Result<Vec<Route>> {
        let routes = self.dump_routes().await?;
        Ok(routes.iter().filter_map(parse_weft_route).collect())
    }

    /// The interface of the IPv4 default route of the main table.
    pub(super) async fn default_route_ifindex(&self) -> Result<Option<u32>> {
        let routes = self.dump_routes().await?;
        Ok(routes
            .iter()
            .filter(|r| {
                r.header.address_family == AddressFamily::Inet
                    && r.header.destination_prefix_length == 0
                    && r.header.table == MAIN_TABLE
            })
            .find_map(|r| {
                r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                })
            }))
    }

    pub(super) async fn replace(&self, route: &Route) -> Result<()> {
        self.handle()
            .route()
            .add(route_message(route))
            .replace()
            .execute()
            .await
            .map_err(nl(format!("adding route {route}")))
    }

    pub(super) async fn delete(&self, route: &Route) -> Result<()> {
        match self
            .handle()
            .route()
            .del(route_message(route))
            .execute()
            .await
        {
            Err(e) if !matches!(errno(&e), Some(libc::ESRCH) | Some(libc::ENOENT)) => {
                Err(nl(format!("deleting route {route}"))(e))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_messages_parse_back_in_both_families() {
        let routes = [
            Route {
                dst: "10.65.0.7/32".parse().unwrap(),
                target: RouteTarget::Dev(12),
            },
            Route {
                dst: "10.65.1.0/26".parse().unwrap(),
                target: RouteTarget::Via("198.51.100.2".parse().unwrap()),
            },
            Route {
                dst: "10.65.2.0/26".parse().unwrap(),
                target: RouteTarget::Blackhole,
            },
            Route {
                dst: "fd65::40/122".parse().unwrap(),
                target: RouteTarget::Via("2001:db8:100::2".parse().unwrap()),
            },
            Route {
                dst: "fd65::7/128".parse().unwrap(),
                target: RouteTarget::Dev(3),
            },
            Route {
                dst: "10.65.9.0/26".parse().unwrap(),
                target: RouteTarget::Onlink {
                    via: "10.65.9.0".parse().unwrap(),
                    dev: 9,
                },
            },
            Route {
                dst: "fd65::80/122".parse().unwrap(),
                target: RouteTarget::Onlink {
                    via: "fe80::ff:fe00:b".parse().unwrap(),
                    dev: 9,
                },
            },
        ];
        for route in routes {
            let mut msg = route_message(&route);
            // The kernel reports the main table in the header.
            msg.header.table = MAIN_TABLE;
            assert_eq!(parse_weft_route(&msg), Some(route), "{route}");
        }
    }

    #[test]
    fn other_protocols_and_tables_are_not_ours() {
        let route = Route {
            dst: "10.65.0.7/32".parse().unwrap(),
            target: RouteTarget::Dev(12),
        };
        let mut msg = route_message(&route);
        msg.header.table = MAIN_TABLE;
        msg.header.protocol = RouteProtocol::Static;
        assert_eq!(parse_weft_route(&msg), None);
        let mut msg = route_message(&route);
        msg.header.table = 100;
        assert_eq!(parse_weft_route(&msg), None);
    }
}
