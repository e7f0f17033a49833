//! `weft-bench`: weft against the CNI reference plugins (ptp + host-local, + portmap) and the
//! kernel floor, measured in the same run on the same machine. Prints a table and
//! `BENCH key=value` lines. Every section builds its own lab and removes it.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use nix::sys::signal::Signal;
use weft_proto::v1 as pb;
use weft_tests::{sh, Lab, LabOptions};

const CNI_PATH: &str = "/usr/lib/cni";
const CONCURRENCY: usize = 8;

#[derive(Parser)]
#[command(
    name = "weft-bench",
    about = "Benchmarks weft against the CNI reference plugins"
)]
struct Cli {
    /// Smaller sizes (for a smoke run): N=50 instead of 100/500, fewer blocks and hosts.
    #[arg(long)]
    quick: bool,
    /// Sections to run (comma-separated): attach,ports,convergence,dataplane,restart,scale.
    #[arg(
        long,
        default_value = "attach,ports,convergence,dataplane,restart,scale"
    )]
    only: String,
}

/// Latency samples of one run.
struct Run {
    samples: Vec<Duration>,
    wall: Duration,
}

impl Run {
    fn pct(&self, p: f64) -> f64 {
        let mut s: Vec<f64> = self.samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        s.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let i = ((s.len() as f64 - 1.0) * p).round() as usize;
        s.get(i).copied().unwrap_or(f64::NAN)
    }

    fn rate(&self) -> f64 {
        self.samples.len() as f64 / self.wall.as_secs_f64()
    }
}

struct Report {
    rows: Vec<(String, String, String)>,
}

impl Report {
    fn line(&mut self, key: &str, value: f64, unit: &str, note: &str) {
        println!("BENCH {key}={value:.3} unit={unit}");
        self.rows.push((
            key.to_string(),
            format!("{value:.2} {unit}"),
            note.to_string(),
        ));
    }

    fn run(&mut self, key: &str, run: &Run) {
        self.line(&format!("{key}.p50"), run.pct(0.5), "ms", "");
        self.line(&format!("{key}.p99"), run.pct(0.99), "ms", "");
        self.line(&format!("{key}.rate"), run.rate(), "per_s", "");
    }

