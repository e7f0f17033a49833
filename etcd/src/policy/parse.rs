//! Policies from their JSON form (YAML is turned into the same values by weftctl), checked field
//! by field: every error names the path of the field that is wrong. Unknown fields are errors,
//! not ignored: a misspelt `ingres` must not silently allow everything.

use ipnetwork::IpNetwork;
use serde_json::{Map, Value};

use super::{
    Action, Peer, Policy, PolicyError, PortRange, Rule, RuleProtocol, Selector, MAX_APPLY,
    MAX_LIST, MAX_RULES,
};
use crate::names::valid_name;

type Result<T> = std::result::Result<T, PolicyError>;

fn join(path: &str, field: &str) -> String {
    match path.is_empty() {
        true => field.to_string(),
        false => format!("{path}.{field}"),
    }
}

fn object<'v>(value: &'v Value, path: &str, known: &[&str]) -> Result<&'v Map<String, Value>> {
    let what = if path.is_empty() { "policy" } else { path };
    let map = value
        .as_object()
        .ok_or_else(|| PolicyError::new(what, "must be an object"))?;
    if let Some(unknown) = map.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(PolicyError::new(
            join(path, unknown),
            format!("unknown field; known fields: {}", known.join(", ")),
        ));
    }
    Ok(map)
}

fn string<'v>(value: &'v Value, path: &str) -> Result<&'v str> {
    value
        .as_str()
        .ok_or_else(|| PolicyError::new(path, "must be a string"))
}

fn array<'v>(value: &'v Value, path: &str) -> Result<&'v Vec<Value>> {
    value
        .as_array()
        .ok_or_else(|| PolicyError::new(path, "must be a list"))
}

/// One policy or a list of them (a file for `weftctl policy apply`). Names must be unique.
pub fn policies_from_value(value: &Value) -> Result<Vec<Policy>> {
    let policies = match value {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(PolicyError::new("policies", "the list is empty"));
            }
            if items.len() > MAX_APPLY {
                return Err(PolicyError::new(
                    "policies",
                    format!(
                        "{} policies in one file; at most {MAX_APPLY} are applied at once",
                        items.len()
                    ),
                ));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, item)| policy_from_value(item, &format!("[{i}]")))
                .collect::<Result<Vec<_>>>()?
        }
        single => vec![policy_from_value(single, "")?],
    };
    for (i, policy) in policies.iter().enumerate() {
        if policies[..i].iter().any(|p| p.name == policy.name) {
            return Err(PolicyError::new(
                format!("[{i}].name"),
                format!("policy {:?} is given twice", policy.name),
            ));
        }
    }
    Ok(policies)
}

/// One policy; `path` prefixes the fields named in errors.
pub fn policy_from_value(value: &Value, path: &str) -> Result<Policy> {
    let map = object(
        value,
        path,
        &["name", "order", "selector", "ingress", "egress"],
    )?;
    let field = |name: &str| join(path, name);
    let name = string(
        map.get("name")
            .ok_or_else(|| PolicyError::new(field("name"), "missing"))?,
        &field("name"),
    )?;
    if !valid_name(name) {
        return Err(PolicyError::new(
            field("name"),
            format!(
                "{name:?} is not 1-63 characters of [A-Za-z0-9_.-] starting with a letter or digit"
            ),
        ));
    }
    let order = match map.get("order") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_f64()
                .filter(|o| o.is_finite())
                .ok_or_else(|| PolicyError::new(field("order"), "must be a number"))?,
        ),
    };
    let selector = match map.get("selector") {
        None => {
            return Err(PolicyError::new(
                field("selector"),
                "missing (all() selects every endpoint)",
            ))
        }
        Some(v) => selector(v, &field("selector"))?,
    };
    let rules = |key: &str| -> Result<Option<Vec<Rule>>> {
        map.get(key)
            .map(|v| {
                let path = field(key);
                array(v, &path)?
                    .iter()
                    .enumerate()
                    .map(|(i, r)| rule(r, &format!("{path}[{i}]")))
                    .collect()
            })
            .transpose()
    };
    let count = |key: &str| map.get(key).and_then(Value::as_array).map_or(0, Vec::len);
    if count("ingress") + count("egress") > MAX_RULES {
        let key = if count("ingress") > count("egress") {
            "ingress"
        } else {
            "egress"
        };
        return Err(PolicyError::new(
            field(key),
            format!(
                "{} rules; a policy holds at most {MAX_RULES} (ingress and egress together)",
                count("ingress") + count("egress")
            ),
        ));
    }
    Ok(Policy {
        name: name.to_string(),
        order,
        selector,
        ingress: rules("ingress")?,
        egress: rules("egress")?,
    })
}

