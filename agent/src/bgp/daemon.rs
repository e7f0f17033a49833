//! bird as a process: where its files are, finding its binary, writing its configuration
//! atomically, and starting it so that it outlives the agent. bird daemonizes itself (forks,
//! `setsid`, stdio to /dev/null) and the process the agent spawns exits at once: the daemon is
//! never a child of the agent, so the agent neither reaps it nor takes it down when it stops,
//! restarts or crashes.

use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::control::{BirdControl, ControlError};
use super::BgpError;

/// bird's files under `--bgp-dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BirdFiles {
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pid: PathBuf,
}

impl BirdFiles {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            config: dir.join("bird.conf"),
            socket: dir.join("bird.ctl"),
            pid: dir.join("bird.pid"),
        }
    }
}

/// The first executable `name` in `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Writes `text` to `path` unless it holds exactly that already: a temporary file in the same
/// directory, synced, then renamed over it, so bird never reads half a file. Returns whether
/// it wrote.
pub fn write_config(path: &Path, text: &str) -> std::io::Result<bool> {
    if std::fs::read_to_string(path).is_ok_and(|current| current == text) {
        return Ok(false);
    }
    let temporary = path.with_extension("conf.tmp");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    Ok(true)
}

/// Has bird parse `config` without starting (`bird -p`): its complaint is the error.
pub async fn parse_check(bird: &Path, config: &Path) -> Result<(), BgpError> {
    let out = tokio::process::Command::new(bird)
        .arg("-p")
        .arg("-c")
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| BgpError::Spawn {
            bird: bird.to_path_buf(),
            source,
        })?;
    match out.status.success() {
        true => Ok(()),
        false => Err(BgpError::Rejected {
            config: config.to_path_buf(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }),
    }
}

/// How long a fresh bird may take to answer on its socket.
const START_LIMIT: Duration = Duration::from_secs(10);

/// Starts bird on `files` and waits until it answers on its socket.
pub async fn start(bird: &Path, files: &BirdFiles) -> Result<(), BgpError> {
    let mut command = tokio::process::Command::new(bird);
    command
        .arg("-c")
        .arg(&files.config)
        .arg("-s")
        .arg(&files.socket)
        .arg("-P")
        .arg(&files.pid)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // A session of its own from the first instruction: a signal to the agent's process group
    // (a terminal's ^C) never reaches bird, before or after it daemonizes.
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.as_std_mut().pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    // The spawned process forks the daemon and exits; waiting for it reaps only that one.
    let out = tokio::time::timeout(START_LIMIT, command.output())
        .await
        .map_err(|_| BgpError::StartTimeout {
            socket: files.socket.clone(),
            limit: START_LIMIT,
        })?
        .map_err(|source| BgpError::Spawn {
            bird: bird.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(BgpError::Rejected {
            config: files.config.clone(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    wait_answering(&BirdControl::new(&files.socket), START_LIMIT).await
}

async fn wait_answering(control: &BirdControl, limit: Duration) -> Result<(), BgpError> {
    let started = Instant::now();
    loop {
        match control.ping().await {
            Ok(()) => return Ok(()),
            Err(ControlError::NotRunning { .. }) if started.elapsed() < limit => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(ControlError::NotRunning { .. }) => {
                return Err(BgpError::StartTimeout {
                    socket: control.socket.clone(),
                    limit,
                })
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_are_replaced_whole_and_only_when_they_differ() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bird.conf");
        assert!(write_config(&path, "router id 198.51.100.1;\n").unwrap());
        assert!(!write_config(&path, "router id 198.51.100.1;\n").unwrap());
        assert!(write_config(&path, "router id 198.51.100.2;\n").unwrap());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "router id 198.51.100.2;\n"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["bird.conf"]);
    }

    #[test]
    fn files_live_in_the_bgp_dir() {
        let files = BirdFiles::in_dir(Path::new("/run/weft/bird"));
        assert_eq!(files.config, Path::new("/run/weft/bird/bird.conf"));
        assert_eq!(files.socket, Path::new("/run/weft/bird/bird.ctl"));
        assert_eq!(files.pid, Path::new("/run/weft/bird/bird.pid"));
    }

    #[test]
    fn executables_are_found_in_path() {
        assert!(find_in_path("sh").is_some());
        assert!(find_in_path("no-such-program-weft").is_none());
    }
}
