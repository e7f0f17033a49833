//! `weft-cni`: a CNI plugin (spec 1.0.0 and 1.1.0) that hands every operation to the local weft
//! agent over gRPC.
//!
//! A CNI attachment is (container id, ifname); its weft container id is
//! `cni-<16 hex of a hash of both>-<first 12 characters of the container id>`, which fits weft's
//! 64-character limit whatever the runtime's ids look like, stays readable in `weftctl ls`, and
//! lets GC recognise the attachments CNI made.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{json, Value};
use weft_proto::v1 as pb;

pub const SUPPORTED: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];
const DEFAULT_SOCKET: &str = "/run/weft/agent.sock";

/// Error codes of the CNI spec (and ours, from 100).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const PORT_TAKEN: u32 = 100;
    pub const POOL_EXHAUSTED: u32 = 101;
    pub const AGENT_ERROR: u32 = 102;
    /// CHECK found the attachment's dataplane damaged; `details` lists every problem.
    pub const DATAPLANE_DAMAGED: u32 = 103;
}

/// A CNI error, printed as the spec's error JSON.
#[derive(Debug)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn to_json(&self, version: &str) -> Value {
        json!({"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

impl From<tonic::Status> for CniError {
    fn from(status: tonic::Status) -> Self {
        use tonic::Code;
        let code = match status.code() {
            Code::NotFound => code::UNKNOWN_CONTAINER,
            Code::InvalidArgument => code::INVALID_CONFIG,
            Code::Unavailable => code::TRY_AGAIN_LATER,
            Code::AlreadyExists => code::PORT_TAKEN,
            Code::ResourceExhausted => code::POOL_EXHAUSTED,
            _ => code::AGENT_ERROR,
        };
        Self {
            code,
            msg: status.message().to_string(),
            details: format!("{:?}", status.code()),
        }
    }
}

#[derive(Debug, Deserialize)]
struct PortMapping {
    #[serde(rename = "hostPort")]
    host_port: u32,
    #[serde(rename = "containerPort")]
    container_port: u32,
    #[serde(default)]
    protocol: String,
    #[serde(rename = "hostIP", default)]
    host_ip: String,
}

#[derive(Debug, Default, Deserialize)]
struct RuntimeConfig {
    #[serde(rename = "portMappings", default)]
    port_mappings: Vec<PortMapping>,
}

#[derive(Debug, Deserialize)]
struct Attachment {
    #[serde(rename = "containerID")]
    container_id: String,
    #[serde(default = "default_ifname")]
    ifname: String,
}

fn default_ifname() -> String {
    "eth0".into()
}

/// The network configuration on stdin.
#[derive(Debug, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    /// The agent's API socket.
    #[serde(default)]
    socket: Option<PathBuf>,
    #[serde(rename = "runtimeConfig", default)]
    runtime_config: RuntimeConfig,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    valid_attachments: Vec<Attachment>,
}

/// The CNI_* environment.
#[derive(Debug, Default, Clone)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
}

impl Env {
    pub fn from_process() -> Self {
        let var = |name: &str| std::env::var(name).unwrap_or_default();
        Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
        }
    }
}

