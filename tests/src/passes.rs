//! An agent's reconciler totals, read from its metrics: per kind of pass (`full` every resync
//! interval, `routes` after events), the passes made and the seconds each step took. Two
//! readings give what happened between them: the endpoints bench times full passes at rest, the
//! soak compares the first third of its run with the last, step by step.

use std::collections::BTreeMap;

use anyhow::{Context, Result};

/// The kinds of pass an agent counts.
pub const KINDS: [&str; 2] = ["full", "routes"];

/// One kind of pass: how many, and the seconds spent in each step over all of them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Kind {
    pub passes: u64,
    pub steps: BTreeMap<String, f64>,
}

impl Kind {
    /// The mean pass in milliseconds (0 without passes).
    pub fn mean_ms(&self) -> f64 {
        match self.passes {
            0 => 0.0,
            n => self.steps.values().sum::<f64>() / n as f64 * 1e3,
        }
    }

    /// `registration=12.0 read_kernel=40.1 …`: each step's mean per pass in milliseconds, the
    /// steps that took a tenth of a millisecond or more.
    pub fn steps_ms(&self) -> String {
        let n = self.passes.max(1) as f64;
        self.steps
            .iter()
            .map(|(step, s)| (step, s / n * 1e3))
            .filter(|(_, ms)| *ms >= 0.1)
            .map(|(step, ms)| format!("{step}={ms:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Totals by kind of pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub kinds: BTreeMap<String, Kind>,
}

impl Totals {
    /// The totals in an agent's metrics text.
    pub fn parse(metrics: &str) -> Result<Totals> {
        let mut totals = Totals::default();
        let mut seen = false;
        for line in metrics.lines() {
            if let Some(rest) = line.strip_prefix("weft_reconcile_passes_total{") {
                let (labels, value) = rest.split_once("} ").context("a malformed pass count")?;
                let kind = label(labels, "pass").context("a pass count without its kind")?;
                totals.kind(kind).passes = value.trim().parse().context("a pass count")?;
                seen = true;
            } else if let Some(rest) = line.strip_prefix("weft_reconcile_step_seconds_total{") {
                let (labels, value) = rest.split_once("} ").context("a malformed step time")?;
                let kind = label(labels, "pass").context("a step time without its kind")?;
                let step = label(labels, "step").context("a step time without its step")?;
                let seconds = value.trim().parse().context("a step time")?;
                totals.kind(kind).steps.insert(step.to_string(), seconds);
            }
        }
        anyhow::ensure!(seen, "no weft_reconcile_passes_total in the metrics");
        Ok(totals)
    }

    /// The totals of the agent in namespace `ns` now.
    pub fn read(ns: &str) -> Result<Totals> {
        let (_, body) = crate::sh::http_get(ns, 9099, "/metrics")?;
        Totals::parse(&body).with_context(|| format!("the reconciler totals of {ns}"))
    }

    fn kind(&mut self, kind: &str) -> &mut Kind {
        self.kinds.entry(kind.to_string()).or_default()
    }

    /// A kind's totals (empty when it made no pass).
    pub fn of(&self, kind: &str) -> Kind {
        self.kinds.get(kind).cloned().unwrap_or_default()
    }

    /// What happened from `earlier` to these totals; None when a total went down (the agent
    /// restarted in between, and the interval says nothing).
    pub fn since(&self, earlier: &Totals) -> Option<Totals> {
        let mut delta = Totals::default();
        for (name, now) in &self.kinds {
            let before = earlier.of(name);
            let passes = now.passes.checked_sub(before.passes)?;
            let mut steps = BTreeMap::new();
            for (step, seconds) in &now.steps {
                let took = seconds - before.steps.get(step).copied().unwrap_or(0.0);
                if took < 0.0 {
                    return None;
                }
                steps.insert(step.clone(), took);
            }
            delta.kinds.insert(name.clone(), Kind { passes, steps });
        }
        Some(delta)
    }

    /// Adds another interval's totals to these.
    pub fn add(&mut self, other: &Totals) {
        for (name, more) in &other.kinds {
            let kind = self.kind(name);
            kind.passes += more.passes;
            for (step, seconds) in &more.steps {
                *kind.steps.entry(step.clone()).or_default() += seconds;
            }
        }
    }
}

/// A label's value in `a="x",b="y"`.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    labels.split(',').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then(|| value.trim_matches('"'))
    })
}

/// The passes of the first and of the last third of a run, from totals sampled through it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trend {
    pub early: Totals,
    pub late: Totals,
}

/// Splits a run's samples into thirds of its intervals; an interval spanning a restart of the
/// agent is left out.
pub fn trend(samples: &[Totals]) -> Trend {
    let intervals: Vec<Totals> = samples
        .windows(2)
        .filter_map(|w| w[1].since(&w[0]))
        .collect();
    let third = (intervals.len() / 3).max(1).min(intervals.len());
    let sum = |part: &[Totals]| {
        part.iter().fold(Totals::default(), |mut all, t| {
            all.add(t);
            all
        })
    };
    Trend {
        early: sum(&intervals[..third]),
        late: sum(&intervals[intervals.len() - third..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(full: u64, routes: u64, full_routes_s: f64, routes_routes_s: f64) -> String {
        format!(
            "# HELP weft_reconcile_passes_total x\n\
             weft_reconcile_passes_total{{pass=\"full\"}} {full}\n\
             weft_reconcile_passes_total{{pass=\"routes\"}} {routes}\n\
             weft_reconcile_step_seconds_total{{pass=\"full\",step=\"routes\"}} {full_routes_s}\n\
             weft_reconcile_step_seconds_total{{pass=\"full\",step=\"firewall\"}} 0.5\n\
             weft_reconcile_step_seconds_total{{pass=\"routes\",step=\"routes\"}} {routes_routes_s}\n"
        )
    }

    #[test]
    fn totals_parse_by_kind_and_step() {
        let totals = Totals::parse(&metrics(10, 40, 0.1, 0.2)).unwrap();
        let full = totals.of("full");
        assert_eq!(full.passes, 10);
        assert_eq!(full.steps["firewall"], 0.5);
        assert!((full.mean_ms() - 60.0).abs() < 1e-9);
        assert_eq!(full.steps_ms(), "firewall=50.0 routes=10.0");
        assert!((totals.of("routes").mean_ms() - 5.0).abs() < 1e-9);
        assert!(Totals::parse("weft_attach_total 3\n").is_err());
    }

    #[test]
    fn the_trend_compares_thirds_and_skips_restarts() {
        // Full passes of 10 ms, a restart, then of 20 ms.
        let samples: Vec<Totals> = [
            (0, 0.0),
            (10, 0.1),
            (20, 0.2),
            (1, 0.02),
            (11, 0.22),
            (21, 0.42),
        ]
        .iter()
        .map(|(n, s)| Totals::parse(&metrics(*n, 0, *s, 0.0)).unwrap())
        .map(|mut t| {
            t.kinds.get_mut("full").unwrap().steps.remove("firewall");
            t
        })
        .collect();
        let trend = trend(&samples);
        assert!((trend.early.of("full").mean_ms() - 10.0).abs() < 1e-9);
        assert!((trend.late.of("full").mean_ms() - 20.0).abs() < 1e-9);
        assert_eq!(trend.late.of("routes").mean_ms(), 0.0);
        assert_eq!(super::trend(&[]), Trend::default());
    }
}
