//! Agent configuration: flags win over `WEFT_*` environment variables, which win over the TOML
//! file given by `--config`, which wins over built-in defaults. Every value is checked here, once,
//! and typed from then on.

mod bgp;
mod flags;
mod pool_flags;
mod pools;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use bgp::{Asn, BgpPeer, BgpSettings};
pub use flags::{parse_duration, read_file, FileConfig, Flags};
pub use pool_flags::PoolCidrs;
pub use pools::{FilePool, PoolSettings};

use crate::model::HostName;
use weft_etcd::records::Encapsulation;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// How to reach etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub timeout: Duration,
    pub tls: Option<weft_etcd::TlsFiles>,
}

/// The resolved configuration the agent runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub host_name: HostName,
    pub etcd: EtcdSettings,
    /// The pools this agent allocates from, in the order given (at least one).
    pub pools: Vec<PoolSettings>,
    pub underlay_interface: Option<String>,
    /// MTU of container interfaces, when set by hand.
    pub mtu: Option<u32>,
    pub socket: PathBuf,
    pub log_format: LogFormat,
    pub alive_ttl: Duration,
    pub resync_interval: Duration,
    pub remove_dead_hosts_after: Option<Duration>,
    /// How long a block of this host stays empty before it is released; None: never.
    pub block_release_after: Option<Duration>,
    pub metrics_addr: Option<SocketAddr>,
    /// The agent's local state (its journal of endpoints).
    pub state_dir: PathBuf,
    /// Publish ports that a host socket listens on.
    pub allow_host_port_override: bool,
    /// Keep containers away from etcd and the metrics listener.
    pub protect_datastore: bool,
    /// Announcing this host's blocks over BGP.
    pub bgp: BgpSettings,
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

fn duration(
    setting: &'static str,
    value: Option<String>,
    default: &str,
) -> Result<Duration, ConfigError> {
    parse_duration(value.as_deref().unwrap_or(default)).map_err(|m| invalid(setting, m))
}

impl Config {
    /// The pool of this name, if the agent has it.
    pub fn pool(&self, name: &str) -> Option<&PoolSettings> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// Whether the host has an IPv6 pool (then it forwards IPv6).
    pub fn has_ipv6(&self) -> bool {
        self.pools.iter().any(|p| p.cidr.is_ipv6())
    }

    /// The pool holding `ip`, if any.
    pub fn pool_of(&self, ip: std::net::IpAddr) -> Option<&PoolSettings> {
        self.pools.iter().find(|p| p.cidr.contains(ip))
    }

    /// The encapsulation of this host's pools (they share one).
    pub fn encapsulation(&self) -> Encapsulation {
        self.pools[0].encapsulation
    }

    pub fn load(flags: Flags) -> Result<Self, ConfigError> {
        let file = match &flags.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Self::resolve(flags, file)
    }

    fn resolve(flags: Flags, file: FileConfig) -> Result<Self, ConfigError> {
        let host_name = match flags.host_name.clone().or(file.host_name.clone()) {
            Some(name) => name,
            None => nix::unistd::gethostname()
                .map_err(|e| invalid("host-name", format!("cannot read hostname: {e}")))?
                .to_string_lossy()
                .into_owned(),
        };
        let host_name =
            HostName::new(&host_name).map_err(|e| invalid("host-name", e.to_string()))?;
        let etcd = etcd_settings(&flags, &file)?;
        let pools = pools::pool_settings(&flags, &file)?;
        let bgp = bgp::bgp_settings(&flags, &file)?;
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
        let remove_dead_hosts_after = remove_after(
            flags
                .remove_dead_hosts_after
                .or(file.remove_dead_hosts_after),
            alive_ttl,
        )?;
        let block_release_after = release_after(
            flags.block_release_after.or(file.block_release_after),
            etcd.timeout,
        )?;
        Ok(Config {
            host_name: host_name.clone(),
            etcd,
            pools,
            underlay_interface: flags.underlay_interface.or(file.underlay_interface),
            mtu: match flags.mtu.or(file.mtu) {
                Some(mtu) if !(576..=65535).contains(&mtu) => {
                    return Err(invalid(
                        "mtu",
                        format!("{mtu} is not an MTU between 576 and 65535"),
                    ))
                }
                mtu => mtu,
            },
            socket: flags
                .socket
                .or(file.socket)
                .unwrap_or_else(|| PathBuf::from("/run/weft/agent.sock")),
            log_format: log_format(flags.log_format.or(file.log_format))?,
            alive_ttl,
            resync_interval,
            remove_dead_hosts_after,
            block_release_after,
            metrics_addr: metrics_addr(flags.metrics_addr.or(file.metrics_addr))?,
            // Named after the host: several agents of a lab share one machine's /run.
            state_dir: flags
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| PathBuf::from("/run/weft").join(host_name.as_str())),
            allow_host_port_override: flags
                .allow_host_port_override
                .or(file.allow_host_port_override)
                .unwrap_or(false),
            protect_datastore: flags
                .protect_datastore
                .or(file.protect_datastore)
                .unwrap_or(true),
            bgp,
        })
    }
}

