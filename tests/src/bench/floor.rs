//! The kernel floor: the kernel work weft's attach does for one container, issued by a minimal
//! loop over rtnetlink — no etcd, no gRPC, no bookkeeping — and weft's attach throughput as a
//! fraction of it, both measured here in the same lab host.
//!
//! Per container, as weft's attach does it: a veth created with its host end up and its peer
//! born in the container's namespace; a netlink socket opened inside that namespace; there, the
//! peer looked up; the host end's six sysctls written (IPv6 off on it, as on weft's IPv4-only
//! hosts, before the peer's carrier comes up); then pipelined on the inside socket `lo` up,
//! the address, the peer up, the gateway's on-link route, the default route and the gateway's
//! permanent neighbour; on the host, the host end looked up and its /32 route added.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use futures::TryStreamExt;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth};
use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::route::RouteScope;
use nix::sched::{setns, CloneFlags};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

use super::batch::Batch;
use super::client::{delete_namespaces, namespaces, one_host_lab, Client};
use super::cpu::Cpu;
use super::{Better, Options, Report, Run, CONCURRENCY};
use crate::passes::Totals;

const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
const HOST_MAC: [u8; 6] = [0xee; 6];
const SYSCTLS: &[(&str, &str)] = &[
    ("/proc/sys/net/ipv4/conf/{}/proxy_arp", "1"),
    ("/proc/sys/net/ipv4/neigh/{}/proxy_delay", "0"),
    ("/proc/sys/net/ipv4/conf/{}/forwarding", "1"),
    ("/proc/sys/net/ipv4/conf/{}/rp_filter", "1"),
    ("/proc/sys/net/ipv6/conf/{}/accept_ra", "0"),
    ("/proc/sys/net/ipv6/conf/{}/disable_ipv6", "1"),
];

pub fn run(report: &mut Report, options: &Options) -> Result<()> {
    let n = options.size(50, 500);
    for concurrency in [1, CONCURRENCY] {
        floor(report, n, concurrency)?;
    }
    Ok(())
}

fn floor(report: &mut Report, n: usize, concurrency: usize) -> Result<()> {
    println!("== kernel floor against weft's attach N={n} concurrency={concurrency}");
    let lab = one_host_lab()?;
    let host = lab.hosts[0].name.clone();
    let client = Client::new(&lab, 0)?;
    let batch = Batch::new(&lab, "w", n, concurrency)?;
    let pids = [
        lab.agent_pid(0).context("the agent's pid")?,
        lab.etcd[0].pid().context("etcd's pid")?,
    ];
    let cpu = Cpu::now(&pids);
    let passes = Totals::read(&host)?;
    let weft = batch.attach(&client, |_| vec![])?.run;
    let (weft_cpu, processes) = cpu.per(n);
    if let Some(passes) = Totals::read(&host)?.since(&passes) {
        // The agent's own passes during the attaches (set off by them), on the same CPUs.
        let routes = passes.of("routes");
        println!(
            "  weft's agent made {} routes passes during the attaches, {:.1} ms each: {}",
            routes.passes,
            routes.mean_ms(),
            routes.steps_ms()
        );
    }
    let ns2 = namespaces(&lab, "f", n)?;
    let cpu = Cpu::now(&[]);
    let kernel = floor_run(&host, &ns2, 0, concurrency);
    let (kernel_cpu, _) = cpu.per(n);
    batch.remove()?;
    delete_namespaces(&ns2)?;
    let kernel = kernel?;
    let key = format!("floor.n{n}.c{concurrency}");
    report.run(&format!("{key}.weft"), &weft);
    report.run(&format!("{key}.kernel"), &kernel);
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    report.line(
        &format!("{key}.weft.cpu_per_container"),
        ms(weft_cpu),
        "ms",
        &format!(
            "machine; the agent's {:.2} ms, etcd's {:.2} ms",
            ms(processes[0]),
            ms(processes[1])
        ),
    );
    report.line(
        &format!("{key}.kernel.cpu_per_container"),
        ms(kernel_cpu),
        "ms",
        "machine",
    );
    report.ratio(
        &format!("{key}.rate_ratio_weft_over_floor"),
        weft.rate() / kernel.rate(),
        Better::Higher,
        (concurrency > 1).then_some(0.8),
    );
    Ok(())
}

/// Wires one container per namespace in `names` from `concurrency` threads that live in the
/// lab host's namespace `host_ns`; the clock starts when every thread has its socket. Container
/// `first + k` goes into `names[k]` (its veth name and address follow from that number).
pub fn floor_run(host_ns: &str, names: &[String], first: usize, concurrency: usize) -> Result<Run> {
    let next = AtomicUsize::new(0);
    let ready = Barrier::new(concurrency + 1);
    let host_path = format!("/run/netns/{host_ns}");
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..concurrency)
            .map(|_| {
                let (next, ready, host_path) = (&next, &ready, &host_path);
                scope.spawn(move || -> Result<Vec<Duration>> {
                    let worker = Worker::new(host_path);
                    ready.wait();
                    let worker = worker?;
                    let mut samples = vec![];
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Some(name) = names.get(i) else {
                            return Ok(samples);
                        };
                        let started = Instant::now();
                        worker.wire(&format!("/run/netns/{name}"), first + i)?;
                        samples.push(started.elapsed());
                    }
                })
            })
            .collect();
        ready.wait();
        let started = Instant::now();
        let results: Vec<Result<Vec<Duration>>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("floor worker panicked")))
            })
            .collect();
        let wall = started.elapsed();
        let mut samples = vec![];
        for r in results {
            samples.extend(r?);
        }
        Ok(Run { samples, wall })
    })
}

