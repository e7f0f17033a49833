//! The ping mesh between long-lived containers: one `ping` per ordered pair of hosts, each reply
//! and each missing reply written with its time, read back at the end. Parsing is pure.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::lab::Lab;

/// Interval between pings of one pair (`ping -i`).
pub const INTERVAL: &str = "0.05";

/// One pair's ping, running.
pub struct Pair {
    pub from: String,
    pub to: String,
    pub log: PathBuf,
}

/// What one pair's log says.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PairResult {
    pub replies: usize,
    /// Unix times (seconds) of the pings that got no answer in time.
    pub lost_at: Vec<f64>,
}

/// Starts `ping` from every long-lived container to every other one; `lived` holds (netns,
/// address) per container. The processes end with the lab.
pub fn start(lab: &mut Lab, lived: &[(String, String)]) -> Result<Vec<Pair>> {
    let mut pairs = vec![];
    for (from_ns, _) in lived {
        for (to_ns, to_ip) in lived {
            if from_ns == to_ns {
                continue;
            }
            let log = lab.dir.join(format!("ping-{from_ns}-{to_ns}.log"));
            let args = ["-D", "-O", "-n", "-i", INTERVAL, "-W", "1", to_ip.as_str()];
            lab.spawn_logged(from_ns, "ping", &args, Some(&log))?;
            pairs.push(Pair {
                from: from_ns.clone(),
                to: to_ns.clone(),
                log,
            });
        }
    }
    Ok(pairs)
}

/// Reads a pair's log as written so far.
pub fn read(log: &Path) -> PairResult {
    parse(&std::fs::read_to_string(log).unwrap_or_default())
}

/// Parses `ping -D -O` output: `[time] 64 bytes from ... icmp_seq=N` per reply, `[time] no
/// answer yet for icmp_seq=N` when a reply is late. A ping is lost when it was reported late and
/// no reply came afterwards (one still in flight at the end counts as lost too: the mesh is read
/// after it has run quietly for a while).
pub fn parse(text: &str) -> PairResult {
    let mut replied = std::collections::BTreeSet::new();
    let mut late = std::collections::BTreeMap::new();
    for line in text.lines() {
        let time = line
            .strip_prefix('[')
            .and_then(|rest| rest.split_once(']'))
            .and_then(|(t, _)| t.parse::<f64>().ok());
        let seq = line
            .split("icmp_seq=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok());
        match (seq, line.contains(" bytes from "), time) {
            (Some(seq), true, _) => {
                replied.insert(seq);
            }
            (Some(seq), false, Some(time)) if line.contains("no answer yet") => {
                late.insert(seq, time);
            }
            _ => {}
        }
    }
    PairResult {
        replies: replied.len(),
        lost_at: late
            .into_iter()
            .filter(|(seq, _)| !replied.contains(seq))
            .map(|(_, time)| time)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_and_missing_replies_are_counted_with_their_time() {
        let text = "PING 10.65.0.1 (10.65.0.1) 56(84) bytes of data.\n\
            [1764650000.100000] 64 bytes from 10.65.0.1: icmp_seq=1 ttl=62 time=0.1 ms\n\
            [1764650000.150000] no answer yet for icmp_seq=2\n\
            [1764650000.200000] no answer yet for icmp_seq=3\n\
            [1764650000.210000] 64 bytes from 10.65.0.1: icmp_seq=3 ttl=62 time=60 ms\n\
            [1764650000.250000] 64 bytes from 10.65.0.1: icmp_seq=4 ttl=62 time=0.1 ms\n";
        assert_eq!(
            parse(text),
            PairResult {
                replies: 3,
                lost_at: vec![1764650000.15]
            }
        );
    }
}
