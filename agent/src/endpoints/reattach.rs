//! An attach of a container that is already attached: the same request repairs and returns the
//! endpoint; other ports or labels are applied; another namespace is wired into when the old one is gone;
//! anything else is refused with the difference named. Never success with nothing done.

use std::collections::BTreeSet;

use tracing::info;
use weft_etcd::records::EndpointRecord;

use super::attach::{udp_ports, wire};
use super::error::EndpointError;
use super::repair;
use crate::context::Context;
use crate::firewall::SyncMode;
use crate::model::{AttachRequest, NetnsSpec};

/// How the namespace a repeated attach names compares with the recorded one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Namespace {
    Same,
    Other { path: String, recorded_alive: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reattach {
    /// Nothing differs: repair and return the endpoint.
    Same,
    /// A difference that cannot be applied to a live attachment.
    Refuse(String),
    /// New ports, new labels, and a new namespace to wire into when the recorded one is gone.
    Change {
        ports: bool,
        labels: bool,
        netns: Option<String>,
    },
}

pub fn plan(existing: &EndpointRecord, request: &AttachRequest, namespace: &Namespace) -> Reattach {
    let id = &existing.container_id;
    if existing.ifname != request.ifname.as_str() {
        return Reattach::Refuse(format!(
            "container {id} is attached with ifname {}, not {}; detach it first to change the \
             interface",
            existing.ifname, request.ifname
        ));
    }
    for wanted in &request.ips {
        let family = existing.address_of(wanted.is_ipv4());
        if family != Some(*wanted) {
            let has = match family {
                Some(ip) => format!("address {ip}"),
                None => format!(
                    "no {} address",
                    if wanted.is_ipv4() { "IPv4" } else { "IPv6" }
                ),
            };
            return Reattach::Refuse(format!(
                "container {id} is attached with {has}, not {wanted}; detach it first to \
                 change its address"
            ));
        }
    }
    let netns = match namespace {
        Namespace::Same => None,
        Namespace::Other {
            path,
            recorded_alive: true,
        } => {
            return Reattach::Refuse(format!(
                "container {id} is attached in netns {}, which still exists, not in {path}; \
                 detach it first to move it",
                existing.netns
            ))
        }
        Namespace::Other { path, .. } => Some(path.clone()),
    };
    let set =
        |ports: &[weft_etcd::records::PortRecord]| ports.iter().copied().collect::<BTreeSet<_>>();
    let ports = set(&existing.ports) != set(&request.ports);
    let labels = existing.labels != request.labels;
    match (ports, labels, &netns) {
        (false, false, None) => Reattach::Same,
        _ => Reattach::Change {
            ports,
            labels,
            netns,
        },
    }
}

/// Compares the namespace of the request with the recorded one: by path, then by identity (a
/// namespace can be reached by several paths).
fn compare(ctx: &Context, existing: &EndpointRecord, request: &AttachRequest) -> Namespace {
    let path = match &request.netns {
        NetnsSpec::Owned if existing.owns_netns => return Namespace::Same,
        NetnsSpec::Owned => ctx.owned_netns_path(&request.container_id),
        NetnsSpec::Path(path) => path.clone(),
        NetnsSpec::Pid(pid) => format!("/proc/{pid}/ns/net"),
    };
    if path == existing.netns {
        return Namespace::Same;
    }
    let recorded = ctx.kernel.vet_netns(&existing.netns);
    match (&recorded, ctx.kernel.vet_netns(&path)) {
        (Ok(a), Ok(b)) if *a == b => Namespace::Same,
        _ => Namespace::Other {
            path,
            recorded_alive: recorded.is_ok(),
        },
    }
}

pub async fn reattach(
    ctx: &Context,
    existing: EndpointRecord,
    request: &AttachRequest,
) -> Result<EndpointRecord, EndpointError> {
    match plan(&existing, request, &compare(ctx, &existing, request)) {
        Reattach::Same => {
            repair::repair(ctx, &existing).await?;
            Ok(existing)
        }
        Reattach::Refuse(difference) => Err(EndpointError::Differs(difference)),
        Reattach::Change {
            ports,
            labels,
            netns,
        } => change(ctx, existing, request, (ports, labels), netns).await,
    }
}

async fn change(
    ctx: &Context,
    existing: EndpointRecord,
    request: &AttachRequest,
    changed: (bool, bool),
    netns: Option<String>,
) -> Result<EndpointRecord, EndpointError> {
    let added: Vec<_> = request
        .ports
        .iter()
        .filter(|p| {
            !existing
                .ports
                .iter()
                .any(|o| o.protocol == p.protocol && o.host_port == p.host_port)
        })
        .copied()
        .collect();
    super::attach::refuse_host_listeners(ctx, &added)?;
    let mut record = existing.clone();
    record.ports = request.ports.clone();
    record.labels = request.labels.clone();
    if let Some(path) = &netns {
        ctx.kernel.vet_netns(path)?;
        record.netns = path.clone();
        record.owns_netns = false;
    }
    ctx.store.update_endpoint(&existing, &record).await?;
    ctx.endpoints.insert(record.clone());
    if let Err(e) = ctx.journal.write(&record) {
        tracing::warn!(container = %record.container_id, error = %e, "cannot update the journal");
    }
    if netns.is_some() {
        let link = super::link_of(ctx, &record)?;
        ctx.kernel.delete_link(&record.host_ifname).await?;
        wire(ctx, &record, &link).await?;
    }
    match changed {
        // Ports shape the firewall (and labels policy): both applied in one sync.
        (true, _) => {
            crate::policy::sync(ctx, SyncMode::Fast).await?;
            let mut udp = udp_ports(&existing);
            udp.extend(udp_ports(&record));
            ctx.firewall.flush_udp(udp).await;
        }
        // New labels: the endpoint joins its new profiles (before it leaves the old ones), its
        // address moves between selector sets on every host as the watch brings the record, and
        // a full sync soon drops the chains and sets no endpoint uses any more.
        (false, true) => {
            crate::policy::police_first(ctx, &record).await?;
            ctx.policy.request_sync();
        }
        (false, false) => {}
    }
    info!(container = %record.container_id, ports = ?record.ports, labels = ?record.labels, netns = %record.netns, "attachment changed");
    repair::repair(ctx, &record).await?;
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::port_mapping;

    fn existing() -> EndpointRecord {
        EndpointRecord {
            container_id: "web".into(),
            host: "h1".into(),
            ip: "10.65.0.5".parse().unwrap(),
            host_ifname: "weft1".into(),
            ifname: "eth0".into(),
            mac: "02:00:00:00:00:01".into(),
            netns: "/run/netns/a".into(),
            owns_netns: false,
            ports: vec![port_mapping("tcp", 8080, 80).unwrap()],
            created: 0,
            secondary: false,
            labels: Default::default(),
            ipv6: None,
        }
    }

    fn request(netns: &str, ifname: &str, ports: &[(u32, u32)]) -> AttachRequest {
        let ports = ports
            .iter()
            .map(|(h, c)| port_mapping("tcp", *h, *c).unwrap())
            .collect();
        AttachRequest::new("web", netns, None, ifname, ports).unwrap()
    }

    #[test]
    fn each_difference_is_applied_or_refused() {
        let e = existing();
        let same = Namespace::Same;
        let gone = Namespace::Other {
            path: "/run/netns/b".into(),
            recorded_alive: false,
        };
        let alive = Namespace::Other {
            path: "/run/netns/b".into(),
            recorded_alive: true,
        };
        let req = request("/run/netns/a", "", &[(8080, 80)]);
        assert_eq!(plan(&e, &req, &same), Reattach::Same);
        assert_eq!(
            plan(&e, &request("/run/netns/a", "", &[(9090, 80)]), &same),
            Reattach::Change {
                ports: true,
                labels: false,
                netns: None
            }
        );
        let relabelled = req
            .clone()
            .with_labels([("app".to_string(), "db".to_string())].into())
            .unwrap();
        assert_eq!(
            plan(&e, &relabelled, &same),
            Reattach::Change {
                ports: false,
                labels: true,
                netns: None
            }
        );
        assert_eq!(
            plan(&e, &req, &gone),
            Reattach::Change {
                ports: false,
                labels: false,
                netns: Some("/run/netns/b".into())
            }
        );
        let refused = |r: Reattach, word: &str| match r {
            Reattach::Refuse(why) => assert!(why.contains(word), "{why}"),
            other => panic!("not refused: {other:?}"),
        };
        refused(plan(&e, &req, &alive), "netns");
        let asked = |ip: &str| req.clone().with_ips(&[ip]).unwrap();
        assert_eq!(plan(&e, &asked("10.65.0.5"), &same), Reattach::Same);
        refused(plan(&e, &asked("10.65.0.6"), &same), "address");
        refused(plan(&e, &asked("fd65::5"), &same), "no IPv6 address");
        // A dual-stack endpoint: every requested address must be its address of that family.
        let dual = EndpointRecord {
            ipv6: Some("fd65::5".parse().unwrap()),
            ..e.clone()
        };
        let pair = |v4: &str, v6: &str| req.clone().with_ips(&[v4, v6]).unwrap();
        assert_eq!(
            plan(&dual, &pair("10.65.0.5", "fd65::5"), &same),
            Reattach::Same
        );
        assert_eq!(plan(&dual, &asked("fd65::5"), &same), Reattach::Same);
        refused(plan(&dual, &pair("10.65.0.5", "fd65::6"), &same), "fd65::5");
        refused(plan(&dual, &asked("fd65::6"), &same), "not fd65::6");
        refused(
            plan(&e, &request("/run/netns/a", "net1", &[(8080, 80)]), &same),
            "ifname",
        );
    }
}
