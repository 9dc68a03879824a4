//! Fork snapshots: the pages a forked child inherits, kept between its parent's `ForkPrepare`
//! and the child's `Hello`.
//!
//! At a fork the parent's evicted pages become the child's too, copy-on-write in the family
//! store (see [`crate::protocol::store_layout`], "Fork families"). The snapshot holds the
//! child's member handle and the child's page list under a random token the parent passes to
//! the child (through its memory: the token is in the shim's data when it forks). The child
//! claims it with that token in its `Hello`; the monitor checks the child's uid (SO_PEERCRED)
//! against the parent's.
//!
//! A snapshot nobody claims is dropped (its pages released) when the child is known to be gone:
//! the parent names the child's pid in `ForkDone`, and the monitor watches a pidfd of it
//! (`pidfd_open` only: the monitor never acts on the child through it); a fork that failed is
//! dropped at once; one whose child pid is unknown after [`UNCLAIMED_TTL`].
//!
//! Owns: the registry of unclaimed snapshots. Must not touch: clients' page maps, uffds.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tracing::{info, warn};

use crate::store::{Handle, SharedStore};

/// How long a snapshot whose child pid the parent never reported waits to be claimed.
pub const UNCLAIMED_TTL: Duration = Duration::from_secs(120);

/// What a forked child inherits.
pub struct ForkSnapshot {
    pub parent_client: u64,
    pub parent_pid: i32,
    pub uid: u32,
    /// The child's member handle in the family store; `None` when the parent had nothing
    /// evicted (the child then starts a family of its own).
    pub store: Option<SharedStore>,
    /// The child's evicted pages: (page address, handle in the family store).
    pub pages: Vec<(u64, Handle)>,
    /// The parent's memory was registered (the child registers its own before it runs on).
    pub registered: bool,
    /// Not a fork: a program adopted after its monitor died (its own pages, its own store).
    pub adopted: bool,
    created: Instant,
    child_pidfd: Option<OwnedFd>,
}

impl ForkSnapshot {
    pub fn new(
        parent_client: u64,
        parent_pid: i32,
        uid: u32,
        store: Option<SharedStore>,
        pages: Vec<(u64, Handle)>,
        registered: bool,
    ) -> ForkSnapshot {
        ForkSnapshot {
            parent_client,
            parent_pid,
            uid,
            store,
            pages,
            registered,
            adopted: false,
            created: Instant::now(),
            child_pidfd: None,
        }
    }

    /// An adopted program's pages (see [`ForkSnapshot::adopted`]). Never released on drop:
    /// they stay in the store file, which the program holds too.
    pub fn adoption(uid: u32, store: SharedStore, pages: Vec<(u64, Handle)>) -> Self {
        let mut s = ForkSnapshot::new(0, 0, uid, Some(store), pages, true);
        s.adopted = true;
        s
    }

    /// Whether the child is known to be gone (its pidfd is readable), or the snapshot waited
    /// too long without a known child.
    fn expired(&self) -> bool {
        match &self.child_pidfd {
            Some(fd) => {
                let mut pfd = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: polling one pollfd on our stack, without waiting.
                unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
            }
            None => self.created.elapsed() > UNCLAIMED_TTL,
        }
    }
}

impl Drop for ForkSnapshot {
    fn drop(&mut self) {
        if self.adopted {
            return;
        }
        if let Some(store) = &mut self.store {
            store.release_all(self.pages.drain(..).map(|(_, h)| h));
        }
    }
}

/// Unclaimed snapshots by token.
#[derive(Default)]
pub struct Forks {
    map: Mutex<HashMap<u64, ForkSnapshot>>,
}

impl std::fmt::Debug for Forks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forks")
            .field("unclaimed", &self.len())
            .finish()
    }
}

impl Forks {
    /// Keeps `snap` and returns its token (random, nonzero).
    pub fn insert(&self, snap: ForkSnapshot) -> u64 {
        let mut map = self.map.lock();
        loop {
            let token = random_u64();
            if token != 0 && !map.contains_key(&token) {
                map.insert(token, snap);
                return token;
            }
        }
    }

    /// Claims the snapshot `token` for a child of uid `uid`. A wrong uid leaves it in place.
    pub fn claim(&self, token: u64, uid: u32) -> Result<ForkSnapshot, &'static str> {
        let mut map = self.map.lock();
        match map.get(&token) {
            None => Err(
                "no fork snapshot has this token (the child came too late, or the token is forged)",
            ),
            Some(s) if s.uid != uid => Err("the fork snapshot belongs to another uid"),
            Some(_) => Ok(map.remove(&token).expect("present")),
        }
    }

    /// The parent's `ForkDone`: the child is `child_pid`, or the fork failed.
    pub fn fork_done(&self, token: u64, child_pid: u32) {
        let mut map = self.map.lock();
        if child_pid == crate::protocol::wire::FORK_FAILED {
            if map.remove(&token).is_some() {
                info!(token, "fork failed: its snapshot is dropped");
            }
            return;
        }
        let Some(snap) = map.get_mut(&token) else {
            return; // claimed already
        };
        if child_pid == 0 || child_pid > i32::MAX as u32 {
            return;
        }
        // The child cannot have been reaped yet: its parent is still returning from fork().
        match pidfd_open(child_pid) {
            Ok(fd) => snap.child_pidfd = Some(fd),
            Err(e) => {
                // ESRCH: the child is gone (or not ours to see); its snapshot goes at the next
                // sweep if unclaimed by then.
                warn!(token, child_pid, "pidfd_open of a forked child failed: {e}");
                snap.created = Instant::now() - UNCLAIMED_TTL + Duration::from_secs(10);
            }
        }
    }

    /// Drops the snapshots whose child is gone. Cheap when there is none.
    pub fn sweep(&self) {
        let mut map = self.map.lock();
        if map.is_empty() {
            return;
        }
        map.retain(|token, s| {
            let keep = !s.expired();
            if !keep {
                warn!(
                    token,
                    parent_pid = s.parent_pid,
                    pages = s.pages.len(),
                    "a forked child never claimed its pages (it exited first): snapshot dropped"
                );
            }
            keep
        });
    }

    /// Unclaimed snapshots.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An exit watch on process `pid` (readable once it has exited): pidfd_open(2), nothing more.
pub(super) fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) with a pid and no flags returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn random_u64() -> u64 {
    let mut v = [0u8; 8];
    // SAFETY: getrandom(2) writes at most 8 bytes into our buffer.
    let n = unsafe { libc::getrandom(v.as_mut_ptr().cast(), 8, 0) };
    if n != 8 {
        // No entropy source: a token is only a lookup key (uid is checked); time will do.
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
    }
    u64::from_le_bytes(v)
}
