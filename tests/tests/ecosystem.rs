//! Where weft meets its users' tools: the CNI plugin (directly and under podman), systemd,
//! health and metrics, operator commands, and the Vagrant lab.

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{json, Value};
use weft_tests::cni::run as cni;
use weft_tests::lab::{bin, OUTSIDE_IP};
use weft_tests::{sh, Lab, LabOptions};

#[test]
fn the_cni_plugin_speaks_the_spec() {
    let mut lab = Lab::new(LabOptions {
        hosts: 1,
        ..Default::default()
    })
    .unwrap();
    let config = json!({
        "cniVersion": "1.1.0", "name": "weft", "type": "weft-cni",
        "socket": lab.hosts[0].socket,
    });
    let (ok, version) = cni("VERSION", "", "", &json!({"cniVersion": "1.0.0"}));
    assert!(
        ok && version["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.1.0")),
        "{version}"
    );
    assert_eq!(version["cniVersion"], "1.0.0", "{version}");

    let ns: Vec<String> = (0..3).map(|i| format!("{}-cni{i}", lab.prefix)).collect();
    for n in &ns {
        sh::run("ip", &["netns", "add", n]).unwrap();
    }
    let path = |i: usize| format!("/run/netns/{}", ns[i]);
    let (ok, result) = cni("ADD", "ctr-a", &path(0), &config);
    assert!(ok, "{result}");
    assert_eq!(result["cniVersion"], "1.1.0");
    assert_eq!(result["interfaces"][0]["name"], "eth0");
    assert_eq!(result["interfaces"][0]["sandbox"], path(0));
    let address = result["ips"][0]["address"].as_str().unwrap().to_string();
    assert!(address.ends_with("/32"), "{result}");
    assert_eq!(result["ips"][0]["gateway"], "169.254.1.1");
    assert_eq!(result["routes"][0]["dst"], "0.0.0.0/0");
    let ip = address.trim_end_matches("/32");
    assert!(sh::ping(&ns[0], &lab.hosts[0].ip.to_string()));

    // ADD again is idempotent; CHECK passes, then fails once the interface is broken.
    let (ok, again) = cni("ADD", "ctr-a", &path(0), &config);
    assert!(ok && again["ips"][0]["address"] == json!(address));
    let (ok, err) = cni("CHECK", "ctr-a", &path(0), &config);
    assert!(ok, "{err}");
    sh::run(
        "ip",
        &["-n", &ns[0], "addr", "del", &address, "dev", "eth0"],
    )
    .unwrap();
    let (ok, err) = cni("CHECK", "ctr-a", &path(0), &config);
    assert!(!ok);
    assert_eq!(err["code"], 103, "damaged dataplane: {err}");
    assert!(
        err["msg"].as_str().unwrap().contains("does not hold"),
        "{err}"
    );
    // ADD repairs; CHECK agrees.
    assert!(cni("ADD", "ctr-a", &path(0), &config).0);
    let (ok, err) = cni("CHECK", "ctr-a", &path(0), &config);
    assert!(ok, "{err}");
    let (ok, err) = cni("CHECK", "ctr-a", &path(1), &config);
    assert!(!ok);
    assert_eq!(
        err["code"], 4,
        "the attachment is in another namespace: {err}"
    );
    let (ok, err) = cni("CHECK", "ctr-unknown", &path(0), &config);
    assert!(!ok);
    assert_eq!(err["code"], 3, "unknown container: {err}");

    // Errors come as the spec's JSON with the right codes.
    let (ok, err) = cni("ADD", "", &path(1), &config);
    assert!(!ok);
    assert_eq!(err["code"], 4, "missing CNI_CONTAINERID: {err}");
    let mut old = config.clone();
    old["cniVersion"] = json!("0.1.0");
    assert_eq!(cni("ADD", "x", &path(1), &old).1["code"], 1);
    let mut child = Command::new(bin("weft-cni"))
        .env("CNI_COMMAND", "ADD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"{not json").unwrap();
    let out = child.wait_with_output().unwrap();
    let err: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(err["code"], 6, "{err}");

    // GC releases attachments that are not valid any more; DEL is idempotent.
    assert!(cni("ADD", "ctr-b", &path(1), &config).0);
    assert!(cni("ADD", "ctr-c", &path(2), &config).0);
    let mut gc = config.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "ctr-b", "ifname": "eth0"}]);
    assert!(cni("GC", "", "", &gc).0);
    let listed = lab.ctl_json(0, &["ls"]).unwrap();
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["container_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 1, "only ctr-b survives GC: {ids:?}");
    assert!(
        ids[0].starts_with("cni-") && ids[0].ends_with("-ctrb"),
        "{ids:?}"
    );
    assert!(cni("DEL", "ctr-b", &path(1), &config).0);
    assert!(
        cni("DEL", "ctr-b", &path(1), &config).0,
        "DEL twice succeeds"
    );
    assert!(!lab
        .etcd_keys()
        .unwrap()
        .keys()
        .any(|k| k.ends_with(&format!("/ips/{ip}"))));

    // STATUS: ready with the agent up, code 50 without it.
    assert!(cni("STATUS", "", "", &config).0);
    lab.stop_agent(0, Signal::SIGTERM).unwrap();
    let (ok, err) = cni("STATUS", "", "", &config);
    assert!(!ok);
    assert_eq!(err["code"], 50, "{err}");
    for n in &ns {
        sh::run("ip", &["netns", "del", n]).unwrap();
    }
}

