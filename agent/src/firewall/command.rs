//! Running the command-line tools the firewall and network policy drive (`iptables-restore`,
//! `ipset`, `conntrack`): input on stdin, output back, and a failure that names the command and
//! says what it printed.

use std::io::Write;
use std::process::{Command, Stdio};

/// A command that could not run or exited non-zero.
#[derive(Debug, thiserror::Error)]
#[error("{command}: {message}")]
pub struct CommandFailed {
    /// The command line, as shown to the operator.
    pub command: String,
    /// What it printed on stderr (or why it could not run).
    pub message: String,
}

/// Runs `program` with `args`, `input` on its stdin; returns its stdout.
pub fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, CommandFailed> {
    let shown = format!("{program} {}", args.join(" "));
    let fail = |message: String| CommandFailed {
        command: shown.clone(),
        message,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    // A program that fails early stops reading; its own message says more than the broken
    // pipe our write would report, so the exit status is looked at first.
    let written = match input {
        Some(input) => child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input.as_bytes()),
        None => Ok(()),
    };
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    written.map_err(|e| fail(e.to_string()))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
