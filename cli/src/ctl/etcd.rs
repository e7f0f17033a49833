//! How the operator commands reach etcd: the same flags and environment as the agent's.

use std::time::Duration;

/// How weftctl reaches etcd for cluster-wide commands.
#[derive(Debug, clap::Args)]
pub struct EtcdArgs {
    #[arg(
        long,
        env = "WEFT_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: String,
    #[arg(long, env = "WEFT_ETCD_PREFIX", default_value = "/weft/v1")]
    pub etcd_prefix: String,
    #[arg(long, env = "WEFT_ETCD_CACERT")]
    pub etcd_cacert: Option<String>,
    #[arg(long, env = "WEFT_ETCD_CERT")]
    pub etcd_cert: Option<String>,
    #[arg(long, env = "WEFT_ETCD_KEY")]
    pub etcd_key: Option<String>,
}

impl EtcdArgs {
    pub async fn connect(&self) -> Result<weft_etcd::Datastore, String> {
        let tls = weft_etcd::TlsFiles::from_parts(
            self.etcd_cacert.clone(),
            self.etcd_cert.clone(),
            self.etcd_key.clone(),
        );
        weft_etcd::Datastore::connect(&weft_etcd::EtcdConfig {
            endpoints: self
                .etcd_endpoints
                .split(',')
                .map(|s| s.trim().to_string())
                .collect(),
            prefix: self.etcd_prefix.clone(),
            timeout: Duration::from_secs(5),
            tls,
        })
        .await
        .map_err(|e| e.to_string())
    }
}
