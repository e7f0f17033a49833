//! `weftctl ipam check`: consistency of endpoint, address, port and block records against each
//! other (and against a host's kernel, as its agent reports it). Pure: it reads a snapshot and
//! names each problem with the fix it offers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use weft_etcd::records::{EndpointRecord, IpRecord, PoolRecord};
use weft_etcd::{BlockOwner, PortReservation};

/// Everything the check looks at.
#[derive(Default)]
pub struct Snapshot {
    pub pools: Vec<(String, PoolRecord)>,
    pub hosts: HashSet<String>,
    /// Each host's tunnel address, where it has one.
    pub tunnels: HashMap<String, IpAddr>,
    pub blocks: BTreeMap<IpNetwork, BlockOwner>,
    pub endpoints: Vec<EndpointRecord>,
    pub ips: Vec<(IpAddr, IpRecord)>,
    pub ports: Vec<PortReservation>,
    /// This host's kernel, if the check runs on a host: its name, `weft*` links, /32 routes.
    pub kernel: Option<KernelView>,
}

pub struct KernelView {
    pub host: String,
    pub links: HashSet<String>,
    pub routes: HashSet<IpAddr>,
    /// Namespaces named as the agent names the ones it makes.
    pub namespaces: HashSet<String>,
}

/// What a repair does, when one is safe to make automatically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fix {
    /// Delete a guard key nobody holds.
    DeleteKey(String),
    /// Recreate a missing guard key with this value.
    CreateKey(String, String),
    /// Needs a person: the text says what to run.
    Manual(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub what: String,
    pub fix: Fix,
}

pub fn check(s: &Snapshot, keys: &weft_etcd::Keys) -> Vec<Problem> {
    let mut problems = vec![];
    check_endpoints(s, keys, &mut problems);
    check_guards(s, keys, &mut problems);
    check_blocks(s, &mut problems);
    if let Some(kernel) = &s.kernel {
        check_kernel(s, kernel, &mut problems);
    }
    problems
}

/// Every endpoint holds its address guard, its port reservations, an address in a block of its
/// host, and belongs to a known host.
fn check_endpoints(s: &Snapshot, keys: &weft_etcd::Keys, problems: &mut Vec<Problem>) {
    let ips: HashMap<IpAddr, &IpRecord> = s.ips.iter().map(|(ip, r)| (*ip, r)).collect();
    // Each address of the endpoint (one per family) has its guard.
    let held = s
        .endpoints
        .iter()
        .flat_map(|e| e.addresses().map(move |ip| (e, ip)));
    for (e, ip) in held {
        match ips.get(&ip) {
            None => problems.push(Problem {
                what: format!(
                    "endpoint {}/{} holds {ip} but ips/{ip} is missing",
                    e.host, e.container_id
                ),
                fix: Fix::CreateKey(
                    keys.ip(ip),
                    weft_etcd::records::encode(&IpRecord {
                        host: e.host.clone(),
                        container_id: e.container_id.clone(),
                        tunnel: false,
                    }),
                ),
            }),
            Some(r) if r.host != e.host || r.container_id != e.container_id => {
                problems.push(Problem {
                    what: format!(
                        "{ip} is recorded for {}/{} but endpoint {}/{} also uses it",
                        r.host, r.container_id, e.host, e.container_id
                    ),
                    fix: Fix::Manual(format!(
                        "detach one of them: weftctl detach {} (on {})",
                        e.container_id, e.host
                    )),
                })
            }
            Some(_) => {}
        }
        check_block(s, e, ip, problems);
    }
    for e in &s.endpoints {
        check_reservations(s, keys, e, problems);
        if !s.hosts.contains(&e.host) {
            problems.push(Problem {
                what: format!(
                    "endpoint {}/{} belongs to an unknown host",
                    e.host, e.container_id
                ),
                fix: Fix::Manual(format!("weftctl host remove {}", e.host)),
            });
        }
    }
}

