//! The etcd key layout under the configurable prefix (default `/weft/v1`). Every key weft
//! stores is built and parsed here; nothing else formats a key.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::records::Protocol;

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

    /// Every key weft stores.
    pub fn all(&self) -> String {
        format!("{}/", self.prefix)
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

    pub fn block(&self, pool: &str, block: IpNetwork) -> String {
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

    pub fn ip(&self, ip: IpAddr) -> String {
        format!("{}/ips/{ip}", self.prefix)
    }

    pub fn ips(&self) -> String {
        format!("{}/ips/", self.prefix)
    }

    pub fn endpoint(&self, host: &str, container_id: &str) -> String {
        format!("{}/endpoints/{host}/{container_id}", self.prefix)
    }

    /// Every endpoint of every host.
    pub fn endpoints(&self) -> String {
        format!("{}/endpoints/", self.prefix)
    }

    pub fn host_endpoints(&self, host: &str) -> String {
        format!("{}/endpoints/{host}/", self.prefix)
    }

    pub fn port(&self, host: &str, protocol: Protocol, port: u16) -> String {
        format!("{}/ports/{host}/{protocol}/{port}", self.prefix)
    }

    /// Every host-port reservation of every host.
    pub fn ports(&self) -> String {
        format!("{}/ports/", self.prefix)
    }

    pub fn host_ports(&self, host: &str) -> String {
        format!("{}/ports/{host}/", self.prefix)
    }

    pub fn policy(&self, name: &str) -> String {
        format!("{}/policies/{name}", self.prefix)
    }

    /// Every network policy.
    pub fn policies(&self) -> String {
        format!("{}/policies/", self.prefix)
    }

    /// Parses `<prefix>/endpoints/<host>/<container-id>`.
    pub fn parse_endpoint(&self, key: &str) -> Option<(String, String)> {
        let (host, id) = key.strip_prefix(&self.endpoints())?.split_once('/')?;
        (!host.is_empty() && !id.is_empty() && !id.contains('/'))
            .then(|| (host.to_string(), id.to_string()))
    }

    /// Parses `<prefix>/policies/<name>`.
    pub fn parse_policy<'k>(&self, key: &'k str) -> Option<&'k str> {
        self.name_in(&self.policies(), key)
    }

    /// Parses `<prefix>/blocks/<pool>/<addr>-<len>` into the pool name and the block.
    pub fn parse_block(&self, key: &str) -> Option<(String, IpNetwork)> {
        let rest = key.strip_prefix(&self.blocks())?;
        let (pool, block) = rest.split_once('/')?;
        let (addr, len) = block.rsplit_once('-')?;
        let net = IpNetwork::new(addr.parse().ok()?, len.parse().ok()?).ok()?;
        (net.network() == net.ip() && !pool.is_empty()).then(|| (pool.to_string(), net))
    }

    /// Parses `<prefix>/ips/<addr>`.
    pub fn parse_ip(&self, key: &str) -> Option<IpAddr> {
        key.strip_prefix(&self.ips())?.parse().ok()
    }

    /// Parses `<prefix>/ports/<host>/<proto>/<port>`.
    pub fn parse_port(&self, key: &str) -> Option<(String, Protocol, u16)> {
        let mut parts = key.strip_prefix(&self.ports())?.split('/');
        let host = parts.next().filter(|h| !h.is_empty())?.to_string();
        let protocol = match parts.next()? {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => return None,
        };
        let port = parts.next()?.parse().ok()?;
        parts.next().is_none().then_some((host, protocol, port))
    }

    /// The last path segment of a key below `collection` (e.g. the host name of `hosts/<host>`).
    pub fn name_in<'k>(&self, collection: &str, key: &'k str) -> Option<&'k str> {
        let name = key.strip_prefix(collection)?;
        (!name.is_empty() && !name.contains('/')).then_some(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_keys_round_trip_in_both_families() {
        let keys = Keys::new("/weft/v1/");
        let block: IpNetwork = "10.65.3.64/26".parse().unwrap();
        let key = keys.block("default", block);
        assert_eq!(key, "/weft/v1/blocks/default/10.65.3.64-26");
        assert_eq!(keys.parse_block(&key), Some(("default".to_string(), block)));
        let v6: IpNetwork = "fd65::40/122".parse().unwrap();
        let key = keys.block("default-v6", v6);
        assert_eq!(key, "/weft/v1/blocks/default-v6/fd65::40-122");
        assert_eq!(keys.parse_block(&key), Some(("default-v6".to_string(), v6)));
    }

    #[test]
    fn malformed_block_keys_are_rejected() {
        let keys = Keys::new("/weft/v1");
        for key in [
            "/weft/v1/blocks/default/10.65.3.65-26",
            "/weft/v1/blocks/default/10.65.3.64",
            "/weft/v1/blocks/default/x-26",
            "/weft/v1/blocks/default",
            "/weft/v1/blocks//10.65.3.64-26",
            "/other/blocks/default/10.65.3.64-26",
        ] {
            assert_eq!(keys.parse_block(key), None, "{key}");
        }
    }

    #[test]
    fn port_and_ip_keys_round_trip() {
        let keys = Keys::new("/weft/v1");
        let key = keys.port("h1", Protocol::Udp, 53);
        assert_eq!(key, "/weft/v1/ports/h1/udp/53");
        assert_eq!(
            keys.parse_port(&key),
            Some(("h1".to_string(), Protocol::Udp, 53))
        );
        assert_eq!(keys.parse_port("/weft/v1/ports/h1/sctp/53"), None);
        assert_eq!(keys.parse_port("/weft/v1/ports/h1/tcp/53/x"), None);
        let ip: IpAddr = "10.65.0.7".parse().unwrap();
        assert_eq!(keys.parse_ip(&keys.ip(ip)), Some(ip));
    }

    #[test]
    fn endpoint_and_policy_keys_round_trip() {
        let keys = Keys::new("/weft/v1");
        let key = keys.endpoint("h1", "web-1");
        assert_eq!(
            keys.parse_endpoint(&key),
            Some(("h1".into(), "web-1".into()))
        );
        assert_eq!(keys.parse_endpoint("/weft/v1/endpoints/h1"), None);
        assert_eq!(keys.parse_endpoint("/weft/v1/endpoints/h1/a/b"), None);
        assert_eq!(keys.policy("web"), "/weft/v1/policies/web");
        assert_eq!(keys.parse_policy(&keys.policy("web")), Some("web"));
        assert_eq!(keys.parse_policy("/weft/v1/policies/a/b"), None);
    }

    #[test]
    fn names_are_single_segments() {
        let keys = Keys::new("/weft/v1");
        assert_eq!(keys.name_in(&keys.hosts(), "/weft/v1/hosts/h1"), Some("h1"));
        assert_eq!(keys.name_in(&keys.hosts(), "/weft/v1/hosts/h1/x"), None);
        assert_eq!(keys.name_in(&keys.hosts(), "/weft/v1/hosts/"), None);
    }
}
