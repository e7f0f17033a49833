//! Removing labs: the namespaces of a prefix, and labs whose owning process died.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::sh;

pub fn list_netns() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Deletes every namespace of the lab `prefix`: its hosts, router and outside host, and the
/// container namespaces its agents made. Links inside go with them.
pub fn teardown_namespaces(prefix: &str) {
    let ours = format!("{prefix}-");
    let containers = format!("weft-{prefix}-");
    for ns in list_netns() {
        if ns.starts_with(&ours) || ns.starts_with(&containers) {
            let _ = sh::output("ip", &["netns", "del", &ns]);
        }
    }
}

pub(super) fn lab_dir(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(format!("weft-lab-{prefix}"))
}

/// Removes labs whose owning process died without cleaning up (a test killed by a timeout).
pub fn reap_orphans() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(prefix) = name.strip_prefix("weft-lab-") else {
            continue;
        };
        let owner = std::fs::read_to_string(entry.path().join("owner")).unwrap_or_default();
        let alive = owner
            .trim()
            .parse::<u32>()
            .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !owner.is_empty() && !alive {
            let _ = teardown_leftovers(prefix);
        }
    }
}

/// Ends the processes of a lab left behind by a run that could not clean up (by the PID files
/// the lab writes), then deletes its namespaces.
pub fn teardown_leftovers(prefix: &str) -> Result<()> {
    let dir = lab_dir(prefix);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(_role) = name.strip_suffix(".pid") {
                let pid: i32 = std::fs::read_to_string(entry.path())?
                    .trim()
                    .parse()
                    .context("pid file")?;
                // Only a process that is still one of ours: PIDs get reused.
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline);
                if cmdline.contains("weft-agent") || cmdline.contains(&format!("weft-lab-{prefix}"))
                {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
    }
    crate::bgp::reap(&dir);
    teardown_namespaces(prefix);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
