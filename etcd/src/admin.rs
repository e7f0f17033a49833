//! Operator reads and guarded repairs (`weftctl ipam`, `weftctl hosts`): whole listings of the
//! guard keys, and writes that only happen if nobody changed the key meanwhile.

use std::net::IpAddr;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use crate::client::{decode_all, key_of, Datastore};
use crate::error::Result;
use crate::records::{IpRecord, PortOwner, Protocol};

/// One host-port reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortReservation {
    pub host: String,
    pub protocol: Protocol,
    pub port: u16,
    pub owner: String,
}

impl Datastore {
    /// Every host-port reservation.
    pub async fn list_ports(&self) -> Result<Vec<PortReservation>> {
        let kvs = self.list(&self.keys.ports()).await?;
        Ok(decode_all::<PortOwner>(&kvs)
            .into_iter()
            .filter_map(|(key, owner)| {
                let (host, protocol, port) = self.keys.parse_port(&key)?;
                Some(PortReservation {
                    host,
                    protocol,
                    port,
                    owner: owner.container_id,
                })
            })
            .collect())
    }

    /// Every `ips/` record; malformed ones are reported and skipped.
    pub async fn list_ips(&self) -> Result<Vec<(IpAddr, IpRecord)>> {
        let kvs = self.list(&self.keys.ips()).await?;
        Ok(decode_all::<IpRecord>(&kvs)
            .into_iter()
            .filter_map(|(key, r)| Some((self.keys.parse_ip(&key)?, r)))
            .collect())
    }

    /// An address record with the revision it was read at (for a guarded release).
    pub async fn get_ip_revision(&self, ip: IpAddr) -> Result<Option<(IpRecord, i64)>> {
        let response = self.get(&self.keys.ip(ip), None).await?;
        let Some(kv) = response.kvs().first() else {
            return Ok(None);
        };
        Ok(Some((crate::client::decode(kv)?, kv.mod_revision())))
    }

    /// Deletes a key if it still has the revision it was read at.
    pub async fn delete_if_unchanged(&self, key: &str, mod_revision: i64) -> Result<bool> {
        let response = self
            .txn(
                Txn::new()
                    .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
                    .and_then([TxnOp::delete(key, None)]),
            )
            .await?;
        Ok(response.succeeded())
    }

    /// Writes a key only if it does not exist.
    pub async fn create(&self, key: &str, value: &str) -> Result<bool> {
        let response = self
            .txn(
                Txn::new()
                    .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key, value, None)]),
            )
            .await?;
        Ok(response.succeeded())
    }

    /// Mod revision of every key weft stores (for guarded repairs).
    pub async fn revisions(&self) -> Result<Vec<(String, i64)>> {
        Ok(self
            .list(&self.keys.all())
            .await?
            .iter()
            .map(|kv| (key_of(kv), kv.mod_revision()))
            .collect())
    }
}
