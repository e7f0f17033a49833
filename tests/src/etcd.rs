//! A real etcd for a lab, running inside one of the lab's namespaces.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::sh;

pub struct EtcdServer {
    child: Child,
    pub url: String,
    pub netns: String,
    pub data_dir: PathBuf,
}

impl EtcdServer {
    /// Starts etcd in `netns`, listening on `ip:port` and on the namespace's loopback.
    pub fn start(netns: &str, ip: &str, port: u16, dir: &std::path::Path) -> Result<Self> {
        let data_dir = dir.join("etcd");
        let url = format!("http://{ip}:{port}");
        let log = std::fs::File::create(dir.join("etcd.log"))?;
        let child = sh::command_in_ns(netns, "etcd")?
            .args([
                "--name",
                "lab",
                "--data-dir",
                data_dir.to_str().unwrap(),
                "--listen-client-urls",
                &format!("{url},http://127.0.0.1:{port}"),
                "--advertise-client-urls",
                &url,
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", port + 1),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", port + 1),
                "--initial-cluster",
                &format!("lab=http://127.0.0.1:{}", port + 1),
            ])
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting etcd (is the etcd-server package installed?)")?;
        let server = Self {
            child,
            url,
            netns: netns.to_string(),
            data_dir,
        };
        server.wait_ready(Duration::from_secs(20))?;
        Ok(server)
    }

    fn wait_ready(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let health = sh::in_ns(
                &self.netns,
                &["etcdctl", "--endpoints", &self.url, "endpoint", "health"],
            )?;
            if health.status.success() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("etcd at {} did not become healthy", self.url)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every key under `prefix` with its value (via etcdctl inside the lab).
    pub fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let out = sh::in_ns(
            &self.netns,
            &[
                "etcdctl",
                "--endpoints",
                &self.url,
                "get",
                "--prefix",
                prefix,
            ],
        )?;
        if !out.status.success() {
            bail!(
                "etcdctl get failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        Ok(lines
            .chunks(2)
            .filter(|pair| pair.len() == 2)
            .map(|pair| (pair[0].to_string(), pair[1].to_string()))
            .collect())
    }

    /// Writes one key (used by tests to plant records).
    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        let out = sh::in_ns(
            &self.netns,
            &["etcdctl", "--endpoints", &self.url, "put", key, value],
        )?;
        if !out.status.success() {
            bail!(
                "etcdctl put failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}
