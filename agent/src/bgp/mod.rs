//! Announcing this host's blocks to routers outside weft over BGP, through Debian's bird2.
//!
//! etcd stays the fabric's truth; bird only tells the physical network. The agent renders
//! bird's configuration from its cluster view (`render`, pure), writes it atomically, has bird
//! check and apply it through its control socket (`control`) when it changed, and keeps a bird
//! running on its own socket under `--bgp-dir` (`daemon`): it adopts one that answers there,
//! starts one if none does, and starts it again if it disappears. bird is never the agent's
//! child, so it keeps announcing while the agent stops, restarts or crashes.

pub mod control;
pub mod daemon;
pub mod render;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::IpNetwork;
use tracing::{info, warn};
use weft_etcd::records::HostRecord;

use crate::config::{Asn, BgpSettings};
use crate::context::Context;
use control::{BirdControl, ControlError};
use daemon::BirdFiles;
use render::BirdSpec;

#[derive(Debug, thiserror::Error)]
pub enum BgpError {
    #[error("--bgp needs bird2's `bird` in PATH, and there is none (Debian: apt install bird2)")]
    BirdMissing,
    #[error("--bgp: bird's router id is this host's IPv4 underlay address, and {0} is not IPv4")]
    NoRouterId(IpAddr),
    #[error("cannot prepare {path}: {source}")]
    Files {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot run {bird}: {source}")]
    Spawn {
        bird: PathBuf,
        source: std::io::Error,
    },
    #[error("bird rejected {config}: {message}")]
    Rejected { config: PathBuf, message: String },
    #[error("bird did not answer on {socket} within {limit:?} of its start")]
    StartTimeout { socket: PathBuf, limit: Duration },
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// What a sync did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synced {
    /// bird runs the wanted configuration already.
    Unchanged,
    /// bird was given a new configuration (announcements changed, sessions kept).
    Reconfigured,
    /// No bird answered: one was started.
    Started,
    /// A bird answered and was given the configuration (at the agent's start).
    Adopted,
}

/// One session as `Status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionStatus {
    pub address: IpAddr,
    pub asn: Asn,
    /// bird's session state: `Established`, `Active`, `Idle`, ... or `Unknown` when bird does
    /// not answer.
    pub state: String,
    /// The last error bird names, or why the state is unknown.
    pub info: String,
    /// Unix seconds of the session's last state change.
    pub since: Option<u64>,
}

/// BGP as `Status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BgpStatus {
    pub asn: Asn,
    pub router_id: Ipv4Addr,
    /// Whether bird answers on its socket; the error when it does not.
    pub daemon: Result<(), String>,
    pub sessions: Vec<SessionStatus>,
    /// The blocks (of both families on a dual-stack host) in the configuration bird was last
    /// given.
    pub announced: Vec<IpNetwork>,
}

/// The next hop of this host's IPv6 blocks: the IPv6 underlay address it registered, when it
/// has an IPv6 pool. A host with an IPv6 pool but no IPv6 underlay address announces IPv4 only
/// (peers cannot route its IPv6 blocks either), and says so.
pub fn announced_v6_next_hop(has_ipv6_pool: bool, host: &HostRecord) -> Option<Ipv6Addr> {
    if !has_ipv6_pool {
        return None;
    }
    match host.underlay_ipv6 {
        Some(IpAddr::V6(address)) => Some(address),
        _ => {
            warn!(
                "bgp: this host has an IPv6 pool but no IPv6 underlay address; \
                 its IPv6 blocks are not announced"
            );
            None
        }
    }
}

/// This host's BGP speaker: the wanted configuration, bird's files, and what bird was told.
pub struct Speaker {
    settings: BgpSettings,
    bird: PathBuf,
    files: BirdFiles,
    control: BirdControl,
    router_id: Ipv4Addr,
    /// This host's registered IPv6 underlay address when it has an IPv6 pool: next hop of its
    /// IPv6 blocks. None: IPv6 blocks are not announced (and the configuration is an IPv4-only
    /// host's, byte for byte).
    local_v6: Option<Ipv6Addr>,
    /// The configuration bird last accepted, and the blocks it announces.
    applied: tokio::sync::Mutex<Option<(String, Vec<IpNetwork>)>>,
    /// A sync is wanted / a full one (bird's liveness checked) / one is under way.
    pending: AtomicBool,
    wanted: AtomicBool,
    working: AtomicBool,
}

