//! The agent's local journal of its endpoints: one file per endpoint in the state directory
//! (`--state-dir`, under /run by default, so it lives exactly as long as the veths it
//! describes). etcd is the fabric's truth; the journal is this host's memory of what it wired,
//! so that endpoints whose records were removed behind its back (an operator's `host remove`,
//! peers removing a host they thought dead) can be registered again, even across a restart,
//! instead of being taken for strangers.

use std::io;
use std::path::{Path, PathBuf};

use weft_etcd::records::EndpointRecord;

pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// Opens (creating) the journal in `dir`.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let dir = dir.join("endpoints");
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    fn path(&self, container_id: &str) -> PathBuf {
        // Container ids are [A-Za-z0-9_.-] and never start with '.': safe file names.
        self.dir.join(format!("{container_id}.json"))
    }

    /// Records an endpoint (replacing an older entry), atomically.
    pub fn write(&self, record: &EndpointRecord) -> io::Result<()> {
        let path = self.path(&record.container_id);
        let temporary = path.with_extension("json.new");
        std::fs::write(&temporary, weft_etcd::records::encode(record))?;
        std::fs::rename(&temporary, &path)
    }

    fn marker(&self, container_id: &str) -> PathBuf {
        self.dir.join(format!("{container_id}.wiring"))
    }

    /// Marks an endpoint as being wired: an agent killed before [`Journal::wired`] leaves the
    /// mark, and the next one verifies and repairs that endpoint at start.
    pub fn wiring(&self, container_id: &str) -> io::Result<()> {
        std::fs::write(self.marker(container_id), b"")
    }

    /// Clears the wiring mark.
    pub fn wired(&self, container_id: &str) -> io::Result<()> {
        remove_file(&self.marker(container_id))
    }

    /// The endpoints whose wiring was interrupted.
    pub fn unfinished(&self) -> io::Result<Vec<String>> {
        let mut ids = vec![];
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".wiring") {
                ids.push(id.to_string());
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Forgets an endpoint (and any wiring mark); one not recorded is not an error.
    pub fn remove(&self, container_id: &str) -> io::Result<()> {
        remove_file(&self.marker(container_id))?;
        remove_file(&self.path(container_id))
    }

    /// Every recorded endpoint; unreadable entries are reported and skipped.
    pub fn load(&self) -> io::Result<Vec<EndpointRecord>> {
        let mut records = vec![];
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path).map(|bytes| serde_json::from_slice(&bytes)) {
                Ok(Ok(record)) => records.push(record),
                Ok(Err(e)) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping unreadable journal entry")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping unreadable journal entry")
                }
            }
        }
        records.sort_by(|a: &EndpointRecord, b| a.container_id.cmp(&b.container_id));
        Ok(records)
    }
}

fn remove_file(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> EndpointRecord {
        EndpointRecord {
            container_id: id.into(),
            host: "h1".into(),
            ip: "10.65.0.5".parse().unwrap(),
            host_ifname: "weft1".into(),
            ifname: "eth0".into(),
            mac: "02:00:00:00:00:01".into(),
            netns: "/run/netns/x".into(),
            owns_netns: false,
            ports: vec![],
            created: 1,
            secondary: false,
            labels: Default::default(),
            ipv6: None,
        }
    }

    #[test]
    fn entries_round_trip_and_go() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        journal.write(&record("b")).unwrap();
        journal.write(&record("a")).unwrap();
        let mut changed = record("a");
        changed.ip = "10.65.0.6".parse().unwrap();
        journal.write(&changed).unwrap();
        std::fs::write(dir.path().join("endpoints/broken.json"), "{").unwrap();
        assert_eq!(journal.load().unwrap(), vec![changed, record("b")]);
        journal.remove("a").unwrap();
        journal.remove("a").unwrap();
        assert_eq!(journal.load().unwrap(), vec![record("b")]);
    }

    #[test]
    fn interrupted_wiring_is_remembered_until_done_or_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        journal.write(&record("a")).unwrap();
        journal.wiring("a").unwrap();
        journal.wiring("b").unwrap();
        assert_eq!(journal.unfinished().unwrap(), vec!["a", "b"]);
        assert_eq!(
            journal.load().unwrap(),
            vec![record("a")],
            "marks are not entries"
        );
        journal.wired("a").unwrap();
        journal.remove("b").unwrap();
        assert!(journal.unfinished().unwrap().is_empty());
    }
}
