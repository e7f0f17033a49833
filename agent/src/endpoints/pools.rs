//! Which pools an attach allocates from: those it names, in its order, or this host's default
//! pools (those marked default; else the first pool of each family). Disabled pools give no new
//! address. Pure.

use std::net::IpAddr;

use super::error::EndpointError;
use crate::config::PoolSettings;

/// The pools to allocate from, in order of preference.
pub fn choose<'a>(
    pools: &'a [PoolSettings],
    asked: &[String],
) -> Result<Vec<&'a PoolSettings>, EndpointError> {
    if !asked.is_empty() {
        return asked
            .iter()
            .map(|name| {
                let pool = pools
                    .iter()
                    .find(|p| &p.name == name)
                    .ok_or_else(|| EndpointError::UnknownPool(name.clone()))?;
                match pool.disabled {
                    true => Err(EndpointError::PoolDisabled(name.clone())),
                    false => Ok(pool),
                }
            })
            .collect();
    }
    let enabled = pools.iter().filter(|p| !p.disabled);
    let marked: Vec<&PoolSettings> = enabled.clone().filter(|p| p.default).collect();
    if !marked.is_empty() {
        return Ok(marked);
    }
    let mut chosen: Vec<&PoolSettings> = vec![];
    for pool in enabled {
        if !chosen
            .iter()
            .any(|c| c.cidr.is_ipv4() == pool.cidr.is_ipv4())
        {
            chosen.push(pool);
        }
    }
    match chosen.is_empty() {
        true => Err(EndpointError::NoPool),
        false => Ok(chosen),
    }
}

/// The pool a requested address is taken from: among the named pools when the attach names
/// some, else among all of this host's; it must be enabled.
pub fn for_address<'a>(
    pools: &'a [PoolSettings],
    asked: &[String],
    ip: IpAddr,
) -> Result<&'a PoolSettings, EndpointError> {
    let pool = pools
        .iter()
        .filter(|p| asked.is_empty() || asked.contains(&p.name))
        .find(|p| p.cidr.contains(ip));
    match pool {
        None if asked.is_empty() => Err(EndpointError::OutsidePools { ip }),
        None => Err(EndpointError::OutsideNamedPools {
            ip,
            pools: asked.to_vec(),
        }),
        Some(p) if p.disabled => Err(EndpointError::PoolDisabled(p.name.clone())),
        Some(p) => Ok(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str, cidr: &str, default: bool, disabled: bool) -> PoolSettings {
        PoolSettings {
            name: name.into(),
            cidr: cidr.parse().unwrap(),
            block_size: 26,
            nat_outgoing: true,
            encapsulation: Default::default(),
            disabled,
            default,
        }
    }

    fn names(chosen: Result<Vec<&PoolSettings>, EndpointError>) -> Vec<String> {
        chosen.unwrap().iter().map(|p| p.name.clone()).collect()
    }

    #[test]
    fn an_attach_takes_the_pools_it_names_or_the_defaults() {
        let pools = [
            pool("a", "10.65.0.0/16", false, false),
            pool("b", "10.66.0.0/16", false, false),
            pool("old", "10.67.0.0/16", false, true),
        ];
        let ask = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(names(choose(&pools, &[])), ["a"], "first of the family");
        assert_eq!(names(choose(&pools, &ask(&["b", "a"]))), ["b", "a"]);
        assert!(matches!(
            choose(&pools, &ask(&["c"])),
            Err(EndpointError::UnknownPool(n)) if n == "c"
        ));
        assert!(matches!(
            choose(&pools, &ask(&["old"])),
            Err(EndpointError::PoolDisabled(n)) if n == "old"
        ));
        let marked = [
            pool("a", "10.65.0.0/16", false, false),
            pool("b", "10.66.0.0/16", true, false),
        ];
        assert_eq!(names(choose(&marked, &[])), ["b"], "marked default");
        let first_disabled = [
            pool("a", "10.65.0.0/16", false, true),
            pool("b", "10.66.0.0/16", false, false),
        ];
        assert_eq!(names(choose(&first_disabled, &[])), ["b"]);
        let none = [pool("a", "10.65.0.0/16", false, true)];
        assert!(matches!(choose(&none, &[]), Err(EndpointError::NoPool)));
    }

    #[test]
    fn a_requested_address_comes_from_its_enabled_pool() {
        let pools = [
            pool("a", "10.65.0.0/16", false, false),
            pool("old", "10.67.0.0/16", false, true),
        ];
        let ip = |s: &str| s.parse().unwrap();
        assert_eq!(for_address(&pools, &[], ip("10.65.1.1")).unwrap().name, "a");
        assert!(matches!(
            for_address(&pools, &[], ip("10.67.1.1")),
            Err(EndpointError::PoolDisabled(_))
        ));
        assert!(matches!(
            for_address(&pools, &[], ip("10.68.1.1")),
            Err(EndpointError::OutsidePools { .. })
        ));
        assert!(matches!(
            for_address(&pools, &["old".into()], ip("10.65.1.1")),
            Err(EndpointError::OutsideNamedPools { .. })
        ));
    }
}