/// The endpoint's address `ip` lies in a block of its host.
fn check_block(s: &Snapshot, e: &EndpointRecord, ip: IpAddr, problems: &mut Vec<Problem>) {
    let owner = s.blocks.iter().find(|(b, _)| b.contains(ip));
    match owner {
        Some((_, o)) if o.host == e.host => {}
        Some((block, o)) => problems.push(Problem {
            what: format!(
                "endpoint {}/{} has {ip} in block {block} owned by {}",
                e.host, e.container_id, o.host
            ),
            fix: Fix::Manual(format!("detach {} and attach it again", e.container_id)),
        }),
        None => problems.push(Problem {
            what: format!(
                "endpoint {}/{} has {ip} outside every claimed block",
                e.host, e.container_id
            ),
            fix: Fix::Manual(format!("detach {} and attach it again", e.container_id)),
        }),
    }
}

/// Every published port of the endpoint is reserved for it.
fn check_reservations(
    s: &Snapshot,
    keys: &weft_etcd::Keys,
    e: &EndpointRecord,
    problems: &mut Vec<Problem>,
) {
    for p in &e.ports {
        let reserved = s.ports.iter().any(|r| {
            r.host == e.host
                && r.protocol == p.protocol
                && r.port == p.host_port
                && r.owner == e.container_id
        });
        if !reserved {
            problems.push(Problem {
                what: format!(
                    "endpoint {}/{} publishes {}/{} without a reservation",
                    e.host, e.container_id, p.protocol, p.host_port
                ),
                fix: Fix::CreateKey(
                    keys.port(&e.host, p.protocol, p.host_port),
                    weft_etcd::records::encode(&weft_etcd::records::PortOwner {
                        container_id: e.container_id.clone(),
                    }),
                ),
            });
        }
    }
}

/// Every address guard and port reservation has its endpoint.
fn check_guards(s: &Snapshot, keys: &weft_etcd::Keys, problems: &mut Vec<Problem>) {
    let endpoints: HashMap<(&str, &str), &EndpointRecord> = s
        .endpoints
        .iter()
        .map(|e| ((e.host.as_str(), e.container_id.as_str()), e))
        .collect();
    for (ip, r) in &s.ips {
        if r.tunnel {
            if s.tunnels.get(&r.host) != Some(ip) {
                problems.push(Problem {
                    what: format!(
                        "{ip} is held as the tunnel address of {}, which has another (leaked)",
                        r.host
                    ),
                    fix: Fix::DeleteKey(keys.ip(*ip)),
                });
            }
            continue;
        }
        if !endpoints.contains_key(&(r.host.as_str(), r.container_id.as_str())) {
            problems.push(Problem {
                what: format!(
                    "{ip} is held for {}/{} which has no endpoint (leaked)",
                    r.host, r.container_id
                ),
                fix: Fix::DeleteKey(keys.ip(*ip)),
            });
        }
    }
    for PortReservation {
        host,
        protocol,
        port,
        owner,
    } in &s.ports
    {
        let holder = endpoints.get(&(host.as_str(), owner.as_str()));
        let publishes = holder.is_some_and(|e| {
            e.ports
                .iter()
                .any(|p| p.protocol == *protocol && p.host_port == *port)
        });
        if !publishes {
            problems.push(Problem {
                what: format!(
                    "host port {protocol}/{port} on {host} is reserved for {owner}, which does not \
                     publish it (leaked)"
                ),
                fix: Fix::DeleteKey(keys.port(host, *protocol, *port)),
            });
        }
    }
}

