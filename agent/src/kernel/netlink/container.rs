//! Inside a container's namespace: `lo` up, the container's address, the gateway's on-link
//! route, the default route through it and its permanent neighbour; and checking all of that.

use std::io;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope};
use netlink_packet_route::AddressFamily;
use rtnetlink::{LinkUnspec, RouteMessageBuilder};

use super::links::link_by_name;
use super::{errno, nl};
use crate::kernel::{ContainerLink, InsideCheck, KernelError, Result};
use crate::model::{IfName, Mac, GATEWAY_V4, HOST_VETH_MAC};

async fn set_up(handle: &rtnetlink::Handle, index: u32) -> Result<(), rtnetlink::Error> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
}

/// Sets the container side up: every step is idempotent, so it also repairs.
pub(super) async fn configure(
    inside: &rtnetlink::Handle,
    link: &ContainerLink,
    netns: &str,
) -> Result<()> {
    let index = link_by_name(inside, link.ifname.as_str())
        .await
        .map_err(nl(format!("looking up {} in {netns}", link.ifname)))?
        .map(|m| m.header.index)
        .ok_or_else(|| KernelError::Io {
            what: format!("{} missing in {netns} after creation", link.ifname),
            source: io::Error::from_raw_os_error(libc::ENODEV),
        })?;
    // A secondary interface routes through its own table, used only for its own address.
    let table = route_table(link.secondary, index);
    match link.address_of(true) {
        Some(v4) => configure_v4(inside, link, index, table, v4, netns).await?,
        None => {
            set_up(inside, 1)
                .await
                .map_err(nl(format!("bringing up lo in {netns}")))?;
            set_up(inside, index)
                .await
                .map_err(nl(format!("bringing up {} in {netns}", link.ifname)))?;
        }
    }
    if let Some(v6) = link.address_of(false) {
        super::container_v6::configure(inside, index, table, v6, netns).await?;
    }
    if link.secondary {
        for ip in link.addresses() {
            add_source_rule(inside, ip, table, netns).await?;
        }
    }
    Ok(())
}

/// `lo` and the interface up, the IPv4 address, the gateway's routes and neighbour.
async fn configure_v4(
    inside: &rtnetlink::Handle,
    link: &ContainerLink,
    index: u32,
    table: u32,
    ip: IpAddr,
    netns: &str,
) -> Result<()> {
    // The gateway is on-link through eth0 and answered from a permanent neighbour entry, so it
    // works even where the host's proxy ARP would stay silent (no default route on the host).
    let gateway_route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(GATEWAY_V4, 32)
        .output_interface(index)
        .scope(RouteScope::Link)
        .table_id(table)
        .build();
    let default_route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(GATEWAY_V4)
        .output_interface(index)
        .table_id(table)
        .build();
    let prefix = 32;
    // Pipelined: the requests go out on one socket in this order without waiting for each
    // other's answers; the kernel handles them in order, so each still finds what the ones
    // before it made. lo is always the first device of a namespace (LOOPBACK_IFINDEX).
    let (lo, address, up, gateway, default, neighbour) = futures::join!(
        set_up(inside, 1),
        inside.address().add(index, ip, prefix).execute(),
        set_up(inside, index),
        inside.route().add(gateway_route).replace().execute(),
        inside.route().add(default_route).replace().execute(),
        inside
            .neighbours()
            .add(index, IpAddr::V4(GATEWAY_V4))
            .link_layer_address(&HOST_VETH_MAC)
            .state(NeighbourState::Permanent)
            .replace()
            .execute(),
    );
    lo.map_err(nl(format!("bringing up lo in {netns}")))?;
    match address {
        Err(e) if errno(&e) != Some(libc::EEXIST) => {
            return Err(nl(format!("adding {ip}/{prefix} in {netns}"))(e))
        }
        _ => {}
    }
    up.map_err(nl(format!("bringing up {} in {netns}", link.ifname)))?;
    gateway.map_err(nl(format!("adding gateway route in {netns}")))?;
    default.map_err(nl(format!("adding default route in {netns}")))?;
    neighbour.map_err(nl(format!("adding gateway neighbour in {netns}")))?;
    Ok(())
}

/// The main table for the interface with the default route; for a secondary one, a table of its
/// own (numbered after the interface, so two never share one).
pub(super) fn route_table(secondary: bool, index: u32) -> u32 {
    match secondary {
        true => SECONDARY_TABLE_BASE + index,
        false => MAIN_TABLE,
    }
}

pub(super) const MAIN_TABLE: u32 = 254;
const SECONDARY_TABLE_BASE: u32 = 1000;
/// Priority of the source rules of secondary interfaces: before the main table (32766).
const SOURCE_RULE_PRIORITY: u32 = 1000;

