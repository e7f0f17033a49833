//! Published ports: a protocol, a host port and a container port, checked as a set.

use std::collections::HashSet;

use crate::model::Invalid;

pub use weft_etcd::records::{PortRecord as PortMapping, Protocol};

/// Most published ports one container may have: each takes guard keys in the endpoint's etcd
/// transaction (etcd allows 128 operations in one) and a DNAT rule on its host.
pub const MAX_PORTS: usize = 64;

/// One published port from a request's raw fields: protocol `tcp`/`udp` (empty = tcp, any
/// case), ports 1-65535.
pub fn port_mapping(
    protocol: &str,
    host_port: u32,
    container_port: u32,
) -> Result<PortMapping, Invalid> {
    let protocol: Protocol = protocol.parse().map_err(Invalid::Protocol)?;
    let port = |value: u32, what: &'static str| {
        u16::try_from(value)
            .ok()
            .filter(|p| *p != 0)
            .ok_or(Invalid::PortRange { what, value })
    };
    Ok(PortMapping {
        protocol,
        host_port: port(host_port, "host port")?,
        container_port: port(container_port, "container port")?,
    })
}

/// Checks a container's ports as a set: at most [`MAX_PORTS`], no host port twice per protocol.
pub fn validate_ports(ports: Vec<PortMapping>) -> Result<Vec<PortMapping>, Invalid> {
    if ports.len() > MAX_PORTS {
        return Err(Invalid::TooManyPorts(ports.len()));
    }
    let mut seen = HashSet::new();
    for p in &ports {
        if !seen.insert((p.protocol, p.host_port)) {
            return Err(Invalid::PortTwice {
                protocol: p.protocol,
                port: p.host_port,
            });
        }
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_ports() {
        let tcp = port_mapping("", 8080, 80).unwrap();
        assert_eq!(
            (tcp.protocol, tcp.host_port, tcp.container_port),
            (Protocol::Tcp, 8080, 80)
        );
        assert_eq!(port_mapping("UDP", 53, 53).unwrap().protocol, Protocol::Udp);
        assert_eq!(
            port_mapping("tcp", 0, 80),
            Err(Invalid::PortRange {
                what: "host port",
                value: 0
            })
        );
        assert_eq!(
            port_mapping("tcp", 65536, 80),
            Err(Invalid::PortRange {
                what: "host port",
                value: 65536
            })
        );
        assert_eq!(
            port_mapping("tcp", 80, 0),
            Err(Invalid::PortRange {
                what: "container port",
                value: 0
            })
        );
        assert!(matches!(
            port_mapping("sctp", 80, 80),
            Err(Invalid::Protocol(_))
        ));
    }

    #[test]
    fn port_sets() {
        let p = |proto, host| port_mapping(proto, host, 80).unwrap();
        assert!(validate_ports(vec![p("tcp", 80), p("udp", 80)]).is_ok());
        assert_eq!(
            validate_ports(vec![p("tcp", 80), p("", 80)]),
            Err(Invalid::PortTwice {
                protocol: Protocol::Tcp,
                port: 80
            })
        );
        let many: Vec<_> = (1..=MAX_PORTS as u32 + 1).map(|i| p("tcp", i)).collect();
        assert_eq!(validate_ports(many.clone()), Err(Invalid::TooManyPorts(65)));
        assert!(validate_ports(many[..MAX_PORTS].to_vec()).is_ok());
        assert!(Invalid::TooManyPorts(200)
            .to_string()
            .contains("at most 64"));
    }
}
