//! The pools an agent allocates from: at most one per family from `--pool`, `--pool-name`,
//! `--block-size` and `--block-size-v6` (the flag settings, `pool_flags`), or a `[[pools]]` list
//! in the file. Names unique, CIDRs not overlapping, one encapsulation for all of them (the host
//! has one tunnel and one MTU).

use ipnetwork::IpNetwork;
use serde::Deserialize;
use weft_etcd::records::{Encapsulation, PoolRecord};

use super::pool_flags::{flag_pools, given};
use super::{invalid, ConfigError, FileConfig, Flags};
use crate::model::HostName;

/// One pool as this agent uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    pub name: String,
    pub cidr: IpNetwork,
    pub block_size: u8,
    pub nat_outgoing: bool,
    pub encapsulation: Encapsulation,
    /// No new blocks or addresses from it on this host; what it gave keeps working.
    pub disabled: bool,
    /// Chosen for attaches that name no pool.
    pub default: bool,
}

impl PoolSettings {
    /// The record every agent using the pool must agree on.
    pub fn record(&self) -> PoolRecord {
        PoolRecord {
            cidr: self.cidr,
            block_size: self.block_size,
            nat_outgoing: self.nat_outgoing,
            encapsulation: self.encapsulation,
        }
    }
}

/// One `[[pools]]` entry of the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FilePool {
    pub name: String,
    pub cidr: String,
    pub block_size: Option<u8>,
    pub nat_outgoing: Option<bool>,
    pub encapsulation: Option<String>,
    #[serde(default)]
    pub disabled: bool,
    #[serde(default)]
    pub default: bool,
}

pub(super) const DEFAULT_BLOCK_SIZE: u8 = 26;
pub(super) const DEFAULT_BLOCK_SIZE_V6: u8 = 122;
/// IPv6 block sizes allowed: a /116 holds 4096 addresses, a /128 one.
const BLOCK_SIZES_V6: std::ops::RangeInclusive<u8> = 116..=128;

/// The default block size of a pool of `cidr`'s family.
pub(super) fn default_block_size(cidr: IpNetwork) -> u8 {
    match cidr.is_ipv4() {
        true => DEFAULT_BLOCK_SIZE,
        false => DEFAULT_BLOCK_SIZE_V6,
    }
}

pub fn pool_settings(flags: &Flags, file: &FileConfig) -> Result<Vec<PoolSettings>, ConfigError> {
    let encapsulation = match flags.encapsulation.clone().or(file.encapsulation.clone()) {
        Some(text) => text
            .parse()
            .map_err(|e: String| invalid("encapsulation", e))?,
        None => Encapsulation::default(),
    };
    let nat_outgoing = flags.nat_outgoing.or(file.nat_outgoing).unwrap_or(true);
    let pools = match file.pools.as_deref() {
        None | Some([]) => flag_pools(flags, file, nat_outgoing, encapsulation)?,
        Some(list) => {
            if given(flags, file) {
                return Err(invalid(
                    "pools",
                    "give either a [[pools]] list or pool, pool-name, block-size and \
                     block-size-v6, not both",
                ));
            }
            list.iter()
                .map(|p| listed_pool(p, nat_outgoing, encapsulation))
                .collect::<Result<Vec<_>, _>>()?
        }
    };
    check_together(&pools)?;
    Ok(pools)
}

fn listed_pool(
    pool: &FilePool,
    nat_outgoing: bool,
    encapsulation: Encapsulation,
) -> Result<PoolSettings, ConfigError> {
    let fail = |message: String| invalid("pools", format!("pool {:?}: {message}", pool.name));
    check_name("pools", &pool.name)?;
    let cidr = cidr("pools", &pool.cidr).map_err(|e| fail(reason(e)))?;
    let block_size = pool.block_size.unwrap_or(default_block_size(cidr));
    check_block_size("pools", cidr, block_size).map_err(|e| fail(reason(e)))?;
    let encapsulation = match &pool.encapsulation {
        Some(text) => text.parse().map_err(fail)?,
        None => encapsulation,
    };
    Ok(PoolSettings {
        name: pool.name.clone(),
        cidr,
        block_size,
        nat_outgoing: pool.nat_outgoing.unwrap_or(nat_outgoing),
        encapsulation,
        disabled: pool.disabled,
        default: pool.default,
    })
}

/// The message of a refusal, without its setting (to put it in another one's).
fn reason(err: ConfigError) -> String {
    match err {
        ConfigError::Invalid { message, .. } => message,
        other => other.to_string(),
    }
}

pub(super) fn check_name(setting: &'static str, name: &str) -> Result<(), ConfigError> {
    HostName::new(name)
        .map(|_| ())
        .map_err(|_| invalid(setting, format!("{name:?} is not a valid pool name")))
}

/// A pool's CIDR, of either family, without host bits.
pub(super) fn cidr(setting: &'static str, text: &str) -> Result<IpNetwork, ConfigError> {
    let text = text.trim();
    let cidr: IpNetwork = text
        .parse()
        .ok()
        .filter(|_| text.contains('/'))
        .ok_or_else(|| invalid(setting, format!("{text:?} is not an IPv4 or IPv6 CIDR")))?;
    if cidr.network() != cidr.ip() {
        return Err(invalid(
            setting,
            format!(
                "{cidr} has host bits set; did you mean {}/{}?",
                cidr.network(),
                cidr.prefix()
            ),
        ));
    }
    Ok(cidr)
}

