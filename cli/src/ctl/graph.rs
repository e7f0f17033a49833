//! `weftctl graph`: the fabric as a picture. Owns the picture's model (hosts, their blocks and
//! endpoints, the links between peers), its pure rendering to Graphviz DOT, and the hand-off to
//! Graphviz's `dot` for SVG.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::process::{Command, Stdio};

use ipnetwork::IpNetwork;
use weft_etcd::records::{Encapsulation, EndpointRecord};
use weft_etcd::ClusterView;

use super::{EtcdArgs, Failure};

/// What `weftctl graph` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GraphFormat {
    /// Graphviz source: render it anywhere, or read it.
    Dot,
    /// A picture, through Graphviz's `dot` (Debian package graphviz).
    Svg,
}

/// A host's standing in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostState {
    Alive,
    /// Registered, but its liveness key expired: its routes stay (liveness is not ownership).
    Down,
    /// Owns blocks or endpoints but has no host record (a removal that did not finish).
    Unregistered,
}

impl HostState {
    fn text(self) -> &'static str {
        match self {
            HostState::Alive => "alive",
            HostState::Down => "DOWN",
            HostState::Unregistered => "unregistered",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointNode {
    pub container_id: String,
    pub ip: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockNode {
    pub cidr: IpNetwork,
    pub endpoints: Vec<EndpointNode>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostNode {
    pub name: String,
    pub underlay_ip: Option<String>,
    pub state: HostState,
    pub blocks: Vec<BlockNode>,
    /// Endpoints whose address is in none of the host's blocks; shown rather than hidden.
    pub loose_endpoints: Vec<EndpointNode>,
}

/// How one host reaches another's blocks, by the pool's encapsulation and whether they share a
/// subnet: the rule the agents route by (`Encapsulation::tunnels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    /// `<block> via <underlay ip>`.
    Direct,
    /// Through `weft.vxlan`.
    Vxlan,
    /// Off each other's subnet with encapsulation `none`: carried by the underlay's routing.
    Underlay,
}

impl LinkMode {
    fn label(self) -> &'static str {
        match self {
            LinkMode::Direct => "direct",
            LinkMode::Vxlan => "vxlan",
            LinkMode::Underlay => "underlay",
        }
    }

    fn style(self) -> &'static str {
        match self {
            LinkMode::Direct => "solid",
            LinkMode::Vxlan => "bold",
            LinkMode::Underlay => "dotted",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLink {
    pub a: String,
    pub b: String,
    pub mode: LinkMode,
}

/// The whole picture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fabric {
    pub hosts: Vec<HostNode>,
    pub links: Vec<PeerLink>,
}

/// How `a` and `b` reach each other's blocks under `encapsulation`; hosts without a record
/// (nothing known of their underlay) are drawn as reached directly.
fn link_mode(view: &ClusterView, encapsulation: Encapsulation, a: &str, b: &str) -> LinkMode {
    let same_subnet = match (view.hosts.get(a), view.hosts.get(b)) {
        (Some(a), Some(b)) => a.shares_subnet_with(b),
        _ => true,
    };
    match (encapsulation.tunnels(same_subnet), same_subnet) {
        (true, _) => LinkMode::Vxlan,
        (false, true) => LinkMode::Direct,
        (false, false) => LinkMode::Underlay,
    }
}

/// Builds the picture from what etcd holds, with the pool's encapsulation; endpoints only when
/// asked for.
pub fn fabric(
    view: &ClusterView,
    encapsulation: Encapsulation,
    endpoints: &[EndpointRecord],
    with_endpoints: bool,
) -> Fabric {
    let mut names: BTreeSet<&str> = view.hosts.keys().map(String::as_str).collect();
    names.extend(view.blocks.values().map(|owner| owner.host.as_str()));
    if with_endpoints {
        names.extend(endpoints.iter().map(|e| e.host.as_str()));
    }
    let mut by_host: BTreeMap<&str, Vec<&EndpointRecord>> = BTreeMap::new();
    if with_endpoints {
        for e in endpoints {
            by_host.entry(e.host.as_str()).or_default().push(e);
        }
    }
    let hosts: Vec<HostNode> = names
        .into_iter()
        .map(|name| host_node(view, name, by_host.remove(name).unwrap_or_default()))
        .collect();
    let mut links = vec![];
    for (i, a) in hosts.iter().enumerate() {
        for b in &hosts[i + 1..] {
            links.push(PeerLink {
                a: a.name.clone(),
                b: b.name.clone(),
                mode: link_mode(view, encapsulation, &a.name, &b.name),
            });
        }
    }
    Fabric { hosts, links }
}

fn host_node(view: &ClusterView, name: &str, mut endpoints: Vec<&EndpointRecord>) -> HostNode {
    endpoints.sort_by(|x, y| (x.ip, &x.container_id).cmp(&(y.ip, &y.container_id)));
    let node = |e: &&EndpointRecord| EndpointNode {
        container_id: e.container_id.clone(),
        ip: e.ip.to_string(),
    };
    let blocks: Vec<BlockNode> = view
        .blocks_of(name)
        .into_iter()
        .map(|cidr| BlockNode {
            cidr,
            endpoints: endpoints
                .iter()
                .filter(|e| cidr.contains(e.ip))
                .map(node)
                .collect(),
        })
        .collect();
    let loose_endpoints = endpoints
        .iter()
        .filter(|e| !blocks.iter().any(|b| b.cidr.contains(e.ip)))
        .map(node)
        .collect();
    let record = view.hosts.get(name);
    let state = match (record, view.alive.contains(name)) {
        (None, _) => HostState::Unregistered,
        (Some(_), true) => HostState::Alive,
        (Some(_), false) => HostState::Down,
    };
    HostNode {
        name: name.to_string(),
        underlay_ip: record.map(|r| r.underlay_ip.to_string()),
        state,
        blocks,
        loose_endpoints,
    }
}

/// A DOT string literal.
fn quote(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A multi-line DOT label.
fn label(lines: &[&str]) -> String {
    let escaped: Vec<String> = lines
        .iter()
        .map(|l| l.replace('\\', "\\\\").replace('"', "\\\""))
        .collect();
    format!("\"{}\"", escaped.join("\\n"))
}

/// The picture as Graphviz DOT: one cluster per host holding the host, its blocks and their
/// endpoints; one edge per pair of peers, labelled with how they reach each other.
pub fn render_dot(fabric: &Fabric) -> String {
    let mut out = String::from(
        "graph weft {\n  graph [fontname=\"Helvetica\", label=\"weft fabric\", labelloc=t, nodesep=0.3];\n  node [fontname=\"Helvetica\", fontsize=10];\n  edge [fontname=\"Helvetica\", fontsize=9];\n",
    );
    for host in &fabric.hosts {
        render_host(&mut out, host);
    }
    // Peer links do not rank the hosts (constraint=false): every host sits on the top row, its
    // blocks and endpoints below it, instead of a staircase of hosts.
    for link in &fabric.links {
        out.push_str(&format!(
            "  {} -- {} [label={}, style={}, penwidth=2, color=\"#4a6fa5\", constraint=false];\n",
            quote(&format!("host/{}", link.a)),
            quote(&format!("host/{}", link.b)),
            quote(link.mode.label()),
            link.mode.style(),
        ));
    }
    out.push_str("}\n");
    out
}

fn render_host(out: &mut String, host: &HostNode) {
    let id = format!("host/{}", host.name);
    let (fill, style) = match host.state {
        HostState::Alive => ("#d5e8d4", "rounded,filled"),
        HostState::Down => ("#f8cecc", "rounded,filled,dashed"),
        HostState::Unregistered => ("#eeeeee", "rounded,filled,dotted"),
    };
    let underlay = host.underlay_ip.as_deref().unwrap_or("no host record");
    out.push_str(&format!(
        "  subgraph {} {{\n    style=\"rounded,dashed\"; color=\"#999999\"; label=\"\";\n",
        quote(&format!("cluster_{}", host.name))
    ));
    out.push_str(&format!(
        "    {} [shape=box, style={}, fillcolor={}, label={}];\n",
        quote(&id),
        quote(style),
        quote(fill),
        label(&[&host.name, underlay, host.state.text()]),
    ));
    for block in &host.blocks {
        let block_id = format!("block/{}", block.cidr);
        let cidr = block.cidr.to_string();
        out.push_str(&format!(
            "    {} [shape=folder, label={}];\n    {} -- {};\n",
            quote(&block_id),
            label(&[&cidr]),
            quote(&id),
            quote(&block_id)
        ));
        for e in &block.endpoints {
            render_endpoint(out, &host.name, &block_id, e);
        }
    }
    for e in &host.loose_endpoints {
        render_endpoint(out, &host.name, &id, e);
    }
    out.push_str("  }\n");
}

fn render_endpoint(out: &mut String, host: &str, parent: &str, e: &EndpointNode) {
    let id = format!("endpoint/{host}/{}", e.container_id);
    out.push_str(&format!(
        "    {} [shape=ellipse, label={}];\n    {} -- {};\n",
        quote(&id),
        label(&[&e.container_id, &e.ip]),
        quote(parent),
        quote(&id)
    ));
}

/// Renders DOT to SVG with Graphviz's `dot`.
pub fn render_svg(dot: &str) -> Result<String, String> {
    let mut child = Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "--format svg needs Graphviz's dot, which is not \
                installed (Debian: apt install graphviz); --format dot prints the graph without it"
                .to_string(),
            _ => format!("running dot: {e}"),
        })?;
    // dot reads all of its input before it writes, so writing first cannot deadlock.
    let written = child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(dot.as_bytes());
    let output = child
        .wait_with_output()
        .map_err(|e| format!("running dot: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "dot failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    written.map_err(|e| format!("writing to dot: {e}"))?;
    String::from_utf8(output.stdout).map_err(|e| format!("dot wrote invalid UTF-8: {e}"))
}

/// `weftctl graph`: reads etcd like `weftctl hosts` and prints DOT or SVG.
pub(crate) async fn graph(
    json_out: bool,
    format: GraphFormat,
    with_endpoints: bool,
    etcd: &EtcdArgs,
) -> Result<(), Failure> {
    if json_out {
        return Err(Failure::Other(
            "graph prints dot or svg; `weftctl --json hosts` has the same data as JSON".into(),
        ));
    }
    let store = etcd.connect().await?;
    let view = store.snapshot().await.map_err(|e| e.to_string())?;
    let endpoints = match with_endpoints {
        true => store
            .list_all_endpoints()
            .await
            .map_err(|e| e.to_string())?,
        false => vec![],
    };
    // Every pool of a cluster routes by one encapsulation today; the first pool's (or the
    // default, cross-subnet, when none is recorded yet) is the picture's.
    let encapsulation = store
        .list_pools()
        .await
        .map_err(|e| e.to_string())?
        .first()
        .map(|(_, pool)| pool.encapsulation)
        .unwrap_or_default();
    let dot = render_dot(&fabric(&view, encapsulation, &endpoints, with_endpoints));
    match format {
        GraphFormat::Dot => print!("{dot}"),
        GraphFormat::Svg => print!("{}", render_svg(&dot)?),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_etcd::BlockOwner;

    fn view() -> ClusterView {
        let mut view = ClusterView::default();
        for (name, ip) in [("h1", "198.51.100.1"), ("h2", "198.51.100.2")] {
            let record =
                serde_json::json!({"underlay_ip": ip, "version": "0.1.0", "first_seen": 0});
            view.hosts
                .insert(name.into(), serde_json::from_value(record).unwrap());
        }
        view.alive.insert("h1".into());
        for (block, host) in [
            ("10.65.7.0/26", "h1"),
            ("10.65.9.64/26", "h2"),
            ("10.65.3.0/26", "gone"),
        ] {
            view.blocks.insert(
                block.parse().unwrap(),
                BlockOwner {
                    pool: "default".into(),
                    host: host.into(),
                },
            );
        }
        view
    }

    fn endpoint(host: &str, id: &str, ip: &str) -> EndpointRecord {
        serde_json::from_value(serde_json::json!({
            "container_id": id, "host": host, "ip": ip, "host_ifname": "weft0", "ifname": "eth0",
            "mac": "ee:ee:ee:ee:ee:ee", "netns": "/run/netns/x", "owns_netns": true, "created": 0,
        }))
        .unwrap()
    }

    #[test]
    fn hosts_carry_underlay_state_blocks_and_endpoints() {
        let endpoints = [
            endpoint("h1", "web-2", "10.65.7.3"),
            endpoint("h1", "web-1", "10.65.7.2"),
            endpoint("h2", "stray", "10.99.0.1"),
        ];
        let f = fabric(&view(), Encapsulation::CrossSubnet, &endpoints, true);
        let names: Vec<_> = f.hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["gone", "h1", "h2"]);
        let h1 = &f.hosts[1];
        assert_eq!(h1.state, HostState::Alive);
        assert_eq!(h1.underlay_ip.as_deref(), Some("198.51.100.1"));
        let ids: Vec<_> = h1.blocks[0]
            .endpoints
            .iter()
            .map(|e| e.container_id.as_str())
            .collect();
        assert_eq!(ids, ["web-1", "web-2"], "in address order");
        assert_eq!(f.hosts[2].state, HostState::Down);
        assert_eq!(f.hosts[2].loose_endpoints.len(), 1, "shown, not dropped");
        assert_eq!(f.hosts[0].state, HostState::Unregistered);
        assert_eq!(f.hosts[0].underlay_ip, None);
    }

    #[test]
    fn every_pair_of_peers_is_linked_directly() {
        let f = fabric(&view(), Encapsulation::CrossSubnet, &[], false);
        assert_eq!(f.links.len(), 3, "3 hosts, 3 pairs");
        assert!(f.links.iter().all(|l| l.mode == LinkMode::Direct));
        let dot = render_dot(&f);
        assert_eq!(dot.matches("[label=\"direct\", style=solid").count(), 3);
        assert!(dot.contains("\"host/h1\" -- \"host/h2\""));
    }

    #[test]
    fn peers_off_the_subnet_are_linked_by_the_pools_encapsulation() {
        let mut view = view();
        for (name, ip) in [
            ("h1", "198.51.100.1"),
            ("h2", "198.18.0.2"),
            ("h3", "198.51.100.3"),
        ] {
            let record = serde_json::json!({"underlay_ip": ip, "underlay_prefix": 24,
                "version": "0.1.0", "first_seen": 0});
            view.hosts
                .insert(name.into(), serde_json::from_value(record).unwrap());
        }
        let modes = |encapsulation| -> Vec<(String, String, LinkMode)> {
            fabric(&view, encapsulation, &[], false)
                .links
                .into_iter()
                .filter(|l| l.a != "gone" && l.b != "gone")
                .map(|l| (l.a, l.b, l.mode))
                .collect()
        };
        let link = |a: &str, b: &str, mode| (a.to_string(), b.to_string(), mode);
        assert_eq!(
            modes(Encapsulation::CrossSubnet),
            [
                link("h1", "h2", LinkMode::Vxlan),
                link("h1", "h3", LinkMode::Direct),
                link("h2", "h3", LinkMode::Vxlan),
            ]
        );
        assert!(modes(Encapsulation::Vxlan)
            .iter()
            .all(|(_, _, m)| *m == LinkMode::Vxlan));
        assert_eq!(modes(Encapsulation::None)[0].2, LinkMode::Underlay);
        let dot = render_dot(&fabric(&view, Encapsulation::CrossSubnet, &[], false));
        assert!(dot.contains("[label=\"vxlan\", style=bold"), "{dot}");
    }

    #[test]
    fn endpoints_only_when_asked() {
        let endpoints = [endpoint("h1", "web-1", "10.65.7.2")];
        let without = render_dot(&fabric(
            &view(),
            Encapsulation::CrossSubnet,
            &endpoints,
            false,
        ));
        assert!(!without.contains("web-1"));
        let with = render_dot(&fabric(
            &view(),
            Encapsulation::CrossSubnet,
            &endpoints,
            true,
        ));
        assert!(with.contains("label=\"web-1\\n10.65.7.2\""), "{with}");
        assert!(with.contains("\"block/10.65.7.0/26\" -- \"endpoint/h1/web-1\""));
    }

    #[test]
    fn dot_names_hosts_with_underlay_and_state_and_their_blocks() {
        let dot = render_dot(&fabric(&view(), Encapsulation::CrossSubnet, &[], false));
        assert!(dot.starts_with("graph weft {") && dot.ends_with("}\n"));
        assert!(dot.contains("label=\"h1\\n198.51.100.1\\nalive\""), "{dot}");
        assert!(dot.contains("label=\"h2\\n198.51.100.2\\nDOWN\""));
        assert!(dot.contains("label=\"gone\\nno host record\\nunregistered\""));
        assert!(dot.contains("\"host/h2\" [shape=box, style=\"rounded,filled,dashed\""));
        assert!(dot.contains("\"host/h1\" -- \"block/10.65.7.0/26\""));
        assert!(dot.contains("subgraph \"cluster_h2\""));
    }

    #[test]
    fn quotes_and_backslashes_are_escaped() {
        assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(label(&["x\"", "y"]), r#""x\"\ny""#);
    }
}
