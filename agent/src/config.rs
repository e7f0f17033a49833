//! Agent configuration: flags win over `WEFT_*` environment variables, which win over the TOML
//! file given by `--config`, which wins over built-in defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use ipnetwork::Ipv4Network;
use serde::Deserialize;

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
    /// The address pool, a CIDR [default: 10.65.0.0/16].
    #[arg(long, env = "WEFT_POOL")]
    pub pool: Option<String>,
    /// Name of the pool in etcd [default: default].
    #[arg(long, env = "WEFT_POOL_NAME")]
    pub pool_name: Option<String>,
    /// Prefix length of the blocks hosts claim from the pool [default: 26].
    #[arg(long, env = "WEFT_BLOCK_SIZE")]
    pub block_size: Option<u8>,
    /// Masquerade traffic from the pool to destinations outside every pool [default: true].
    #[arg(long, env = "WEFT_NAT_OUTGOING")]
    pub nat_outgoing: Option<bool>,
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
    /// Remove a host (blocks, addresses, routes on every peer) once it has been down this long,
    /// e.g. 24h; "off" disables [default: off].
    #[arg(long, env = "WEFT_REMOVE_DEAD_HOSTS_AFTER")]
    pub remove_dead_hosts_after: Option<String>,
}

/// The same settings as read from the TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct FileConfig {
    host_name: Option<String>,
    etcd_endpoints: Option<String>,
    etcd_prefix: Option<String>,
    etcd_cacert: Option<String>,
    etcd_cert: Option<String>,
    etcd_key: Option<String>,
    etcd_timeout: Option<String>,
    pool: Option<String>,
    pool_name: Option<String>,
    block_size: Option<u8>,
    nat_outgoing: Option<bool>,
    underlay_interface: Option<String>,
    socket: Option<PathBuf>,
    log_format: Option<String>,
    alive_ttl: Option<String>,
    resync_interval: Option<String>,
    remove_dead_hosts_after: Option<String>,
    metrics_addr: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The resolved configuration the agent runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub host_name: String,
    pub etcd_endpoints: Vec<String>,
    pub etcd_prefix: String,
    pub etcd_cacert: Option<String>,
    pub etcd_cert: Option<String>,
    pub etcd_key: Option<String>,
    pub etcd_timeout: Duration,
    pub pool: Ipv4Network,
    pub pool_name: String,
    pub block_size: u8,
    pub nat_outgoing: bool,
    pub underlay_interface: Option<String>,
    pub socket: PathBuf,
    pub log_format: LogFormat,
    pub alive_ttl: Duration,
    pub resync_interval: Duration,
    pub remove_dead_hosts_after: Option<Duration>,
    pub metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("{setting}: {message}")]
    Invalid {
        setting: &'static str,
        message: String,
    },
}

fn invalid(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        message: message.into(),
    }
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

impl Config {
    pub fn load(flags: Flags) -> Result<Self, ConfigError> {
        let file = match &flags.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Self::resolve(flags, file)
    }

    fn resolve(flags: Flags, file: FileConfig) -> Result<Self, ConfigError> {
        let host_name = match flags.host_name.or(file.host_name) {
            Some(name) => name,
            None => nix::unistd::gethostname()
                .map_err(|e| invalid("host-name", format!("cannot read hostname: {e}")))?
                .to_string_lossy()
                .into_owned(),
        };
        crate::validate::host_name(&host_name).map_err(|m| invalid("host-name", m))?;

        let etcd_endpoints: Vec<String> = flags
            .etcd_endpoints
            .or(file.etcd_endpoints)
            .unwrap_or_else(|| "http://127.0.0.1:2379".into())
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if etcd_endpoints.is_empty() {
            return Err(invalid("etcd-endpoints", "no endpoint given"));
        }
        let etcd_prefix = flags
            .etcd_prefix
            .or(file.etcd_prefix)
            .unwrap_or_else(|| "/weft/v1".into());
        if !etcd_prefix.starts_with('/') {
            return Err(invalid("etcd-prefix", "must start with '/'"));
        }

        let duration = |setting: &'static str, value: Option<String>, default: &str| {
            parse_duration(value.as_deref().unwrap_or(default)).map_err(|m| invalid(setting, m))
        };
        let etcd_timeout = duration(
            "etcd-timeout",
            flags.etcd_timeout.or(file.etcd_timeout),
            "2s",
        )?;
        let alive_ttl = duration("alive-ttl", flags.alive_ttl.or(file.alive_ttl), "10s")?;
        if alive_ttl < Duration::from_secs(2) {
            return Err(invalid("alive-ttl", "must be at least 2s"));
        }
        let resync_interval = duration(
            "resync-interval",
            flags.resync_interval.or(file.resync_interval),
            "10s",
        )?;
        if resync_interval < Duration::from_millis(100) {
            return Err(invalid("resync-interval", "must be at least 100ms"));
        }
        let remove_dead_hosts_after = match flags
            .remove_dead_hosts_after
            .or(file.remove_dead_hosts_after)
            .as_deref()
        {
            None | Some("off") | Some("") => None,
            Some(text) => {
                let after =
                    parse_duration(text).map_err(|m| invalid("remove-dead-hosts-after", m))?;
                if after < alive_ttl {
                    return Err(invalid(
                        "remove-dead-hosts-after",
                        "must be longer than alive-ttl",
                    ));
                }
                Some(after)
            }
        };

