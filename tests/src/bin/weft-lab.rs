//! `weft-lab`: a multi-host weft lab in network namespaces on this machine.
//!
//! `weft-lab demo` builds a lab, attaches containers, prints who reaches whom and a host's
//! status, then tears everything down (unless `--keep`). `weft-lab chaos` runs the seeded fault
//! run with the invariant checker at every quiet point. `weft-lab down PREFIX` removes a kept or
//! crashed lab.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use weft_tests::chaos::{self, ChaosOptions};
use weft_tests::lab::{teardown_leftovers, OUTSIDE_IP, OUTSIDE_IP6};
use weft_tests::{sh, Lab, LabOptions};

#[derive(Parser)]
#[command(
    name = "weft-lab",
    about = "A multi-host weft lab in network namespaces"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a lab, attach containers, print the connectivity matrix and a host's status.
    Demo {
        #[arg(long, default_value_t = 3)]
        hosts: usize,
        /// Containers per host.
        #[arg(long, default_value_t = 2)]
        containers: usize,
        /// Leave the lab running (remove it later with `weft-lab down PREFIX`).
        #[arg(long)]
        keep: bool,
        /// Underlay segments: 2 puts even hosts on 198.18.0.0/24, behind the router, so that
        /// they are reached through VXLAN.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        subnets: u8,
        /// The router runs bird2 as top-of-rack router (AS 64513) and every agent announces its
        /// blocks to it over BGP (AS 64512): the outside host reaches containers directly.
        #[arg(long)]
        bgp: bool,
        /// Dual-stack: the underlay and the outside host get IPv6 addresses too, hosts take an
        /// IPv6 pool (fd65::/48) beside the IPv4 one, and every container gets one address of
        /// each family.
        #[arg(long)]
        ipv6: bool,
    },
    /// Run the seeded randomized fault run: bursts of attaches, detaches, CNI operations, agent
    /// kills, etcd pauses and partitions, tampering; the invariant checker at every quiet point.
    Chaos {
        /// How long to start new bursts for.
        #[arg(long, default_value_t = 2.0)]
        minutes: f64,
        /// Replay a run (default: a fresh random seed, printed first).
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long, default_value_t = 3)]
        hosts: usize,
        /// Carry on after a failure to find more (the model is re-based on what the lab shows).
        #[arg(long)]
        keep_going: bool,
        /// Print only the report, not each operation as it completes.
        #[arg(long)]
        quiet: bool,
        /// Kinds of operation or window to leave out, comma-separated (attach,
        /// reattach-other-ports, detach, cni-add, cni-second-network, cni-del, cni-gc, kill,
        /// kill-during-attach, delete-route, delete-veth, delete-container-interface,
        /// delete-block-route, tamper-rules, flip-sysctl, etcd-pause, partition).
        #[arg(long, default_value = "")]
        skip: String,
        /// `ipv4` or `dual-stack` (IPv4 and IPv6 pools); default: the seed's choice (odd seeds
        /// run dual-stack).
        #[arg(long)]
        stack: Option<chaos::Stack>,
    },
    /// Run the soak: continuous attach/detach churn with published ports on 3 hosts and a
    /// 3-member etcd, an agent killed every 2 minutes, an etcd member restarted every 5, a ping
    /// mesh throughout; then lost pings, failed requests, leaks, memory and reconcile time.
    Soak {
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
        /// Attaches and detaches per second.
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Remove a lab left running by `demo --keep` or by a run that crashed.
    Down { prefix: String },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Demo {
            hosts,
            containers,
            keep,
            subnets,
            bgp,
            ipv6,
        } => match demo(hosts, containers, keep, subnets as usize, bgp, ipv6) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("weft-lab: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Chaos {
            minutes,
            seed,
            hosts,
            keep_going,
            quiet,
            skip,
            stack,
        } => {
            if !(2..=50).contains(&hosts) || !minutes.is_finite() || minutes < 0.0 {
                eprintln!("weft-lab: --hosts must be 2 to 50 and --minutes not negative");
                return ExitCode::FAILURE;
            }
            let mut options = ChaosOptions::new(
                seed.unwrap_or_else(chaos::random_seed),
                Duration::from_secs_f64(minutes * 60.0),
            );
            options.hosts = hosts;
            options.keep_going = keep_going;
            options.verbose = !quiet;
            if let Some(stack) = stack {
                options.stack = stack;
            }
            options.skip = match chaos::parse_kinds(&skip) {
                Ok(kinds) => kinds,
                Err(e) => {
                    eprintln!("weft-lab: --skip: {e:#}");
                    return ExitCode::FAILURE;
                }
            };
            match chaos::run(&options) {
                Ok(report) if report.passed() => {
                    println!("{}", report.summary());
                    ExitCode::SUCCESS
                }
                Ok(report) => {
                    println!("{}", report.render());
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("weft-lab: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Soak {
            minutes,
            rate,
            seed,
        } => {
            if !minutes.is_finite() || minutes <= 0.0 || !rate.is_finite() || rate <= 0.0 {
                eprintln!("weft-lab: --minutes and --rate must be positive");
                return ExitCode::FAILURE;
            }
            let seed = seed.unwrap_or_else(chaos::random_seed);
            println!("soak seed: {seed}");
            let mut options =
                weft_tests::soak::SoakOptions::new(Duration::from_secs_f64(minutes * 60.0), seed);
            options.rate = rate;
            match weft_tests::soak::run(&options) {
                Ok(report) => {
                    print!("{}", report.print());
                    match report.passed() {
                        true => ExitCode::SUCCESS,
                        false => ExitCode::FAILURE,
                    }
                }
                Err(e) => {
                    eprintln!("weft-lab: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Down { prefix } => match teardown_leftovers(&prefix) {
            Ok(()) => {
                println!("lab {prefix} removed");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("weft-lab: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

struct Container {
    name: String,
    netns: String,
    ip: String,
    /// Empty without an IPv6 pool.
    ip6: String,
}

fn demo(
    hosts: usize,
    per_host: usize,
    keep: bool,
    subnets: usize,
    bgp: bool,
    ipv6: bool,
) -> anyhow::Result<bool> {
    anyhow::ensure!((1..=50).contains(&hosts), "--hosts must be 1 to 50");
    let started = Instant::now();
    println!(
        "== building a {hosts}-host lab on {subnets} underlay segment(s) (namespaces, router, \
         outside host, etcd, agents)"
    );
    let mut lab = Lab::new(LabOptions {
        hosts,
        subnets,
        bgp,
        ipv6,
        ..Default::default()
    })?;
    println!(
        "   lab {} up in {:.1}s: hosts {}, router {}, outside {} ({OUTSIDE_IP})",
        lab.prefix,
        started.elapsed().as_secs_f64(),
        lab.hosts
            .iter()
            .map(|h| format!("{}={}", h.name, h.ip))
            .collect::<Vec<_>>()
            .join(" "),
        lab.router,
        lab.outside,
    );

    println!("== attaching {per_host} containers per host");
    let mut containers = vec![];
    for host in 0..hosts {
        for n in 0..per_host {
            let name = format!("c{}{}", host + 1, (b'a' + n as u8) as char);
            let (netns, ip, ip6) = lab.attach_dual(host, &name)?;
            println!(
                "   {name:<5} on {:<10} {ip:<14} {ip6:<16} netns {netns}",
                lab.hosts[host].name
            );
            containers.push(Container {
                name,
                netns,
                ip,
                ip6,
            });
        }
    }

    // Routes to peers arrive through etcd watches; give them a moment before measuring.
    let expected_routes = hosts.saturating_sub(1);
    for i in 0..hosts {
        lab.eventually("peer routes", Duration::from_secs(10), || {
            sh::run(
                "ip",
                &["-n", &lab.hosts[i].name, "route", "show", "proto", "119"],
            )
            .map(|r| r.lines().filter(|l| l.contains(" via ")).count() >= expected_routes)
            .unwrap_or(false)
        })?;
    }

    let mut failures = matrix(&lab, &containers, false);
    if ipv6 {
        failures += matrix(&lab, &containers, true);
    }

    if bgp {
        // Dual-stack: the outside host reaches their IPv6 addresses too.
        let shown: Vec<(&str, &str)> = containers
            .iter()
            .flat_map(|c| {
                [
                    (c.name.as_str(), c.ip.as_str()),
                    (c.name.as_str(), c.ip6.as_str()),
                ]
            })
            .filter(|(_, ip)| !ip.is_empty())
            .collect();
        failures += weft_tests::bgp::show_demo(&lab, &shown)?;
    }

    println!("== weftctl status on {}", lab.hosts[0].name);
    let out = lab.ctl(0, &["status"])?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!();
    println!(
        "== routes on {} (ip route show proto weft)",
        lab.hosts[0].name
    );
    print!(
        "{}",
        sh::run(
            "ip",
            &["-n", &lab.hosts[0].name, "route", "show", "proto", "119"]
        )?
    );
    if ipv6 {
        let routes = [
            "-6",
            "-n",
            &lab.hosts[0].name,
            "route",
            "show",
            "proto",
            "119",
        ];
        print!("{}", sh::run("ip", &routes)?);
    }

    // Every other container and every host, plus the outside host (in each family).
    let families = if ipv6 { 2 } else { 1 };
    let targets = containers.len() + lab.hosts.len();
    let total = families * (containers.len() * (targets - 1) + containers.len());
    println!(
        "== {} of {total} pings answered in {:.1}s",
        total - failures,
        started.elapsed().as_secs_f64()
    );
    if keep {
        // A kept lab outlives this process: mark it as owned by nobody that can die.
        std::fs::write(lab.dir.join("owner"), "")?;
        lab.keep();
        println!(
            "== lab kept. Try: ip netns exec {} ping {}\n   weftctl --socket {} status\n   remove it with: weft-lab down {}",
            containers[0].netns,
            containers.last().map(|c| c.ip.as_str()).unwrap_or(""),
            lab.hosts[0].socket.display(),
            lab.prefix
        );
    } else {
        println!("== tearing the lab down");
    }
    Ok(failures == 0)
}

/// A connectivity matrix of one family (`v6`: IPv6): every container to every container and
/// every host, and to the outside host (IPv4: through SNAT); returns the number of failed pings.
fn matrix(lab: &Lab, containers: &[Container], v6: bool) -> usize {
    let family = if v6 { "IPv6 " } else { "" };
    println!(
        "== {family}connectivity matrix (ok = answered; a second try covers neighbour discovery)"
    );
    let mut targets: Vec<(String, String)> = containers
        .iter()
        .map(|c| {
            (
                c.name.clone(),
                if v6 { c.ip6.clone() } else { c.ip.clone() },
            )
        })
        .collect();
    targets.extend(lab.hosts.iter().map(|h| {
        let name = h.name.trim_start_matches(&format!("{}-", lab.prefix));
        let ip = match v6 {
            true => h.ip6.map(|ip| ip.to_string()).unwrap_or_default(),
            false => h.ip.to_string(),
        };
        (name.to_string(), ip)
    }));
    let width = 6;
    print!("   {:<width$}", "from");
    for (name, _) in &targets {
        print!("{name:>width$}");
    }
    println!();
    let mut failures = 0;
    for c in containers {
        print!("   {:<width$}", c.name);
        for (name, ip) in &targets {
            let ping = || sh::ping(&c.netns, ip);
            let ok = *name == c.name || (!ip.is_empty() && (ping() || ping()));
            failures += usize::from(!ok);
            print!("{:>width$}", if ok { "ok" } else { "FAIL" });
        }
        println!();
    }
    let (outside, how) = match v6 {
        true => (OUTSIDE_IP6, ""),
        false => (OUTSIDE_IP, " (through SNAT)"),
    };
    let outside_ok = containers
        .iter()
        .filter(|c| sh::ping(&c.netns, outside))
        .count();
    println!(
        "   containers reaching the outside host {outside}{how}: {outside_ok}/{}",
        containers.len()
    );
    failures + containers.len() - outside_ok
}
