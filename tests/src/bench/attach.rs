//! Attach and detach latency and throughput, weft against ptp + host-local, sequential and with
//! concurrent clients.

use anyhow::Result;

use super::batch::Batch;
use super::client::{delete_namespaces, namespaces, one_host_lab, Client};
use super::cni::{cni, ptp_config};
use super::{timed, Better, Options, Report, CONCURRENCY};

pub fn run(report: &mut Report, options: &Options) -> Result<()> {
    for n in options.size(vec![50], vec![100, 500]) {
        for concurrency in [1, CONCURRENCY] {
            attach_detach(report, n, concurrency)?;
        }
    }
    Ok(())
}

fn attach_detach(report: &mut Report, n: usize, concurrency: usize) -> Result<()> {
    println!("== attach/detach N={n} concurrency={concurrency}");
    let lab = one_host_lab()?;
    let host = lab.hosts[0].name.clone();
    let client = Client::new(&lab, 0)?;

    // weft
    let batch = Batch::new(&lab, "w", n, concurrency)?;
    let attach = batch.attach(&client, |_| vec![])?.run;
    let detach = batch.detach(&client)?;
    batch.remove()?;

    // ptp + host-local
    let ns = namespaces(&lab, "p", n)?;
    let config = ptp_config(&lab.dir);
    let plugin = |command: &str, i: usize| {
        let netns = format!("/run/netns/{}", ns[i]);
        cni(&host, "ptp", command, &format!("p{i}"), &netns, &config).map(|_| ())
    };
    let add = timed(n, concurrency, |i| plugin("ADD", i))?;
    let del = timed(n, concurrency, |i| plugin("DEL", i))?;
    delete_namespaces(&ns)?;

    let key = format!("attach.n{n}.c{concurrency}");
    report.run(&format!("{key}.weft"), &attach);
    report.run(&format!("{key}.ptp"), &add);
    report.ratio(
        &format!("{key}.p50_ratio_weft_over_ptp"),
        attach.pct(0.5) / add.pct(0.5),
        Better::Lower,
        Some(0.5),
    );
    report.ratio(
        &format!("{key}.rate_ratio_weft_over_ptp"),
        attach.rate() / add.rate(),
        Better::Higher,
        (concurrency > 1).then_some(5.0),
    );
    let key = format!("detach.n{n}.c{concurrency}");
    report.run(&format!("{key}.weft"), &detach);
    report.run(&format!("{key}.ptp"), &del);
    report.ratio(
        &format!("{key}.rate_ratio_weft_over_ptp"),
        detach.rate() / del.rate(),
        Better::Higher,
        Some(5.0),
    );
    Ok(())
}
