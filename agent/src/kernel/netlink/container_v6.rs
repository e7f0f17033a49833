//! The IPv6 side of a container (Calico's recipe): `<v6>/128` without DAD, a default route via
//! the host end's link-local address (`GATEWAY_V6`) and a permanent neighbour entry for it, so
//! the gateway never needs neighbour discovery; and checking all of that. The container's IPv6
//! forwarding stays off (a new namespace starts with it off).

use std::net::{IpAddr, Ipv6Addr};

use futures::TryStreamExt;
use netlink_packet_route::address::AddressFlags;
use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::RouteMessageBuilder;

use super::container::{check_gateway_neighbour, route_table_of, MAIN_TABLE};
use super::{errno, nl};
use crate::kernel::Result;
use crate::model::{IfName, GATEWAY_V6, HOST_VETH_MAC};

/// Adds the address, the default route and the gateway's neighbour; idempotent. The interface
/// is up already (a route through a device that is down is refused).
pub(super) async fn configure(
    inside: &rtnetlink::Handle,
    index: u32,
    table: u32,
    ip: IpAddr,
    netns: &str,
) -> Result<()> {
    let mut address = inside.address().add(index, ip, 128);
    address
        .message_mut()
        .attributes
        .push(netlink_packet_route::address::AddressAttribute::Flags(
            AddressFlags::Nodad,
        ));
    let default_route = RouteMessageBuilder::<Ipv6Addr>::new()
        .gateway(GATEWAY_V6)
        .output_interface(index)
        .table_id(table)
        .build();
    let (address, neighbour, default) = futures::join!(
        address.execute(),
        inside
            .neighbours()
            .add(index, IpAddr::V6(GATEWAY_V6))
            .link_layer_address(&HOST_VETH_MAC)
            .state(NeighbourState::Permanent)
            .replace()
            .execute(),
        inside.route().add(default_route).replace().execute(),
    );
    match address {
        Err(e) if errno(&e) != Some(libc::EEXIST) => {
            return Err(nl(format!("adding {ip}/128 in {netns}"))(e))
        }
        _ => {}
    }
    neighbour.map_err(nl(format!("adding the IPv6 gateway neighbour in {netns}")))?;
    default.map_err(nl(format!("adding the IPv6 default route in {netns}")))?;
    Ok(())
}

/// What is wrong with the IPv6 gateway: its default route and its permanent neighbour entry.
pub(super) async fn check(
    handle: &rtnetlink::Handle,
    index: u32,
    table: u32,
    path: &str,
    ifname: &IfName,
) -> Result<Vec<String>> {
    let mut problems = vec![];
    let routes: Vec<RouteMessage> = handle
        .route()
        .get(
            RouteMessageBuilder::<Ipv6Addr>::new()
                .table_id(table)
                .build(),
        )
        .execute()
        .try_collect()
        .await
        .map_err(nl(format!("listing IPv6 routes in {path}")))?;
    let default = routes.iter().any(|r| {
        route_table_of(r) == table
            && r.header.destination_prefix_length == 0
            && r.attributes
                .contains(&RouteAttribute::Gateway(RouteAddress::Inet6(GATEWAY_V6)))
            && r.attributes.contains(&RouteAttribute::Oif(index))
    });
    if !default {
        let place = match table {
            MAIN_TABLE => String::new(),
            table => format!(" (table {table})"),
        };
        problems.push(format!(
            "no default route via {GATEWAY_V6} dev {ifname} in {path}{place}"
        ));
    }
    let gateway = GATEWAY_V6.into();
    problems.extend(check_gateway_neighbour(handle, index, gateway, path, ifname).await?);
    Ok(problems)
}
