//! The benchmark (`weft-bench`, run by `deploy/bench/run`): weft against the CNI reference
//! plugins (ptp + host-local, + portmap) and the kernel, measured in the same run on the same
//! machine. Each case is one module with one job; it builds its own lab, removes it, and adds
//! its figures to the [`Report`] (a table and `BENCH key=value` lines).
//!
//! Adding a case: a module with `pub fn run(report: &mut Report, options: &Options) -> Result<()>`
//! and one line in [`CASES`].

pub mod attach;
pub mod baseline;
pub mod batch;
pub mod client;
pub mod cni;
pub mod convergence;
pub mod cpu;
pub mod dataplane;
pub mod dualstack;
pub mod endpoints;
pub mod fleet;
pub mod floor;
pub mod policy;
pub mod ports;
pub mod report;
pub mod restart;
pub mod scale;

use anyhow::{bail, Context, Result};

pub use report::{timed, Better, Ratio, Report, Run};

/// Client threads of the concurrent runs.
pub const CONCURRENCY: usize = 8;

/// What every case is told.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Smaller sizes, for a smoke run.
    pub quick: bool,
}

impl Options {
    /// `quick` in a quick run, `full` otherwise.
    pub fn size<T>(&self, quick: T, full: T) -> T {
        match self.quick {
            true => quick,
            false => full,
        }
    }
}

/// One benchmark case.
pub struct Case {
    /// Its name in `--only`.
    pub name: &'static str,
    /// Whether a run without `--only` includes it.
    pub default: bool,
    pub run: fn(&mut Report, &Options) -> Result<()>,
}

impl Case {
    /// A case every run includes.
    pub const fn new(name: &'static str, run: fn(&mut Report, &Options) -> Result<()>) -> Self {
        Self {
            name,
            default: true,
            run,
        }
    }

    /// A case run only when `--only` names it (long, or needing more than the default lab).
    pub const fn extra(name: &'static str, run: fn(&mut Report, &Options) -> Result<()>) -> Self {
        Self {
            name,
            default: false,
            run,
        }
    }
}

/// Every case, in the order a full run measures them.
pub const CASES: &[Case] = &[
    Case::new("attach", attach::run),
    Case::new("ports", ports::run),
    Case::new("dual-stack", dualstack::run),
    Case::new("convergence", convergence::run),
    Case::new("convergence-vxlan", convergence::run_vxlan),
    Case::new("dataplane", dataplane::run),
    Case::new("dataplane-vxlan", dataplane::run_vxlan),
    Case::new("restart", restart::run),
    Case::new("scale", scale::run),
    Case::new("policy", policy::run),
    Case::new("floor", floor::run),
    Case::new("endpoints", endpoints::run),
    Case::extra("fleet", fleet::run),
];

/// The cases `only` names (comma-separated), or every default case when it is `None`.
pub fn select(only: Option<&str>) -> Result<Vec<&'static Case>> {
    let Some(only) = only else {
        return Ok(CASES.iter().filter(|c| c.default).collect());
    };
    let mut chosen = vec![];
    for name in only.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match CASES.iter().find(|c| c.name == name) {
            Some(case) => chosen.push(case),
            None => bail!(
                "unknown benchmark case {name:?}; cases: {}",
                CASES.iter().map(|c| c.name).collect::<Vec<_>>().join(",")
            ),
        }
    }
    Ok(chosen)
}

/// Runs the cases in order and prints the table at the end, then the lines the results page
/// records for this run's ratios.
pub fn run(cases: &[&Case], options: &Options) -> Result<Report> {
    let mut report = Report::default();
    for case in cases {
        (case.run)(&mut report, options)?;
    }
    report.print();
    println!();
    println!("ratios as the results page records them:");
    for line in baseline::page_lines(report.ratios()) {
        println!("    {line}");
    }
    Ok(report)
}

/// Compares the run's ratios with those recorded on the results page `page` and prints the
/// verdicts; true when any ratio is worse than recorded beyond the page's tolerance.
pub fn compare(report: &Report, page: &std::path::Path) -> Result<bool> {
    let text = std::fs::read_to_string(page)
        .with_context(|| format!("reading the results page {}", page.display()))?;
    let recorded = baseline::Baseline::parse(&text)
        .with_context(|| format!("reading the recorded ratios of {}", page.display()))?;
    let verdicts = recorded.compare(report.ratios());
    println!();
    println!(
        "against {} (a ratio worse by more than {:.0}% is flagged):",
        page.display(),
        recorded.tolerance * 100.0
    );
    println!(
        "{:<44} {:>9} {:>9} {:>8}  verdict",
        "ratio", "recorded", "now", "worse"
    );
    for v in &verdicts {
        let verdict = match v.regression {
            true => "REGRESSION",
            false => "ok",
        };
        println!(
            "{:<44} {:>9.2} {:>9.2} {:>7.0}%  {verdict}",
            v.key,
            v.recorded,
            v.now,
            v.worse_by * 100.0
        );
    }
    let regressions = verdicts.iter().filter(|v| v.regression).count();
    match regressions {
        0 => println!("no regression ({} ratios compared)", verdicts.len()),
        n => println!(
            "{n} of {} ratios worse than recorded beyond the tolerance \
             (this machine is noisy: run again before believing it)",
            verdicts.len()
        ),
    }
    Ok(regressions > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_picks_cases_by_name_and_refuses_unknown_ones() {
        let chosen = select(Some("attach, dual-stack")).unwrap();
        let names: Vec<_> = chosen.iter().map(|c| c.name).collect();
        assert_eq!(names, ["attach", "dual-stack"]);
        let Err(error) = select(Some("dualstack")) else {
            panic!("an unknown case was accepted");
        };
        let error = error.to_string();
        assert!(error.contains("dual-stack"), "{error}");
        let default = select(None).unwrap();
        assert!(default.iter().any(|c| c.name == "dual-stack"));
        assert!(!default.iter().any(|c| c.name == "fleet"));
    }
}
