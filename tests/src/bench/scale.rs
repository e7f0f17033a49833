//! Control-plane scale: simulated hosts without a dataplane, each running the agent's own
//! datastore code (register, claim a block, follow the cluster) in one process against the
//! lab's etcd, timed until every host knows every block.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use weft_etcd::records::PoolRecord;

use super::{Options, Report};
use crate::{Lab, LabOptions};

pub fn run(report: &mut Report, options: &Options) -> Result<()> {
    scale(report, options.size(100, 500))
}

fn scale(report: &mut Report, hosts: usize) -> Result<()> {
    println!("== control plane: {hosts} simulated hosts join one etcd");
    let lab = Lab::new(LabOptions {
        hosts: 0,
        start_agents: false,
        ..Default::default()
    })?;
    let endpoints = lab.etcd_endpoints();
    let elapsed = in_namespace(&lab.router, move || async move {
        simulate(endpoints, hosts).await
    })?;
    report.line(
        &format!("scale.hosts{hosts}.converged"),
        elapsed.as_secs_f64() * 1e3,
        "ms",
        "every host knows every block; target <= 5000",
    );
    Ok(())
}

/// Runs `job` on a multi-threaded runtime whose threads live in network namespace `ns` (where
/// the lab's etcd listens): it is built on a thread that entered `ns`, and its workers, spawned
/// from there, inherit it.
pub fn in_namespace<F, Fut, T>(ns: &str, job: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>>,
    T: Send + 'static,
{
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> Result<T> {
        let ns = std::fs::File::open(path)?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        runtime.block_on(job())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("simulation thread panicked"))?
}

/// An etcd client configuration for the lab's etcd.
pub fn etcd_config(endpoints: &str) -> weft_etcd::EtcdConfig {
    weft_etcd::EtcdConfig {
        endpoints: endpoints.split(',').map(String::from).collect(),
        prefix: "/weft/v1".into(),
        timeout: Duration::from_secs(10),
        tls: None,
    }
}

/// Simulated host `i`'s registration (underlay addresses from 198.18.0.0/16, never the lab's).
pub fn host_record(i: usize) -> weft_etcd::records::HostRecord {
    let ip = std::net::Ipv4Addr::new(198, 18, (i / 250) as u8, (i % 250) as u8 + 1);
    weft_etcd::records::HostRecord {
        underlay_ip: ip.into(),
        version: "bench".into(),
        first_seen: 0,
        underlay_prefix: Some(24),
        vtep_mac: None,
        tunnel_ip: None,
        underlay_ipv6: None,
    }
}

async fn simulate(endpoints: String, hosts: usize) -> Result<Duration> {
    let config = etcd_config(&endpoints);
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
            store.register_host(&name, &host_record(i)).await?;
            store.claim_block("default", &pool, &name).await?;
            let view = Mutex::new(weft_etcd::ClusterView::default());
            let reported = AtomicBool::new(false);
            let report_if_complete = |view: &weft_etcd::ClusterView| {
                if view.blocks.len() >= hosts && !reported.swap(true, Ordering::SeqCst) {
                    let _ = done.try_send(started.elapsed());
                }
            };
            let finished = async {
                while !reported.load(Ordering::SeqCst) {
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
