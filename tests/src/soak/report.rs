//! The soak's verdict: failed requests judged against the fault windows, ping losses, leaks,
//! memory and reconcile times. Judging is pure; `print` shows it.

use std::fmt::Write;

use tonic::Code;

use super::churn::Failed;
use crate::passes::{Trend, KINDS};

/// A time during which requests may answer `UNAVAILABLE`: an agent down or an etcd member
/// restarting (Unix seconds).
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub what: String,
    /// The host whose requests it excuses; None: every host (etcd).
    pub host: Option<usize>,
    pub start: f64,
    pub end: f64,
}

impl Window {
    fn covers(&self, failed: &Failed) -> bool {
        self.host.is_none_or(|h| h == failed.host)
            && failed.at >= self.start
            && failed.at <= self.end
    }
}

/// Failed requests no window excuses: anything but `UNAVAILABLE`, or `UNAVAILABLE` outside
/// every window.
pub fn unexcused<'a>(failed: &'a [Failed], windows: &[Window]) -> Vec<&'a Failed> {
    failed
        .iter()
        .filter(|f| f.code != Code::Unavailable || !windows.iter().any(|w| w.covers(f)))
        .collect()
}

/// Per host: (name, memory early, memory at the end) in KiB.
pub type Memory = Vec<(String, u64, u64)>;
/// Per host: its passes in the first third of the run and in the last.
pub type Reconcile = Vec<(String, Trend)>;

#[derive(Debug, Default)]
pub struct SoakReport {
    /// Unix time the churn started (windows and failures are shown relative to it).
    pub started: f64,
    pub seconds: f64,
    pub attaches: u64,
    pub detaches: u64,
    pub failed: Vec<Failed>,
    pub windows: Vec<Window>,
    /// (pair, replies, losses with their time).
    pub pings: Vec<(String, usize, Vec<f64>)>,
    pub leaks: Vec<String>,
    pub memory: Memory,
    pub reconcile: Reconcile,
}

/// The memory bound: the end within 1.2x of the early figure.
pub const MEMORY_GROWTH: f64 = 1.2;
/// Reconcile time is flat when the late mean is within 2x of the early one (or under 5 ms: the
/// machine's noise at that scale is larger than any trend). A kind of pass is judged only when
/// both thirds hold at least 10 of them: a mean of two or three passes is one pass that met a
/// fault window or a busy moment (in a 3-minute run, routes passes come a few per third).
pub const RECONCILE_GROWTH: f64 = 2.0;
const RECONCILE_FLOOR_MS: f64 = 5.0;
const RECONCILE_MIN_PASSES: u64 = 10;

impl SoakReport {
    pub fn lost_pings(&self) -> usize {
        self.pings.iter().map(|(_, _, lost)| lost.len()).sum()
    }

