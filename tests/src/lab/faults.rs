//! Faults and state reads for the invariant checker and the chaos run: frozen agents, a paused
//! etcd, a host cut off from etcd, deleted keys.

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{Lab, ROUTER_IP};
use crate::sh;

/// Faults and state reads for the invariant checker and the chaos run.
impl Lab {
    /// Whether host `i`'s agent process exists and is not a zombie (unlike `agent_running`,
    /// this needs no `&mut`, so readers can share the lab).
    pub fn agent_alive(&self, i: usize) -> bool {
        let Some(pid) = self.agent_pid(i) else {
            return false;
        };
        // /proc/PID/stat: "PID (comm) STATE …"; the comm may hold spaces, the state follows ')'.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
                Some(state != 'Z' && state != 'X')
            })
            .unwrap_or(false)
    }

    /// Freezes host `i`'s agent (SIGSTOP): it neither answers nor repairs until `thaw_agent`.
    pub fn freeze_agent(&self, i: usize) -> Result<()> {
        let pid = self.agent_pid(i).context("no agent to freeze")?;
        kill(Pid::from_raw(pid as i32), Signal::SIGSTOP)?;
        Ok(())
    }

    pub fn thaw_agent(&self, i: usize) -> Result<()> {
        let pid = self.agent_pid(i).context("no agent to thaw")?;
        kill(Pid::from_raw(pid as i32), Signal::SIGCONT)?;
        Ok(())
    }

    /// Freezes every etcd member (SIGSTOP): connections stay open and nothing answers, the way
    /// a hung datastore looks. A stopped member still dies with the lab (SIGKILL).
    pub fn pause_etcd(&self) -> Result<()> {
        for member in &self.etcd {
            if let Some(pid) = member.pid() {
                kill(Pid::from_raw(pid as i32), Signal::SIGSTOP)?;
            }
        }
        Ok(())
    }

    pub fn resume_etcd(&self) -> Result<()> {
        for member in &self.etcd {
            if let Some(pid) = member.pid() {
                kill(Pid::from_raw(pid as i32), Signal::SIGCONT)?;
            }
        }
        Ok(())
    }

    /// The iptables rules (filter table, inside a host's namespace) that cut it off from every
    /// etcd member, both directions, so no request leaves and no watch event arrives.
    fn partition_rules(&self) -> Vec<Vec<String>> {
        let mut rules = vec![];
        for index in 0..self.etcd.len() {
            let port = crate::etcd::member_ports(index).0.to_string();
            for (chain, addr, port_flag) in
                [("OUTPUT", "-d", "--dport"), ("INPUT", "-s", "--sport")]
            {
                rules.push(
                    [
                        chain,
                        "-p",
                        "tcp",
                        addr,
                        ROUTER_IP,
                        port_flag,
                        &port,
                        "-m",
                        "comment",
                        "--comment",
                        "weft-lab partition",
                        "-j",
                        "DROP",
                    ]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                );
            }
        }
        rules
    }

    /// Cuts host `i` off from etcd (packets dropped, not refused: requests time out).
    pub fn partition_from_etcd(&self, i: usize) -> Result<()> {
        let ns = &self.hosts[i].name;
        for rule in self.partition_rules() {
            let mut args = vec!["iptables", "-w", "-I"];
            args.extend(rule.iter().map(String::as_str));
            sh::run_in(ns, &args)?;
        }
        Ok(())
    }

    /// Undoes `partition_from_etcd` (every copy of its rules; none present is fine).
    pub fn heal_partition(&self, i: usize) -> Result<()> {
        let ns = &self.hosts[i].name;
        for rule in self.partition_rules() {
            let mut args = vec!["netns", "exec", ns, "iptables", "-w", "-D"];
            args.extend(rule.iter().map(String::as_str));
            // Each -D removes one copy; it fails once none is left.
            for _ in 0..10 {
                if !sh::output("ip", &args)?.status.success() {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Deletes one etcd key (tests use it to remove what they planted).
    pub fn etcd_delete(&self, key: &str) -> Result<()> {
        let mut args = vec![
            "etcdctl".to_string(),
            "--endpoints".into(),
            self.etcd().url.clone(),
        ];
        if let Some(tls) = &self.etcd_tls {
            for (flag, path) in [
                ("--cacert", &tls.ca),
                ("--cert", &tls.client_cert),
                ("--key", &tls.client_key),
            ] {
                args.push(flag.into());
                args.push(path.to_str().unwrap().into());
            }
        }
        args.extend(["del".to_string(), key.to_string()]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        sh::run_in(&self.router, &refs)?;
        Ok(())
    }
}
