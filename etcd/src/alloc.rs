//! Pure allocation choices: which block to claim, which address to hand out. No I/O here; the
//! datastore turns a choice into a guarded transaction and retries on conflict. Works for both
//! address families (block indices are u128: an IPv6 pool holds up to 2^128 blocks).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;

fn bits(net: IpNetwork) -> u8 {
    match net {
        IpNetwork::V4(_) => 32,
        IpNetwork::V6(_) => 128,
    }
}

/// Number of blocks of prefix length `block_size` in `pool` (saturating at u128::MAX).
pub fn block_count(pool: IpNetwork, block_size: u8) -> u128 {
    1u128
        .checked_shl(u32::from(block_size.saturating_sub(pool.prefix())))
        .unwrap_or(u128::MAX)
}

/// The `index`-th block of `pool`.
pub fn nth_block(pool: IpNetwork, block_size: u8, index: u128) -> IpNetwork {
    let shift = u32::from(bits(pool) - block_size);
    let offset = index.checked_shl(shift).unwrap_or(0);
    let network = match pool.network() {
        IpAddr::V4(base) => IpAddr::V4(Ipv4Addr::from(u32::from(base).wrapping_add(offset as u32))),
        IpAddr::V6(base) => IpAddr::V6(Ipv6Addr::from(u128::from(base).wrapping_add(offset))),
    };
    IpNetwork::new(network, block_size).expect("valid prefix length")
}

/// A free block of `pool`, probing from a random start so hosts starting together spread out
/// instead of all racing for the first block.
pub fn pick_free_block(
    pool: IpNetwork,
    block_size: u8,
    taken: &HashSet<IpNetwork>,
    random: u128,
) -> Option<IpNetwork> {
    let count = block_count(pool, block_size);
    let start = random % count;
    // Every taken block can push the probe one step further; one more finds a free one if any.
    let probes = (taken.len() as u128 + 1).min(count);
    (0..probes)
        .map(|i| nth_block(pool, block_size, (start + i) % count))
        .find(|block| !taken.contains(block))
}

/// The block of prefix length `block_size` that holds `ip`.
pub fn block_of(ip: IpAddr, block_size: u8) -> IpNetwork {
    let net = IpNetwork::new(ip, block_size).expect("block size fits the address family");
    IpNetwork::new(net.network(), block_size).expect("valid prefix length")
}

/// The lowest address of `blocks` (in order) that is neither used nor reserved.
pub fn first_free_ip(blocks: &[IpNetwork], used: impl Fn(IpAddr) -> bool) -> Option<IpAddr> {
    blocks
        .iter()
        .flat_map(|block| block.iter())
        .find(|ip| !used(*ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_lies_in_the_block_its_prefix_names() {
        let block = |ip: &str, size| block_of(ip.parse().unwrap(), size).to_string();
        assert_eq!(block("10.65.3.77", 26), "10.65.3.64/26");
        assert_eq!(block("10.65.3.64", 26), "10.65.3.64/26");
        assert_eq!(block("10.65.3.7", 32), "10.65.3.7/32");
        assert_eq!(block("fd65::1:ff", 122), "fd65::1:c0/122");
    }

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_tile_the_pool() {
        let pool = net("10.65.0.0/16");
        assert_eq!(block_count(pool, 26), 1024);
        assert_eq!(nth_block(pool, 26, 0), net("10.65.0.0/26"));
        assert_eq!(nth_block(pool, 26, 5), net("10.65.1.64/26"));
        assert_eq!(nth_block(pool, 26, 1023), net("10.65.255.192/26"));
        let v6 = net("fd65::/48");
        assert_eq!(block_count(v6, 122), 1 << 74);
        assert_eq!(nth_block(v6, 122, 1), net("fd65::40/122"));
    }

    #[test]
    fn picks_only_free_blocks_and_reports_exhaustion() {
        let pool = net("10.66.0.0/24");
        let mut taken = HashSet::new();
        for random in 0..4u128 {
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
        let v6 = pick_free_block(net("fd65::/48"), 122, &taken, u128::MAX - 1).unwrap();
        assert!(net("fd65::/48").contains(v6.network()));
    }

    #[test]
    fn first_free_ip_skips_used_and_moves_to_next_block() {
        let blocks = [net("10.65.0.0/31"), net("10.65.9.0/31")];
        let mut used: HashSet<IpAddr> = HashSet::new();
        assert_eq!(
            first_free_ip(&blocks, |ip| used.contains(&ip)),
            Some("10.65.0.0".parse().unwrap())
        );
        used.insert("10.65.0.0".parse().unwrap());
        used.insert("10.65.0.1".parse().unwrap());
        assert_eq!(
            first_free_ip(&blocks, |ip| used.contains(&ip)),
            Some("10.65.9.0".parse().unwrap())
        );
        used.insert("10.65.9.0".parse().unwrap());
        used.insert("10.65.9.1".parse().unwrap());
        assert_eq!(first_free_ip(&blocks, |ip| used.contains(&ip)), None);
    }
}
