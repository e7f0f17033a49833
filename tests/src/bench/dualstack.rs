//! Dual-stack attach and detach against IPv4-only, in the same run: the same number of
//! containers, sequential and with concurrent clients, on a one-host lab whose agent has the
//! IPv4 pool only and on one whose agent has both pools. The two labs take turns (ABBA order)
//! of 10-25 containers, so that both see the same share of whatever else loads the machine. Each
//! container of the dual-stack lab gets an address of each family (checked in every answer,
//! and on the first container's interface), and each lab ends with nothing left: no endpoint,
//! and etcd, the agent and the kernel agreeing (`weftctl ipam check`).

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
/// The fewest containers a turn attaches (then detaches), and that many per client at least,
/// so that a turn keeps its clients busy; and the most turns each lab takes.
const TURN_MIN: usize = 10;
const TURN_PER_CLIENT: usize = 3;
const TURNS_MAX: usize = 20;

pub fn run(report: &mut Report, options: &Options) -> Result<()> {
    // A quick run too takes 100: at 50 (two turns of 25 with 8 clients) the ratios swing
    // between 0.4 and 2.8 on a loaded machine.
    for n in options.size(vec![100], vec![100, 500]) {
        for concurrency in [1, CONCURRENCY] {
            compare(report, n, concurrency)?;
        }
    }
    Ok(())
}

fn compare(report: &mut Report, n: usize, concurrency: usize) -> Result<()> {
    println!("== dual-stack against IPv4-only attach/detach N={n} concurrency={concurrency}");
    let mut sides = [Side::new(false)?, Side::new(true)?];
    let sizes = turn_sizes(n, concurrency);
    // ABBA: neither family always goes first.
    let order = |turn: usize| match turn % 2 {
        0 => [0, 1],
        _ => [1, 0],
    };
    for (turn, &size) in sizes.iter().enumerate() {
        for side in order(turn) {
            sides[side].attach(turn, size, concurrency)?;
        }
    }
    for turn in 0..sizes.len() {
        for side in order(turn) {
            sides[side].detach(turn)?;
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

/// How many containers each turn of a lab attaches: `n` in as many turns as the turn size
/// allows (at most `TURNS_MAX`), as even as can be.
fn turn_sizes(n: usize, concurrency: usize) -> Vec<usize> {
    let least = TURN_MIN.max(TURN_PER_CLIENT * concurrency);
    let turns = (n / least).clamp(1, TURNS_MAX);
    (0..turns)
        .map(|k| n / turns + usize::from(k < n % turns))
        .collect()
}

/// One family's lab, its batches (one per turn) and their timings.
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

    /// Attaches turn `turn`'s batch of `n`, checking every answer, and the first container's
    /// interface.
    fn attach(&mut self, turn: usize, n: usize, concurrency: usize) -> Result<()> {
        let batch = Batch::new(&self.lab, &format!("d{turn}x"), n, concurrency)?;
        let attached = batch.attach(&self.client, |_| vec![])?;
        for (i, endpoint) in attached.endpoints.iter().enumerate() {
            let addresses = check_answer(endpoint, self.dual)?;
            if turn == 0 && i == 0 {
                check_interface(batch.namespace(0), endpoint, &addresses)?;
            }
        }
        self.attach.append(attached.run);
        self.batches.push(batch);
        Ok(())
    }

    /// Detaches turn `turn`'s batch.
    fn detach(&mut self, turn: usize) -> Result<()> {
        let run = self.batches[turn].detach(&self.client)?;
        self.detach.append(run);
        Ok(())
    }

    /// Checks that nothing is left and removes the namespaces (the lab goes when dropped);
    /// the attach and detach timings of every turn together.
    fn finish(self) -> Result<(Run, Run)> {
        check_clean(&self.lab, &self.client)?;
        for batch in self.batches {
            batch.remove()?;
        }
        Ok((self.attach, self.detach))
    }
}

/// The agent's answer for a container: an IPv4 address of `POOL`, and an IPv6 address of
/// `POOL_V6` with its link-local gateway exactly when `dual`. The addresses, for
/// [`check_interface`].
fn check_answer(endpoint: &pb::Endpoint, dual: bool) -> Result<Vec<String>> {
    let id = &endpoint.container_id;
    let ip: Ipv4Addr = endpoint
        .ip
        .parse()
        .with_context(|| format!("{id}: IPv4 address {:?}", endpoint.ip))?;
    ensure!(
        POOL.parse::<Ipv4Network>()?.contains(ip),
        "{id}: {ip} outside {POOL}"
    );
    if !dual {
        ensure!(
            endpoint.ipv6.is_empty(),
            "{id}: IPv6 address {:?} on an IPv4-only host",
            endpoint.ipv6
        );
        return Ok(vec![format!("{ip}/32")]);
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
    Ok(vec![format!("{ip}/32"), format!("{ipv6}/128")])
}

/// Every address of the container's answer sits on its interface in `netns`.
fn check_interface(netns: &str, endpoint: &pb::Endpoint, addresses: &[String]) -> Result<()> {
    let ifname = endpoint.ifname.as_str();
    let held = sh::run("ip", &["-n", netns, "-o", "addr", "show", "dev", ifname])?;
    for address in addresses {
        ensure!(
            held.split_whitespace().any(|word| word == address),
            "{}: {address} not on {ifname} in {netns}:\n{held}",
            endpoint.container_id
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(ip: &str, ipv6: &str, gateway_v6: &str) -> pb::Endpoint {
        pb::Endpoint {
            container_id: "d0x0".into(),
            ip: ip.into(),
            ipv6: ipv6.into(),
            gateway_v6: gateway_v6.into(),
            ..Default::default()
        }
    }

    #[test]
    fn answers_carry_one_address_per_family_of_the_host() {
        let dual = answer("10.65.0.1", "fd65::1", GATEWAY_V6);
        assert_eq!(
            check_answer(&dual, true).unwrap(),
            ["10.65.0.1/32", "fd65::1/128"]
        );
        let v4 = answer("10.65.0.1", "", "");
        assert_eq!(check_answer(&v4, false).unwrap(), ["10.65.0.1/32"]);
        // Missing, extra or misplaced addresses, and a wrong gateway, are refused.
        assert!(check_answer(&v4, true).is_err());
        assert!(check_answer(&dual, false).is_err());
        assert!(check_answer(&answer("10.66.0.1", "fd65::1", GATEWAY_V6), true).is_err());
        assert!(check_answer(&answer("10.65.0.1", "fd66::1", GATEWAY_V6), true).is_err());
        assert!(check_answer(&answer("10.65.0.1", "fd65::1", "fe80::1"), true).is_err());
        assert!(check_answer(&answer("", "fd65::1", GATEWAY_V6), true).is_err());
    }

    #[test]
    fn turns_share_the_batch_evenly_and_keep_the_clients_busy() {
        assert_eq!(turn_sizes(50, 1), vec![10; 5]);
        assert_eq!(turn_sizes(50, 8), vec![25, 25]);
        assert_eq!(turn_sizes(100, 8), vec![25; 4]);
        assert_eq!(turn_sizes(500, 1), vec![25; 20]);
        assert_eq!(turn_sizes(101, 8), vec![26, 25, 25, 25]);
        assert_eq!(turn_sizes(5, 8), vec![5]);
        for (n, c) in [(50, 1), (77, 8), (500, 8), (1000, 1)] {
            assert_eq!(turn_sizes(n, c).iter().sum::<usize>(), n);
        }
    }
}