impl Speaker {
    /// Checks what BGP needs before anything else starts: bird in PATH and a directory for its
    /// files. None when BGP is off.
    pub fn prepare(settings: &BgpSettings) -> Result<Option<PathBuf>, BgpError> {
        if !settings.enabled {
            return Ok(None);
        }
        let bird = daemon::find_in_path("bird").ok_or(BgpError::BirdMissing)?;
        std::fs::create_dir_all(&settings.dir).map_err(|source| BgpError::Files {
            path: settings.dir.clone(),
            source,
        })?;
        Ok(Some(bird))
    }

    /// `underlay_v6`: the IPv6 underlay address this host registered, when it has an IPv6 pool
    /// (its IPv6 blocks are announced with it as next hop, over the same sessions).
    pub fn new(
        settings: &BgpSettings,
        bird: PathBuf,
        underlay: IpAddr,
        underlay_v6: Option<Ipv6Addr>,
    ) -> Result<Self, BgpError> {
        let IpAddr::V4(router_id) = underlay else {
            return Err(BgpError::NoRouterId(underlay));
        };
        let files = BirdFiles::in_dir(&settings.dir);
        Ok(Self {
            control: BirdControl::new(&files.socket),
            settings: settings.clone(),
            bird,
            files,
            router_id,
            local_v6: underlay_v6,
            applied: Default::default(),
            pending: AtomicBool::new(false),
            wanted: AtomicBool::new(false),
            working: AtomicBool::new(false),
        })
    }

    pub fn files(&self) -> &BirdFiles {
        &self.files
    }

    /// The configuration that announces `blocks`: the IPv4 ones always, the IPv6 ones when
    /// this host has an IPv6 next hop for them.
    pub fn spec(&self, blocks: &[IpNetwork]) -> BirdSpec {
        let mut announced: Vec<IpNetwork> = blocks
            .iter()
            .filter(|b| b.is_ipv4() || self.local_v6.is_some())
            .copied()
            .collect();
        announced.sort();
        announced.dedup();
        BirdSpec {
            router_id: self.router_id,
            asn: self.settings.asn,
            hold_time: self.settings.hold_time.as_secs() as u16,
            local_v4: Some(self.router_id),
            local_v6: self.local_v6,
            blocks: announced,
            peers: self.settings.peers.clone(),
        }
    }

    /// At the agent's start: gives a bird that answers the configuration (bird changes only
    /// what differs, so its sessions stay up), or starts one. A configuration bird rejects, or a
    /// bird that cannot be started, is fatal at start; a bird that hangs is the next passes'
    /// business (the caller logs it and carries on).
    pub async fn start(&self, blocks: &[IpNetwork]) -> Result<Synced, BgpError> {
        let mut applied = self.applied.lock().await;
        let spec = self.spec(blocks);
        let text = render::render(&spec);
        self.write(&text)?;
        let synced = match self.control.ping().await {
            Ok(()) => {
                self.apply().await?;
                Synced::Adopted
            }
            Err(ControlError::NotRunning { .. }) => {
                self.launch().await?;
                Synced::Started
            }
            Err(e) => return Err(e.into()),
        };
        *applied = Some((text, spec.blocks));
        Ok(synced)
    }

    /// Brings bird to the configuration for `blocks`: reconfigures it when that changed, and
    /// (with `check_alive`, on full passes) starts it again when it is gone.
    pub async fn sync(&self, blocks: &[IpNetwork], check_alive: bool) -> Result<Synced, BgpError> {
        let mut applied = self.applied.lock().await;
        let spec = self.spec(blocks);
        let text = render::render(&spec);
        let changed = applied.as_ref().is_none_or(|(t, _)| *t != text);
        let mut outcome = Synced::Unchanged;
        let answering = match check_alive {
            true => self.control.ping().await,
            false => Ok(()),
        };
        match answering {
            Err(ControlError::NotRunning { .. }) => {
                self.write(&text)?;
                self.launch().await?;
                outcome = Synced::Started;
            }
            Err(e) => return Err(e.into()),
            Ok(()) if changed => {
                self.write(&text)?;
                match self.apply().await {
                    Err(BgpError::Control(ControlError::NotRunning { .. })) => {
                        self.launch().await?;
                        outcome = Synced::Started;
                    }
                    other => {
                        other?;
                        outcome = Synced::Reconfigured;
                    }
                }
            }
            Ok(()) => {}
        }
        *applied = Some((text, spec.blocks));
        Ok(outcome)
    }

