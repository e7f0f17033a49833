//! The lab topology:
//!
//! ```text
//!   <p>-h1 eth0 198.51.100.1 ─┐
//!   <p>-h2 eth0 198.51.100.2 ─┼─ br0 198.51.100.100 [<p>-r router, etcd] eth1 203.0.113.1 ── <p>-out eth0 203.0.113.10
//!   <p>-hN eth0 198.51.100.N ─┘
//! ```
//!
//! The bridge lives inside the router namespace, so the root namespace holds nothing of the lab.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tonic::transport::Channel;
use weft_proto::v1::agent_client::AgentClient;

use crate::etcd::{EtcdServer, EtcdTls};
use crate::sh;

pub const ROUTER_IP: &str = "198.51.100.100";
pub const OUTSIDE_GW: &str = "203.0.113.1";
pub const OUTSIDE_IP: &str = "203.0.113.10";
/// The router's address on the second underlay segment (even hosts, with `subnets: 2`).
pub const ROUTER_IP_2: &str = "198.18.0.100";
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
        }
    }
}

/// The underlay address of host `i` (0-based) and its segment's router address.
pub fn host_address(i: usize, subnets: usize) -> (Ipv4Addr, &'static str) {
    let n = (i + 1) as u8;
    match subnets > 1 && n.is_multiple_of(2) {
        true => (Ipv4Addr::new(198, 18, 0, n), ROUTER_IP_2),
        false => (Ipv4Addr::new(198, 51, 100, n), ROUTER_IP),
    }
}

pub struct LabHost {
    /// Both the namespace name and the agent's host name.
    pub name: String,
    pub ip: Ipv4Addr,
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

