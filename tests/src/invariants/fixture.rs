//! A healthy dual-stack lab as a snapshot, for the checker's unit tests: two hosts on one
//! subnet (h1, h2) with an IPv4 and an IPv6 pool (encapsulation none), one block of each family
//! each, and one dual-stack endpoint `a` on h1 publishing 8080→80/tcp, with everything the
//! agents would hold for that: records, List and Status, routes, sysctls, iptables and
//! ip6tables tables (policy's chains rendered by the agent's own planner), the container.

use serde_json::json;
use weft_agent::firewall::chains::as_held;
use weft_agent::policy::plan::{plan, Family as PlanFamily};
use weft_agent::policy::render::render;
use weft_etcd::records::EndpointRecord;

use super::*;

pub const NETNS: &str = "/run/netns/c-a";

fn endpoint_json() -> Value {
    json!({
        "container_id": "a", "host": "h1", "ip": "10.65.0.1", "ipv6": "fd65::1",
        "host_ifname": "weft1", "ifname": "eth0", "mac": "02:00:00:00:00:01",
        "netns": NETNS, "owns_netns": false, "created": 0,
        "ports": [{"protocol": "tcp", "host_port": 8080, "container_port": 80}],
    })
}

/// The etcd records, by key.
pub fn etcd() -> BTreeMap<String, String> {
    let pool = |cidr: &str, size: u8| json!({"cidr": cidr, "block_size": size, "nat_outgoing": true, "encapsulation": "none"});
    let host = |n: u8| {
        json!({"underlay_ip": format!("198.51.100.{n}"), "underlay_prefix": 24,
               "underlay_ipv6": format!("2001:db8:100::{n}"), "version": "x", "first_seen": 0})
    };
    let owner = |h: &str| json!({"host": h});
    let guard = json!({"host": "h1", "container_id": "a"});
    [
        ("pools/default", pool("10.65.0.0/16", 26)),
        ("pools/default-v6", pool("fd65::/48", 122)),
        ("hosts/h1", host(1)),
        ("hosts/h2", host(2)),
        ("alive/h1", json!({"boot_id": "b", "started": 0})),
        ("alive/h2", json!({"boot_id": "b", "started": 0})),
        ("blocks/default/10.65.0.0-26", owner("h1")),
        ("blocks/default-v6/fd65::-122", owner("h1")),
        ("blocks/default/10.65.0.64-26", owner("h2")),
        ("blocks/default-v6/fd65::40-122", owner("h2")),
        ("ips/10.65.0.1", guard.clone()),
        ("ips/fd65::1", guard),
        ("endpoints/h1/a", endpoint_json()),
        ("ports/h1/tcp/8080", json!({"container_id": "a"})),
    ]
    .into_iter()
    .map(|(k, v)| (format!("{ETCD_PREFIX}{k}"), v.to_string()))
    .collect()
}

fn status(me: u8, peer: u8) -> Value {
    let blocks = |n: u8| match n {
        1 => json!(["10.65.0.0/26", "fd65::/122"]),
        _ => json!(["10.65.0.64/26", "fd65::40/122"]),
    };
    json!({
        "host": format!("h{me}"), "underlay_ip": format!("198.51.100.{me}"),
        "underlay_ipv6": format!("2001:db8:100::{me}"), "etcd_connected": true,
        "endpoint_count": u8::from(me == 1), "problems": [], "local_blocks": blocks(me),
        "peers": [{"host": format!("h{peer}"), "underlay_ip": format!("198.51.100.{peer}"),
                   "underlay_ipv6": format!("2001:db8:100::{peer}"), "alive": true,
                   "blocks": blocks(peer)}],
    })
}

/// `-A` lines (and chain declarations) as iptables-save prints a table.
fn table(rules: &[String]) -> String {
    rules.iter().map(|r| format!("{r}\n")).collect()
}

