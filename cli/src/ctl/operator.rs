//! Operator commands that read and repair etcd directly: remove a host, list hosts, check
//! address management (`ipam` shows pool use and releases leaked addresses).

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;

use serde::Serialize;
use serde_json::json;
use weft_proto::v1 as pb;

use super::output::{print, table};
use super::{EtcdArgs, Failure};
use crate::audit::{self, Fix, KernelView, Snapshot};

fn store_error(e: weft_etcd::StoreError) -> Failure {
    Failure::Other(e.to_string())
}

pub async fn remove_host(json_out: bool, name: &str, etcd: &EtcdArgs) -> Result<(), Failure> {
    if !weft_etcd::names::valid_name(name) {
        return Err(Failure::Other(format!("{name:?} is not a host name")));
    }
    let store = etcd.connect().await?;
    let released = store.remove_host(name).await.map_err(store_error)?;
    print(
        json_out,
        json!({
            "host": name, "blocks": released.blocks, "ips": released.ips,
            "endpoints": released.endpoints, "ports": released.ports,
        }),
        format!(
            "removed host {name}: released {} blocks, {} addresses, {} endpoints, {} ports",
            released.blocks, released.ips, released.endpoints, released.ports
        ),
    );
    Ok(())
}

/// One host as `weftctl hosts` shows it.
#[derive(Debug, Serialize)]
struct HostRow {
    host: String,
    underlay_ip: String,
    version: String,
    alive: bool,
    blocks: Vec<String>,
    endpoints: usize,
}

impl HostRow {
    fn cells(&self) -> Vec<String> {
        let blocks = match self.blocks.is_empty() {
            true => "-".to_string(),
            false => self.blocks.join(","),
        };
        vec![
            self.host.clone(),
            self.underlay_ip.clone(),
            if self.alive { "alive" } else { "DOWN" }.to_string(),
            self.endpoints.to_string(),
            blocks,
        ]
    }
}

pub async fn hosts(json_out: bool, etcd: &EtcdArgs) -> Result<(), Failure> {
    let store = etcd.connect().await?;
    let view = store.snapshot().await.map_err(store_error)?;
    let endpoints = store.list_all_endpoints().await.map_err(store_error)?;
    let rows: Vec<HostRow> = view
        .hosts
        .iter()
        .map(|(name, host)| HostRow {
            host: name.clone(),
            underlay_ip: host.underlay_ip.to_string(),
            version: host.version.clone(),
            alive: view.alive.contains(name),
            blocks: view.blocks_of(name).iter().map(|b| b.to_string()).collect(),
            endpoints: endpoints.iter().filter(|e| &e.host == name).count(),
        })
        .collect();
    let cells: Vec<Vec<String>> = rows.iter().map(HostRow::cells).collect();
    let text = table(
        &["HOST", "UNDERLAY", "STATE", "ENDPOINTS", "BLOCKS"],
        &cells,
    );
    print(json_out, json!(rows), text);
    Ok(())
}

pub async fn ipam_check(
    json_out: bool,
    socket: &Path,
    etcd: &EtcdArgs,
    apply: bool,
) -> Result<(), Failure> {
    let store = etcd.connect().await?;
    let view = store.snapshot().await.map_err(store_error)?;
    let snapshot = Snapshot {
        pools: store.list_pools().await.map_err(store_error)?,
        hosts: view.hosts.keys().cloned().collect(),
        tunnels: view
            .hosts
            .iter()
            .filter_map(|(name, h)| Some((name.clone(), h.tunnel_ip?)))
            .collect(),
        blocks: view.blocks.clone(),
        endpoints: store.list_all_endpoints().await.map_err(store_error)?,
        ips: store.list_ips().await.map_err(store_error)?,
        ports: store.list_ports().await.map_err(store_error)?,
        kernel: kernel_view(socket).await,
    };
    let problems = audit::check(&snapshot, store.keys());
    let fixed = match apply {
        true => apply_fixes(&store, &problems).await?,
        false => 0,
    };
    let describe = |fix: &Fix| match fix {
        Fix::DeleteKey(key) => format!("weftctl ipam check --fix (deletes {key})"),
        Fix::CreateKey(key, _) => format!("weftctl ipam check --fix (recreates {key})"),
        Fix::Manual(text) => text.clone(),
    };
    let json_value = json!({
        "problems": problems.iter().map(|p| json!({"problem": p.what, "fix": describe(&p.fix)}))
            .collect::<Vec<_>>(),
        "fixed": fixed,
        "kernel_checked": snapshot.kernel.is_some(),
    });
    let mut text = String::new();
    if problems.is_empty() {
        text.push_str("ok: endpoints, addresses, ports and blocks agree");
        if snapshot.kernel.is_some() {
            text.push_str(", and this host's kernel matches");
        }
    }
    for p in &problems {
        text.push_str(&format!(
            "PROBLEM {}\n  fix: {}\n",
            p.what,
            describe(&p.fix)
        ));
    }
    if apply {
        text.push_str(&format!("fixed {fixed} of {}", problems.len()));
    }
    print(json_out, json_value, text.trim_end().to_string());
    match problems.len() > fixed {
        true => Err(Failure::Quiet(ExitCode::FAILURE)),
        false => Ok(()),
    }
}

/// Applies the safe fixes, each guarded by the revision the check read.
async fn apply_fixes(
    store: &weft_etcd::Datastore,
    problems: &[audit::Problem],
) -> Result<usize, Failure> {
    let revisions: HashMap<String, i64> = store
        .revisions()
        .await
        .map_err(store_error)?
        .into_iter()
        .collect();
    let mut fixed = 0;
    for problem in problems {
        let done = match &problem.fix {
            Fix::DeleteKey(key) => match revisions.get(key) {
                Some(rev) => store
                    .delete_if_unchanged(key, *rev)
                    .await
                    .map_err(store_error)?,
                None => false,
            },
            Fix::CreateKey(key, value) => store.create(key, value).await.map_err(store_error)?,
            Fix::Manual(_) => false,
        };
        fixed += done as usize;
    }
    Ok(fixed)
}

/// This host's kernel as its agent reports it, when the agent is reachable.
async fn kernel_view(socket: &Path) -> Option<KernelView> {
    let mut client = crate::client::connect(socket).await.ok()?;
    let inventory = client
        .inventory(pb::InventoryRequest {})
        .await
        .ok()?
        .into_inner();
    Some(KernelView {
        host: inventory.host,
        links: inventory.links.into_iter().collect(),
        routes: inventory
            .host_routes
            .iter()
            .filter_map(|r| r.parse().ok())
            .collect(),
        namespaces: inventory.namespaces.into_iter().collect(),
    })
}
