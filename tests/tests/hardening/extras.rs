//! The extras of the hardening issue: ipam check of unexplained veths, and thousands of idle API
//! connections.

use super::support::*;

// ---- extras ------------------------------------------------------------------------------------------

#[tokio::test]
async fn more_than_64_published_ports_are_refused_and_leave_nothing() {
    let lab = hlab(hosts(1, &[]));
    let h1 = host_ns(&lab, 0);
    let mut client = lab.client(0).await.unwrap();
    let mut req = request("many");
    req.ports = (0..200).map(|i| tcp_port(20000 + i, 80)).collect();
    let status = attach(&mut client, req)
        .await
        .expect_err("200 published ports must be refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("at most 64"), "{status:?}");
    let all = keys(&lab);
    assert!(
        !all.keys()
            .any(|k| k.contains("/ports/") || k.contains("/ips/") || k.contains("/endpoints/")),
        "{all:?}"
    );
    assert!(!nat_rules(&h1).contains("--dport 20"), "no DNAT rule left");
    assert!(weft_links(&h1).is_empty());
    assert!(lab.container_namespaces().is_empty());
    // 64 is allowed.
    let mut req = request("many");
    req.ports = (0..64).map(|i| tcp_port(20000 + i, 80)).collect();
    let ok = attach(&mut client, req)
        .await
        .expect("64 ports are allowed");
    assert_eq!(ok.ports.len(), 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_leaked_by_an_agent_killed_during_attaches_are_collected() {
    let mut lab = hlab(hosts(1, &[]));
    let host = host_ns(&lab, 0);
    let mut tasks = vec![];
    for worker in 0..6 {
        let mut client = lab.client(0).await.unwrap();
        tasks.push(tokio::spawn(async move {
            for n in 0.. {
                let id = format!("k{worker}-{n}");
                let answer =
                    tokio::time::timeout(Duration::from_secs(30), client.attach(request(&id)))
                        .await;
                if !matches!(answer, Ok(Ok(_))) {
                    return n;
                }
            }
            unreachable!()
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    lab.stop_agent(0, Signal::SIGKILL).unwrap();
    let mut attached = 0;
    for task in tasks {
        attached += task.await.unwrap();
    }
    eprintln!("{attached} attaches answered before the kill");
    // What an attach interrupted between making its namespace and recording it leaves behind.
    let planted = format!("weft-{host}-interrupted");
    sh::run("ip", &["netns", "add", &planted]).unwrap();

    lab.start_agent(0).unwrap();
    lab.wait_agent(0, Duration::from_secs(30)).unwrap();
    let leaked = || {
        let owned: BTreeSet<String> = listed(&lab, 0)
            .iter()
            .map(|e| format!("weft-{host}-{}", e["container_id"].as_str().unwrap()))
            .collect();
        lab.container_namespaces()
            .into_iter()
            .filter(|n| !owned.contains(n))
            .collect::<Vec<_>>()
    };
    let before = leaked();
    assert!(before.contains(&planted), "{before:?}");
    eprintln!("agent-owned namespaces without an endpoint after the restart: {before:?}");
    let took = lab
        .eventually(
            "agent-owned namespaces without an endpoint removed",
            RESYNC * 2 + SLACK,
            || leaked().is_empty(),
        )
        .unwrap_or_else(|e| panic!("{e}: still there: {:?}", leaked()));
    eprintln!("{} leaked namespaces removed in {took:?}", before.len());
    // Endpoints keep theirs.
    for e in listed(&lab, 0) {
        let netns = e["netns"].as_str().unwrap();
        assert!(inode(netns).is_some(), "{netns} of a live endpoint kept");
    }
}

#[test]
fn ipam_check_names_a_weft_veth_that_no_record_explains() {
    // A long resync interval: the agent would remove the stray link after one.
    let lab = hlab(hosts(1, &["--resync-interval", "60s"]));
    let h1 = host_ns(&lab, 0);
    lab.attach(0, "c1").unwrap();
    let clean = weftctl_operator(&lab, 0, &["--json", "ipam", "check"]);
    assert!(
        clean.status.success(),
        "clean before: {}",
        String::from_utf8_lossy(&clean.stdout)
    );
    let report: Value = serde_json::from_slice(&clean.stdout).unwrap();
    assert_eq!(report["kernel_checked"], true, "{report}");

    let elsewhere = format!("{}-stray", lab.prefix);
    sh::run("ip", &["netns", "add", &elsewhere]).unwrap();
    let stray = "weft0badc0ffee";
    sh::run(
        "ip",
        &[
            "-n", &h1, "link", "add", stray, "type", "veth", "peer", "name", "eth0", "netns",
            &elsewhere,
        ],
    )
    .unwrap();
    let out = weftctl_operator(&lab, 0, &["--json", "ipam", "check"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "ipam check must fail: {text}");
    let report: Value = serde_json::from_str(&text).unwrap();
    let named = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["problem"].as_str().unwrap_or_default().contains(stray));
    assert!(named, "a problem names {stray}: {report}");
}

#[tokio::test]
async fn detach_while_cut_off_from_etcd_does_nothing_and_returns_unavailable() {
    let lab = hlab(hosts(1, &[]));
    let h1 = host_ns(&lab, 0);
    let endpoint = lab.ctl_json(0, &["attach", "c1"]).unwrap();
    let netns = endpoint["netns"].as_str().unwrap().to_string();
    let ip = endpoint["ip"].as_str().unwrap().to_string();
    let veth = endpoint["host_ifname"].as_str().unwrap().to_string();
    let index = link_index(&h1, &veth).unwrap();
    let key = format!("{PREFIX}/endpoints/{h1}/c1");
    let mut client = lab.client(0).await.unwrap();

    let mut partition = Partition::new(&h1);
    let status = detach(&mut client, "c1")
        .await
        .expect_err("detach without etcd must fail");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    // Whatever the agent started in the background would show within a moment.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(link_index(&h1, &veth), Some(index), "the veth is untouched");
    assert!(inode(&netns).is_some(), "the namespace is untouched");
    assert!(sh::ping(&h1, &ip), "the container is still reachable");
    assert!(keys(&lab).contains_key(&key), "the record is still there");
    assert!(
        listed_one(&lab, 0, "c1").is_some(),
        "the agent still serves it"
    );

    partition.heal();
    let mut outcome = Err(tonic::Status::unknown("not tried"));
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        outcome = detach(&mut client, "c1").await;
        if outcome.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    outcome.expect("detach succeeds once etcd is back");
    assert!(!keys(&lab).contains_key(&key));
    lab.eventually("veth gone", Duration::from_secs(5), || {
        link_index(&h1, &veth).is_none()
    })
    .unwrap();
}

/// Whether the peer closed a connection (reads what it sent first, e.g. an HTTP/2 preface).
fn closed_by_peer(stream: &std::os::unix::net::UnixStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    let mut reader = stream;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Sets this process's soft RLIMIT_NOFILE to `soft`, raising the hard limit if need be (children
/// started afterwards inherit it).
fn set_nofile(soft: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = soft;
        limit.rlim_max = limit.rlim_max.max(soft);
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit),
            0,
            "setting RLIMIT_NOFILE to {soft}: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_socket_connections_do_not_stall_attach() {
    const IDLE: usize = 2000;
    // The agent starts with the usual soft limit (systemd's default, and most shells'), as on a
    // real host; this test process then raises its own for the idle connections.
    set_nofile(1024);
    let lab = hlab(hosts(1, &[]));
    set_nofile(IDLE as u64 + 1024);
    let pid = lab.agent_pid(0).unwrap();
    let fds = move || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    eprintln!("agent descriptors at rest: {}", fds());

    let socket = lab.hosts[0].socket.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let idle: Vec<_> = (0..IDLE)
            .map(|_| std::os::unix::net::UnixStream::connect(&socket))
            .collect();
        let _ = tx.send(idle);
    });
    let idle: Vec<_> = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("2,000 connections made within 60 s")
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("every connection accepted by the kernel");
    let opened = Instant::now();

    // An attach (through fresh connections, retried as a client would) succeeds within 5 s.
    let mut last = String::new();
    let mut done = None;
    while opened.elapsed() < Duration::from_secs(5) + SLACK {
        let attempt = tokio::time::timeout(Duration::from_secs(2), async {
            let mut client = lab.client(0).await.map_err(|e| e.to_string())?;
            client
                .attach(request("busy-day"))
                .await
                .map_err(|e| format!("{e:?}"))
        })
        .await;
        match attempt {
            Ok(Ok(_)) => {
                done = Some(opened.elapsed());
                break;
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = "attempt timed out after 2 s".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = done.unwrap_or_else(|| {
        panic!("no attach succeeded within 5 s of {IDLE} idle connections: {last}")
    });
    eprintln!("attach succeeded {took:?} after {IDLE} idle connections opened");
    let count = fds();
    eprintln!("agent descriptors with {IDLE} idle connections: {count}");
    assert!(count < 1000, "the agent holds {count} descriptors");

    // Connections that never sent a preface are closed after 5 s.
    let wait = (Duration::from_secs(5) + SLACK * 2).saturating_sub(opened.elapsed());
    tokio::time::sleep(wait).await;
    let open = idle.iter().filter(|s| !closed_by_peer(s)).count();
    assert_eq!(open, 0, "{open} idle connections still open after 5 s");
    assert!(fds() < 1000);
}
