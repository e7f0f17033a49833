//! Which of this host's records must be written again after they were removed behind its back,
//! and which cannot be (somebody took their block). Pure.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use weft_etcd::records::{EndpointRecord, PoolRecord};
use weft_etcd::{alloc, BlockOwner, BlockRef};

/// What must be written again, and what cannot be.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RegistrationPlan {
    pub register_host: bool,
    /// Blocks holding our endpoints that nobody owns now.
    pub claim: Vec<BlockRef>,
    /// Endpoints without a record, with their block.
    pub create: Vec<(EndpointRecord, Vec<BlockRef>)>,
    /// What cannot be registered, one sentence each.
    pub problems: Vec<String>,
    /// Records that differ from what this host holds (an update whose answer was lost landed):
    /// (stored, held). What the host holds is what is wired, so the record is written back.
    pub rewrite: Vec<(EndpointRecord, EndpointRecord)>,
    /// Records of this host that it does not hold: written by an agent killed before it knew
    /// the write landed. Adopted if their container is wired, else deleted.
    pub unknown: Vec<EndpointRecord>,
}

/// The pool and block holding `ip`, among the cluster's pools.
pub fn place(pools: &[(String, PoolRecord)], ip: IpAddr) -> Option<BlockRef> {
    let (name, pool) = pools.iter().find(|(_, p)| p.cidr.contains(ip))?;
    Some(BlockRef {
        pool: name.clone(),
        block: alloc::block_of(ip, pool.block_size),
    })
}

/// Plans registration from the cluster view's hosts and blocks, this host's endpoints and the
/// endpoint records etcd holds for it.
pub fn plan(
    me: &str,
    host_registered: bool,
    blocks: &BTreeMap<IpNetwork, BlockOwner>,
    local: &[EndpointRecord],
    stored: &HashMap<String, EndpointRecord>,
    pools: &[(String, PoolRecord)],
    tunnel: Option<IpAddr>,
) -> RegistrationPlan {
    let mut plan = RegistrationPlan {
        register_host: !host_registered,
        ..Default::default()
    };
    // The tunnel address's block must stay ours too.
    if let Some(ip) = tunnel {
        match place(pools, ip) {
            None => plan
                .problems
                .push(format!("tunnel address {ip} lies in no pool")),
            Some(block) => match blocks.get(&block.block) {
                Some(owner) if owner.host != me => plan.problems.push(format!(
                    "tunnel address {ip} is not registered: its block {} now belongs to {}",
                    block.block, owner.host
                )),
                Some(_) => {}
                None => plan.claim.push(block),
            },
        }
    }
    let held: std::collections::HashSet<&String> = local.iter().map(|e| &e.container_id).collect();
    let mut unknown: Vec<EndpointRecord> = stored
        .values()
        .filter(|e| !held.contains(&e.container_id))
        .cloned()
        .collect();
    unknown.sort_by(|a, b| a.container_id.cmp(&b.container_id));
    plan.unknown = unknown;
    for endpoint in local {
        if let Some(record) = stored.get(&endpoint.container_id) {
            if record != endpoint {
                plan.rewrite.push((record.clone(), endpoint.clone()));
            }
            continue;
        }
        match place_endpoint(me, blocks, pools, endpoint) {
            Err(problem) => plan.problems.push(problem),
            Ok(placed) => {
                for (block, owned) in &placed {
                    if !owned && !plan.claim.contains(block) {
                        plan.claim.push(block.clone());
                    }
                }
                let placed = placed.into_iter().map(|(block, _)| block).collect();
                plan.create.push((endpoint.clone(), placed));
            }
        }
    }
    plan
}

/// The blocks of every address of an endpoint, each with whether this host owns it already;
/// or why it cannot be registered (an address in no pool, a block of another host).
fn place_endpoint(
    me: &str,
    blocks: &BTreeMap<IpNetwork, BlockOwner>,
    pools: &[(String, PoolRecord)],
    endpoint: &EndpointRecord,
) -> Result<Vec<(BlockRef, bool)>, String> {
    let id = &endpoint.container_id;
    endpoint
        .addresses()
        .map(|ip| {
            let block = place(pools, ip).ok_or_else(|| {
                format!("endpoint {id} ({ip}) is not registered: its address lies in no pool")
            })?;
            match blocks.get(&block.block) {
                Some(owner) if owner.host != me => Err(format!(
                    "endpoint {id} ({ip}) is not registered: its block {} now belongs to {}",
                    block.block, owner.host
                )),
                owned => Ok((block, owned.is_some())),
            }
        })
        .collect()
}

/// The endpoints an agent starts with, from etcd and its journal.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StartupEndpoints {
    /// What the agent holds: every stored record, and journal entries whose veth is still
    /// there (registered again by the first pass).
    pub endpoints: Vec<EndpointRecord>,
    /// Stored records the journal lacks (written by an agent without one).
    pub to_journal: Vec<EndpointRecord>,
    /// Journal entries without a record and without a veth: their container is gone.
    pub to_forget: Vec<String>,
}

