//! Where settings come from: command-line flags (each also `WEFT_<FLAG>` in the environment)
//! and the TOML file given by `--config`, both with every value optional so that they can be
//! merged; and the parsers they share.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use super::ConfigError;

/// Command-line flags (each also `WEFT_<FLAG>` in the environment). Every value is optional here
/// so that the TOML file can fill what flags and environment leave unset.
#[derive(Debug, Default, Parser)]
// Later occurrences of a flag win, so a wrapper can override what it passed before.
#[command(
    name = "weft-agent",
    version,
    about = "weft per-host agent: a routed container fabric",
    args_override_self = true
)]
pub struct Flags {
    /// TOML file with any of the settings below (keys as the long flags, e.g. host-name).
    #[arg(long, env = "WEFT_CONFIG")]
    pub config: Option<PathBuf>,
    /// This host's name in the cluster [default: the machine's hostname].
    #[arg(long, env = "WEFT_HOST_NAME")]
    pub host_name: Option<String>,
    /// etcd endpoints, comma-separated [default: http://127.0.0.1:2379].
    #[arg(long, env = "WEFT_ETCD_ENDPOINTS")]
    pub etcd_endpoints: Option<String>,
    /// Key prefix of all weft data in etcd [default: /weft/v1].
    #[arg(long, env = "WEFT_ETCD_PREFIX")]
    pub etcd_prefix: Option<String>,
    /// CA certificate (PEM) to verify etcd with.
    #[arg(long, env = "WEFT_ETCD_CACERT")]
    pub etcd_cacert: Option<String>,
    /// Client certificate (PEM) for etcd.
    #[arg(long, env = "WEFT_ETCD_CERT")]
    pub etcd_cert: Option<String>,
    /// Client key (PEM) for etcd.
    #[arg(long, env = "WEFT_ETCD_KEY")]
    pub etcd_key: Option<String>,
    /// Upper bound of one etcd request, e.g. 2s or 500ms [default: 2s].
    #[arg(long, env = "WEFT_ETCD_TIMEOUT")]
    pub etcd_timeout: Option<String>,
    /// The address pools, CIDRs: at most one IPv4 and one IPv6; repeat or separate with commas
    /// [default: 10.65.0.0/16].
    #[arg(long, env = "WEFT_POOL", value_delimiter = ',')]
    pub pool: Vec<String>,
    /// Name of the pool in etcd; the IPv6 pool's name gets `-v6` appended [default: default].
    #[arg(long, env = "WEFT_POOL_NAME")]
    pub pool_name: Option<String>,
    /// Prefix length of the blocks hosts claim from the IPv4 pool [default: 26].
    #[arg(long, env = "WEFT_BLOCK_SIZE")]
    pub block_size: Option<u8>,
    /// Prefix length of the blocks hosts claim from the IPv6 pool, 116 to 128 [default: 122].
    #[arg(long, env = "WEFT_BLOCK_SIZE_V6")]
    pub block_size_v6: Option<u8>,
    /// Masquerade traffic from the pool to destinations outside every pool [default: true].
    #[arg(long, env = "WEFT_NAT_OUTGOING")]
    pub nat_outgoing: Option<bool>,
    /// How traffic between hosts crosses the underlay: cross-subnet (VXLAN only to peers off
    /// the local subnet), vxlan (always) or none (never). Part of the pool's record
    /// [default: cross-subnet].
    #[arg(long, env = "WEFT_ENCAPSULATION")]
    pub encapsulation: Option<String>,
    /// MTU of container interfaces [default: the underlay's, minus 50 when the pool may
    /// encapsulate].
    #[arg(long, env = "WEFT_MTU")]
    pub mtu: Option<u32>,
    /// Interface whose address is this host's underlay IP [default: the default route's].
    #[arg(long, env = "WEFT_UNDERLAY_INTERFACE")]
    pub underlay_interface: Option<String>,
    /// gRPC Unix socket [default: /run/weft/agent.sock].
    #[arg(long, env = "WEFT_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "WEFT_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Lifetime of this host's liveness key without keep-alive, e.g. 10s [default: 10s].
    #[arg(long, env = "WEFT_ALIVE_TTL")]
    pub alive_ttl: Option<String>,
    /// Interval of the full reconciliation of kernel state, e.g. 10s [default: 10s].
    #[arg(long, env = "WEFT_RESYNC_INTERVAL")]
    pub resync_interval: Option<String>,
    /// HTTP address for /healthz, /readyz and /metrics; empty turns it off
    /// [default: 127.0.0.1:9099].
    #[arg(long, env = "WEFT_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Directory of the agent's local state (its journal of endpoints)
    /// [default: /run/weft/<host-name>].
    #[arg(long, env = "WEFT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Publish a port even when a socket of the host listens on it (the DNAT then takes that
    /// port's traffic from the host's service) [default: false].
    #[arg(long, env = "WEFT_ALLOW_HOST_PORT_OVERRIDE", num_args = 0..=1, default_missing_value = "true")]
    pub allow_host_port_override: Option<bool>,
    /// Drop traffic from containers to the etcd endpoints and to the metrics listener
    /// [default: true].
    #[arg(long, env = "WEFT_PROTECT_DATASTORE", num_args = 0..=1, default_missing_value = "true")]
    pub protect_datastore: Option<bool>,
    /// Remove a host (blocks, addresses, routes on every peer) once it has been down this long,
    /// e.g. 24h; "off" disables [default: off].
    #[arg(long, env = "WEFT_REMOVE_DEAD_HOSTS_AFTER")]
    pub remove_dead_hosts_after: Option<String>,
    /// Give back to the pool a block of this host that has held no address this long (never
    /// the host's last block of a pool); "off" keeps blocks forever [default: 15m].
    #[arg(long, env = "WEFT_BLOCK_RELEASE_AFTER")]
    pub block_release_after: Option<String>,
    /// Announce this host's blocks over BGP to the peers below, through bird2
    /// [default: false].
    #[arg(long, env = "WEFT_BGP", num_args = 0..=1, default_missing_value = "true")]
    pub bgp: Option<bool>,
    /// This host's BGP AS number [default: 64512].
    #[arg(long, env = "WEFT_BGP_ASN")]
    pub bgp_asn: Option<u32>,
    /// A BGP peer, IP:ASN or [IPv6]:ASN; repeat for more (in the environment,
    /// comma-separated).
    #[arg(long, env = "WEFT_BGP_PEER", value_delimiter = ',')]
    pub bgp_peer: Vec<String>,
    /// BGP hold time offered to peers, whole seconds: 0 or 3s to 65535s [default: 9s].
    #[arg(long, env = "WEFT_BGP_HOLD_TIME")]
    pub bgp_hold_time: Option<String>,
    /// Directory of bird's configuration, control socket and PID file
    /// [default: /run/weft/bird].
    #[arg(long, env = "WEFT_BGP_DIR")]
    pub bgp_dir: Option<PathBuf>,
}

