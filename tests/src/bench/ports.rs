//! Attach with one published port: weft against ptp + portmap.

use anyhow::Result;
use weft_proto::v1 as pb;

use super::batch::Batch;
use super::client::{delete_namespaces, namespaces, one_host_lab, Client};
use super::cni::{cni, portmap_config, ptp_config};
use super::{timed, Better, Options, Report, CONCURRENCY};

pub fn run(report: &mut Report, options: &Options) -> Result<()> {
    for concurrency in [1, CONCURRENCY] {
        ports(report, options.size(50, 100), concurrency)?;
    }
    Ok(())
}

fn ports(report: &mut Report, n: usize, concurrency: usize) -> Result<()> {
    println!("== attach with one published port N={n} concurrency={concurrency}");
    let lab = one_host_lab()?;
    let host = lab.hosts[0].name.clone();
    let client = Client::new(&lab, 0)?;
    let batch = Batch::new(&lab, "w", n, concurrency)?;
    let port = |i: usize| pb::PortMapping {
        protocol: "tcp".into(),
        host_port: 20000 + i as u32,
        container_port: 80,
    };
    let attach = batch.attach(&client, |i| vec![port(i)])?.run;
    let ns2 = namespaces(&lab, "p", n)?;
    let config = ptp_config(&lab.dir);
    let add = timed(n, concurrency, |i| {
        let netns = format!("/run/netns/{}", ns2[i]);
        let result = cni(&host, "ptp", "ADD", &format!("p{i}"), &netns, &config)?;
        cni(
            &host,
            "portmap",
            "ADD",
            &format!("p{i}"),
            &netns,
            &portmap_config(&result, 30000 + i as u16),
        )?;
        Ok(())
    })?;
    // Tear down both (portmap rules live in the host namespace, which the lab removes).
    batch.remove()?;
    delete_namespaces(&ns2)?;
    let key = format!("publish.n{n}.c{concurrency}");
    report.run(&format!("{key}.weft"), &attach);
    report.run(&format!("{key}.ptp_portmap"), &add);
    report.ratio(
        &format!("{key}.rate_ratio_weft_over_portmap"),
        attach.rate() / add.rate(),
        Better::Higher,
        Some(10.0),
    );
    Ok(())
}