pub fn startup_endpoints(
    stored: Vec<EndpointRecord>,
    journaled: Vec<EndpointRecord>,
    links: &BTreeMap<String, u32>,
) -> StartupEndpoints {
    let mut out = StartupEndpoints::default();
    let stored_ids: std::collections::HashSet<String> =
        stored.iter().map(|e| e.container_id.clone()).collect();
    let journaled_ids: std::collections::HashSet<String> =
        journaled.iter().map(|e| e.container_id.clone()).collect();
    for record in stored {
        if !journaled_ids.contains(&record.container_id) {
            out.to_journal.push(record.clone());
        }
        out.endpoints.push(record);
    }
    for record in journaled {
        if stored_ids.contains(&record.container_id) {
            continue;
        }
        match links.contains_key(&record.host_ifname) {
            true => out.endpoints.push(record),
            false => out.to_forget.push(record.container_id),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(id: &str, ip: &str) -> EndpointRecord {
        crate::testing::endpoint("h1", id, ip, &format!("weft-{id}"))
    }

    fn pool(cidr: &str, block_size: u8) -> PoolRecord {
        PoolRecord {
            cidr: cidr.parse().unwrap(),
            block_size,
            nat_outgoing: true,
            encapsulation: Default::default(),
        }
    }

    fn pools() -> Vec<(String, PoolRecord)> {
        vec![("default".into(), pool("10.65.0.0/16", 26))]
    }

    fn owner(host: &str) -> BlockOwner {
        BlockOwner {
            pool: "default".into(),
            host: host.into(),
        }
    }

    #[test]
    fn a_registered_host_needs_nothing() {
        let local = [endpoint("a", "10.65.0.5")];
        let stored = HashMap::from([("a".to_string(), local[0].clone())]);
        let mut changed = local[0].clone();
        changed.ports.clear();
        changed.ports.push(weft_etcd::records::PortRecord {
            protocol: weft_etcd::records::Protocol::Udp,
            host_port: 53,
            container_port: 53,
        });
        let differing = HashMap::from([("a".to_string(), changed.clone())]);
        let blocks_a = BTreeMap::from([("10.65.0.0/26".parse().unwrap(), owner("h1"))]);
        assert_eq!(
            plan("h1", true, &blocks_a, &local, &differing, &pools(), None).rewrite,
            vec![(changed, local[0].clone())],
            "a record that differs from what is wired is written back"
        );
        let blocks = BTreeMap::from([("10.65.0.0/26".parse().unwrap(), owner("h1"))]);
        assert_eq!(
            plan("h1", true, &blocks, &local, &stored, &pools(), None),
            RegistrationPlan::default()
        );
    }

    #[test]
    fn removed_records_are_written_again_where_nobody_took_their_place() {
        let local = [
            endpoint("a", "10.65.0.5"),
            endpoint("b", "10.65.0.6"),
            endpoint("c", "10.65.0.70"),
            endpoint("d", "10.65.1.1"),
        ];
        let blocks = BTreeMap::from([
            ("10.65.0.64/26".parse().unwrap(), owner("h1")),
            ("10.65.1.0/26".parse().unwrap(), owner("h2")),
        ]);
        let stray = endpoint("z", "10.65.0.9");
        let stored = HashMap::from([("z".to_string(), stray.clone())]);
        let tunnel = Some("10.65.0.63".parse().unwrap());
        let plan = plan("h1", false, &blocks, &local, &stored, &pools(), tunnel);
        assert!(plan.register_host);
        assert_eq!(plan.unknown, vec![stray], "a record nobody here holds");
        assert_eq!(
            plan.claim,
            vec![BlockRef {
                pool: "default".into(),
                block: "10.65.0.0/26".parse().unwrap()
            }]
        );
        let created: Vec<(&str, String)> = plan
            .create
            .iter()
            .map(|(e, b)| (e.container_id.as_str(), b[0].block.to_string()))
            .collect();
        assert_eq!(
            created,
            vec![
                ("a", "10.65.0.0/26".to_string()),
                ("b", "10.65.0.0/26".to_string()),
                ("c", "10.65.0.64/26".to_string()),
            ]
        );
        assert_eq!(
            plan.problems,
            vec!["endpoint d (10.65.1.1) is not registered: its block 10.65.1.0/26 now belongs to h2"]
        );
    }

    #[test]
    fn an_address_is_placed_in_the_pool_holding_it() {
        let pools = [
            ("a".to_string(), pool("10.65.0.0/16", 26)),
            ("b".to_string(), pool("10.66.0.0/16", 28)),
        ];
        let placed =
            |ip: &str| place(&pools, ip.parse().unwrap()).map(|b| (b.pool, b.block.to_string()));
        assert_eq!(
            placed("10.65.3.77"),
            Some(("a".into(), "10.65.3.64/26".into()))
        );
        assert_eq!(
            placed("10.66.3.77"),
            Some(("b".into(), "10.66.3.64/28".into()))
        );
        assert_eq!(placed("10.67.0.1"), None);
    }

    #[test]
    fn an_agent_starts_with_its_records_and_the_journal_entries_whose_veth_lives() {
        let stored = vec![endpoint("a", "10.65.0.5"), endpoint("b", "10.65.0.6")];
        let journaled = vec![
            endpoint("b", "10.65.0.6"),
            endpoint("c", "10.65.0.7"),
            endpoint("d", "10.65.0.8"),
        ];
        let links = BTreeMap::from([("weft-c".to_string(), 7)]);
        let start = startup_endpoints(stored, journaled, &links);
        let ids: Vec<&str> = start
            .endpoints
            .iter()
            .map(|e| e.container_id.as_str())
            .collect();
        assert_eq!(ids, vec!["a", "b", "c"]);
        assert_eq!(start.to_journal, vec![endpoint("a", "10.65.0.5")]);
        assert_eq!(start.to_forget, vec!["d".to_string()]);
    }
}