/// The same settings as read from the TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FileConfig {
    pub host_name: Option<String>,
    pub etcd_endpoints: Option<String>,
    pub etcd_prefix: Option<String>,
    pub etcd_cacert: Option<String>,
    pub etcd_cert: Option<String>,
    pub etcd_key: Option<String>,
    pub etcd_timeout: Option<String>,
    /// One CIDR, a comma-separated list, or an array (at most one per family).
    pub pool: Option<super::PoolCidrs>,
    pub pool_name: Option<String>,
    pub block_size: Option<u8>,
    pub block_size_v6: Option<u8>,
    pub nat_outgoing: Option<bool>,
    pub encapsulation: Option<String>,
    /// Several pools, instead of pool, pool-name and block-size.
    pub pools: Option<Vec<super::FilePool>>,
    pub mtu: Option<u32>,
    pub underlay_interface: Option<String>,
    pub socket: Option<PathBuf>,
    pub log_format: Option<String>,
    pub alive_ttl: Option<String>,
    pub resync_interval: Option<String>,
    pub remove_dead_hosts_after: Option<String>,
    pub block_release_after: Option<String>,
    pub metrics_addr: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub allow_host_port_override: Option<bool>,
    pub protect_datastore: Option<bool>,
    pub bgp: Option<bool>,
    pub bgp_asn: Option<u32>,
    pub bgp_peer: Option<Vec<String>>,
    pub bgp_hold_time: Option<String>,
    pub bgp_dir: Option<PathBuf>,
}

/// Parses durations such as `10s`, `500ms`, `2m` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| text.split_at(i))
        .unwrap_or((text, "s"));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 10s, 500ms, 2m)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{text:?} has an unknown unit (use ms, s, m or h)")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: shown,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_file_keys_are_errors() {
        assert!(toml::from_str::<FileConfig>("hostname = \"x\"").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3d").is_err());
    }
}