        let pool_text = flags
            .pool
            .or(file.pool)
            .unwrap_or_else(|| "10.65.0.0/16".into());
        let pool: Ipv4Network = pool_text
            .parse()
            .map_err(|e| invalid("pool", format!("{pool_text:?} is not an IPv4 CIDR: {e}")))?;
        if pool.network() != pool.ip() {
            return Err(invalid(
                "pool",
                format!(
                    "{pool} has host bits set; did you mean {}/{}?",
                    pool.network(),
                    pool.prefix()
                ),
            ));
        }
        let block_size = flags.block_size.or(file.block_size).unwrap_or(26);
        if block_size < pool.prefix() || block_size > 32 {
            return Err(invalid(
                "block-size",
                format!("/{block_size} blocks do not fit in pool {pool}"),
            ));
        }
        let pool_name = flags
            .pool_name
            .or(file.pool_name)
            .unwrap_or_else(|| "default".into());
        crate::validate::host_name(&pool_name)
            .map_err(|_| invalid("pool-name", format!("{pool_name:?} is not a valid name")))?;

        let metrics_addr = match flags
            .metrics_addr
            .or(file.metrics_addr)
            .as_deref()
            .unwrap_or("127.0.0.1:9099")
        {
            "" => None,
            text => Some(text.parse().map_err(|_| {
                invalid(
                    "metrics-addr",
                    format!("{text:?} is not an address such as 127.0.0.1:9099"),
                )
            })?),
        };
        let log_format = match flags
            .log_format
            .or(file.log_format)
            .as_deref()
            .unwrap_or("text")
        {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "log-format",
                    format!("{other:?}: use text or json"),
                ))
            }
        };

        Ok(Config {
            host_name,
            etcd_endpoints,
            etcd_prefix,
            etcd_cacert: flags.etcd_cacert.or(file.etcd_cacert),
            etcd_cert: flags.etcd_cert.or(file.etcd_cert),
            etcd_key: flags.etcd_key.or(file.etcd_key),
            etcd_timeout,
            pool,
            pool_name,
            block_size,
            nat_outgoing: flags.nat_outgoing.or(file.nat_outgoing).unwrap_or(true),
            underlay_interface: flags.underlay_interface.or(file.underlay_interface),
            socket: flags
                .socket
                .or(file.socket)
                .unwrap_or_else(|| PathBuf::from("/run/weft/agent.sock")),
            log_format,
            alive_ttl,
            resync_interval,
            remove_dead_hosts_after,
            metrics_addr,
        })
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
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

    fn flags(args: &[&str]) -> Flags {
        Flags::try_parse_from(std::iter::once("weft-agent").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn defaults() {
        let config = Config::resolve(flags(&["--host-name", "h1"]), FileConfig::default()).unwrap();
        assert_eq!(config.pool.to_string(), "10.65.0.0/16");
        assert_eq!(config.block_size, 26);
        assert_eq!(config.etcd_prefix, "/weft/v1");
        assert_eq!(config.socket, PathBuf::from("/run/weft/agent.sock"));
        assert!(config.nat_outgoing);
        assert_eq!(config.remove_dead_hosts_after, None);
    }

    #[test]
    fn flags_win_over_file() {
        let file: FileConfig =
            toml::from_str("host-name = \"file\"\npool = \"10.70.0.0/16\"\nblock-size = 28\n")
                .unwrap();
        let config = Config::resolve(flags(&["--host-name", "flag"]), file).unwrap();
        assert_eq!(config.host_name, "flag");
        assert_eq!(config.pool.to_string(), "10.70.0.0/16");
        assert_eq!(config.block_size, 28);
    }

    #[test]
    fn the_example_file_lists_the_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/agent.toml");
        let file = read_file(Path::new(path)).unwrap();
        let from_file = Config::resolve(flags(&["--host-name", "h1"]), file).unwrap();
        let defaults =
            Config::resolve(flags(&["--host-name", "h1"]), FileConfig::default()).unwrap();
        assert_eq!(format!("{from_file:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        assert!(toml::from_str::<FileConfig>("hostname = \"x\"").is_err());
    }

    #[test]
    fn bad_values_name_the_setting() {
        let err = Config::resolve(
            flags(&["--host-name", "h1", "--pool", "10.65.0.1/16"]),
            FileConfig::default(),
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("pool:"), "{err}");
        let err = Config::resolve(
            flags(&["--host-name", "h1", "--block-size", "8"]),
            FileConfig::default(),
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("block-size:"), "{err}");
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
