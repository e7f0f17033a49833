//! `weftctl ipam show` (pool use per host, computed by a pure function from etcd's records) and
//! `weftctl ipam release` (a leaked address record freed once no endpoint holds it).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::Serialize;
use serde_json::json;
use weft_etcd::cluster::BlockOwner;
use weft_etcd::records::{EndpointRecord, HostRecord, IpRecord, PoolRecord};

use super::output::{print, table};
use super::{EtcdArgs, Failure};

/// One host's share of a pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HostUse {
    pub host: String,
    pub blocks: usize,
    pub used: u64,
    pub free: u64,
    /// Empty blocks beyond the one a host keeps: its agent gives them back after
    /// `--block-release-after`.
    pub waiting_release: usize,
}

/// One pool's use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolUse {
    pub pool: String,
    pub cidr: IpNetwork,
    pub block_size: u8,
    pub nat_outgoing: bool,
    pub addresses: u64,
    pub used: u64,
    pub free: u64,
    pub blocks_claimed: usize,
    pub blocks_total: u64,
    pub free_in_claimed_blocks: u64,
    pub hosts: Vec<HostUse>,
}

/// Counts of an IPv6 pool can exceed u64: they are saturated.
fn count(value: u128) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

fn capacity(net_bits: u8, prefix: u8) -> u128 {
    1u128
        .checked_shl(u32::from(net_bits - prefix))
        .unwrap_or(u128::MAX)
}

/// The use of each pool, from the blocks and address records.
pub fn usage(
    pools: &[(String, PoolRecord)],
    blocks: &BTreeMap<IpNetwork, BlockOwner>,
    ips: &[(IpAddr, IpRecord)],
) -> Vec<PoolUse> {
    pools
        .iter()
        .map(|(name, pool)| pool_usage(name, pool, blocks, ips))
        .collect()
}

fn pool_usage(
    name: &str,
    pool: &PoolRecord,
    blocks: &BTreeMap<IpNetwork, BlockOwner>,
    ips: &[(IpAddr, IpRecord)],
) -> PoolUse {
    let bits = if pool.cidr.is_ipv4() { 32 } else { 128 };
    let size = capacity(bits, pool.cidr.prefix());
    let per_block = capacity(bits, pool.block_size);
    let used_in = |block: &IpNetwork| ips.iter().filter(|(ip, _)| block.contains(*ip)).count();
    let mut hosts: BTreeMap<&str, HostUse> = BTreeMap::new();
    let mut empty: BTreeMap<&str, usize> = BTreeMap::new();
    let ours = blocks.iter().filter(|(_, o)| o.pool == name);
    for (block, owner) in ours.clone() {
        let used = used_in(block) as u128;
        let host = hosts.entry(owner.host.as_str()).or_default();
        host.blocks += 1;
        host.used += count(used);
        host.free += count(per_block - used.min(per_block));
        *empty.entry(owner.host.as_str()).or_default() += usize::from(used == 0);
    }
    let hosts: Vec<HostUse> = hosts
        .into_iter()
        .map(|(name, mut host)| {
            host.host = name.to_string();
            // The host's last block of the pool is kept, empty or not.
            host.waiting_release = empty[name].min(host.blocks - 1);
            host
        })
        .collect();
    let used = ips.iter().filter(|(ip, _)| pool.cidr.contains(*ip)).count() as u128;
    let claimed = ours.count();
    PoolUse {
        pool: name.to_string(),
        cidr: pool.cidr,
        block_size: pool.block_size,
        nat_outgoing: pool.nat_outgoing,
        addresses: count(size),
        used: count(used),
        free: count(size - used),
        blocks_claimed: claimed,
        blocks_total: count(size / per_block),
        free_in_claimed_blocks: hosts.iter().map(|h| h.free).sum(),
        hosts,
    }
}

pub async fn show(json_out: bool, etcd: &EtcdArgs) -> Result<(), Failure> {
    let store = etcd.connect().await?;
    let pools = store.list_pools().await.map_err(store_error)?;
    let view = store.snapshot().await.map_err(store_error)?;
    let ips = store.list_ips().await.map_err(store_error)?;
    let pools = usage(&pools, &view.blocks, &ips);
    let mut text = String::new();
    for p in &pools {
        text.push_str(&format!(
            "pool {} {}: {} of {} addresses used, {} free; {} of {} /{} blocks claimed ({} free \
             addresses in them)\n",
            p.pool,
            p.cidr,
            p.used,
            p.addresses,
            p.free,
            p.blocks_claimed,
            p.blocks_total,
            p.block_size,
            p.free_in_claimed_blocks,
        ));
        let rows: Vec<Vec<String>> = p
            .hosts
            .iter()
            .map(|h| {
                vec![
                    h.host.clone(),
                    h.blocks.to_string(),
                    h.used.to_string(),
                    h.free.to_string(),
                    h.waiting_release.to_string(),
                ]
            })
            .collect();
        let headers = ["HOST", "BLOCKS", "USED", "FREE", "WAITING RELEASE"];
        text.push_str(&table(&headers, &rows));
        text.push('\n');
    }
    print(json_out, json!(pools), text.trim_end().to_string());
    Ok(())
}