/// A block size that fits the pool (and, for IPv6, lies in 116–128).
pub(super) fn check_block_size(
    setting: &'static str,
    cidr: IpNetwork,
    block_size: u8,
) -> Result<(), ConfigError> {
    if cidr.is_ipv6() && !BLOCK_SIZES_V6.contains(&block_size) {
        return Err(invalid(
            setting,
            format!("/{block_size} is not an IPv6 block size (116 to 128)"),
        ));
    }
    if block_size < cidr.prefix() || (cidr.is_ipv4() && block_size > 32) {
        return Err(invalid(
            setting,
            format!("/{block_size} blocks do not fit in pool {cidr}"),
        ));
    }
    Ok(())
}

/// Names unique, CIDRs apart, one encapsulation.
fn check_together(pools: &[PoolSettings]) -> Result<(), ConfigError> {
    for (i, a) in pools.iter().enumerate() {
        for b in &pools[i + 1..] {
            if a.name == b.name {
                return Err(invalid(
                    "pools",
                    format!("pool {:?} is given twice", a.name),
                ));
            }
            if a.cidr.contains(b.cidr.network()) || b.cidr.contains(a.cidr.network()) {
                return Err(invalid(
                    "pools",
                    format!(
                        "pools {:?} ({}) and {:?} ({}) overlap",
                        a.name, a.cidr, b.name, b.cidr
                    ),
                ));
            }
            if a.encapsulation != b.encapsulation {
                return Err(invalid(
                    "pools",
                    format!(
                        "pools {:?} ({}) and {:?} ({}) differ in encapsulation; the pools of one \
                         host share its tunnel and MTU, so they take one encapsulation",
                        a.name, a.encapsulation, b.name, b.encapsulation
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::resolve_for_test as resolve;

    const TWO: &str = r#"
        nat-outgoing = false
        [[pools]]
        name = "web"
        cidr = "10.65.0.0/16"
        [[pools]]
        name = "db"
        cidr = "10.66.0.0/24"
        block-size = 28
        nat-outgoing = true
        disabled = true
        default = true
    "#;

    #[test]
    fn a_pools_list_gives_each_pool_its_settings() {
        let config = resolve(&[], TWO).unwrap();
        let summary: Vec<(&str, String, u8, bool, bool, bool)> = config
            .pools
            .iter()
            .map(|p| {
                let cidr = p.cidr.to_string();
                (
                    p.name.as_str(),
                    cidr,
                    p.block_size,
                    p.nat_outgoing,
                    p.disabled,
                    p.default,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("web", "10.65.0.0/16".into(), 26, false, false, false),
                ("db", "10.66.0.0/24".into(), 28, true, true, true),
            ]
        );
        assert_eq!(
            config.pool_of("10.66.0.9".parse().unwrap()).unwrap().name,
            "db"
        );
    }

    #[test]
    fn pools_that_cannot_live_together_are_refused_naming_them() {
        let refused = |args: &[&str], file: &str, words: &[&str]| {
            let err = resolve(args, file).unwrap_err().to_string();
            for word in words {
                assert!(err.contains(word), "{err:?} lacks {word:?}");
            }
        };
        let pool = |name: &str, cidr: &str, extra: &str| {
            format!("[[pools]]\nname = \"{name}\"\ncidr = \"{cidr}\"\n{extra}\n")
        };
        let overlap = pool("a", "10.65.0.0/16", "") + &pool("b", "10.65.128.0/17", "");
        refused(&[], &overlap, &["pools:", "\"a\"", "\"b\"", "overlap"]);
        let twice = pool("a", "10.65.0.0/16", "") + &pool("a", "10.66.0.0/16", "");
        refused(&[], &twice, &["pools:", "given twice"]);
        let modes =
            pool("a", "10.65.0.0/16", "") + &pool("b", "10.66.0.0/16", "encapsulation = \"none\"");
        refused(&[], &modes, &["pools:", "encapsulation"]);
        let small = pool("a", "10.65.0.0/24", "block-size = 20");
        refused(&[], &small, &["pools:", "\"a\"", "/20 blocks do not fit"]);
        let v6 = pool("a", "fd65::/48", "block-size = 112");
        refused(&[], &v6, &["pools:", "\"a\"", "/112", "116 to 128"]);
        let small_v6 = pool("a", "fd65::/124", "");
        refused(&[], &small_v6, &["pools:", "/122 blocks do not fit"]);
        let overlap_v6 = pool("a", "fd65::/48", "") + &pool("b", "fd65:0:0:1::/64", "");
        refused(&[], &overlap_v6, &["pools:", "overlap"]);
        let named = pool("a b", "10.65.0.0/16", "");
        refused(&[], &named, &["pools:", "not a valid pool name"]);
        let list = pool("a", "10.65.0.0/16", "");
        refused(&["--pool", "10.70.0.0/16"], &list, &["pools:", "not both"]);
        refused(&["--block-size", "28"], &list, &["pools:", "not both"]);
    }
}
