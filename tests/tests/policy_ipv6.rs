//! Network policy on a dual-stack lab (issues 14 and 16): one policy governs both families —
//! selectors match an endpoint's IPv4 and IPv6 addresses, networks and ICMP rules apply in their
//! own family — and an endpoint whose egress policy allows nothing stays reachable over IPv6,
//! because neighbour discovery to its host passes before policy.

use std::time::Duration;

use serde_json::json;
use weft_tests::lab::policy::{self as pl, becomes};
use weft_tests::lab::{OUTSIDE_IP, OUTSIDE_IP6};
use weft_tests::probe::Probe;
use weft_tests::{sh, Lab, LabOptions};

/// Attaches a container with labels; returns (netns name, IPv4 address, IPv6 address).
fn attach(lab: &Lab, host: usize, id: &str, labels: &[&str]) -> (String, String, String) {
    let mut args = vec!["attach", id];
    for label in labels {
        args.extend(["--label", label]);
    }
    let endpoint = lab.ctl_json(host, &args).unwrap();
    let field = |name: &str| endpoint[name].as_str().unwrap_or_default().to_string();
    let netns = field("netns").rsplit('/').next().unwrap().to_string();
    let (ip, ipv6) = (field("ip"), field("ipv6"));
    assert!(!ip.is_empty() && !ipv6.is_empty(), "dual-stack: {endpoint}");
    (netns, ip, ipv6)
}

fn serve(lab: &mut Lab, ns: &str) {
    let echo = weft_tests::lab::bin("weft-echo");
    for port in ["80", "5432"] {
        // `::` takes both families.
        lab.spawn_in(ns, echo.to_str().unwrap(), &[port, "::"])
            .unwrap();
    }
}

fn dual_stack_lab() -> Lab {
    Lab::new(LabOptions {
        hosts: 2,
        ipv6: true,
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn one_policy_governs_both_families_each_in_its_own_terms() {
    let mut lab = dual_stack_lab();
    let (web, web4, web6) = attach(&lab, 0, "web", &["app=web"]);
    let (front, ..) = attach(&lab, 1, "front", &["role=frontend"]);
    let (other, ..) = attach(&lab, 1, "other", &[]);
    serve(&mut lab, &web);
    // Before any policy: everything connects, the outside included (so the blocks below are
    // policy's doing).
    for ip in [&web4, &web6] {
        assert!(becomes(&other, ip, Probe::Tcp(5432), true), "{ip}");
    }
    for outside in [OUTSIDE_IP, OUTSIDE_IP6] {
        assert!(becomes(&web, outside, Probe::Icmp, true), "{outside}");
    }
    pl::apply(
        &lab,
        &json!({"name": "web", "selector": "app == 'web'",
        "ingress": [
            {"action": "allow", "protocol": "tcp", "source": {"selector": "role == 'frontend'"},
             "destination": {"ports": [80]}},
            {"action": "allow", "protocol": "icmpv6", "source": {"selector": "role == 'frontend'"}}
        ],
        "egress": [
            {"action": "deny", "destination": {"nets": ["2001:db8:113::/64"]}},
            {"action": "allow"}
        ]}),
    )
    .unwrap();
    // (from, to, probe, reached): the selector holds the frontend's addresses of both families.
    let expected = [
        (&front, &web4, Probe::Tcp(80), true),
        (&front, &web6, Probe::Tcp(80), true),
        (&front, &web4, Probe::Tcp(5432), false),
        (&front, &web6, Probe::Tcp(5432), false),
        (&front, &web6, Probe::Udp(80), false),
        (&other, &web4, Probe::Tcp(80), false),
        (&other, &web6, Probe::Tcp(80), false),
        // ICMPv6 is allowed, ICMP (IPv4) is not.
        (&front, &web6, Probe::Icmp, true),
        (&front, &web4, Probe::Icmp, false),
    ];
    for (from, to, probe, reached) in expected {
        assert!(
            becomes(from, to, probe, reached),
            "{from} -> {to} {probe}: expected reached={reached}"
        );
    }
    // The IPv6 network is denied, the IPv4 outside is not.
    assert!(becomes(&web, OUTSIDE_IP6, Probe::Icmp, false));
    assert!(becomes(&web, OUTSIDE_IP, Probe::Icmp, true));
    // Both families' selector sets hold the frontend (profile sets hold address,veth pairs),
    // and the ip6tables chains exist, dispatching by the IPv6 profile set.
    let sets = pl::sets(&lab, 0).unwrap();
    let frontends: Vec<&String> = sets
        .values()
        .flatten()
        .filter(|m| !m.contains('/') && !m.contains(','))
        .collect();
    assert_eq!(frontends.len(), 2, "{sets:#?}");
    let v6_chains = sh::run_in(&lab.hosts[0].name, &["ip6tables-save", "-t", "filter"]).unwrap();
    assert!(
        v6_chains.contains("-A WEFT-TO-WL -m set --match-set weft-6t-"),
        "{v6_chains}"
    );
    // Deleting the policy opens both families again.
    pl::delete(&lab, "web").unwrap();
    for ip in [&web4, &web6] {
        assert!(becomes(&other, ip, Probe::Tcp(5432), true), "{ip}");
    }
    weft_tests::invariants::assert_quiet(&lab);
}

#[test]
fn an_endpoint_that_may_send_nothing_stays_reachable_over_ipv6() {
    let mut lab = dual_stack_lab();
    let (web, _, web6) = attach(&lab, 0, "web", &["app=web"]);
    let (front, ..) = attach(&lab, 1, "front", &["role=frontend"]);
    serve(&mut lab, &web);
    pl::apply(
        &lab,
        &json!({"name": "closed", "selector": "app == 'web'", "egress": []}),
    )
    .unwrap();
    let veth = lab.ctl_json(0, &["ls"]).unwrap()[0]["host_ifname"]
        .as_str()
        .unwrap()
        .to_string();
    let host = lab.hosts[0].name.clone();
    lab.eventually(
        "the egress profile in ip6tables, its set holding the veth's link-local sources",
        Duration::from_secs(2),
        || {
            let Some(chain) = pl::profile_chain(&lab, 0, &veth, "weft-6f-") else {
                return false;
            };
            let link_local = format!("fe80::/10,{veth}");
            sh::run_in(&host, &["ip6tables-save", "-t", "filter"])
                .unwrap()
                .contains(&format!(":{chain}"))
                && pl::sets(&lab, 0)
                    .unwrap()
                    .iter()
                    .any(|(name, m)| name.starts_with("weft-6f-") && m.contains(&link_local))
        },
    )
    .unwrap();
    // The host forgets the container's link-layer address: reaching it again needs the
    // container's neighbour advertisement, which its egress policy would drop.
    sh::run("ip", &["-n", &host, "-6", "neigh", "flush", "dev", &veth]).unwrap();
    assert!(becomes(&front, &web6, Probe::Tcp(80), true));
    // What the container starts itself is still denied.
    assert!(becomes(&web, OUTSIDE_IP6, Probe::Icmp, false));
    weft_tests::invariants::assert_quiet(&lab);
}
