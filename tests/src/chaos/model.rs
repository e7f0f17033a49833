//! The run's model of what should be attached, and what each answer may be.

use std::collections::BTreeMap;
use std::fmt;

use crate::invariants::{ports_text, Endpoint, Port, Snapshot, Violation};

use super::*;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Key {
    Agent(String),
    Cni { pod: usize, net: usize },
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Agent(id) => write!(f, "{id}"),
            Key::Cni { pod, net } => write!(f, "pod{pod} on {}", NETWORKS[*net].0),
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct Entry {
    /// None: unknown (an operation ended in a way that leaves it open).
    pub(super) ports: Option<Vec<Port>>,
    /// False when it may or may not exist; the next quiet point settles it.
    pub(super) sure: bool,
    /// The operation that made it so.
    pub(super) why: String,
}

#[derive(Debug, Default)]
pub(super) struct Model {
    pub(super) hosts: Vec<BTreeMap<Key, Entry>>,
}

/// The kinds of answer the contract distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Ok,
    AlreadyExists,
    Unavailable,
    Other,
}

pub(super) struct Outcome {
    pub(super) kind: Kind,
    pub(super) text: String,
}

impl Outcome {
    pub(super) fn new(kind: Kind, text: impl Into<String>) -> Self {
        Self {
            kind,
            text: text.into(),
        }
    }

    pub(super) fn from_status(status: &tonic::Status) -> Self {
        let kind = match status.code() {
            tonic::Code::AlreadyExists => Kind::AlreadyExists,
            tonic::Code::Unavailable => Kind::Unavailable,
            _ => Kind::Other,
        };
        Self::new(kind, format!("{:?}: {}", status.code(), status.message()))
    }
}

pub(super) fn kinds_text(kinds: &[Kind]) -> String {
    kinds
        .iter()
        .map(|k| format!("{k:?}"))
        .collect::<Vec<_>>()
        .join(" or ")
}

impl Model {
    pub(super) fn new(hosts: usize) -> Self {
        Self {
            hosts: vec![BTreeMap::new(); hosts],
        }
    }

    /// (a sure conflict, a possible one) of `ports` with the other attachments of the host.
    pub(super) fn conflicts(&self, host: usize, key: &Key, ports: &[Port]) -> (bool, bool) {
        let (mut sure, mut maybe) = (false, false);
        for (k, e) in &self.hosts[host] {
            if k == key {
                continue;
            }
            let overlap = match &e.ports {
                Some(theirs) => theirs.iter().any(|t| {
                    ports
                        .iter()
                        .any(|p| p.protocol == t.protocol && p.host_port == t.host_port)
                }),
                None => !ports.is_empty(),
            };
            if overlap && e.sure && e.ports.is_some() {
                sure = true;
            } else if overlap {
                maybe = true;
            }
        }
        (sure, maybe)
    }

    /// What an attach (or CNI ADD) may answer.
    pub(super) fn expect_attach(
        &self,
        host: usize,
        key: &Key,
        ports: &[Port],
        reachable: bool,
    ) -> Vec<Kind> {
        let (sure, maybe) = self.conflicts(host, key, ports);
        let existing = self.hosts[host].get(key);
        let mut allowed = vec![];
        if reachable {
            if !sure {
                allowed.push(Kind::Ok);
            }
            if sure || maybe {
                allowed.push(Kind::AlreadyExists);
            }
        } else {
            allowed.push(Kind::Unavailable);
            if sure || maybe {
                allowed.push(Kind::AlreadyExists);
            }
            // A repair of what exists needs no etcd.
            if existing.is_some_and(|e| !e.sure || e.ports.as_deref().is_none_or(|p| p == ports)) {
                allowed.push(Kind::Ok);
            }
        }
        allowed
    }

    pub(super) fn apply_attach(
        &mut self,
        host: usize,
        key: Key,
        ports: &[Port],
        outcome: Kind,
        ok: bool,
        why: &str,
    ) {
        let entries = &mut self.hosts[host];
        if !ok {
            // Nobody knows what an unexpected answer left behind.
            entries.insert(
                key,
                Entry {
                    ports: None,
                    sure: false,
                    why: why.into(),
                },
            );
            return;
        }
        if outcome == Kind::Ok {
            entries.insert(
                key,
                Entry {
                    ports: Some(ports.to_vec()),
                    sure: true,
                    why: why.into(),
                },
            );
        }
    }

