//! bird2's configuration, rendered from typed data. Pure: the same spec always gives the same
//! text, so a changed text is exactly a changed announcement or session.
//!
//! What it says: this host's blocks as blackhole routes of a static protocol per family (bird
//! announces them; nothing goes to the kernel, which has no protocol here at all, so nothing
//! bird learns is installed either), and one eBGP session per peer that imports nothing and
//! exports exactly those static routes, with this host's underlay address as next hop.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;

use crate::config::{Asn, BgpPeer};

/// How long bird waits before it tries a peer again (seconds).
const CONNECT_RETRY: u32 = 5;
/// How long a session stays down after an error, at first and at most (seconds).
const ERROR_WAIT: (u32, u32) = (5, 30);

/// Everything the configuration is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BirdSpec {
    /// bird's router id: this host's IPv4 underlay address.
    pub router_id: Ipv4Addr,
    pub asn: Asn,
    /// Hold time offered to peers, in seconds (0 or 3 to 65535).
    pub hold_time: u16,
    /// This host's IPv4 underlay address: next hop of its IPv4 blocks. None: no IPv4 channel.
    pub local_v4: Option<Ipv4Addr>,
    /// This host's IPv6 underlay address (dual-stack): next hop of its IPv6 blocks.
    pub local_v6: Option<Ipv6Addr>,
    /// This host's blocks.
    pub blocks: Vec<IpNetwork>,
    pub peers: Vec<BgpPeer>,
}

/// The name of the static protocol holding one family's blocks.
pub fn blocks_protocol(v6: bool) -> &'static str {
    match v6 {
        false => "weft_blocks4",
        true => "weft_blocks6",
    }
}

/// bird's name of the session with `address` (protocol names are symbols: letters, digits, _).
pub fn peer_protocol(address: IpAddr) -> String {
    let symbol: String = address
        .to_string()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("weft_peer_{symbol}")
}

/// The configuration file bird runs with.
pub fn render(spec: &BirdSpec) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Written by weft-agent from this host's blocks in the cluster view. Do not edit: it is\n\
         # rewritten (and bird reconfigured) whenever they change.\n\
         router id {};\n\
         # Since-times as Unix seconds, for weft-agent's reading of `show protocols`.\n\
         timeformat protocol \"%s\";\n\n\
         # Interfaces, so that directly connected neighbours are known as such.\n\
         protocol device {{\n}}\n",
        spec.router_id
    );
    let mut blocks = spec.blocks.clone();
    blocks.sort();
    blocks.dedup();
    if spec.local_v4.is_some() {
        render_static(&mut out, false, &blocks);
    }
    if spec.local_v6.is_some() {
        render_static(&mut out, true, &blocks);
    }
    let mut peers = spec.peers.clone();
    peers.sort();
    for peer in &peers {
        render_peer(&mut out, spec, peer);
    }
    out
}

fn render_static(out: &mut String, v6: bool, blocks: &[IpNetwork]) {
    let family = if v6 { "ipv6" } else { "ipv4" };
    let _ = writeln!(
        out,
        "# This host's {family} blocks (blackholes: only announced, never installed).\n\
         protocol static {} {{\n  {family};",
        blocks_protocol(v6)
    );
    for block in blocks.iter().filter(|b| b.is_ipv6() == v6) {
        let _ = writeln!(out, "  route {block} blackhole;");
    }
    out.push_str("}\n\n");
}

