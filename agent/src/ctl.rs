//! `weftctl`: a thin client of the agent's API (and, for cluster-wide operations such as
//! removing a host, of etcd directly).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tonic::transport::{Channel, Endpoint, Uri};
use weft_proto::v1 as pb;
use weft_proto::v1::agent_client::AgentClient;

#[derive(Debug, Parser)]
#[command(name = "weftctl", version, about = "Control a weft agent")]
pub struct Cli {
    /// The agent's API socket.
    #[arg(
        long,
        env = "WEFT_SOCKET",
        default_value = "/run/weft/agent.sock",
        global = true
    )]
    pub socket: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Wire a container into the fabric.
    Attach {
        container_id: String,
        /// Network namespace path (/var/run/netns/x, /proc/PID/ns/net).
        #[arg(long, conflicts_with = "pid")]
        netns: Option<String>,
        /// Use the network namespace of this process.
        #[arg(long)]
        pid: Option<u32>,
        /// Interface name inside the container.
        #[arg(long, default_value = "eth0")]
        ifname: String,
        /// Publish a port: HOSTPORT:PORT[/udp].
        #[arg(short = 'p', long = "publish")]
        publish: Vec<String>,
    },
    /// Remove a container from the fabric.
    Detach { container_id: String },
    /// Show one endpoint.
    Get { container_id: String },
    /// Verify one endpoint's dataplane (host and container side, port rules) without repairing
    /// it; exits 1 if anything is wrong. `weftctl attach` with the same id repairs.
    Check { container_id: String },
    /// List this host's endpoints.
    Ls,
    /// Show the host, its blocks and its peers.
    Status,
    /// Cluster-wide host operations (talk to etcd directly).
    Host {
        #[command(subcommand)]
        command: HostCommand,
    },
    /// Every host of the cluster: underlay IP, blocks, alive or down, endpoints (from etcd).
    Hosts {
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Address management (from etcd).
    Ipam {
        #[command(subcommand)]
        command: IpamCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Remove a host for good: release its blocks, addresses and endpoint records; every peer
    /// drops its routes. Stop the host's agent first.
    Remove {
        name: String,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum IpamCommand {
    /// Pool use: blocks per host, used and free addresses.
    Show {
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Check endpoint, address, port and block records against each other (and this host's
    /// kernel when its agent is reachable); exits 1 on a problem and names the fix.
    Check {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Apply the safe fixes: delete leaked guard keys, recreate missing ones.
        #[arg(long)]
        fix: bool,
    },
}

/// How weftctl reaches etcd for cluster-wide commands.
#[derive(Debug, clap::Args)]
pub struct EtcdArgs {
    #[arg(
        long,
        env = "WEFT_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: String,
    #[arg(long, env = "WEFT_ETCD_PREFIX", default_value = "/weft/v1")]
    pub etcd_prefix: String,
    #[arg(long, env = "WEFT_ETCD_CACERT")]
    pub etcd_cacert: Option<String>,
    #[arg(long, env = "WEFT_ETCD_CERT")]
    pub etcd_cert: Option<String>,
    #[arg(long, env = "WEFT_ETCD_KEY")]
    pub etcd_key: Option<String>,
}

impl EtcdArgs {
    async fn connect(&self) -> Result<weft_etcd::Datastore, String> {
        let tls =
            (self.etcd_cacert.is_some() || self.etcd_cert.is_some() || self.etcd_key.is_some())
                .then(|| weft_etcd::TlsFiles {
                    ca: self.etcd_cacert.clone(),
                    cert: self.etcd_cert.clone(),
                    key: self.etcd_key.clone(),
                });
        weft_etcd::Datastore::connect(&weft_etcd::EtcdConfig {
            endpoints: self
                .etcd_endpoints
                .split(',')
                .map(|s| s.trim().to_string())
                .collect(),
            prefix: self.etcd_prefix.clone(),
            timeout: std::time::Duration::from_secs(5),
            tls,
        })
        .await
        .map_err(|e| e.to_string())
    }
}

/// Parses `HOSTPORT:PORT[/proto]`.
pub fn parse_publish(text: &str) -> Result<pb::PortMapping, String> {
    let (ports, protocol) = text.split_once('/').unwrap_or((text, "tcp"));
    let (host, container) = ports
        .split_once(':')
        .ok_or_else(|| format!("{text:?}: expected HOSTPORT:PORT[/udp]"))?;
    let number = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| format!("{text:?}: {s:?} is not a port number"))
    };
    Ok(pb::PortMapping {
        protocol: protocol.to_string(),
        host_port: number(host)?,
        container_port: number(container)?,
    })
}

/// Connects to the agent's Unix socket.
pub async fn connect(socket: &Path) -> Result<AgentClient<Channel>, String> {
    let path = socket.to_path_buf();
    // The URI is required by the API but unused: every connection goes to the socket.
    let channel = Endpoint::try_from("http://localhost")
        .map_err(|e| e.to_string())?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .map_err(|e| format!("cannot reach the agent at {}: {e}", socket.display()))?;
    Ok(AgentClient::new(channel))
}

/// The one place a failure becomes an exit code.
fn exit_code(status: &tonic::Status) -> ExitCode {
    use tonic::Code;
    ExitCode::from(match status.code() {
        Code::InvalidArgument => 2,
        Code::NotFound => 3,
        Code::AlreadyExists => 4,
        Code::ResourceExhausted => 5,
        Code::Unavailable => 6,
        _ => 1,
    })
}

fn endpoint_json(e: &pb::Endpoint) -> serde_json::Value {
    json!({
        "container_id": e.container_id,
        "host": e.host,
        "ip": e.ip,
        "gateway": e.gateway,
        "mac": e.mac,
        "host_ifname": e.host_ifname,
        "ifname": e.ifname,
        "netns": e.netns,
        "ports": e.ports.iter().map(|p| json!({
            "protocol": p.protocol, "host_port": p.host_port, "container_port": p.container_port,
        })).collect::<Vec<_>>(),
    })
}

fn ports_text(ports: &[pb::PortMapping]) -> String {
    if ports.is_empty() {
        return "-".into();
    }
    ports
        .iter()
        .map(|p| format!("{}:{}/{}", p.host_port, p.container_port, p.protocol))
        .collect::<Vec<_>>()
        .join(",")
}

/// Renders rows as a table with aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn endpoint_rows(endpoints: &[pb::Endpoint]) -> String {
    let rows: Vec<Vec<String>> = endpoints
        .iter()
        .map(|e| {
            vec![
                e.container_id.clone(),
                e.ip.clone(),
                e.host_ifname.clone(),
                e.mac.clone(),
                ports_text(&e.ports),
                e.netns.clone(),
            ]
        })
        .collect();
    table(&["CONTAINER", "IP", "VETH", "MAC", "PORTS", "NETNS"], &rows)
}

fn status_text(s: &pb::StatusResponse) -> String {
    let mut out = format!(
        "host:      {}\nunderlay:  {} ({})\nversion:   {}\netcd:      {}\nendpoints: {}\nroutes:    {}\n",
        s.host,
        s.underlay_ip,
        s.underlay_interface,
        s.version,
        if s.etcd_connected { "connected" } else { "UNREACHABLE" },
        s.endpoint_count,
        s.route_count,
    );
    for pool in &s.pools {
        out.push_str(&format!(
            "pool:      {} {} (/{} blocks, nat-outgoing {})\n",
            pool.name,
            pool.cidr,
            pool.block_size,
            if pool.nat_outgoing { "on" } else { "off" }
        ));
    }
    let blocks = if s.local_blocks.is_empty() {
        "-".to_string()
    } else {
        s.local_blocks.join(", ")
    };
    out.push_str(&format!("blocks:    {blocks}\n\n"));
    let rows: Vec<Vec<String>> = s
        .peers
        .iter()
        .map(|p| {
            vec![
                p.host.clone(),
                p.underlay_ip.clone(),
                if p.alive { "alive" } else { "DOWN" }.to_string(),
                if p.blocks.is_empty() {
                    "-".to_string()
                } else {
                    p.blocks.join(",")
                },
            ]
        })
        .collect();
    out.push_str(&table(&["PEER", "UNDERLAY", "STATE", "BLOCKS"], &rows));
    out
}

fn status_json(s: &pb::StatusResponse) -> serde_json::Value {
    json!({
        "host": s.host,
        "underlay_ip": s.underlay_ip,
        "underlay_interface": s.underlay_interface,
        "version": s.version,
        "etcd_connected": s.etcd_connected,
        "endpoint_count": s.endpoint_count,
        "route_count": s.route_count,
        "rule_count": s.rule_count,
        "pools": s.pools.iter().map(|p| json!({
            "name": p.name, "cidr": p.cidr, "block_size": p.block_size,
            "nat_outgoing": p.nat_outgoing,
        })).collect::<Vec<_>>(),
        "local_blocks": s.local_blocks,
        "peers": s.peers.iter().map(|p| json!({
            "host": p.host, "underlay_ip": p.underlay_ip, "blocks": p.blocks, "alive": p.alive,
        })).collect::<Vec<_>>(),
    })
}

fn print(json: bool, value: serde_json::Value, text: String) {
    if json {
        println!("{value:#}");
    } else {
        println!("{text}");
    }
}

/// Runs one weftctl command; returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    match execute(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Status(status)) => {
            eprintln!("weftctl: {}", status.message());
            exit_code(&status)
        }
        Err(Failure::Other(message)) => {
            eprintln!("weftctl: {message}");
            ExitCode::FAILURE
        }
        Err(Failure::Quiet(code)) => code,
    }
}

