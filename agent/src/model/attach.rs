//! A validated attach request: what the API hands to the endpoint logic.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::model::{validate_ports, ContainerId, IfName, Invalid, PortMapping};

/// Where the container's network namespace comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsSpec {
    /// A namespace file (`/var/run/netns/x`, `/proc/PID/ns/net`).
    Path(String),
    /// The namespace of a running process.
    Pid(u32),
    /// None given: the agent creates one and deletes it on detach.
    Owned,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachRequest {
    pub container_id: ContainerId,
    pub netns: NetnsSpec,
    pub ifname: IfName,
    pub ports: Vec<PortMapping>,
    /// Labels network policy selects by (checked by `with_labels`).
    pub labels: BTreeMap<String, String>,
    /// Addresses asked for, at most one per family; empty: any free address. A family with no
    /// address asked for gets any free one of its pools.
    pub ips: Vec<IpAddr>,
    /// Pools to allocate from, in order of preference; empty: the host's default pools.
    pub pools: Vec<String>,
}

impl AttachRequest {
    /// Checks a request's raw fields in the order a client would fix them: the id, the
    /// interface, the ports, then where the namespace comes from. An empty `ifname` means eth0.
    pub fn new(
        container_id: &str,
        netns: &str,
        pid: Option<u32>,
        ifname: &str,
        ports: Vec<PortMapping>,
    ) -> Result<Self, Invalid> {
        let container_id = ContainerId::new(container_id)?;
        let ifname = match ifname {
            "" => IfName::default_container(),
            name => IfName::new(name)?,
        };
        let ports = validate_ports(ports)?;
        let netns = match (netns, pid) {
            (_, Some(0)) => return Err(Invalid::PidZero),
            ("", Some(pid)) => NetnsSpec::Pid(pid),
            (_, Some(_)) => return Err(Invalid::NetnsAndPid),
            ("", None) => NetnsSpec::Owned,
            (path, None) if path.contains('\0') => return Err(Invalid::NetnsNul),
            (path, None) if !path.starts_with('/') => {
                return Err(Invalid::NetnsRelative(path.to_string()))
            }
            (path, None) => NetnsSpec::Path(path.to_string()),
        };
        Ok(Self {
            container_id,
            netns,
            ifname,
            ports,
            labels: BTreeMap::new(),
            ips: vec![],
            pools: vec![],
        })
    }

    /// The request with these labels, once they are checked.
    pub fn with_labels(mut self, labels: BTreeMap<String, String>) -> Result<Self, Invalid> {
        weft_etcd::policy::validate_labels(&labels)?;
        self.labels = labels;
        Ok(self)
    }

    /// Adds the pools to allocate from, by name, each once.
    pub fn with_pools<S: AsRef<str>>(mut self, pools: &[S]) -> Result<Self, Invalid> {
        for name in pools {
            let name = name.as_ref();
            if crate::model::HostName::new(name).is_err() {
                return Err(Invalid::PoolName(name.to_string()));
            }
            if self.pools.iter().any(|p| p == name) {
                return Err(Invalid::PoolTwice(name.to_string()));
            }
            self.pools.push(name.to_string());
        }
        Ok(self)
    }

