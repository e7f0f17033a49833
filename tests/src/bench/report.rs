//! Figures: latency samples of one timed run, and the report every case adds its lines to.

use std::time::{Duration, Instant};

use anyhow::Result;

/// Latency samples of one run.
#[derive(Debug, Default)]
pub struct Run {
    pub samples: Vec<Duration>,
    pub wall: Duration,
}

impl Run {
    /// Adds the samples and the wall time of `other`, a run made apart from this one (its
    /// rate is then the samples per second of the two runs' wall time together).
    pub fn append(&mut self, other: Run) {
        self.samples.extend(other.samples);
        self.wall += other.wall;
    }

    /// The `p` quantile (0..=1) of the samples, in milliseconds.
    pub fn pct(&self, p: f64) -> f64 {
        let mut s: Vec<f64> = self.samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        s.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let i = ((s.len() as f64 - 1.0) * p).round() as usize;
        s.get(i).copied().unwrap_or(f64::NAN)
    }

    /// Samples per second of wall time.
    pub fn rate(&self) -> f64 {
        self.samples.len() as f64 / self.wall.as_secs_f64()
    }
}

/// Which way a ratio improves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

impl Better {
    /// `higher` or `lower`, as the recorded ratios on the results page spell it.
    pub fn word(self) -> &'static str {
        match self {
            Better::Higher => "higher",
            Better::Lower => "lower",
        }
    }
}

/// A ratio of two figures measured in the same run (the only figures worth comparing between
/// runs on a noisy machine).
#[derive(Debug, Clone, PartialEq)]
pub struct Ratio {
    pub key: String,
    pub value: f64,
    pub better: Better,
}

/// The figures of a whole benchmark run.
#[derive(Default)]
pub struct Report {
    rows: Vec<(String, String, String)>,
    ratios: Vec<Ratio>,
}

impl Report {
    /// One figure: printed at once as a `BENCH` line, and kept for the table.
    pub fn line(&mut self, key: &str, value: f64, unit: &str, note: &str) {
        println!("BENCH {key}={value:.3} unit={unit}");
        self.rows.push((
            key.to_string(),
            format!("{value:.2} {unit}"),
            note.to_string(),
        ));
    }

    /// A ratio, with its target when it has one, marked met (✔) or missed (✘).
    pub fn ratio(&mut self, key: &str, value: f64, better: Better, target: Option<f64>) {
        let note = match target {
            Some(t) => target_note(value, better, t),
            None => String::new(),
        };
        self.line(key, value, "x", &note);
        self.ratios.push(Ratio {
            key: key.to_string(),
            value,
            better,
        });
    }

    /// Every ratio of the run, in the order measured.
    pub fn ratios(&self) -> &[Ratio] {
        &self.ratios
    }

    /// p50, p99 and rate of a timed run.
    pub fn run(&mut self, key: &str, run: &Run) {
        self.line(&format!("{key}.p50"), run.pct(0.5), "ms", "");
        self.line(&format!("{key}.p99"), run.pct(0.99), "ms", "");
        self.line(&format!("{key}.rate"), run.rate(), "per_s", "");
    }

    pub fn print(&self) {
        println!();
        println!("{:<44} {:>16}  note", "measure", "value");
        for (k, v, n) in &self.rows {
            println!("{k:<44} {v:>16}  {n}");
        }
    }
}

/// `target <= 1.3 ✔`: the target and whether `value` meets it (a NaN never does).
pub fn target_note(value: f64, better: Better, target: f64) -> String {
    let (sign, met) = match better {
        Better::Higher => (">=", value >= target),
        Better::Lower => ("<=", value <= target),
    };
    let mark = match met {
        true => "✔",
        false => "✘",
    };
    format!("target {sign} {target} {mark}")
}

/// Runs `job(i)` for i in 0..n on `concurrency` threads; returns per-job latencies.
pub fn timed<F>(n: usize, concurrency: usize, job: F) -> Result<Run>
where
    F: Fn(usize) -> Result<()> + Send + Sync,
{
    let job = &job;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    let results: Vec<Result<Vec<Duration>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..concurrency)
            .map(|_| {
                let next = &next;
                scope.spawn(move || -> Result<Vec<Duration>> {
                    let mut samples = vec![];
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if i >= n {
                            return Ok(samples);
                        }
                        let t = Instant::now();
                        job(i)?;
                        samples.push(t.elapsed());
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wall = started.elapsed();
    let mut samples = vec![];
    for r in results {
        samples.extend(r?);
    }
    Ok(Run { samples, wall })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_runs_add_samples_and_wall_time() {
        let ms = Duration::from_millis;
        let mut run = Run::default();
        run.append(Run {
            samples: vec![ms(1), ms(3)],
            wall: ms(4),
        });
        run.append(Run {
            samples: vec![ms(2), ms(2)],
            wall: ms(4),
        });
        assert_eq!(run.samples.len(), 4);
        assert_eq!(run.pct(0.5), 2.0);
        assert_eq!(run.rate(), 500.0);
    }

    #[test]
    fn target_notes_mark_met_and_missed() {
        assert_eq!(target_note(1.1, Better::Lower, 1.3), "target <= 1.3 ✔");
        assert_eq!(target_note(1.4, Better::Lower, 1.3), "target <= 1.3 ✘");
        assert_eq!(target_note(5.0, Better::Higher, 5.0), "target >= 5 ✔");
        assert_eq!(target_note(4.9, Better::Higher, 5.0), "target >= 5 ✘");
        assert_eq!(target_note(f64::NAN, Better::Lower, 1.3), "target <= 1.3 ✘");
    }
}