enum Failure {
    Status(tonic::Status),
    Other(String),
    /// Already reported on stdout; only the exit code is left.
    Quiet(ExitCode),
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        Failure::Status(status)
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::Other(message)
    }
}

async fn execute(cli: Cli) -> Result<(), Failure> {
    match &cli.command {
        Command::Host {
            command: HostCommand::Remove { name, etcd },
        } => return remove_host(cli.json, name, etcd).await,
        Command::Hosts { etcd } => return hosts(cli.json, etcd).await,
        Command::Ipam {
            command: IpamCommand::Show { etcd },
        } => return ipam_show(cli.json, etcd).await,
        Command::Ipam {
            command: IpamCommand::Check { etcd, fix },
        } => return ipam_check(cli.json, &cli.socket, etcd, *fix).await,
        _ => {}
    }
    let mut client = connect(&cli.socket).await?;
    match cli.command {
        Command::Attach {
            container_id,
            netns,
            pid,
            ifname,
            publish,
        } => {
            let ports = publish
                .iter()
                .map(|p| parse_publish(p))
                .collect::<Result<Vec<_>, _>>()?;
            let response = client
                .attach(pb::AttachRequest {
                    container_id,
                    netns: netns.unwrap_or_default(),
                    pid,
                    ifname,
                    ports,
                })
                .await?
                .into_inner();
            let endpoint = response
                .endpoint
                .ok_or_else(|| "agent returned no endpoint".to_string())?;
            print(
                cli.json,
                endpoint_json(&endpoint),
                endpoint_rows(std::slice::from_ref(&endpoint)),
            );
        }
        Command::Detach { container_id } => {
            client
                .detach(pb::DetachRequest {
                    container_id: container_id.clone(),
                })
                .await?;
            print(
                cli.json,
                json!({ "detached": container_id }),
                format!("detached {container_id}"),
            );
        }
        Command::Get { container_id } => {
            let endpoint = client
                .get(pb::GetRequest { container_id })
                .await?
                .into_inner();
            print(
                cli.json,
                endpoint_json(&endpoint),
                endpoint_rows(std::slice::from_ref(&endpoint)),
            );
        }
        Command::Check { container_id } => {
            let checked = client
                .check(pb::CheckRequest { container_id })
                .await?
                .into_inner();
            let endpoint = checked.endpoint.unwrap_or_default();
            let text = if checked.problems.is_empty() {
                format!("ok: the dataplane of {} is intact", endpoint.container_id)
            } else {
                let mut text: String = checked
                    .problems
                    .iter()
                    .map(|p| format!("PROBLEM {p}\n"))
                    .collect();
                text.push_str(&format!(
                    "  fix: weftctl attach {} (attaching an attached container repairs it)",
                    endpoint.container_id
                ));
                text
            };
            print(
                cli.json,
                json!({"endpoint": endpoint_json(&endpoint), "problems": checked.problems}),
                text,
            );
            if !checked.problems.is_empty() {
                return Err(Failure::Quiet(ExitCode::FAILURE));
            }
        }
        Command::Ls => {
            let list = client.list(pb::ListRequest {}).await?.into_inner();
            print(
                cli.json,
                json!(list.endpoints.iter().map(endpoint_json).collect::<Vec<_>>()),
                endpoint_rows(&list.endpoints),
            );
        }
        Command::Status => {
            let status = client.status(pb::StatusRequest {}).await?.into_inner();
            print(cli.json, status_json(&status), status_text(&status));
        }
        Command::Host { .. } | Command::Hosts { .. } | Command::Ipam { .. } => {
            unreachable!("handled above")
        }
    }
    Ok(())
}

