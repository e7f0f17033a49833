//! The steps of a reconciliation pass, timed one by one: where a pass spends its time shows in
//! the log of the first pass, in a debug line after every full pass, and in the metrics
//! (`weft_reconcile_step_seconds_total`), so a pass that grows slower says which step grew.

use std::fmt;
use std::time::{Duration, Instant};

/// One step of a pass, in the order a pass takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Host sysctls and the endpoints of other hosts forgotten (full passes).
    Host,
    /// Endpoint records whose etcd write is still owed.
    Undelivered,
    /// Endpoints restored from etcd whose namespace is checked (full passes).
    Unverified,
    /// This host's records in etcd against the endpoint table.
    Registration,
    /// The kernel's routes and links read.
    ReadKernel,
    /// Every veth's settings checked (full passes).
    VethSysctls,
    /// Missing veths repaired, orphaned links and namespaces removed.
    Leaks,
    /// The tunnel and the routes to peers and endpoints.
    Routes,
    /// The iptables tables read back and written where they differ (full passes).
    Firewall,
    /// bird's announcements.
    Bgp,
}

impl Step {
    pub const ALL: [Step; 10] = [
        Step::Host,
        Step::Undelivered,
        Step::Unverified,
        Step::Registration,
        Step::ReadKernel,
        Step::VethSysctls,
        Step::Leaks,
        Step::Routes,
        Step::Firewall,
        Step::Bgp,
    ];

    /// The step's name in logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Step::Host => "host",
            Step::Undelivered => "undelivered",
            Step::Unverified => "unverified",
            Step::Registration => "registration",
            Step::ReadKernel => "read_kernel",
            Step::VethSysctls => "veth_sysctls",
            Step::Leaks => "leaks",
            Step::Routes => "routes",
            Step::Firewall => "firewall",
            Step::Bgp => "bgp",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Time spent in each step of one pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StepTimes([Duration; Step::ALL.len()]);

impl StepTimes {
    pub fn get(&self, step: Step) -> Duration {
        self.0[step.index()]
    }

    /// The steps that took any time, in pass order.
    pub fn taken(&self) -> impl Iterator<Item = (Step, Duration)> + '_ {
        Step::ALL
            .into_iter()
            .map(|s| (s, self.get(s)))
            .filter(|(_, d)| !d.is_zero())
    }
}

/// `registration=21.3 read_kernel=104.0 …` (milliseconds), for a log line.
impl fmt::Display for StepTimes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (step, took) in self.taken() {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            write!(f, "{}={:.1}", step.name(), took.as_secs_f64() * 1e3)?;
        }
        Ok(())
    }
}

/// A stopwatch that charges the time since its last lap to a step.
pub struct Laps {
    last: Instant,
    times: StepTimes,
}

impl Laps {
    pub fn start() -> Self {
        Self {
            last: Instant::now(),
            times: StepTimes::default(),
        }
    }

    /// Charges the time since the last lap (or the start) to `step`.
    pub fn lap(&mut self, step: Step) {
        let now = Instant::now();
        self.times.0[step.index()] += now - self.last;
        self.last = now;
    }

    pub fn times(&self) -> StepTimes {
        self.times
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laps_charge_each_step_what_went_since_the_last() {
        let started = Instant::now();
        let mut laps = Laps::start();
        std::thread::sleep(Duration::from_millis(3));
        laps.lap(Step::Registration);
        laps.lap(Step::ReadKernel);
        laps.lap(Step::Routes);
        std::thread::sleep(Duration::from_millis(1));
        laps.lap(Step::Registration);
        let times = laps.times();
        assert!(times.get(Step::Registration) >= Duration::from_millis(4));
        // Each moment is charged once: the laps add up to no more than the time that went by.
        let charged: Duration = times.taken().map(|(_, d)| d).sum();
        assert!(charged <= started.elapsed());
        assert_eq!(times.get(Step::Firewall), Duration::ZERO);
        assert_eq!(
            times.taken().map(|(s, _)| s).next(),
            Some(Step::Registration),
            "steps come in pass order"
        );
    }

    #[test]
    fn display_names_the_steps_taken_in_pass_order() {
        let mut times = StepTimes::default();
        times.0[Step::Firewall.index()] = Duration::from_micros(7_300);
        times.0[Step::Registration.index()] = Duration::from_micros(21_340);
        assert_eq!(times.to_string(), "registration=21.3 firewall=7.3");
        assert_eq!(StepTimes::default().to_string(), "");
    }

    #[test]
    fn every_step_sits_at_its_own_index() {
        for (i, step) in Step::ALL.into_iter().enumerate() {
            assert_eq!(step.index(), i, "{}", step.name());
        }
    }
}
