//! The CNI spec's side: supported versions, error codes and error JSON, the network
//! configuration and environment the runtime hands over, the weft id of an attachment, and the
//! ADD result.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{json, Value};
use weft_proto::v1 as pb;

pub const SUPPORTED: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];

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
pub struct PortMapping {
    #[serde(rename = "hostPort")]
    pub host_port: u32,
    #[serde(rename = "containerPort")]
    pub container_port: u32,
    #[serde(default)]
    pub protocol: String,
    #[serde(rename = "hostIP", default)]
    pub host_ip: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct RuntimeConfig {
    #[serde(rename = "portMappings", default)]
    pub port_mappings: Vec<PortMapping>,
    /// The `ips` capability: addresses the runtime asks for (`10.65.3.7/24`, one per family).
    #[serde(default)]
    pub ips: Vec<String>,
}

/// `args` of the network configuration.
#[derive(Debug, Default, Deserialize)]
pub struct Args {
    #[serde(default)]
    pub cni: CniArgs,
}

/// `args.cni`: what weft reads there.
#[derive(Debug, Default, Deserialize)]
pub struct CniArgs {
    /// Pools to allocate from, in order.
    #[serde(default)]
    pub pools: Vec<String>,
    /// The endpoint's labels, for network policy.
    #[serde(default)]
    pub labels: Vec<Label>,
}

#[derive(Debug, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    #[serde(default = "default_ifname")]
    pub ifname: String,
}

fn default_ifname() -> String {
    "eth0".into()
}

/// A label as the CNI conventions pass it (`args.cni.labels`).
#[derive(Debug, Deserialize)]
pub struct Label {
    pub key: String,
    pub value: String,
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
    pub socket: Option<PathBuf>,
    #[serde(rename = "runtimeConfig", default)]
    pub runtime_config: RuntimeConfig,
    /// `args.cni`: the CNI conventions' place for plugin-specific arguments.
    #[serde(default)]
    pub args: Args,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Vec<Attachment>,
}

impl NetConf {
    /// The endpoint's labels from `args.cni.labels`, checked (a later key wins).
    pub fn labels(&self) -> Result<std::collections::HashMap<String, String>, CniError> {
        let labels: std::collections::BTreeMap<String, String> = self
            .args
            .cni
            .labels
            .iter()
            .map(|l| (l.key.clone(), l.value.clone()))
            .collect();
        weft_etcd::policy::validate_labels(&labels)
            .map_err(|e| CniError::new(code::INVALID_CONFIG, format!("args.cni.labels: {e}")))?;
        Ok(labels.into_iter().collect())
    }
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

/// The weft container id of a CNI attachment: `cni-<8 hex of the network's hash>-<16 hex of
/// a hash of network, container id and interface>-<first 12 alphanumerics of the container id>`.
/// It fits weft's 64-character limit whatever the runtime's ids look like, stays readable in
/// `weftctl ls`, and lets GC recognise the attachments of its own network.
pub fn weft_id(network: &str, container_id: &str, ifname: &str) -> String {
    let attachment = weft_etcd::names::stable_hash(&[network, container_id, ifname]);
    let readable: String = container_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(12)
        .collect();
    format!("{}{attachment:016x}-{readable}", network_prefix(network))
}

/// The prefix of every weft id of a network's attachments.
pub fn network_prefix(network: &str) -> String {
    let hash = weft_etcd::names::stable_hash(&[network]) >> 32;
    format!("cni-{hash:08x}-")
}

pub fn require(value: &str, name: &str) -> Result<(), CniError> {
    if value.is_empty() {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("{name} is not set"),
        ));
    }
    Ok(())
}

/// The spec's ADD result: the container interface, an address per family (/32 and /128) with
/// its gateway, a default route per family.
pub fn add_result(version: &str, env: &Env, e: &pb::Endpoint) -> Value {
    let version = if version.is_empty() { "1.0.0" } else { version };
    let families = [
        (&e.ip, &e.gateway, 32, "4", "0.0.0.0/0"),
        (&e.ipv6, &e.gateway_v6, 128, "6", "::/0"),
    ];
    let mut ips = vec![];
    let mut routes = vec![];
    for (address, gateway, prefix, family, default) in families {
        if address.is_empty() {
            continue;
        }
        let mut ip =
            json!({"address": format!("{address}/{prefix}"), "gateway": gateway, "interface": 0});
        if version == "0.4.0" {
            ip["version"] = json!(family);
        }
        ips.push(ip);
        routes.push(json!({"dst": default, "gw": gateway}));
    }
    json!({
        "cniVersion": version,
        "interfaces": [{"name": e.ifname, "mac": e.mac, "sandbox": env.netns}],
        "ips": ips,
        "routes": routes,
        "dns": {},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weft_ids_are_valid_stable_and_distinct_per_network_and_interface() {
        let valid = |id: &str| {
            id.len() <= 64
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        let id = "a".repeat(64);
        let eth0 = weft_id("weft", &id, "eth0");
        assert!(valid(&eth0), "{eth0}");
        assert_eq!(eth0, weft_id("weft", &id, "eth0"));
        assert_ne!(eth0, weft_id("weft", &id, "net1"));
        assert_ne!(eth0, weft_id("other", &id, "eth0"));
        assert!(eth0.starts_with(&network_prefix("weft")));
        assert!(!eth0.starts_with(&network_prefix("other")));
        assert!(valid(&weft_id("n", "weird/id with spaces", "eth0")));
    }

    #[test]
    fn labels_come_from_args_cni_labels() {
        let conf: NetConf = serde_json::from_value(json!({
            "cniVersion": "1.0.0", "name": "weft",
            "args": {"cni": {"labels": [{"key": "app", "value": "web"}, {"key": "tier", "value": ""}]}},
        }))
        .unwrap();
        let labels = conf.labels().unwrap();
        assert_eq!(labels["app"], "web");
        assert_eq!(labels.len(), 2);
        let bad: NetConf = serde_json::from_value(json!({
            "name": "weft", "args": {"cni": {"labels": [{"key": "a b", "value": "x"}]}},
        }))
        .unwrap();
        let err = bad.labels().unwrap_err();
        assert_eq!(err.code, code::INVALID_CONFIG);
        assert!(err.msg.contains("args.cni.labels"), "{}", err.msg);
        let none: NetConf = serde_json::from_value(json!({"name": "weft"})).unwrap();
        assert!(none.labels().unwrap().is_empty());
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
        assert_eq!(r["ips"].as_array().unwrap().len(), 1, "IPv4 only");
        let dual = pb::Endpoint {
            ipv6: "fd65::5".into(),
            gateway_v6: "fe80::ecee:eeff:feee:eeee".into(),
            ..e.clone()
        };
        let r = add_result("1.0.0", &env, &dual);
        assert_eq!(r["ips"][1]["address"], "fd65::5/128");
        assert_eq!(r["ips"][1]["gateway"], "fe80::ecee:eeff:feee:eeee");
        assert_eq!(r["routes"][1]["dst"], "::/0");
        assert_eq!(r["routes"][1]["gw"], "fe80::ecee:eeff:feee:eeee");
        assert_eq!(add_result("0.4.0", &env, &dual)["ips"][1]["version"], "6");
        let v6_only = pb::Endpoint {
            ip: String::new(),
            gateway: String::new(),
            ..dual
        };
        let r = add_result("1.0.0", &env, &v6_only);
        assert_eq!(r["ips"].as_array().unwrap().len(), 1);
        assert_eq!(r["routes"][0]["dst"], "::/0");
    }
}
