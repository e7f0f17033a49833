//! The network policy section: 200 policies and 1,000 endpoints over 3 hosts. Attach latency
//! with those policies against the same attaches without them (same lab, same background), how
//! long a selector membership change takes to show in every host's address sets, how long a
//! full resync of policy state takes, and iperf3 through a policed path against an unpoliced one.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use weft_agent::policy::plan::{selector_set_name, Family};
use weft_etcd::policy::Selector;
use weft_proto::v1 as pb;

use super::client::{delete_namespaces, namespaces, Client};
use super::cpu::Cpu;
use super::dataplane::iperf;
use super::{timed, Options, Report, Run};
use crate::lab::policy as policy_lab;
use crate::{probe, sh, Lab, LabOptions};

const HOSTS: usize = 3;
const APPS: usize = 100;
const TIERS: usize = 5;

fn labels(i: usize) -> std::collections::HashMap<String, String> {
    [
        ("app".to_string(), format!("app{}", i % APPS)),
        ("tier".to_string(), format!("t{}", i % TIERS)),
    ]
    .into()
}

/// Policy k selects app{k % 100}: TCP/80 from a tier, anything from two neighbouring apps,
/// no ICMP from elsewhere; egress to the fabric's pool only.
fn policies(count: usize) -> Vec<Value> {
    (0..count)
        .map(|k| {
            json!({
                "name": format!("bench-{k}"), "order": k, "selector": format!("app == 'app{}'", k % APPS),
                "ingress": [
                    {"action": "allow", "protocol": "tcp", "source": {"selector": format!("tier == 't{}'", k % TIERS)}, "destination": {"ports": [80, "8000:8080"]}},
                    {"action": "allow", "source": {"selector": format!("app in {{'app{}', 'app{}'}}", (k + 1) % APPS, (k + 2) % APPS)}},
                    {"action": "deny", "protocol": "icmp"}
                ],
                "egress": [{"action": "allow", "destination": {"nets": ["10.0.0.0/8"]}}, {"action": "allow", "protocol": "udp", "destination": {"ports": [53]}}]
            })
        })
        .collect()
}

fn attach(client: &Client, slot: usize, id: String, netns: String, i: usize) -> Result<()> {
    attach_labelled(client, slot, id, netns, labels(i))
}

fn attach_labelled(
    client: &Client,
    slot: usize,
    id: String,
    netns: String,
    labels: std::collections::HashMap<String, String>,
) -> Result<()> {
    client.call(slot, move |mut c| {
        Box::pin(async move {
            c.attach(pb::AttachRequest {
                container_id: id,
                netns,
                labels,
                ..Default::default()
            })
            .await
            .map(|_| ())
        })
    })
}

/// A batch of sequential attaches and then detaches, and the agent's CPU time per detach
/// (over the detaches and the half second after them: what a detach sets off in the
/// background counts).
struct Batch {
    attach: Run,
    detach: Run,
    agent_cpu_per_detach: Duration,
}

