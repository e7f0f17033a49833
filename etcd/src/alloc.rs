//! Pure allocation choices: which block to claim, which address to hand out. No I/O here; the
//! datastore turns a choice into a guarded transaction and retries on conflict.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

/// Number of blocks of prefix length `block_size` in `pool`.
pub fn block_count(pool: Ipv4Network, block_size: u8) -> u64 {
    1u64 << (block_size - pool.prefix())
}

/// The `index`-th block of `pool`.
pub fn nth_block(pool: Ipv4Network, block_size: u8, index: u64) -> Ipv4Network {
    let base = u32::from(pool.network()) as u64 + (index << (32 - block_size as u32));
    Ipv4Network::new(Ipv4Addr::from(base as u32), block_size).expect("valid prefix length")
}

/// A free block of `pool`, probing from a random start so hosts starting together spread out
/// instead of all racing for the first block.
pub fn pick_free_block(
    pool: Ipv4Network,
    block_size: u8,
    taken: &HashSet<Ipv4Network>,
    random: u64,
) -> Option<Ipv4Network> {
    let count = block_count(pool, block_size);
    let start = random % count;
    (0..count)
        .map(|i| nth_block(pool, block_size, (start + i) % count))
        .find(|block| !taken.contains(block))
}

/// The lowest address of `blocks` (in order) that is neither used nor reserved.
pub fn first_free_ip(blocks: &[Ipv4Network], used: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    blocks
        .iter()
        .flat_map(|block| block.iter())
        .find(|ip| !used.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_tile_the_pool() {
        let pool = net("10.65.0.0/16");
        assert_eq!(block_count(pool, 26), 1024);
        assert_eq!(nth_block(pool, 26, 0), net("10.65.0.0/26"));
        assert_eq!(nth_block(pool, 26, 5), net("10.65.1.64/26"));
        assert_eq!(nth_block(pool, 26, 1023), net("10.65.255.192/26"));
    }

    #[test]
    fn picks_only_free_blocks_and_reports_exhaustion() {
        let pool = net("10.66.0.0/24");
        let mut taken = HashSet::new();
        for random in 0..4u64 {
            let block = pick_free_block(pool, 26, &taken, random * 7).unwrap();
            assert!(taken.insert(block), "{block} handed out twice");
        }
        assert_eq!(pick_free_block(pool, 26, &taken, 3), None);
    }

    #[test]
    fn random_start_spreads_choices() {
        let pool = net("10.65.0.0/16");
        let taken = HashSet::new();
        let a = pick_free_block(pool, 26, &taken, 1).unwrap();
        let b = pick_free_block(pool, 26, &taken, 900).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn first_free_ip_skips_used_and_moves_to_next_block() {
        let blocks = [net("10.65.0.0/31"), net("10.65.9.0/31")];
        let mut used = HashSet::new();
        assert_eq!(
            first_free_ip(&blocks, &used),
            Some("10.65.0.0".parse().unwrap())
        );
        used.insert("10.65.0.0".parse().unwrap());
        used.insert("10.65.0.1".parse().unwrap());
        assert_eq!(
            first_free_ip(&blocks, &used),
            Some("10.65.9.0".parse().unwrap())
        );
        used.insert("10.65.9.0".parse().unwrap());
        used.insert("10.65.9.1".parse().unwrap());
        assert_eq!(first_free_ip(&blocks, &used), None);
    }
}
