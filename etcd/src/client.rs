//! The connection to etcd: a client per endpoint with failover, TLS, the bound on every request,
//! and the small read/transaction helpers the other modules build on.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, ConnectOptions, GetOptions, KeyValue, Txn, TxnOpResponse};
use serde::de::DeserializeOwned;
use tracing::{debug, warn};

use crate::error::{Result, StoreError};
use crate::keys::Keys;

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// Upper bound of one request, so a dead etcd turns into an error instead of a hang.
    pub timeout: Duration,
    pub tls: Option<TlsFiles>,
}

/// PEM files for TLS to etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

impl TlsFiles {
    /// TLS settings from the three optional files; `None` (plain HTTP) when none is given.
    pub fn from_parts(
        ca: Option<String>,
        cert: Option<String>,
        key: Option<String>,
    ) -> Option<Self> {
        (ca.is_some() || cert.is_some() || key.is_some()).then_some(Self { ca, cert, key })
    }

    fn options(&self) -> Result<etcd_client::TlsOptions> {
        let read = |path: &str| {
            std::fs::read(path).map_err(|source| StoreError::TlsFile {
                path: path.to_string(),
                source,
            })
        };
        let mut tls = etcd_client::TlsOptions::new();
        if let Some(ca) = &self.ca {
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            (None, None) => {}
            _ => return Err(StoreError::TlsIncomplete),
        }
        Ok(tls)
    }
}

/// A client per etcd endpoint: requests go to the one that last answered and move on to the
/// next when it is unreachable, so one dead member of a cluster costs one failed connect, not an
/// outage.
#[derive(Clone)]
pub struct Datastore {
    clients: Arc<Vec<(String, Client)>>,
    current: Arc<AtomicUsize>,
    pub(crate) keys: Keys,
    timeout: Duration,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T> {
    let key = String::from_utf8_lossy(kv.key()).into_owned();
    serde_json::from_slice(kv.value()).map_err(|e| StoreError::Malformed {
        key,
        reason: e.to_string(),
    })
}

pub(crate) fn key_of(kv: &KeyValue) -> String {
    String::from_utf8_lossy(kv.key()).into_owned()
}

/// Decodes every record of a listing, reporting and skipping the ones that do not parse: one bad
/// record must not take the whole agent down.
pub(crate) fn decode_all<T: DeserializeOwned>(kvs: &[KeyValue]) -> Vec<(String, T)> {
    kvs.iter()
        .filter_map(|kv| match decode(kv) {
            Ok(record) => Some((key_of(kv), record)),
            Err(err) => {
                warn!(error = %err, "skipping malformed record");
                None
            }
        })
        .collect()
}

pub(crate) fn get_kvs(response: &TxnOpResponse) -> &[KeyValue] {
    match response {
        TxnOpResponse::Get(get) => get.kvs(),
        _ => &[],
    }
}

/// Whether etcd answered that it is between leaders. etcd sends these before doing anything
/// (no leader) or only for reads (leader changed, from its linearizable read path), so the
/// request can be sent again whatever it was.
fn is_election(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::Unavailable
                && ["etcdserver: no leader", "etcdserver: leader changed"]
                    .iter()
                    .any(|m| status.message().contains(m))
        }
        _ => false,
    }
}