/// The nat table of a family: jumps, SNAT of the pool, and `ports` = (address, host port,
/// container port) published.
fn nat(pool: &str, ports: &[(&str, u16, u16)]) -> String {
    let mut rules: Vec<String> = [
        "-A POSTROUTING -j WEFT-POSTROUTING",
        "-A PREROUTING -m addrtype --dst-type LOCAL -j WEFT-PORTS",
        "-A OUTPUT -m addrtype --dst-type LOCAL -j WEFT-PORTS",
    ]
    .map(String::from)
    .to_vec();
    for (ip, host_port, port) in ports {
        let host = if ip.contains(':') { 128 } else { 32 };
        let to = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        rules.push(format!(
            "-A WEFT-POSTROUTING -s {ip}/{host} -d {ip}/{host} -p tcp -m tcp --dport {port} -j MASQUERADE"
        ));
        rules.push(format!(
            "-A WEFT-PORTS -p tcp -m tcp --dport {host_port} -j DNAT --to-destination {to}:{port}"
        ));
    }
    rules.push(format!(
        "-A WEFT-POSTROUTING -s {pool} -j WEFT-NAT-OUTGOING"
    ));
    rules.push(format!("-A WEFT-NAT-OUTGOING -d {pool} -j RETURN"));
    rules.push("-A WEFT-NAT-OUTGOING -j MASQUERADE".into());
    table(&rules)
}

/// The filter table of a family: our FORWARD and INPUT chains around policy's (rendered by the
/// agent's planner for this host), with neighbour discovery accepted first for IPv6.
fn filter(me: &str, family: PlanFamily, etcd: &BTreeMap<String, String>) -> String {
    let endpoints: Vec<EndpointRecord> = etcd
        .iter()
        .filter(|(k, _)| k.contains("/endpoints/"))
        .map(|(_, v)| serde_json::from_str(v).unwrap())
        .collect();
    let fabric: Vec<&EndpointRecord> = endpoints.iter().collect();
    let local: Vec<&EndpointRecord> = fabric.iter().copied().filter(|e| e.host == me).collect();
    let mut rules = vec![];
    for (chain, lines) in as_held(&render(&plan(family, &[], &fabric, &local))) {
        rules.push(format!(":{chain} - [0:0]"));
        rules.extend(lines);
    }
    rules.extend(
        [
            "-A FORWARD -j WEFT-FORWARD",
            "-A INPUT -j WEFT-INPUT",
            "-A WEFT-FORWARD -i weft+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            "-A WEFT-FORWARD -o weft+ -j WEFT-TO-WL",
            "-A WEFT-FORWARD -i weft+ -j ACCEPT",
            "-A WEFT-FORWARD -o weft+ -m comment --comment \"weft: to containers\" -j ACCEPT",
        ]
        .map(String::from),
    );
    if family == PlanFamily::V6 {
        for kind in rules6::NEIGHBOUR_DISCOVERY {
            rules.push(format!(
                "-A WEFT-INPUT -i weft+ -p ipv6-icmp -m icmp6 --icmpv6-type {kind} -j ACCEPT"
            ));
        }
    }
    rules.push(
        "-A WEFT-INPUT -i weft+ -m conntrack ! --ctstate RELATED,ESTABLISHED -j WEFT-FROM-WL"
            .into(),
    );
    table(&rules)
}

