//! `weftctl`: a thin client of the agent's API, and of etcd directly for cluster-wide operator
//! commands (removing a host, listing hosts, address management).

mod etcd;
pub mod graph;
mod ipam;
mod operator;
pub mod output;
pub mod policy;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::json;
use tonic::transport::Channel;
use weft_proto::v1 as pb;
use weft_proto::v1::agent_client::AgentClient;

pub use etcd::EtcdArgs;
use output::{endpoint_json, endpoint_rows, print, status_json, status_text};

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
        /// A label network policy selects by: KEY=VALUE (repeatable). Attaching again with
        /// other labels replaces them.
        #[arg(short = 'l', long = "label")]
        label: Vec<String>,
        /// Ask for this address (repeatable: one per family); it must lie in a pool, in a
        /// block of this host or of no host. A family not asked for gets any free address.
        #[arg(long = "ip")]
        ips: Vec<String>,
        /// Allocate from this pool (repeatable: tried in order); default: the host's default
        /// pools.
        #[arg(long = "pool")]
        pools: Vec<String>,
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
    /// The fabric as a picture: hosts with underlay address and state, their blocks, the links
    /// between peers, optionally endpoints (from etcd). SVG needs Graphviz's dot.
    Graph {
        /// dot (Graphviz source) or svg (rendered by Graphviz's dot).
        #[arg(long, value_enum, default_value = "dot")]
        format: graph::GraphFormat,
        /// Show every host's endpoints under the block their address comes from.
        #[arg(long)]
        endpoints: bool,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Address management (from etcd).
    Ipam {
        #[command(subcommand)]
        command: IpamCommand,
    },
    /// Network policies (in etcd): apply, ls, get, delete.
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
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
    /// Pool use: per host its blocks, used and free addresses, and the empty blocks its agent
    /// gives back after --block-release-after (all but the last block a host holds).
    Show {
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Free a leaked address record (ips/<ADDR>) once no endpoint and no host's tunnel holds
    /// the address.
    Release {
        ip: std::net::IpAddr,
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

/// The one place a failure becomes an exit code.
fn exit_code(status: &tonic::Status) -> ExitCode {
    use tonic::Code;
    ExitCode::from(match status.code() {
        Code::InvalidArgument => 2,
        Code::NotFound => 3,
        Code::AlreadyExists => 4,
        Code::ResourceExhausted => 5,
        Code::Unavailable => 6,
        Code::FailedPrecondition => 7,
        _ => 1,
    })
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

pub(crate) enum Failure {
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
    let json = cli.json;
    match cli.command {
        Command::Host {
            command: HostCommand::Remove { name, etcd },
        } => operator::remove_host(json, &name, &etcd).await,
        Command::Hosts { etcd } => operator::hosts(json, &etcd).await,
        Command::Graph {
            format,
            endpoints,
            etcd,
        } => graph::graph(json, format, endpoints, &etcd).await,
        Command::Ipam {
            command: IpamCommand::Show { etcd },
        } => ipam::show(json, &etcd).await,
        Command::Ipam {
            command: IpamCommand::Release { ip, etcd },
        } => ipam::release(json, ip, &etcd).await,
        Command::Ipam {
            command: IpamCommand::Check { etcd, fix },
        } => operator::ipam_check(json, &cli.socket, &etcd, fix).await,
        Command::Policy { command } => policy::run(json, command).await,
        command => {
            let client = crate::client::connect(&cli.socket).await?;
            agent_command(client, json, command).await
        }
    }
}

/// The commands served by the local agent.
async fn agent_command(
    mut client: AgentClient<Channel>,
    json: bool,
    command: Command,
) -> Result<(), Failure> {
    match command {
        Command::Attach {
            container_id,
            netns,
            pid,
            ifname,
            publish,
            label,
            ips,
            pools,
        } => {
            let ports = publish
                .iter()
                .map(|p| parse_publish(p))
                .collect::<Result<Vec<_>, _>>()?;
            let labels = label
                .iter()
                .map(|l| weft_etcd::policy::parse_label(l).map_err(|e| e.to_string()))
                .collect::<Result<_, _>>()?;
            let request = pb::AttachRequest {
                container_id,
                netns: netns.unwrap_or_default(),
                pid,
                ifname,
                ports,
                labels,
                ips,
                pools,
            };
            let endpoint = client
                .attach(request)
                .await?
                .into_inner()
                .endpoint
                .ok_or_else(|| "agent returned no endpoint".to_string())?;
            show_endpoint(json, &endpoint);
        }
        Command::Detach { container_id } => {
            let request = pb::DetachRequest {
                container_id: container_id.clone(),
            };
            client.detach(request).await?;
            let text = format!("detached {container_id}");
            print(json, json!({ "detached": container_id }), text);
        }
        Command::Get { container_id } => {
            let endpoint = client.get(pb::GetRequest { container_id }).await?;
            show_endpoint(json, &endpoint.into_inner());
        }
        Command::Check { container_id } => return check(client, json, container_id).await,
        Command::Ls => {
            let list = client.list(pb::ListRequest {}).await?.into_inner();
            let value = json!(list.endpoints.iter().map(endpoint_json).collect::<Vec<_>>());
            print(json, value, endpoint_rows(&list.endpoints));
        }
        Command::Status => {
            let status = client.status(pb::StatusRequest {}).await?.into_inner();
            print(json, status_json(&status), status_text(&status));
        }
        Command::Host { .. }
        | Command::Hosts { .. }
        | Command::Graph { .. }
        | Command::Ipam { .. }
        | Command::Policy { .. } => {
            unreachable!("operator commands are dispatched before connecting")
        }
    }
    Ok(())
}

fn show_endpoint(json: bool, endpoint: &pb::Endpoint) {
    print(
        json,
        endpoint_json(endpoint),
        endpoint_rows(std::slice::from_ref(endpoint)),
    );
}

async fn check(
    mut client: AgentClient<Channel>,
    json: bool,
    container_id: String,
) -> Result<(), Failure> {
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
        json,
        json!({"endpoint": endpoint_json(&endpoint), "problems": checked.problems}),
        text,
    );
    match checked.problems.is_empty() {
        true => Ok(()),
        false => Err(Failure::Quiet(ExitCode::FAILURE)),
    }
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
}
