//! BGP in the lab: the router namespace as top-of-rack router (bird2 in AS 64513, one eBGP
//! session per host, what it learns installed into its kernel), the flags that make every
//! agent announce its blocks to it (AS 64512, bird's files under the lab's directory), and the
//! reaping of every bird of a lab: the router's, and the hosts' birds the agents started,
//! which outlive their agents by design and so are the lab's to end.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::lab::{host_address, Lab, ROUTER_IP};
use crate::sh;

pub const ROUTER_ASN: u32 = 64513;
pub const HOST_ASN: u32 = 64512;

/// The router's bird configuration: one eBGP session per host, from the router's address on
/// that host's segment, learned routes to the kernel. Short retry and error waits, so that a
/// session a test broke comes back in a second. With `ipv6` (dual-stack labs) the same sessions
/// also carry IPv6 (the hosts announce their IPv6 blocks over them) and IPv6 routes go to the
/// kernel too.
pub fn router_config(hosts: &[(Ipv4Addr, &str)], log: &Path, ipv6: bool) -> String {
    let mut out = format!(
        "router id {ROUTER_IP};\ntimeformat protocol \"%s\";\nlog \"{}\" all;\n\
         protocol device {{\n}}\n\
         protocol kernel {{\n  ipv4 {{ import none; export all; }};\n}}\n",
        log.display()
    );
    if ipv6 {
        out.push_str("protocol kernel {\n  ipv6 { import none; export all; };\n}\n");
    }
    let ipv6_channel = match ipv6 {
        true => "  ipv6 { import all; export none; };\n",
        false => "",
    };
    for (i, (ip, local)) in hosts.iter().enumerate() {
        let _ = write!(
            out,
            "protocol bgp h{} {{\n  local {local} as {ROUTER_ASN};\n  \
             neighbor {ip} as {HOST_ASN};\n  hold time 9;\n  connect retry time 1;\n  \
             error wait time 1, 2;\n  debug {{ states, events }};\n  \
             ipv4 {{ import all; export none; }};\n{ipv6_channel}}}\n",
            i + 1
        );
    }
    out
}

/// Where the router's bird keeps its files.
pub fn router_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join("router-bird.conf"),
        dir.join("router-bird.ctl"),
        dir.join("router-bird.log"),
    )
}

/// Starts the router's bird in the foreground as a helper of the lab (ended with it; its PID
/// file names the lab's directory, so `weft-lab down` ends it too).
pub fn start_router(lab: &mut Lab) -> Result<()> {
    let (config, socket, log) = router_files(&lab.dir);
    let subnets = lab.options.subnets;
    let hosts: Vec<(Ipv4Addr, &str)> = (0..lab.hosts.len())
        .map(|i| host_address(i, subnets))
        .collect();
    std::fs::write(&config, router_config(&hosts, &log, lab.options.ipv6))?;
    sh::run("bird", &["-p", "-c", config.to_str().unwrap()])
        .context("the router's bird configuration")?;
    let router = lab.router.clone();
    lab.spawn_in(
        &router,
        "bird",
        &[
            "-f",
            "-c",
            config.to_str().unwrap(),
            "-s",
            socket.to_str().unwrap(),
        ],
    )?;
    lab.eventually(
        "the router's bird answers",
        std::time::Duration::from_secs(10),
        || lab.router_birdc(&["show", "status"]).is_ok(),
    )?;
    Ok(())
}

/// The directory of host `i`'s bird (its agent's `--bgp-dir`).
pub fn host_dir(lab_dir: &Path, i: usize) -> PathBuf {
    lab_dir.join(format!("bird-h{}", i + 1))
}

/// The BGP flags of host `i`'s agent (on one of `subnets` segments): it peers with the router's
/// address on its own segment; a `--bgp-peer` among `extra` replaces the router.
pub fn agent_args(lab_dir: &Path, i: usize, subnets: usize, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--bgp".to_string(),
        "--bgp-dir".into(),
        host_dir(lab_dir, i).to_str().unwrap().into(),
    ];
    if !extra.iter().any(|a| a.starts_with("--bgp-peer")) {
        let (_, router) = host_address(i, subnets);
        args.extend(["--bgp-peer".into(), format!("{router}:{ROUTER_ASN}")]);
    }
    args
}

/// Ends the hosts' birds of the lab in `dir` (by their PID files, and only processes whose
/// command line names that directory: PIDs get reused).
pub fn reap(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mark = dir.to_string_lossy().into_owned();
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with("bird-h") {
            continue;
        }
        if let Some(pid) = pid_of(&entry.path().join("bird.pid"), &mark) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// The PID in `file` if that process runs with `mark` in its command line.
fn pid_of(file: &Path, mark: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(file).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmdline)
        .contains(mark)
        .then_some(pid)
}