fn selector(value: &Value, path: &str) -> Result<Selector> {
    let text = string(value, path)?;
    Selector::parse(text).map_err(|e| PolicyError::new(path, format!("{text:?}: {e}")))
}

fn rule(value: &Value, path: &str) -> Result<Rule> {
    let map = object(
        value,
        path,
        &["action", "protocol", "source", "destination"],
    )?;
    let field = |name: &str| join(path, name);
    let action = match map.get("action").map(|v| string(v, &field("action"))) {
        None => return Err(PolicyError::new(field("action"), "missing: allow or deny")),
        Some(Err(e)) => return Err(e),
        Some(Ok("allow")) => Action::Allow,
        Some(Ok("deny")) => Action::Deny,
        Some(Ok(other)) => {
            return Err(PolicyError::new(
                field("action"),
                format!("{other:?} is not an action: allow or deny"),
            ))
        }
    };
    let protocol = match map.get("protocol") {
        None | Some(Value::Null) => None,
        Some(v) => Some(match string(v, &field("protocol"))? {
            "tcp" => RuleProtocol::Tcp,
            "udp" => RuleProtocol::Udp,
            "icmp" => RuleProtocol::Icmp,
            "icmpv6" => RuleProtocol::Icmpv6,
            other => {
                return Err(PolicyError::new(
                    field("protocol"),
                    format!("{other:?} is not a protocol: tcp, udp, icmp or icmpv6"),
                ))
            }
        }),
    };
    let peer_of = |key: &str| -> Result<Peer> {
        let peer = match map.get(key) {
            None => Peer::default(),
            Some(v) => peer(v, &field(key))?,
        };
        if !peer.ports.is_empty() && !protocol.is_some_and(RuleProtocol::has_ports) {
            return Err(PolicyError::new(
                join(&field(key), "ports"),
                "ports need \"protocol\": \"tcp\" or \"udp\"",
            ));
        }
        Ok(peer)
    };
    Ok(Rule {
        action,
        protocol,
        source: peer_of("source")?,
        destination: peer_of("destination")?,
    })
}

fn peer(value: &Value, path: &str) -> Result<Peer> {
    let map = object(value, path, &["selector", "nets", "ports"])?;
    let field = |name: &str| join(path, name);
    let list = |key: &str| -> Result<Vec<Value>> {
        match map.get(key) {
            None => Ok(vec![]),
            Some(v) => {
                let items = array(v, &field(key))?;
                if items.len() > MAX_LIST {
                    return Err(PolicyError::new(
                        field(key),
                        format!("{} entries; at most {MAX_LIST}", items.len()),
                    ));
                }
                Ok(items.clone())
            }
        }
    };
    let mut nets = vec![];
    for (i, v) in list("nets")?.iter().enumerate() {
        let path = format!("{}[{i}]", field("nets"));
        let text = string(v, &path)?;
        let net: IpNetwork = text
            .parse()
            .map_err(|_| PolicyError::new(&path, format!("{text:?} is not a CIDR")))?;
        nets.push(IpNetwork::new(net.network(), net.prefix()).expect("a network's own prefix"));
    }
    nets.sort();
    nets.dedup();
    let mut ports = vec![];
    for (i, v) in list("ports")?.iter().enumerate() {
        ports.push(port(v, &format!("{}[{i}]", field("ports")))?);
    }
    ports.sort();
    ports.dedup();
    Ok(Peer {
        selector: map
            .get("selector")
            .map(|v| selector(v, &field("selector")))
            .transpose()?,
        nets,
        ports,
    })
}