/// Attaches `n` endpoints into pre-made namespaces, one at a time, labelled like the fabric's
/// (`selected`: each one some policy selects once the policies exist) or with a label no policy
/// selects, then detaches them one at a time.
fn attach_batch(
    lab: &Lab,
    client: &Client,
    tag: &str,
    n: usize,
    selected: bool,
) -> Result<(Batch, Vec<String>)> {
    let ns = namespaces(lab, tag, n)?;
    let attach = timed(n, 1, |i| {
        let labels = match selected {
            true => labels(i),
            false => [("app".to_string(), "none".to_string())].into(),
        };
        let netns = format!("/run/netns/{}", ns[i]);
        attach_labelled(client, 0, format!("{tag}{i}"), netns, labels)
    })?;
    let agent = lab.agent_pid(0).context("the agent's pid")?;
    let cpu = Cpu::now(&[agent]);
    let detach = timed(n, 1, |i| {
        client.call(0, move |mut c| {
            let id = format!("{tag}{i}");
            Box::pin(async move {
                c.detach(pb::DetachRequest { container_id: id })
                    .await
                    .map(|_| ())
            })
        })
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let (_, agent_cpu) = cpu.per(n);
    let batch = Batch {
        attach,
        detach,
        agent_cpu_per_detach: agent_cpu[0],
    };
    Ok((batch, ns))
}

pub fn run(report: &mut Report, options: &Options) -> Result<()> {
    let (endpoints, policies) = options.size((150, 40), (1000, 200));
    policy(report, endpoints, policies)
}

fn policy(report: &mut Report, endpoints: usize, count: usize) -> Result<()> {
    println!("== policy: {count} policies, {endpoints} endpoints over {HOSTS} hosts");
    let mut lab = Lab::new(LabOptions {
        hosts: HOSTS,
        // The agents' default: full resyncs (which read every rule and set back) every 10 s.
        agent_args: vec!["--resync-interval".into(), "10s".into()],
        start_agents: false,
        ..Default::default()
    })?;
    for i in 0..HOSTS {
        lab.start_agent_env(i, &[], &[("WEFT_LOG", "info,weft_agent::policy=debug")])?;
    }
    for i in 0..HOSTS {
        lab.wait_agent(i, Duration::from_secs(30))?;
    }
    let clients: Vec<Client> = (0..HOSTS)
        .map(|h| Client::new(&lab, h))
        .collect::<Result<_>>()?;
    let started = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let jobs: Vec<_> = (0..HOSTS)
            .map(|h| {
                let client = &clients[h];
                s.spawn(move || {
                    (0..endpoints)
                        .filter(|i| i % HOSTS == h)
                        .try_for_each(|i| attach(client, i % 4, format!("e{i}"), String::new(), i))
                })
            })
            .collect();
        jobs.into_iter()
            .try_for_each(|j| j.join().expect("attach thread"))
    })?;
    println!(
        "   {endpoints} endpoints attached in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let (without, ns) = attach_batch(&lab, &clients[0], "np", 100, true)?;
    delete_namespaces(&ns)?;
    let docs = policies(count);
    for chunk in docs.chunks(100) {
        policy_lab::apply(&lab, &Value::Array(chunk.to_vec()))?;
    }
    settle(&lab)?;
    let (with, ns) = attach_batch(&lab, &clients[0], "wp", 100, true)?;
    delete_namespaces(&ns)?;
    let (unselected, ns) = attach_batch(&lab, &clients[0], "up", 100, false)?;
    delete_namespaces(&ns)?;
    report.run("policy.attach.without_policy", &without.attach);
    report.run("policy.attach.with_policy", &with.attach);
    let ratio = with.attach.pct(0.5) / without.attach.pct(0.5);
    report.line("policy.attach.p50_ratio", ratio, "x", "target <= 1.5");
    report.run("policy.attach.with_policy_unselected", &unselected.attach);
    let ratio = unselected.attach.pct(0.5) / without.attach.pct(0.5);
    report.line(
        "policy.attach.p50_ratio_unselected",
        ratio,
        "x",
        "no policy selects it",
    );
    report.run("policy.detach.without_policy", &without.detach);
    report.run("policy.detach.with_policy", &with.detach);
    for (name, batch) in [("without_policy", &without), ("with_policy", &with)] {
        report.line(
            &format!("policy.detach.{name}.agent_cpu"),
            batch.agent_cpu_per_detach.as_secs_f64() * 1e3,
            "ms",
            "the agent's CPU per detach, what it sets off included",
        );
    }

    membership(report, &lab, &clients[0], endpoints)?;
    resync(report, &mut lab)?;
    dataplane(report, &mut lab)?;
    Ok(())
}

/// Waits until every host has applied the policies (its sets stop changing).
fn settle(lab: &Lab) -> Result<()> {
    let mut last = vec![];
    for _ in 0..100 {
        let now: Vec<usize> = (0..HOSTS)
            .map(|i| {
                policy_lab::sets(lab, i)
                    .map(|s| s.values().map(|m| m.len() + 1).sum())
                    .unwrap_or(0)
            })
            .collect();
        if now == last && now.iter().all(|n| *n > 0) {
            println!("   policies applied: {now:?} set entries per host");
            return Ok(());
        }
        last = now;
        std::thread::sleep(Duration::from_millis(300));
    }
    bail!("policies did not settle")
}

/// Relabels an endpoint of h1 in and out of `tier == 't0'` and times until every host's set of
/// that selector shows the change.
fn membership(report: &mut Report, lab: &Lab, client: &Client, endpoints: usize) -> Result<()> {
    let set = selector_set_name(Family::V4, &Selector::parse("tier == 't0'")?);
    let index = (0..endpoints)
        .find(|i| i % HOSTS == 0 && i % TIERS == 1)
        .unwrap();
    let id = format!("e{index}");
    let ip = lab.ctl_json(0, &["get", &id])?["ip"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut samples = vec![];
    for round in 0..40 {
        let joining = round % 2 == 0;
        let mut wanted = labels(index);
        if joining {
            wanted.insert("tier".into(), "t0".into());
        }
        let started = Instant::now();
        let watchers: Vec<_> = (0..HOSTS)
            .map(|h| {
                let (set, ip) = (set.clone(), ip.clone());
                probe::in_netns(&lab.hosts[h].name, move || {
                    while started.elapsed() < Duration::from_secs(5) {
                        let member = std::process::Command::new("ipset")
                            .args(["-q", "test", &set, &ip])
                            .status()
                            .is_ok_and(|s| s.success());
                        if member == joining {
                            return Some(started.elapsed());
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    None
                })
            })
            .collect::<Result<_>>()?;
        let id = id.clone();
        client.call(0, move |mut c| {
            Box::pin(async move {
                c.attach(pb::AttachRequest {
                    container_id: id,
                    labels: wanted,
                    ..Default::default()
                })
                .await
                .map(|_| ())
            })
        })?;
        let mut slowest = Duration::ZERO;
        for w in watchers {
            match w.join().expect("watcher") {
                Some(t) => slowest = slowest.max(t),
                None => bail!("membership change never showed on some host"),
            }
        }
        samples.push(slowest);
        std::thread::sleep(Duration::from_millis(50));
    }
    let run = Run {
        wall: samples.iter().sum(),
        samples,
    };
    report.line(
        "policy.membership_all_hosts.p50",
        run.pct(0.5),
        "ms",
        "relabel -> every host's set",
    );
    report.line(
        "policy.membership_all_hosts.p99",
        run.pct(0.99),
        "ms",
        "target <= 100",
    );
    Ok(())
}

/// Reads the agents' periodic policy resyncs (every 10 s: plan, sets read back and compared)
/// from their logs, and times a full resync of policy state: an agent restarted with every
/// policy and endpoint in place reads all its sets and chains back and applies the difference
/// before anything else ("network policy verified and applied").
fn resync(report: &mut Report, lab: &mut Lab) -> Result<()> {
    std::thread::sleep(Duration::from_secs(12));
    let field = |line: &str, name: &str| -> Option<f64> {
        line.split(&format!("{name}="))
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let mut samples = vec![];
    for i in 0..HOSTS {
        let log = lab.agent_log(i);
        let periodic = log
            .lines()
            .filter(|l| l.contains("network policy synced") && l.contains("sets_verified=true"));
        // The latest of each host: the first ran before the policies existed.
        if let Some(ms) = periodic.filter_map(|l| field(l, "total_ms")).next_back() {
            samples.push(Duration::from_secs_f64(ms / 1e3));
        }
    }
    let run = Run {
        wall: samples.iter().sum(),
        samples,
    };
    report.line(
        "policy.periodic_resync.max",
        run.pct(1.0),
        "ms",
        "plan + sets read back",
    );
    // A full resync: h1's agent restarted; it verifies everything before serving.
    lab.stop_agent(0, nix::sys::signal::Signal::SIGTERM)?;
    let before = lab.agent_log(0).len();
    lab.start_agent_env(0, &[], &[("WEFT_LOG", "info,weft_agent::policy=debug")])?;
    lab.wait_agent(0, Duration::from_secs(60))?;
    let log = lab.agent_log(0);
    let full = log[before..]
        .lines()
        .find(|l| l.contains("network policy verified and applied"))
        .and_then(|l| field(l, "ms"))
        .ok_or_else(|| anyhow::anyhow!("no full policy resync in h1's log"))?;
    report.line(
        "policy.full_resync",
        full,
        "ms",
        "target <= 500 (restart: all read back)",
    );
    let plans: Vec<Duration> = (0..HOSTS)
        .flat_map(|i| {
            lab.agent_log(i)
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter_map(|l| {
            l.split("plan_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .map(|ms: f64| Duration::from_secs_f64(ms / 1e3))
        .collect();
    if !plans.is_empty() {
        let run = Run {
            wall: plans.iter().sum(),
            samples: plans,
        };
        report.line(
            "policy.plan.p50",
            run.pct(0.5),
            "ms",
            "planning alone (pure)",
        );
        report.line("policy.plan.p99", run.pct(0.99), "ms", "");
    }
    Ok(())
}

/// iperf3 between two endpoints of h1 and h2, first selected by no policy, then by policies
/// that allow the path (among the 200 others).
fn dataplane(report: &mut Report, lab: &mut Lab) -> Result<()> {
    let (client_ns, _) = policy_lab::attach(lab, 0, "perf-client", &["perf=client"], &[])?;
    let (server_ns, server_ip) = policy_lab::attach(lab, 1, "perf-server", &["perf=server"], &[])?;
    lab.spawn_in(&server_ns, "iperf3", &["-s"])?;
    std::thread::sleep(Duration::from_millis(500));
    let median = |ns: &str| -> Result<f64> {
        let mut runs = [
            iperf(ns, &server_ip, 5)?,
            iperf(ns, &server_ip, 5)?,
            iperf(ns, &server_ip, 5)?,
        ];
        runs.sort_by(|a, b| a.partial_cmp(b).unwrap());
        Ok(runs[1])
    };
    let open = median(&client_ns)?;
    policy_lab::apply(
        lab,
        &json!([
            {"name": "perf-server", "selector": "perf == 'server'", "ingress": [
                {"action": "deny", "protocol": "udp"},
                {"action": "allow", "protocol": "tcp", "source": {"selector": "perf == 'client'"}, "destination": {"ports": [5201]}}]},
            {"name": "perf-client", "selector": "perf == 'client'", "egress": [
                {"action": "allow", "protocol": "tcp", "destination": {"selector": "perf == 'server'", "ports": [5201]}}]}
        ]),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    if probe::reach(&client_ns, &server_ip, probe::Probe::Icmp) {
        bail!("the policed path is not policed (ICMP passed)");
    }
    let policed = median(&client_ns)?;
    let _ = sh::run("true", &[]);
    report.line(
        "policy.iperf.unpoliced_gbps",
        open / 1e9,
        "Gbit/s",
        "median of 3",
    );
    report.line(
        "policy.iperf.policed_gbps",
        policed / 1e9,
        "Gbit/s",
        "median of 3",
    );
    report.line("policy.iperf.ratio", policed / open, "x", "target >= 0.95");
    Ok(())
}
