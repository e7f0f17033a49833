//! Carrying out one operation: API calls, CNI runs, agent kills, and what each answered.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Result;
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use weft_proto::v1 as pb;

use crate::invariants::{self, Port};
use crate::lab::bin;
use crate::sh;

use super::*;

impl Chaos {
    pub(super) fn run_op(&mut self, op: &Op) -> Result<()> {
        let started = Instant::now();
        let text = op.to_string();
        let kind = op.kind();
        if self.skipped(op) {
            self.record(kind, text, started, "skipped (--skip)", "", true);
            return Ok(());
        }
        match op {
            Op::Attach { host, id, ports } => {
                let key = Key::Agent(id.clone());
                let allowed = self
                    .model
                    .expect_attach(*host, &key, ports, self.reachable(*host));
                let outcome = self.grpc_attach(*host, id, ports);
                let ok = allowed.contains(&outcome.kind);
                let why = format!("op #{} {text}", self.report.ops.len() + 1);
                self.model
                    .apply_attach(*host, key, ports, outcome.kind, ok, &why);
                self.record(kind, text, started, outcome.text, kinds_text(&allowed), ok);
            }
            Op::Detach { host, id } => {
                let key = Key::Agent(id.clone());
                let allowed = self.model.expect_detach(*host, &key, self.reachable(*host));
                let outcome = self.grpc_detach(*host, id);
                let ok = allowed.contains(&outcome.kind);
                let why = format!("op #{} {text}", self.report.ops.len() + 1);
                self.model.apply_detach(*host, key, outcome.kind, ok, &why);
                self.record(kind, text, started, outcome.text, kinds_text(&allowed), ok);
            }
            Op::CniAdd {
                host,
                pod,
                net,
                ports,
            } => {
                self.make_pod(*host, *pod)?;
                let key = Key::Cni {
                    pod: *pod,
                    net: *net,
                };
                let allowed = self
                    .model
                    .expect_attach(*host, &key, ports, self.reachable(*host));
                let outcome = self.cni(*host, "ADD", Some(*pod), *net, ports, &[]);
                let ok = allowed.contains(&outcome.kind);
                let why = format!("op #{} {text}", self.report.ops.len() + 1);
                self.model
                    .apply_attach(*host, key, ports, outcome.kind, ok, &why);
                self.record(kind, text, started, outcome.text, kinds_text(&allowed), ok);
            }
            Op::CniDel { host, pod, net } => {
                let key = Key::Cni {
                    pod: *pod,
                    net: *net,
                };
                let allowed = self.model.expect_detach(*host, &key, self.reachable(*host));
                let outcome = self.cni(*host, "DEL", Some(*pod), *net, &[], &[]);
                let ok = allowed.contains(&outcome.kind);
                let why = format!("op #{} {text}", self.report.ops.len() + 1);
                self.model.apply_detach(*host, key, outcome.kind, ok, &why);
                self.record(kind, text, started, outcome.text, kinds_text(&allowed), ok);
            }
            Op::CniGc { host, net, keep } => {
                // Under the contract, GC of one network leaves the other network's attachments.
                let doomed: Vec<Key> = self.model.hosts[*host]
                    .keys()
                    .filter(|k| matches!(k, Key::Cni { pod, net: n } if n == net && !keep.contains(pod)))
                    .cloned()
                    .collect();
                let allowed = if self.reachable(*host) {
                    vec![Kind::Ok]
                } else {
                    vec![Kind::Ok, Kind::Unavailable]
                };
                let outcome = self.cni(*host, "GC", None, *net, &[], keep);
                let ok = allowed.contains(&outcome.kind);
                let why = format!("op #{} {text}", self.report.ops.len() + 1);
                for key in doomed {
                    if ok && outcome.kind == Kind::Ok {
                        self.model.hosts[*host].remove(&key);
                    } else {
                        self.model.unsettle(*host, key, &why);
                    }
                }
                self.record(kind, text, started, outcome.text, kinds_text(&allowed), ok);
            }
            Op::KillRestart { host } => {
                self.lab.stop_agent(*host, Signal::SIGKILL)?;
                self.lab.start_agent(*host)?;
                let (outcome, ok) = match self.lab.wait_agent(*host, Duration::from_secs(30)) {
                    Ok(()) => ("restarted".to_string(), true),
                    Err(e) => (format!("did not come back: {e:#}"), false),
                };
                self.record(kind, text, started, outcome, "restarted", ok);
            }
            Op::KillDuringAttach {
                host,
                id,
                ports,
                after,
            } => {
                let outcome = self.kill_during_attach(*host, id, ports, *after)?;
                let key = Key::Agent(id.clone());
                let why = format!("op #{} {text}", self.report.ops.len() + 1);
                if outcome.kind == Kind::Ok {
                    self.model
                        .apply_attach(*host, key, ports, Kind::Ok, true, &why);
                } else {
                    // Cut off mid-way: it may or may not exist; the quiet point settles it.
                    self.model.unsettle(*host, key, &why);
                }
                let (text_out, ok) = match self.lab.wait_agent(*host, Duration::from_secs(30)) {
                    Ok(()) => (format!("attach answered {}; restarted", outcome.text), true),
                    Err(e) => (format!("did not come back: {e:#}"), false),
                };
                self.record(kind, text, started, text_out, "any answer; restarted", ok);
            }
            Op::DeleteRoute { host, pick } => {
                let outcome = match self.pick_endpoint(*host, *pick) {
                    None => "skipped: no endpoint".to_string(),
                    Some(e) => {
                        let ip = self.tamper_address(&e);
                        self.tamper(
                            *host,
                            &format!("{ip} via {}", e.host_ifname),
                            &[
                                "ip",
                                "route",
                                "del",
                                &invariants::Net::host(ip).to_string(),
                                "dev",
                                &e.host_ifname,
                            ],
                        )
                    }
                };
                self.record(kind, text, started, outcome, "", true);
            }
            Op::DeleteVeth { host, pick } => {
                let outcome = match self.pick_endpoint(*host, *pick) {
                    None => "skipped: no endpoint".to_string(),
                    Some(e) => self.tamper(
                        *host,
                        &format!("{} of {}", e.host_ifname, e.id),
                        &["ip", "link", "del", &e.host_ifname],
                    ),
                };
                self.record(kind, text, started, outcome, "", true);
            }
            Op::DeleteContainerInterface { host, pick } => {
                let outcome = match self.pick_endpoint(*host, *pick) {
                    None => "skipped: no endpoint".to_string(),
                    Some(e) => match invariants::in_netns(
                        &e.netns,
                        "ip",
                        &["link", "del", &e.ifname],
                        None,
                    ) {
                        Ok(_) => format!("deleted {} in {} ({})", e.ifname, e.netns, e.id),
                        Err(err) => format!("failed: {err:#}"),
                    },
                };
                self.record(kind, text, started, outcome, "", true);
            }
            Op::DeleteBlockRoute { host, pick } => {
                let outcome = self.delete_block_route(*host, *pick);
                self.record(kind, text, started, outcome, "", true);
            }
            Op::TamperRules { host, how } => {
                let outcome = self.tamper_rules(*host, *how);
                self.record(kind, text, started, outcome, "", true);
            }
            Op::FlipSysctl { host, pick, knob } => {
                let (template, value) = match self.ipv6_turn() {
                    true => ipv6_twin(SYSCTL_FLIPS[*knob]),
                    false => SYSCTL_FLIPS[*knob],
                };
                let path = if template.contains("{}") {
                    self.pick_endpoint(*host, *pick)
                        .map(|e| template.replace("{}", &e.host_ifname))
                } else {
                    Some(template.to_string())
                };
                let outcome = match path {
                    None => "skipped: no endpoint".to_string(),
                    Some(path) => self.tamper(
                        *host,
                        &format!("{path}={value}"),
                        &["sh", "-c", &format!("echo {value} > {path}")],
                    ),
                };
                self.record(kind, text, started, outcome, "", true);
            }
        }
        Ok(())
    }

