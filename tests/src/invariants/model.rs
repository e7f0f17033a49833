//! The data the checker compares: ports and endpoints as the lab shows them, the etcd records
//! parsed, and one snapshot of every host (agent answers, kernel state, container
//! namespaces).

use super::*;

/// A published port of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port {
    /// `tcp` or `udp` (an empty protocol means tcp).
    pub protocol: String,
    pub host_port: u16,
    pub container_port: u16,
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.host_port, self.container_port, self.protocol
        )
    }
}

/// Renders a port list the way `weftctl attach -p` takes it.
pub fn ports_text(ports: &[Port]) -> String {
    if ports.is_empty() {
        return "no ports".into();
    }
    ports
        .iter()
        .map(Port::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// One endpoint, from an etcd record or from the agent's List.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub id: String,
    pub host: String,
    /// The IPv4 address, or the IPv6 one on an IPv6-only pool (as etcd records it).
    pub ip: IpAddr,
    /// The IPv6 address beside an IPv4 one (dual-stack).
    pub ipv6: Option<IpAddr>,
    pub host_ifname: String,
    pub ifname: String,
    pub mac: String,
    pub netns: String,
    /// Only etcd records say whether the agent made (and owns) the namespace.
    pub owns_netns: Option<bool>,
    /// Another interface of the namespace carries the default routes; this one routes the
    /// traffic from its own addresses through a table of its own (etcd records say so).
    pub secondary: bool,
    /// Sorted.
    pub ports: Vec<Port>,
}

impl Endpoint {
    /// Reads an endpoint from its JSON (etcd record or `weftctl --json ls` item).
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let text = |field: &str| -> Result<String, String> {
            v[field]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("no string field {field:?}"))
        };
        let (ip, ipv6) = addresses(v)?;
        let mut ports = vec![];
        if let Some(list) = v["ports"].as_array() {
            for p in list {
                let number = |field: &str| -> Result<u16, String> {
                    p[field]
                        .as_u64()
                        .and_then(|n| u16::try_from(n).ok())
                        .ok_or_else(|| format!("port without a valid {field:?}: {p}"))
                };
                let protocol = p["protocol"].as_str().unwrap_or("");
                ports.push(Port {
                    protocol: if protocol.is_empty() { "tcp" } else { protocol }.to_string(),
                    host_port: number("host_port")?,
                    container_port: number("container_port")?,
                });
            }
        }
        ports.sort();
        Ok(Endpoint {
            id: text("container_id")?,
            host: text("host")?,
            ip,
            ipv6,
            host_ifname: text("host_ifname")?,
            ifname: v["ifname"].as_str().unwrap_or("eth0").to_string(),
            mac: v["mac"].as_str().unwrap_or("").to_ascii_lowercase(),
            netns: text("netns")?,
            owns_netns: v["owns_netns"].as_bool(),
            secondary: v["secondary"].as_bool().unwrap_or(false),
            ports,
        })
    }

    /// Every address of the endpoint: the IPv4 one first.
    pub fn addresses(&self) -> Vec<IpAddr> {
        std::iter::once(self.ip).chain(self.ipv6).collect()
    }

    /// Its address of one family, if it has one.
    pub fn address(&self, family: Family) -> Option<IpAddr> {
        self.addresses()
            .into_iter()
            .find(|ip| Family::of(ip) == family)
    }
}

/// The addresses of an endpoint's JSON: `ip` (IPv4, or IPv6 on an IPv6-only pool in etcd; empty
/// on an IPv6-only pool in the agent's List) and `ipv6` (absent or empty without one), as
/// (the IPv4 address or else the IPv6 one, the IPv6 one beside an IPv4 one).
fn addresses(v: &Value) -> Result<(IpAddr, Option<IpAddr>), String> {
    let field = |name: &str| -> Result<Option<IpAddr>, String> {
        match v[name].as_str().unwrap_or("") {
            "" => Ok(None),
            text => text
                .parse()
                .map(Some)
                .map_err(|_| format!("bad {name} {text:?}")),
        }
    };
    match (field("ip")?, field("ipv6")?) {
        (Some(ip), None) => Ok((ip, None)),
        (None, Some(IpAddr::V6(v6))) => Ok((IpAddr::V6(v6), None)),
        (Some(IpAddr::V4(v4)), Some(IpAddr::V6(v6))) => Ok((IpAddr::V4(v4), Some(IpAddr::V6(v6)))),
        (None, None) => Err("no address".into()),
        (ip, ipv6) => Err(format!(
            "addresses of the wrong families: ip {ip:?}, ipv6 {ipv6:?}"
        )),
    }
}

