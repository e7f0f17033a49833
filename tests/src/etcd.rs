//! A real etcd for a lab (one member or a cluster), running inside the lab's router namespace.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::sh;

/// Certificates for an etcd with TLS and client-certificate authentication.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl EtcdTls {
    /// Makes a CA, a server certificate for `ip` and a client certificate, with openssl.
    pub fn generate(dir: &Path, ip: &str) -> Result<Self> {
        let dir = dir.join("tls");
        std::fs::create_dir_all(&dir)?;
        let p = |name: &str| dir.join(name);
        let s = |path: PathBuf| path.to_str().unwrap().to_string();
        let ossl = |args: &[&str]| sh::run("openssl", args).map(|_| ());
        ossl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=weft-lab-ca",
            "-keyout",
            &s(p("ca.key")),
            "-out",
            &s(p("ca.pem")),
        ])?;
        std::fs::write(
            p("server.ext"),
            format!(
                "subjectAltName=IP:{ip},IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
            ),
        )?;
        std::fs::write(p("client.ext"), "extendedKeyUsage=clientAuth\n")?;
        for (name, ext) in [("server", "server.ext"), ("client", "client.ext")] {
            ossl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN=weft-{name}"),
                "-keyout",
                &s(p(&format!("{name}.key"))),
                "-out",
                &s(p(&format!("{name}.csr"))),
            ])?;
            ossl(&[
                "x509",
                "-req",
                "-in",
                &s(p(&format!("{name}.csr"))),
                "-CA",
                &s(p("ca.pem")),
                "-CAkey",
                &s(p("ca.key")),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &s(p(ext)),
                "-out",
                &s(p(&format!("{name}.pem"))),
            ])?;
        }
        Ok(Self {
            ca: p("ca.pem"),
            server_cert: p("server.pem"),
            server_key: p("server.key"),
            client_cert: p("client.pem"),
            client_key: p("client.key"),
        })
    }
}

/// One etcd member.
pub struct EtcdServer {
    child: Option<Child>,
    args: Vec<String>,
    pub name: String,
    pub url: String,
    pub netns: String,
    pub data_dir: PathBuf,
    log: PathBuf,
    tls: Option<EtcdTls>,
}

/// Where member `index` of a lab cluster listens: clients on (client port), peers on loopback.
pub fn member_ports(index: usize) -> (u16, u16) {
    let client = 2379 + 100 * index as u16;
    (client, client + 1)
}

impl EtcdServer {
    /// Starts member `index` of a cluster of `members` in `netns`.
    pub fn start_member(
        netns: &str,
        ip: &str,
        index: usize,
        members: usize,
        dir: &Path,
        tls: Option<EtcdTls>,
    ) -> Result<Self> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let (client, peer) = member_ports(index);
        let name = format!("m{index}");
        let url = format!("{scheme}://{ip}:{client}");
        let initial: Vec<String> = (0..members)
            .map(|i| format!("m{i}=http://127.0.0.1:{}", member_ports(i).1))
            .collect();
        let data_dir = dir.join(format!("etcd-{name}"));
        let mut args = vec![
            "--name".to_string(),
            name.clone(),
            "--data-dir".into(),
            data_dir.to_str().unwrap().into(),
            "--listen-client-urls".into(),
            format!("{url},{scheme}://127.0.0.1:{client}"),
            "--advertise-client-urls".into(),
            url.clone(),
            "--listen-peer-urls".into(),
            format!("http://127.0.0.1:{peer}"),
            "--initial-advertise-peer-urls".into(),
            format!("http://127.0.0.1:{peer}"),
            "--initial-cluster".into(),
            initial.join(","),
            "--initial-cluster-state".into(),
            "new".into(),
            // As an operator runs it (README, "Operating it"): without compaction every
            // attach and detach leaves revisions behind, and reads of a prefix slow with churn.
            "--auto-compaction-mode".into(),
            "periodic".into(),
            "--auto-compaction-retention".into(),
            "5m".into(),
        ];
        if let Some(tls) = &tls {
            for (flag, path) in [
                ("--cert-file", &tls.server_cert),
                ("--key-file", &tls.server_key),
                ("--trusted-ca-file", &tls.ca),
            ] {
                args.push(flag.into());
                args.push(path.to_str().unwrap().into());
            }
            args.push("--client-cert-auth".into());
        }
        let mut server = Self {
            child: None,
            args,
            log: dir.join(format!("etcd-{name}.log")),
            name,
            url,
            netns: netns.to_string(),
            data_dir,
            tls,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = sh::command_in_ns(&self.netns, "etcd")?
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting etcd (is the etcd-server package installed?)")?;
        self.child = Some(child);
        Ok(())
    }

    /// etcdctl arguments that reach this member (with client certificates under TLS).
    fn ctl_args(&self) -> Vec<String> {
        let mut args = vec![
            "etcdctl".to_string(),
            "--endpoints".into(),
            self.url.clone(),
        ];
        if let Some(tls) = &self.tls {
            for (flag, path) in [
                ("--cacert", &tls.ca),
                ("--cert", &tls.client_cert),
                ("--key", &tls.client_key),
            ] {
                args.push(flag.into());
                args.push(path.to_str().unwrap().into());
            }
        }
        args
    }

    fn etcdctl(&self, extra: &[&str]) -> Result<std::process::Output> {
        let mut args = self.ctl_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        sh::in_ns(&self.netns, &refs)
    }

    pub fn wait_ready(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.etcdctl(&["endpoint", "health"])?.status.success() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("etcd at {} did not become healthy", self.url)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Every key under `prefix` with its value.
    pub fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let out = self.etcdctl(&["get", "--prefix", prefix])?;
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

    /// Writes one key (tests use it to plant records).
    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        let out = self.etcdctl(&["put", key, value])?;
        if !out.status.success() {
            bail!(
                "etcdctl put failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Kills the member; its data stays for `restart`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
        }
    }

    /// Whether this member is the cluster's leader now (`etcdctl endpoint status`).
    pub fn is_leader(&self) -> Result<bool> {
        let out = self.etcdctl(&["endpoint", "status", "--write-out", "json"])?;
        if !out.status.success() {
            bail!(
                "etcdctl endpoint status: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let status = &v[0]["Status"];
        let me = status["header"]["member_id"].as_u64();
        Ok(me.is_some() && me == status["leader"].as_u64())
    }

    /// Lets the member outlive this value (a kept lab); `weft-lab down` ends it by its PID file.
    pub fn release(&mut self) {
        self.child = None;
    }

    /// Starts a stopped member again on its data.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        if let Some(i) = self.args.iter().position(|a| a == "new") {
            self.args[i] = "existing".into();
        }
        self.spawn()?;
        self.wait_ready(Duration::from_secs(30))
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}
