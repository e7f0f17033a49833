//! Comparing a run's ratios against the ones recorded on the results page
//! (`deploy/bench/RESULTS.md`), so that `deploy/bench/run --quick` says whether anything got
//! worse. Pure: parsing the page, naming ratios apart from their size, and the verdicts.
//!
//! The page records ratios as lines `ratio <key> <value> <higher|lower>` and the tolerance as
//! `tolerance <percent>%`; the full run prints those lines for the page. Keys are compared
//! without their size (`attach.n100.c8.…` and `attach.n50.c8.…` are both `attach.c8.…`): the
//! page records the smallest size of the full run, the one closest to a quick run's.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};

use super::report::{Better, Ratio};

/// The recorded ratios and how much worse a run may be before it is flagged.
#[derive(Debug, Clone, PartialEq)]
pub struct Baseline {
    /// Allowed relative worsening (0.3 = 30%).
    pub tolerance: f64,
    pub ratios: BTreeMap<String, (f64, Better)>,
}

/// One ratio of this run against its recorded value.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub key: String,
    pub recorded: f64,
    pub now: f64,
    /// How much worse than recorded (negative: better), relative to the recorded value.
    pub worse_by: f64,
    pub regression: bool,
}

/// A ratio's key without its size segment (`.n<digits>`).
pub fn sizeless(key: &str) -> String {
    key.split('.')
        .filter(|part| {
            !(part.len() > 1
                && part.starts_with('n')
                && part[1..].bytes().all(|b| b.is_ascii_digit()))
        })
        .collect::<Vec<_>>()
        .join(".")
}

impl Baseline {
    /// Reads the `ratio` and `tolerance` lines of the results page.
    pub fn parse(page: &str) -> Result<Self> {
        let mut tolerance = None;
        let mut ratios = BTreeMap::new();
        for (n, line) in page.lines().enumerate().map(|(n, l)| (n + 1, l.trim())) {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["tolerance", percent] => {
                    let value: f64 = percent
                        .trim_end_matches('%')
                        .parse()
                        .with_context(|| format!("line {n}: tolerance {percent:?}"))?;
                    tolerance = Some(value / 100.0);
                }
                ["ratio", key, value, better] => {
                    let value: f64 = value
                        .parse()
                        .with_context(|| format!("line {n}: ratio value {value:?}"))?;
                    let better = match *better {
                        "higher" => Better::Higher,
                        "lower" => Better::Lower,
                        other => bail!("line {n}: {other:?} is neither higher nor lower"),
                    };
                    ratios.insert(sizeless(key), (value, better));
                }
                _ => {}
            }
        }
        let Some(tolerance) = tolerance else {
            bail!("no `tolerance <percent>%` line on the results page");
        };
        if ratios.is_empty() {
            bail!("no `ratio <key> <value> <higher|lower>` lines on the results page");
        }
        Ok(Self { tolerance, ratios })
    }

    /// The verdict on each ratio of the run that the page records (the first of each sizeless
    /// key, i.e. the smallest size).
    pub fn compare(&self, ratios: &[Ratio]) -> Vec<Verdict> {
        let mut seen = std::collections::HashSet::new();
        let mut verdicts = vec![];
        for ratio in ratios {
            let key = sizeless(&ratio.key);
            let Some(&(recorded, better)) = self.ratios.get(&key) else {
                continue;
            };
            if !seen.insert(key.clone()) {
                continue;
            }
            let worse_by = match better {
                Better::Higher => (recorded - ratio.value) / recorded,
                Better::Lower => (ratio.value - recorded) / recorded,
            };
            verdicts.push(Verdict {
                key,
                recorded,
                now: ratio.value,
                worse_by,
                // NaN (a figure that could not be measured) is a regression too.
                regression: worse_by.is_nan() || worse_by > self.tolerance,
            });
        }
        verdicts
    }
}