/// `ip route` lines as destination -> next hop (routes without one left out).
fn parse_routes(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let via = words.iter().position(|w| *w == "via")?;
            Some((words[0].to_string(), words.get(via + 1)?.to_string()))
        })
        .collect()
}

/// One BGP session as the router's bird shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterSession {
    pub state: String,
    /// Unix seconds of the last state change: a reset session has a new one.
    pub since: u64,
}

impl Lab {
    /// Runs `birdc` against the router's bird.
    pub fn router_birdc(&self, args: &[&str]) -> Result<String> {
        let (_, socket, _) = router_files(&self.dir);
        let mut all = vec!["-s", socket.to_str().unwrap()];
        all.extend_from_slice(args);
        sh::run("birdc", &all)
    }

    /// The router's session with host `i`.
    pub fn router_session(&self, i: usize) -> Result<RouterSession> {
        let name = format!("h{}", i + 1);
        let out = self.router_birdc(&["show", "protocols", &name])?;
        let line = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))
            .with_context(|| format!("no protocol {name} in:\n{out}"))?;
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() < 5 {
            bail!("unexpected protocol line: {line:?}");
        }
        Ok(RouterSession {
            since: words[4].parse().context("since")?,
            state: words.get(5).unwrap_or(&words[3]).to_string(),
        })
    }

    /// The routes bird installed in the router's kernel: destination -> next hop.
    pub fn router_bgp_routes(&self) -> Result<BTreeMap<String, String>> {
        let out = sh::run(
            "ip",
            &["-n", &self.router, "route", "show", "proto", "bird"],
        )?;
        Ok(parse_routes(&out))
    }

    /// The IPv6 routes bird installed in the router's kernel (dual-stack labs): destination ->
    /// next hop.
    pub fn router_bgp_routes6(&self) -> Result<BTreeMap<String, String>> {
        let out = sh::run(
            "ip",
            &["-6", "-n", &self.router, "route", "show", "proto", "bird"],
        )?;
        Ok(parse_routes(&out))
    }

    /// The PID of host `i`'s bird (the one its agent started or adopted), if it runs.
    pub fn host_bird_pid(&self, i: usize) -> Option<i32> {
        let dir = host_dir(&self.dir, i);
        pid_of(&dir.join("bird.pid"), &dir.to_string_lossy())
    }

    /// Sends `signal` to host `i`'s bird.
    pub fn signal_host_bird(&self, i: usize, signal: Signal) -> Result<()> {
        let pid = self.host_bird_pid(i).context("host has no bird")?;
        kill(Pid::from_raw(pid), signal)?;
        Ok(())
    }
}

/// The BGP part of `weft-lab demo --bgp`: the router's sessions and the routes it learned (both
/// families on a dual-stack lab), and the outside host pinging every container address directly. Returns how many pings failed.
pub fn show_demo(lab: &Lab, containers: &[(&str, &str)]) -> Result<usize> {
    for i in 0..lab.hosts.len() {
        lab.eventually(
            "the router's BGP sessions",
            std::time::Duration::from_secs(30),
            || {
                lab.router_session(i)
                    .is_ok_and(|s| s.state == "Established")
            },
        )?;
    }
    println!("== the router's BGP sessions (birdc show protocols, AS {ROUTER_ASN})");
    print!("{}", lab.router_birdc(&["show", "protocols"])?);
    // An UPDATE follows a session's establishment by moments: give each route a few seconds.
    let reached = |ip: &str| {
        lab.eventually(
            "outside -> container",
            std::time::Duration::from_secs(5),
            || sh::ping(&lab.outside, ip),
        )
        .is_ok()
    };
    let failed: Vec<String> = containers
        .iter()
        .filter(|(_, ip)| !reached(ip))
        .map(|(name, ip)| format!("{name} ({ip})"))
        .collect();
    println!(
        "   the outside host {} reaches {}/{} container addresses directly (no NAT){}",
        match lab.options.ipv6 {
            true => format!("{} {}", crate::lab::OUTSIDE_IP, crate::lab::OUTSIDE_IP6),
            false => crate::lab::OUTSIDE_IP.to_string(),
        },
        containers.len() - failed.len(),
        containers.len(),
        match failed.is_empty() {
            true => String::new(),
            false => format!("; not {}", failed.join(", ")),
        }
    );
    println!("== routes the router learned (ip route show proto bird)");
    print!(
        "{}",
        sh::run("ip", &["-n", &lab.router, "route", "show", "proto", "bird"])?
    );
    if lab.options.ipv6 {
        print!(
            "{}",
            sh::run(
                "ip",
                &["-6", "-n", &lab.router, "route", "show", "proto", "bird"]
            )?
        );
    }
    Ok(failed.len())
}
