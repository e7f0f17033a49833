//! Ids and names: a container id, an interface name, a host (or pool) name. Each is checked
//! when it is made and is a plain string from then on.

use std::fmt;

use crate::model::Invalid;

/// Longest accepted container id (`[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`).
pub const MAX_CONTAINER_ID: usize = 64;

fn name_chars(text: &str) -> bool {
    text.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn starts_alphanumeric(text: &str) -> bool {
    text.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
}

macro_rules! string_newtype {
    ($name:ident) => {
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = Invalid;

            fn from_str(text: &str) -> Result<Self, Invalid> {
                Self::new(text)
            }
        }
    };
}

/// A container id: 1-64 of `[A-Za-z0-9_.-]`, starting with a letter or digit. It ends up in etcd
/// keys, namespace names and iptables comments, so nothing else may pass.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerId(String);

impl ContainerId {
    pub fn new(id: &str) -> Result<Self, Invalid> {
        if id.is_empty() {
            Err(Invalid::EmptyContainerId)
        } else if id.len() > MAX_CONTAINER_ID {
            Err(Invalid::LongContainerId(id.len()))
        } else if !starts_alphanumeric(id) || !name_chars(id) {
            Err(Invalid::ContainerId(id.to_string()))
        } else {
            Ok(Self(id.to_string()))
        }
    }
}
string_newtype!(ContainerId);

/// An interface name the kernel accepts (`dev_valid_name`), kept to a safe character set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IfName(String);

impl IfName {
    pub fn new(name: &str) -> Result<Self, Invalid> {
        if name.is_empty() || name.len() > 15 {
            Err(Invalid::IfNameLength(name.to_string()))
        } else if matches!(name, "." | ".." | "lo") {
            Err(Invalid::IfNameReserved(name.to_string()))
        } else if !name_chars(name) {
            Err(Invalid::IfName(name.to_string()))
        } else {
            Ok(Self(name.to_string()))
        }
    }

    /// The interface name containers get when a request names none.
    pub fn default_container() -> Self {
        Self("eth0".into())
    }
}
string_newtype!(IfName);

/// A host name (or pool name) as used in etcd keys and namespace names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostName(String);

impl HostName {
    pub fn new(name: &str) -> Result<Self, Invalid> {
        if weft_etcd::names::valid_name(name) {
            Ok(Self(name.to_string()))
        } else {
            Err(Invalid::HostName(name.to_string()))
        }
    }
}
string_newtype!(HostName);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids() {
        for ok in ["a", "web-1", "A_b.c-9", &"x".repeat(64)] {
            assert!(ContainerId::new(ok).is_ok(), "{ok}");
        }
        assert_eq!(ContainerId::new(""), Err(Invalid::EmptyContainerId));
        assert_eq!(
            ContainerId::new(&"x".repeat(65)),
            Err(Invalid::LongContainerId(65))
        );
        for bad in ["-a", ".a", "../x", "a/b", "a b", "a\0b", "é", " a", "a\nb"] {
            assert_eq!(
                ContainerId::new(bad),
                Err(Invalid::ContainerId(bad.to_string())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn ifnames() {
        for ok in ["eth0", "net1", "a.b-c_d", "123456789012345"] {
            assert!(IfName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1234567890123456"] {
            assert_eq!(IfName::new(bad), Err(Invalid::IfNameLength(bad.into())));
        }
        for bad in ["lo", ".", ".."] {
            assert_eq!(IfName::new(bad), Err(Invalid::IfNameReserved(bad.into())));
        }
        for bad in ["a/b", "a b", "eth0:1", "a\0"] {
            assert_eq!(
                IfName::new(bad),
                Err(Invalid::IfName(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn host_names() {
        assert!(HostName::new("node-1.rack2").is_ok());
        for bad in ["", "-a", "a/b", &"h".repeat(64)] {
            assert_eq!(HostName::new(bad), Err(Invalid::HostName(bad.into())));
        }
    }
}
