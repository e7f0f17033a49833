//! Which of this host's blocks are due to go back to their pool: those that have held no
//! address for the whole grace, never the last block of a pool on this host. Pure.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;

/// Since when each of this host's blocks has been seen empty, from check to check.
#[derive(Debug, Default)]
pub struct EmptySince(BTreeMap<IpNetwork, Instant>);

impl EmptySince {
    /// Notes what is empty now (`blocks`: this host's blocks with their pool; `used`: every
    /// address this host uses) and returns the blocks whose grace is over, with their pool.
    /// A pool whose blocks are all empty keeps its lowest one.
    pub fn due(
        &mut self,
        blocks: &BTreeMap<IpNetwork, String>,
        used: &BTreeSet<IpAddr>,
        now: Instant,
        after: Duration,
    ) -> Vec<(String, IpNetwork)> {
        let empty: BTreeSet<IpNetwork> = blocks
            .keys()
            .filter(|block| !used.iter().any(|ip| block.contains(*ip)))
            .copied()
            .collect();
        self.0.retain(|block, _| empty.contains(block));
        for block in &empty {
            self.0.entry(*block).or_insert(now);
        }
        let mut kept: BTreeSet<&str> = blocks
            .iter()
            .filter(|(block, _)| !empty.contains(block))
            .map(|(_, pool)| pool.as_str())
            .collect();
        let mut due = vec![];
        for block in &empty {
            let pool = blocks[block].as_str();
            // The lowest empty block of a pool with no other is kept (blocks are in order).
            if kept.insert(pool) {
                continue;
            }
            if now.duration_since(self.0[block]) >= after {
                due.push((pool.to_string(), *block));
            }
        }
        due
    }

    /// Forgets a block (released, or found in use when it was to go).
    pub fn forget(&mut self, block: IpNetwork) {
        self.0.remove(&block);
    }

    /// The blocks seen empty, for status.
    pub fn blocks(&self) -> Vec<IpNetwork> {
        self.0.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> IpNetwork {
        text.parse().unwrap()
    }

    fn blocks(list: &[(&str, &str)]) -> BTreeMap<IpNetwork, String> {
        list.iter().map(|(b, p)| (net(b), p.to_string())).collect()
    }

    fn used(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    const GRACE: Duration = Duration::from_secs(60);

    #[test]
    fn a_block_goes_only_after_a_whole_grace_of_emptiness() {
        let mine = blocks(&[("10.65.0.0/26", "default"), ("10.65.0.64/26", "default")]);
        let mut empty = EmptySince::default();
        let t0 = Instant::now();
        assert!(empty
            .due(&mine, &used(&["10.65.0.2"]), t0, GRACE)
            .is_empty());
        assert_eq!(empty.blocks(), [net("10.65.0.64/26")]);
        assert!(empty
            .due(&mine, &used(&["10.65.0.2"]), t0 + GRACE / 2, GRACE)
            .is_empty());
        // Used for a moment: the grace starts again.
        assert!(empty
            .due(
                &mine,
                &used(&["10.65.0.2", "10.65.0.70"]),
                t0 + GRACE / 2,
                GRACE
            )
            .is_empty());
        let t1 = t0 + GRACE;
        assert!(empty
            .due(&mine, &used(&["10.65.0.2"]), t1, GRACE)
            .is_empty());
        assert_eq!(
            empty.due(&mine, &used(&["10.65.0.2"]), t1 + GRACE, GRACE),
            [("default".to_string(), net("10.65.0.64/26"))]
        );
    }

    #[test]
    fn each_pool_keeps_one_block_on_the_host() {
        let mine = blocks(&[
            ("10.65.0.0/26", "default"),
            ("10.65.0.64/26", "default"),
            ("10.66.0.0/26", "other"),
            ("fd65::/122", "default-v6"),
            ("fd65::40/122", "default-v6"),
        ]);
        let mut empty = EmptySince::default();
        let t0 = Instant::now();
        assert!(empty.due(&mine, &used(&["fd65::41"]), t0, GRACE).is_empty());
        let due = empty.due(&mine, &used(&["fd65::41"]), t0 + GRACE, GRACE);
        assert_eq!(
            due,
            [
                ("default".to_string(), net("10.65.0.64/26")),
                ("default-v6".to_string(), net("fd65::/122")),
            ],
            "default keeps its lowest block, other its only one, default-v6 its used one"
        );
    }

    #[test]
    fn a_forgotten_block_starts_its_grace_again() {
        let mine = blocks(&[("10.65.0.0/26", "default"), ("10.65.0.64/26", "default")]);
        let mut empty = EmptySince::default();
        let t0 = Instant::now();
        empty.due(&mine, &used(&["10.65.0.1"]), t0, GRACE);
        empty.forget(net("10.65.0.64/26"));
        assert!(empty
            .due(&mine, &used(&["10.65.0.1"]), t0 + GRACE, GRACE)
            .is_empty());
    }
}