    /// Whether `skip` leaves this operation out. A re-attach with other ports is one by what
    /// the model holds when it comes.
    pub(super) fn skipped(&self, op: &Op) -> bool {
        let skip = &self.options.skip;
        if skip.contains(op.kind()) {
            return true;
        }
        let (host, key, ports) = match op {
            Op::Attach { host, id, ports }
            | Op::KillDuringAttach {
                host, id, ports, ..
            } => (*host, Key::Agent(id.clone()), ports),
            Op::CniAdd {
                host,
                pod,
                net,
                ports,
            } => (
                *host,
                Key::Cni {
                    pod: *pod,
                    net: *net,
                },
                ports,
            ),
            _ => return false,
        };
        skip.contains("reattach-other-ports")
            && self.model.hosts[host]
                .get(&key)
                .is_some_and(|e| e.ports.as_ref() != Some(ports))
    }

    // ---- API and plugin calls ------------------------------------------------------------------

    pub(super) fn grpc_attach(&self, host: usize, id: &str, ports: &[Port]) -> Outcome {
        let request = attach_request(id, ports);
        let lab = &self.lab;
        self.rt.block_on(async {
            let mut client = match tokio::time::timeout(CALL_LIMIT, lab.client(host)).await {
                Ok(Ok(client)) => client,
                Ok(Err(e)) => return Outcome::new(Kind::Other, format!("cannot connect: {e:#}")),
                Err(_) => return Outcome::new(Kind::Other, "connect timed out"),
            };
            match tokio::time::timeout(CALL_LIMIT, client.attach(request)).await {
                Ok(Ok(response)) => {
                    let e = response.into_inner().endpoint.unwrap_or_default();
                    Outcome::new(Kind::Ok, format!("ok: {} {}", e.ip, e.host_ifname))
                }
                Ok(Err(status)) => Outcome::from_status(&status),
                Err(_) => Outcome::new(Kind::Other, format!("no answer within {CALL_LIMIT:?}")),
            }
        })
    }