/// Blocks lie in their pool, do not overlap, and belong to known hosts.
fn check_blocks(s: &Snapshot, problems: &mut Vec<Problem>) {
    let blocks: Vec<(&IpNetwork, &BlockOwner)> = s.blocks.iter().collect();
    for (i, (block, owner)) in blocks.iter().enumerate() {
        let pool = s.pools.iter().find(|(name, _)| *name == owner.pool);
        let fits = pool.is_some_and(|(_, p)| {
            p.cidr.contains(block.network()) && p.cidr.contains(block.broadcast())
        });
        if !fits {
            problems.push(Problem {
                what: format!(
                    "block {block} of {} is outside pool {}",
                    owner.host, owner.pool
                ),
                fix: Fix::Manual(format!("weftctl host remove {}", owner.host)),
            });
        }
        for (other, other_owner) in &blocks[i + 1..] {
            if block.contains(other.network()) || other.contains(block.network()) {
                problems.push(Problem {
                    what: format!(
                        "blocks {block} ({}) and {other} ({}) overlap",
                        owner.host, other_owner.host
                    ),
                    fix: Fix::Manual("remove one of the hosts".into()),
                });
            }
        }
        if !s.hosts.contains(&owner.host) {
            problems.push(Problem {
                what: format!("block {block} belongs to unknown host {}", owner.host),
                fix: Fix::Manual(format!("weftctl host remove {}", owner.host)),
            });
        }
    }
}

