//! The lab topology:
//!
//! ```text
//!   <p>-h1 eth0 198.51.100.1 ─┐
//!   <p>-h2 eth0 198.51.100.2 ─┼─ br0 198.51.100.100 [<p>-r router, etcd] eth1 203.0.113.1 ── <p>-out eth0 203.0.113.10
//!   <p>-hN eth0 198.51.100.N ─┘
//! ```
//!
//! With `ipv6`, the same links also carry 2001:db8:100::N/64 (router ::100; the second segment
//! 2001:db8:118::N/64, router ::100) and the outside host is 2001:db8:113::10 behind ::1.
//!
//! The bridge lives inside the router namespace, so the root namespace holds nothing of the lab.
//!
//! This module holds the lab's options, its making and its teardown; `network` builds the
//! topology, `agents` runs the agents and talks to them, `faults` injects the faults the
//! invariant checker and the chaos run need, `cleanup` removes labs (also those left behind),
//! `policy` applies network policies and reads what the hosts hold of them.

mod agents;
mod cleanup;
mod faults;
mod network;
pub mod policy;

use cleanup::lab_dir;
pub use cleanup::{list_netns, reap_orphans, teardown_leftovers, teardown_namespaces};
pub use network::{host_address, host_address_v6};

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::etcd::{EtcdServer, EtcdTls};

pub const ROUTER_IP: &str = "198.51.100.100";
pub const OUTSIDE_GW: &str = "203.0.113.1";
pub const OUTSIDE_IP: &str = "203.0.113.10";
/// The router's address on the second underlay segment (even hosts, with `subnets: 2`).
pub const ROUTER_IP_2: &str = "198.18.0.100";
/// The router's IPv6 addresses on the underlay segments and towards the outside host, and the
/// outside host's (dual-stack labs).
pub const ROUTER_IP6: &str = "2001:db8:100::100";
pub const ROUTER_IP6_2: &str = "2001:db8:118::100";
pub const OUTSIDE_GW6: &str = "2001:db8:113::1";
pub const OUTSIDE_IP6: &str = "2001:db8:113::10";
/// The pools of dual-stack labs' agents (unless their flags name others).
pub const POOL: &str = "10.65.0.0/16";
pub const POOL_V6: &str = "fd65::/48";
/// Client port of the first etcd member (member i listens on 2379 + 100 * i).
pub const ETCD_PORT: u16 = 2379;

/// How to build a lab.
#[derive(Debug, Clone)]
pub struct LabOptions {
    pub hosts: usize,
    /// Name prefix of everything the lab creates; must be short (it ends up in netns names).
    pub prefix: Option<String>,
    /// Extra flags for every agent.
    pub agent_args: Vec<String>,
    /// Whether hosts get a default route via the router.
    pub default_route: bool,
    pub start_agents: bool,
    /// Members of the lab's etcd cluster.
    pub etcd_members: usize,
    /// etcd with TLS and client-certificate authentication.
    pub etcd_tls: bool,
    /// Underlay segments: 1 (every host on 198.51.100.0/24), or 2 (odd hosts there, even hosts
    /// on 198.18.0.0/24; the router forwards between them and knows no pool).
    pub subnets: usize,
    /// The router runs bird2 as top-of-rack router and every agent announces its blocks to it
    /// (see `crate::bgp`).
    pub bgp: bool,
    /// Dual-stack: the underlay and the outside host get IPv6 addresses too, and agents get an
    /// IPv6 pool beside the IPv4 one (`POOL`, `POOL_V6`) unless `agent_args` name pools.
    pub ipv6: bool,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            hosts: 3,
            prefix: None,
            agent_args: vec![],
            default_route: true,
            start_agents: true,
            etcd_members: 1,
            etcd_tls: false,
            subnets: 1,
            bgp: false,
            ipv6: false,
        }
    }
}

pub struct LabHost {
    /// Both the namespace name and the agent's host name.
    pub name: String,
    pub ip: Ipv4Addr,
    /// The IPv6 underlay address, in dual-stack labs.
    pub ip6: Option<Ipv6Addr>,
    pub socket: PathBuf,
    pub log: PathBuf,
    agent: Option<Child>,
}

pub struct Lab {
    pub prefix: String,
    pub dir: PathBuf,
    pub router: String,
    pub outside: String,
    pub hosts: Vec<LabHost>,
    /// The etcd members; tests may stop and restart them.
    pub etcd: Vec<EtcdServer>,
    pub etcd_tls: Option<EtcdTls>,
    /// Helper processes (services in containers) ended with the lab.
    helpers: Vec<Child>,
    pub(crate) options: LabOptions,
    keep: bool,
}

/// Path of the compiled workspace binaries (next to the test executable's `deps/` folder).
pub fn bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("WEFT_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace)",
        path.display()
    );
    path
}

fn unique_prefix() -> String {
    // 'w' + 5 hex digits: unique enough among concurrent labs, short enough for names.
    let mut bytes = [0u8; 4];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .expect("urandom");
    format!("w{:05x}", u32::from_le_bytes(bytes) & 0xfffff)
}