    /// Adds the requested addresses: IP addresses, each optionally with a prefix length (the
    /// form CNI runtimes pass, `10.65.3.7/24`; the length is ignored: the pool decides), at most
    /// one per family.
    pub fn with_ips<S: AsRef<str>>(mut self, ips: &[S]) -> Result<Self, Invalid> {
        for text in ips {
            let text = text.as_ref();
            let address = text.split_once('/').map_or(text, |(ip, _)| ip);
            let ip: IpAddr = address
                .parse()
                .map_err(|_| Invalid::RequestedIp(text.to_string()))?;
            if let Some(first) = self.ips.iter().find(|o| o.is_ipv4() == ip.is_ipv4()) {
                return Err(Invalid::RequestedIpTwice {
                    family: if ip.is_ipv4() { "IPv4" } else { "IPv6" },
                    first: *first,
                    second: ip,
                });
            }
            self.ips.push(ip);
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::port_mapping;

    #[test]
    fn namespaces_come_from_a_path_a_pid_or_the_agent() {
        let ok = |netns, pid| AttachRequest::new("web", netns, pid, "", vec![]).map(|r| r.netns);
        assert_eq!(ok("", None), Ok(NetnsSpec::Owned));
        assert_eq!(ok("", Some(42)), Ok(NetnsSpec::Pid(42)));
        assert_eq!(
            ok("/run/netns/x", None),
            Ok(NetnsSpec::Path("/run/netns/x".into()))
        );
        assert_eq!(ok("", Some(0)), Err(Invalid::PidZero));
        assert_eq!(ok("/run/netns/x", Some(7)), Err(Invalid::NetnsAndPid));
        assert_eq!(ok("/run/\0x", None), Err(Invalid::NetnsNul));
        assert_eq!(
            ok("netns/x", None),
            Err(Invalid::NetnsRelative("netns/x".into()))
        );
    }

    #[test]
    fn requested_addresses_are_one_per_family_with_or_without_a_length() {
        let ips = |list: &[&str]| {
            AttachRequest::new("web", "", None, "", vec![])
                .unwrap()
                .with_ips(list)
                .map(|r| r.ips)
        };
        let v4: IpAddr = "10.65.3.7".parse().unwrap();
        let v6: IpAddr = "fd65::7".parse().unwrap();
        assert_eq!(ips(&[]), Ok(vec![]));
        assert_eq!(ips(&["10.65.3.7/24", "fd65::7"]), Ok(vec![v4, v6]));
        assert_eq!(
            ips(&["10.65.3.x"]),
            Err(Invalid::RequestedIp("10.65.3.x".into()))
        );
        assert_eq!(ips(&[""]), Err(Invalid::RequestedIp("".into())));
        assert_eq!(
            ips(&["10.65.3.7", "10.65.3.8"]),
            Err(Invalid::RequestedIpTwice {
                family: "IPv4",
                first: v4,
                second: "10.65.3.8".parse().unwrap()
            })
        );
    }

    /// id, netns, pid, ifname, ports, and the reason for refusing them.
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<u32>,
        &'a str,
        Vec<PortMapping>,
        Invalid,
    );

    /// Every hostile request the end-to-end suite sends, refused here with the exact reason.
    #[test]
    fn hostile_requests_are_refused_with_their_reason() {
        let p = |proto: &str, h, c| port_mapping(proto, h, c);
        let (long_id, long_ifname) = ("x".repeat(65), "e".repeat(16));
        let cases: Vec<Case> = vec![
            ("", "", None, "", vec![], Invalid::EmptyContainerId),
            (
                "../etc",
                "",
                None,
                "",
                vec![],
                Invalid::ContainerId("../etc".into()),
            ),
            (
                "a;rm -rf /",
                "",
                None,
                "",
                vec![],
                Invalid::ContainerId("a;rm -rf /".into()),
            ),
            (
                "a\nb",
                "",
                None,
                "",
                vec![],
                Invalid::ContainerId("a\nb".into()),
            ),
            ("é", "", None, "", vec![], Invalid::ContainerId("é".into())),
            (&long_id, "", None, "", vec![], Invalid::LongContainerId(65)),
            (
                "ok",
                "",
                None,
                "lo",
                vec![],
                Invalid::IfNameReserved("lo".into()),
            ),
            (
                "ok",
                "",
                None,
                "eth0/x",
                vec![],
                Invalid::IfName("eth0/x".into()),
            ),
            (
                "ok",
                "",
                None,
                &long_ifname,
                vec![],
                Invalid::IfNameLength("e".repeat(16)),
            ),
            ("ok", "", Some(0), "", vec![], Invalid::PidZero),
            ("ok", "/x", Some(1), "", vec![], Invalid::NetnsAndPid),
            (
                "ok",
                "relative",
                None,
                "",
                vec![],
                Invalid::NetnsRelative("relative".into()),
            ),
            ("ok", "/a\0b", None, "", vec![], Invalid::NetnsNul),
            (
                "ok",
                "",
                None,
                "",
                vec![p("tcp", 80, 80).unwrap(), p("tcp", 80, 81).unwrap()],
                Invalid::PortTwice {
                    protocol: crate::model::Protocol::Tcp,
                    port: 80,
                },
            ),
        ];
        for (id, netns, pid, ifname, ports, expected) in cases {
            assert_eq!(
                AttachRequest::new(id, netns, pid, ifname, ports),
                Err(expected.clone()),
                "{expected}"
            );
        }
        assert_eq!(
            p("tcp", 0, 80),
            Err(Invalid::PortRange {
                what: "host port",
                value: 0
            })
        );
        assert!(matches!(p("icmp", 1, 1), Err(Invalid::Protocol(_))));
    }
}