    pub(super) fn grpc_detach(&self, host: usize, id: &str) -> Outcome {
        let lab = &self.lab;
        self.rt.block_on(async {
            let mut client = match tokio::time::timeout(CALL_LIMIT, lab.client(host)).await {
                Ok(Ok(client)) => client,
                Ok(Err(e)) => return Outcome::new(Kind::Other, format!("cannot connect: {e:#}")),
                Err(_) => return Outcome::new(Kind::Other, "connect timed out"),
            };
            let request = pb::DetachRequest {
                container_id: id.to_string(),
            };
            match tokio::time::timeout(CALL_LIMIT, client.detach(request)).await {
                Ok(Ok(_)) => Outcome::new(Kind::Ok, "ok"),
                Ok(Err(status)) => Outcome::from_status(&status),
                Err(_) => Outcome::new(Kind::Other, format!("no answer within {CALL_LIMIT:?}")),
            }
        })
    }

    /// Starts an attach, kills the agent `after` into it, restarts the agent. Returns what the
    /// attach answered (OK only when it completed before the kill).
    pub(super) fn kill_during_attach(
        &mut self,
        host: usize,
        id: &str,
        ports: &[Port],
        after: Duration,
    ) -> Result<Outcome> {
        let lab = &self.lab;
        let client = self
            .rt
            .block_on(async { tokio::time::timeout(CALL_LIMIT, lab.client(host)).await });
        let call = match client {
            Ok(Ok(mut client)) => {
                let request = attach_request(id, ports);
                Some(self.rt.spawn(async move {
                    match tokio::time::timeout(CALL_LIMIT, client.attach(request)).await {
                        Ok(Ok(_)) => Outcome::new(Kind::Ok, "ok"),
                        Ok(Err(status)) => Outcome::from_status(&status),
                        Err(_) => Outcome::new(Kind::Other, "no answer"),
                    }
                }))
            }
            _ => None,
        };
        std::thread::sleep(after);
        self.lab.stop_agent(host, Signal::SIGKILL)?;
        let outcome = match call {
            Some(call) => self
                .rt
                .block_on(call)
                .unwrap_or_else(|e| Outcome::new(Kind::Other, format!("task: {e}"))),
            None => Outcome::new(Kind::Other, "cannot connect"),
        };
        self.lab.start_agent(host)?;
        Ok(outcome)
    }

    pub(super) fn make_pod(&mut self, host: usize, pod: usize) -> Result<()> {
        if self.made_pods.insert((host, pod)) {
            sh::run("ip", &["netns", "add", &self.pods.name(host, pod)])?;
        }
        Ok(())
    }

    /// Runs weft-cni like a runtime does, for one network of host `host`.
    pub(super) fn cni(
        &self,
        host: usize,
        command: &str,
        pod: Option<usize>,
        net: usize,
        ports: &[Port],
        keep: &[usize],
    ) -> Outcome {
        let (network, ifname) = NETWORKS[net];
        let mut config = json!({
            "cniVersion": "1.1.0",
            "name": network,
            "type": "weft-cni",
            "socket": self.lab.hosts[host].socket,
        });
        if !ports.is_empty() {
            config["runtimeConfig"] = json!({"portMappings": ports.iter().map(|p| json!({
                "hostPort": p.host_port, "containerPort": p.container_port, "protocol": p.protocol,
            })).collect::<Vec<_>>()});
        }
        if command == "GC" {
            config["cni.dev/valid-attachments"] = Value::Array(
                keep.iter()
                    .map(|pod| json!({"containerID": format!("pod{pod}"), "ifname": ifname}))
                    .collect(),
            );
        }
        let mut child = Command::new(bin("weft-cni"));
        child
            .env("CNI_COMMAND", command)
            .env("CNI_PATH", "/usr/lib/cni")
            .env("CNI_IFNAME", ifname);
        if let Some(pod) = pod {
            child
                .env("CNI_CONTAINERID", format!("pod{pod}"))
                .env("CNI_NETNS", self.pods.path(host, pod));
        }
        let input = config.to_string();
        let out = match invariants::output_within(&mut child, Some(input.as_bytes()), CALL_LIMIT) {
            Ok(out) => out,
            Err(e) => return Outcome::new(Kind::Other, format!("{e:#}")),
        };
        let answer: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if out.status.success() {
            let ip = answer["ips"][0]["address"].as_str().unwrap_or("");
            return Outcome::new(Kind::Ok, format!("ok {ip}").trim_end().to_string());
        }
        let code = answer["code"].as_u64().unwrap_or(0);
        let msg = answer["msg"].as_str().unwrap_or("").to_string();
        let kind = match code {
            100 => Kind::AlreadyExists,
            11 if !msg.starts_with("cannot reach the agent") => Kind::Unavailable,
            _ => Kind::Other,
        };
        Outcome::new(kind, format!("CNI error {code}: {msg}"))
    }
}

pub(super) fn attach_request(id: &str, ports: &[Port]) -> pb::AttachRequest {
    pb::AttachRequest {
        container_id: id.to_string(),
        ports: ports
            .iter()
            .map(|p| pb::PortMapping {
                protocol: p.protocol.clone(),
                host_port: p.host_port.into(),
                container_port: p.container_port.into(),
            })
            .collect(),
        ..Default::default()
    }
}