/// A busybox-static root filesystem for podman's `--rootfs`.
fn busybox_rootfs(dir: &std::path::Path) -> std::path::PathBuf {
    let root = dir.join("rootfs");
    for sub in ["bin", "proc", "sys", "dev", "etc", "tmp", "www"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static installed");
    let applets = sh::run("/bin/busybox", &["--list"]).unwrap();
    for applet in applets.lines().filter(|a| *a != "busybox") {
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
    }
    std::fs::write(root.join("www/index.html"), "served by a weft container\n").unwrap();
    root
}

struct Podman {
    config_dir: std::path::PathBuf,
    conf: std::path::PathBuf,
    containers: Vec<String>,
}

impl Podman {
    fn new(lab: &Lab) -> Self {
        let config_dir = lab.dir.join("cni");
        std::fs::create_dir_all(&config_dir).unwrap();
        let plugins = lab.dir.join("cni-bin");
        std::fs::create_dir_all(&plugins).unwrap();
        std::fs::copy(bin("weft-cni"), plugins.join("weft-cni")).unwrap();
        for (i, host) in lab.hosts.iter().enumerate() {
            let conflist = json!({
                "cniVersion": "1.0.0",
                "name": format!("{}-net{}", lab.prefix, i + 1),
                "plugins": [{
                    "type": "weft-cni",
                    "socket": host.socket,
                    "capabilities": {"portMappings": true},
                }],
            });
            std::fs::write(
                config_dir.join(format!("{}-net{}.conflist", lab.prefix, i + 1)),
                conflist.to_string(),
            )
            .unwrap();
        }
        let conf = lab.dir.join("containers.conf");
        std::fs::write(
            &conf,
            format!(
                "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\nnetwork_config_dir = \"{}\"\n",
                plugins.display(),
                config_dir.display()
            ),
        )
        .unwrap();
        Podman {
            config_dir,
            conf,
            containers: vec![],
        }
    }

    fn cmd(&self, args: &[&str]) -> std::process::Output {
        let out = Command::new("podman")
            .env("CONTAINERS_CONF", &self.conf)
            .arg("--cni-config-dir")
            .arg(&self.config_dir)
            .args(args)
            .output()
            .expect("podman installed");
        out
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(
            out.status.success(),
            "podman {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Starts a detached container; options go before --rootfs (podman's rule).
    fn run(&mut self, name: &str, options: &[&str], rootfs: &std::path::Path, command: &str) {
        let mut args = vec![
            "--runtime",
            "runc",
            "run",
            "-d",
            "--name",
            name,
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=1024:1024",
            "--cap-add",
            "NET_RAW",
        ];
        args.extend_from_slice(options);
        args.extend_from_slice(&[
            "--rootfs",
            rootfs.to_str().unwrap(),
            "/bin/sh",
            "-c",
            command,
        ]);
        self.ok(&args);
        self.containers.push(name.to_string());
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for name in &self.containers {
            let _ = self.cmd(&["rm", "-f", "-t", "0", name]);
        }
    }
}

#[test]
fn podman_containers_on_weft_reach_each_other_publish_ports_and_free_addresses() {
    let lab = Lab::new(LabOptions {
        hosts: 2,
        ..Default::default()
    })
    .unwrap();
    let rootfs = busybox_rootfs(&lab.dir);
    let mut podman = Podman::new(&lab);
    let (a, b) = (format!("{}-a", lab.prefix), format!("{}-b", lab.prefix));
    let net1 = format!("{}-net1", lab.prefix);
    let net2 = format!("{}-net2", lab.prefix);
    podman.run(
        &a,
        &["--network", &net1, "-p", "8080:80"],
        &rootfs,
        "httpd -f -p 80 -h /www",
    );
    podman.run(&b, &["--network", &net2], &rootfs, "sleep 600");
    let ip_of = |name: &str, host: usize, network: &str| {
        let listed = lab.ctl_json(host, &["ls"]).unwrap();
        let id = podman.ok(&["inspect", "--format", "{{.Id}}", name]);
        let wanted = weft_cli::cni::weft_id(network, &id, "eth0");
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["container_id"] == json!(wanted))
            .map(|e| e["ip"].as_str().unwrap().to_string())
            .expect("endpoint of the podman container")
    };
    let (ip_a, ip_b) = (ip_of(&a, 0, &net1), ip_of(&b, 1, &net2));
    // Across hosts, both ways, from inside the containers.
    assert!(podman
        .cmd(&["exec", &b, "ping", "-c", "1", "-W", "2", &ip_a])
        .status
        .success());
    assert!(podman
        .cmd(&["exec", &a, "ping", "-c", "1", "-W", "2", &ip_b])
        .status
        .success());
    // -p 8080:80 through weft's DNAT, from the outside host.
    let fetched = lab.eventually("published port answers", Duration::from_secs(10), || {
        sh::in_ns(
            &lab.outside,
            &[
                "sh",
                "-c",
                &format!(
                    "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -n -w 2 {} 8080",
                    lab.hosts[0].ip
                ),
            ],
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("served by a weft container"))
        .unwrap_or(false)
    });
    assert!(
        fetched.is_ok(),
        "published port not reachable from outside {OUTSIDE_IP}"
    );

    // Removing a container frees its address.
    podman.ok(&["rm", "-f", "-t", "0", &b]);
    podman.containers.retain(|c| c != &b);
    assert!(!lab
        .etcd_keys()
        .unwrap()
        .keys()
        .any(|k| k.ends_with(&format!("/ips/{ip_b}"))));

    // The seeds' own case: a container with no network, wired afterwards by pid.
    let c = format!("{}-c", lab.prefix);
    podman.run(&c, &["--network", "none"], &rootfs, "sleep 600");
    let pid = podman.ok(&["inspect", "--format", "{{.State.Pid}}", &c]);
    let endpoint = lab
        .ctl_json(1, &["attach", "by-pid", "--pid", &pid])
        .unwrap();
    let ip_c = endpoint["ip"].as_str().unwrap().to_string();
    assert!(podman
        .cmd(&["exec", &c, "ping", "-c", "1", "-W", "2", &ip_a])
        .status
        .success());
    assert!(podman
        .cmd(&["exec", &a, "ping", "-c", "1", "-W", "2", &ip_c])
        .status
        .success());
    lab.ctl_json(1, &["detach", "by-pid"]).unwrap();
}

#[test]
fn the_systemd_unit_verifies_and_ready_comes_after_reconciliation() {
    // systemd-analyze verify needs the ExecStart binary to exist: point it at the build.
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/systemd/weft-agent.service"
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weft-agent.service");
    std::fs::write(
        &path,
        unit.replace(
            "/usr/local/bin/weft-agent",
            bin("weft-agent").to_str().unwrap(),
        ),
    )
    .unwrap();
    let verify = sh::output("systemd-analyze", &["verify", path.to_str().unwrap()]).unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );

    let mut lab = Lab::new(LabOptions {
        hosts: 1,
        start_agents: false,
        ..Default::default()
    })
    .unwrap();
    let socket_path = lab.dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    lab.start_agent_env(
        0,
        &[],
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    )
    .unwrap();
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("a notification");
    assert_eq!(&buf[..n], b"READY=1");
    // The agent logs the end of its first reconciliation before it notifies; read right
    // after READY=1 arrived, the log must already say so.
    let log = lab.agent_log(0);
    assert!(
        log.contains("initial reconciliation done"),
        "READY=1 must follow the first reconciliation:\n{log}"
    );
    assert!(
        lab.ctl(0, &["status"]).unwrap().status.success(),
        "API up when READY"
    );
    // WATCHDOG_USEC=400000: pets every 200 ms while the loops run.
    let n = socket.recv(&mut buf).expect("a watchdog notification");
    assert_eq!(&buf[..n], b"WATCHDOG=1");
}

fn http_get(ns: &str, port: u16, path: &str) -> (u16, String) {
    sh::http_get(ns, port, path).unwrap()
}

#[test]
fn health_and_metrics_are_served_and_pass_promtool() {
    let mut lab = Lab::new(LabOptions {
        hosts: 2,
        ..Default::default()
    })
    .unwrap();
    lab.attach(0, "a").unwrap();
    lab.attach(1, "b").unwrap();
    let _ = lab.ctl(0, &["attach", "bad/id"]);
    let h1 = lab.hosts[0].name.clone();
    assert_eq!(http_get(&h1, 9099, "/healthz").0, 200);
    assert_eq!(http_get(&h1, 9099, "/readyz").0, 200);
    assert_eq!(http_get(&h1, 9099, "/nope").0, 404);
    // The peer's liveness arrives through the watch; wait for it before reading everything.
    lab.eventually("peer seen alive", Duration::from_secs(10), || {
        http_get(&h1, 9099, "/metrics")
            .1
            .contains("weft_peers{state=\"alive\"} 1")
    })
    .unwrap();
    let (status, body) = http_get(&h1, 9099, "/metrics");
    assert_eq!(status, 200);
    for needle in [
        "weft_attach_total{result=\"ok\"} 1",
        "weft_attach_total{result=\"error\"} 1",
        "weft_endpoints 1",
        "weft_local_blocks 1",
        "weft_peers{state=\"alive\"} 1",
        "weft_attach_duration_seconds_count 2",
        "weft_reconcile_duration_seconds_count",
        "weft_iptables_restore_total{result=\"ok\"}",
        "weft_etcd_connected 1",
    ] {
        assert!(body.contains(needle), "missing {needle}:\n{body}");
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    // Not ready without etcd, yet alive.
    lab.etcd[0].stop();
    assert_eq!(http_get(&h1, 9099, "/readyz").0, 503);
    assert_eq!(http_get(&h1, 9099, "/healthz").0, 200);
}

#[test]
fn operator_commands_show_hosts_and_pool_use_and_find_and_fix_inconsistencies() {
    let lab = Lab::new(LabOptions::default()).unwrap();
    lab.attach(0, "a").unwrap();
    lab.attach(0, "b").unwrap();
    lab.attach(1, "c").unwrap();
    let weftctl = bin("weftctl");
    let etcd = lab.etcd_client_args();
    let socket = lab.hosts[0].socket.to_str().unwrap().to_string();
    // weftctl runs on host 1, where it sees etcd, the agent and the kernel.
    let run = |args: &[&str]| {
        let mut all = vec![weftctl.to_str().unwrap(), "--socket", &socket];
        all.extend_from_slice(args);
        all.extend(etcd.iter().map(String::as_str));
        sh::in_ns(&lab.hosts[0].name, &all).unwrap()
    };
    let hosts: Value = serde_json::from_slice(&run(&["--json", "hosts"]).stdout).unwrap();
    let hosts = hosts.as_array().unwrap();
    assert_eq!(hosts.len(), 3);
    let h1 = hosts
        .iter()
        .find(|h| h["host"] == json!(lab.hosts[0].name))
        .unwrap();
    assert_eq!(h1["endpoints"], 2);
    assert_eq!(h1["alive"], true);
    assert_eq!(h1["underlay_ip"], json!(lab.hosts[0].ip.to_string()));
    let text = String::from_utf8_lossy(&run(&["hosts"]).stdout).to_string();
    assert!(
        text.contains("UNDERLAY") && text.contains("alive"),
        "{text}"
    );

    let show: Value = serde_json::from_slice(&run(&["--json", "ipam", "show"]).stdout).unwrap();
    assert_eq!(show[0]["used"], 3);
    assert_eq!(show[0]["addresses"], 65536);
    assert_eq!(show[0]["free"], 65533);
    assert_eq!(show[0]["blocks_claimed"], 2);

    let clean = run(&["ipam", "check"]);
    let text = String::from_utf8_lossy(&clean.stdout);
    assert!(clean.status.success(), "{text}");
    assert!(text.contains("kernel matches"), "{text}");

    // A leaked address, a missing guard, and a veth gone behind the agent's back.
    lab.etcd()
        .put(
            "/weft/v1/ips/10.65.250.9",
            "{\"host\":\"ghost\",\"container_id\":\"gone\"}",
        )
        .unwrap();
    let b_ip = lab.ctl_json(0, &["get", "b"]).unwrap()["ip"]
        .as_str()
        .unwrap()
        .to_string();
    sh::in_ns(
        &lab.router,
        &[
            "etcdctl",
            "--endpoints",
            &lab.etcd_endpoints(),
            "del",
            &format!("/weft/v1/ips/{b_ip}"),
        ],
    )
    .unwrap();
    let broken = run(&["--json", "ipam", "check"]);
    assert_eq!(broken.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&broken.stdout).unwrap();
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2, "{report}");
    assert!(problems
        .iter()
        .all(|p| p["fix"].as_str().unwrap().contains("--fix")));
    let fixed = run(&["ipam", "check", "--fix"]);
    assert!(String::from_utf8_lossy(&fixed.stdout).contains("fixed 2 of 2"));
    assert!(run(&["ipam", "check"]).status.success());
    assert!(lab
        .etcd_keys()
        .unwrap()
        .contains_key(&format!("/weft/v1/ips/{b_ip}")));
}

#[test]
fn the_vagrant_lab_validates() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/vagrant");
    // No VM provider is installed on build machines: validate everything but provider blocks.
    let out = Command::new("vagrant")
        .args(["validate", "--ignore-provider"])
        .current_dir(dir)
        .env("VAGRANT_CHECKPOINT_DISABLE", "1")
        .output()
        .expect("vagrant (Debian package vagrant)");
    assert!(
        out.status.success(),
        "vagrant validate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
