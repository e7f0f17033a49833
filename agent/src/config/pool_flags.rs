//! The pools given by `--pool` (repeated or comma-separated; a string or an array in the file),
//! `--pool-name`, `--block-size` and `--block-size-v6`: at most one per family, the IPv6 one
//! named after the IPv4 one with `-v6` appended. Either family alone is a valid host.

use ipnetwork::IpNetwork;
use serde::Deserialize;
use weft_etcd::records::Encapsulation;

use super::pools::{
    check_block_size, check_name, cidr, PoolSettings, DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE_V6,
};
use super::{invalid, ConfigError, FileConfig, Flags};

/// `pool` in the file: one CIDR (or a comma-separated list), or an array of them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PoolCidrs {
    One(String),
    Many(Vec<String>),
}

impl PoolCidrs {
    fn texts(&self) -> Vec<String> {
        let all = match self {
            PoolCidrs::One(text) => vec![text.clone()],
            PoolCidrs::Many(list) => list.clone(),
        };
        all.iter()
            .flat_map(|t| t.split(','))
            .map(|t| t.trim().to_string())
            .collect()
    }
}

const DEFAULT_POOL: &str = "10.65.0.0/16";
const DEFAULT_NAME: &str = "default";

/// Whether any of the flag settings is given (they exclude a `[[pools]]` list).
pub(super) fn given(flags: &Flags, file: &FileConfig) -> bool {
    !flags.pool.is_empty()
        || file.pool.is_some()
        || flags.pool_name.is_some()
        || file.pool_name.is_some()
        || flags.block_size.is_some()
        || file.block_size.is_some()
        || flags.block_size_v6.is_some()
        || file.block_size_v6.is_some()
}

/// The pools of the flag settings, IPv4 first.
pub(super) fn flag_pools(
    flags: &Flags,
    file: &FileConfig,
    nat_outgoing: bool,
    encapsulation: Encapsulation,
) -> Result<Vec<PoolSettings>, ConfigError> {
    let texts = match (&flags.pool[..], &file.pool) {
        ([], Some(list)) => list.texts(),
        ([], None) => vec![DEFAULT_POOL.to_string()],
        (given, _) => given.iter().map(|t| t.trim().to_string()).collect(),
    };
    let (v4, v6) = one_per_family(&texts)?;
    let name = flags
        .pool_name
        .clone()
        .or(file.pool_name.clone())
        .unwrap_or_else(|| DEFAULT_NAME.into());
    check_name("pool-name", &name)?;
    let block_size = flags.block_size.or(file.block_size);
    let block_size_v6 = flags.block_size_v6.or(file.block_size_v6);
    let pool = |name: String, cidr: IpNetwork, block_size: u8| PoolSettings {
        name,
        cidr,
        block_size,
        nat_outgoing,
        encapsulation,
        disabled: false,
        default: true,
    };
    let mut pools = vec![];
    if let Some(cidr) = v4 {
        let size = block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
        check_block_size("block-size", cidr, size)?;
        pools.push(pool(name.clone(), cidr, size));
    }
    if let Some(cidr) = v6 {
        let size = block_size_v6.unwrap_or(DEFAULT_BLOCK_SIZE_V6);
        check_block_size("block-size-v6", cidr, size)?;
        let name = format!("{name}-v6");
        check_name("pool-name", &name)?;
        pools.push(pool(name, cidr, size));
    }
    // A block size of a family without a pool is a default from a shared file: unused.
    Ok(pools)
}

/// The CIDRs parsed, at most one per family (and at least one pool in all).
fn one_per_family(texts: &[String]) -> Result<(Option<IpNetwork>, Option<IpNetwork>), ConfigError> {
    let (mut v4, mut v6): (Option<IpNetwork>, Option<IpNetwork>) = (None, None);
    if texts.iter().all(|t| t.is_empty()) {
        return Err(invalid("pool", "no pool given"));
    }
    for text in texts {
        let cidr = cidr("pool", text)?;
        let (slot, family) = match cidr.is_ipv4() {
            true => (&mut v4, "IPv4"),
            false => (&mut v6, "IPv6"),
        };
        if let Some(first) = slot {
            return Err(invalid(
                "pool",
                format!(
                    "two {family} pools given ({first} and {cidr}); give at most one of each \
                     family here, or several in a [[pools]] list"
                ),
            ));
        }
        *slot = Some(cidr);
    }
    Ok((v4, v6))
}

#[cfg(test)]
mod tests {
    use crate::config::resolve_for_test as resolve;
    use crate::config::Config;