    pub(super) fn expect_detach(&self, host: usize, key: &Key, reachable: bool) -> Vec<Kind> {
        match (reachable, self.hosts[host].get(key)) {
            (true, _) => vec![Kind::Ok],
            (false, Some(e)) if e.sure => vec![Kind::Unavailable],
            (false, _) => vec![Kind::Unavailable, Kind::Ok],
        }
    }

    pub(super) fn apply_detach(
        &mut self,
        host: usize,
        key: Key,
        outcome: Kind,
        ok: bool,
        why: &str,
    ) {
        if !ok {
            self.unsettle(host, key, why);
        } else if outcome == Kind::Ok {
            self.hosts[host].remove(&key);
        }
    }

    pub(super) fn unsettle(&mut self, host: usize, key: Key, why: &str) {
        self.hosts[host].insert(
            key,
            Entry {
                ports: None,
                sure: false,
                why: why.into(),
            },
        );
    }

    /// Which listed endpoints an entry is.
    pub(super) fn matches(key: &Key, e: &Endpoint, pods: &PodNames, host: usize) -> bool {
        match key {
            Key::Agent(id) => e.id == *id,
            Key::Cni { pod, net } => {
                e.netns == pods.path(host, *pod) && e.ifname == NETWORKS[*net].1
            }
        }
    }

    /// The model against the endpoints the snapshot shows.
    pub(super) fn check(&self, snap: &Snapshot, pods: &PodNames) -> Vec<Violation> {
        let mut v = vec![];
        for (host, entries) in self.hosts.iter().enumerate() {
            let name = &snap.hosts[host].name;
            let listed = snap.endpoints_of(host);
            let mut claimed = vec![false; listed.len()];
            for (key, entry) in entries {
                let found: Vec<usize> = (0..listed.len())
                    .filter(|&i| Self::matches(key, &listed[i], pods, host))
                    .collect();
                for &i in &found {
                    claimed[i] = true;
                }
                if found.len() > 1 {
                    v.push(Violation::new(
                        name,
                        format!("model: endpoint {key}"),
                        "one endpoint",
                        found
                            .iter()
                            .map(|&i| listed[i].id.clone())
                            .collect::<Vec<_>>()
                            .join(", "),
                    ));
                }
                if !entry.sure {
                    continue;
                }
                match found.first() {
                    None => v.push(Violation::new(
                        name,
                        format!("model: endpoint {key}"),
                        format!("attached (after {})", entry.why),
                        "not attached",
                    )),
                    Some(&i) => {
                        if let Some(ports) = &entry.ports {
                            if *ports != listed[i].ports {
                                v.push(Violation::new(
                                    name,
                                    format!("model: endpoint {key} ({}) ports", listed[i].id),
                                    format!("{} (after {})", ports_text(ports), entry.why),
                                    ports_text(&listed[i].ports),
                                ));
                            }
                        }
                    }
                }
            }
            for (i, e) in listed.iter().enumerate() {
                if !claimed[i] {
                    v.push(Violation::new(
                        name,
                        format!("model: endpoint {} ({})", e.id, e.ip),
                        "not attached (no operation left it attached)",
                        "attached",
                    ));
                }
            }
        }
        v
    }

    /// Settles open entries from what a quiet lab shows.
    pub(super) fn settle(&mut self, snap: &Snapshot, pods: &PodNames) {
        for (host, entries) in self.hosts.iter_mut().enumerate() {
            let listed = snap.endpoints_of(host);
            entries.retain(|key, entry| {
                if entry.sure {
                    return true;
                }
                match listed.iter().find(|e| Self::matches(key, e, pods, host)) {
                    Some(e) => {
                        entry.ports = Some(e.ports.clone());
                        entry.sure = true;
                        entry.why = format!("{} (settled: it exists)", entry.why);
                        true
                    }
                    None => false,
                }
            });
        }
    }

    /// Takes whatever the lab shows as the truth (after a failure, to look for more).
    pub(super) fn rebase(&mut self, snap: &Snapshot, pods: &PodNames) {
        for (host, entries) in self.hosts.iter_mut().enumerate() {
            entries.clear();
            for e in snap.endpoints_of(host) {
                let key = (0..PODS)
                    .find(|&pod| e.netns == pods.path(host, pod))
                    .and_then(|pod| {
                        let net = NETWORKS.iter().position(|n| n.1 == e.ifname)?;
                        Some(Key::Cni { pod, net })
                    })
                    .unwrap_or_else(|| Key::Agent(e.id.clone()));
                entries.insert(
                    key,
                    Entry {
                        ports: Some(e.ports.clone()),
                        sure: true,
                        why: "re-based on the lab after a failure".into(),
                    },
                );
            }
        }
    }
}