fn etcd_settings(flags: &Flags, file: &FileConfig) -> Result<EtcdSettings, ConfigError> {
    let endpoints: Vec<String> = flags
        .etcd_endpoints
        .clone()
        .or(file.etcd_endpoints.clone())
        .unwrap_or_else(|| "http://127.0.0.1:2379".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if endpoints.is_empty() {
        return Err(invalid("etcd-endpoints", "no endpoint given"));
    }
    let prefix = flags
        .etcd_prefix
        .clone()
        .or(file.etcd_prefix.clone())
        .unwrap_or_else(|| "/weft/v1".into());
    if !prefix.starts_with('/') {
        return Err(invalid("etcd-prefix", "must start with '/'"));
    }
    let timeout = duration(
        "etcd-timeout",
        flags.etcd_timeout.clone().or(file.etcd_timeout.clone()),
        "2s",
    )?;
    let tls = weft_etcd::TlsFiles::from_parts(
        flags.etcd_cacert.clone().or(file.etcd_cacert.clone()),
        flags.etcd_cert.clone().or(file.etcd_cert.clone()),
        flags.etcd_key.clone().or(file.etcd_key.clone()),
    );
    Ok(EtcdSettings {
        endpoints,
        prefix,
        timeout,
        tls,
    })
}

fn remove_after(
    value: Option<String>,
    alive_ttl: Duration,
) -> Result<Option<Duration>, ConfigError> {
    match value.as_deref() {
        None | Some("off") | Some("") => Ok(None),
        Some(text) => {
            let after = parse_duration(text).map_err(|m| invalid("remove-dead-hosts-after", m))?;
            if after < alive_ttl {
                return Err(invalid(
                    "remove-dead-hosts-after",
                    "must be longer than alive-ttl",
                ));
            }
            Ok(Some(after))
        }
    }
}

/// `--block-release-after`: longer than one etcd request, so that a write of an earlier agent
/// still in flight when it was killed has landed (and is seen) before its block can go.
fn release_after(
    value: Option<String>,
    etcd_timeout: Duration,
) -> Result<Option<Duration>, ConfigError> {
    match value.as_deref().unwrap_or("15m") {
        "off" => Ok(None),
        text => {
            let after = parse_duration(text).map_err(|m| invalid("block-release-after", m))?;
            if after <= etcd_timeout {
                return Err(invalid(
                    "block-release-after",
                    format!("must be longer than etcd-timeout ({etcd_timeout:?}), or off"),
                ));
            }
            Ok(Some(after))
        }
    }
}

fn metrics_addr(value: Option<String>) -> Result<Option<SocketAddr>, ConfigError> {
    match value.as_deref().unwrap_or("127.0.0.1:9099") {
        "" => Ok(None),
        text => text.parse().map(Some).map_err(|_| {
            invalid(
                "metrics-addr",
                format!("{text:?} is not an address such as 127.0.0.1:9099"),
            )
        }),
    }
}

fn log_format(value: Option<String>) -> Result<LogFormat, ConfigError> {
    match value.as_deref().unwrap_or("text") {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(invalid(
            "log-format",
            format!("{other:?}: use text or json"),
        )),
    }
}

/// A configuration resolved from agent flags (after `--host-name h1`) and a TOML file's text,
/// for the configuration's unit tests.
#[cfg(test)]
pub(crate) fn resolve_for_test(args: &[&str], file: &str) -> Result<Config, ConfigError> {
    use clap::Parser;
    let flags = Flags::try_parse_from(
        ["weft-agent", "--host-name", "h1"]
            .into_iter()
            .chain(args.iter().copied()),
    )
    .unwrap();
    Config::resolve(flags, toml::from_str(file).unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::path::Path;

    fn flags(args: &[&str]) -> Flags {
        Flags::try_parse_from(std::iter::once("weft-agent").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn defaults() {
        let config = Config::resolve(flags(&["--host-name", "h1"]), FileConfig::default()).unwrap();
        assert_eq!(config.pools[0].cidr.to_string(), "10.65.0.0/16");
        assert_eq!(config.pools[0].block_size, 26);
        assert_eq!(config.etcd.prefix, "/weft/v1");
        assert_eq!(config.socket, PathBuf::from("/run/weft/agent.sock"));
        assert!(config.pools[0].nat_outgoing);
        assert_eq!(config.remove_dead_hosts_after, None);
        assert_eq!(config.etcd.tls, None);
        assert_eq!(config.state_dir, PathBuf::from("/run/weft/h1"));
        assert!(!config.allow_host_port_override);
        assert!(config.protect_datastore);
        assert_eq!(config.pools[0].encapsulation, Encapsulation::CrossSubnet);
        assert_eq!(config.mtu, None);
        assert!(!config.bgp.enabled);
        assert_eq!(config.bgp.asn.get(), 64512);
        assert_eq!(config.bgp.hold_time, Duration::from_secs(9));
        assert_eq!(config.bgp.dir, PathBuf::from("/run/weft/bird"));
        assert!(config.bgp.peers.is_empty());
    }

    #[test]
    fn bgp_peers_repeat_and_come_from_the_file_too() {
        let config = Config::resolve(
            flags(&[
                "--host-name",
                "h1",
                "--bgp",
                "--bgp-peer",
                "198.51.100.100:64513",
                "--bgp-peer",
                "[2001:db8::100]:64513",
                "--bgp-hold-time",
                "3s",
            ]),
            FileConfig::default(),
        )
        .unwrap();
        assert!(config.bgp.enabled);
        let peers: Vec<String> = config.bgp.peers.iter().map(|p| p.to_string()).collect();
        assert_eq!(peers, ["198.51.100.100:64513", "[2001:db8::100]:64513"]);
        assert_eq!(config.bgp.hold_time, Duration::from_secs(3));
        let file: FileConfig =
            toml::from_str("bgp = true\nbgp-asn = 65001\nbgp-peer = [\"198.51.100.100:64513\"]\n")
                .unwrap();
        let config = Config::resolve(flags(&["--host-name", "h1"]), file).unwrap();
        assert!(config.bgp.enabled);
        assert_eq!(config.bgp.asn.get(), 65001);
        assert_eq!(config.bgp.peers[0].to_string(), "198.51.100.100:64513");
    }

    #[test]
    fn switches_take_an_optional_value() {
        let config = |args: &[&str]| {
            let mut all = vec!["--host-name", "h1"];
            all.extend_from_slice(args);
            Config::resolve(flags(&all), FileConfig::default()).unwrap()
        };
        assert!(config(&["--allow-host-port-override"]).allow_host_port_override);
        assert!(!config(&["--protect-datastore=false"]).protect_datastore);
        assert!(config(&["--protect-datastore"]).protect_datastore);
    }

    #[test]
    fn blocks_are_released_after_fifteen_minutes_unless_told_otherwise() {
        let release = |args: &[&str]| {
            let mut all = vec!["--host-name", "h1"];
            all.extend_from_slice(args);
            Config::resolve(flags(&all), FileConfig::default())
                .unwrap()
                .block_release_after
        };
        assert_eq!(release(&[]), Some(Duration::from_secs(900)));
        assert_eq!(
            release(&["--block-release-after", "3s"]),
            Some(Duration::from_secs(3))
        );
        assert_eq!(release(&["--block-release-after", "off"]), None);
    }

    #[test]
    fn flags_win_over_file() {
        let file: FileConfig =
            toml::from_str("host-name = \"file\"\npool = \"10.70.0.0/16\"\nblock-size = 28\n")
                .unwrap();
        let config = Config::resolve(flags(&["--host-name", "flag"]), file).unwrap();
        assert_eq!(config.host_name.as_str(), "flag");
        assert_eq!(config.pools[0].cidr.to_string(), "10.70.0.0/16");
        assert_eq!(config.pools[0].block_size, 28);
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
    fn bad_values_name_the_setting() {
        let refused = |args: &[&str], setting: &str| {
            let mut all = vec!["--host-name", "h1"];
            all.extend_from_slice(args);
            let err = Config::resolve(flags(&all), FileConfig::default()).unwrap_err();
            assert!(err.to_string().starts_with(setting), "{err}");
        };
        refused(&["--pool", "10.65.0.1/16"], "pool:");
        refused(&["--block-size", "8"], "block-size:");
        refused(&["--alive-ttl", "1s"], "alive-ttl:");
        refused(
            &["--remove-dead-hosts-after", "1s"],
            "remove-dead-hosts-after:",
        );
        refused(&["--block-release-after", "2s"], "block-release-after:");
        refused(&["--block-release-after", "soon"], "block-release-after:");
        refused(&["--metrics-addr", "nowhere"], "metrics-addr:");
        refused(&["--log-format", "xml"], "log-format:");
        refused(&["--etcd-prefix", "weft"], "etcd-prefix:");
        refused(&["--encapsulation", "ipip"], "encapsulation:");
        refused(&["--mtu", "100"], "mtu:");
        refused(&["--bgp"], "bgp-peer:");
        refused(&["--bgp-peer", "198.51.100.100"], "bgp-peer:");
        refused(&["--bgp-peer", "198.51.100.100:0"], "bgp-peer:");
        refused(
            &[
                "--bgp-peer",
                "198.51.100.1:1",
                "--bgp-peer",
                "198.51.100.1:2",
            ],
            "bgp-peer:",
        );
        refused(&["--bgp-asn", "0"], "bgp-asn:");
        refused(&["--bgp-hold-time", "2s"], "bgp-hold-time:");
        refused(&["--bgp-hold-time", "3500ms"], "bgp-hold-time:");
        refused(&["--bgp-dir", "bird"], "bgp-dir:");
        let err =
            Config::resolve(flags(&["--host-name", "a/b"]), FileConfig::default()).unwrap_err();
        assert!(err.to_string().starts_with("host-name:"), "{err}");
    }
}
