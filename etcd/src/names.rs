//! Names: what a host or pool name may be (it is a key segment and part of namespace names),
//! and the stable hash that derives names from ids (the host-side veth of a container, the weft
//! id of a CNI attachment). The agent and its clients both use them, so they live once, here.

/// Whether `name` may name a host or a pool: 1-63 of `[A-Za-z0-9_.-]`, starting with a letter
/// or digit.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// FNV-1a over the parts (separated by `/`), then a finalizer so that inputs differing in one
/// character differ in every output bit: stable across versions and platforms, unlike std's
/// hasher.
pub fn stable_hash(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, part) in parts.iter().enumerate() {
        let separator = (i > 0).then_some(b'/');
        for byte in separator.into_iter().chain(part.bytes()) {
            hash ^= byte as u64;
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_key_segments() {
        assert!(valid_name("node-1.rack2"));
        for bad in ["", "-a", "a/b", "a b", &"h".repeat(64)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn hashes_are_stable_and_separate_parts() {
        assert_eq!(stable_hash(&["a"]), stable_hash(&["a"]));
        assert_ne!(stable_hash(&["ab", "c"]), stable_hash(&["a", "bc"]));
        assert_ne!(stable_hash(&["web-1"]), stable_hash(&["web-2"]));
        // Pinned: names derived from it are persisted (veth names, CNI ids).
        assert_eq!(stable_hash(&["web-1"]), 0xd37a_3405_8926_976a);
    }
}
