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