/// The weft container id of a CNI attachment.
pub fn weft_id(container_id: &str, ifname: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in container_id.bytes().chain([b'/']).chain(ifname.bytes()) {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let readable: String = container_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(12)
        .collect();
    format!("cni-{hash:016x}-{readable}")
}

fn require(value: &str, name: &str) -> Result<(), CniError> {
    if value.is_empty() {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("{name} is not set"),
        ));
    }
    Ok(())
}

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
        crate::ctl::connect(&socket)
            .await
            .map_err(|e| CniError::new(code::TRY_AGAIN_LATER, e))
    };
    match env.command.as_str() {
        "ADD" => {
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
            let mut client = connect().await?;
            let endpoint = client
                .attach(pb::AttachRequest {
                    container_id: weft_id(&env.container_id, &env.ifname),
                    netns: env.netns.clone(),
                    pid: None,
                    ifname: env.ifname.clone(),
                    ports,
                })
                .await?
                .into_inner()
                .endpoint
                .ok_or_else(|| CniError::new(code::AGENT_ERROR, "agent returned no endpoint"))?;
            Ok(Some(add_result(&conf.cni_version, env, &endpoint)))
        }
        "DEL" => {
            require(&env.container_id, "CNI_CONTAINERID")?;
            let ifname = if env.ifname.is_empty() {
                "eth0"
            } else {
                &env.ifname
            };
            let mut client = connect().await?;
            client
                .detach(pb::DetachRequest {
                    container_id: weft_id(&env.container_id, ifname),
                })
                .await?;
            Ok(None)
        }
        "CHECK" => {
            require(&env.container_id, "CNI_CONTAINERID")?;
            require(&env.netns, "CNI_NETNS")?;
            require(&env.ifname, "CNI_IFNAME")?;
            let mut client = connect().await?;
            let checked = client
                .check(pb::CheckRequest {
                    container_id: weft_id(&env.container_id, &env.ifname),
                })
                .await?
                .into_inner();
            check(env, checked)?;
            Ok(None)
        }
        "STATUS" => {
            let mut client = connect()
                .await
                .map_err(|e| CniError::new(code::NOT_AVAILABLE, e.msg))?;
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
            Ok(None)
        }
        "GC" => {
            let valid: std::collections::HashSet<String> = conf
                .valid_attachments
                .iter()
                .map(|a| weft_id(&a.container_id, &a.ifname))
                .collect();
            let mut client = connect().await?;
            let list = client.list(pb::ListRequest {}).await?.into_inner();
            for endpoint in list.endpoints {
                if endpoint.container_id.starts_with("cni-")
                    && !valid.contains(&endpoint.container_id)
                {
                    client
                        .detach(pb::DetachRequest {
                            container_id: endpoint.container_id,
                        })
                        .await?;
                }
            }
            Ok(None)
        }
        "" => Err(CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set")),
        other => Err(CniError::new(
            code::INVALID_ENV,
            format!("unknown CNI_COMMAND {other}"),
        )),
    }
}

/// The spec's ADD result: the container interface, its /32 with the gateway, a default route.
pub fn add_result(version: &str, env: &Env, e: &pb::Endpoint) -> Value {
    let version = if version.is_empty() { "1.0.0" } else { version };
    let mut ip = json!({"address": format!("{}/32", e.ip), "gateway": e.gateway, "interface": 0});
    if version == "0.4.0" {
        ip["version"] = json!("4");
    }
    json!({
        "cniVersion": version,
        "interfaces": [{"name": e.ifname, "mac": e.mac, "sandbox": env.netns}],
        "ips": [ip],
        "routes": [{"dst": "0.0.0.0/0", "gw": e.gateway}],
        "dns": {},
    })
}

/// CHECK: the attachment is in the namespace the runtime names, and the agent, which sees both
/// the host side and the container's namespace, found nothing wrong with its dataplane.
fn check(env: &Env, checked: pb::CheckResponse) -> Result<(), CniError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weft_ids_are_valid_stable_and_distinct_per_interface() {
        let id = "a".repeat(64);
        let eth0 = weft_id(&id, "eth0");
        assert!(crate::validate::container_id(&eth0).is_ok(), "{eth0}");
        assert_eq!(eth0, weft_id(&id, "eth0"));
        assert_ne!(eth0, weft_id(&id, "net1"));
        assert!(crate::validate::container_id(&weft_id("weird/id with spaces", "eth0")).is_ok());
    }

    #[test]
    fn results_follow_the_spec() {
        let env = Env {
            netns: "/run/netns/x".into(),
            ..Default::default()
        };
        let e = pb::Endpoint {
            ip: "10.65.0.5".into(),
            gateway: "169.254.1.1".into(),
            mac: "02:00:00:00:00:01".into(),
            ifname: "eth0".into(),
            ..Default::default()
        };
        let r = add_result("1.0.0", &env, &e);
        assert_eq!(r["ips"][0]["address"], "10.65.0.5/32");
        assert_eq!(r["ips"][0]["interface"], 0);
        assert!(r["ips"][0].get("version").is_none());
        assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0");
        assert_eq!(add_result("0.4.0", &env, &e)["ips"][0]["version"], "4");
    }
}
