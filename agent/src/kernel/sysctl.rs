//! Sysctls under /proc/sys/net. They follow the calling thread's network namespace, and the
//! agent's threads all live in the host namespace.

use std::io;

pub const PROXY_ARP: &str = "/proc/sys/net/ipv4/conf/{}/proxy_arp";
pub const PROXY_DELAY: &str = "/proc/sys/net/ipv4/neigh/{}/proxy_delay";
pub const FORWARDING: &str = "/proc/sys/net/ipv4/conf/{}/forwarding";
pub const RP_FILTER: &str = "/proc/sys/net/ipv4/conf/{}/rp_filter";
pub const ACCEPT_RA: &str = "/proc/sys/net/ipv6/conf/{}/accept_ra";
pub const PROXY_NDP: &str = "/proc/sys/net/ipv6/conf/{}/proxy_ndp";
pub const FORWARDING_V6: &str = "/proc/sys/net/ipv6/conf/{}/forwarding";
pub const ACCEPT_DAD: &str = "/proc/sys/net/ipv6/conf/{}/accept_dad";
pub const DISABLE_IPV6: &str = "/proc/sys/net/ipv6/conf/{}/disable_ipv6";

/// Per-veth settings of the host end, as (path template, value); `{}` is the interface name.
/// A container may never configure its host's end by router advertisements, whatever families
/// the host routes.
pub const HOST_VETH: &[(&str, &str)] = &[
    (PROXY_ARP, "1"),
    (PROXY_DELAY, "0"),
    (FORWARDING, "1"),
    (RP_FILTER, "1"),
    (ACCEPT_RA, "0"),
];

/// Per-veth settings of a host with an IPv6 pool (no rp_filter there: anti-spoofing is a
/// rule). The host end answers neighbour solicitations for the addresses it routes, forwards,
/// and takes its link-local address (the containers' gateway) without duplicate address
/// detection: a tentative address cannot source the solicitations that find a container, so
/// DAD would hold up its traffic. IPv6 is on (a veth can have been left with it off). Not
/// written on IPv4-only hosts: nothing there needs them, and the kernel takes the routing lock
/// for `forwarding` and `proxy_ndp` by retrying the write until it gets it, which under
/// concurrent attaches burns a core.
pub const HOST_VETH_V6: &[(&str, &str)] = &[
    (DISABLE_IPV6, "0"),
    (PROXY_NDP, "1"),
    (FORWARDING_V6, "1"),
    (ACCEPT_DAD, "0"),
];

/// Per-veth settings of a host without an IPv6 pool: no IPv6 on the host end at all. Written
/// before the container end comes up, so the host end never configures IPv6: with IPv6 on,
/// the kernel gives every veth a link-local address and its routes, and walks the host's whole
/// IPv6 routing table each time a veth's carrier comes or goes — per attach and per detach,
/// a cost growing with the number of endpoints for a family the host does not route. (Its
/// write takes the routing lock the same retrying way, once per attach; measured, concurrent
/// attach throughput rose with it: the walks it saves held that lock far longer.)
pub const HOST_VETH_V4_ONLY: &[(&str, &str)] = &[(DISABLE_IPV6, "1")];

/// The per-veth settings of a host, with or without IPv6.
pub fn host_veth(ipv6: bool) -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    let family: &'static [(&str, &str)] = if ipv6 {
        HOST_VETH_V6
    } else {
        HOST_VETH_V4_ONLY
    };
    HOST_VETH.iter().chain(family)
}

/// Values of per-veth settings already known from a link dump (its device configuration),
/// by path template: those need no file read.
pub type Known = Vec<(&'static str, i32)>;

/// Host-wide settings.
pub const HOST: &[(&str, &str)] = &[("/proc/sys/net/ipv4/ip_forward", "1")];

/// Host-wide settings of a host with an IPv6 pool.
pub const HOST_V6: &[(&str, &str)] = &[("/proc/sys/net/ipv6/conf/all/forwarding", "1")];

pub fn read(path: &str) -> io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

/// Writes a sysctl unless it already has the value. Returns whether it changed.
pub fn ensure(path: &str, value: &str) -> io::Result<bool> {
    if read(path)? == value {
        return Ok(false);
    }
    std::fs::write(path, value)?;
    Ok(true)
}

fn optional(result: io::Result<bool>) -> io::Result<bool> {
    // IPv6 may be disabled on the host; its knobs are then absent.
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        other => other,
    }
}

/// Settings whose every write takes the kernel's routing lock, whether or not the value changes
/// (`addrconf_fixup_forwarding`, `addrconf_disable_ipv6`, retried until the lock is free): read
/// first, and written only when they differ.
const LOCKING_WRITES: [&str; 2] = [FORWARDING_V6, DISABLE_IPV6];