async fn remove_host(json_out: bool, name: &str, etcd: &EtcdArgs) -> Result<(), Failure> {
    crate::validate::host_name(name)?;
    let store = etcd.connect().await?;
    let released = store.remove_host(name).await.map_err(|e| e.to_string())?;
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

async fn hosts(json_out: bool, etcd: &EtcdArgs) -> Result<(), Failure> {
    let store = etcd.connect().await?;
    let view = store.snapshot().await.map_err(|e| e.to_string())?;
    let endpoints = store
        .list_all_endpoints()
        .await
        .map_err(|e| e.to_string())?;
    let count = |host: &str| endpoints.iter().filter(|e| e.host == host).count();
    let rows: Vec<serde_json::Value> = view
        .hosts
        .iter()
        .map(|(name, host)| {
            json!({
                "host": name,
                "underlay_ip": host.underlay_ip.to_string(),
                "version": host.version,
                "alive": view.alive.contains(name),
                "blocks": view.blocks_of(name).iter().map(|b| b.to_string()).collect::<Vec<_>>(),
                "endpoints": count(name),
            })
        })
        .collect();
    let text = table(
        &["HOST", "UNDERLAY", "STATE", "ENDPOINTS", "BLOCKS"],
        &rows
            .iter()
            .map(|r| {
                vec![
                    r["host"].as_str().unwrap_or("").to_string(),
                    r["underlay_ip"].as_str().unwrap_or("").to_string(),
                    if r["alive"] == true { "alive" } else { "DOWN" }.to_string(),
                    r["endpoints"].to_string(),
                    r["blocks"]
                        .as_array()
                        .map(|b| {
                            b.iter()
                                .filter_map(|v| v.as_str())
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect::<Vec<_>>(),
    );
    print(json_out, json!(rows), text);
    Ok(())
}

async fn ipam_show(json_out: bool, etcd: &EtcdArgs) -> Result<(), Failure> {
    let store = etcd.connect().await?;
    let pools = store.list_pools().await.map_err(|e| e.to_string())?;
    let view = store.snapshot().await.map_err(|e| e.to_string())?;
    let ips = store.list_ips().await.map_err(|e| e.to_string())?;
    let mut out = vec![];
    let mut text = String::new();
    for (name, pool) in &pools {
        let size = 1u64 << (32 - pool.cidr.prefix());
        let block_capacity = 1u64 << (32 - pool.block_size);
        let blocks: Vec<_> = view
            .blocks
            .iter()
            .filter(|(_, o)| &o.pool == name)
            .collect();
        let used = ips.iter().filter(|(ip, _)| pool.cidr.contains(*ip)).count() as u64;
        let mut per_host: std::collections::BTreeMap<&str, (usize, u64)> = Default::default();
        for (block, owner) in &blocks {
            let entry = per_host.entry(owner.host.as_str()).or_default();
            entry.0 += 1;
            entry.1 += ips.iter().filter(|(ip, _)| block.contains(*ip)).count() as u64;
        }
        let claimed = blocks.len() as u64 * block_capacity;
        let total_blocks = size / block_capacity;
        out.push(json!({
            "pool": name, "cidr": pool.cidr.to_string(), "block_size": pool.block_size,
            "nat_outgoing": pool.nat_outgoing, "addresses": size, "used": used,
            "free": size - used, "free_in_claimed_blocks": claimed - used.min(claimed),
            "blocks_claimed": blocks.len(), "blocks_total": total_blocks,
            "hosts": per_host.iter().map(|(h, (b, u))| json!({"host": h, "blocks": b, "used": u}))
                .collect::<Vec<_>>(),
        }));
        text.push_str(&format!(
            "pool {name} {}: {used} of {size} addresses used, {} free; {} of {total_blocks} /{} blocks claimed ({} free addresses in them)\n",
            pool.cidr,
            size - used,
            blocks.len(),
            pool.block_size,
            claimed - used.min(claimed),
        ));
        let rows: Vec<Vec<String>> = per_host
            .iter()
            .map(|(h, (b, u))| vec![h.to_string(), b.to_string(), u.to_string()])
            .collect();
        text.push_str(&table(&["HOST", "BLOCKS", "USED"], &rows));
        text.push('\n');
    }
    print(json_out, json!(out), text.trim_end().to_string());
    Ok(())
}

async fn ipam_check(
    json_out: bool,
    socket: &Path,
    etcd: &EtcdArgs,
    apply: bool,
) -> Result<(), Failure> {
    use crate::audit::{check, Fix, KernelView, Snapshot};
    let store = etcd.connect().await?;
    let err = |e: weft_etcd::StoreError| Failure::Other(e.to_string());
    let view = store.snapshot().await.map_err(err)?;
    let kernel = kernel_view(socket).await;
    let snapshot = Snapshot {
        pools: store.list_pools().await.map_err(err)?,
        hosts: view.hosts.keys().cloned().collect(),
        blocks: view.blocks.clone(),
        endpoints: store.list_all_endpoints().await.map_err(err)?,
        ips: store.list_ips().await.map_err(err)?,
        ports: store.list_ports().await.map_err(err)?,
        kernel: kernel.map(|(host, links, routes)| KernelView {
            host,
            links,
            routes,
        }),
    };
    let problems = check(&snapshot, store.keys());
    let mut fixed = 0;
    if apply {
        let revisions: std::collections::HashMap<String, i64> = store
            .revisions(&format!("{}/", store.keys().prefix()))
            .await
            .map_err(err)?
            .into_iter()
            .collect();
        for problem in &problems {
            let done = match &problem.fix {
                Fix::DeleteKey(key) => match revisions.get(key) {
                    Some(rev) => store.delete_if_unchanged(key, *rev).await.map_err(err)?,
                    None => false,
                },
                Fix::CreateKey(key, value) => store.create(key, value).await.map_err(err)?,
                Fix::Manual(_) => false,
            };
            fixed += done as usize;
        }
    }
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
    if problems.len() > fixed {
        return Err(Failure::Quiet(ExitCode::FAILURE));
    }
    Ok(())
}

/// This host's name (from its agent) and its `weft*` links and /32 routes, when the agent is
/// reachable and this process runs in the host's network namespace.
async fn kernel_view(
    socket: &Path,
) -> Option<(
    String,
    std::collections::HashSet<String>,
    std::collections::HashSet<std::net::Ipv4Addr>,
)> {
    let mut client = connect(socket).await.ok()?;
    let status = client.status(pb::StatusRequest {}).await.ok()?.into_inner();
    let dataplane = crate::dataplane::Dataplane::observer().ok()?;
    let links = dataplane.weft_links().await.ok()?.into_keys().collect();
    let routes = dataplane
        .weft_routes()
        .await
        .ok()?
        .into_iter()
        .filter(|r| r.dst.prefix() == 32)
        .map(|r| r.dst.ip())
        .collect();
    Some((status.host, links, routes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_syntax() {
        let p = parse_publish("8080:80").unwrap();
        assert_eq!(
            (p.protocol.as_str(), p.host_port, p.container_port),
            ("tcp", 8080, 80)
        );
        let p = parse_publish("5353:53/udp").unwrap();
        assert_eq!(
            (p.protocol.as_str(), p.host_port, p.container_port),
            ("udp", 5353, 53)
        );
        assert!(parse_publish("8080").is_err());
        assert!(parse_publish("x:80").is_err());
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "BB"], &[vec!["long".into(), "x".into()]]);
        assert_eq!(t, "A     BB\nlong  x");
    }
}
