//! A fleet of simulated hosts and one real agent (issue 19): the simulated hosts are registered,
//! alive and hold two blocks each, written by one process against the lab's 3-member etcd; the
//! real agent then starts and must route every block. Measured: time to program every peer
//! route, a new block of a simulated host to its route in the agent's kernel, the agent's
//! memory, a full resync with nothing to change, and the fleet's own watch fan-out (every
//! simulated host watching, each seeing a new block).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use ipnetwork::IpNetwork;
use weft_etcd::records::{AliveRecord, HostRecord, PoolRecord};
use weft_etcd::{ClusterEvent, Datastore};

use super::client::rss_mb;
use super::convergence::delays;
use super::scale::{etcd_config, in_namespace};
use super::{Options, Report, Run};
use crate::{sh, Lab, LabOptions};

/// Simulated hosts sharing one etcd connection.
const PER_CONNECTION: usize = 25;
/// Simulated hosts writing their records at once.
const WRITERS: usize = 64;
/// New blocks claimed while the agent runs, to time their routes.
const PROBES: usize = 100;

pub fn run(report: &mut Report, options: &Options) -> Result<()> {
    fleet(report, options.size(500, 5000))
}

/// The pool of the fleet: room for two /26 blocks per host and the probes.
fn pool() -> PoolRecord {
    PoolRecord {
        cidr: "10.64.0.0/10".parse().expect("a CIDR"),
        block_size: 26,
        nat_outgoing: true,
        encapsulation: Default::default(),
    }
}

/// Block `n` of the fleet's pool.
fn block(n: usize) -> IpNetwork {
    weft_etcd::alloc::nth_block(pool().cidr, 26, n as u128)
}

/// Simulated host `i`: on the real host's segment (so the agent routes it directly; the
/// addresses repeat, which a route does not mind), registered under its own name.
fn host_record(i: usize) -> HostRecord {
    HostRecord {
        underlay_ip: std::net::Ipv4Addr::new(198, 51, 100, 10 + (i % 200) as u8).into(),
        version: "fleet".into(),
        first_seen: 0,
        underlay_prefix: Some(24),
        vtep_mac: None,
        tunnel_ip: None,
        underlay_ipv6: None,
    }
}

