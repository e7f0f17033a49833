//! The CNI plugin run as a container runtime runs it.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::lab::bin;

/// Runs weft-cni like a runtime does: environment variables and the config on stdin.
pub fn run(command: &str, container: &str, netns: &str, config: &Value) -> (bool, Value) {
    run_as(command, container, netns, "eth0", config)
}

/// Like [`run`], for an attachment on another interface (`CNI_IFNAME`).
pub fn run_as(
    command: &str,
    container: &str,
    netns: &str,
    ifname: &str,
    config: &Value,
) -> (bool, Value) {
    let mut child = Command::new(bin("weft-cni"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let written = child
        .stdin
        .take()
        .unwrap()
        .write_all(config.to_string().as_bytes());
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let value = serde_json::from_str(text.trim()).unwrap_or(Value::Null);
    // The plugin reads all of stdin for every command, VERSION included, so the write must land.
    written.unwrap_or_else(|e| {
        panic!("writing the config to weft-cni {command}: {e}; it said {value}")
    });
    (out.status.success(), value)
}