/// `ip rule add from <ip> lookup <table>` (`ip -6 rule` for an IPv6 address): traffic from a
/// secondary interface's address leaves through that interface (its host end's strict
/// rp_filter, or the ip6tables reverse-path match, would drop it anywhere else). Rules of that
/// address left from an earlier pair (another table) go first.
async fn add_source_rule(
    inside: &rtnetlink::Handle,
    ip: IpAddr,
    table: u32,
    netns: &str,
) -> Result<()> {
    use netlink_packet_route::rule::RuleAction;
    remove_source_rules(inside, ip, Some(table), netns).await?;
    let added = match ip {
        IpAddr::V4(v4) => {
            let rule = inside.rule().add().v4().source_prefix(v4, 32);
            let rule = rule.table_id(table).priority(SOURCE_RULE_PRIORITY);
            rule.action(RuleAction::ToTable).execute().await
        }
        IpAddr::V6(v6) => {
            let rule = inside.rule().add().v6().source_prefix(v6, 128);
            let rule = rule.table_id(table).priority(SOURCE_RULE_PRIORITY);
            rule.action(RuleAction::ToTable).execute().await
        }
    };
    match added {
        Err(e) if errno(&e) != Some(libc::EEXIST) => {
            Err(nl(format!("adding the source rule of {ip} in {netns}"))(e))
        }
        _ => Ok(()),
    }
}

/// Deletes the source rules of `ip` at our priority, except the one to `keep`.
pub(super) async fn remove_source_rules(
    inside: &rtnetlink::Handle,
    ip: IpAddr,
    keep: Option<u32>,
    netns: &str,
) -> Result<()> {
    use netlink_packet_route::rule::RuleAttribute;
    let rules: Vec<_> = inside
        .rule()
        .get(ip_version(ip))
        .execute()
        .try_collect()
        .await
        .map_err(nl(format!("listing rules in {netns}")))?;
    for rule in rules {
        let ours = rule.attributes.contains(&RuleAttribute::Source(ip))
            && rule
                .attributes
                .contains(&RuleAttribute::Priority(SOURCE_RULE_PRIORITY));
        let kept = keep.is_some_and(|t| rule.attributes.contains(&RuleAttribute::Table(t)));
        if ours && !kept {
            match inside.rule().del(rule).execute().await {
                Err(e) if !matches!(errno(&e), Some(libc::ENOENT) | Some(libc::ESRCH)) => {
                    return Err(nl(format!("deleting a stale rule of {ip} in {netns}"))(e))
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// The addresses of interface `index` (`place`: where, for error messages). The whole dump is
/// read: a stream dropped halfway leaves netlink-proto with replies it cannot deliver (and a
/// warning in the log).
pub(super) async fn addresses_of(
    handle: &rtnetlink::Handle,
    index: u32,
    place: &str,
) -> Result<Vec<AddressMessage>> {
    handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(nl(format!("listing addresses of #{index}{place}")))
}

/// Checks inside a container's namespace: `lo` up; `ifname` present and up, holding its
/// addresses; per family, the gateway's routes and its permanent neighbour entry.
pub(super) async fn check(
    handle: &rtnetlink::Handle,
    path: &str,
    container: &ContainerLink,
) -> Result<InsideCheck> {
    let (ifname, secondary) = (&container.ifname, container.secondary);
    let mut problems = vec![];
    let lo = handle
        .link()
        .get()
        .match_index(1)
        .execute()
        .try_next()
        .await
        .map_err(nl(format!("looking up lo in {path}")))?;
    if !lo.is_some_and(|lo| lo.header.flags.contains(LinkFlags::Up)) {
        problems.push(format!("lo is down in {path}"));
    }
    let Some(link) = link_by_name(handle, ifname.as_str())
        .await
        .map_err(nl(format!("looking up {ifname} in {path}")))?
    else {
        problems.push(format!("{ifname} is missing in {path}"));
        return Ok(InsideCheck {
            interface_present: false,
            problems,
        });
    };
    if !link.header.flags.contains(LinkFlags::Up) {
        problems.push(format!("{ifname} is down in {path}"));
    }
    for ip in container.addresses() {
        problems.extend(check_address(handle, &link, path, ifname, ip).await?);
    }
    let table = route_table(secondary, link.header.index);
    if container.address_of(true).is_some() {
        problems.extend(check_gateway(handle, link.header.index, table, path, ifname).await?);
    }
    if container.address_of(false).is_some() {
        let index = link.header.index;
        problems.extend(super::container_v6::check(handle, index, table, path, ifname).await?);
    }
    if secondary {
        for ip in container.addresses() {
            problems.extend(check_source_rule(handle, ip, table, path).await?);
        }
    }
    Ok(InsideCheck {
        interface_present: true,
        problems,
    })
}

async fn check_address(
    handle: &rtnetlink::Handle,
    link: &LinkMessage,
    path: &str,
    ifname: &IfName,
    ip: IpAddr,
) -> Result<Option<String>> {
    let prefix = if ip.is_ipv4() { 32 } else { 128 };
    let addresses = addresses_of(handle, link.header.index, &format!(" in {path}")).await?;
    let holds = addresses.iter().any(|m| {
        m.header.prefix_len == prefix
            && m.attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(a) if *a == ip))
    });
    Ok((!holds).then(|| format!("{ifname} in {path} does not hold {ip}/{prefix}")))
}

async fn check_gateway(
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
            RouteMessageBuilder::<Ipv4Addr>::new()
                .table_id(table)
                .build(),
        )
        .execute()
        .try_collect()
        .await
        .map_err(nl(format!("listing routes in {path}")))?;
    let route_to = |prefix_len: u8, dst: Option<Ipv4Addr>, gateway: Option<Ipv4Addr>| {
        routes.iter().any(|r| {
            let attr_dst = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
                _ => None,
            });
            let attr_gateway = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
                _ => None,
            });
            route_table_of(r) == table
                && r.header.destination_prefix_length == prefix_len
                && attr_dst == dst
                && attr_gateway == gateway
                && r.attributes.contains(&RouteAttribute::Oif(index))
        })
    };
    let place = match table {
        MAIN_TABLE => String::new(),
        table => format!(" (table {table})"),
    };
    if !route_to(32, Some(GATEWAY_V4), None) {
        problems.push(format!(
            "no on-link route to {GATEWAY_V4} via {ifname} in {path}{place}"
        ));
    }
    if !route_to(0, None, Some(GATEWAY_V4)) {
        problems.push(format!(
            "no default route via {GATEWAY_V4} in {path}{place}"
        ));
    }
    problems.extend(check_gateway_neighbour(handle, index, GATEWAY_V4.into(), path, ifname).await?);
    Ok(problems)
}

