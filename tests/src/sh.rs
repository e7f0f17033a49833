//! Running commands, on the host or inside a lab namespace.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};

/// Runs a command to completion and returns its output; fails if it could not start.
pub fn output(program: &str, args: &[&str]) -> Result<Output> {
    Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} {}", args.join(" ")))
}

/// Runs a command that must succeed.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = output(program, args)?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip` commands (without the leading `ip`) in namespace `ns` (empty: this one) with one
/// `ip -batch` process; fails on the first that fails.
pub fn ip_batch(ns: &str, commands: &[String]) -> Result<()> {
    use std::io::Write;
    let mut args = vec![];
    if !ns.is_empty() {
        args.extend(["-n", ns]);
    }
    args.extend(["-batch", "-"]);
    let mut child = Command::new("ip")
        .args(&args)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running ip -batch")?;
    let mut input = commands.join("\n");
    input.push('\n');
    // `ip` stops reading at the first failing command; its own error says more than our
    // broken pipe would, so look at how it exited before at how the write went.
    let written = child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "ip -batch failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    written.context("writing to ip -batch")?;
    Ok(())
}

/// Runs a command inside a named network namespace (`ip netns exec`).
pub fn in_ns(ns: &str, args: &[&str]) -> Result<Output> {
    let mut all = vec!["netns", "exec", ns];
    all.extend_from_slice(args);
    output("ip", &all)
}

/// Runs a command inside namespace `ns` (`ip netns exec`); fails on a non-zero exit.
pub fn run_in(ns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["netns", "exec", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// A command that will start inside the network namespace `ns` (only the network namespace is
/// entered, so namespaces the child creates under /run/netns stay visible to everyone).
pub fn command_in_ns(ns: &str, program: &str) -> Result<Command> {
    let file = std::fs::File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("opening netns {ns}"))?;
    let mut command = Command::new(program);
    // SAFETY: setns is async-signal-safe; the fd stays open in the closure until exec.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(command)
}

/// Pings `target` once from namespace `ns`; true if it answered within a second.
pub fn ping(ns: &str, target: &str) -> bool {
    in_ns(ns, &["ping", "-c", "1", "-W", "1", "-q", target])
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// GET `path` from 127.0.0.1:`port` inside namespace `ns` (an agent's health and metrics
/// listener): the status code and the body.
pub fn http_get(ns: &str, port: u16, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let (ns, path) = (ns.to_string(), path.to_string());
    std::thread::spawn(move || -> Result<(u16, String)> {
        let file = std::fs::File::open(format!("/run/netns/{ns}"))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("no HTTP status")?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the HTTP thread panicked"))?
}

/// The reconciler's totals from an agent's metrics (`weft_reconcile_duration_seconds` sum in
/// seconds and count of passes) in namespace `ns`.
pub fn reconcile_totals(ns: &str) -> Result<(f64, u64)> {
    let (_, body) = http_get(ns, 9099, "/metrics")?;
    let value = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .with_context(|| format!("{name} in the metrics"))
    };
    Ok((
        value("weft_reconcile_duration_seconds_sum ")?,
        value("weft_reconcile_duration_seconds_count ")? as u64,
    ))
}
