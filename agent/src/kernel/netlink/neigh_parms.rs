//! The ARP table's per-interface parameters, read for all interfaces in one dump: a full pass
//! learns every veth's `proxy_delay` from it instead of opening one file per veth (the only
//! per-veth setting a link dump does not show).

use std::collections::HashMap;

use futures::StreamExt;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_route::neighbour_table::{
    NeighbourTableAttribute, NeighbourTableMessage, NeighbourTableParameter,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

/// `proxy_delay` of every interface of the namespace that has IPv4, in the sysctl's unit
/// (hundredths of a second), by interface index.
pub(super) async fn proxy_delays(
    handle: &rtnetlink::Handle,
) -> Result<HashMap<u32, u64>, rtnetlink::Error> {
    let mut request = NeighbourTableMessage::default();
    request.header.family = AddressFamily::Inet;
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetNeighbourTable(request));
    request.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut responses = handle.clone().request(request)?;
    let mut delays = HashMap::new();
    while let Some(message) = responses.next().await {
        match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbourTable(table)) => {
                delays.extend(proxy_delay(&table));
            }
            NetlinkPayload::Error(e) => return Err(rtnetlink::Error::NetlinkError(e)),
            _ => {}
        }
    }
    Ok(delays)
}

/// The interface and its `proxy_delay` that one message of the dump describes, if it is an
/// interface's (the table's own defaults carry no index). The kernel reports milliseconds.
fn proxy_delay(table: &NeighbourTableMessage) -> Option<(u32, u64)> {
    let params = table.attributes.iter().find_map(|a| match a {
        NeighbourTableAttribute::Parms(params) => Some(params),
        _ => None,
    })?;
    let index = params.iter().find_map(|p| match p {
        NeighbourTableParameter::Ifindex(i) if *i != 0 => Some(*i),
        _ => None,
    })?;
    let delay = params.iter().find_map(|p| match p {
        NeighbourTableParameter::ProxyDelay(ms) => Some(*ms / 10),
        _ => None,
    })?;
    Some((index, delay))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(params: Vec<NeighbourTableParameter>) -> NeighbourTableMessage {
        let mut table = NeighbourTableMessage::default();
        table.header.family = AddressFamily::Inet;
        table
            .attributes
            .push(NeighbourTableAttribute::Name("arp_cache".into()));
        table
            .attributes
            .push(NeighbourTableAttribute::Parms(params));
        table
    }

    #[test]
    fn an_interface_delay_is_read_in_the_sysctl_unit_and_the_defaults_are_skipped() {
        use NeighbourTableParameter as P;
        assert_eq!(
            proxy_delay(&table(vec![P::Ifindex(7), P::ProxyDelay(800)])),
            Some((7, 80))
        );
        assert_eq!(
            proxy_delay(&table(vec![P::ProxyDelay(0), P::Ifindex(9)])),
            Some((9, 0))
        );
        // The table's defaults: no interface index.
        assert_eq!(proxy_delay(&table(vec![P::ProxyDelay(800)])), None);
        assert_eq!(proxy_delay(&table(vec![])), None);
    }
}
