//! The operations and fault windows a run draws from its seed, and how they are drawn.

use std::fmt;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;

use crate::invariants::{ports_text, Port};

use super::*;

#[derive(Debug, Clone)]
pub(super) enum Op {
    Attach {
        host: usize,
        id: String,
        ports: Vec<Port>,
    },
    Detach {
        host: usize,
        id: String,
    },
    CniAdd {
        host: usize,
        pod: usize,
        net: usize,
        ports: Vec<Port>,
    },
    CniDel {
        host: usize,
        pod: usize,
        net: usize,
    },
    /// GC of one network: the attachments of `keep` pods stay valid.
    CniGc {
        host: usize,
        net: usize,
        keep: Vec<usize>,
    },
    KillRestart {
        host: usize,
    },
    KillDuringAttach {
        host: usize,
        id: String,
        ports: Vec<Port>,
        after: Duration,
    },
    /// The `pick`-th endpoint (modulo their number) at the time the operation runs.
    DeleteRoute {
        host: usize,
        pick: usize,
    },
    DeleteVeth {
        host: usize,
        pick: usize,
    },
    DeleteContainerInterface {
        host: usize,
        pick: usize,
    },
    /// A blackhole or peer-block route.
    DeleteBlockRoute {
        host: usize,
        pick: usize,
    },
    TamperRules {
        host: usize,
        how: usize,
    },
    FlipSysctl {
        host: usize,
        pick: usize,
        knob: usize,
    },
}

pub(super) const RULE_TAMPERS: &[&str] = &[
    "flush nat WEFT-PORTS",
    "delete the first rule of nat WEFT-PORTS",
    "add a stray DNAT to nat WEFT-PORTS",
    "delete the nat PREROUTING jump to WEFT-PORTS",
    "delete the filter FORWARD jump to WEFT-FORWARD",
    "flush nat WEFT-POSTROUTING",
    "flush filter WEFT-FORWARD",
];

/// (sysctl path, with `{}` for the picked endpoint's veth, bad value).
pub(super) const SYSCTL_FLIPS: &[(&str, &str)] = &[
    ("/proc/sys/net/ipv4/ip_forward", "0"),
    ("/proc/sys/net/ipv4/conf/{}/proxy_arp", "0"),
    ("/proc/sys/net/ipv4/conf/{}/rp_filter", "0"),
    ("/proc/sys/net/ipv4/conf/{}/forwarding", "0"),
    ("/proc/sys/net/ipv4/neigh/{}/proxy_delay", "80"),
    ("/proc/sys/net/ipv6/conf/{}/accept_ra", "1"),
    // IPv6 back on a veth of an IPv4-only host (a no-op where IPv6 is routed).
    ("/proc/sys/net/ipv6/conf/{}/disable_ipv6", "0"),
];

/// The IPv6 counterpart of a sysctl flip, where there is one (a dual-stack lab's IPv6 turn):
/// IPv6 forwarding (host-wide and per veth), proxy NDP, duplicate address detection.
pub(super) fn ipv6_twin(flip: (&'static str, &'static str)) -> (&'static str, &'static str) {
    match flip.0 {
        "/proc/sys/net/ipv4/ip_forward" => ("/proc/sys/net/ipv6/conf/all/forwarding", "0"),
        "/proc/sys/net/ipv4/conf/{}/proxy_arp" => ("/proc/sys/net/ipv6/conf/{}/proxy_ndp", "0"),
        "/proc/sys/net/ipv4/conf/{}/forwarding" => ("/proc/sys/net/ipv6/conf/{}/forwarding", "0"),
        "/proc/sys/net/ipv4/conf/{}/rp_filter" => ("/proc/sys/net/ipv6/conf/{}/accept_dad", "1"),
        _ => flip,
    }
}

pub(super) fn h(host: usize) -> String {
    format!("h{}", host + 1)
}

