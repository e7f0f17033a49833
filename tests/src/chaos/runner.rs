//! The run: bursts, fault windows, and the quiet points where the lab is judged.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::Result;
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::invariants::{self, Endpoint, Family, Snapshot, Violation};
use crate::sh;

use super::*;

impl Chaos {
    pub(super) fn run_all(&mut self) -> Result<()> {
        let mut rng = StdRng::seed_from_u64(self.options.seed);
        // The quiet point of an empty lab: the baseline everything else is judged against.
        if !self.quiet_point()? && !self.options.keep_going {
            return Ok(());
        }
        while self.started.elapsed() < self.options.duration {
            self.burst += 1;
            self.report.bursts = self.burst;
            let burst = gen_burst(&mut rng, self.options.hosts, self.burst);
            let ran = self.run_burst(&burst);
            // Whatever happened, etcd answers and no host is cut off before the quiet point.
            self.end_window()?;
            ran?;
            if !self.report.failures.is_empty() && !self.options.keep_going {
                return Ok(());
            }
            if !self.quiet_point()? && !self.options.keep_going {
                return Ok(());
            }
        }
        Ok(())
    }

    pub(super) fn now(&self) -> Duration {
        self.started.elapsed()
    }

    pub(super) fn record(
        &mut self,
        kind: &str,
        op: impl Into<String>,
        started: Instant,
        outcome: impl Into<String>,
        expected: impl Into<String>,
        ok: bool,
    ) {
        let record = OpRecord {
            n: self.report.ops.len() + 1,
            burst: self.burst,
            at: started.duration_since(self.started),
            took: started.elapsed(),
            kind: kind.to_string(),
            op: op.into(),
            outcome: outcome.into(),
            expected: expected.into(),
            ok,
        };
        if self.options.verbose {
            eprintln!("{record}");
        }
        if !ok {
            self.fail(format!("operation #{}: {}", record.n, record), vec![]);
        }
        self.report.ops.push(record);
    }

    pub(super) fn fail(&mut self, what: String, violations: Vec<Violation>) {
        if self.report.log_tails.is_empty() {
            self.report.log_tails = (0..self.lab.hosts.len())
                .map(|i| {
                    let log = self.lab.agent_log(i);
                    let lines: Vec<&str> = log.lines().collect();
                    let tail = lines[lines.len().saturating_sub(25)..].join("\n");
                    (self.lab.hosts[i].name.clone(), tail)
                })
                .collect();
        }
        let all = violations.len();
        let violations: Vec<Violation> = violations
            .into_iter()
            .filter(|v| self.reported.insert(v.clone()))
            .collect();
        let repeated = all - violations.len();
        if self.options.verbose {
            eprintln!("FAILURE in burst {}: {what}", self.burst);
            for v in &violations {
                eprintln!("  {v}");
            }
            if repeated > 0 {
                eprintln!("  (and {repeated} violation(s) reported before)");
            }
        }
        self.report.failures.push(Failure {
            burst: self.burst,
            at: self.now(),
            what,
            violations,
            repeated,
        });
    }

    pub(super) fn reachable(&self, host: usize) -> bool {
        !self.etcd_paused && !self.partitioned.contains(&host)
    }

    pub(super) fn run_burst(&mut self, burst: &Burst) -> Result<()> {
        let window_started = Instant::now();
        let length = match &burst.window {
            None => Duration::ZERO,
            Some(window) if self.options.skip.contains(window.kind()) => {
                let text = window.to_string();
                self.record(
                    window.kind(),
                    text,
                    window_started,
                    "skipped (--skip)",
                    "",
                    true,
                );
                Duration::ZERO
            }
            Some(window) => {
                match window {
                    Window::EtcdPause(_) => {
                        self.lab.pause_etcd()?;
                        self.etcd_paused = true;
                    }
                    Window::Partition(host, _) => {
                        self.lab.partition_from_etcd(*host)?;
                        self.partitioned.insert(*host);
                    }
                }
                let text = window.to_string();
                self.record(window.kind(), text, window_started, "done", "", true);
                match window {
                    Window::EtcdPause(length) | Window::Partition(_, length) => *length,
                }
            }
        };
        for op in &burst.ops {
            self.check_agents_alive()?;
            self.run_op(op)?;
            if !self.report.failures.is_empty() && !self.options.keep_going {
                return Ok(());
            }
        }
        if let Some(rest) = length.checked_sub(window_started.elapsed()) {
            std::thread::sleep(rest);
        }
        Ok(())
    }

    pub(super) fn end_window(&mut self) -> Result<()> {
        if self.etcd_paused {
            let started = Instant::now();
            self.lab.resume_etcd()?;
            self.etcd_paused = false;
            self.record(
                "etcd-pause",
                "etcd resumed (SIGCONT)",
                started,
                "done",
                "",
                true,
            );
        }
        for host in std::mem::take(&mut self.partitioned) {
            let started = Instant::now();
            self.lab.heal_partition(host)?;
            let text = format!("partition of {} healed", h(host));
            self.record("partition", text, started, "done", "", true);
        }
        Ok(())
    }