/// The host's endpoints have their veth and route in its kernel, and its kernel holds no link
/// or namespace of the agent's kind that no record explains.
fn check_kernel(s: &Snapshot, kernel: &KernelView, problems: &mut Vec<Problem>) {
    let mine: Vec<&EndpointRecord> = s
        .endpoints
        .iter()
        .filter(|e| e.host == kernel.host)
        .collect();
    let mut links: Vec<&String> = kernel
        .links
        .iter()
        .filter(|l| !mine.iter().any(|e| &e.host_ifname == *l))
        .collect();
    links.sort();
    for link in links {
        problems.push(Problem {
            what: format!("link {link} on {} belongs to no endpoint", kernel.host),
            fix: Fix::Manual(format!(
                "find its container (ip -d link show {link}); attach it again with weftctl, or \
                 delete the link: ip link del {link}"
            )),
        });
    }
    let mut namespaces: Vec<&String> = kernel
        .namespaces
        .iter()
        .filter(|n| !mine.iter().any(|e| &e.netns == *n))
        .collect();
    namespaces.sort();
    for netns in namespaces {
        problems.push(Problem {
            what: format!(
                "namespace {netns} on {} belongs to no endpoint",
                kernel.host
            ),
            fix: Fix::Manual(format!(
                "the agent deletes it within one resync interval; by hand: ip netns del {}",
                netns.rsplit('/').next().unwrap_or_default()
            )),
        });
    }
    for e in s.endpoints.iter().filter(|e| e.host == kernel.host) {
        if !kernel.links.contains(&e.host_ifname) {
            problems.push(Problem {
                what: format!(
                    "endpoint {} has no veth {} in this host's kernel",
                    e.container_id, e.host_ifname
                ),
                fix: Fix::Manual(format!(
                    "weftctl attach {} repairs it; if the container is gone, weftctl detach {}",
                    e.container_id, e.container_id
                )),
            });
        } else if let Some(ip) = e.addresses().find(|ip| !kernel.routes.contains(ip)) {
            let bits = if ip.is_ipv4() { 32 } else { 128 };
            problems.push(Problem {
                what: format!(
                    "endpoint {} ({ip}) has no /{bits} route here",
                    e.container_id
                ),
                fix: Fix::Manual(format!("weftctl attach {} repairs it", e.container_id)),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_etcd::records::{PortRecord, Protocol};

    fn reservation(host: &str, protocol: Protocol, port: u16, owner: &str) -> PortReservation {
        PortReservation {
            host: host.into(),
            protocol,
            port,
            owner: owner.into(),
        }
    }

    fn endpoint(host: &str, id: &str, ip: &str) -> EndpointRecord {
        EndpointRecord {
            container_id: id.into(),
            host: host.into(),
            ip: ip.parse().unwrap(),
            host_ifname: format!("weft-{id}"),
            ifname: "eth0".into(),
            mac: "02:00:00:00:00:01".into(),
            netns: "/run/netns/x".into(),
            owns_netns: true,
            ports: vec![],
            created: 0,
            secondary: false,
            labels: Default::default(),
            ipv6: None,
        }
    }

    fn consistent() -> Snapshot {
        let mut e = endpoint("h1", "a", "10.65.0.1");
        e.ports.push(PortRecord {
            protocol: weft_etcd::records::Protocol::Tcp,
            host_port: 80,
            container_port: 80,
        });
        Snapshot {
            pools: vec![(
                "default".into(),
                PoolRecord {
                    cidr: "10.65.0.0/16".parse().unwrap(),
                    block_size: 26,
                    nat_outgoing: true,
                    encapsulation: Default::default(),
                },
            )],
            hosts: ["h1".to_string()].into(),
            tunnels: HashMap::new(),
            blocks: [(
                "10.65.0.0/26".parse().unwrap(),
                BlockOwner {
                    pool: "default".into(),
                    host: "h1".into(),
                },
            )]
            .into(),
            ips: vec![(
                e.ip,
                IpRecord {
                    host: "h1".into(),
                    container_id: "a".into(),
                    tunnel: false,
                },
            )],
            ports: vec![reservation("h1", Protocol::Tcp, 80, "a")],
            endpoints: vec![e],
            kernel: None,
        }
    }

    #[test]
    fn a_consistent_store_has_no_problem() {
        assert_eq!(
            check(&consistent(), &weft_etcd::Keys::new("/weft/v1")),
            vec![]
        );
    }

    #[test]
    fn a_dual_stack_endpoint_needs_both_guards_and_both_blocks() {
        let keys = weft_etcd::Keys::new("/weft/v1");
        let mut s = consistent();
        s.endpoints[0].ipv6 = Some("fd65::1".parse().unwrap());
        let problems = check(&s, &keys);
        let fixes: Vec<&Fix> = problems.iter().map(|p| &p.fix).collect();
        assert!(
            fixes
                .iter()
                .any(|f| matches!(f, Fix::CreateKey(k, _) if k == "/weft/v1/ips/fd65::1")),
            "{problems:?}"
        );
        assert!(problems
            .iter()
            .any(|p| p.what.contains("fd65::1 outside every claimed block")));
        let guard = s.ips[0].1.clone();
        s.ips.push(("fd65::1".parse().unwrap(), guard));
        let owner = BlockOwner {
            pool: "default-v6".into(),
            host: "h1".into(),
        };
        s.blocks.insert("fd65::/122".parse().unwrap(), owner);
        let pool = PoolRecord {
            cidr: "fd65::/48".parse().unwrap(),
            block_size: 122,
            nat_outgoing: true,
            encapsulation: Default::default(),
        };
        s.pools.push(("default-v6".into(), pool));
        assert_eq!(check(&s, &keys), vec![], "both guards and blocks in place");
    }

    #[test]
    fn leaks_and_gaps_are_named_with_fixes() {
        let keys = weft_etcd::Keys::new("/weft/v1");
        let mut s = consistent();
        s.ips.push((
            "10.65.0.9".parse().unwrap(),
            IpRecord {
                host: "h1".into(),
                container_id: "gone".into(),
                tunnel: false,
            },
        ));
        s.ports.push(reservation("h1", Protocol::Udp, 53, "gone"));
        s.endpoints.push(endpoint("h1", "b", "10.65.0.2"));
        s.endpoints.push(endpoint("h1", "c", "10.66.0.2"));
        let problems = check(&s, &keys);
        let fixes: Vec<&Fix> = problems.iter().map(|p| &p.fix).collect();
        assert!(fixes.contains(&&Fix::DeleteKey("/weft/v1/ips/10.65.0.9".into())));
        assert!(fixes.contains(&&Fix::DeleteKey("/weft/v1/ports/h1/udp/53".into())));
        assert!(fixes
            .iter()
            .any(|f| matches!(f, Fix::CreateKey(k, _) if k == "/weft/v1/ips/10.65.0.2")));
        assert!(problems
            .iter()
            .any(|p| p.what.contains("outside every claimed block")));
    }
}