impl Op {
    /// The operation's kind, as `skip` names it (before looking at the model).
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Op::Attach { .. } => "attach",
            Op::Detach { .. } => "detach",
            Op::CniAdd { net: 0, .. } => "cni-add",
            Op::CniAdd { .. } => "cni-second-network",
            Op::CniDel { .. } => "cni-del",
            Op::CniGc { .. } => "cni-gc",
            Op::KillRestart { .. } => "kill",
            Op::KillDuringAttach { .. } => "kill-during-attach",
            Op::DeleteRoute { .. } => "delete-route",
            Op::DeleteVeth { .. } => "delete-veth",
            Op::DeleteContainerInterface { .. } => "delete-container-interface",
            Op::DeleteBlockRoute { .. } => "delete-block-route",
            Op::TamperRules { .. } => "tamper-rules",
            Op::FlipSysctl { .. } => "flip-sysctl",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Attach { host, id, ports } => {
                write!(f, "attach {}/{id} {}", h(*host), ports_text(ports))
            }
            Op::Detach { host, id } => write!(f, "detach {}/{id}", h(*host)),
            Op::CniAdd {
                host,
                pod,
                net,
                ports,
            } => write!(
                f,
                "cni add {} pod{pod} {} ({}) {}",
                h(*host),
                NETWORKS[*net].0,
                NETWORKS[*net].1,
                ports_text(ports)
            ),
            Op::CniDel { host, pod, net } => write!(
                f,
                "cni del {} pod{pod} {} ({})",
                h(*host),
                NETWORKS[*net].0,
                NETWORKS[*net].1
            ),
            Op::CniGc { host, net, keep } => write!(
                f,
                "cni gc {} {} keeping pods {keep:?}",
                h(*host),
                NETWORKS[*net].0
            ),
            Op::KillRestart { host } => write!(f, "kill -9 and restart the agent of {}", h(*host)),
            Op::KillDuringAttach {
                host,
                id,
                ports,
                after,
            } => write!(
                f,
                "kill -9 the agent of {} {}ms into attach {}/{id} {}, restart",
                h(*host),
                after.as_millis(),
                h(*host),
                ports_text(ports)
            ),
            Op::DeleteRoute { host, pick } => {
                write!(
                    f,
                    "delete the host route of endpoint #{pick} on {}",
                    h(*host)
                )
            }
            Op::DeleteVeth { host, pick } => {
                write!(
                    f,
                    "delete the host veth of endpoint #{pick} on {}",
                    h(*host)
                )
            }
            Op::DeleteContainerInterface { host, pick } => write!(
                f,
                "delete the container interface of endpoint #{pick} on {}",
                h(*host)
            ),
            Op::DeleteBlockRoute { host, pick } => {
                write!(f, "delete block route #{pick} on {}", h(*host))
            }
            Op::TamperRules { host, how } => {
                write!(f, "tamper on {}: {}", h(*host), RULE_TAMPERS[*how])
            }
            Op::FlipSysctl { host, pick, knob } => write!(
                f,
                "flip sysctl on {}: {}={} (endpoint #{pick})",
                h(*host),
                SYSCTL_FLIPS[*knob].0,
                SYSCTL_FLIPS[*knob].1
            ),
        }
    }
}

/// A fault that lasts through a burst's operations.
#[derive(Debug, Clone)]
pub(super) enum Window {
    EtcdPause(Duration),
    Partition(usize, Duration),
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Window::EtcdPause(length) => {
                write!(f, "etcd paused (SIGSTOP) for {:.1}s", length.as_secs_f64())
            }
            Window::Partition(host, length) => write!(
                f,
                "partition {} from etcd for {:.1}s (TTL {}s)",
                h(*host),
                length.as_secs_f64(),
                ALIVE_TTL.as_secs()
            ),
        }
    }
}

