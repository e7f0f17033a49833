//! Dual-stack end to end (issue 14): the lab's IPv6 underlay, IPv6 pools beside IPv4 ones,
//! containers with one address of each family.

use std::time::Duration;

use weft_tests::lab::{OUTSIDE_IP6, ROUTER_IP6};
use weft_tests::{sh, Lab, LabOptions};

#[test]
fn a_dual_stack_lab_carries_ipv6_between_hosts_and_to_the_outside_host() {
    let lab = Lab::new(LabOptions {
        hosts: 3,
        subnets: 2,
        ipv6: true,
        start_agents: false,
        ..Default::default()
    })
    .unwrap();
    let ip6 = |i: usize| {
        lab.hosts[i]
            .ip6
            .expect("an IPv6 underlay address")
            .to_string()
    };
    assert_eq!(ip6(0), "2001:db8:100::1");
    assert_eq!(ip6(1), "2001:db8:118::2", "the second segment");
    for (i, host) in lab.hosts.iter().enumerate() {
        for target in [ROUTER_IP6, OUTSIDE_IP6, &ip6((i + 1) % 3)] {
            // The router's first forwarded packet may wait for neighbour discovery: allow a moment.
            lab.eventually(
                &format!("{} reaching {target}", host.name),
                Duration::from_secs(5),
                || sh::ping(&host.name, target),
            )
            .unwrap();
        }
        assert!(sh::ping(&host.name, &lab.hosts[(i + 1) % 3].ip.to_string()));
    }
}

#[test]
fn hostile_ipv6_pool_settings_stop_the_agent_at_start_leaving_nothing() {
    let mut lab = Lab::new(LabOptions {
        hosts: 1,
        ipv6: true,
        start_agents: false,
        ..Default::default()
    })
    .unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &["--pool", "10.65.0.0/16,fd65::ff80/124"],
            "/122 blocks do not fit in pool fd65::ff80/124",
        ),
        (&["--pool", "fd65::/48,fd65:0:0:1::/64"], "two IPv6 pools"),
        (&["--pool", "10.65.0.0/16,10.66.0.0/16"], "two IPv4 pools"),
        (
            &["--pool", "10.65.0.0/16,fd65::/48", "--block-size-v6", "115"],
            "/115 is not an IPv6 block size (116 to 128)",
        ),
        (
            &["--pool", "fd65::/48", "--block-size-v6", "129"],
            "/129 is not an IPv6 block size (116 to 128)",
        ),
    ];
    for (args, message) in cases {
        let _ = std::fs::remove_file(&lab.hosts[0].log);
        lab.start_agent_with(0, args).unwrap();
        wait_exit(&mut lab);
        let log = lab.agent_log(0);
        assert!(log.contains(message), "{args:?}: {message:?} not in\n{log}");
        assert_eq!(lab.etcd_keys().unwrap().len(), 0, "{args:?} wrote to etcd");
        let host = &lab.hosts[0].name;
        for family in ["-4", "-6"] {
            let routes = sh::run("ip", &[family, "-n", host, "route", "show", "proto", "119"]);
            assert_eq!(routes.unwrap().trim(), "", "{args:?} left routes");
        }
        let links = sh::run("ip", &["-n", host, "-o", "link"]).unwrap();
        assert!(!links.contains("weft"), "{args:?} left links:\n{links}");
    }
    // Overlapping pools of the two families cannot exist; the same pools in a list can.
    let overlap = "[[pools]]\nname = \"a\"\ncidr = \"fd65::/48\"\n\
                   [[pools]]\nname = \"b\"\ncidr = \"fd65:0:0:1::/64\"\n";
    let file = lab.dir.join("overlap.toml");
    std::fs::write(&file, overlap).unwrap();
    lab.start_agent_with(0, &["--config", file.to_str().unwrap()])
        .unwrap();
    wait_exit(&mut lab);
    assert!(lab.agent_log(0).contains("overlap"), "{}", lab.agent_log(0));
    assert_eq!(lab.etcd_keys().unwrap().len(), 0);
}

/// Waits (10 s at most) for host 0's agent to exit.
fn wait_exit(lab: &mut Lab) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lab.agent_running(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