impl Datastore {
    pub async fn connect(config: &EtcdConfig) -> Result<Self> {
        let mut options = ConnectOptions::new()
            .with_timeout(config.timeout)
            .with_connect_timeout(config.timeout)
            .with_keep_alive(Duration::from_secs(5), config.timeout);
        if let Some(tls) = &config.tls {
            options = options.with_tls(tls.options()?);
        }
        let mut clients = Vec::with_capacity(config.endpoints.len());
        for endpoint in &config.endpoints {
            // Connections are made lazily, so an endpoint that is down now costs nothing here.
            let client = tokio::time::timeout(
                config.timeout,
                Client::connect([endpoint.as_str()], Some(options.clone())),
            )
            .await??;
            clients.push((endpoint.clone(), client));
        }
        if clients.is_empty() {
            return Err(StoreError::Unavailable(
                "no etcd endpoint configured".into(),
            ));
        }
        Ok(Self {
            clients: Arc::new(clients),
            current: Arc::new(AtomicUsize::new(0)),
            keys: Keys::new(&config.prefix),
            timeout: config.timeout,
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Runs `op` against the current endpoint, moving on to the next ones while they are
    /// unreachable. Each try is bounded by the request timeout, the whole call by twice that.
    ///
    /// A cluster that answers but is electing a leader (after its leader died) is waited for:
    /// rounds over the endpoints repeat, with a growing pause, until one succeeds or the
    /// deadline passes. When no endpoint answers at all, the call fails after one round, so an
    /// etcd that is down fails an attach at once rather than after the deadline.
    pub(crate) async fn call<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let count = self.clients.len();
        let start = self.current.load(Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + self.timeout * 2;
        let mut pause = Duration::from_millis(25);
        let mut last = None;
        loop {
            let mut electing = false;
            for step in 0..count {
                let index = (start + step) % count;
                let (endpoint, client) = &self.clients[index];
                let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                if remaining.is_zero() {
                    break;
                }
                let limit = remaining.min(self.timeout);
                let error = match tokio::time::timeout(limit, op(client.clone())).await {
                    Ok(Ok(value)) => {
                        if index != start {
                            self.current.store(index, Ordering::Relaxed);
                        }
                        return Ok(value);
                    }
                    Ok(Err(e)) => {
                        electing |= is_election(&e);
                        StoreError::from(e)
                    }
                    Err(_) => StoreError::Unavailable(format!("{endpoint}: request timed out")),
                };
                if !matches!(error, StoreError::Unavailable(_)) {
                    return Err(error);
                }
                debug!(%endpoint, error = %error, "etcd endpoint unavailable; trying the next");
                last = Some(error);
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !electing || remaining <= pause {
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(400));
        }
        Err(last.unwrap_or_else(|| StoreError::Unavailable("etcd request timed out".into())))
    }

    pub(crate) async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse> {
        self.call(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    pub(crate) async fn get(
        &self,
        key: &str,
        options: Option<GetOptions>,
    ) -> Result<etcd_client::GetResponse> {
        self.call(|mut c| {
            let options = options.clone();
            async move { c.get(key, options).await }
        })
        .await
    }

    pub(crate) async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>> {
        let mut response = self
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await?;
        Ok(response.take_kvs())
    }

    /// Checks that etcd answers.
    pub async fn ping(&self) -> Result<()> {
        self.get(
            &self.keys.pools(),
            Some(GetOptions::new().with_count_only().with_prefix()),
        )
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// A store whose endpoints are never dialled: the operations below are fakes that ignore
    /// the client they are handed.
    async fn store(endpoints: usize) -> Datastore {
        Datastore::connect(&EtcdConfig {
            endpoints: (0..endpoints)
                .map(|i| format!("http://127.0.0.1:{}", 9 + i))
                .collect(),
            prefix: "/weft-test".into(),
            timeout: Duration::from_secs(1),
            tls: None,
        })
        .await
        .unwrap()
    }

    fn unavailable(message: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(tonic::Status::unavailable(message.to_string()))
    }

    #[tokio::test]
    async fn a_leader_election_is_waited_out() {
        let store = store(3).await;
        let tries = AtomicU32::new(0);
        let value = store
            .call(|_| {
                let n = tries.fetch_add(1, Ordering::SeqCst);
                async move {
                    match n {
                        0 => Err(unavailable("tcp connect error")),
                        1..=4 => Err(unavailable("etcdserver: leader changed")),
                        5 => Err(unavailable("etcdserver: no leader")),
                        _ => Ok(n),
                    }
                }
            })
            .await
            .unwrap();
        assert_eq!(value, 6, "two full rounds and one more try");
    }

    #[tokio::test]
    async fn an_unreachable_cluster_fails_after_one_round() {
        let store = store(3).await;
        let tries = AtomicU32::new(0);
        let started = std::time::Instant::now();
        let result: Result<()> = store
            .call(|_| {
                tries.fetch_add(1, Ordering::SeqCst);
                async { Err(unavailable("tcp connect error")) }
            })
            .await;
        assert!(matches!(result, Err(StoreError::Unavailable(_))));
        assert_eq!(tries.load(Ordering::SeqCst), 3, "each endpoint once");
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    #[tokio::test]
    async fn an_election_that_outlasts_the_deadline_fails_unavailable() {
        let store = store(1).await;
        let started = std::time::Instant::now();
        let result: Result<()> = store
            .call(|_| async { Err(unavailable("etcdserver: no leader")) })
            .await;
        assert!(matches!(result, Err(StoreError::Unavailable(_))));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1500) && took <= Duration::from_secs(4),
            "bounded by twice the request timeout: {took:?}"
        );
    }

    #[test]
    fn only_answers_about_a_missing_leader_count_as_an_election() {
        let status = |code, message: &str| {
            etcd_client::Error::GRpcStatus(tonic::Status::new(code, message.to_string()))
        };
        use tonic::Code::{DeadlineExceeded, Unavailable};
        assert!(is_election(&status(
            Unavailable,
            "etcdserver: leader changed"
        )));
        assert!(is_election(&status(Unavailable, "etcdserver: no leader")));
        assert!(!is_election(&status(
            Unavailable,
            "etcdserver: request timed out"
        )));
        assert!(!is_election(&status(Unavailable, "tcp connect error")));
        assert!(!is_election(&status(
            DeadlineExceeded,
            "etcdserver: no leader"
        )));
    }

    #[tokio::test]
    async fn an_unreadable_tls_file_is_named_not_called_unavailable() {
        let tls = TlsFiles::from_parts(Some("/nonexistent/ca.pem".into()), None, None);
        let result = Datastore::connect(&EtcdConfig {
            endpoints: vec!["https://127.0.0.1:9".into()],
            prefix: "/weft-test".into(),
            timeout: Duration::from_secs(1),
            tls,
        })
        .await;
        match result {
            Err(StoreError::TlsFile { path, .. }) => assert_eq!(path, "/nonexistent/ca.pem"),
            Err(other) => panic!("wrong error: {other}"),
            Ok(_) => panic!("connected without a CA file"),
        }
        assert!(TlsFiles::from_parts(None, None, None).is_none());
    }
}