impl Window {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Window::EtcdPause(_) => "etcd-pause",
            Window::Partition(..) => "partition",
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct Burst {
    pub(super) window: Option<Window>,
    pub(super) ops: Vec<Op>,
}

pub(super) fn gen_ports(rng: &mut StdRng) -> Vec<Port> {
    let n = match rng.gen_range(0..100) {
        0..=54 => 0,
        55..=84 => 1,
        _ => 2,
    };
    let mut ports: Vec<Port> = vec![];
    for _ in 0..n {
        let udp = rng.gen_bool(0.3);
        let host_port = 8000 + rng.gen_range(0..6u16);
        let container_port = if udp {
            [53, 5353][rng.gen_range(0..2)]
        } else {
            [80, 8080][rng.gen_range(0..2)]
        };
        let protocol = if udp { "udp" } else { "tcp" }.to_string();
        if !ports
            .iter()
            .any(|p| p.protocol == protocol && p.host_port == host_port)
        {
            ports.push(Port {
                protocol,
                host_port,
                container_port,
            });
        }
    }
    ports.sort();
    ports
}

pub(super) fn gen_op(rng: &mut StdRng, hosts: usize, faults: bool) -> Op {
    let host = rng.gen_range(0..hosts);
    let id = |rng: &mut StdRng| format!("c{}", rng.gen_range(0..AGENT_IDS));
    let total = if faults { 108 } else { 72 };
    match rng.gen_range(0..total) {
        0..=29 => Op::Attach {
            host,
            id: id(rng),
            ports: gen_ports(rng),
        },
        30..=43 => Op::Detach { host, id: id(rng) },
        44..=59 => {
            let pod = rng.gen_range(0..PODS);
            let net = rng.gen_range(0..NETWORKS.len());
            let ports = if rng.gen_bool(0.3) {
                gen_ports(rng)
            } else {
                vec![]
            };
            Op::CniAdd {
                host,
                pod,
                net,
                ports,
            }
        }
        60..=67 => Op::CniDel {
            host,
            pod: rng.gen_range(0..PODS),
            net: rng.gen_range(0..NETWORKS.len()),
        },
        68..=71 => Op::CniGc {
            host,
            net: rng.gen_range(0..NETWORKS.len()),
            keep: (0..PODS).filter(|_| rng.gen_bool(0.6)).collect(),
        },
        72..=77 => Op::KillRestart { host },
        78..=81 => Op::KillDuringAttach {
            host,
            id: id(rng),
            ports: gen_ports(rng),
            after: Duration::from_millis(rng.gen_range(0..40)),
        },
        82..=85 => Op::DeleteRoute {
            host,
            pick: rng.gen_range(0..64),
        },
        86..=89 => Op::DeleteVeth {
            host,
            pick: rng.gen_range(0..64),
        },
        90..=92 => Op::DeleteContainerInterface {
            host,
            pick: rng.gen_range(0..64),
        },
        93..=95 => Op::DeleteBlockRoute {
            host,
            pick: rng.gen_range(0..64),
        },
        96..=101 => Op::TamperRules {
            host,
            how: rng.gen_range(0..RULE_TAMPERS.len()),
        },
        _ => Op::FlipSysctl {
            host,
            pick: rng.gen_range(0..64),
            knob: rng.gen_range(0..SYSCTL_FLIPS.len()),
        },
    }
}

/// Burst `index` (from 1). Every third one runs inside a window, so that even a short run
/// freezes etcd and cuts a host off; which of the two, for how long, is drawn.
pub(super) fn gen_burst(rng: &mut StdRng, hosts: usize, index: usize) -> Burst {
    let windowed = matches!(index % 3, 0);
    let window = if !windowed {
        None
    } else if rng.gen_bool(0.5) {
        Some(Window::EtcdPause(Duration::from_millis(
            rng.gen_range(1000..=5000),
        )))
    } else {
        Some(Window::Partition(
            rng.gen_range(0..hosts),
            ALIVE_TTL + Duration::from_millis(rng.gen_range(1000..=3500)),
        ))
    };
    // Inside a window only API operations run: each may wait out the etcd timeout.
    let n = if window.is_some() {
        rng.gen_range(1..=3)
    } else {
        rng.gen_range(3..=8)
    };
    let ops = (0..n)
        .map(|_| gen_op(rng, hosts, window.is_none()))
        .collect();
    Burst { window, ops }
}
