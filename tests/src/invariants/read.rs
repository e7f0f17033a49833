//! Reading a lab into a [`Snapshot`]: etcd, each agent's List and Status (through `weftctl
//! --json`), each host's kernel (`ip -j` per family, sysctls, iptables-save and ip6tables-save,
//! ipset save) and every container namespace an endpoint names, hosts in parallel, every
//! command bounded in time.

use super::*;

/// Runs a command with `stdin` as its input, killing it (by its PID: we started it) when it
/// outlives `limit`.
pub fn output_within(
    command: &mut Command,
    stdin: Option<&[u8]>,
    limit: Duration,
) -> Result<Output> {
    let mut child = command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A child that exits without reading all of its input is judged by its exit, not by
        // our broken pipe.
        let _ = std::io::Write::write_all(&mut pipe, input);
    }
    // Readers on their own threads, so a chatty child never blocks on a full pipe.
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut buf = vec![];
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = vec![];
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{command:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

/// Runs a command inside the network namespace at `path`; fails on a non-zero exit.
pub fn in_netns(path: &str, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut command = Command::new("nsenter");
    command.arg(format!("--net={path}")).arg(program).args(args);
    let out = output_within(&mut command, stdin.map(str::as_bytes), READ_LIMIT)?;
    if !out.status.success() {
        bail!(
            "{program} {} in {path}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip -j` commands inside a namespace: one `ip -batch` per (family option — `""`, `"-4"`
/// or `"-6"` — and its commands), all from one shell; one JSON array per command, in order.
pub(super) fn ip_json(
    path: &str,
    detailed: bool,
    batches: &[(&str, &[&str])],
) -> Result<Vec<Vec<Value>>> {
    let mut script = String::from("set -e\n");
    for (family, commands) in batches {
        let details = if detailed { "-d" } else { "" };
        script.push_str(&format!(
            "ip {family} -j {details} -batch - <<'WEFT_END'\n{}\nWEFT_END\n",
            commands.join("\n")
        ));
    }
    let expected: usize = batches.iter().map(|(_, c)| c.len()).sum();
    let text = in_netns(path, "sh", &["-c", &script], None)?;
    let arrays: Vec<Vec<Value>> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<Vec<Value>>(l)
                .with_context(|| format!("ip -j output {l:?}"))
                // `ip -j` prints empty objects for filtered-out entries; drop them.
                .map(|v| {
                    v.into_iter()
                        .filter(|e| e.as_object().is_some_and(|o| !o.is_empty()))
                        .collect()
                })
        })
        .collect::<Result<_>>()?;
    if arrays.len() != expected {
        bail!(
            "ip -batch in {path} answered {} of {expected} commands: {text}",
            arrays.len(),
        );
    }
    Ok(arrays)
}

pub(super) fn netns_path(name: &str) -> String {
    format!("/run/netns/{name}")
}

/// Reads a host's kernel state from inside its namespace.
pub fn read_host_kernel(ns: &str) -> Result<HostKernel> {
    let path = netns_path(ns);
    let weft_routes: &[&str] = &["route show table all proto 119"];
    let mut arrays = ip_json(
        &path,
        true,
        &[
            ("", &["link show"]),
            ("-4", weft_routes),
            ("-6", weft_routes),
        ],
    )?;
    let mut routes = arrays.pop().unwrap_or_default();
    routes.splice(0..0, arrays.pop().unwrap_or_default());
    let links = arrays.pop().unwrap_or_default();
    let mut files: Vec<String> = HOST_SYSCTLS.iter().map(|(f, _)| f.to_string()).collect();
    for link in &links {
        let name = link["ifname"].as_str().unwrap_or("");
        if name.starts_with("weft") && link["group"].as_str() != Some(RETIRED_GROUP) {
            for knob in VETH_SYSCTLS.iter().chain(VETH_SYSCTLS_V4_ONLY) {
                files.push(knob.0.replace("{}", name));
            }
        }
    }
    let mut args = vec![
        "-c",
        "for f in \"$@\"; do v=$(cat \"$f\" 2>/dev/null) || v=MISSING; echo \"$f=$v\"; done",
        "sh",
    ];
    args.extend(files.iter().map(String::as_str));
    let text = in_netns(&path, "sh", &args, None)?;
    let sysctls = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let save = in_netns(&path, "iptables-save", &[], None)?;
    let save6 = in_netns(&path, "ip6tables-save", &[], None)?;
    Ok(HostKernel {
        links,
        routes,
        sysctls,
        nat: table(&save, "nat"),
        filter: table(&save, "filter"),
        raw6: table(&save6, "raw"),
        nat6: table(&save6, "nat"),
        filter6: table(&save6, "filter"),
        ipsets: in_netns(&path, "ipset", &["save"], None)?,
    })
}

/// One table of `iptables-save` output: its lines after `*<name>`.
fn table(save: &str, name: &str) -> String {
    let mut inside = false;
    let mut out = String::new();
    for line in save.lines() {
        if line.starts_with('*') {
            inside = line == format!("*{name}");
        } else if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Reads a container namespace (by path) the checker needs: addresses of both families, and
/// routes, neighbours and routing rules per family.
pub fn read_container(path: &str) -> Result<ContainerKernel> {
    if !Path::new(path).exists() {
        bail!("no such namespace");
    }
    let per_family: &[&str] = &["route show table all", "neigh show", "rule show"];
    let mut arrays = ip_json(
        path,
        false,
        &[("", &["addr show"]), ("-4", per_family), ("-6", per_family)],
    )?
    .into_iter();
    let mut next = || arrays.next().unwrap_or_default();
    Ok(ContainerKernel {
        links: next(),
        routes: next(),
        neighbours: next(),
        rules: next(),
        routes6: next(),
        neighbours6: next(),
        rules6: next(),
    })
}

/// Host-wide sysctls and their wanted values; IPv6 forwarding only where an IPv6 pool exists.
pub(super) const HOST_SYSCTLS: &[(&str, &str)] = &[
    ("/proc/sys/net/ipv4/ip_forward", "1"),
    ("/proc/sys/net/ipv6/conf/all/forwarding", "1"),
];

/// The host-end sysctls of every endpoint veth and their wanted values (`{}` = the veth); a
/// knob whose file is absent (IPv6 off) is not a violation. The last four (`IPV6_ONLY`) are
/// wanted only where an IPv6 pool exists.
pub(super) const VETH_SYSCTLS: &[(&str, &str)] = &[
    ("/proc/sys/net/ipv4/conf/{}/proxy_arp", "1"),
    ("/proc/sys/net/ipv4/neigh/{}/proxy_delay", "0"),
    ("/proc/sys/net/ipv4/conf/{}/forwarding", "1"),
    ("/proc/sys/net/ipv4/conf/{}/rp_filter", "1"),
    ("/proc/sys/net/ipv6/conf/{}/accept_ra", "0"),
    ("/proc/sys/net/ipv6/conf/{}/disable_ipv6", "0"),
    ("/proc/sys/net/ipv6/conf/{}/proxy_ndp", "1"),
    ("/proc/sys/net/ipv6/conf/{}/forwarding", "1"),
    ("/proc/sys/net/ipv6/conf/{}/accept_dad", "0"),
];

/// How many of `VETH_SYSCTLS`, at its end, only a host with an IPv6 pool sets.
pub(super) const IPV6_ONLY: usize = 4;

/// The host-end sysctls wanted only where no IPv6 pool exists: IPv6 off on the veth.
pub(super) const VETH_SYSCTLS_V4_ONLY: &[(&str, &str)] =
    &[("/proc/sys/net/ipv6/conf/{}/disable_ipv6", "1")];

/// What the snapshot needs of a lab host, so hosts can be read in parallel.
pub(super) struct HostTarget {
    name: String,
    ip: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
    socket: PathBuf,
    running: bool,
}

pub(super) fn read_agent(target: &HostTarget) -> AgentView {
    if !target.running {
        return AgentView::NotRunning;
    }
    let ctl = |what: &str| -> Result<Value, String> {
        let mut command = Command::new(bin("weftctl"));
        command
            .arg("--socket")
            .arg(&target.socket)
            .arg("--json")
            .arg(what);
        let out = output_within(&mut command, None, API_LIMIT).map_err(|e| format!("{e:#}"))?;
        if !out.status.success() {
            return Err(format!(
                "weftctl {what} exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("weftctl {what}: {e}"))
    };
    // One silent answer is enough: a frozen agent would make the second wait out its limit too.
    match ctl("ls").and_then(|list| Ok((list, ctl("status")?))) {
        Ok((list, status)) => AgentView::Answered {
            list: list.as_array().cloned().unwrap_or_default(),
            status,
        },
        Err(e) => AgentView::Silent(e),
    }
}

pub(super) fn read_host(target: &HostTarget, records: &Records) -> HostView {
    let agent = read_agent(target);
    let kernel = read_host_kernel(&target.name).map_err(|e| format!("{e:#}"));
    let mut paths: BTreeSet<String> = records
        .endpoints_of(&target.name)
        .values()
        .map(|e| e.netns.clone())
        .collect();
    if let AgentView::Answered { list, .. } = &agent {
        paths.extend(
            list.iter()
                .filter_map(|v| v["netns"].as_str().map(String::from)),
        );
    }
    let containers = paths
        .into_iter()
        .map(|p| {
            let state = read_container(&p).map_err(|e| format!("{e:#}"));
            (p, state)
        })
        .collect();
    HostView {
        name: target.name.clone(),
        ip: target.ip,
        ip6: target.ip6,
        agent,
        kernel,
        containers,
    }
}

/// Reads the whole lab: etcd first, then every host (in parallel).
pub fn snapshot(lab: &Lab) -> Result<Snapshot> {
    let started = Instant::now();
    let etcd = lab.etcd_keys().context("reading etcd")?;
    let records = Records::parse(&etcd);
    let targets: Vec<HostTarget> = lab
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| HostTarget {
            name: h.name.clone(),
            ip: h.ip,
            ip6: h.ip6,
            socket: h.socket.clone(),
            running: lab.agent_alive(i),
        })
        .collect();
    let hosts = std::thread::scope(|s| {
        let handles: Vec<_> = targets
            .iter()
            .map(|t| {
                let records = &records;
                s.spawn(move || read_host(t, records))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("host reader panicked"))
            .collect()
    });
    Ok(Snapshot {
        etcd,
        records,
        namespaces: list_netns().into_iter().collect(),
        hosts,
        took: started.elapsed(),
    })
}
