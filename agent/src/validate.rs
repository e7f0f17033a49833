//! Validation of everything that comes from a client, before anything is allocated or created.

use weft_etcd::records::PortRecord;

/// Longest accepted container id (matches `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`).
pub const MAX_CONTAINER_ID: usize = 64;

pub fn container_id(id: &str) -> Result<(), String> {
    let valid_first = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let valid_rest = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if id.is_empty() {
        Err("container id is empty".into())
    } else if id.len() > MAX_CONTAINER_ID {
        Err(format!(
            "container id is {} characters long; at most {MAX_CONTAINER_ID} are allowed",
            id.len()
        ))
    } else if !valid_first || !valid_rest {
        Err(format!(
            "container id {:?} is invalid: use letters, digits, '_', '.', '-', starting with a \
             letter or digit",
            id
        ))
    } else {
        Ok(())
    }
}

/// A host name as used in etcd keys and namespace names.
pub fn host_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "host name {name:?} is invalid: 1-63 letters, digits, '_', '.', '-', starting with a \
             letter or digit"
        ))
    }
}

/// An interface name the kernel will accept (`dev_valid_name`), kept to a safe character set.
pub fn ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!(
            "interface name {name:?} must be 1 to 15 characters long"
        ));
    }
    if name == "." || name == ".." || name == "lo" {
        return Err(format!("interface name {name:?} is reserved"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(format!(
            "interface name {name:?} is invalid: use letters, digits, '_', '.', '-'"
        ));
    }
    Ok(())
}

/// Checks and normalises published ports: protocol `tcp`/`udp` (empty = tcp), ports 1-65535,
/// no host port twice per protocol.
pub fn ports(requested: &[(String, u32, u32)]) -> Result<Vec<PortRecord>, String> {
    let mut out: Vec<PortRecord> = Vec::with_capacity(requested.len());
    for (protocol, host_port, container_port) in requested {
        let protocol = match protocol.to_ascii_lowercase().as_str() {
            "" | "tcp" => "tcp",
            "udp" => "udp",
            _ => return Err(format!("unknown protocol {protocol:?}: use tcp or udp")),
        };
        let port = |value: u32, what: &str| -> Result<u16, String> {
            u16::try_from(value)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{what} {value} is out of range 1-65535"))
        };
        let record = PortRecord {
            protocol: protocol.to_string(),
            host_port: port(*host_port, "host port")?,
            container_port: port(*container_port, "container port")?,
        };
        if out
            .iter()
            .any(|p| p.protocol == record.protocol && p.host_port == record.host_port)
        {
            return Err(format!(
                "host port {}/{} is requested twice",
                record.protocol, record.host_port
            ));
        }
        out.push(record);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids() {
        for ok in ["a", "web-1", "A_b.c-9", &"x".repeat(64)] {
            assert!(container_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            ".a",
            "../x",
            "a/b",
            "a b",
            "a\0b",
            "é",
            " a",
            &"x".repeat(65),
        ] {
            assert!(container_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ifnames() {
        for ok in ["eth0", "net1", "a.b-c_d", "123456789012345"] {
            assert!(ifname(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "lo",
            ".",
            "..",
            "a/b",
            "a b",
            "1234567890123456",
            "eth0:1",
        ] {
            assert!(ifname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn port_rules() {
        let ok = ports(&[("".into(), 8080, 80), ("UDP".into(), 8080, 53)]).unwrap();
        assert_eq!(ok[0].protocol, "tcp");
        assert_eq!(ok[1].protocol, "udp");
        assert!(ports(&[("tcp".into(), 0, 80)]).is_err());
        assert!(ports(&[("tcp".into(), 65536, 80)]).is_err());
        assert!(ports(&[("tcp".into(), 80, 0)]).is_err());
        assert!(ports(&[("sctp".into(), 80, 80)]).is_err());
        assert!(ports(&[("tcp".into(), 80, 80), ("".into(), 80, 81)]).is_err());
    }
}
