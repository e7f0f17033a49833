//! The lab's network: the router with its bridges and its leg to the outside host, and each
//! host's underlay interface and routes.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Result;

use super::{
    Lab, LabHost, OUTSIDE_GW, OUTSIDE_GW6, OUTSIDE_IP, OUTSIDE_IP6, ROUTER_IP, ROUTER_IP6,
    ROUTER_IP6_2, ROUTER_IP_2,
};
use crate::sh;

/// The underlay address of host `i` (0-based) and its segment's router address.
pub fn host_address(i: usize, subnets: usize) -> (Ipv4Addr, &'static str) {
    let n = (i + 1) as u8;
    match subnets > 1 && n.is_multiple_of(2) {
        true => (Ipv4Addr::new(198, 18, 0, n), ROUTER_IP_2),
        false => (Ipv4Addr::new(198, 51, 100, n), ROUTER_IP),
    }
}

/// The IPv6 underlay address of host `i` (0-based) and its segment's router address.
pub fn host_address_v6(i: usize, subnets: usize) -> (Ipv6Addr, &'static str) {
    let n = (i + 1) as u16;
    match subnets > 1 && n.is_multiple_of(2) {
        true => (
            Ipv6Addr::new(0x2001, 0xdb8, 0x118, 0, 0, 0, 0, n),
            ROUTER_IP6_2,
        ),
        false => (
            Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, n),
            ROUTER_IP6,
        ),
    }
}

impl Lab {
    pub(super) fn build_network(&mut self) -> Result<()> {
        let router = self.router.clone();
        let outside = self.outside.clone();
        // Namespaces first (each one is recorded before anything else can fail, so Drop
        // removes it), then links, addresses and routes with one `ip -batch` per namespace.
        for ns in [&router, &outside] {
            sh::run("ip", &["netns", "add", ns])?;
        }
        for i in 0..self.options.hosts {
            let name = format!("{}-h{}", self.prefix, i + 1);
            sh::run("ip", &["netns", "add", &name])?;
            self.hosts.push(LabHost {
                socket: self.dir.join(format!("h{}.sock", i + 1)),
                log: self.dir.join(format!("h{}.log", i + 1)),
                name,
                ip: host_address(i, self.options.subnets).0,
                ip6: self
                    .options
                    .ipv6
                    .then(|| host_address_v6(i, self.options.subnets).0),
                agent: None,
            });
        }
        // The router: the bridge, its leg to the outside network, a port per host.
        let mut router_batch = vec![
            "link set lo up".to_string(),
            "link add br0 type bridge".into(),
            format!("addr add {ROUTER_IP}/24 dev br0"),
            "link set br0 up".into(),
            "link add br1 type bridge".into(),
            format!("addr add {ROUTER_IP_2}/24 dev br1"),
            "link set br1 up".into(),
            format!("link add eth1 type veth peer name eth0 netns {outside}"),
            format!("addr add {OUTSIDE_GW}/24 dev eth1"),
            "link set eth1 up".into(),
        ];
        for (i, host) in self.hosts.iter().enumerate() {
            let port = format!("h{}", i + 1);
            router_batch.push(format!(
                "link add {port} type veth peer name eth0 netns {}",
                host.name
            ));
            let bridge = match host_address(i, self.options.subnets).1 {
                ROUTER_IP => "br0",
                _ => "br1",
            };
            router_batch.push(format!("link set {port} master {bridge} up"));
        }
        let mut outside_batch = vec![
            "link set lo up".to_string(),
            format!("addr add {OUTSIDE_IP}/24 dev eth0"),
            "link set eth0 up".into(),
            format!("route add default via {OUTSIDE_GW}"),
        ];
        if self.options.ipv6 {
            // nodad: the lab's addresses are unique by construction; DAD would only delay them.
            router_batch.extend([
                format!("addr add {ROUTER_IP6}/64 dev br0 nodad"),
                format!("addr add {ROUTER_IP6_2}/64 dev br1 nodad"),
                format!("addr add {OUTSIDE_GW6}/64 dev eth1 nodad"),
            ]);
            outside_batch.extend([
                format!("addr add {OUTSIDE_IP6}/64 dev eth0 nodad"),
                format!("route add default via {OUTSIDE_GW6}"),
            ]);
        }
        sh::ip_batch(&router, &router_batch)?;
        sh::ip_batch(&outside, &outside_batch)?;
        for (i, host) in self.hosts.iter().enumerate() {
            let router = host_address(i, self.options.subnets).1;
            let mut batch = vec![
                "link set lo up".to_string(),
                format!("addr add {}/24 dev eth0", host.ip),
                "link set eth0 up".into(),
            ];
            match (self.options.default_route, router) {
                (true, _) => batch.push(format!("route add default via {router}")),
                // Without a default route, hosts of the second segment still reach etcd.
                (false, ROUTER_IP) if self.options.subnets > 1 => {
                    batch.push(format!("route add 198.18.0.0/24 via {router}"))
                }
                (false, ROUTER_IP) => {}
                (false, _) => batch.push(format!("route add 198.51.100.0/24 via {router}")),
            }
            if let Some(ip6) = host.ip6 {
                batch.extend(host_v6_batch(ip6, i, &self.options));
            }
            sh::ip_batch(&host.name, &batch)?;
        }
        sh::run(
            "ip",
            &[
                "netns",
                "exec",
                &router,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ],
        )?;
        Ok(())
    }
}

/// A host's IPv6 underlay address and routes (as its IPv4 ones).
fn host_v6_batch(ip6: Ipv6Addr, i: usize, options: &super::LabOptions) -> Vec<String> {
    let router = host_address_v6(i, options.subnets).1;
    let mut batch = vec![format!("addr add {ip6}/64 dev eth0 nodad")];
    match (options.default_route, router) {
        (true, _) => batch.push(format!("route add default via {router}")),
        (false, ROUTER_IP6) if options.subnets > 1 => {
            batch.push(format!("route add 2001:db8:118::/64 via {router}"))
        }
        (false, ROUTER_IP6) => {}
        (false, _) => batch.push(format!("route add 2001:db8:100::/64 via {router}")),
    }
    batch
}
