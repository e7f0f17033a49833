//! Shipping weft as an operator expects (issue 18): the Debian package lints clean, installs into
//! a clean Debian 12 root and purges cleanly; the man pages and completions cover every flag of
//! the programs' clap definitions; every metric the dashboard and the alert rules use is served by
//! a live agent; promtool checks and unit-tests every alert; `weftctl graph` draws a real lab.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use weft_tests::lab::bin;
use weft_tests::{require_root, sh, Lab, LabOptions};

// Man pages and completions.
#[path = "packaging/docs.rs"]
mod docs;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a program to completion; panics with its output unless it succeeds.
fn run_ok(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed ({}):\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Builds the package with `deploy/package --profile dev`: the metadata, assets and maintainer
/// scripts of the release package around the debug binaries the suite already built (a release
/// build takes longer than a test may run).
fn build_package() -> PathBuf {
    let out = run_ok(
        Command::new(repo().join("deploy/package"))
            .args(["--profile", "dev"])
            .current_dir(repo()),
    );
    let deb = PathBuf::from(
        out.lines()
            .last()
            .expect("deploy/package prints the .deb path"),
    );
    assert!(deb.is_file(), "{} is not a file", deb.display());
    deb
}

// ---------------------------------------------------------------------------------------------
// The Debian package

/// Paths the package must install (relative to /).
const PACKAGE_PATHS: &[&str] = &[
    "usr/bin/weft-agent",
    "usr/bin/weftctl",
    "usr/lib/cni/weft-cni",
    "usr/lib/systemd/system/weft-agent.service",
    "etc/weft/agent.toml",
    "etc/iproute2/rt_protos.d/weft.conf",
    "usr/share/man/man8/weft-agent.8.gz",
    "usr/share/man/man8/weftctl.8.gz",
    "usr/share/man/man8/weftctl-graph.8.gz",
    "usr/share/man/man8/weft-cni.8.gz",
    "usr/share/bash-completion/completions/weftctl",
    "usr/share/bash-completion/completions/weft-agent",
    "usr/share/zsh/vendor-completions/_weftctl",
    "usr/share/fish/vendor_completions.d/weftctl.fish",
    "usr/share/weft/grafana/weft.json",
    "usr/share/weft/prometheus/weft-rules.yml",
    "usr/share/doc/weft/copyright",
    "usr/share/doc/weft/changelog.Debian.gz",
    "usr/share/doc/weft/README.Debian",
];

#[test]
fn the_package_is_lintian_clean_and_holds_what_an_operator_needs() {
    let deb = build_package();
    let lint = Command::new("lintian")
        .args(["--info", "--display-info", "--tag-display-limit", "0"])
        .arg(&deb)
        .output()
        .expect("lintian (Debian package lintian)");
    let report = text(&lint.stdout) + &text(&lint.stderr);
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{report}");
    println!("lintian:\n{report}");

    let field = |name: &str| run_ok(Command::new("dpkg-deb").args(["-f"]).arg(&deb).arg(name));
    let depends = field("Depends");
    for needed in ["iptables", "iproute2", "conntrack", "ipset", "libc6"] {
        assert!(
            depends.contains(needed),
            "Depends lacks {needed}: {depends}"
        );
    }
    let contents = run_ok(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for path in PACKAGE_PATHS {
        assert!(
            contents.contains(&format!("./{path}\n")),
            "the package lacks /{path}:\n{contents}"
        );
    }
    let control = tempfile::tempdir().unwrap();
    run_ok(
        Command::new("dpkg-deb")
            .arg("-e")
            .arg(&deb)
            .arg(control.path()),
    );
    let conffiles = std::fs::read_to_string(control.path().join("conffiles")).unwrap();
    for conffile in [
        "/etc/weft/agent.toml",
        "/etc/iproute2/rt_protos.d/weft.conf",
    ] {
        assert!(
            conffiles.lines().any(|l| l == conffile),
            "{conffile} is no conffile: {conffiles}"
        );
    }
    // Installed, not started: the maintainer scripts never start the agent on a fresh install.
    let postinst = std::fs::read_to_string(control.path().join("postinst")).unwrap();
    assert!(!postinst.contains("deb-systemd-invoke start"), "{postinst}");
}

/// The clean-root run: builds a minimal Debian 12 root (as deploy/cleanroom does), installs the
/// package the way an administrator would, checks it there, purges it and lists what is left.
const CLEAN_ROOT: &str = include_str!("packaging/clean-root.sh");

/// Deletes the roots of runs that were killed before they could clean up (their owner is gone).
/// Their mounts went with their mount namespace, so a plain delete is safe.
fn reap_clean_roots() {
    for entry in std::fs::read_dir("/var/tmp").unwrap().flatten() {
        let path = entry.path();
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with("weft-packaging.")
        {
            continue;
        }
        let owner = std::fs::read_to_string(path.join("owner")).unwrap_or_default();
        let gone = match owner.trim() {
            // Just made by a run that has not written its owner yet, unless it is old.
            "" => entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(3600)),
            pid => !Path::new(&format!("/proc/{pid}")).exists(),
        };
        if gone {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

#[test]
fn the_package_installs_into_a_clean_debian_12_root_and_purges_cleanly() {
    require_root();
    let deb = build_package();
    reap_clean_roots();
    // /var/tmp: a root file system is too big for a small /tmp.
    let work = tempfile::Builder::new()
        .prefix("weft-packaging.")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::write(work.path().join("owner"), std::process::id().to_string()).unwrap();
    let root = work.path().join("root");
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--pid",
            "--fork",
            "--kill-child",
            "--propagation",
            "private",
        ])
        .args(["bash", "-c", CLEAN_ROOT, "clean-root"])
        .arg(&root)
        .arg(&deb)
        .output()
        .expect("unshare (util-linux) and mmdebstrap");
    let log = text(&out.stdout) + &text(&out.stderr);
    println!("{log}");
    assert!(out.status.success(), "clean root run failed:\n{log}");
    let section = |name: &str| -> String {
        let start = log
            .find(&format!("== {name}"))
            .unwrap_or_else(|| panic!("no {name}:\n{log}"));
        let rest = &log[start + name.len() + 3..];
        rest[..rest.find("\n==").unwrap_or(rest.len())]
            .trim()
            .to_string()
    };
    assert!(section("status:").contains("install ok installed"), "{log}");
    assert_eq!(
        section("version:"),
        format!("weftctl {}", env!("CARGO_PKG_VERSION")),
        "{log}"
    );
    assert!(
        section("agent version:").starts_with("weft-agent "),
        "{log}"
    );
    let man = section("man:");
    for page in ["weftctl.8.gz", "weft-agent.8.gz", "weft-cni.8.gz"] {
        assert!(
            man.contains(&format!("/usr/share/man/man8/{page}")),
            "man -w: {man}"
        );
    }
    assert_eq!(section("verify"), "", "systemd-analyze verify:\n{log}");
    assert_eq!(
        section("enabled:"),
        "0",
        "the package must not enable the agent:\n{log}"
    );
    let conffiles = section("conffiles:");
    assert!(conffiles.contains("/etc/weft/agent.toml"), "{log}");
    assert!(
        conffiles.contains("/etc/iproute2/rt_protos.d/weft.conf"),
        "{log}"
    );
    assert_eq!(section("left:"), "", "purge left these behind:\n{log}");
    drop(work);
    assert!(!root.exists());
}

// ---------------------------------------------------------------------------------------------
// Dashboard and alert rules

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Names that look like weft metrics in a text (PromQL, YAML).
fn weft_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("weft_") {
        let before = rest[..i].chars().last();
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(name.clone());
        }
        rest = &rest[i + name.len()..];
    }
    names
}

