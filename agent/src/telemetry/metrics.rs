//! Prometheus metrics: the counters and histograms the agent updates, and their exposition.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::reconcile::steps::{Step, StepTimes};

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// A latency histogram with fixed buckets.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            if seconds <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(value.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Reconciliation passes by kind (full, routes only): how many, and the time each step took
/// over all of them.
#[derive(Default)]
pub struct PassTimes {
    /// `[full, routes]`.
    count: [AtomicU64; 2],
    /// Per kind, microseconds spent in each step (`Step::ALL`'s order).
    step_micros: [[AtomicU64; Step::ALL.len()]; 2],
}

impl PassTimes {
    pub fn record(&self, full: bool, steps: &StepTimes) {
        let kind = usize::from(!full);
        self.count[kind].fetch_add(1, Ordering::Relaxed);
        for (step, took) in steps.taken() {
            self.step_micros[kind][step as usize]
                .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        }
    }

    fn render(&self, out: &mut String) {
        let kinds = ["full", "routes"];
        let passes: Vec<(String, u64)> = kinds
            .iter()
            .zip(&self.count)
            .map(|(k, n)| (format!("{{pass=\"{k}\"}}"), n.load(Ordering::Relaxed)))
            .collect();
        let mut steps = vec![];
        for (kind, micros) in kinds.iter().zip(&self.step_micros) {
            for (step, m) in Step::ALL.iter().zip(micros) {
                let labels = format!("{{pass=\"{kind}\",step=\"{}\"}}", step.name());
                steps.push((labels, m.load(Ordering::Relaxed) as f64 / 1e6));
            }
        }
        family(
            out,
            "counter",
            "weft_reconcile_passes_total",
            "Reconciliation passes by kind: full (every resync interval) or routes only (after events).",
            &passes.iter().map(|(l, n)| (l.as_str(), *n)).collect::<Vec<_>>(),
        );
        family(
            out,
            "counter",
            "weft_reconcile_step_seconds_total",
            "Time spent in each step of the reconciliation passes, by kind of pass.",
            &steps
                .iter()
                .map(|(l, s)| (l.as_str(), *s))
                .collect::<Vec<_>>(),
        );
    }
}

/// Counters and histograms the agent updates as it works.
#[derive(Default)]
pub struct Metrics {
    pub attach_ok: AtomicU64,
    pub attach_failed: AtomicU64,
    pub detach_ok: AtomicU64,
    pub detach_failed: AtomicU64,
    pub attach_seconds: Histogram,
    pub detach_seconds: Histogram,
    pub reconcile_seconds: Histogram,
    pub passes: PassTimes,
    pub repairs: AtomicU64,
    /// Blocks given back to their pool after staying empty.
    pub blocks_released: AtomicU64,
    pub etcd_errors: AtomicU64,
    pub iptables_restores: AtomicU64,
    pub iptables_errors: AtomicU64,
    /// Set once the first full reconciliation is done.
    pub reconciled: AtomicBool,
    /// Unix milliseconds of the last reconciliation pass (liveness of the loops).
    pub last_pass_ms: AtomicU64,
}