    fn summary(config: &Config) -> Vec<(String, String, u8)> {
        config
            .pools
            .iter()
            .map(|p| (p.name.clone(), p.cidr.to_string(), p.block_size))
            .collect()
    }

    fn pools(args: &[&str], file: &str) -> Vec<(String, String, u8)> {
        summary(&resolve(args, file).unwrap())
    }

    fn p(name: &str, cidr: &str, size: u8) -> (String, String, u8) {
        (name.into(), cidr.into(), size)
    }

    #[test]
    fn a_pool_of_each_family_by_flags_file_or_environment_list() {
        let both = [
            p("default", "10.65.0.0/16", 26),
            p("default-v6", "fd65::/48", 122),
        ];
        assert_eq!(
            pools(&["--pool", "10.65.0.0/16", "--pool", "fd65::/48"], ""),
            both
        );
        assert_eq!(pools(&["--pool", "fd65::/48,10.65.0.0/16"], ""), both);
        assert_eq!(pools(&[], "pool = [\"10.65.0.0/16\", \"fd65::/48\"]"), both);
        assert_eq!(pools(&[], "pool = \"10.65.0.0/16, fd65::/48\""), both);
        assert_eq!(
            pools(
                &["--pool", "10.70.0.0/16,fd70::/64", "--pool-name", "web"],
                "block-size = 28\nblock-size-v6 = 120"
            ),
            [p("web", "10.70.0.0/16", 28), p("web-v6", "fd70::/64", 120)]
        );
        assert_eq!(pools(&[], ""), [p("default", "10.65.0.0/16", 26)]);
        assert_eq!(
            pools(&["--pool", "fd65::/48", "--block-size-v6", "128"], ""),
            [p("default-v6", "fd65::/48", 128)],
            "an IPv6-only host"
        );
        let config = resolve(&["--pool", "10.65.0.0/16,fd65::/48"], "").unwrap();
        assert!(config.pools.iter().all(|p| p.default && p.nat_outgoing));
        assert_eq!(
            config.pool_of("fd65::9".parse().unwrap()).unwrap().name,
            "default-v6"
        );
    }

    #[test]
    fn a_listed_ipv6_pool_takes_122_blocks_unless_told() {
        let file = "[[pools]]\nname = \"v6\"\ncidr = \"fd66::/56\"\n\
                    [[pools]]\nname = \"v6b\"\ncidr = \"fd67::/64\"\nblock-size = 116\n";
        assert_eq!(
            pools(&[], file),
            [p("v6", "fd66::/56", 122), p("v6b", "fd67::/64", 116)]
        );
    }

    #[test]
    fn hostile_pool_settings_are_refused_naming_the_setting_and_the_fault() {
        let refused = |args: &[&str], file: &str, words: &[&str]| {
            let err = resolve(args, file).unwrap_err().to_string();
            for word in words {
                assert!(err.contains(word), "{err:?} lacks {word:?}");
            }
        };
        let v4v6 = ["--pool", "10.65.0.0/16,fd65::/48"];
        refused(
            &["--pool", "10.65.0.0/16", "--pool", "10.66.0.0/16"],
            "",
            &["pool:", "two IPv4 pools", "10.65.0.0/16", "10.66.0.0/16"],
        );
        refused(
            &["--pool", "fd65::/48,fd66::/48"],
            "",
            &["pool:", "two IPv6 pools"],
        );
        refused(
            &[&v4v6[..], &["--block-size-v6", "115"]].concat(),
            "",
            &["block-size-v6:", "/115", "116 to 128"],
        );
        refused(
            &[&v4v6[..], &["--block-size-v6", "129"]].concat(),
            "",
            &["block-size-v6:", "/129"],
        );
        refused(
            &["--pool", "fd65::ff80/124"],
            "",
            &[
                "block-size-v6:",
                "/122 blocks do not fit in pool fd65::ff80/124",
            ],
        );
        refused(
            &["--pool", "fd65::1/48"],
            "",
            &["pool:", "host bits", "fd65::/48"],
        );
        refused(
            &["--pool", "fd65::"],
            "",
            &["pool:", "not an IPv4 or IPv6 CIDR"],
        );
        refused(&["--pool", ","], "", &["pool:", "no pool given"]);
        refused(
            &["--pool", "10.65.0.0/16", "--block-size", "33"],
            "",
            &["block-size:"],
        );
        let list = "[[pools]]\nname = \"a\"\ncidr = \"fd65::/48\"\n";
        refused(&["--block-size-v6", "120"], list, &["pools:", "not both"]);
        refused(&["--pool", "fd65::/48"], list, &["pools:", "not both"]);
    }
}