/// Every PromQL expression of the dashboard: panel targets and template variable queries.
fn dashboard_queries() -> Vec<String> {
    fn walk(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("expr" | "definition", serde_json::Value::String(s)) => {
                            out.push(s.clone())
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(&read("deploy/grafana/weft.json"))
        .expect("deploy/grafana/weft.json is JSON");
    let mut out = vec![];
    walk(&dashboard, &mut out);
    out
}

/// GET /metrics of the agent of namespace `ns` (it listens on 127.0.0.1:9099 there).
fn scrape(ns: &str) -> String {
    let script = "exec 3<>/dev/tcp/127.0.0.1/9099 && printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3";
    let out = sh::in_ns(ns, &["timeout", "10", "bash", "-c", script]).unwrap();
    assert!(out.status.success(), "scraping {ns}: {}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn every_metric_of_the_dashboard_and_the_rules_is_served_by_a_live_agent() {
    let lab = Lab::new(LabOptions {
        hosts: 2,
        ..Default::default()
    })
    .unwrap();
    lab.attach(0, "a").unwrap();
    lab.ctl(0, &["detach", "a"]).unwrap();
    let h1 = &lab.hosts[0].name;
    lab.eventually("a peer seen", Duration::from_secs(10), || {
        scrape(h1).contains("weft_peers{state=\"alive\"} 1")
    })
    .unwrap();
    let body = scrape(h1);
    let served: BTreeSet<String> = body
        .split("\r\n\r\n")
        .nth(1)
        .expect("an HTTP body")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect();

    let dashboard: BTreeSet<String> = dashboard_queries()
        .iter()
        .flat_map(|q| weft_names(q))
        .collect();
    let rules = weft_names(&read("deploy/prometheus/weft-rules.yml"));
    // Not vacuous: the dashboard covers the agent's metrics, the rules the alerting ones.
    assert!(dashboard.len() >= 15, "{dashboard:?}");
    assert!(rules.len() >= 6, "{rules:?}");
    for (source, names) in [
        ("deploy/grafana/weft.json", &dashboard),
        ("deploy/prometheus/weft-rules.yml", &rules),
    ] {
        let missing: Vec<_> = names.difference(&served).collect();
        assert!(
            missing.is_empty(),
            "{source} uses metrics the agent does not serve: {missing:?}\nserved: {served:?}"
        );
    }
}

#[test]
fn promtool_checks_and_unit_tests_every_alert_and_parses_the_dashboard() {
    let dir = repo().join("deploy/prometheus");
    let promtool = |args: &[&str]| {
        run_ok(Command::new("promtool").args(args).current_dir(&dir));
    };
    promtool(&["check", "rules", "weft-rules.yml"]);
    promtool(&["test", "rules", "weft-rules.test.yml"]);

    // Every alert has a case that fires and a case that must stay silent.
    let rules = read("deploy/prometheus/weft-rules.yml");
    let tests = read("deploy/prometheus/weft-rules.test.yml");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 6, "{alerts:?}");
    for alert in &alerts {
        let cases: Vec<&str> = tests
            .split("- eval_time:")
            .filter(|case| case.contains(&format!("alertname: {alert}\n")))
            .collect();
        assert!(
            cases.iter().any(|c| c.contains("exp_alerts: []")),
            "{alert}: no silent case"
        );
        assert!(
            cases.iter().any(|c| c.contains("exp_labels:")),
            "{alert}: no firing case"
        );
    }

    // The dashboard's queries are PromQL promtool accepts, once Grafana's variables are filled.
    let queries = dashboard_queries();
    let mut as_rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, query) in queries.iter().enumerate() {
        let query = query
            .replace("$__rate_interval", "5m")
            .replace("$instance", ".*")
            .replace("label_values(weft_ready, instance)", "weft_ready");
        as_rules.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: {query:?}\n"
        ));
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), as_rules).unwrap();
    promtool(&["check", "rules", file.path().to_str().unwrap()]);
}