fn port(value: &Value, path: &str) -> Result<PortRange> {
    let number = |text: &str| -> Result<u16> {
        text.trim()
            .parse::<u32>()
            .ok()
            .filter(|p| (1..=65535).contains(p))
            .map(|p| p as u16)
            .ok_or_else(|| PolicyError::new(path, format!("{text:?} is not a port (1-65535)")))
    };
    match value {
        Value::Number(n) => {
            let single = number(&n.to_string())?;
            Ok(PortRange {
                lo: single,
                hi: single,
            })
        }
        Value::String(text) => {
            let (lo, hi) = text.split_once(':').unwrap_or((text, text));
            let (lo, hi) = (number(lo)?, number(hi)?);
            if lo > hi {
                return Err(PolicyError::new(
                    path,
                    format!("range {text:?} runs backwards"),
                ));
            }
            Ok(PortRange { lo, hi })
        }
        _ => Err(PolicyError::new(path, "must be a port number or \"lo:hi\"")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"name": "p", "selector": "all()", "ingress": [{"action": "allow"}]})
    }

    fn refused(doc: Value) -> PolicyError {
        policy_from_value(&doc, "").expect_err(&doc.to_string())
    }

    #[test]
    fn hostile_policies_are_refused_naming_the_field() {
        let rule = |r: Value| json!({"name": "p", "selector": "all()", "ingress": [r]});
        let cases: Vec<(Value, &str)> = vec![
            (
                json!({"name": "p", "selector": "app ==", "ingress": []}),
                "selector",
            ),
            (
                json!({"name": "p", "selector": "all()", "ingres": []}),
                "ingres",
            ),
            (json!({"name": "a/b", "selector": "all()"}), "name"),
            (json!({"selector": "all()"}), "name"),
            (json!({"name": "p"}), "selector"),
            (rule(json!({"action": "permit"})), "ingress[0].action"),
            (rule(json!({})), "ingress[0].action"),
            (
                rule(json!({"action": "allow", "colour": "red"})),
                "ingress[0].colour",
            ),
            (
                rule(json!({"action": "allow", "protocol": "sctp"})),
                "ingress[0].protocol",
            ),
            (
                rule(json!({"action": "allow", "protocol": "tcp", "destination": {"ports": [0]}})),
                "ingress[0].destination.ports[0]",
            ),
            (
                rule(
                    json!({"action": "allow", "protocol": "tcp", "destination": {"ports": [80, 65536]}}),
                ),
                "ingress[0].destination.ports[1]",
            ),
            (
                rule(json!({"action": "allow", "protocol": "udp", "source": {"ports": ["9:1"]}})),
                "ingress[0].source.ports[0]",
            ),
            (
                rule(json!({"action": "allow", "destination": {"ports": [80]}})),
                "ingress[0].destination.ports",
            ),
            (
                rule(
                    json!({"action": "allow", "protocol": "icmp", "destination": {"ports": [80]}}),
                ),
                "ingress[0].destination.ports",
            ),
            (
                rule(json!({"action": "deny", "source": {"nets": ["10.0.0.0/33"]}})),
                "ingress[0].source.nets[0]",
            ),
            (
                rule(json!({"action": "deny", "source": {"nets": ["nonsense"]}})),
                "ingress[0].source.nets[0]",
            ),
            (
                rule(json!({"action": "deny", "source": {"selector": "a in {"}})),
                "ingress[0].source.selector",
            ),
            (
                rule(json!({"action": "deny", "source": {"host": "x"}})),
                "ingress[0].source.host",
            ),
            (
                json!({"name": "p", "selector": "all()", "order": "first"}),
                "order",
            ),
            (
                json!({"name": "p", "selector": "all()", "egress": {}}),
                "egress",
            ),
        ];
        for (doc, field) in cases {
            assert_eq!(refused(doc.clone()).field, field, "{doc}");
        }
    }

    #[test]
    fn the_rule_limit_is_enforced() {
        let rules = |n: usize| vec![json!({"action": "allow"}); n];
        let mut doc = base();
        doc["ingress"] = json!(rules(MAX_RULES / 2));
        doc["egress"] = json!(rules(MAX_RULES / 2));
        assert_eq!(policy_from_value(&doc, "").unwrap().rule_count(), MAX_RULES);
        doc["ingress"] = json!(rules(10_000));
        let err = refused(doc);
        assert_eq!(err.field, "ingress");
        assert!(err.reason.contains("at most 1000"), "{err}");
    }

    #[test]
    fn lists_are_all_or_nothing_and_name_their_item() {
        let list = json!([base(), {"name": "q", "selector": "x =="}]);
        let err = policies_from_value(&list).unwrap_err();
        assert_eq!(err.field, "[1].selector");
        let twice = json!([base(), base()]);
        assert_eq!(policies_from_value(&twice).unwrap_err().field, "[1].name");
        assert_eq!(policies_from_value(&base()).unwrap().len(), 1);
        assert!(policies_from_value(&json!([])).is_err());
    }

    #[test]
    fn nets_are_normalized_and_directions_are_kept_apart() {
        let doc = json!({"name": "p", "selector": "all()", "egress": [],
            "ingress": [{"action": "allow", "source": {"nets": ["10.1.2.3/16", "2001:db8::1/64"]}}]});
        let p = policy_from_value(&doc, "").unwrap();
        let nets: Vec<String> = p.ingress.unwrap()[0]
            .source
            .nets
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(nets, ["10.1.0.0/16", "2001:db8::/64"]);
        assert_eq!(p.egress, Some(vec![]));
    }
}
