//! Driving weft from plain threads: a blocking gRPC client, the namespaces a runtime would make
//! beforehand, and the one-host lab most cases start from.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use anyhow::Result;
use tonic::transport::Channel;
use weft_proto::v1 as pb;
use weft_proto::v1::agent_client::AgentClient;

use crate::{sh, Lab, LabOptions};

type Call<T> = Pin<Box<dyn Future<Output = Result<T, tonic::Status>> + Send>>;

/// A blocking gRPC client usable from plain threads.
pub struct Client {
    runtime: tokio::runtime::Runtime,
    socket: std::path::PathBuf,
    clients: Vec<Mutex<Option<AgentClient<Channel>>>>,
}

impl Client {
    pub fn new(lab: &Lab, host: usize) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        Ok(Self {
            runtime,
            socket: lab.hosts[host].socket.clone(),
            clients: (0..64).map(|_| Mutex::new(None)).collect(),
        })
    }

    /// One connection per calling slot, like independent runtime clients.
    pub fn call<T>(
        &self,
        slot: usize,
        f: impl FnOnce(AgentClient<Channel>) -> Call<T>,
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

    /// One Attach through connection `slot`; the endpoint the agent answered with.
    pub fn attach(
        &self,
        slot: usize,
        id: String,
        netns: String,
        ports: Vec<pb::PortMapping>,
    ) -> Result<pb::Endpoint> {
        self.call(slot, move |mut c| {
            Box::pin(async move {
                let response = c
                    .attach(pb::AttachRequest {
                        container_id: id,
                        netns,
                        ports,
                        ..Default::default()
                    })
                    .await?;
                response
                    .into_inner()
                    .endpoint
                    .ok_or_else(|| tonic::Status::internal("an Attach answer without endpoint"))
            })
        })
    }

    /// One Detach through connection `slot`.
    pub fn detach(&self, slot: usize, id: String) -> Result<()> {
        self.call(slot, move |mut c| {
            Box::pin(async move {
                c.detach(pb::DetachRequest { container_id: id })
                    .await
                    .map(|_| ())
            })
        })
    }

    /// Every endpoint the agent holds.
    pub fn list(&self) -> Result<Vec<pb::Endpoint>> {
        self.call(0, |mut c| {
            Box::pin(async move {
                let response = c.list(pb::ListRequest {}).await?;
                Ok(response.into_inner().endpoints)
            })
        })
    }
}

/// Pre-creates `n` namespaces (the runtime's job, not timed) named `<prefix>-<tag><i>`.
pub fn namespaces(lab: &Lab, tag: &str, n: usize) -> Result<Vec<String>> {
    let names: Vec<String> = (0..n).map(|i| format!("{}-{tag}{i}", lab.prefix)).collect();
    let batch: Vec<String> = names.iter().map(|n| format!("netns add {n}")).collect();
    sh::ip_batch("", &batch)?;
    Ok(names)
}

pub fn delete_namespaces(names: &[String]) -> Result<()> {
    let batch: Vec<String> = names.iter().map(|n| format!("netns del {n}")).collect();
    sh::ip_batch("", &batch)
}

/// One host, its agent resyncing rarely so that periodic passes stay out of the timings.
pub fn one_host_lab() -> Result<Lab> {
    one_host_lab_with(false)
}

/// [`one_host_lab`], dual-stack when `ipv6` (pools `lab::POOL` and `lab::POOL_V6`).
pub fn one_host_lab_with(ipv6: bool) -> Result<Lab> {
    Lab::new(LabOptions {
        hosts: 1,
        agent_args: vec!["--resync-interval".into(), "30s".into()],
        ipv6,
        ..Default::default()
    })
}

/// Parses `[2026-11-25T10:59:49.382332]` or `2026-11-25T10:59:49.382332Z` into seconds of day.
pub fn seconds_of_day(stamp: &str) -> Option<f64> {
    let t = stamp.split('T').nth(1)?;
    let t = t.trim_end_matches(['Z', ']']);
    let mut parts = t.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// The resident set of a process, in MB.
pub fn rss_mb(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    Ok(kb / 1024.0)
}