    fn write(&self, text: &str) -> Result<(), BgpError> {
        daemon::write_config(&self.files.config, text).map_err(|source| BgpError::Files {
            path: self.files.config.clone(),
            source,
        })?;
        Ok(())
    }

    /// `configure check`, then `configure`: a configuration bird rejects is never applied.
    async fn apply(&self) -> Result<(), BgpError> {
        self.control.check(&self.files.config).await?;
        self.control.configure(&self.files.config).await?;
        Ok(())
    }

    async fn launch(&self) -> Result<(), BgpError> {
        daemon::parse_check(&self.bird, &self.files.config).await?;
        daemon::start(&self.bird, &self.files).await
    }

    /// The sessions as bird reports them now.
    pub async fn status(&self) -> BgpStatus {
        let control = BirdControl {
            timeout: Duration::from_secs(1),
            ..self.control.clone()
        };
        let rows = control.protocols().await.map_err(|e| e.to_string());
        let sessions = self
            .settings
            .peers
            .iter()
            .map(|peer| {
                let name = render::peer_protocol(peer.address);
                let row = rows
                    .as_ref()
                    .map(|rows| rows.iter().find(|r| r.name == name));
                let (state, info, since) = match row {
                    Ok(Some(row)) => {
                        let (state, info) = row.session();
                        (state, info, row.since)
                    }
                    Ok(None) => ("Unknown".into(), format!("bird has no {name}"), None),
                    Err(e) => ("Unknown".into(), e.clone(), None),
                };
                SessionStatus {
                    address: peer.address,
                    asn: peer.asn,
                    state,
                    info,
                    since,
                }
            })
            .collect();
        let announced = match &*self.applied.lock().await {
            Some((_, blocks)) => blocks.clone(),
            None => vec![],
        };
        BgpStatus {
            asn: self.settings.asn,
            router_id: self.router_id,
            daemon: rows.map(|_| ()),
            sessions,
            announced,
        }
    }
}

/// The reconciler's hook: brings bird's announcements to this host's blocks in the cluster
/// view. Only a changed configuration is written and applied; full passes also make sure bird
/// runs. It works beside the reconciler, one sync at a time, so a hung bird never holds up
/// routes; requests that come meanwhile are folded into one more sync. Failures are logged and
/// tried again at the next pass.
pub fn sync(ctx: &Arc<Context>, full: bool) {
    let Some(speaker) = ctx.bgp.get() else {
        return;
    };
    speaker.wanted.fetch_or(full, Ordering::SeqCst);
    speaker.pending.store(true, Ordering::SeqCst);
    if speaker.working.swap(true, Ordering::SeqCst) {
        return;
    }
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let Some(speaker) = ctx.bgp.get() else {
            return;
        };
        loop {
            if !speaker.pending.swap(false, Ordering::SeqCst) {
                speaker.working.store(false, Ordering::SeqCst);
                // A request between the swap and the store found us working: take it.
                match speaker.pending.load(Ordering::SeqCst)
                    && !speaker.working.swap(true, Ordering::SeqCst)
                {
                    true => continue,
                    false => return,
                }
            }
            let full = speaker.wanted.swap(false, Ordering::SeqCst);
            let blocks = ctx.cluster.blocks_of(ctx.me());
            match speaker.sync(&blocks, full).await {
                Ok(Synced::Unchanged) => {}
                Ok(synced) => info!(?synced, blocks = ?blocks, "bgp announcements updated"),
                Err(e) => warn!(error = %e, "bgp: cannot bring bird up to date; trying again"),
            }
        }
    });
}

/// Session states every scrape shows, so that a state's series does not come and go.
const STATES: [&str; 7] = [
    "Established",
    "Idle",
    "Connect",
    "Active",
    "OpenSent",
    "OpenConfirm",
    "Unknown",
];

