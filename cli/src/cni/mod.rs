//! `weft-cni`: a CNI plugin (spec 1.0.0 and 1.1.0) that hands every operation to the local weft
//! agent over gRPC. `spec` holds the CNI side (configuration, codes, results); this module
//! runs the commands.

pub mod spec;

use std::path::PathBuf;

use serde_json::{json, Value};
use tonic::transport::Channel;
use weft_proto::v1 as pb;
use weft_proto::v1::agent_client::AgentClient;

use spec::{add_result, network_prefix, require};
pub use spec::{code, weft_id, CniError, Env, NetConf, SUPPORTED};

const DEFAULT_SOCKET: &str = "/run/weft/agent.sock";

/// Runs one CNI command; returns what to print on stdout (nothing for DEL, GC, STATUS).
pub async fn run(env: &Env, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    if env.command == "VERSION" {
        // The answer speaks the caller's version when it is one we know.
        let asked = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| v["cniVersion"].as_str().map(String::from))
            .filter(|v| SUPPORTED.contains(&v.as_str()))
            .unwrap_or_else(|| "1.1.0".into());
        return Ok(Some(
            json!({"cniVersion": asked, "supportedVersions": SUPPORTED}),
        ));
    }
    let conf: NetConf = serde_json::from_slice(stdin)
        .map_err(|e| CniError::new(code::DECODE, format!("network configuration: {e}")))?;
    if !conf.cni_version.is_empty() && !SUPPORTED.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {} is not supported", conf.cni_version),
        ));
    }
    let socket = conf
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let connect = || async {
        crate::client::connect(&socket)
            .await
            .map_err(|e| CniError::new(code::TRY_AGAIN_LATER, e))
    };
    match env.command.as_str() {
        "ADD" => add(env, &conf, connect().await?).await.map(Some),
        "DEL" => del(env, &conf, connect().await?).await.map(|()| None),
        "CHECK" => check(env, &conf, connect().await?).await.map(|()| None),
        "STATUS" => {
            let client = connect()
                .await
                .map_err(|e| CniError::new(code::NOT_AVAILABLE, e.msg))?;
            status(client).await.map(|()| None)
        }
        "GC" => gc(&conf, connect().await?).await.map(|()| None),
        "" => Err(CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set")),
        other => Err(CniError::new(
            code::INVALID_ENV,
            format!("unknown CNI_COMMAND {other}"),
        )),
    }
}

async fn add(
    env: &Env,
    conf: &NetConf,
    mut client: AgentClient<Channel>,
) -> Result<Value, CniError> {
    require(&env.container_id, "CNI_CONTAINERID")?;
    require(&env.netns, "CNI_NETNS")?;
    require(&env.ifname, "CNI_IFNAME")?;
    let mut ports = vec![];
    for p in &conf.runtime_config.port_mappings {
        if !p.host_ip.is_empty() && p.host_ip != "0.0.0.0" {
            return Err(CniError::new(
                code::UNSUPPORTED_FIELD,
                format!(
                    "hostIP {} is not supported: ports publish on every host address",
                    p.host_ip
                ),
            ));
        }
        ports.push(pb::PortMapping {
            protocol: p.protocol.to_ascii_lowercase(),
            host_port: p.host_port,
            container_port: p.container_port,
        });
    }
    let labels = conf.labels()?;
    let endpoint = client
        .attach(pb::AttachRequest {
            container_id: weft_id(&conf.name, &env.container_id, &env.ifname),
            netns: env.netns.clone(),
            pid: None,
            ifname: env.ifname.clone(),
            ports,
            labels,
            ips: conf.runtime_config.ips.clone(),
            pools: conf.args.cni.pools.clone(),
        })
        .await?
        .into_inner()
        .endpoint
        .ok_or_else(|| CniError::new(code::AGENT_ERROR, "agent returned no endpoint"))?;
    Ok(add_result(&conf.cni_version, env, &endpoint))
}

async fn del(env: &Env, conf: &NetConf, mut client: AgentClient<Channel>) -> Result<(), CniError> {
    require(&env.container_id, "CNI_CONTAINERID")?;
    let ifname = if env.ifname.is_empty() {
        "eth0"
    } else {
        &env.ifname
    };
    client
        .detach(pb::DetachRequest {
            container_id: weft_id(&conf.name, &env.container_id, ifname),
        })
        .await?;
    Ok(())
}

async fn check(
    env: &Env,
    conf: &NetConf,
    mut client: AgentClient<Channel>,
) -> Result<(), CniError> {
    require(&env.container_id, "CNI_CONTAINERID")?;
    require(&env.netns, "CNI_NETNS")?;
    require(&env.ifname, "CNI_IFNAME")?;
    let checked = client
        .check(pb::CheckRequest {
            container_id: weft_id(&conf.name, &env.container_id, &env.ifname),
        })
        .await?
        .into_inner();
    check_result(env, checked)
}

async fn status(mut client: AgentClient<Channel>) -> Result<(), CniError> {
    let status = client
        .status(pb::StatusRequest {})
        .await
        .map_err(|e| CniError::new(code::NOT_AVAILABLE, e.message().to_string()))?
        .into_inner();
    if !status.etcd_connected {
        return Err(CniError::new(
            code::NOT_AVAILABLE,
            "the weft agent cannot reach etcd; attaches would fail",
        ));
    }
    Ok(())
}

/// Detaches every attachment of this network that the runtime no longer lists; other
/// networks' attachments (and weft endpoints not made by CNI) are never touched.
async fn gc(conf: &NetConf, mut client: AgentClient<Channel>) -> Result<(), CniError> {
    let valid: std::collections::HashSet<String> = conf
        .valid_attachments
        .iter()
        .map(|a| weft_id(&conf.name, &a.container_id, &a.ifname))
        .collect();
    let ours = network_prefix(&conf.name);
    let list = client.list(pb::ListRequest {}).await?.into_inner();
    for endpoint in list.endpoints {
        if endpoint.container_id.starts_with(&ours) && !valid.contains(&endpoint.container_id) {
            client
                .detach(pb::DetachRequest {
                    container_id: endpoint.container_id,
                })
                .await?;
        }
    }
    Ok(())
}

/// CHECK: the attachment is in the namespace the runtime names, and the agent, which sees both
/// the host side and the container's namespace, found nothing wrong with its dataplane.
fn check_result(env: &Env, checked: pb::CheckResponse) -> Result<(), CniError> {
    let recorded = checked.endpoint.map(|e| e.netns).unwrap_or_default();
    if !same_file(&recorded, &env.netns) {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!(
                "the attachment is in namespace {recorded}, not in {}",
                env.netns
            ),
        ));
    }
    match checked.problems.first() {
        None => Ok(()),
        Some(first) => Err(CniError {
            code: code::DATAPLANE_DAMAGED,
            msg: match checked.problems.len() {
                1 => first.clone(),
                n => format!("{first} (and {} more)", n - 1),
            },
            details: checked.problems.join("; "),
        }),
    }
}

/// Whether two paths name the same file (a namespace can be reached by several paths).
fn same_file(a: &str, b: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    if a == b {
        return true;
    }
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}