fn fleet(report: &mut Report, hosts: usize) -> Result<()> {
    println!("== fleet: {hosts} simulated hosts (2 blocks each) and one real agent");
    let mut lab = Lab::new(LabOptions {
        hosts: 1,
        start_agents: false,
        etcd_members: 3,
        agent_args: vec![
            "--pool".into(),
            "10.64.0.0/10".into(),
            "--block-release-after".into(),
            "off".into(),
        ],
        ..Default::default()
    })?;
    let endpoints = lab.etcd_endpoints();
    let written = in_namespace(&lab.router, move || populate(endpoints, hosts))?;
    println!("   fleet written in {:.1} s", written.as_secs_f64());

    let routes = 2 * hosts;
    let ns = lab.hosts[0].name.clone();
    let started = Instant::now();
    lab.start_agent(0)?;
    while route_count(&ns)? < routes {
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "the agent programmed {} of {routes} routes in 120 s",
                route_count(&ns)?
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let programmed = started.elapsed();
    report.line(
        &format!("fleet.hosts{hosts}.routes_programmed"),
        programmed.as_secs_f64() * 1e3,
        "ms",
        &format!("{routes} peer routes after the agent starts; target <= 5000"),
    );
    std::thread::sleep(Duration::from_secs(5));
    let pid = lab.agent_pid(0).unwrap_or_default();
    report.line(
        &format!("fleet.hosts{hosts}.agent_rss"),
        rss_mb(pid)?,
        "MB",
        "target <= 64",
    );
    resync(report, &lab, hosts)?;
    probes(report, &mut lab, hosts)?;
    let endpoints = lab.etcd_endpoints();
    let fanout = in_namespace(&lab.router, move || fan_out(endpoints, hosts))?;
    report.line(
        &format!("fleet.hosts{hosts}.watch_fanout.p50"),
        fanout.pct(0.5),
        "ms",
        "",
    );
    report.line(
        &format!("fleet.hosts{hosts}.watch_fanout.p99"),
        fanout.pct(0.99),
        "ms",
        &format!("{hosts} watchers on a 3-member etcd each see a new block; target <= 2000"),
    );
    Ok(())
}

/// Writes the fleet: every host registered, alive on one shared long lease, two blocks each.
async fn populate(endpoints: String, hosts: usize) -> Result<Duration> {
    let started = Instant::now();
    let config = etcd_config(&endpoints);
    let mut stores = vec![];
    for _ in 0..hosts.div_ceil(PER_CONNECTION) {
        stores.push(Datastore::connect(&config).await?);
    }
    stores[0].ensure_pool("default", &pool()).await?;
    let alive = AliveRecord {
        boot_id: "fleet".into(),
        started: 0,
    };
    let lease = stores[0].announce_alive("sim0", &alive, 3600).await?;
    // etcd refuses proposals beyond a few thousand pending ("too many requests").
    let writers = Arc::new(tokio::sync::Semaphore::new(WRITERS));
    let mut tasks = vec![];
    for i in 0..hosts {
        let store = stores[i / PER_CONNECTION].clone();
        let alive = alive.clone();
        let writers = writers.clone();
        tasks.push(tokio::spawn(async move {
            let _turn = writers.acquire().await?;
            let name = format!("sim{i}");
            store.register_host(&name, &host_record(i)).await?;
            store.announce_alive_on(&name, &alive, lease).await?;
            for b in [2 * i, 2 * i + 1] {
                if !store.claim_exact_block("default", block(b), &name).await? {
                    return Err(anyhow::anyhow!("block {} was taken", block(b)));
                }
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(started.elapsed())
}

/// The agent's weft routes.
fn route_count(ns: &str) -> Result<usize> {
    let out = sh::run("ip", &["-n", ns, "route", "show", "proto", "weft"])?;
    Ok(out.lines().filter(|l| l.contains(" via ")).count())
}

/// The agent's reconcile passes over 10 s of quiet (a full pass every resync interval): their
/// mean time from the agent's metrics, and none may change anything (a pass that changes
/// something logs `reconciled`).
fn resync(report: &mut Report, lab: &Lab, hosts: usize) -> Result<()> {
    let ns = &lab.hosts[0].name;
    let before = lab.agent_log(0).len();
    let (sum0, count0) = sh::reconcile_totals(ns)?;
    std::thread::sleep(Duration::from_secs(10));
    let (sum1, count1) = sh::reconcile_totals(ns)?;
    let log = lab.agent_log(0);
    let changed: Vec<&str> = log[before..]
        .lines()
        .filter(|l| l.contains(" reconciled "))
        .collect();
    if count1 <= count0 || !changed.is_empty() {
        bail!(
            "quiet resyncs: {} passes, changing: {changed:?}",
            count1.saturating_sub(count0)
        );
    }
    let passes = count1 - count0;
    report.line(
        &format!("fleet.hosts{hosts}.resync"),
        (sum1 - sum0) / passes as f64 * 1e3,
        "ms",
        &format!("mean of {passes} passes with nothing to change; target <= 200"),
    );
    Ok(())
}

/// New blocks claimed by simulated hosts, one every 20 ms: claim to route in the agent's kernel
/// (`ip -ts monitor route`).
fn probes(report: &mut Report, lab: &mut Lab, hosts: usize) -> Result<()> {
    let ns = lab.hosts[0].name.clone();
    let monitor_log = lab.dir.join("fleet-monitor.log");
    lab.spawn_logged(
        &ns,
        "stdbuf",
        &["-oL", "ip", "-ts", "monitor", "route"],
        Some(&monitor_log),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let endpoints = lab.etcd_endpoints();
    let claims = in_namespace(&lab.router, move || async move {
        let store = Datastore::connect(&etcd_config(&endpoints)).await?;
        let mut claims = std::collections::HashMap::new();
        for k in 0..PROBES {
            let b = block(2 * hosts + k);
            let at = seconds_of_day_now();
            store
                .claim_exact_block("default", b, &format!("sim{}", k % hosts))
                .await?;
            claims.insert(b.to_string(), at);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(claims)
    })?;
    std::thread::sleep(Duration::from_secs(1));
    let monitor = std::fs::read_to_string(&monitor_log)?;
    let delays = delays(&claims, &monitor, " via ");
    if delays.len() < PROBES * 9 / 10 {
        bail!("only {} of {PROBES} probe routes were seen", delays.len());
    }
    let run = Run {
        wall: Duration::from_secs(1),
        samples: delays,
    };
    report.line(
        &format!("fleet.hosts{hosts}.block_to_route.p50"),
        run.pct(0.5),
        "ms",
        "",
    );
    report.line(
        &format!("fleet.hosts{hosts}.block_to_route.p99"),
        run.pct(0.99),
        "ms",
        "a simulated host's new block to its route in the agent's kernel; target <= 100",
    );
    Ok(())
}

fn seconds_of_day_now() -> f64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    now % 86_400.0
}

/// Every simulated host follows the cluster; one new block is written; each host's delay until
/// it sees it.
async fn fan_out(endpoints: String, hosts: usize) -> Result<Run> {
    let config = etcd_config(&endpoints);
    let mut stores = vec![];
    for _ in 0..hosts.div_ceil(PER_CONNECTION) {
        stores.push(Datastore::connect(&config).await?);
    }
    let probe = block(2 * hosts + PROBES);
    let written: Arc<std::sync::OnceLock<Instant>> = Arc::default();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(hosts);
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::channel::<Duration>(hosts);
    let mut tasks = vec![];
    for i in 0..hosts {
        let (store, written) = (stores[i / PER_CONNECTION].clone(), written.clone());
        let (ready, seen) = (ready_tx.clone(), seen_tx.clone());
        // From now on, without a snapshot: what is measured is the delivery of one change to
        // every watcher (an agent's snapshot at start is the resync case's business).
        tasks.push(tokio::spawn(async move {
            let _ = store
                .follow_cluster_changes(
                    0,
                    || {
                        let _ = ready.try_send(());
                    },
                    |events| {
                        let hit = events.iter().any(|(e, _)| {
                            matches!(e, ClusterEvent::BlockPut { block, .. } if *block == probe)
                        });
                        if let (true, Some(at)) = (hit, written.get()) {
                            let _ = seen.try_send(at.elapsed());
                        }
                    },
                )
                .await;
        }));
    }
    // Bounded, so a fleet too large for this machine fails with a reason instead of hanging.
    let mut ready = 0;
    while ready < hosts {
        match tokio::time::timeout(Duration::from_secs(120), ready_rx.recv()).await {
            Ok(Some(())) => ready += 1,
            _ => bail!("only {ready} of {hosts} watchers were watching within 120 s"),
        }
    }
    let _ = written.set(Instant::now());
    stores[0]
        .claim_exact_block("default", probe, "sim0")
        .await?;
    let mut samples = vec![];
    while samples.len() < hosts {
        match tokio::time::timeout(Duration::from_secs(30), seen_rx.recv()).await {
            Ok(Some(delay)) => samples.push(delay),
            _ => break,
        }
    }
    for task in tasks {
        task.abort();
    }
    if samples.len() < hosts {
        bail!(
            "only {} of {hosts} watchers saw the new block",
            samples.len()
        );
    }
    Ok(Run {
        wall: Duration::from_secs(1),
        samples,
    })
}
