//! What network policy needs to know of the whole fabric: every endpoint of every host (its
//! addresses and labels) and every policy. Built from a snapshot and kept current by watch
//! events, like the cluster view. Pure.

use std::collections::BTreeMap;

use crate::policy::Policy;
use crate::records::EndpointRecord;

/// One change seen on `endpoints/` or `policies/`.
#[derive(Debug, Clone, PartialEq)]
pub enum FabricEvent {
    EndpointPut(Box<EndpointRecord>),
    EndpointDeleted { host: String, container_id: String },
    PolicyPut(Box<Policy>),
    PolicyDeleted(String),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct FabricView {
    /// By (host, container id).
    pub endpoints: BTreeMap<(String, String), EndpointRecord>,
    /// By name.
    pub policies: BTreeMap<String, Policy>,
    /// The etcd revision this view reflects.
    pub revision: i64,
}

impl FabricView {
    pub fn apply(&mut self, event: FabricEvent) {
        match event {
            FabricEvent::EndpointPut(record) => {
                let key = (record.host.clone(), record.container_id.clone());
                self.endpoints.insert(key, *record);
            }
            FabricEvent::EndpointDeleted { host, container_id } => {
                self.endpoints.remove(&(host, container_id));
            }
            FabricEvent::PolicyPut(policy) => {
                self.policies.insert(policy.name.clone(), *policy);
            }
            FabricEvent::PolicyDeleted(name) => {
                self.policies.remove(&name);
            }
        }
    }

    /// Endpoints of every host but `me`.
    pub fn remote_endpoints<'v>(&'v self, me: &'v str) -> impl Iterator<Item = &'v EndpointRecord> {
        self.endpoints
            .iter()
            .filter(move |((host, _), _)| host != me)
            .map(|(_, e)| e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Selector;

    fn endpoint(host: &str, id: &str) -> EndpointRecord {
        serde_json::from_value(serde_json::json!({
            "container_id": id, "host": host, "ip": "10.65.0.1", "host_ifname": "weft0",
            "ifname": "eth0", "mac": "02:00:00:00:00:01", "netns": "/x", "owns_netns": false,
            "created": 0, "labels": {"app": "web"},
        }))
        .unwrap()
    }

    #[test]
    fn events_keep_the_view_current() {
        let mut view = FabricView::default();
        view.apply(FabricEvent::EndpointPut(Box::new(endpoint("h1", "a"))));
        view.apply(FabricEvent::EndpointPut(Box::new(endpoint("h2", "b"))));
        assert_eq!(view.remote_endpoints("h1").count(), 1);
        assert_eq!(
            view.endpoints[&("h1".into(), "a".into())].labels["app"],
            "web"
        );
        view.apply(FabricEvent::EndpointDeleted {
            host: "h2".into(),
            container_id: "b".into(),
        });
        assert_eq!(view.remote_endpoints("h1").count(), 0);
        let policy = Policy {
            name: "p".into(),
            order: None,
            selector: Selector::All,
            ingress: Some(vec![]),
            egress: None,
        };
        view.apply(FabricEvent::PolicyPut(Box::new(policy)));
        assert!(view.policies.contains_key("p"));
        view.apply(FabricEvent::PolicyDeleted("p".into()));
        assert!(view.policies.is_empty());
    }
}