impl Lab {
    pub fn new(options: LabOptions) -> Result<Self> {
        crate::require_root();
        let prefix = options.prefix.clone().unwrap_or_else(unique_prefix);
        reap_orphans();
        let dir = lab_dir(&prefix);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("owner"), std::process::id().to_string())?;
        let mut lab = Lab {
            router: format!("{prefix}-r"),
            outside: format!("{prefix}-out"),
            hosts: vec![],
            etcd: vec![],
            etcd_tls: None,
            helpers: vec![],
            dir,
            options: options.clone(),
            keep: false,
            prefix,
        };
        // From here on, Drop tears down whatever was built, even if building fails halfway.
        lab.build_network()?;
        if options.etcd_tls {
            lab.etcd_tls = Some(EtcdTls::generate(&lab.dir, ROUTER_IP)?);
        }
        let members = options.etcd_members.max(1);
        for i in 0..members {
            let member = EtcdServer::start_member(
                &lab.router,
                ROUTER_IP,
                i,
                members,
                &lab.dir,
                lab.etcd_tls.clone(),
            )?;
            lab.etcd.push(member);
        }
        lab.write_pid_files()?;
        for member in &lab.etcd {
            member.wait_ready(Duration::from_secs(30))?;
        }
        if options.bgp {
            crate::bgp::start_router(&mut lab)?;
        }
        if options.start_agents {
            for i in 0..lab.hosts.len() {
                lab.start_agent(i)?;
            }
            for i in 0..lab.hosts.len() {
                lab.wait_agent(i, Duration::from_secs(30))?;
            }
        }
        Ok(lab)
    }

    /// The first running etcd member.
    pub fn etcd(&self) -> &EtcdServer {
        self.etcd
            .iter()
            .find(|m| m.pid().is_some())
            .expect("a running etcd member")
    }

    /// The etcd endpoints agents are given.
    pub fn etcd_endpoints(&self) -> String {
        self.etcd
            .iter()
            .map(|m| m.url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Flags that let a client reach the lab's etcd (endpoints, and certificates under TLS).
    pub fn etcd_client_args(&self) -> Vec<String> {
        let mut args = vec!["--etcd-endpoints".to_string(), self.etcd_endpoints()];
        if let Some(tls) = &self.etcd_tls {
            for (flag, path) in [
                ("--etcd-cacert", &tls.ca),
                ("--etcd-cert", &tls.client_cert),
                ("--etcd-key", &tls.client_key),
            ] {
                args.push(flag.into());
                args.push(path.to_str().unwrap().into());
            }
        }
        args
    }
    /// Container namespaces the agents created in this lab.
    pub fn container_namespaces(&self) -> Vec<String> {
        let mine = format!("weft-{}-", self.prefix);
        list_netns()
            .into_iter()
            .filter(|n| n.starts_with(&mine))
            .collect()
    }

    /// Every etcd key of the lab with its value.
    pub fn etcd_keys(&self) -> Result<BTreeMap<String, String>> {
        Ok(self.etcd().get_prefix("/weft/v1/")?.into_iter().collect())
    }

    /// Polls `check` until it holds or `limit` passes.
    pub fn eventually(
        &self,
        what: &str,
        limit: Duration,
        mut check: impl FnMut() -> bool,
    ) -> Result<Duration> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if check() {
                return Ok(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("timed out after {limit:?} waiting for: {what}")
    }

    /// Keeps the lab after this value is dropped (for `weft-lab demo --keep`).
    pub fn keep(&mut self) {
        self.keep = true;
        for member in &mut self.etcd {
            member.release();
        }
    }

    fn teardown(&mut self) {
        for mut child in self.helpers.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        for host in &mut self.hosts {
            if let Some(mut child) = host.agent.take() {
                let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
                let _ = child.wait();
            }
        }
        for member in &mut self.etcd {
            member.stop();
        }
        // The hosts' birds outlive their agents by design: the lab ends them.
        crate::bgp::reap(&self.dir);
        teardown_namespaces(&self.prefix);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (i, host) in self.hosts.iter().enumerate() {
                let log = self.agent_log(i);
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("---- agent log of {} (last lines) ----", host.name);
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        if !self.keep {
            self.teardown();
        }
    }
}

impl Lab {
    /// Writes PID files so `weft-lab down` (or the next lab, if this process dies) can end
    /// this lab's processes later.
    pub fn write_pid_files(&self) -> Result<()> {
        for member in &self.etcd {
            if let Some(pid) = member.pid() {
                let file = self.dir.join(format!("etcd-{}.pid", member.name));
                std::fs::write(file, pid.to_string())?;
            }
        }
        for (i, host) in self.hosts.iter().enumerate() {
            let file = self.dir.join(format!("{}.pid", host.name));
            match self.agent_pid(i) {
                Some(pid) => std::fs::write(file, pid.to_string())?,
                None => {
                    let _ = std::fs::remove_file(file);
                }
            }
        }
        Ok(())
    }

    /// The Status of host `i` as JSON.
    pub fn status(&self, i: usize) -> Result<serde_json::Value> {
        self.ctl_json(i, &["status"])
    }
}