/// One thread's runtime and host-namespace socket.
struct Worker {
    host_ns: File,
    runtime: tokio::runtime::Runtime,
    host: rtnetlink::Handle,
}

impl Worker {
    /// Moves the calling thread into the host namespace at `host_path` and opens its socket.
    fn new(host_path: &str) -> Result<Self> {
        let host_ns = File::open(host_path).with_context(|| format!("opening {host_path}"))?;
        setns(&host_ns, CloneFlags::CLONE_NEWNET)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let host = {
            let _entered = runtime.enter();
            let (connection, handle, _) = rtnetlink::new_connection()?;
            runtime.spawn(connection);
            handle
        };
        Ok(Self {
            host_ns,
            runtime,
            host,
        })
    }

    /// A socket inside the namespace `ns`: the thread enters it, opens the socket, comes back.
    fn socket_in(&self, ns: &File) -> Result<rtnetlink::Handle> {
        setns(ns, CloneFlags::CLONE_NEWNET)?;
        let opened = {
            let _entered = self.runtime.enter();
            rtnetlink::new_connection()
        };
        setns(&self.host_ns, CloneFlags::CLONE_NEWNET)?;
        let (connection, handle, _) = opened?;
        self.runtime.spawn(connection);
        Ok(handle)
    }

    /// Container `i` in the namespace at `path`.
    fn wire(&self, path: &str, i: usize) -> Result<()> {
        let ns = File::open(path).with_context(|| format!("opening {path}"))?;
        let inside = self.socket_in(&ns)?;
        let host_if = format!("fl{i}");
        let ip = Ipv4Addr::new(10, 99, (i / 250) as u8, (i % 250) as u8 + 1);
        let mac = vec![0x02, 0, 0, 0, (i >> 8) as u8, i as u8];
        self.runtime.block_on(async {
            let peer = LinkMessageBuilder::<LinkUnspec>::new()
                .name("eth0")
                .address(mac)
                .mtu(1500)
                .setns_by_fd(ns.as_raw_fd())
                .build();
            let veth = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
                .name(host_if.clone())
                .address(HOST_MAC.to_vec())
                .mtu(1500)
                .up()
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                .build();
            self.host.link().add(veth).execute().await?;
            let index = index_of(&inside, "eth0").await?;
            write_sysctls(&host_if)?;
            inside_requests(&inside, index, ip).await?;
            let host_index = index_of(&self.host, &host_if).await?;
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(ip, 32)
                .output_interface(host_index)
                .scope(RouteScope::Link)
                .build();
            self.host.route().add(route).replace().execute().await?;
            Ok(())
        })
    }
}

async fn index_of(handle: &rtnetlink::Handle, name: &str) -> Result<u32> {
    let link = handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await?;
    link.map(|l| l.header.index)
        .ok_or_else(|| anyhow!("{name} missing after creation"))
}

/// The six requests inside the container, pipelined on one socket as weft sends them.
async fn inside_requests(inside: &rtnetlink::Handle, index: u32, ip: Ipv4Addr) -> Result<()> {
    let gateway_route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(GATEWAY, 32)
        .output_interface(index)
        .scope(RouteScope::Link)
        .build();
    let default_route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(GATEWAY)
        .output_interface(index)
        .build();
    let up = |index| {
        inside
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
    };
    let (lo, address, eth0, gateway, default, neighbour) = futures::join!(
        up(1),
        inside.address().add(index, IpAddr::V4(ip), 32).execute(),
        up(index),
        inside.route().add(gateway_route).replace().execute(),
        inside.route().add(default_route).replace().execute(),
        inside
            .neighbours()
            .add(index, IpAddr::V4(GATEWAY))
            .link_layer_address(&HOST_MAC)
            .state(NeighbourState::Permanent)
            .replace()
            .execute(),
    );
    lo?;
    address?;
    eth0?;
    gateway?;
    default?;
    neighbour?;
    Ok(())
}

/// The host end's sysctls, written (not read first); the IPv6 one may be absent.
fn write_sysctls(ifname: &str) -> Result<()> {
    for (template, value) in SYSCTLS {
        let path = template.replace("{}", ifname);
        match std::fs::write(&path, value) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path.contains("/ipv6/") => {}
            other => other.with_context(|| format!("writing {path}"))?,
        }
    }
    Ok(())
}
