//! CPU time spent during a measured phase: the machine's (every process and the kernel's work
//! for them, from /proc/stat) and single processes' (the agent's, etcd's). On the two-core
//! reference machine concurrent attaches are bound by CPU; time per container says where a
//! throughput gap comes from.

use std::time::Duration;

/// CPU time counters read at one moment.
#[derive(Debug, Clone)]
pub struct Cpu {
    machine: u64,
    processes: Vec<u64>,
    pids: Vec<u32>,
}

/// Ticks per second of /proc's counters: `USER_HZ`, which the kernel keeps at 100 for
/// user space whatever its own tick rate.
const USER_HZ: f64 = 100.0;

/// Busy ticks of the whole machine: every state but idle and I/O wait.
fn machine_busy(stat: &str) -> u64 {
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    total - fields.get(3).copied().unwrap_or(0) - fields.get(4).copied().unwrap_or(0)
}

/// User and system ticks of a process (all its threads), from /proc/<pid>/stat.
fn process_ticks(stat: &str) -> u64 {
    // The command may hold spaces: fields are counted after its closing parenthesis.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command.
    let at = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    at(11) + at(12)
}

impl Cpu {
    /// The counters now, of the machine and of the processes `pids`.
    pub fn now(pids: &[u32]) -> Cpu {
        let read = |path: String| std::fs::read_to_string(path).unwrap_or_default();
        Cpu {
            machine: machine_busy(&read("/proc/stat".into())),
            processes: pids
                .iter()
                .map(|pid| process_ticks(&read(format!("/proc/{pid}/stat"))))
                .collect(),
            pids: pids.to_vec(),
        }
    }

    /// CPU time since `self` was read, per unit of `per` (containers): the machine's, then each
    /// process's in the order given.
    pub fn per(&self, per: usize) -> (Duration, Vec<Duration>) {
        let now = Cpu::now(&self.pids);
        let each = |n: u64| Duration::from_secs_f64(n as f64 / USER_HZ / per.max(1) as f64);
        (
            each(now.machine.saturating_sub(self.machine)),
            now.processes
                .iter()
                .zip(&self.processes)
                .map(|(n, b)| each(n.saturating_sub(*b)))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_leaves_out_idle_and_io_wait() {
        let stat = "cpu  100 5 50 1000 20 3 2 7 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(machine_busy(stat), 100 + 5 + 50 + 3 + 2 + 7);
    }

    #[test]
    fn process_ticks_are_user_and_system_after_the_command() {
        let stat = "4242 (tokio rt) S 1 4242 4242 0 -1 4194560 500 0 0 0 37 12 0 0 20 0 9 0";
        assert_eq!(process_ticks(stat), 49);
        let this = Cpu::now(&[std::process::id()]);
        assert_eq!(this.processes.len(), 1);
    }
}