/// How many sessions are in each state: the usual states always (0 included), others as met.
pub fn sessions_by_state(sessions: &[SessionStatus]) -> Vec<(String, usize)> {
    let mut counts: Vec<(String, usize)> = STATES.iter().map(|s| (s.to_string(), 0)).collect();
    for session in sessions {
        match counts.iter_mut().find(|(state, _)| *state == session.state) {
            Some((_, n)) => *n += 1,
            None => counts.push((session.state.clone(), 1)),
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn speaker(v6: Option<&str>) -> Speaker {
        let flags = [
            "weft-agent",
            "--host-name",
            "h1",
            "--bgp",
            "--bgp-peer",
            "198.51.100.100:64513",
        ];
        let config = crate::config::Config::load(crate::config::Flags::parse_from(flags)).unwrap();
        Speaker::new(
            &config.bgp,
            "/usr/sbin/bird".into(),
            "198.51.100.1".parse().unwrap(),
            v6.map(|a| a.parse().unwrap()),
        )
        .unwrap()
    }

    fn blocks(list: &[&str]) -> Vec<IpNetwork> {
        list.iter().map(|b| b.parse().unwrap()).collect()
    }

    #[test]
    fn an_ipv4_only_host_announces_ipv4_blocks_alone_as_before() {
        let spec = speaker(None).spec(&blocks(&["10.65.0.64/26", "fd65::/122", "10.65.0.0/26"]));
        assert_eq!(spec.local_v6, None);
        assert_eq!(spec.blocks, blocks(&["10.65.0.0/26", "10.65.0.64/26"]));
        let text = render::render(&spec);
        assert!(!text.contains("ipv6"), "{text}");
    }

    #[test]
    fn a_dual_stack_host_announces_both_families_with_its_ipv6_underlay_as_next_hop() {
        let spec = speaker(Some("2001:db8:100::1")).spec(&blocks(&["fd65::/122", "10.65.0.0/26"]));
        assert_eq!(spec.local_v6, Some("2001:db8:100::1".parse().unwrap()));
        assert_eq!(spec.local_v4, Some("198.51.100.1".parse().unwrap()));
        assert_eq!(spec.blocks, blocks(&["10.65.0.0/26", "fd65::/122"]));
        let text = render::render(&spec);
        assert!(text.contains("route fd65::/122 blackhole;"), "{text}");
        assert!(text.contains("next hop address 2001:db8:100::1;"), "{text}");
    }

    #[test]
    fn the_ipv6_next_hop_is_the_registered_address_of_a_host_with_an_ipv6_pool() {
        let mut host = HostRecord {
            underlay_ip: "198.51.100.1".parse().unwrap(),
            version: "test".into(),
            first_seen: 0,
            underlay_prefix: Some(24),
            vtep_mac: None,
            tunnel_ip: None,
            underlay_ipv6: Some("2001:db8:100::1".parse().unwrap()),
        };
        let expected: Ipv6Addr = "2001:db8:100::1".parse().unwrap();
        assert_eq!(announced_v6_next_hop(true, &host), Some(expected));
        // No IPv6 pool: the IPv6 underlay address is not used (the configuration stays as an
        // IPv4-only host's, so sessions are not reset).
        assert_eq!(announced_v6_next_hop(false, &host), None);
        host.underlay_ipv6 = None;
        assert_eq!(announced_v6_next_hop(true, &host), None);
    }

    #[test]
    fn sessions_are_counted_by_state() {
        let session = |state: &str| SessionStatus {
            address: "198.51.100.100".parse().unwrap(),
            asn: Asn::new(64513).unwrap(),
            state: state.into(),
            info: String::new(),
            since: None,
        };
        let counts = sessions_by_state(&[
            session("Established"),
            session("Established"),
            session("Active"),
            session("Close"),
        ]);
        let shown: Vec<String> = counts.iter().map(|(s, n)| format!("{s}={n}")).collect();
        assert_eq!(
            shown,
            [
                "Established=2",
                "Idle=0",
                "Connect=0",
                "Active=1",
                "OpenSent=0",
                "OpenConfirm=0",
                "Unknown=0",
                "Close=1"
            ]
        );
    }
}
