//! Network namespaces: opening and vetting a container's namespace, creating and deleting the
//! ones the agent owns, and opening netlink sockets inside a namespace.
//!
//! A namespace is only ever entered on a dedicated short-lived OS thread, only to create a socket
//! there; the socket keeps its namespace after the thread ends. Tokio workers never `setns`.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use tokio::task::JoinHandle;

/// Where named namespaces live (as with `ip netns`).
pub const NETNS_DIR: &str = "/run/netns";

/// `NS_GET_NSTYPE` from linux/nsfs.h: `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("netns {path}: no such file")]
    Missing { path: String },
    #[error("netns {path} cannot be opened: {source}")]
    Open { path: String, source: io::Error },
    #[error("netns {path} is not a namespace file")]
    NotNamespace { path: String },
    #[error("netns {path} is a {kind} namespace, not a network namespace")]
    WrongKind { path: String, kind: &'static str },
    #[error(
        "netns {path} is the host's own network namespace; refusing to wire a container into it"
    )]
    HostNamespace { path: String },
    #[error("cannot create network namespace {path}: {source}")]
    Create { path: String, source: io::Error },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter { path: String, source: io::Error },
}

/// The identity of a namespace: two paths name the same namespace when these are equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

/// An open, vetted network namespace file.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: String,
    id: NetnsId,
}

impl Netns {
    /// Opens `path` and checks that it is a network namespace other than the agent's own or
    /// the machine's (pid 1's): wiring a container into either would break the host.
    pub fn open(path: &str) -> Result<Self, NetnsError> {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK: opening a FIFO someone passed as "netns" must not hang the agent.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => NetnsError::Missing { path: path.into() },
                _ => NetnsError::Open {
                    path: path.into(),
                    source,
                },
            })?;
        // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd's namespace type.
        let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
        if kind < 0 {
            return Err(NetnsError::NotNamespace { path: path.into() });
        }
        if kind != libc::CLONE_NEWNET {
            return Err(NetnsError::WrongKind {
                path: path.into(),
                kind: kind_name(kind),
            });
        }
        let meta = file.metadata().map_err(|source| NetnsError::Open {
            path: path.into(),
            source,
        })?;
        for host in ["/proc/self/ns/net", "/proc/1/ns/net"] {
            if let Ok(host_meta) = std::fs::metadata(host) {
                if host_meta.dev() == meta.dev() && host_meta.ino() == meta.ino() {
                    return Err(NetnsError::HostNamespace { path: path.into() });
                }
            }
        }
        Ok(Self {
            file,
            path: path.to_string(),
            id: NetnsId {
                dev: meta.dev(),
                ino: meta.ino(),
            },
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn id(&self) -> NetnsId {
        self.id
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Opens a route-netlink connection inside this namespace. The connection task is aborted
    /// when the returned handle is dropped.
    pub async fn netlink(&self) -> Result<NetlinkHandle, NetnsError> {
        let fd = self.file.try_clone().map_err(|source| NetnsError::Enter {
            path: self.path.clone(),
            source,
        })?;
        let runtime = tokio::runtime::Handle::current();
        let path = self.path.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("weft-netns".into())
            .spawn(move || {
                let result = setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)
                    .and_then(|()| {
                        // The socket is created (and registered with the reactor) here, inside
                        // the namespace; the thread ends right after.
                        let _guard = runtime.enter();
                        rtnetlink::new_connection()
                    });
                let _ = tx.send(result);
            })
            .map_err(|source| NetnsError::Enter {
                path: path.clone(),
                source,
            })?;
        let (connection, handle, _) = rx
            .await
            .map_err(|_| NetnsError::Enter {
                path: path.clone(),
                source: io::Error::other("namespace thread died"),
            })?
            .map_err(|source| NetnsError::Enter { path, source })?;
        Ok(NetlinkHandle {
            handle,
            task: tokio::spawn(connection),
        })
    }
}

/// A netlink handle bound to one namespace, with its connection task.
pub struct NetlinkHandle {
    pub handle: rtnetlink::Handle,
    pub(crate) task: JoinHandle<()>,
}

impl NetlinkHandle {
    /// A connection in the agent's own namespace.
    pub fn here() -> io::Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        Ok(Self {
            handle,
            task: tokio::spawn(connection),
        })
    }
}

impl Drop for NetlinkHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn kind_name(kind: libc::c_int) -> &'static str {
    match kind {
        libc::CLONE_NEWNS => "mount",
        libc::CLONE_NEWUTS => "uts",
        libc::CLONE_NEWIPC => "ipc",
        libc::CLONE_NEWUSER => "user",
        libc::CLONE_NEWPID => "pid",
        libc::CLONE_NEWCGROUP => "cgroup",
        libc::CLONE_NEWTIME => "time",
        _ => "non-network",
    }
}

/// Path of a named namespace.
pub fn named_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Creates a named network namespace as `ip netns add` does: an empty file in /run/netns with a
/// fresh namespace bind-mounted on it. Fails if the name exists.
pub async fn create_named(name: &str) -> Result<PathBuf, NetnsError> {
    let path = named_path(name);
    let shown = path.display().to_string();
    let err = |source: io::Error| NetnsError::Create {
        path: shown.clone(),
        source,
    };
    std::fs::create_dir_all(NETNS_DIR).map_err(err)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(err)?;
    let target = path.clone();
    let made = tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || -> io::Result<()> {
            unshare(CloneFlags::CLONE_NEWNET)?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )?;
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
    })
    .await
    .unwrap_or_else(|e| Err(io::Error::other(e)));
    if let Err(source) = made {
        let _ = std::fs::remove_file(&path);
        return Err(err(source));
    }
    Ok(path)
}

/// The paths of the named namespaces whose name starts with `prefix`.
pub fn named_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return vec![];
    };
    let mut paths: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path().display().to_string())
        .collect();
    paths.sort();
    paths
}

/// Deletes a named namespace made by `create_named`. A missing one is not an error.
pub fn delete_named(path: &Path) -> io::Result<()> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(e.into()),
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