fn host_kernel(me: u8, etcd: &BTreeMap<String, String>) -> HostKernel {
    let name = format!("h{me}");
    let peer = 3 - me;
    let (blocks, peer_blocks) = match me {
        1 => (
            ["10.65.0.0/26", "fd65::/122"],
            ["10.65.0.64/26", "fd65::40/122"],
        ),
        _ => (
            ["10.65.0.64/26", "fd65::40/122"],
            ["10.65.0.0/26", "fd65::/122"],
        ),
    };
    let mut routes = vec![];
    for b in blocks {
        routes.push(json!({"dst": b, "type": "blackhole", "dev": "lo"}));
    }
    let gateways = [
        format!("198.51.100.{peer}"),
        format!("2001:db8:100::{peer}"),
    ];
    for (b, gw) in peer_blocks.iter().zip(gateways) {
        routes.push(json!({"dst": b, "gateway": gw, "dev": "eth0"}));
    }
    let mut sysctls: BTreeMap<String, String> = HOST_SYSCTLS
        .iter()
        .map(|(f, v)| (f.to_string(), v.to_string()))
        .collect();
    let mut links = vec![json!({"ifname": "eth0", "flags": ["UP"]})];
    let mut ports = vec![];
    if me == 1 {
        links.push(
            json!({"ifname": "weft1", "flags": ["UP"], "address": VETH_MAC,
                          "linkinfo": {"info_kind": "veth"}}),
        );
        for ip in ["10.65.0.1", "fd65::1"] {
            routes.push(json!({"dst": ip, "dev": "weft1"}));
        }
        for (f, v) in VETH_SYSCTLS {
            sysctls.insert(f.replace("{}", "weft1"), v.to_string());
        }
        ports = vec![("10.65.0.1", 8080, 80), ("fd65::1", 8080, 80)];
    }
    let (v4, v6): (Vec<_>, Vec<_>) = ports.into_iter().partition(|p| !p.0.contains(':'));
    HostKernel {
        links,
        routes,
        sysctls,
        nat: nat("10.65.0.0/16", &v4),
        filter: filter(&name, PlanFamily::V4, etcd),
        raw6: table(&[
            "-A PREROUTING -i weft+ -j WEFT-PREROUTING".into(),
            "-A WEFT-PREROUTING -m rpfilter --invert -j DROP".into(),
        ]),
        nat6: nat("fd65::/48", &v6),
        filter6: filter(&name, PlanFamily::V6, etcd),
        ipsets: String::new(),
    }
}

fn container() -> ContainerKernel {
    let neighbour =
        |gw: &str| json!({"dst": gw, "dev": "eth0", "lladdr": VETH_MAC, "state": ["PERMANENT"]});
    ContainerKernel {
        links: vec![
            json!({"ifname": "lo", "flags": ["LOOPBACK", "UP"]}),
            json!({"ifname": "eth0", "flags": ["UP"], "address": "02:00:00:00:00:01",
            "addr_info": [
                {"family": "inet", "local": "10.65.0.1", "prefixlen": 32},
                {"family": "inet6", "local": "fd65::1", "prefixlen": 128,
                 "scope": "global"},
                {"family": "inet6", "local": "fe80::1", "prefixlen": 64,
                 "scope": "link"},
            ]}),
        ],
        routes: vec![json!({"dst": "default", "gateway": GATEWAY, "dev": "eth0"})],
        routes6: vec![
            json!({"dst": "fe80::/64", "dev": "eth0"}),
            json!({"dst": "default", "gateway": GATEWAY_V6, "dev": "eth0"}),
        ],
        neighbours: vec![neighbour(GATEWAY)],
        neighbours6: vec![neighbour(GATEWAY_V6)],
        rules: vec![],
        rules6: vec![],
    }
}

/// The snapshot of `etcd` (usually [`etcd`], perhaps changed) with the healthy lab's agents and
/// kernels.
pub fn snapshot_of(etcd: BTreeMap<String, String>) -> Snapshot {
    let hosts = [1u8, 2]
        .map(|me| {
            let list = match me {
                1 => {
                    let mut e = endpoint_json();
                    e.as_object_mut().unwrap().remove("owns_netns");
                    vec![e]
                }
                _ => vec![],
            };
            let mut containers = BTreeMap::new();
            if me == 1 {
                containers.insert(NETNS.to_string(), Ok(container()));
            }
            HostView {
                name: format!("h{me}"),
                ip: format!("198.51.100.{me}").parse().unwrap(),
                ip6: Some(format!("2001:db8:100::{me}").parse().unwrap()),
                agent: AgentView::Answered {
                    list,
                    status: status(me, 3 - me),
                },
                kernel: Ok(host_kernel(me, &etcd)),
                containers,
            }
        })
        .to_vec();
    Snapshot {
        records: Records::parse(&etcd),
        etcd,
        namespaces: BTreeSet::new(),
        hosts,
        took: Duration::ZERO,
    }
}

/// The healthy dual-stack lab.
pub fn snapshot() -> Snapshot {
    snapshot_of(etcd())
}
