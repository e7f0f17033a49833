//! `weft-bench`: weft against the CNI reference plugins (ptp + host-local, + portmap) and the
//! kernel, measured in the same run on the same machine (see `weft_tests::bench`). Prints a
//! table and `BENCH key=value` lines. Every case builds its own lab and removes it.

use anyhow::Result;
use clap::Parser;
use weft_tests::bench::{self, Options, CASES};
use weft_tests::sh;

#[derive(Parser)]
#[command(
    name = "weft-bench",
    about = "Benchmarks weft against the CNI reference plugins and the kernel"
)]
struct Cli {
    /// Smaller sizes (for a smoke run): N=50 instead of 100/500, fewer blocks and hosts.
    #[arg(long)]
    quick: bool,
    /// Cases to run, comma-separated (default: every default case; see --list).
    #[arg(long)]
    only: Option<String>,
    /// Compare the run's ratios with those recorded on this results page
    /// (deploy/bench/RESULTS.md); exit status 3 when one is worse beyond the page's tolerance.
    #[arg(long, value_name = "FILE")]
    baseline: Option<std::path::PathBuf>,
    /// Print the cases and exit.
    #[arg(long)]
    list: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if cli.list {
        for case in CASES {
            let default = if case.default {
                ""
            } else {
                " (only with --only)"
            };
            println!("{}{default}", case.name);
        }
        return Ok(());
    }
    let cases = bench::select(cli.only.as_deref())?;
    weft_tests::require_root();
    println!(
        "weft-bench {} on {} ({} cores)",
        sh::run("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        sh::run("uname", &["-r"])?.trim(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let report = bench::run(&cases, &Options { quick: cli.quick })?;
    if let Some(page) = &cli.baseline {
        if bench::compare(&report, page)? {
            std::process::exit(3);
        }
    }
    Ok(())
}