/// The lines the results page records for a run's ratios (the smallest size of each).
pub fn page_lines(ratios: &[Ratio]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    ratios
        .iter()
        .filter(|r| seen.insert(sizeless(&r.key)))
        .map(|r| format!("ratio {} {:.2} {}", r.key, r.value, r.better.word()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ratio(key: &str, value: f64, better: Better) -> Ratio {
        Ratio {
            key: key.into(),
            value,
            better,
        }
    }

    const PAGE: &str = "# Results\n\n```text\ntolerance 30%\n\
        ratio attach.n100.c8.rate_ratio_weft_over_ptp 5.00 higher\n\
        ratio attach.n100.c1.p50_ratio_weft_over_ptp 0.20 lower\n\
        ratio dataplane.ratio 0.90 higher\n```\n";

    #[test]
    fn sizeless_drops_only_the_size_segment() {
        assert_eq!(
            sizeless("attach.n500.c8.rate_ratio_weft_over_ptp"),
            "attach.c8.rate_ratio_weft_over_ptp"
        );
        assert_eq!(sizeless("dataplane.vxlan.ratio"), "dataplane.vxlan.ratio");
        assert_eq!(sizeless("publish.n.c1.x"), "publish.n.c1.x");
    }

    #[test]
    fn the_page_gives_tolerance_and_sizeless_ratios() {
        let baseline = Baseline::parse(PAGE).unwrap();
        assert_eq!(baseline.tolerance, 0.3);
        assert_eq!(baseline.ratios.len(), 3);
        assert_eq!(
            baseline.ratios["attach.c1.p50_ratio_weft_over_ptp"],
            (0.2, Better::Lower)
        );
    }

    #[test]
    fn a_page_without_tolerance_or_ratios_is_an_error() {
        assert!(Baseline::parse("ratio a 1.0 higher\n").is_err());
        assert!(Baseline::parse("tolerance 30%\n").is_err());
        assert!(Baseline::parse("tolerance 30%\nratio a 1.0 sideways\n").is_err());
        assert!(Baseline::parse("tolerance 30%\nratio a x higher\n").is_err());
    }

    #[test]
    fn worse_beyond_the_tolerance_is_a_regression_in_either_direction() {
        let baseline = Baseline::parse(PAGE).unwrap();
        let verdicts = baseline.compare(&[
            ratio(
                "attach.n50.c8.rate_ratio_weft_over_ptp",
                3.4,
                Better::Higher,
            ),
            ratio("attach.n50.c1.p50_ratio_weft_over_ptp", 0.25, Better::Lower),
            ratio("dataplane.ratio", 0.95, Better::Higher),
            ratio("convergence.unrecorded", 1.0, Better::Higher),
        ]);
        let flagged: Vec<(&str, bool)> = verdicts
            .iter()
            .map(|v| (v.key.as_str(), v.regression))
            .collect();
        assert_eq!(
            flagged,
            [
                ("attach.c8.rate_ratio_weft_over_ptp", true),
                ("attach.c1.p50_ratio_weft_over_ptp", false),
                ("dataplane.ratio", false),
            ]
        );
        assert!((verdicts[0].worse_by - 0.32).abs() < 1e-9);
        assert!((verdicts[1].worse_by - 0.25).abs() < 1e-9);
        assert!(verdicts[2].worse_by < 0.0);
    }

    #[test]
    fn an_unmeasured_ratio_is_a_regression_and_only_the_smallest_size_counts() {
        let baseline = Baseline::parse(PAGE).unwrap();
        let verdicts = baseline.compare(&[
            ratio("dataplane.ratio", f64::NAN, Better::Higher),
            ratio(
                "attach.n100.c8.rate_ratio_weft_over_ptp",
                5.0,
                Better::Higher,
            ),
            ratio(
                "attach.n500.c8.rate_ratio_weft_over_ptp",
                1.0,
                Better::Higher,
            ),
        ]);
        assert_eq!(verdicts.len(), 2);
        assert!(verdicts[0].regression);
        assert!(!verdicts[1].regression);
    }

    #[test]
    fn page_lines_record_the_smallest_size_and_read_back() {
        let lines = page_lines(&[
            ratio(
                "attach.n100.c8.rate_ratio_weft_over_ptp",
                5.123,
                Better::Higher,
            ),
            ratio(
                "attach.n500.c8.rate_ratio_weft_over_ptp",
                6.0,
                Better::Higher,
            ),
            ratio("dataplane.ratio", 0.9, Better::Higher),
        ]);
        assert_eq!(
            lines,
            [
                "ratio attach.n100.c8.rate_ratio_weft_over_ptp 5.12 higher",
                "ratio dataplane.ratio 0.90 higher",
            ]
        );
        let page = format!("tolerance 25%\n{}\n", lines.join("\n"));
        let baseline = Baseline::parse(&page).unwrap();
        assert_eq!(
            baseline.ratios["attach.c8.rate_ratio_weft_over_ptp"],
            (5.12, Better::Higher)
        );
    }

    #[test]
    fn the_results_page_of_this_repository_is_readable() {
        let page = include_str!("../../../deploy/bench/RESULTS.md");
        let baseline = Baseline::parse(page).unwrap();
        assert!(baseline.tolerance > 0.0 && baseline.tolerance < 1.0);
        assert!(baseline
            .ratios
            .contains_key("attach.c8.rate_ratio_weft_over_ptp"));
        assert!(baseline.ratios.contains_key("dataplane.vxlan.ratio"));
        assert!(baseline
            .ratios
            .contains_key("dualstack.c8.attach.p50_dual_over_ipv4"));
    }
}