/// Why an address record may not be released.
fn holder(
    ip: IpAddr,
    endpoints: &[EndpointRecord],
    hosts: &BTreeMap<String, HostRecord>,
) -> Option<String> {
    if let Some(e) = endpoints.iter().find(|e| e.ip == ip) {
        return Some(format!(
            "endpoint {} on host {} holds {ip}; detach it instead",
            e.container_id, e.host
        ));
    }
    let (host, _) = hosts.iter().find(|(_, h)| h.tunnel_ip == Some(ip))?;
    Some(format!(
        "{ip} is the VXLAN tunnel address of host {host}; `weftctl host remove {host}` frees it \
         with the rest of the host"
    ))
}

pub async fn release(json_out: bool, ip: IpAddr, etcd: &EtcdArgs) -> Result<(), Failure> {
    let store = etcd.connect().await?;
    let key = store.keys().ip(ip);
    let Some((_, revision)) = store.get_ip_revision(ip).await.map_err(store_error)? else {
        return Err(Failure::Status(tonic::Status::not_found(format!(
            "no address record for {ip}"
        ))));
    };
    let endpoints = store.list_all_endpoints().await.map_err(store_error)?;
    let view = store.snapshot().await.map_err(store_error)?;
    if let Some(why) = holder(ip, &endpoints, &view.hosts) {
        return Err(Failure::Status(tonic::Status::failed_precondition(why)));
    }
    // An endpoint can take the address only once the record is gone, so a record unchanged
    // since it was read is still the leaked one.
    if !store
        .delete_if_unchanged(&key, revision)
        .await
        .map_err(store_error)?
    {
        return Err(Failure::Status(tonic::Status::aborted(format!(
            "the record of {ip} changed while it was checked; look again"
        ))));
    }
    print(
        json_out,
        json!({ "released": ip }),
        format!("released {ip} ({key})"),
    );
    Ok(())
}

fn store_error(e: weft_etcd::StoreError) -> Failure {
    Failure::Other(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(host: &str) -> BlockOwner {
        BlockOwner {
            pool: "default".into(),
            host: host.into(),
        }
    }

    fn ip_record(host: &str) -> IpRecord {
        IpRecord {
            host: host.into(),
            container_id: "c".into(),
            tunnel: false,
        }
    }

    #[test]
    fn each_host_shows_its_blocks_use_and_empty_blocks_beyond_the_one_it_keeps() {
        let pool = PoolRecord {
            cidr: "10.65.0.0/24".parse().unwrap(),
            block_size: 28,
            nat_outgoing: true,
            encapsulation: Default::default(),
        };
        let blocks: BTreeMap<IpNetwork, BlockOwner> = [
            ("10.65.0.0/28", owner("h1")),
            ("10.65.0.16/28", owner("h1")),
            ("10.65.0.32/28", owner("h1")),
            ("10.65.0.48/28", owner("h2")),
            ("10.65.0.64/28", owner("h3")),
            ("10.65.0.80/28", owner("h3")),
        ]
        .into_iter()
        .map(|(b, o)| (b.parse().unwrap(), o))
        .collect();
        let ips: Vec<(IpAddr, IpRecord)> = [("10.65.0.1", "h1"), ("10.65.0.2", "h1")]
            .into_iter()
            .map(|(ip, h)| (ip.parse().unwrap(), ip_record(h)))
            .collect();
        let [p] = usage(&[("default".into(), pool)], &blocks, &ips)
            .try_into()
            .unwrap();
        assert_eq!((p.addresses, p.used, p.free), (256, 2, 254));
        assert_eq!((p.blocks_claimed, p.blocks_total), (6, 16));
        assert_eq!(p.free_in_claimed_blocks, 94);
        let row = |h: &str, blocks, used, free, waiting| HostUse {
            host: h.into(),
            blocks,
            used,
            free,
            waiting_release: waiting,
        };
        assert_eq!(
            p.hosts,
            [
                row("h1", 3, 2, 46, 2),
                row("h2", 1, 0, 16, 0),
                row("h3", 2, 0, 32, 1)
            ]
        );
    }

    #[test]
    fn an_address_an_endpoint_or_a_tunnel_holds_is_not_released() {
        let ip: IpAddr = "10.65.0.7".parse().unwrap();
        let endpoint = EndpointRecord {
            container_id: "db".into(),
            host: "h1".into(),
            ip,
            host_ifname: "weft1".into(),
            ifname: "eth0".into(),
            mac: "02:00:00:00:00:01".into(),
            netns: "/run/netns/db".into(),
            owns_netns: false,
            ports: vec![],
            created: 0,
            secondary: false,
            labels: Default::default(),
            ipv6: None,
        };
        let host = HostRecord {
            underlay_ip: "198.51.100.2".parse().unwrap(),
            version: "test".into(),
            first_seen: 0,
            underlay_prefix: Some(24),
            vtep_mac: None,
            tunnel_ip: Some(ip),
            underlay_ipv6: None,
        };
        let hosts: BTreeMap<String, HostRecord> = [("h2".to_string(), host)].into();
        let no_hosts = BTreeMap::new();
        assert!(holder(ip, std::slice::from_ref(&endpoint), &no_hosts)
            .unwrap()
            .contains("endpoint db on host h1"));
        assert!(holder(ip, &[], &hosts).unwrap().contains("tunnel"));
        assert_eq!(holder(ip, &[], &no_hosts), None);
        let other: IpAddr = "10.65.0.8".parse().unwrap();
        assert_eq!(holder(other, &[endpoint], &hosts), None);
    }
}
