//! Tampering with a host behind its agent's back: routes, links, rules, sysctls.

use serde_json::Value;

use crate::invariants::{self, Endpoint};
use crate::sh;

use super::*;

impl Chaos {
    /// The `pick`-th endpoint of a host (modulo their number), by the agent's List.
    pub(super) fn pick_endpoint(&self, host: usize, pick: usize) -> Option<Endpoint> {
        let list = self.lab.ctl_json(host, &["ls"]).ok()?;
        let endpoints: Vec<Endpoint> = list
            .as_array()?
            .iter()
            .filter_map(|v| Endpoint::from_json(v).ok())
            .collect();
        (!endpoints.is_empty()).then(|| endpoints[pick % endpoints.len()].clone())
    }

    /// The address of an endpoint a tampering operation acts on: its IPv6 one on an IPv6 turn
    /// (when it has one), else its first.
    pub(super) fn tamper_address(&self, e: &Endpoint) -> std::net::IpAddr {
        match self.ipv6_turn() {
            true => e.address(invariants::Family::V6).unwrap_or(e.ip),
            false => e.ip,
        }
    }

    /// Runs a command in a host's namespace; the answer describes what happened.
    pub(super) fn tamper(&self, host: usize, what: &str, args: &[&str]) -> String {
        match invariants::in_netns(
            &format!("/run/netns/{}", self.lab.hosts[host].name),
            args[0],
            &args[1..],
            None,
        ) {
            Ok(_) => format!("done: {what}"),
            Err(e) => format!("failed ({what}): {e:#}"),
        }
    }

    pub(super) fn delete_block_route(&self, host: usize, pick: usize) -> String {
        let ns = &self.lab.hosts[host].name;
        let family = if self.ipv6_turn() { "-6" } else { "-4" };
        let routes = sh::run(
            "ip",
            &["-n", ns, family, "-j", "route", "show", "proto", "119"],
        )
        .ok()
        .and_then(|t| serde_json::from_str::<Vec<Value>>(&t).ok())
        .unwrap_or_default();
        let blocks: Vec<&Value> = routes
            .iter()
            .filter(|r| r["dst"].as_str().is_some_and(|d| d.contains('/')))
            .collect();
        if blocks.is_empty() {
            return "skipped: no block route".into();
        }
        let route = blocks[pick % blocks.len()];
        let dst = route["dst"].as_str().unwrap_or("");
        if route["type"].as_str() == Some("blackhole") {
            self.tamper(
                host,
                &format!("blackhole {dst}"),
                &["ip", "route", "del", "blackhole", dst],
            )
        } else {
            let via = route["gateway"].as_str().unwrap_or("");
            self.tamper(
                host,
                &format!("{dst} via {via}"),
                &["ip", "route", "del", dst, "via", via],
            )
        }
    }

    pub(super) fn tamper_rules(&self, host: usize, how: usize) -> String {
        let (tool, save, stray) = match self.ipv6_turn() {
            true => ("ip6tables", "ip6tables-save", "[fd65::ffff:fffe]:9"),
            false => ("iptables", "iptables-save", "10.65.255.254:9"),
        };
        let what = &format!("{tool}: {}", RULE_TAMPERS[how]);
        let ipt = |args: &[&str]| {
            let mut all = vec![tool, "-w"];
            all.extend_from_slice(args);
            self.tamper(host, what, &all)
        };
        // A jump is deleted by its own spec, read back from iptables-save.
        let delete_jump = |table: &str, chain: &str, target: &str| {
            let save = invariants::in_netns(
                &format!("/run/netns/{}", self.lab.hosts[host].name),
                save,
                &["-t", table],
                None,
            )
            .unwrap_or_default();
            let prefix = format!("-A {chain} ");
            let Some(line) = save
                .lines()
                .find(|l| l.starts_with(&prefix) && l.ends_with(&format!("-j {target}")))
            else {
                return format!("skipped: no {chain} jump to {target}");
            };
            let spec = invariants::rule_words(line);
            let mut args = vec![
                tool.to_string(),
                "-w".into(),
                "-t".into(),
                table.into(),
                "-D".into(),
            ];
            args.extend(spec.into_iter().skip(1));
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            self.tamper(host, what, &refs)
        };
        match how {
            0 => ipt(&["-t", "nat", "-F", "WEFT-PORTS"]),
            1 => ipt(&["-t", "nat", "-D", "WEFT-PORTS", "1"]),
            2 => ipt(&[
                "-t",
                "nat",
                "-A",
                "WEFT-PORTS",
                "-p",
                "tcp",
                "--dport",
                "9",
                "-j",
                "DNAT",
                "--to-destination",
                stray,
            ]),
            3 => delete_jump("nat", "PREROUTING", "WEFT-PORTS"),
            4 => delete_jump("filter", "FORWARD", "WEFT-FORWARD"),
            5 => ipt(&["-t", "nat", "-F", "WEFT-POSTROUTING"]),
            _ => ipt(&["-F", "WEFT-FORWARD"]),
        }
    }
}