/// The gateway of one family as a permanent neighbour of interface `index` with the host end's
/// MAC (what the container resolves its gateway by), or what is wrong.
pub(super) async fn check_gateway_neighbour(
    handle: &rtnetlink::Handle,
    index: u32,
    gateway: IpAddr,
    path: &str,
    ifname: &IfName,
) -> Result<Option<String>> {
    let (family, destination) = match gateway {
        IpAddr::V4(v4) => (AddressFamily::Inet, NeighbourAddress::Inet(v4)),
        IpAddr::V6(v6) => (AddressFamily::Inet6, NeighbourAddress::Inet6(v6)),
    };
    let neighbours: Vec<_> = handle
        .neighbours()
        .get()
        .set_address_family(family)
        .execute()
        .try_collect()
        .await
        .map_err(nl(format!("listing neighbours in {path}")))?;
    let present = neighbours.iter().any(|n| {
        n.header.ifindex == index
            && n.header.state == NeighbourState::Permanent
            && n.attributes
                .contains(&NeighbourAttribute::Destination(destination.clone()))
            && n.attributes.contains(&NeighbourAttribute::LinkLayerAddress(
                HOST_VETH_MAC.to_vec(),
            ))
    });
    Ok((!present).then(|| {
        format!(
            "no permanent neighbour {gateway} -> {} on {ifname} in {path}",
            Mac(HOST_VETH_MAC)
        )
    }))
}

/// The table of a route: the header holds tables below 256, the attribute any.
pub(super) fn route_table_of(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(route.header.table as u32)
}

async fn check_source_rule(
    handle: &rtnetlink::Handle,
    ip: IpAddr,
    table: u32,
    path: &str,
) -> Result<Option<String>> {
    use netlink_packet_route::rule::RuleAttribute;
    let rules: Vec<_> = handle
        .rule()
        .get(ip_version(ip))
        .execute()
        .try_collect()
        .await
        .map_err(nl(format!("listing rules in {path}")))?;
    let present = rules.iter().any(|r| {
        r.attributes.contains(&RuleAttribute::Source(ip))
            && r.attributes.contains(&RuleAttribute::Table(table))
    });
    Ok((!present).then(|| format!("no rule from {ip} to table {table} in {path}")))
}

fn ip_version(ip: IpAddr) -> rtnetlink::IpVersion {
    match ip {
        IpAddr::V4(_) => rtnetlink::IpVersion::V4,
        IpAddr::V6(_) => rtnetlink::IpVersion::V6,
    }
}