    fn print(&self) {
        println!();
        println!("{:<44} {:>16}  note", "measure", "value");
        for (k, v, n) in &self.rows {
            println!("{k:<44} {v:>16}  {n}");
        }
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    weft_tests::require_root();
    let sections: Vec<&str> = cli.only.split(',').collect();
    let mut report = Report { rows: vec![] };
    println!(
        "weft-bench {} on {} ({} cores)",
        chrono_now(),
        sh::run("uname", &["-r"])?.trim(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let sizes: Vec<usize> = if cli.quick { vec![50] } else { vec![100, 500] };
    if sections.contains(&"attach") {
        for &n in &sizes {
            for concurrency in [1, CONCURRENCY] {
                attach_detach(&mut report, n, concurrency)?;
            }
        }
    }
    if sections.contains(&"ports") {
        for concurrency in [1, CONCURRENCY] {
            ports(&mut report, if cli.quick { 50 } else { 100 }, concurrency)?;
        }
    }
    if sections.contains(&"convergence") {
        convergence(&mut report, if cli.quick { 30 } else { 120 })?;
    }
    if sections.contains(&"dataplane") {
        dataplane(&mut report, if cli.quick { 2 } else { 5 })?;
    }
    if sections.contains(&"restart") {
        restart(&mut report, if cli.quick { 200 } else { 1000 })?;
    }
    if sections.contains(&"scale") {
        scale(&mut report, if cli.quick { 100 } else { 500 })?;
    }
    report.print();
    Ok(())
}

fn chrono_now() -> String {
    sh::run("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Runs `job(i)` for i in 0..n on `concurrency` threads; returns per-job latencies.
fn timed<F>(n: usize, concurrency: usize, job: F) -> Result<Run>
where
    F: Fn(usize) -> Result<()> + Send + Sync,
{
    let job = &job;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    let results: Vec<Result<Vec<Duration>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..concurrency)
            .map(|_| {
                let next = &next;
                scope.spawn(move || -> Result<Vec<Duration>> {
                    let mut samples = vec![];
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if i >= n {
                            return Ok(samples);
                        }
                        let t = Instant::now();
                        job(i)?;
                        samples.push(t.elapsed());
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wall = started.elapsed();
    let mut samples = vec![];
    for r in results {
        samples.extend(r?);
    }
    Ok(Run { samples, wall })
}

/// A blocking gRPC client usable from plain threads.
struct Client {
    runtime: tokio::runtime::Runtime,
    socket: std::path::PathBuf,
    clients: Vec<
        std::sync::Mutex<
            Option<weft_proto::v1::agent_client::AgentClient<tonic::transport::Channel>>,
        >,
    >,
}

impl Client {
    fn new(lab: &Lab, host: usize) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        Ok(Self {
            runtime,
            socket: lab.hosts[host].socket.clone(),
            clients: (0..64).map(|_| std::sync::Mutex::new(None)).collect(),
        })
    }

    /// One connection per calling slot, like independent runtime clients.
    fn call<T>(
        &self,
        slot: usize,
        f: impl FnOnce(
            weft_proto::v1::agent_client::AgentClient<tonic::transport::Channel>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, tonic::Status>> + Send>,
        >,
    ) -> Result<T> {
        let mut guard = self.clients[slot % self.clients.len()].lock().unwrap();
        if guard.is_none() {
            let c = self
                .runtime
                .block_on(weft_cli::client::connect(&self.socket))
                .map_err(anyhow::Error::msg)?;
            *guard = Some(c);
        }
        let client = guard.as_ref().unwrap().clone();
        drop(guard);
        self.runtime
            .block_on(f(client))
            .map_err(|s| anyhow::anyhow!("{s:?}"))
    }
}

fn cni(
    host_ns: &str,
    plugin: &str,
    command: &str,
    id: &str,
    netns: &str,
    config: &str,
) -> Result<String> {
    let mut child = sh::command_in_ns(host_ns, &format!("{CNI_PATH}/{plugin}"))?
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!("running CNI plugin {plugin} (apt-get install containernetworking-plugins)")
        })?;
    child.stdin.take().unwrap().write_all(config.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{plugin} {command} {id}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ptp_config(dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0", "name": "bench", "type": "ptp", "ipMasq": false,
        "ipam": { "type": "host-local", "ranges": [[{"subnet": "10.77.0.0/16"}]],
                  "dataDir": dir.join("cni-ipam").to_str().unwrap() }
    })
    .to_string()
}

fn portmap_config(prev: &str, host_port: u16) -> String {
    let prev: serde_json::Value = serde_json::from_str(prev).unwrap_or_default();
    serde_json::json!({
        "cniVersion": "1.0.0", "name": "bench", "type": "portmap",
        "capabilities": {"portMappings": true}, "snat": true,
        "runtimeConfig": {"portMappings": [{"hostPort": host_port, "containerPort": 80, "protocol": "tcp"}]},
        "prevResult": prev,
    })
    .to_string()
}

/// Pre-creates `n` namespaces (the runtime's job, not timed) named `<prefix>-<tag><i>`.
fn namespaces(lab: &Lab, tag: &str, n: usize) -> Result<Vec<String>> {
    let names: Vec<String> = (0..n).map(|i| format!("{}-{tag}{i}", lab.prefix)).collect();
    let batch: Vec<String> = names.iter().map(|n| format!("netns add {n}")).collect();
    sh::ip_batch("", &batch)?;
    Ok(names)
}

fn delete_namespaces(names: &[String]) -> Result<()> {
    let batch: Vec<String> = names.iter().map(|n| format!("netns del {n}")).collect();
    sh::ip_batch("", &batch)
}

/// One Attach through connection `slot`.
fn weft_attach(
    client: &Client,
    slot: usize,
    id: String,
    netns: String,
    ports: Vec<pb::PortMapping>,
) -> Result<()> {
    client.call(slot, move |mut c| {
        Box::pin(async move {
            c.attach(pb::AttachRequest {
                container_id: id,
                netns,
                ports,
                ..Default::default()
            })
            .await
            .map(|_| ())
        })
    })
}

fn one_host_lab() -> Result<Lab> {
    Lab::new(LabOptions {
        hosts: 1,
        agent_args: vec!["--resync-interval".into(), "30s".into()],
        ..Default::default()
    })
}

fn attach_detach(report: &mut Report, n: usize, concurrency: usize) -> Result<()> {
    println!("== attach/detach N={n} concurrency={concurrency}");
    let lab = one_host_lab()?;
    let host = lab.hosts[0].name.clone();
    let client = Arc::new(Client::new(&lab, 0)?);

    // weft
    let ns = namespaces(&lab, "w", n)?;
    let attach = timed(n, concurrency, |i| {
        let netns = format!("/run/netns/{}", ns[i]);
        weft_attach(&client, i % concurrency, format!("b{i}"), netns, vec![])
    })?;
    let detach = timed(n, concurrency, |i| {
        client.call(i % concurrency, move |mut c| {
            Box::pin(async move {
                c.detach(pb::DetachRequest {
                    container_id: format!("b{i}"),
                })
                .await
                .map(|_| ())
            })
        })
    })?;
    delete_namespaces(&ns)?;

    // ptp + host-local
    let ns = namespaces(&lab, "p", n)?;
    let config = ptp_config(&lab.dir);
    let add = timed(n, concurrency, |i| {
        cni(
            &host,
            "ptp",
            "ADD",
            &format!("p{i}"),
            &format!("/run/netns/{}", ns[i]),
            &config,
        )
        .map(|_| ())
    })?;
    let del = timed(n, concurrency, |i| {
        cni(
            &host,
            "ptp",
            "DEL",
            &format!("p{i}"),
            &format!("/run/netns/{}", ns[i]),
            &config,
        )
        .map(|_| ())
    })?;
    delete_namespaces(&ns)?;

    let key = format!("attach.n{n}.c{concurrency}");
    report.run(&format!("{key}.weft"), &attach);
    report.run(&format!("{key}.ptp"), &add);
    report.line(
        &format!("{key}.p50_ratio_weft_over_ptp"),
        attach.pct(0.5) / add.pct(0.5),
        "x",
        "target <= 0.5",
    );
    report.line(
        &format!("{key}.rate_ratio_weft_over_ptp"),
        attach.rate() / add.rate(),
        "x",
        "target >= 5 (concurrent)",
    );
    let key = format!("detach.n{n}.c{concurrency}");
    report.run(&format!("{key}.weft"), &detach);
    report.run(&format!("{key}.ptp"), &del);
    report.line(
        &format!("{key}.rate_ratio_weft_over_ptp"),
        detach.rate() / del.rate(),
        "x",
        "target >= 5",
    );
    Ok(())
}

fn ports(report: &mut Report, n: usize, concurrency: usize) -> Result<()> {
    println!("== attach with one published port N={n} concurrency={concurrency}");
    let lab = one_host_lab()?;
    let host = lab.hosts[0].name.clone();
    let client = Arc::new(Client::new(&lab, 0)?);
    let ns = namespaces(&lab, "w", n)?;
    let attach = timed(n, concurrency, |i| {
        let netns = format!("/run/netns/{}", ns[i]);
        let port = pb::PortMapping {
            protocol: "tcp".into(),
            host_port: 20000 + i as u32,
            container_port: 80,
        };
        weft_attach(&client, i % concurrency, format!("b{i}"), netns, vec![port])
    })?;
    let ns2 = namespaces(&lab, "p", n)?;
    let config = ptp_config(&lab.dir);
    let add = timed(n, concurrency, |i| {
        let netns = format!("/run/netns/{}", ns2[i]);
        let result = cni(&host, "ptp", "ADD", &format!("p{i}"), &netns, &config)?;
        cni(
            &host,
            "portmap",
            "ADD",
            &format!("p{i}"),
            &netns,
            &portmap_config(&result, 30000 + i as u16),
        )?;
        Ok(())
    })?;
    // Tear down both (portmap rules live in the host namespace, which the lab removes).
    delete_namespaces(&ns)?;
    delete_namespaces(&ns2)?;
    let key = format!("publish.n{n}.c{concurrency}");
    report.run(&format!("{key}.weft"), &attach);
    report.run(&format!("{key}.ptp_portmap"), &add);
    report.line(
        &format!("{key}.rate_ratio_weft_over_portmap"),
        attach.rate() / add.rate(),
        "x",
        "target >= 10",
    );
    Ok(())
}

/// Parses `[2026-11-25T10:59:49.382332]` or `2026-11-25T10:59:49.382332Z` into seconds of day.
fn seconds_of_day(stamp: &str) -> Option<f64> {
    let t = stamp.split('T').nth(1)?;
    let t = t.trim_end_matches(['Z', ']']);
    let mut parts = t.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn convergence(report: &mut Report, blocks: usize) -> Result<()> {
    println!("== route convergence over {blocks} new blocks (3 hosts)");
    // /32 blocks: every attach on h1 claims a new block.
    let mut lab = Lab::new(LabOptions {
        agent_args: vec![
            "--pool".into(),
            "10.66.0.0/22".into(),
            "--block-size".into(),
            "32".into(),
        ],
        ..Default::default()
    })?;
    let monitor_log = lab.dir.join("monitor.log");
    let h2 = lab.hosts[1].name.clone();
    // Line-buffered, or the events sit in stdio's buffer when the monitor is ended.
    lab.spawn_logged(
        &h2,
        "stdbuf",
        &["-oL", "ip", "-ts", "monitor", "route"],
        Some(&monitor_log),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let client = Client::new(&lab, 0)?;
    for i in 0..blocks {
        weft_attach(&client, 0, format!("v{i}"), String::new(), vec![])?;
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_secs(1));
    let claims: std::collections::HashMap<String, f64> = lab
        .agent_log(0)
        .lines()
        .filter(|l| l.contains("claimed block"))
        .filter_map(|l| {
            let stamp = l.split_whitespace().next()?;
            let block = l.split("block=").nth(1)?.split_whitespace().next()?;
            Some((
                block.trim_end_matches("/32").to_string(),
                seconds_of_day(stamp)?,
            ))
        })
        .collect();
    let monitor = std::fs::read_to_string(&monitor_log)?;
    let mut delays = vec![];
    for line in monitor
        .lines()
        .filter(|l| l.contains(" via ") && !l.starts_with("Deleted"))
    {
        let Some((stamp, rest)) = line.split_once(' ') else {
            continue;
        };
        let dst = rest.split_whitespace().next().unwrap_or("");
        if let (Some(claimed), Some(seen)) = (claims.get(dst), seconds_of_day(stamp)) {
            delays.push(Duration::from_secs_f64((seen - claimed).max(0.0)));
        }
    }
    if delays.len() < blocks * 9 / 10 {
        bail!(
            "only {} of {blocks} routes were seen on h2 ({} claims logged; monitor saw:\n{})",
            delays.len(),
            claims.len(),
            monitor.lines().take(5).collect::<Vec<_>>().join("\n")
        );
    }
    let run = Run {
        wall: Duration::from_secs(1),
        samples: delays,
    };
    report.line("convergence.blocks", run.samples.len() as f64, "count", "");
    report.line("convergence.p50", run.pct(0.5), "ms", "");
    report.line("convergence.p99", run.pct(0.99), "ms", "target <= 100");
    Ok(())
}

fn iperf(client_ns: &str, server_ip: &str, seconds: u32) -> Result<f64> {
    let out = sh::in_ns(
        client_ns,
        &["iperf3", "-c", server_ip, "-t", &seconds.to_string(), "-J"],
    )?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 json")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow::anyhow!("iperf3: {}", String::from_utf8_lossy(&out.stdout)))
}

fn dataplane(report: &mut Report, seconds: u32) -> Result<()> {
    println!(
        "== dataplane: iperf3 container->container across hosts vs host->host ({seconds}s x 3)"
    );
    let mut lab = Lab::new(LabOptions {
        hosts: 2,
        ..Default::default()
    })?;
    let (c1, _) = lab.attach(0, "client")?;
    let (c2, ip2) = lab.attach(1, "server")?;
    let h2 = lab.hosts[1].name.clone();
    lab.spawn_in(&c2, "iperf3", &["-s"])?;
    lab.spawn_in(&h2, "iperf3", &["-s"])?;
    std::thread::sleep(Duration::from_millis(500));
    let mut fabric = vec![];
    let mut underlay = vec![];
    for _ in 0..3 {
        fabric.push(iperf(&c1, &ip2, seconds)?);
        underlay.push(iperf(
            &lab.hosts[0].name,
            &lab.hosts[1].ip.to_string(),
            seconds,
        )?);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (f, u) = (median(&mut fabric), median(&mut underlay));
    report.line("dataplane.container_gbps", f / 1e9, "Gbit/s", "median of 3");
    report.line("dataplane.host_gbps", u / 1e9, "Gbit/s", "median of 3");
    report.line("dataplane.ratio", f / u, "x", "target >= 0.9");
    Ok(())
}

fn restart(report: &mut Report, n: usize) -> Result<()> {
    println!("== agent restart with {n} local endpoints");
    let mut lab = one_host_lab()?;
    let client = Client::new(&lab, 0)?;
    let ns = namespaces(&lab, "r", n)?;
    timed(n, CONCURRENCY, |i| {
        let netns = format!("/run/netns/{}", ns[i]);
        weft_attach(&client, i % CONCURRENCY, format!("r{i}"), netns, vec![])
    })?;
    lab.stop_agent(0, Signal::SIGTERM)?;
    let before = lab.agent_log(0).len();
    let started = Instant::now();
    lab.start_agent(0)?;
    lab.wait_agent(0, Duration::from_secs(60))?;
    let ready = started.elapsed();
    let log = lab.agent_log(0);
    let reconcile_ms: f64 = log[before..]
        .lines()
        .find(|l| l.contains("initial reconciliation done"))
        .and_then(|l| l.split("ms=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    let pid = lab.agent_pid(0).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    let endpoints = lab.status(0)?["endpoint_count"].as_u64().unwrap_or(0);
    if endpoints as usize != n {
        bail!("agent came back with {endpoints} endpoints, expected {n}");
    }
    report.line(
        &format!("restart.n{n}.ready"),
        ready.as_secs_f64() * 1e3,
        "ms",
        "start to API answering; target <= 2000",
    );
    report.line(
        &format!("restart.n{n}.reconcile"),
        reconcile_ms,
        "ms",
        "first full reconciliation",
    );
    report.line(
        &format!("restart.n{n}.rss"),
        rss_kb / 1024.0,
        "MB",
        "target <= 50",
    );
    delete_namespaces(&ns)?;
    Ok(())
}

/// Simulated hosts without a dataplane: the agent's own datastore code (register, claim a
/// block, follow the cluster) in one process, against the lab's etcd.
fn scale(report: &mut Report, hosts: usize) -> Result<()> {
    println!("== control plane: {hosts} simulated hosts join one etcd");
    let lab = Lab::new(LabOptions {
        hosts: 0,
        start_agents: false,
        ..Default::default()
    })?;
    let endpoints = lab.etcd_endpoints();
    let router = lab.router.clone();
    // The simulation runs on a thread inside the lab's router namespace (where etcd listens);
    // its runtime's workers are spawned from there and inherit that namespace.
    let elapsed = std::thread::spawn(move || -> Result<Duration> {
        let ns = std::fs::File::open(format!("/run/netns/{router}"))?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        runtime.block_on(simulate(endpoints, hosts))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("simulation thread panicked"))??;
    report.line(
        &format!("scale.hosts{hosts}.converged"),
        elapsed.as_secs_f64() * 1e3,
        "ms",
        "every host knows every block; target <= 5000",
    );
    Ok(())
}

async fn simulate(endpoints: String, hosts: usize) -> Result<Duration> {
    use weft_etcd::records::PoolRecord;
    let config = weft_etcd::EtcdConfig {
        endpoints: endpoints.split(',').map(String::from).collect(),
        prefix: "/weft/v1".into(),
        timeout: Duration::from_secs(10),
        tls: None,
    };
    let pool = PoolRecord {
        cidr: "10.80.0.0/16".parse()?,
        block_size: 26,
        nat_outgoing: true,
        encapsulation: Default::default(),
    };
    // Hosts share connections in groups of 10, as processes would share nothing but etcd.
    let mut stores = vec![];
    for _ in 0..hosts.div_ceil(10) {
        stores.push(weft_etcd::Datastore::connect(&config).await?);
    }
    stores[0].ensure_pool("default", &pool).await?;
    let started = Instant::now();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<Duration>(hosts);
    let mut tasks = vec![];
    for i in 0..hosts {
        let store = stores[i / 10].clone();
        let pool = pool.clone();
        let done = done_tx.clone();
        tasks.push(tokio::spawn(async move {
            let name = format!("sim{i}");
            let ip = std::net::Ipv4Addr::new(198, 18, (i / 250) as u8, (i % 250) as u8 + 1);
            let record = weft_etcd::records::HostRecord {
                underlay_ip: ip.into(),
                version: "bench".into(),
                first_seen: 0,
                underlay_prefix: Some(24),
                vtep_mac: None,
                tunnel_ip: None,
                underlay_ipv6: None,
            };
            store.register_host(&name, &record).await?;
            store.claim_block("default", &pool, &name).await?;
            let view = std::sync::Mutex::new(weft_etcd::ClusterView::default());
            let reported = std::sync::atomic::AtomicBool::new(false);
            let report_if_complete = |view: &weft_etcd::ClusterView| {
                if view.blocks.len() >= hosts
                    && !reported.swap(true, std::sync::atomic::Ordering::SeqCst)
                {
                    let _ = done.try_send(started.elapsed());
                }
            };
            let finished = async {
                while !reported.load(std::sync::atomic::Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            };
            let follow = async {
                loop {
                    store
                        .follow_cluster(
                            |snapshot| {
                                report_if_complete(&snapshot);
                                *view.lock().unwrap() = snapshot;
                            },
                            |events| {
                                let mut v = view.lock().unwrap();
                                for (event, _) in events {
                                    v.apply(event);
                                }
                                report_if_complete(&v);
                            },
                        )
                        .await?;
                }
            };
            tokio::select! {
                r = follow => r,
                _ = finished => Ok::<(), weft_etcd::StoreError>(()),
            }
        }));
    }
    drop(done_tx);
    let mut last = Duration::ZERO;
    let mut count = 0;
    while count < hosts {
        match tokio::time::timeout(Duration::from_secs(60), done_rx.recv()).await {
            Ok(Some(t)) => {
                last = last.max(t);
                count += 1;
            }
            _ => bail!("only {count} of {hosts} simulated hosts converged"),
        }
    }
    for t in tasks {
        t.abort();
    }
    Ok(last)
}
