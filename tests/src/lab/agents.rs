//! The lab's agents: starting, stopping and waiting for them, and talking to them (weftctl,
//! gRPC); helper processes in the lab's namespaces.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tonic::transport::Channel;
use weft_proto::v1::agent_client::AgentClient;

use super::{bin, Lab};
use crate::sh;

impl Lab {
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
        // Dual-stack labs give agents both families' pools unless told otherwise.
        let is_pool = |a: &str| a == "--pool" || a.starts_with("--pool=") || a == "--config";
        let pool_args: Vec<String> = match self.options.ipv6
            && !self.options.agent_args.iter().any(|a| is_pool(a))
            && !extra.iter().any(|a| is_pool(a))
        {
            true => vec![
                "--pool".into(),
                format!("{},{}", super::POOL, super::POOL_V6),
            ],
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
            .args(&pool_args)
            .args(&self.options.agent_args)
            .args(extra)
            // `WEFT_LAB_LOG` (a log filter) turns on an agent module's debug lines for a run.
            .env(
                "WEFT_LOG",
                std::env::var("WEFT_LAB_LOG").unwrap_or("info".into()),
            )
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

    /// Runs an operator command of weftctl inside host `i` (where it reaches etcd and the
    /// agent), with the lab's etcd flags after `args`.
    pub fn ctl_operator(&self, i: usize, args: &[&str]) -> Result<std::process::Output> {
        let weftctl = bin("weftctl");
        let socket = self.hosts[i].socket.to_str().unwrap().to_string();
        let mut all = vec![weftctl.to_str().unwrap(), "--socket", &socket];
        all.extend_from_slice(args);
        let etcd = self.etcd_client_args();
        all.extend(etcd.iter().map(String::as_str));
        sh::in_ns(&self.hosts[i].name, &all)
    }

    /// `weftctl ipam check` on host `i` (etcd, the agent and its kernel compared): an error
    /// naming what it found unless all is clean.
    pub fn ipam_check(&self, i: usize) -> Result<()> {
        let out = self.ctl_operator(i, &["ipam", "check"])?;
        anyhow::ensure!(
            out.status.success(),
            "ipam check on {}:\n{}{}",
            self.hosts[i].name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
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

    /// Attaches a container in an agent-made namespace; returns (netns name, IPv4 address, IPv6
    /// address), an address empty when the host has no pool of its family.
    pub fn attach_dual(&self, i: usize, id: &str) -> Result<(String, String, String)> {
        let endpoint = self.ctl_json(i, &["attach", id])?;
        let field = |name: &str| endpoint[name].as_str().unwrap_or_default().to_string();
        let netns = field("netns");
        let name = netns.rsplit('/').next().unwrap_or_default().to_string();
        Ok((name, field("ip"), field("ipv6")))
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
}