/// Writes the per-veth settings (`host_veth`) of a veth made just now. A new device starts from
/// the `default` values, unknown here; the kernel takes a write of the value a setting already
/// has as a no-op, so most are written without a read first (one file operation instead of
/// two, on every attach). `LOCKING_WRITES` are the exception: for them a needless write costs
/// the routing lock.
pub fn set_new_host_veth(ifname: &str, ipv6: bool) -> io::Result<()> {
    for (template, value) in host_veth(ipv6) {
        let path = template.replace("{}", ifname);
        let result = match LOCKING_WRITES.contains(template) {
            true => ensure(&path, value),
            false => std::fs::write(&path, value).map(|()| true),
        };
        if path.contains("/ipv6/") {
            optional(result)?;
        } else {
            result.map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
        }
    }
    Ok(())
}

/// Applies the per-veth settings (`host_veth`) to one interface. Returns how many values had to
/// change.
pub fn configure_host_veth(ifname: &str, ipv6: bool) -> io::Result<usize> {
    configure_host_veth_knowing(ifname, ipv6, &[])
}

/// As `configure_host_veth`, reading only the settings `known` does not show with their value
/// already. Returns how many values had to change.
pub fn configure_host_veth_knowing(
    ifname: &str,
    ipv6: bool,
    known: &[(&str, i32)],
) -> io::Result<usize> {
    let mut changed = 0;
    for (template, value) in host_veth(ipv6) {
        let right = known
            .iter()
            .any(|(t, v)| t == template && v.to_string() == *value);
        if right {
            continue;
        }
        let path = template.replace("{}", ifname);
        let result = ensure(&path, value);
        let result = if path.contains("/ipv6/") {
            optional(result)
        } else {
            result.map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))
        };
        changed += result? as usize;
    }
    Ok(changed)
}

/// The per-veth settings of one interface that differ from what they should be, described.
/// IPv6 knobs that do not exist (IPv6 disabled) are not a problem.
pub fn check_host_veth(ifname: &str, ipv6: bool) -> Vec<String> {
    let mut problems = vec![];
    for (template, value) in host_veth(ipv6) {
        let path = template.replace("{}", ifname);
        match read(&path) {
            Ok(actual) if actual == *value => {}
            Ok(actual) => problems.push(format!("{path} is {actual}, not {value}")),
            Err(e) if e.kind() == io::ErrorKind::NotFound && path.contains("/ipv6/") => {}
            Err(e) => problems.push(format!("{path}: {e}")),
        }
    }
    problems
}

/// Applies `HOST` (and `HOST_V6` with `ipv6`). Returns how many values had to change.
pub fn configure_host(ipv6: bool) -> io::Result<usize> {
    let mut changed = 0;
    let v6: &[(&str, &str)] = if ipv6 { HOST_V6 } else { &[] };
    for (path, value) in HOST.iter().chain(v6) {
        changed += ensure(path, value)
            .map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?
            as usize;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_only_host_turns_ipv6_off_on_its_veths_and_a_dual_stack_one_configures_it() {
        let v4: Vec<_> = host_veth(false).copied().collect();
        assert!(v4.contains(&(DISABLE_IPV6, "1")));
        assert!(v4.contains(&(ACCEPT_RA, "0")));
        for knob in [PROXY_NDP, FORWARDING_V6, ACCEPT_DAD] {
            assert!(!v4.iter().any(|(t, _)| *t == knob), "{knob}");
        }
        let dual: Vec<_> = host_veth(true).copied().collect();
        assert!(dual.contains(&(DISABLE_IPV6, "0")));
        assert!(dual.contains(&(PROXY_NDP, "1")) && dual.contains(&(ACCEPT_DAD, "0")));
    }

    #[test]
    fn known_right_values_are_not_read_and_the_rest_is() {
        // An interface that does not exist: every setting that must be read fails to open.
        let name = "weft-no-such-link";
        let all_right: Vec<(&str, i32)> = host_veth(true)
            .filter(|(t, _)| !t.contains("proxy_delay"))
            .map(|(t, v)| (*t, v.parse().unwrap()))
            .collect();
        let err = configure_host_veth_knowing(name, true, &all_right).unwrap_err();
        assert!(
            err.to_string()
                .contains("neigh/weft-no-such-link/proxy_delay"),
            "only proxy_delay is read: {err}"
        );
        let mut wrong = all_right.clone();
        wrong[0].1 = 0;
        let err = configure_host_veth_knowing(name, true, &wrong).unwrap_err();
        assert!(
            err.to_string().contains("conf/weft-no-such-link/proxy_arp"),
            "{err}"
        );
    }
}
