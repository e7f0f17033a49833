//! Values the unit tests of several modules build alike.

use weft_etcd::records::EndpointRecord;

/// An IPv4 endpoint of `host` with no ports or labels, in the namespace `/run/netns/<id>`.
pub fn endpoint(host: &str, id: &str, ip: &str, veth: &str) -> EndpointRecord {
    EndpointRecord {
        container_id: id.into(),
        host: host.into(),
        ip: ip.parse().unwrap(),
        host_ifname: veth.into(),
        ifname: "eth0".into(),
        mac: "02:00:00:00:00:01".into(),
        netns: format!("/run/netns/{id}"),
        owns_netns: false,
        ports: vec![],
        created: 0,
        secondary: false,
        labels: Default::default(),
        ipv6: None,
    }
}
