//! Dual-stack attach and detach against IPv4-only, in the same run: the same number of
//! containers, sequential and with concurrent clients, on a one-host lab whose agent has the
//! IPv4 pool only and on one whose agent has both pools. The two labs take turns in rounds
//! (ABBA order), so that both see the same share of whatever else loads the machine. Each
//! container of the dual-stack lab gets an address of each family (checked on its first one,
//! in the agent's answer and in its namespace), and each lab ends with nothing left: no
//! endpoint, and etcd, the agent and the kernel agreeing (`weftctl ipam check`).

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{ensure, Context, Result};
use ipnetwork::{Ipv4Network, Ipv6Network};
use weft_proto::v1 as pb;

use super::batch::Batch;
use super::client::{one_host_lab_with, Client};
use super::{Better, Options, Report, Run, CONCURRENCY};
use crate::lab::{POOL, POOL_V6};
use crate::{sh, Lab};

/// Dual-stack may cost at most this much more than IPv4-only (p50 and time for the batch).
const TARGET: f64 = 1.3;
/// The host end's link-local address, the containers' IPv6 gateway.
const GATEWAY_V6: &str = "fe80::ecee:eeff:feee:eeee";
/// Turns each lab takes; each attaches (then detaches) `n / ROUNDS` containers per turn.
const ROUNDS: usize = 5;

pub fn run(report: &mut Report, options: &Options) -> Result<()> {
    for n in options.size(vec![50], vec![100, 500]) {
        for concurrency in [1, CONCURRENCY] {
            compare(report, n, concurrency)?;
        }
    }
    Ok(())
}

fn compare(report: &mut Report, n: usize, concurrency: usize) -> Result<()> {
    println!("== dual-stack against IPv4-only attach/detach N={n} concurrency={concurrency}");
    let mut sides = [Side::new(false)?, Side::new(true)?];
    let turns = |round: usize| match round % 2 {
        0 => [0, 1],
        _ => [1, 0],
    };
    for round in 0..ROUNDS {
        for side in turns(round) {
            sides[side].attach(round, n / ROUNDS, concurrency)?;
        }
    }
    for round in 0..ROUNDS {
        for side in turns(round) {
            sides[side].detach(round)?;
        }
    }
    let [ipv4, dual] = sides;
    let ((ipv4_attach, ipv4_detach), (dual_attach, dual_detach)) = (ipv4.finish()?, dual.finish()?);
    let key = format!("dualstack.n{n}.c{concurrency}");
    for (what, ipv4, dual, target) in [
        ("attach", &ipv4_attach, &dual_attach, Some(TARGET)),
        ("detach", &ipv4_detach, &dual_detach, None),
    ] {
        report.run(&format!("{key}.{what}.ipv4"), ipv4);
        report.run(&format!("{key}.{what}.dual"), dual);
        report.ratio(
            &format!("{key}.{what}.p50_dual_over_ipv4"),
            dual.pct(0.5) / ipv4.pct(0.5),
            Better::Lower,
            target,
        );
        // The time the whole batch took, dual over IPv4: throughput's ratio, upside down.
        report.ratio(
            &format!("{key}.{what}.time_dual_over_ipv4"),
            ipv4.rate() / dual.rate(),
            Better::Lower,
            target,
        );
    }
    Ok(())
}

/// One family's lab, its batches (one per round) and their timings.
struct Side {
    dual: bool,
    lab: Lab,
    client: Client,
    batches: Vec<Batch>,
    attach: Run,
    detach: Run,
}

impl Side {
    /// A fresh one-host lab, dual-stack when `dual`.
    fn new(dual: bool) -> Result<Self> {
        let lab = one_host_lab_with(dual)?;
        let client = Client::new(&lab, 0)?;
        Ok(Self {
            dual,
            lab,
            client,
            batches: vec![],
            attach: Run::default(),
            detach: Run::default(),
        })
    }

    /// Attaches round `round`'s batch of `n`; the first round's first container is checked.
    fn attach(&mut self, round: usize, n: usize, concurrency: usize) -> Result<()> {
        let batch = Batch::new(&self.lab, &format!("d{round}x"), n, concurrency)?;
        let attached = batch.attach(&self.client, |_| vec![])?;
        if round == 0 {
            check_addresses(batch.namespace(0), &attached.first, self.dual)?;
        }
        self.attach.append(attached.run);
        self.batches.push(batch);
        Ok(())
    }

    /// Detaches round `round`'s batch.
    fn detach(&mut self, round: usize) -> Result<()> {
        let run = self.batches[round].detach(&self.client)?;
        self.detach.append(run);
        Ok(())
    }

    /// Checks that nothing is left and removes the namespaces (the lab goes when dropped);
    /// the attach and detach timings of every round together.
    fn finish(self) -> Result<(Run, Run)> {
        check_clean(&self.lab, &self.client)?;
        for batch in self.batches {
            batch.remove()?;
        }
        Ok((self.attach, self.detach))
    }
}

/// The container got an IPv4 address, and an IPv6 address exactly when `dual`: in the agent's
/// answer, and on its interface.
fn check_addresses(netns: &str, endpoint: &pb::Endpoint, dual: bool) -> Result<()> {
    let id = &endpoint.container_id;
    let ip: Ipv4Addr = endpoint
        .ip
        .parse()
        .with_context(|| format!("{id}: IPv4 address {:?}", endpoint.ip))?;
    ensure!(
        POOL.parse::<Ipv4Network>()?.contains(ip),
        "{id}: {ip} outside {POOL}"
    );
    let on_link = |family: &str| {
        sh::run(
            "ip",
            &[
                "-n",
                netns,
                family,
                "-o",
                "addr",
                "show",
                "dev",
                &endpoint.ifname,
            ],
        )
    };
    ensure!(
        on_link("-4")?.contains(&format!("{ip}/32")),
        "{id}: {ip}/32 not on {} in {netns}",
        endpoint.ifname
    );
    if !dual {
        ensure!(
            endpoint.ipv6.is_empty(),
            "{id}: IPv6 address {:?} on an IPv4-only host",
            endpoint.ipv6
        );
        return Ok(());
    }
    let ipv6: Ipv6Addr = endpoint
        .ipv6
        .parse()
        .with_context(|| format!("{id}: IPv6 address {:?}", endpoint.ipv6))?;
    ensure!(
        POOL_V6.parse::<Ipv6Network>()?.contains(ipv6),
        "{id}: {ipv6} outside {POOL_V6}"
    );
    ensure!(
        endpoint.gateway_v6 == GATEWAY_V6,
        "{id}: IPv6 gateway {:?}, expected {GATEWAY_V6}",
        endpoint.gateway_v6
    );
    ensure!(
        on_link("-6")?.contains(&format!("{ipv6}/128")),
        "{id}: {ipv6}/128 not on {} in {netns}",
        endpoint.ifname
    );
    Ok(())
}

/// Nothing is left of the batch: the agent holds no endpoint, and etcd, the agent and the
/// kernel agree.
fn check_clean(lab: &Lab, client: &Client) -> Result<()> {
    let left = client.list()?;
    ensure!(
        left.is_empty(),
        "{} endpoints left after detaching all, the first {:?}",
        left.len(),
        left[0].container_id
    );
    lab.ipam_check(0)
}