    /// Every reason the run fails, one sentence each.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = vec![];
        for f in unexcused(&self.failed, &self.windows) {
            problems.push(format!(
                "{} on host {} answered {:?} at +{:.1} s, outside every fault window: {}",
                f.what,
                f.host,
                f.code,
                f.at - self.started,
                f.message
            ));
        }
        if self.lost_pings() > 0 {
            problems.push(format!("{} pings lost", self.lost_pings()));
        }
        problems.extend(self.leaks.iter().map(|l| format!("leak: {l}")));
        for (host, early, end) in &self.memory {
            if *end as f64 > *early as f64 * MEMORY_GROWTH {
                problems.push(format!(
                    "{host}: agent memory grew from {early} KiB to {end} KiB"
                ));
            }
        }
        for (host, trend) in &self.reconcile {
            let mut judged = 0;
            for kind in KINDS {
                let (early, late) = (trend.early.of(kind), trend.late.of(kind));
                if early.passes.min(late.passes) < RECONCILE_MIN_PASSES {
                    continue;
                }
                judged += 1;
                let (early, late) = (early.mean_ms(), late.mean_ms());
                if late > RECONCILE_FLOOR_MS && late > early * RECONCILE_GROWTH {
                    problems.push(format!(
                        "{host}: mean {kind} pass went from {early:.1} ms to {late:.1} ms"
                    ));
                }
            }
            // Full passes come every resync interval: a run without enough of them to judge
            // cannot say reconcile time stayed flat.
            if judged == 0 {
                problems.push(format!(
                    "{host}: too few reconcile passes in a third to judge their time"
                ));
            }
        }
        if self.attaches == 0 {
            problems.push("no attach was made".into());
        }
        problems
    }

    pub fn passed(&self) -> bool {
        self.problems().is_empty()
    }

    pub fn print(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "soak: {:.0} s, {} attaches, {} detaches ({:.1} operations/s), {} answers other than OK \
             ({} excused by a fault window)",
            self.seconds,
            self.attaches,
            self.detaches,
            (self.attaches + self.detaches) as f64 / self.seconds.max(1.0),
            self.failed.len(),
            self.failed.len() - unexcused(&self.failed, &self.windows).len(),
        );
        for w in &self.windows {
            let _ = writeln!(
                out,
                "  window: {} at +{:.1} s for {:.1} s",
                w.what,
                w.start - self.started,
                w.end - w.start
            );
        }
        let replies: usize = self.pings.iter().map(|(_, r, _)| r).sum();
        let _ = writeln!(
            out,
            "pings: {} pairs, {replies} replies, {} lost",
            self.pings.len(),
            self.lost_pings()
        );
        for (host, early, end) in &self.memory {
            let _ = writeln!(
                out,
                "  {host}: agent memory {early} KiB early, {end} KiB at the end"
            );
        }
        for (host, trend) in &self.reconcile {
            for kind in KINDS {
                let (early, late) = (trend.early.of(kind), trend.late.of(kind));
                let _ = writeln!(
                    out,
                    "  {host}: mean {kind} pass {:.1} ms ({} passes) in the first third of the \
                     churn, {:.1} ms ({} passes) in the last\n    early steps (ms): {}\n    \
                     late steps (ms):  {}",
                    early.mean_ms(),
                    early.passes,
                    late.mean_ms(),
                    late.passes,
                    early.steps_ms(),
                    late.steps_ms(),
                );
            }
        }
        let problems = self.problems();
        let _ = writeln!(out, "leaks: {}", self.leaks.len());
        match problems.is_empty() {
            true => out.push_str("PASSED\n"),
            false => {
                for p in problems {
                    let _ = writeln!(out, "PROBLEM {p}");
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(at: f64, host: usize, code: Code) -> Failed {
        Failed {
            at,
            host,
            what: "attach",
            code,
            message: String::new(),
        }
    }

    #[test]
    fn only_unavailable_answers_inside_a_window_of_their_host_are_excused() {
        let windows = [
            Window {
                what: "agent of host 1 killed".into(),
                host: Some(1),
                start: 10.0,
                end: 20.0,
            },
            Window {
                what: "etcd member 2 restarted".into(),
                host: None,
                start: 50.0,
                end: 55.0,
            },
        ];
        let all = [
            failed(15.0, 1, Code::Unavailable),
            failed(15.0, 0, Code::Unavailable),
            failed(52.0, 2, Code::Unavailable),
            failed(15.0, 1, Code::Internal),
            failed(30.0, 1, Code::Unavailable),
        ];
        let left: Vec<(f64, usize)> = unexcused(&all, &windows)
            .iter()
            .map(|f| (f.at, f.host))
            .collect();
        assert_eq!(left, [(15.0, 0), (15.0, 1), (30.0, 1)]);
    }

    #[test]
    fn memory_growth_and_slower_reconciles_fail_the_run() {
        let report = SoakReport {
            seconds: 60.0,
            attaches: 10,
            memory: vec![("h1".into(), 10_000, 11_000), ("h2".into(), 10_000, 13_000)],
            reconcile: vec![
                ("h1".into(), full_passes(2.0, 4.5, 10)),
                ("h2".into(), full_passes(10.0, 30.0, 10)),
                // Too few passes in a third for their mean to be a trend, and so nothing
                // judged at all.
                ("h3".into(), full_passes(1.0, 7.0, 6)),
            ],
            ..Default::default()
        };
        let problems = report.problems();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].starts_with("h2: agent memory"));
        assert!(problems[1].starts_with("h2: mean full pass"));
        assert!(problems[2].starts_with("h3: too few reconcile passes"));
    }

    /// A trend of `passes` full passes taking `early` ms each in the first third and `late` in
    /// the last.
    fn full_passes(early: f64, late: f64, passes: u64) -> Trend {
        let totals = |ms: f64| {
            crate::passes::Totals::parse(&format!(
                "weft_reconcile_passes_total{{pass=\"full\"}} {passes}\n\
                 weft_reconcile_step_seconds_total{{pass=\"full\",step=\"routes\"}} {}\n",
                ms * passes as f64 / 1e3
            ))
            .unwrap()
        };
        Trend {
            early: totals(early),
            late: totals(late),
        }
    }
}