// ---------------------------------------------------------------------------------------------
// weftctl graph

/// The text lines an SVG shows (`<text>` elements), with XML character references decoded
/// (Graphviz writes `-` as `&#45;`).
fn svg_texts(svg: &str) -> BTreeSet<String> {
    let decode = |t: &str| {
        let mut out = String::new();
        let mut rest = t;
        while let Some(i) = rest.find('&') {
            out.push_str(&rest[..i]);
            let end = rest[i..]
                .find(';')
                .map(|e| i + e)
                .expect("a complete entity");
            let entity = &rest[i + 1..end];
            let decoded = match entity {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                _ => entity
                    .strip_prefix('#')
                    .and_then(|n| n.parse().ok())
                    .and_then(char::from_u32),
            };
            out.push(decoded.unwrap_or_else(|| panic!("unknown entity &{entity}; in {t}")));
            rest = &rest[end + 1..];
        }
        out + rest
    };
    svg.split("<text")
        .skip(1)
        .filter_map(|t| Some(decode(t.split_once('>')?.1.split_once("</text>")?.0)))
        .collect()
}

#[test]
fn weftctl_graph_draws_every_host_block_and_endpoint_of_a_lab() {
    let lab = Lab::new(LabOptions::default()).unwrap();
    let mut endpoints = vec![];
    for host in 0..3 {
        for n in 0..2 {
            let id = format!("c{host}{n}");
            let (_, ip) = lab.attach(host, &id).unwrap();
            endpoints.push((id, ip));
        }
    }
    let blocks: Vec<String> = lab
        .etcd_keys()
        .unwrap()
        .keys()
        .filter_map(|k| {
            k.split("/blocks/")
                .nth(1)?
                .split('/')
                .nth(1)
                .map(|b| b.replace('-', "/"))
        })
        .collect();
    assert_eq!(blocks.len(), 3, "one block per host: {blocks:?}");
    let etcd = lab.etcd_client_args();
    let graph = |path: &str, args: &[&str]| {
        let mut command =
            sh::command_in_ns(&lab.hosts[0].name, bin("weftctl").to_str().unwrap()).unwrap();
        command
            .arg("graph")
            .args(args)
            .args(&etcd)
            .env("PATH", path);
        command.output().unwrap()
    };
    let path = std::env::var("PATH").unwrap();

    let out = graph(&path, &["--format", "svg", "--endpoints"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let svg = text(&out.stdout);
    assert!(
        svg.contains("<svg") && svg.trim_end().ends_with("</svg>"),
        "{svg}"
    );
    let texts = svg_texts(&svg);
    let shown = |t: &str| texts.contains(t);
    for host in &lab.hosts {
        assert!(shown(&host.name), "no host {} in {texts:?}", host.name);
        assert!(
            shown(&host.ip.to_string()),
            "no underlay {} in {texts:?}",
            host.ip
        );
    }
    assert_eq!(svg.matches(">alive</text>").count(), 3, "{svg}");
    assert_eq!(
        svg.matches(">direct</text>").count(),
        3,
        "3 peer links: {svg}"
    );
    for block in &blocks {
        assert!(shown(block), "no block {block} in {texts:?}");
    }
    for (id, ip) in &endpoints {
        assert!(shown(id) && shown(ip), "no {id} {ip} in {texts:?}");
    }

    // Without --endpoints: hosts and blocks only. As DOT: no Graphviz needed, even without dot.
    let out = graph("/nonexistent", &["--format", "dot"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dot = text(&out.stdout);
    assert!(dot.starts_with("graph weft {"), "{dot}");
    assert!(
        blocks
            .iter()
            .all(|b| dot.contains(&format!("\"block/{b}\""))),
        "{dot}"
    );
    assert!(!dot.contains("endpoint/"), "{dot}");

    // SVG without Graphviz: a clear message, and failure.
    let out = graph("/nonexistent", &["--format", "svg"]);
    assert!(!out.status.success());
    let message = text(&out.stderr);
    assert!(
        message.contains("Graphviz") && message.contains("apt install graphviz"),
        "{message}"
    );
}
