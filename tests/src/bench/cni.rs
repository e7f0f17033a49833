//! Running Debian's CNI reference plugins the way a runtime runs them: environment variables,
//! configuration on stdin, inside the lab host's namespace.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;

use anyhow::{bail, Context, Result};

use crate::sh;

const CNI_PATH: &str = "/usr/lib/cni";

/// Runs `plugin` with `command` for container `id`; returns what it printed.
pub fn cni(
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

/// ptp with host-local IPAM and `ipMasq: false` (its fastest setting).
pub fn ptp_config(dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0", "name": "bench", "type": "ptp", "ipMasq": false,
        "ipam": { "type": "host-local", "ranges": [[{"subnet": "10.77.0.0/16"}]],
                  "dataDir": dir.join("cni-ipam").to_str().unwrap() }
    })
    .to_string()
}

/// portmap chained after ptp, with the ADD result as `prevResult`.
pub fn portmap_config(prev: &str, host_port: u16) -> String {
    let prev: serde_json::Value = serde_json::from_str(prev).unwrap_or_default();
    serde_json::json!({
        "cniVersion": "1.0.0", "name": "bench", "type": "portmap",
        "capabilities": {"portMappings": true}, "snat": true,
        "runtimeConfig": {"portMappings": [{"hostPort": host_port, "containerPort": 80, "protocol": "tcp"}]},
        "prevResult": prev,
    })
    .to_string()
}