fn render_peer(out: &mut String, spec: &BirdSpec, peer: &BgpPeer) {
    let local = match peer.address {
        IpAddr::V4(_) => spec.local_v4.map(IpAddr::V4),
        IpAddr::V6(_) => spec.local_v6.map(IpAddr::V6),
    };
    let local = match local {
        Some(address) => format!("{address} "),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "protocol bgp {} {{\n  local {local}as {};\n  neighbor {} as {};\n  \
         hold time {};\n  connect retry time {CONNECT_RETRY};\n  \
         error wait time {}, {};",
        peer_protocol(peer.address),
        spec.asn,
        peer.address,
        peer.asn,
        spec.hold_time,
        ERROR_WAIT.0,
        ERROR_WAIT.1,
    );
    let channels = [
        ("ipv4", spec.local_v4.map(IpAddr::V4), false),
        ("ipv6", spec.local_v6.map(IpAddr::V6), true),
    ];
    for (family, next_hop, v6) in channels {
        let Some(next_hop) = next_hop else { continue };
        let _ = writeln!(
            out,
            "  {family} {{\n    import none;\n    export where proto = \"{}\";\n    \
             next hop address {next_hop};\n  }};",
            blocks_protocol(v6)
        );
    }
    out.push_str("}\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> BirdSpec {
        BirdSpec {
            router_id: "198.51.100.1".parse().unwrap(),
            asn: Asn::new(64512).unwrap(),
            hold_time: 9,
            local_v4: Some("198.51.100.1".parse().unwrap()),
            local_v6: None,
            blocks: vec![
                "10.65.9.64/26".parse().unwrap(),
                "10.65.7.0/26".parse().unwrap(),
            ],
            peers: vec!["198.51.100.100:64513".parse().unwrap()],
        }
    }

    const HEADER: &str = "\
# Written by weft-agent from this host's blocks in the cluster view. Do not edit: it is
# rewritten (and bird reconfigured) whenever they change.
router id 198.51.100.1;
# Since-times as Unix seconds, for weft-agent's reading of `show protocols`.
timeformat protocol \"%s\";

# Interfaces, so that directly connected neighbours are known as such.
protocol device {
}

";

    #[test]
    fn one_family_one_peer() {
        let expected = HEADER.to_string()
            + "\
# This host's ipv4 blocks (blackholes: only announced, never installed).
protocol static weft_blocks4 {
  ipv4;
  route 10.65.7.0/26 blackhole;
  route 10.65.9.64/26 blackhole;
}

protocol bgp weft_peer_198_51_100_100 {
  local 198.51.100.1 as 64512;
  neighbor 198.51.100.100 as 64513;
  hold time 9;
  connect retry time 5;
  error wait time 5, 30;
  ipv4 {
    import none;
    export where proto = \"weft_blocks4\";
    next hop address 198.51.100.1;
  };
}

";
        assert_eq!(render(&spec()), expected);
    }

    #[test]
    fn no_blocks_yet_is_an_empty_static_protocol() {
        let mut spec = spec();
        spec.blocks.clear();
        let text = render(&spec);
        assert!(
            text.contains("protocol static weft_blocks4 {\n  ipv4;\n}\n"),
            "{text}"
        );
    }

    #[test]
    fn dual_stack_announces_both_families_over_every_session() {
        let mut spec = spec();
        spec.local_v6 = Some("2001:db8:100::1".parse().unwrap());
        spec.blocks.push("fd00:65::/122".parse().unwrap());
        spec.peers
            .push("[2001:db8:100::100]:64513".parse().unwrap());
        let expected = HEADER.to_string()
            + "\
# This host's ipv4 blocks (blackholes: only announced, never installed).
protocol static weft_blocks4 {
  ipv4;
  route 10.65.7.0/26 blackhole;
  route 10.65.9.64/26 blackhole;
}

# This host's ipv6 blocks (blackholes: only announced, never installed).
protocol static weft_blocks6 {
  ipv6;
  route fd00:65::/122 blackhole;
}

protocol bgp weft_peer_198_51_100_100 {
  local 198.51.100.1 as 64512;
  neighbor 198.51.100.100 as 64513;
  hold time 9;
  connect retry time 5;
  error wait time 5, 30;
  ipv4 {
    import none;
    export where proto = \"weft_blocks4\";
    next hop address 198.51.100.1;
  };
  ipv6 {
    import none;
    export where proto = \"weft_blocks6\";
    next hop address 2001:db8:100::1;
  };
}

protocol bgp weft_peer_2001_db8_100__100 {
  local 2001:db8:100::1 as 64512;
  neighbor 2001:db8:100::100 as 64513;
  hold time 9;
  connect retry time 5;
  error wait time 5, 30;
  ipv4 {
    import none;
    export where proto = \"weft_blocks4\";
    next hop address 198.51.100.1;
  };
  ipv6 {
    import none;
    export where proto = \"weft_blocks6\";
    next hop address 2001:db8:100::1;
  };
}

";
        assert_eq!(render(&spec), expected);
    }

    #[test]
    fn an_ipv6_peer_without_an_ipv6_underlay_lets_bird_pick_the_source() {
        let mut spec = spec();
        spec.peers = vec!["[2001:db8::100]:64513".parse().unwrap()];
        let text = render(&spec);
        assert!(text.contains("protocol bgp weft_peer_2001_db8__100 {\n  local as 64512;\n  neighbor 2001:db8::100 as 64513;\n"), "{text}");
        assert!(text.contains("next hop address 198.51.100.1;"), "{text}");
    }

    #[test]
    fn the_order_of_blocks_and_peers_does_not_matter() {
        let mut a = spec();
        a.peers.push("198.51.100.101:64514".parse().unwrap());
        let mut b = a.clone();
        b.blocks.reverse();
        b.peers.reverse();
        assert_eq!(render(&a), render(&b));
    }
}
