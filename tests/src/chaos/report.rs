//! What a chaos run reports: each operation as it ran, each failure, the whole run.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::invariants::Violation;

/// One operation as it ran.
#[derive(Debug, Clone)]
pub struct OpRecord {
    pub n: usize,
    pub burst: usize,
    /// Since the start of the run.
    pub at: Duration,
    pub took: Duration,
    /// One of [`KINDS`], or `quiet-point`.
    pub kind: String,
    pub op: String,
    pub outcome: String,
    /// What the contract allows, when the operation has an answer to judge.
    pub expected: String,
    pub ok: bool,
}

impl fmt::Display for OpRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{:<3} b{:<3} +{:>6.1}s {:>6.0}ms  {} -> {}",
            self.n,
            self.burst,
            self.at.as_secs_f64(),
            self.took.as_secs_f64() * 1e3,
            self.op,
            self.outcome
        )?;
        if !self.ok {
            write!(f, "   UNEXPECTED (allowed: {})", self.expected)?;
        }
        Ok(())
    }
}

/// Something that broke: an unexpected answer, or a quiet point that did not converge.
#[derive(Debug, Clone)]
pub struct Failure {
    pub burst: usize,
    pub at: Duration,
    pub what: String,
    /// The violations not reported by an earlier failure of the run.
    pub violations: Vec<Violation>,
    /// How many more were still there from earlier failures (keep-going runs).
    pub repeated: usize,
}

/// The whole run.
#[derive(Debug, Clone, Default)]
pub struct ChaosReport {
    pub seed: u64,
    pub hosts: usize,
    pub stack: super::Stack,
    pub planned: Duration,
    /// Kinds left out (`skip`).
    pub skipped: Vec<String>,
    pub elapsed: Duration,
    pub bursts: usize,
    pub quiet_points: usize,
    pub ops: Vec<OpRecord>,
    pub failures: Vec<Failure>,
    /// The agents' last log lines when the first failure happened.
    pub log_tails: Vec<(String, String)>,
}

impl ChaosReport {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// One paragraph: seed, outcome, counts, how to replay.
    pub fn summary(&self) -> String {
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for op in self
            .ops
            .iter()
            .filter(|o| !o.outcome.starts_with("skipped"))
        {
            *kinds.entry(op.kind.as_str()).or_default() += 1;
        }
        format!(
            "chaos seed: {}\nresult: {} after {:.1}s (planned {:.1} min, {} hosts, {}): {} bursts, \
             {} operations, {} quiet points, {} failure(s)\nmix: {}{}\nreplay: WEFT_CHAOS_SEED={} \
             WEFT_CHAOS_STACK={} cargo nextest run -p weft-tests --test chaos, or weft-lab chaos \
             --seed {} --stack {}",
            self.seed,
            if self.passed() { "PASSED" } else { "FAILED" },
            self.elapsed.as_secs_f64(),
            self.planned.as_secs_f64() / 60.0,
            self.hosts,
            self.stack,
            self.bursts,
            self.ops.len(),
            self.quiet_points,
            self.failures.len(),
            kinds
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            if self.skipped.is_empty() {
                String::new()
            } else {
                format!("\nskipped kinds: {}", self.skipped.join(","))
            },
            self.seed,
            self.stack,
            self.seed,
            self.stack,
        )
    }

    /// Everything: the summary, every operation, every failure with its violations.
    pub fn render(&self) -> String {
        let mut out = self.summary();
        out.push_str("\noperations:\n");
        for op in &self.ops {
            out.push_str(&format!("  {op}\n"));
        }
        if !self.failures.is_empty() {
            out.push_str("failures:\n");
            for f in &self.failures {
                out.push_str(&format!(
                    "  burst {} at +{:.1}s: {}\n",
                    f.burst,
                    f.at.as_secs_f64(),
                    f.what
                ));
                for v in &f.violations {
                    out.push_str(&format!("    {v}\n"));
                }
                if f.repeated > 0 {
                    out.push_str(&format!(
                        "    (and {} violation(s) reported before)\n",
                        f.repeated
                    ));
                }
            }
            for (host, tail) in &self.log_tails {
                out.push_str(&format!("---- last log lines of {host} ----\n{tail}\n"));
            }
            out.push_str(&format!("chaos seed: {}\n", self.seed));
        }
        out
    }
}
