//! Network policy as stored under `policies/<name>`: the validated domain values, their JSON
//! form (the format `weftctl policy apply` reads, and the stored record), label rules and the
//! selector language. Parsed once at the edge (`parse`), with errors that name the field. Pure.

pub mod labels;
mod parse;
pub mod selector;

use std::cmp::Ordering;
use std::fmt;

use ipnetwork::IpNetwork;
use serde_json::{json, Map, Value};

pub use labels::{parse_label, validate_labels, LabelError};
pub use parse::{policies_from_value, policy_from_value};
pub use selector::{Selector, SelectorError};

/// Most rules (ingress and egress together) one policy may hold. A larger policy is refused:
/// each rule becomes iptables rules on every host that enforces it.
pub const MAX_RULES: usize = 1000;
/// Most entries in one rule's `ports` or `nets` list.
pub const MAX_LIST: usize = 256;
/// Most policies one `apply` writes: they go in one etcd transaction, and etcd allows 128
/// operations per transaction by default.
pub const MAX_APPLY: usize = 128;

/// A policy field that is wrong, named by its path (`ingress[0].destination.ports[1]`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct PolicyError {
    pub field: String,
    pub reason: String,
}

impl PolicyError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RuleProtocol {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
}

impl RuleProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleProtocol::Tcp => "tcp",
            RuleProtocol::Udp => "udp",
            RuleProtocol::Icmp => "icmp",
            RuleProtocol::Icmpv6 => "icmpv6",
        }
    }

    /// Whether `ports` may be given with this protocol.
    pub fn has_ports(self) -> bool {
        matches!(self, RuleProtocol::Tcp | RuleProtocol::Udp)
    }
}

impl fmt::Display for RuleProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A port or an inclusive range of ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.lo == self.hi {
            true => write!(f, "{}", self.lo),
            false => write!(f, "{}:{}", self.lo, self.hi),
        }
    }
}

/// One side of a rule (`source` or `destination`): every criterion given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Peer {
    pub selector: Option<Selector>,
    /// Networks, in both families, host bits cleared; sorted.
    pub nets: Vec<IpNetwork>,
    pub ports: Vec<PortRange>,
}

impl Peer {
    pub fn is_empty(&self) -> bool {
        self.selector.is_none() && self.nets.is_empty() && self.ports.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    pub action: Action,
    /// None: any protocol.
    pub protocol: Option<RuleProtocol>,
    pub source: Peer,
    pub destination: Peer,
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub name: String,
    /// Ascending order applies first; None comes after every ordered policy.
    pub order: Option<f64>,
    pub selector: Selector,
    /// None: the policy does not cover ingress; Some(empty): it covers it and allows nothing.
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

impl Policy {
    /// The order policies apply in: ascending `order` (absent last), ties by name.
    pub fn apply_order(&self, other: &Policy) -> Ordering {
        let key = |p: &Policy| p.order.unwrap_or(f64::INFINITY);
        key(self)
            .total_cmp(&key(other))
            .then_with(|| self.name.cmp(&other.name))
    }

    pub fn rule_count(&self) -> usize {
        self.ingress.as_ref().map_or(0, Vec::len) + self.egress.as_ref().map_or(0, Vec::len)
    }

    /// The JSON form: what `policy get` prints and what is stored; parses back to the same
    /// policy.
    pub fn to_json(&self) -> Value {
        let mut doc = Map::new();
        doc.insert("name".into(), json!(self.name));
        if let Some(order) = self.order {
            doc.insert("order".into(), order_json(order));
        }
        doc.insert("selector".into(), json!(self.selector.to_string()));
        if let Some(rules) = &self.ingress {
            doc.insert("ingress".into(), rules.iter().map(rule_json).collect());
        }
        if let Some(rules) = &self.egress {
            doc.insert("egress".into(), rules.iter().map(rule_json).collect());
        }
        Value::Object(doc)
    }
}

/// Whole orders print as integers (`100`, not `100.0`).
fn order_json(order: f64) -> Value {
    if order.fract() == 0.0 && order.abs() < 1e15 {
        json!(order as i64)
    } else {
        json!(order)
    }
}

fn rule_json(rule: &Rule) -> Value {
    let mut doc = Map::new();
    let action = match rule.action {
        Action::Allow => "allow",
        Action::Deny => "deny",
    };
    doc.insert("action".into(), json!(action));
    if let Some(protocol) = rule.protocol {
        doc.insert("protocol".into(), json!(protocol.as_str()));
    }
    for (key, peer) in [("source", &rule.source), ("destination", &rule.destination)] {
        if !peer.is_empty() {
            doc.insert(key.into(), peer_json(peer));
        }
    }
    Value::Object(doc)
}

fn peer_json(peer: &Peer) -> Value {
    let mut doc = Map::new();
    if let Some(selector) = &peer.selector {
        doc.insert("selector".into(), json!(selector.to_string()));
    }
    if !peer.nets.is_empty() {
        let nets: Vec<String> = peer.nets.iter().map(|n| n.to_string()).collect();
        doc.insert("nets".into(), json!(nets));
    }
    if !peer.ports.is_empty() {
        let ports: Vec<Value> = peer
            .ports
            .iter()
            .map(|p| match p.lo == p.hi {
                true => json!(p.lo),
                false => json!(p.to_string()),
            })
            .collect();
        doc.insert("ports".into(), Value::Array(ports));
    }
    Value::Object(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{
      "name": "web",
      "order": 100,
      "selector": "app == 'web'",
      "ingress": [
        {"action": "allow", "protocol": "tcp",
         "source": {"selector": "role == 'frontend'"},
         "destination": {"ports": [80, "8000:8080"]}},
        {"action": "allow", "protocol": "tcp", "source": {"nets": ["203.0.113.0/24"]}}
      ],
      "egress": [
        {"action": "deny", "destination": {"nets": ["203.0.113.0/24"]}},
        {"action": "allow"}
      ]
    }"#;

    #[test]
    fn the_issue_example_parses_and_round_trips() {
        let value: Value = serde_json::from_str(EXAMPLE).unwrap();
        let policy = policy_from_value(&value, "").unwrap();
        assert_eq!(policy.name, "web");
        assert_eq!(policy.order, Some(100.0));
        let ingress = policy.ingress.as_ref().unwrap();
        assert_eq!(ingress[0].destination.ports.len(), 2);
        assert_eq!(
            ingress[0].destination.ports[1],
            PortRange { lo: 8000, hi: 8080 }
        );
        assert_eq!(policy.egress.as_ref().unwrap()[1].protocol, None);
        let again = policy_from_value(&policy.to_json(), "").unwrap();
        assert_eq!(again, policy);
        assert_eq!(policy.to_json()["order"], json!(100));
    }

    #[test]
    fn policies_apply_in_order_then_by_name() {
        let p = |name: &str, order: Option<f64>| Policy {
            name: name.into(),
            order,
            selector: Selector::All,
            ingress: None,
            egress: None,
        };
        let mut all = [
            p("z", None),
            p("b", Some(10.0)),
            p("a", Some(10.0)),
            p("c", Some(-1.5)),
        ];
        all.sort_by(|a, b| a.apply_order(b));
        let names: Vec<&str> = all.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["c", "a", "b", "z"]);
    }
}