    fn build_network(&mut self) -> Result<()> {
        let router = self.router.clone();
        let outside = self.outside.clone();
        // Namespaces first (each one is recorded before anything else can fail, so Drop
        // removes it), then links, addresses and routes with one `ip -batch` per namespace.
        for ns in [&router, &outside] {
            sh::run("ip", &["netns", "add", ns])?;
        }
        for i in 0..self.options.hosts {
            let name = format!("{}-h{}", self.prefix, i + 1);
            sh::run("ip", &["netns", "add", &name])?;
            self.hosts.push(LabHost {
                socket: self.dir.join(format!("h{}.sock", i + 1)),
                log: self.dir.join(format!("h{}.log", i + 1)),
                name,
                ip: host_address(i, self.options.subnets).0,
                agent: None,
            });
        }
        // The router: the bridge, its leg to the outside network, a port per host.
        let mut router_batch = vec![
            "link set lo up".to_string(),
            "link add br0 type bridge".into(),
            format!("addr add {ROUTER_IP}/24 dev br0"),
            "link set br0 up".into(),
            "link add br1 type bridge".into(),
            format!("addr add {ROUTER_IP_2}/24 dev br1"),
            "link set br1 up".into(),
            format!("link add eth1 type veth peer name eth0 netns {outside}"),
            format!("addr add {OUTSIDE_GW}/24 dev eth1"),
            "link set eth1 up".into(),
        ];
        for (i, host) in self.hosts.iter().enumerate() {
            let port = format!("h{}", i + 1);
            router_batch.push(format!(
                "link add {port} type veth peer name eth0 netns {}",
                host.name
            ));
            let bridge = match host_address(i, self.options.subnets).1 {
                ROUTER_IP => "br0",
                _ => "br1",
            };
            router_batch.push(format!("link set {port} master {bridge} up"));
        }
        sh::ip_batch(&router, &router_batch)?;
        sh::ip_batch(
            &outside,
            &[
                "link set lo up".to_string(),
                format!("addr add {OUTSIDE_IP}/24 dev eth0"),
                "link set eth0 up".into(),
                format!("route add default via {OUTSIDE_GW}"),
            ],
        )?;
        for (i, host) in self.hosts.iter().enumerate() {
            let router = host_address(i, self.options.subnets).1;
            let mut batch = vec![
                "link set lo up".to_string(),
                format!("addr add {}/24 dev eth0", host.ip),
                "link set eth0 up".into(),
            ];
            match (self.options.default_route, router) {
                (true, _) => batch.push(format!("route add default via {router}")),
                // Without a default route, hosts of the second segment still reach etcd.
                (false, ROUTER_IP) if self.options.subnets > 1 => {
                    batch.push(format!("route add 198.18.0.0/24 via {router}"))
                }
                (false, ROUTER_IP) => {}
                (false, _) => batch.push(format!("route add 198.51.100.0/24 via {router}")),
            }
            sh::ip_batch(&host.name, &batch)?;
        }
        sh::run(
            "ip",
            &[
                "netns",
                "exec",
                &router,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        )?;
        Ok(())
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

    /// Starts (or restarts) the agent of host `i`, with the lab's and the given extra flags.
    pub fn start_agent_with(&mut self, i: usize, extra: &[&str]) -> Result<()> {
        self.start_agent_env(i, extra, &[])
    }

    /// Starts the agent of host `i` with extra flags and environment variables.
    pub fn start_agent_env(
        &mut self,
        i: usize,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<()> {
        let etcd_args = self.etcd_client_args();
        let bgp_args = match self.options.bgp {
            true => crate::bgp::agent_args(&self.dir, i, self.options.subnets, extra),
            false => vec![],
        };
        let host = &self.hosts[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&host.log)?;
        let mut command = sh::command_in_ns(&host.name, bin("weft-agent").to_str().unwrap())?;
        command
            .args([
                "--host-name",
                &host.name,
                "--underlay-interface",
                "eth0",
                "--socket",
                host.socket.to_str().unwrap(),
                "--alive-ttl",
                "3s",
                "--resync-interval",
                "2s",
            ])
            .args(&etcd_args)
            .args(&bgp_args)
            .args(&self.options.agent_args)
            .args(extra)
            .env("WEFT_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        let child = command.spawn().context("starting weft-agent")?;
        self.hosts[i].agent = Some(child);
        self.write_pid_files()
    }

    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        self.start_agent_with(i, &[])
    }

    /// Waits until host `i`'s agent answers Status.
    pub fn wait_agent(&mut self, i: usize, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        let socket = self.hosts[i].socket.clone();
        while Instant::now() < deadline {
            if let Some(child) = self.hosts[i].agent.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "agent of {} exited with {status}:\n{}",
                        self.hosts[i].name,
                        self.agent_log(i)
                    );
                }
            }
            if socket.exists() && self.ctl(i, &["status"]).map(|o| o.status.success())? {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "agent of {} did not come up:\n{}",
            self.hosts[i].name,
            self.agent_log(i)
        )
    }

    /// Sends `signal` to host `i`'s agent and reaps it.
    pub fn stop_agent(&mut self, i: usize, signal: Signal) -> Result<()> {
        if let Some(mut child) = self.hosts[i].agent.take() {
            kill(Pid::from_raw(child.id() as i32), signal)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    child.wait()?;
                    bail!("agent of {} ignored {signal}", self.hosts[i].name);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Whether host `i`'s agent process is still running.
    pub fn agent_running(&mut self, i: usize) -> bool {
        self.hosts[i]
            .agent
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.hosts[i].agent.as_ref().map(|c| c.id())
    }

    pub fn agent_log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.hosts[i].log).unwrap_or_default()
    }

    /// Runs weftctl against host `i`'s agent.
    pub fn ctl(&self, i: usize, args: &[&str]) -> Result<std::process::Output> {
        let socket = self.hosts[i].socket.to_str().unwrap().to_string();
        let mut all = vec!["--socket", &socket];
        all.extend_from_slice(args);
        sh::output(bin("weftctl").to_str().unwrap(), &all)
    }

    /// Runs weftctl with `--json` and parses the output; fails on a non-zero exit.
    pub fn ctl_json(&self, i: usize, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ctl(i, &all)?;
        if !out.status.success() {
            bail!(
                "weftctl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// A gRPC client of host `i`'s agent.
    pub async fn client(&self, i: usize) -> Result<AgentClient<Channel>> {
        weft_cli::client::connect(&self.hosts[i].socket)
            .await
            .map_err(anyhow::Error::msg)
    }

    /// Attaches a container in an agent-made namespace; returns (netns name, ip).
    pub fn attach(&self, i: usize, id: &str) -> Result<(String, String)> {
        let endpoint = self.ctl_json(i, &["attach", id])?;
        let netns = endpoint["netns"].as_str().unwrap_or_default();
        let name = netns.rsplit('/').next().unwrap_or_default().to_string();
        Ok((
            name,
            endpoint["ip"].as_str().unwrap_or_default().to_string(),
        ))
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

    /// Starts a helper process inside namespace `ns`; it is ended with the lab.
    pub fn spawn_in(&mut self, ns: &str, program: &str, args: &[&str]) -> Result<()> {
        self.spawn_logged(ns, program, args, None)
    }

    /// Like `spawn_in`, with the helper's stdout going to `log`.
    pub fn spawn_logged(
        &mut self,
        ns: &str,
        program: &str,
        args: &[&str],
        log: Option<&Path>,
    ) -> Result<()> {
        let stdout = match log {
            Some(path) => Stdio::from(std::fs::File::create(path)?),
            None => Stdio::null(),
        };
        let child = sh::command_in_ns(ns, program)?
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {program} in {ns}"))?;
        std::fs::write(
            self.dir.join(format!("helper-{}.pid", child.id())),
            child.id().to_string(),
        )?;
        self.helpers.push(child);
        Ok(())
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

fn lab_dir(prefix: &str) -> PathBuf {
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