    /// An agent that died without being killed by the run is a failure; it is restarted so
    /// the run can go on.
    pub(super) fn check_agents_alive(&mut self) -> Result<()> {
        for host in 0..self.lab.hosts.len() {
            if !self.lab.agent_alive(host) {
                self.fail(
                    format!("the agent of {} died without being killed", h(host)),
                    vec![],
                );
                self.lab.stop_agent(host, Signal::SIGKILL)?;
                self.lab.start_agent(host)?;
                self.lab.wait_agent(host, Duration::from_secs(30))?;
            }
        }
        Ok(())
    }

    /// Waits for the lab to converge and judges it; false when it did not pass.
    pub(super) fn quiet_point(&mut self) -> Result<bool> {
        self.check_agents_alive()?;
        self.report.quiet_points += 1;
        let started = Instant::now();
        let result = {
            let Chaos {
                lab, model, pods, ..
            } = &*self;
            invariants::wait_quiet_with(lab, self.options.quiet_limit, |snap| {
                model.check(snap, pods)
            })
        };
        match result {
            Ok(quiet) => {
                let unreachable = self.probe(&quiet.snapshot);
                self.model.settle(&quiet.snapshot, &self.pods);
                let outcome = format!(
                    "quiet after {:.1}s ({} checks, {:.0}ms a snapshot): {}",
                    quiet.took.as_secs_f64(),
                    quiet.attempts,
                    quiet.snapshot.took.as_secs_f64() * 1e3,
                    quiet.coverage
                );
                if unreachable.is_empty() {
                    self.record("quiet-point", "quiet point", started, outcome, "", true);
                    return Ok(true);
                }
                self.record(
                    "quiet-point",
                    "quiet point",
                    started,
                    format!("{outcome}; pings failed"),
                    "",
                    true,
                );
                self.fail("quiet point: sampled pings failed".into(), unreachable);
                Ok(false)
            }
            Err(unquiet) => {
                self.record(
                    "quiet-point",
                    "quiet point",
                    started,
                    format!(
                        "NOT quiet after {:.1}s: {} violation(s)",
                        unquiet.took.as_secs_f64(),
                        unquiet.violations.len()
                    ),
                    "",
                    true,
                );
                self.fail(
                    format!("quiet point: {} violation(s)", unquiet.violations.len()),
                    unquiet.violations,
                );
                if let Some(snap) = &unquiet.snapshot {
                    self.model.rebase(snap, &self.pods);
                }
                Ok(false)
            }
        }
    }

    /// Sampled data-path checks: from one endpoint of each host to one on another host.
    pub(super) fn probe(&mut self, snap: &Snapshot) -> Vec<Violation> {
        let all: Vec<(usize, Endpoint)> = (0..snap.hosts.len())
            .flat_map(|h| snap.endpoints_of(h).into_iter().map(move |e| (h, e)))
            .collect();
        // Only namespaces with a primary interface (eth0) have a default route: a namespace
        // left with only a secondary network has no way back, by the contract's rule.
        let primary: BTreeSet<&str> = all
            .iter()
            .filter(|(_, e)| e.ifname == "eth0")
            .map(|(_, e)| e.netns.as_str())
            .collect();
        let mut pairs = vec![];
        for host in 0..snap.hosts.len() {
            let mine: Vec<&(usize, Endpoint)> = all
                .iter()
                .filter(|(h, e)| *h == host && e.ifname == "eth0")
                .collect();
            let theirs: Vec<&(usize, Endpoint)> = all
                .iter()
                .filter(|(h, e)| *h != host && primary.contains(e.netns.as_str()))
                .collect();
            if mine.is_empty() || theirs.is_empty() {
                continue;
            }
            let src = mine[self.probe_rng.gen_range(0..mine.len())];
            let dst = theirs[self.probe_rng.gen_range(0..theirs.len())];
            pairs.push((src.clone(), dst.clone()));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut failed = vec![];
        for ((sh_, src), (dh, dst)) in pairs {
            let ns = src.netns.trim_start_matches("/run/netns/").to_string();
            // Each family both ends have (both, on a dual-stack lab).
            for family in [Family::V4, Family::V6] {
                let (Some(from), Some(to)) = (src.address(family), dst.address(family)) else {
                    continue;
                };
                let mut answered = false;
                loop {
                    if sh::ping(&ns, &to.to_string()) {
                        answered = true;
                        break;
                    }
                    if Instant::now() > deadline {
                        break;
                    }
                }
                if !answered {
                    failed.push(Violation::new(
                        &snap.hosts[sh_].name,
                        format!(
                            "path {} ({from}) -> {to} ({} on {})",
                            src.id, dst.id, snap.hosts[dh].name
                        ),
                        "ping answered",
                        "no answer",
                    ));
                }
            }
        }
        failed
    }
}