/// A pool record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub cidr: Net,
    pub block_size: u8,
    pub nat_outgoing: bool,
    /// "cross-subnet" (the default), "vxlan" or "none".
    pub encapsulation: String,
}

/// `fe80::` and a MAC (`aa:bb:cc:dd:ee:ff`) with `ff:fe` in its middle and the universal/local
/// bit flipped.
pub(super) fn eui64_link_local(mac: &str) -> Option<IpAddr> {
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).ok())
        .collect::<Option<_>>()?;
    let [a, b, c, d, e, f] = <[u8; 6]>::try_from(bytes).ok()?;
    let ip = [
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        a ^ 0x02,
        b,
        c,
        0xff,
        0xfe,
        d,
        e,
        f,
    ];
    Some(IpAddr::from(ip))
}

/// The etcd records of a lab, parsed; malformed ones are kept as violations.
#[derive(Debug, Default, Clone)]
pub struct Records {
    pub pools: BTreeMap<String, Pool>,
    /// Host name → underlay address.
    pub hosts: BTreeMap<String, Ipv4Addr>,
    /// Host name → IPv6 underlay address, where it registered one.
    pub hosts_v6: BTreeMap<String, IpAddr>,
    /// Host name → prefix length of its underlay address (its subnet), where registered.
    pub host_prefixes: BTreeMap<String, u8>,
    /// Host name → tunnel address, where it has one.
    pub tunnels: BTreeMap<String, Ipv4Addr>,
    /// Host name → the EUI-64 link-local address of its VTEP MAC, where it has one: what its
    /// IPv6 blocks are routed via through the tunnel.
    pub vtep_link_locals: BTreeMap<String, IpAddr>,
    /// Tunnel address guards: address → host.
    pub tunnel_ips: BTreeMap<Ipv4Addr, String>,
    pub alive: BTreeSet<String>,
    /// (pool, block, owning host).
    pub blocks: Vec<(String, Net, String)>,
    /// Address (of either family) → (host, container id).
    pub ips: BTreeMap<IpAddr, (String, String)>,
    /// (host, container id) → endpoint.
    pub endpoints: BTreeMap<(String, String), Endpoint>,
    /// (host, protocol, port) → container id.
    pub ports: BTreeMap<(String, String, u16), String>,
    pub malformed: Vec<Violation>,
}

impl Records {
    /// Parses every key under [`ETCD_PREFIX`] (keys of other collections are ignored: they
    /// belong to features this checker does not know yet).
    pub fn parse(keys: &BTreeMap<String, String>) -> Self {
        let mut r = Records::default();
        for (key, value) in keys {
            let Some(rest) = key.strip_prefix(ETCD_PREFIX) else {
                continue;
            };
            if let Err(why) = r.add(rest, value) {
                r.malformed.push(Violation::new(
                    "cluster",
                    format!("etcd {rest}"),
                    "a well-formed record",
                    format!("{why} (value {value:?})"),
                ));
            }
        }
        r
    }

