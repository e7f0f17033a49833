//! Packet captures in the lab's router: what crosses the underlay, seen where it crosses.

use std::time::Duration;

use crate::{sh, Lab};

/// Runs tcpdump in the router for `seconds` on `interface` with `filter` while `during` runs;
/// returns the packets it saw, a line each.
pub fn on_router(
    lab: &Lab,
    interface: &str,
    filter: &str,
    seconds: u32,
    during: impl FnOnce(),
) -> Vec<String> {
    let router = lab.router.clone();
    let filter = filter.to_string();
    let interface = interface.to_string();
    let capture = std::thread::spawn(move || {
        let out = sh::output(
            "ip",
            &[
                "netns",
                "exec",
                &router,
                "timeout",
                &seconds.to_string(),
                "tcpdump",
                "-n",
                "-l",
                "-p",
                "-q",
                "-i",
                &interface,
                &filter,
            ],
        )
        .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    });
    // tcpdump needs a moment to open its socket.
    std::thread::sleep(Duration::from_millis(700));
    during();
    capture.join().unwrap()
}
