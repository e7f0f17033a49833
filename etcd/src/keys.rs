//! The etcd key layout under the configurable prefix (default `/weft/v1`).

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

/// Builds and parses every key weft stores. Nothing else formats a key.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn pool(&self, name: &str) -> String {
        format!("{}/pools/{name}", self.prefix)
    }

    pub fn pools(&self) -> String {
        format!("{}/pools/", self.prefix)
    }

    pub fn host(&self, host: &str) -> String {
        format!("{}/hosts/{host}", self.prefix)
    }

    pub fn hosts(&self) -> String {
        format!("{}/hosts/", self.prefix)
    }

    pub fn alive(&self, host: &str) -> String {
        format!("{}/alive/{host}", self.prefix)
    }

    pub fn alives(&self) -> String {
        format!("{}/alive/", self.prefix)
    }

    pub fn block(&self, pool: &str, block: Ipv4Network) -> String {
        format!(
            "{}/blocks/{pool}/{}-{}",
            self.prefix,
            block.network(),
            block.prefix()
        )
    }

    /// All blocks of all pools.
    pub fn blocks(&self) -> String {
        format!("{}/blocks/", self.prefix)
    }

    pub fn pool_blocks(&self, pool: &str) -> String {
        format!("{}/blocks/{pool}/", self.prefix)
    }

    pub fn ip(&self, ip: Ipv4Addr) -> String {
        format!("{}/ips/{ip}", self.prefix)
    }

    pub fn ips(&self) -> String {
        format!("{}/ips/", self.prefix)
    }

    pub fn endpoint(&self, host: &str, container_id: &str) -> String {
        format!("{}/endpoints/{host}/{container_id}", self.prefix)
    }

    pub fn host_endpoints(&self, host: &str) -> String {
        format!("{}/endpoints/{host}/", self.prefix)
    }

    pub fn port(&self, host: &str, protocol: &str, port: u16) -> String {
        format!("{}/ports/{host}/{protocol}/{port}", self.prefix)
    }

    pub fn host_ports(&self, host: &str) -> String {
        format!("{}/ports/{host}/", self.prefix)
    }

    /// Parses `<prefix>/blocks/<pool>/<a.b.c.d-len>` into the pool name and the block.
    pub fn parse_block(&self, key: &str) -> Option<(String, Ipv4Network)> {
        let rest = key.strip_prefix(&self.blocks())?;
        let (pool, block) = rest.split_once('/')?;
        let (addr, len) = block.split_once('-')?;
        let net = Ipv4Network::new(addr.parse().ok()?, len.parse().ok()?).ok()?;
        (net.network() == net.ip()).then(|| (pool.to_string(), net))
    }

    /// The last path segment of a key below `collection` (e.g. the host name of `hosts/<host>`).
    pub fn name_in<'k>(&self, collection: &str, key: &'k str) -> Option<&'k str> {
        let name = key.strip_prefix(collection)?;
        (!name.is_empty() && !name.contains('/')).then_some(name)
    }
}

/// The end of the key range covering every key that starts with `prefix` (etcd's prefix range).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_keys_round_trip() {
        let keys = Keys::new("/weft/v1/");
        let block: Ipv4Network = "10.65.3.64/26".parse().unwrap();
        let key = keys.block("default", block);
        assert_eq!(key, "/weft/v1/blocks/default/10.65.3.64-26");
        assert_eq!(keys.parse_block(&key), Some(("default".to_string(), block)));
    }

    #[test]
    fn malformed_block_keys_are_rejected() {
        let keys = Keys::new("/weft/v1");
        for key in [
            "/weft/v1/blocks/default/10.65.3.65-26",
            "/weft/v1/blocks/default/10.65.3.64",
            "/weft/v1/blocks/default/x-26",
            "/weft/v1/blocks/default",
            "/other/blocks/default/10.65.3.64-26",
        ] {
            assert_eq!(keys.parse_block(key), None, "{key}");
        }
    }

    #[test]
    fn names_are_single_segments() {
        let keys = Keys::new("/weft/v1");
        assert_eq!(keys.name_in(&keys.hosts(), "/weft/v1/hosts/h1"), Some("h1"));
        assert_eq!(keys.name_in(&keys.hosts(), "/weft/v1/hosts/h1/x"), None);
        assert_eq!(keys.name_in(&keys.hosts(), "/weft/v1/hosts/"), None);
    }

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
    }
}