/// Values read at scrape time.
pub struct Gauges {
    pub endpoints: usize,
    pub local_blocks: usize,
    pub peers_alive: usize,
    pub peers_down: usize,
    pub routes: usize,
    pub rules: usize,
    pub etcd_connected: bool,
    /// BGP sessions by state (empty without --bgp).
    pub bgp_sessions: Vec<(String, usize)>,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One metric's HELP and TYPE lines and its samples.
fn family<T: std::fmt::Display>(
    out: &mut String,
    kind: &str,
    name: &str,
    help: &str,
    values: &[(&str, T)],
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in values {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

impl Metrics {
    /// The Prometheus text exposition: counters and histograms kept here, gauges read now.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::new();
        self.render_counters(&mut out);
        self.render_gauges(&mut out, gauges);
        out
    }

    fn render_counters(&self, out: &mut String) {
        let out = &mut *out;
        let counter = |out: &mut String, name: &str, help: &str, values: &[(&str, u64)]| {
            family(out, "counter", name, help, values)
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            out,
            "weft_attach_total",
            "Attach requests by result.",
            &[
                ("{result=\"ok\"}", load(&self.attach_ok)),
                ("{result=\"error\"}", load(&self.attach_failed)),
            ],
        );
        counter(
            out,
            "weft_detach_total",
            "Detach requests by result.",
            &[
                ("{result=\"ok\"}", load(&self.detach_ok)),
                ("{result=\"error\"}", load(&self.detach_failed)),
            ],
        );
        self.attach_seconds.render(
            out,
            "weft_attach_duration_seconds",
            "Time to serve an attach request.",
        );
        self.detach_seconds.render(
            out,
            "weft_detach_duration_seconds",
            "Time to serve a detach request.",
        );
        self.reconcile_seconds.render(
            out,
            "weft_reconcile_duration_seconds",
            "Time of one reconciliation pass.",
        );
        self.passes.render(out);
        counter(
            out,
            "weft_repairs_total",
            "Kernel objects the reconciler had to add, change or remove.",
            &[("", load(&self.repairs))],
        );
        counter(
            out,
            "weft_blocks_released_total",
            "Blocks of this host given back to their pool after staying empty.",
            &[("", load(&self.blocks_released))],
        );
        counter(
            out,
            "weft_etcd_errors_total",
            "Failed etcd requests.",
            &[("", load(&self.etcd_errors))],
        );
        counter(
            out,
            "weft_iptables_restore_total",
            "iptables-restore runs by result.",
            &[
                ("{result=\"ok\"}", load(&self.iptables_restores)),
                ("{result=\"error\"}", load(&self.iptables_errors)),
            ],
        );
    }

    fn render_gauges(&self, out: &mut String, gauges: &Gauges) {
        let gauge = |out: &mut String, name: &str, help: &str, values: &[(&str, usize)]| {
            family(out, "gauge", name, help, values)
        };
        gauge(
            out,
            "weft_endpoints",
            "Endpoints on this host.",
            &[("", gauges.endpoints)],
        );
        gauge(
            out,
            "weft_local_blocks",
            "Blocks owned by this host.",
            &[("", gauges.local_blocks)],
        );
        gauge(
            out,
            "weft_peers",
            "Other hosts by liveness.",
            &[
                ("{state=\"alive\"}", gauges.peers_alive),
                ("{state=\"down\"}", gauges.peers_down),
            ],
        );
        gauge(
            out,
            "weft_routes",
            "Routes with proto weft in the kernel.",
            &[("", gauges.routes)],
        );
        gauge(
            out,
            "weft_iptables_rules",
            "Rules in the WEFT-* chains.",
            &[("", gauges.rules)],
        );
        gauge(
            out,
            "weft_etcd_connected",
            "Whether etcd answered the last request.",
            &[("", gauges.etcd_connected as usize)],
        );
        if !gauges.bgp_sessions.is_empty() {
            let labels: Vec<(String, usize)> = gauges
                .bgp_sessions
                .iter()
                .map(|(state, n)| (format!("{{state=\"{state}\"}}"), *n))
                .collect();
            let values: Vec<(&str, usize)> = labels.iter().map(|(l, n)| (l.as_str(), *n)).collect();
            gauge(
                out,
                "weft_bgp_sessions",
                "BGP sessions of this host's bird by state.",
                &values,
            );
        }
        gauge(
            out,
            "weft_ready",
            "Whether the first reconciliation is done and etcd answers.",
            &[(
                "",
                (self.reconciled.load(Ordering::Relaxed) && gauges.etcd_connected) as usize,
            )],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(30));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "help");
        assert!(out.contains("x_seconds_bucket{le=\"0.001\"} 1"));
        assert!(out.contains("x_seconds_bucket{le=\"0.05\"} 2"));
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(out.contains("x_seconds_count 2"));
    }

    #[test]
    fn pass_times_add_up_by_kind_and_step() {
        let passes = PassTimes::default();
        let mut laps = crate::reconcile::steps::Laps::start();
        std::thread::sleep(Duration::from_millis(2));
        laps.lap(Step::Firewall);
        passes.record(true, &laps.times());
        passes.record(true, &laps.times());
        passes.record(false, &Default::default());
        let mut out = String::new();
        passes.render(&mut out);
        assert!(
            out.contains("weft_reconcile_passes_total{pass=\"full\"} 2"),
            "{out}"
        );
        assert!(
            out.contains("weft_reconcile_passes_total{pass=\"routes\"} 1"),
            "{out}"
        );
        let firewall: f64 = out
            .lines()
            .find_map(|l| {
                l.strip_prefix(
                    "weft_reconcile_step_seconds_total{pass=\"full\",step=\"firewall\"} ",
                )
            })
            .and_then(|v| v.parse().ok())
            .expect("the full passes' firewall step");
        assert!(firewall >= 0.004, "{out}");
        assert!(
            out.contains(
                "weft_reconcile_step_seconds_total{pass=\"routes\",step=\"firewall\"} 0\n"
            ),
            "{out}"
        );
    }
}