    fn add(&mut self, rest: &str, value: &str) -> Result<(), String> {
        let json = || serde_json::from_str::<Value>(value).map_err(|e| format!("not JSON: {e}"));
        let segments: Vec<&str> = rest.split('/').collect();
        let field = |v: &Value, name: &str| -> Result<String, String> {
            v[name]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("no {name:?}"))
        };
        match segments.as_slice() {
            ["pools", name] => {
                let v = json()?;
                let cidr = field(&v, "cidr")?;
                self.pools.insert(
                    name.to_string(),
                    Pool {
                        cidr: Net::parse(&cidr).ok_or(format!("bad cidr {cidr:?}"))?,
                        block_size: v["block_size"]
                            .as_u64()
                            .and_then(|n| u8::try_from(n).ok())
                            .ok_or("no block_size")?,
                        nat_outgoing: v["nat_outgoing"].as_bool().unwrap_or(false),
                        encapsulation: v["encapsulation"]
                            .as_str()
                            .unwrap_or("cross-subnet")
                            .to_string(),
                    },
                );
            }
            ["hosts", name] => {
                let v = json()?;
                let ip = field(&v, "underlay_ip")?;
                self.hosts.insert(
                    name.to_string(),
                    ip.parse().map_err(|_| format!("bad underlay_ip {ip:?}"))?,
                );
                if let Some(prefix) = v["underlay_prefix"].as_u64() {
                    self.host_prefixes.insert(name.to_string(), prefix as u8);
                }
                if let Some(ip6) = v["underlay_ipv6"].as_str() {
                    let ip6 = ip6
                        .parse::<IpAddr>()
                        .ok()
                        .filter(IpAddr::is_ipv6)
                        .ok_or(format!("bad underlay_ipv6 {ip6:?}"))?;
                    self.hosts_v6.insert(name.to_string(), ip6);
                }
                if let Some(mac) = v["vtep_mac"].as_str() {
                    let link_local =
                        eui64_link_local(mac).ok_or(format!("bad vtep_mac {mac:?}"))?;
                    self.vtep_link_locals.insert(name.to_string(), link_local);
                }
                if let Some(tunnel) = v["tunnel_ip"].as_str() {
                    let tunnel = tunnel
                        .parse()
                        .map_err(|_| format!("bad tunnel_ip {tunnel:?}"))?;
                    self.tunnels.insert(name.to_string(), tunnel);
                }
            }
            ["alive", name] => {
                self.alive.insert(name.to_string());
            }
            ["blocks", pool, block] => {
                let net = Net::parse(block)
                    .filter(|n| n.aligned() && block.contains('-'))
                    .ok_or(format!("bad block {block:?}"))?;
                let host = field(&json()?, "host")?;
                self.blocks.push((pool.to_string(), net, host));
            }
            ["ips", ip] => {
                let ip: IpAddr = ip.parse().map_err(|_| format!("bad address {ip:?}"))?;
                let v = json()?;
                if v["tunnel"].as_bool() == Some(true) {
                    let IpAddr::V4(ip) = ip else {
                        return Err(format!("an IPv6 tunnel address {ip}"));
                    };
                    self.tunnel_ips.insert(ip, field(&v, "host")?);
                } else {
                    self.ips
                        .insert(ip, (field(&v, "host")?, field(&v, "container_id")?));
                }
            }
            ["endpoints", host, id] => {
                let e = Endpoint::from_json(&json()?)?;
                if e.host != *host || e.id != *id {
                    return Err(format!(
                        "record names {}/{}, not the key's {host}/{id}",
                        e.host, e.id
                    ));
                }
                self.endpoints.insert((host.to_string(), id.to_string()), e);
            }
            ["ports", host, protocol, port] => {
                let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
                let owner = field(&json()?, "container_id")?;
                self.ports
                    .insert((host.to_string(), protocol.to_string(), port), owner);
            }
            [collection, ..]
                if [
                    "pools",
                    "hosts",
                    "alive",
                    "blocks",
                    "ips",
                    "endpoints",
                    "ports",
                ]
                .contains(collection) =>
            {
                return Err("key of the wrong shape".into());
            }
            _ => {}
        }
        Ok(())
    }

    /// The endpoints of one host, by container id.
    pub fn endpoints_of(&self, host: &str) -> BTreeMap<&str, &Endpoint> {
        self.endpoints
            .iter()
            .filter(|((h, _), _)| h == host)
            .map(|((_, id), e)| (id.as_str(), e))
            .collect()
    }

    /// Whether any pool is of this family.
    pub fn has_family(&self, family: Family) -> bool {
        self.pools.values().any(|p| p.cidr.family() == family)
    }

    /// The blocks of one host.
    pub fn blocks_of(&self, host: &str) -> BTreeSet<Net> {
        self.blocks
            .iter()
            .filter(|(_, _, h)| h == host)
            .map(|(_, b, _)| *b)
            .collect()
    }
}

/// What an agent answered.
#[derive(Debug, Clone)]
pub enum AgentView {
    /// The lab has no running agent process for the host.
    NotRunning,
    /// The process runs but List or Status did not answer (in time).
    Silent(String),
    Answered {
        list: Vec<Value>,
        status: Value,
    },
}

/// A host's kernel state, as `ip -j`, `iptables-save` and `ip6tables-save` show it inside its
/// namespace.
#[derive(Debug, Clone, Default)]
pub struct HostKernel {
    pub links: Vec<Value>,
    /// `proto weft` routes of every table, of both families.
    pub routes: Vec<Value>,
    /// `/proc/sys` path → value (`MISSING` when absent).
    pub sysctls: BTreeMap<String, String>,
    pub nat: String,
    pub filter: String,
    /// The ip6tables tables.
    pub raw6: String,
    pub nat6: String,
    pub filter6: String,
    /// `ipset save`: network policy's address sets, of both families.
    pub ipsets: String,
}

/// A container namespace's state.
#[derive(Debug, Clone, Default)]
pub struct ContainerKernel {
    /// `ip -j addr`: links with their addresses of both families.
    pub links: Vec<Value>,
    /// Routes of every table: IPv4, IPv6.
    pub routes: Vec<Value>,
    pub routes6: Vec<Value>,
    /// Routing rules: IPv4, IPv6.
    pub rules: Vec<Value>,
    pub rules6: Vec<Value>,
    /// Neighbour entries: IPv4, IPv6.
    pub neighbours: Vec<Value>,
    pub neighbours6: Vec<Value>,
}

impl ContainerKernel {
    /// The routes and neighbour entries of one family.
    pub fn of(&self, family: Family) -> (&[Value], &[Value]) {
        match family {
            Family::V4 => (&self.routes, &self.neighbours),
            Family::V6 => (&self.routes6, &self.neighbours6),
        }
    }

    /// The routing rules of one family.
    pub fn rules_of(&self, family: Family) -> &[Value] {
        match family {
            Family::V4 => &self.rules,
            Family::V6 => &self.rules6,
        }
    }
}

/// One lab host.
#[derive(Debug, Clone)]
pub struct HostView {
    pub name: String,
    pub ip: Ipv4Addr,
    /// The lab host's IPv6 underlay address (a dual-stack lab).
    pub ip6: Option<Ipv6Addr>,
    pub agent: AgentView,
    pub kernel: Result<HostKernel, String>,
    /// By namespace path: every namespace an endpoint of this host names.
    pub containers: BTreeMap<String, Result<ContainerKernel, String>>,
}

impl HostView {
    /// The agent's List, parsed, when it answered.
    pub fn listed(&self) -> Option<Vec<Endpoint>> {
        match &self.agent {
            AgentView::Answered { list, .. } => Some(
                list.iter()
                    .filter_map(|v| Endpoint::from_json(v).ok())
                    .collect(),
            ),
            _ => None,
        }
    }
}

/// Everything the checker compares, read at (nearly) one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub etcd: BTreeMap<String, String>,
    pub records: Records,
    /// Names under /run/netns.
    pub namespaces: BTreeSet<String>,
    pub hosts: Vec<HostView>,
    pub took: Duration,
}

impl Snapshot {
    /// A host's endpoints as its agent lists them, or as etcd records them when the agent did
    /// not answer.
    pub fn endpoints_of(&self, host: usize) -> Vec<Endpoint> {
        let view = &self.hosts[host];
        view.listed().unwrap_or_else(|| {
            self.records
                .endpoints_of(&view.name)
                .into_values()
                .cloned()
                .collect()
        })
    }
}
