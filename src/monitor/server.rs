//! The monitor's front door: the listening socket, the handshake with each client, the client
//! registry, and status requests.
//!
//! A connection's first packet decides what it is: a `Hello` with one descriptor attached (a
//! program forwarding its userfaultfd) or a `StatusRequest` (`uswap status`). Anything else is
//! answered with an `Error` naming what was wrong, and closed; other clients are unaffected.
//!
//! `uswap status` shows a peer only the programs of its own uid (root and the daemon's own
//! user see every program).
//!
//! Owns: accepting, identifying peers (SO_PEERCRED, never the pid a client claims), the
//! daemon's admission rules (allow list of uids/gids, clients per uid, connections waiting for
//! their first packet per uid, the store quota shared by one uid's clients), per-client
//! threads and their cleanup. Must not: hold a client's lock while talking to another client.
//!
//! A refused peer gets an `Error` packet naming the rule and the value (and the daemon logs
//! it); nothing it sends can affect another client: each client has its own thread, its own
//! descriptor and its own state, and every action on a program goes through the descriptor
//! that program forwarded. A refused `Hello`'s descriptors are closed before the refusal is
//! sent: a shim that acts on the refusal (a refused forked child registering its memory again
//! for its own rescue) never finds its ranges still held by a copy in the monitor.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use parking_lot::Mutex;
use tracing::{info, warn};

use super::client::{signal, Client, ClientId, ClientLimits, UidStore};
use super::forks::{ForkSnapshot, Forks};
use super::stats::ClientReport;
use crate::config::{load_program_config, DaemonConfig, Overrides, ProgramConfig};
use crate::protocol::io::{recv_packet, send_packet};
use crate::protocol::wire::{
    HelloAck, Msg, HELLO_ACK_DISK, HELLO_ADOPT, MAX_MSG_LEN, STATUS_DAEMON,
};
use crate::store::{SharedStore, Store};
use crate::uffd::Uffd;

/// How the monitor resolves each client's configuration.
#[derive(Debug, Clone, Default)]
pub struct MonitorOptions {
    /// Where `default.toml` and `<program>.toml` live.
    pub config_dir: Option<PathBuf>,
    /// Overrides applied on top of every client's files and its own overrides (the embedded
    /// monitor of `uswap run` passes its flags here).
    pub overrides: Overrides,
    /// How many finished clients' reports to keep for `uswap status` / `uswap run`.
    pub keep_finished: usize,
    /// Admission rules and per-uid limits (`daemon.toml`; defaults for `uswap run`).
    pub daemon: DaemonConfig,
}

/// Connections of one uid that may wait for their first packet at once; more are refused at
/// once (each holds a thread for up to `FIRST_PACKET_TIMEOUT_S`).
pub const MAX_PENDING_PER_UID: usize = 16;
/// How long a new connection may take to send its first packet, in seconds.
const FIRST_PACKET_TIMEOUT_S: i64 = 5;

pub struct Monitor {
    opts: MonitorOptions,
    next_id: AtomicU64,
    clients: Mutex<Vec<Arc<Client>>>,
    finished: Mutex<VecDeque<ClientReport>>,
    stopping: AtomicBool,
    /// Connections per uid that have not sent their first packet yet.
    pending: Mutex<HashMap<u32, usize>>,
    /// Store bytes held by all clients of one uid (for `max_store_per_uid`).
    uid_store: Mutex<HashMap<u32, Arc<UidStore>>>,
    /// Fork snapshots waiting for their child's `Hello`.
    forks: Arc<Forks>,
    /// Stores adopted from programs whose monitor died, by the store file's (device, inode),
    /// with the uid of their programs.
    #[allow(clippy::type_complexity)]
    adopted: Mutex<HashMap<(u64, u64), (std::sync::Weak<parking_lot::Mutex<Store>>, u32)>>,
    /// Compression workers shared by every client (daemon config `compress_threads`).
    compress: Option<Arc<super::compress::Pool>>,
    /// Idle-time recompression threads (daemon config `recompress_threads`).
    recompress: Option<Arc<super::recompress::Recompressor>>,
}

/// Kernel-reported credentials of a connection's peer.
#[derive(Debug, Clone, Copy)]
struct Peer {
    pid: i32,
    uid: u32,
    gid: u32,
}

/// Decrements a uid's count of connections waiting for their first packet when dropped.
struct PendingGuard<'a> {
    monitor: &'a Monitor,
    uid: u32,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let mut p = self.monitor.pending.lock();
        if let Some(n) = p.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                p.remove(&self.uid);
            }
        }
    }
}

/// A bound, listening SOCK_SEQPACKET socket; the path is removed on drop, unless the socket
/// was handed over by systemd (which owns the file).
pub struct Listener {
    fd: OwnedFd,
    path: PathBuf,
    remove_on_drop: bool,
}

impl Drop for Listener {
    fn drop(&mut self) {
        super::keeper::forget_listener(self.fd.as_raw_fd());
        if self.remove_on_drop {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn sockaddr(path: &Path) -> anyhow::Result<(libc::sockaddr_un, libc::socklen_t)> {
    use std::os::unix::ffi::OsStrExt;
    crate::protocol::io::unix_sockaddr(path.as_os_str().as_bytes()).with_context(|| {
        format!(
            "socket path {} is empty or longer than 107 bytes",
            path.display()
        )
    })
}

fn seqpacket_socket() -> anyhow::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket(AF_UNIX, SOCK_SEQPACKET)");
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Connects to a monitor's socket.
pub fn connect(path: &Path) -> anyhow::Result<OwnedFd> {
    let fd = seqpacket_socket()?;
    let (addr, len) = sockaddr(path)?;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    if unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    } < 0
    {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("connecting to {}", path.display()));
    }
    Ok(fd)
}

impl Listener {
    /// Binds `path` with mode `mode` (0600 by default: only the owner's programs may connect).
    /// A stale socket file (nobody answering) is replaced; a live one is an error.
    pub fn bind(path: &Path, mode: u32) -> anyhow::Result<Listener> {
        if path.exists() {
            if monitor_listening(path) {
                bail!("a monitor is already listening on {}", path.display());
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let fd = seqpacket_socket()?;
        let (addr, len) = sockaddr(path)?;
        // SAFETY: setting the umask around bind so the socket is never briefly world-accessible.
        let old = unsafe { libc::umask(0o177) };
        // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        };
        // SAFETY: restoring the previous umask.
        unsafe { libc::umask(old) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("binding {}", path.display()));
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", path.display()))?;
        // SAFETY: listen on our bound socket.
        if unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
            return Err(std::io::Error::last_os_error()).context("listen");
        }
        super::keeper::note_listener(fd.as_raw_fd());
        Ok(Listener {
            fd,
            path: path.to_path_buf(),
            remove_on_drop: true,
        })
    }

    /// A socket that is already bound and listening, received from systemd (the caller checked
    /// it is a listening AF_UNIX SOCK_SEQPACKET socket: `ops::activation`). Its file is left
    /// in place on drop.
    pub fn from_listening_fd(fd: OwnedFd, path: PathBuf) -> Listener {
        super::keeper::note_listener(fd.as_raw_fd());
        Listener {
            fd,
            path,
            remove_on_drop: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Peer credentials from the kernel (fixed at connect time; a client cannot forge them).
fn peer_cred(fd: RawFd) -> Peer {
    // SAFETY: ucred is plain old data; getsockopt writes at most `len` bytes into it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: as above.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        // Cannot happen on a connected AF_UNIX socket; fail closed: (uid_t)-1 is on no list.
        return Peer {
            pid: 0,
            uid: u32::MAX,
            gid: u32::MAX,
        };
    }
    Peer {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    }
}

fn send_error(fd: RawFd, code: u32, text: &str) {
    let mut buf = vec![0u8; 1024];
    let text = &text.as_bytes()[..text.len().min(900)];
    if let Ok(n) = (Msg::Error { code, text }).encode(&mut buf) {
        let _ = send_packet(fd, &buf[..n], &[]);
    }
}

/// Closes a connection without resetting it: a peer whose last packets were never read (a
/// refused client that sent its Hello right after connecting) would otherwise get
/// ECONNRESET instead of the `Error` queued for it. Stops sending, then reads and discards
/// for at most [`LINGER_MS`] until the peer closes.
fn linger_close(conn: OwnedFd) {
    let fd = conn.as_raw_fd();
    // SAFETY: shutdown(2) of our own socket; errors (peer already gone) are harmless.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    let end = std::time::Instant::now() + Duration::from_millis(LINGER_MS);
    let mut buf = [0u8; 256];
    loop {
        let left = end.saturating_duration_since(std::time::Instant::now());
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polling one pollfd on our stack.
        if left.is_zero() || unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) } <= 0 {
            break;
        }
        // A truncated packet (ours is small) or attached descriptors are discarded and closed.
        match recv_packet(fd, &mut buf, libc::MSG_DONTWAIT) {
            Ok(Some(_)) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => continue,
            _ => break, // end of stream, or an error
        }
    }
    drop(conn);
}

/// The userfaultfd features this kernel offers, probed once; `None` if the monitor cannot
/// create a userfaultfd itself (an unprivileged monitor needs none: it only uses forwarded
/// ones), in which case a client's claimed features are not checked.
fn kernel_features() -> Option<u64> {
    static FEATURES: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *FEATURES.get_or_init(|| crate::uffd::probe_features().ok())
}

/// Longest time a closing connection waits for its peer to hang up, in milliseconds.
const LINGER_MS: u64 = 200;

impl Monitor {
    pub fn new(opts: MonitorOptions) -> Arc<Monitor> {
        let workers = opts
            .daemon
            .compress_threads
            .unwrap_or_else(super::compress::Pool::default_workers);
        let compress = if workers == 0 {
            None
        } else {
            match super::compress::Pool::new(workers) {
                Ok(p) => Some(Arc::new(p)),
                Err(e) => {
                    warn!("cannot start {workers} compression workers ({e}): control threads compress alone");
                    None
                }
            }
        };
        let threads = opts.daemon.recompress_threads;
        let recompress = if threads == 0 {
            None
        } else {
            match super::recompress::Recompressor::new(threads) {
                Ok(p) => Some(Arc::new(p)),
                Err(e) => {
                    warn!("cannot start {threads} recompression threads ({e}): no idle-time recompression");
                    None
                }
            }
        };
        Arc::new(Monitor {
            compress,
            recompress,
            opts,
            next_id: AtomicU64::new(1),
            clients: Mutex::new(Vec::new()),
            finished: Mutex::new(VecDeque::new()),
            stopping: AtomicBool::new(false),
            pending: Mutex::new(HashMap::new()),
            uid_store: Mutex::new(HashMap::new()),
            forks: Arc::default(),
            adopted: Mutex::new(HashMap::new()),
        })
    }

    /// Accepts connections until `stop` is called; each connection gets its own thread.
    pub fn serve(self: &Arc<Self>, listener: &Listener) -> anyhow::Result<()> {
        let lfd = listener.fd.as_raw_fd();
        while !self.stopping.load(Ordering::Acquire) {
            let mut pfd = libc::pollfd {
                fd: lfd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polling one pollfd on our stack.
            if unsafe { libc::poll(&mut pfd, 1, 200) } <= 0 {
                continue;
            }
            // SAFETY: accept4 on our listening socket; returns a new descriptor or -1.
            let fd = unsafe {
                libc::accept4(
                    lfd,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                continue;
            }
            // SAFETY: a fresh descriptor we own.
            let conn = unsafe { OwnedFd::from_raw_fd(fd) };
            let me = Arc::clone(self);
            std::thread::Builder::new()
                .name("uswap-conn".into())
                .spawn(move || {
                    if let Err(e) = me.connection(&conn) {
                        warn!("client connection: {e:#}");
                    }
                    linger_close(conn);
                })
                .context("spawning a connection thread")?;
        }
        Ok(())
    }

    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Live and recently finished clients: live ones first, then finished ones, oldest first.
    pub fn reports(&self) -> Vec<ClientReport> {
        // Both locks held (clients first, as `run_client` takes them): a client moving from
        // live to finished meanwhile shows up once, not twice or not at all.
        let live = self.clients.lock();
        let mut v: Vec<ClientReport> = live.iter().map(|c| c.report(true)).collect();
        v.extend(self.finished.lock().iter().cloned());
        v
    }

    /// The store of a program whose monitor died, from the store file it handed over. A fork
    /// family's members adopt one store: the first builds it from the file, the others find
    /// it by the file's inode. Only the pages carrying `member`'s owner bit are this
    /// program's. `disk` is the disk tier's file, if the program had one (a member that finds
    /// its family's store adopted already needs none).
    fn adopt_store(
        &self,
        file: std::fs::File,
        disk: Option<std::fs::File>,
        member: u32,
        pid: i32,
        uid: u32,
        cfg: &ProgramConfig,
    ) -> Result<ForkSnapshot, String> {
        use std::os::unix::fs::MetadataExt;
        let meta = file
            .metadata()
            .map_err(|e| format!("fstat of the store file: {e}"))?;
        let key = (meta.dev(), meta.ino());
        let mut reg = self.adopted.lock();
        reg.retain(|_, (w, _)| w.strong_count() > 0);
        let family = match reg.get(&key) {
            Some((w, owner)) => {
                if *owner != uid {
                    return Err("the store file belongs to another uid's programs".into());
                }
                w.upgrade().ok_or("the store's family just ended")?
            }
            None => {
                let disk = disk
                    .map(crate::store::DiskFile::adopt)
                    .transpose()?
                    .map(|d| (d, cfg.max_disk_bytes));
                let (store, _) = Store::adopt(file, cfg.max_store_bytes, disk)?;
                let family = Arc::new(parking_lot::Mutex::new(store));
                reg.insert(key, (Arc::downgrade(&family), uid));
                family
            }
        };
        drop(reg);
        let shared = SharedStore::adopted(&family, member as u8)
            .ok_or_else(|| format!("member {member} of this store is attached already"))?;
        let pages = shared.lock().member_pages(member as u8);
        info!(
            pid,
            member,
            pages = pages.len(),
            "adopting a program whose monitor died"
        );
        Ok(ForkSnapshot::adoption(uid, shared, pages))
    }

    /// The daemon's own figures: every store's mapped bytes, clients, unclaimed forks.
    pub fn daemon_status(&self) -> serde_json::Value {
        serde_json::json!({
            "store_mapped_bytes": crate::store::all_mapped_bytes(),
            "disk_mapped_bytes": crate::store::all_disk_bytes(),
            "clients_attached": self.live_clients(),
            "fork_snapshots_unclaimed": self.forks.len(),
        })
    }

    pub fn live_clients(&self) -> usize {
        self.clients.lock().len()
    }

    /// Admission by kernel-reported credentials, before anything is read from the peer.
    fn admit(&self, peer: Peer) -> Result<PendingGuard<'_>, String> {
        if !self.opts.daemon.allows(peer.uid, peer.gid) {
            return Err(format!(
                "uid {} (gid {}) is not allowed to use this monitor (daemon config allow_uids/allow_gids)",
                peer.uid, peer.gid
            ));
        }
        let mut p = self.pending.lock();
        let n = p.entry(peer.uid).or_insert(0);
        if *n >= MAX_PENDING_PER_UID {
            return Err(format!(
                "uid {} has {MAX_PENDING_PER_UID} connections waiting for their first packet already",
                peer.uid
            ));
        }
        *n += 1;
        Ok(PendingGuard {
            monitor: self,
            uid: peer.uid,
        })
    }

    /// The store usage shared by `uid`'s clients, when a per-uid quota is configured.
    fn uid_store(&self, uid: u32) -> Option<Arc<UidStore>> {
        let limit = self.opts.daemon.max_store_per_uid_bytes?;
        let mut m = self.uid_store.lock();
        m.retain(|_, s| Arc::strong_count(s) > 1 || s.bytes.load(Ordering::Relaxed) > 0);
        Some(Arc::clone(m.entry(uid).or_insert_with(|| {
            Arc::new(UidStore {
                bytes: AtomicU64::new(0),
                limit_bytes: limit,
            })
        })))
    }

    fn connection(self: &Arc<Self>, conn: &OwnedFd) -> anyhow::Result<()> {
        let fd = conn.as_raw_fd();
        let peer = peer_cred(fd);
        let (peer_pid, peer_uid) = (peer.pid, peer.uid);
        let pending = match self.admit(peer) {
            Ok(g) => g,
            Err(why) => {
                send_error(fd, libc::EACCES as u32, &why);
                bail!("peer pid {peer_pid} refused: {why}");
            }
        };
        crate::protocol::io::set_recv_timeout(fd, FIRST_PACKET_TIMEOUT_S);
        let mut buf = vec![0u8; MAX_MSG_LEN];
        let first = recv_packet(fd, &mut buf, 0);
        drop(pending);
        let mut got = match first {
            Ok(Some(got)) => got,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                send_error(
                    fd,
                    libc::EMSGSIZE as u32,
                    &format!("first packet refused: {e}"),
                );
                bail!("peer pid {peer_pid} uid {peer_uid}: first packet refused: {e}");
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN)) => {
                send_error(
                    fd,
                    libc::ETIMEDOUT as u32,
                    &format!("no first packet within {FIRST_PACKET_TIMEOUT_S} s"),
                );
                bail!("peer pid {peer_pid} uid {peer_uid}: no first packet within {FIRST_PACKET_TIMEOUT_S} s");
            }
            Err(e) => return Err(e).context("reading the first packet"),
        };
        let msg = match Msg::decode(&buf[..got.len]) {
            Ok(m) => m,
            Err(e) => {
                send_error(
                    fd,
                    libc::EPROTO as u32,
                    &format!("malformed first packet: {e}"),
                );
                bail!("peer pid {peer_pid} uid {peer_uid}: malformed first packet: {e}");
            }
        };
        if !matches!(msg, Msg::Hello(_)) && got.fd_count() > 0 {
            send_error(
                fd,
                libc::EINVAL as u32,
                &format!(
                    "message kind {} carries descriptors; only Hello may",
                    msg.kind()
                ),
            );
            bail!(
                "peer pid {peer_pid}: descriptors attached to kind {}",
                msg.kind()
            );
        }
        match msg {
            Msg::StatusRequest { flags } if flags & STATUS_DAEMON != 0 => {
                let json = serde_json::to_vec(&self.daemon_status())?;
                let mut out = vec![0u8; MAX_MSG_LEN];
                let n = Msg::StatusReply { json: &json }.encode(&mut out)?;
                send_packet(fd, &out[..n], &[])?;
                Ok(())
            }
            Msg::StatusRequest { .. } => {
                // Each user sees its own programs; root and the daemon's own user see all.
                // SAFETY: geteuid has no preconditions.
                let all = peer_uid == 0 || peer_uid == unsafe { libc::geteuid() };
                let mut reports: Vec<ClientReport> = self
                    .reports()
                    .into_iter()
                    .filter(|r| all || r.uid == peer_uid)
                    .collect();
                let json = status_json_fitting(&mut reports, MAX_MSG_LEN - 64)?;
                let mut out = vec![0u8; MAX_MSG_LEN];
                let n = Msg::StatusReply { json: &json }.encode(&mut out)?;
                send_packet(fd, &out[..n], &[])?;
                Ok(())
            }
            Msg::Hello(h) => {
                let Some(uffd_fd) = got.take_fd(0) else {
                    send_error(fd, libc::EINVAL as u32, "Hello carries no userfaultfd");
                    bail!("peer pid {peer_pid}: Hello without a descriptor");
                };
                // A program whose monitor died hands its store file over too, and its disk
                // tier's file if it has one.
                let adopt_file = if h.flags & HELLO_ADOPT != 0 {
                    match got.take_fd(1) {
                        Some(f) => Some((
                            std::fs::File::from(f),
                            got.take_fd(2).map(std::fs::File::from),
                        )),
                        None => {
                            send_error(
                                fd,
                                libc::EINVAL as u32,
                                "Hello asks for adoption but carries no store file",
                            );
                            bail!("peer pid {peer_pid}: adoption Hello without a store file");
                        }
                    }
                } else {
                    None
                };
                if got.fd_count() > 0 {
                    send_error(
                        fd,
                        libc::EINVAL as u32,
                        "Hello carries more than one descriptor (two or three when adopting)",
                    );
                    bail!("peer pid {peer_pid}: Hello with extra descriptors");
                }
                let uffd = match Uffd::from_received(uffd_fd, h.uffd_features) {
                    Ok(u) => u,
                    Err(e) => {
                        send_error(
                            fd,
                            libc::EBADF as u32,
                            &format!("the descriptor attached to Hello is not a userfaultfd: {e}"),
                        );
                        bail!("peer pid {peer_pid}: descriptor is not a userfaultfd: {e}");
                    }
                };
                if h.page_size as usize != crate::PAGE_SIZE {
                    let why = format!(
                        "Hello: page size {} (this monitor manages {}-byte pages)",
                        h.page_size,
                        crate::PAGE_SIZE
                    );
                    drop(uffd);
                    send_error(fd, libc::EINVAL as u32, &why);
                    bail!("peer pid {peer_pid}: {why}");
                }
                if let Some(extra) = kernel_features().map(|k| h.uffd_features & !k) {
                    if extra != 0 {
                        let why = format!(
                            "Hello claims userfaultfd features {extra:#x} this kernel does not offer"
                        );
                        drop(uffd);
                        send_error(fd, libc::EINVAL as u32, &why);
                        bail!("peer pid {peer_pid}: {why}");
                    }
                }
                // Informational only (a program in another pid namespace sees another number).
                if h.pid != peer_pid as u32 {
                    info!(
                        claimed = h.pid,
                        pid = peer_pid,
                        uid = peer_uid,
                        "Hello claims another pid; the peer is identified by SO_PEERCRED"
                    );
                }
                let name = String::from_utf8_lossy(h.name).into_owned();
                let app = String::from_utf8_lossy(h.app).into_owned();
                let cfg = match self
                    .client_config(if app.is_empty() { &name } else { &app }, h.overrides)
                {
                    Ok(c) => c,
                    Err(e) => {
                        let text = format!("{e:#}");
                        let mut out = vec![0u8; 2048];
                        let t = &text.as_bytes()[..text.len().min(1800)];
                        let n = Msg::HelloAck(HelloAck {
                            status: libc::EINVAL,
                            store_member: 0,
                            window_len_bytes: 0,
                            flags: 0,
                            text: t,
                        })
                        .encode(&mut out)?;
                        drop(uffd);
                        let _ = send_packet(fd, &out[..n], &[]);
                        bail!("client {name} (pid {peer_pid}): {text}");
                    }
                };
                // A forked child claims the pages it inherited from its parent; an adopted
                // program brings its own.
                let inherit = if let Some((file, disk)) = adopt_file {
                    match self.adopt_store(file, disk, h.store_member, peer_pid, peer_uid, &cfg) {
                        Ok(snap) => Some(snap),
                        Err(why) => {
                            let why = format!("cannot adopt this program: {why}");
                            drop(uffd);
                            send_error(fd, libc::EINVAL as u32, &why);
                            bail!("peer pid {peer_pid}: {why}");
                        }
                    }
                } else if h.fork_token != 0 {
                    match self.forks.claim(h.fork_token, peer_uid) {
                        Ok(snap) => Some(snap),
                        Err(why) => {
                            let why = format!(
                                "Hello of a child forked from pid {}: {why}",
                                h.forked_from
                            );
                            drop(uffd);
                            send_error(fd, libc::ENOENT as u32, &why);
                            bail!("peer pid {peer_pid}: {why}");
                        }
                    }
                } else {
                    None
                };
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let limits = ClientLimits {
                    agent_timeout: self.opts.daemon.agent_timeout,
                    uid_store: self.uid_store(peer_uid),
                    forks: Arc::clone(&self.forks),
                    compress: self.compress.clone(),
                    recompress: self.recompress.clone(),
                };
                let who = ClientId {
                    id,
                    pid: peer_pid,
                    uid: peer_uid,
                    name: name.clone(),
                };
                let (client, memfd, store_fd, disk_fd) =
                    Client::new(who, cfg, uffd, limits, inherit)?;
                let client = Arc::new(client);
                // Counted and registered in one hold of the registry lock, before the
                // acknowledgement: concurrent Hellos of one uid cannot pass the cap together,
                // and an acknowledged client is always in `uswap status`.
                {
                    let max = self.opts.daemon.max_clients_per_uid as usize;
                    let mut clients = self.clients.lock();
                    let attached = clients.iter().filter(|c| c.uid == peer_uid).count();
                    if attached >= max {
                        drop(clients);
                        drop((client, memfd, store_fd, disk_fd));
                        let why = format!(
                            "uid {peer_uid} has {attached} programs attached already (daemon config max_clients_per_uid = {max})"
                        );
                        send_error(fd, libc::EUSERS as u32, &why);
                        bail!("peer pid {peer_pid} refused: {why}");
                    }
                    clients.push(Arc::clone(&client));
                }
                let mut out = vec![0u8; 256];
                let store_member = u32::from(client.state.lock().store.member());
                let n = Msg::HelloAck(HelloAck {
                    status: 0,
                    store_member,
                    window_len_bytes: client.win().len_bytes() as u64,
                    flags: if disk_fd.is_some() { HELLO_ACK_DISK } else { 0 },
                    text: b"",
                })
                .encode(&mut out)?;
                // The disk file goes to the shim too: if this monitor dies, the pages in it
                // are brought home from there (DESIGN.md, "Disk tier").
                let mut fds = vec![
                    memfd.as_raw_fd(),
                    client.req_efd.as_raw_fd(),
                    client.done_efd.as_raw_fd(),
                    store_fd.as_raw_fd(),
                ];
                fds.extend(disk_fd.as_ref().map(|f| f.as_raw_fd()));
                if let Err(e) = send_packet(fd, &out[..n], &fds) {
                    self.clients.lock().retain(|c| c.id != id);
                    return Err(e).context("sending HelloAck");
                }
                drop(memfd);
                drop(store_fd);
                drop(disk_fd);
                info!(client = id, pid = peer_pid, uid = peer_uid, name = %name, budget = ?client.cfg.budget_bytes, forked_from = client.forked_from, store_member, "client attached");
                self.run_client(client, fd)
            }
            other => {
                send_error(
                    fd,
                    libc::EPROTO as u32,
                    &format!(
                        "first message must be Hello or StatusRequest, not kind {}",
                        other.kind()
                    ),
                );
                bail!(
                    "peer pid {peer_pid}: unexpected first message kind {}",
                    other.kind()
                );
            }
        }
    }

    fn client_config(&self, program: &str, overrides_text: &[u8]) -> anyhow::Result<ProgramConfig> {
        let mut client_over = Overrides::default();
        if !overrides_text.is_empty() {
            let text =
                std::str::from_utf8(overrides_text).context("USWAP_OVERRIDES is not UTF-8")?;
            let table: toml::Table = text
                .parse()
                .map_err(|e| anyhow::anyhow!("USWAP_OVERRIDES: TOML syntax error: {e}"))?;
            for (k, v) in table {
                let s = match v {
                    toml::Value::String(s) => s,
                    other => other.to_string(),
                };
                client_over
                    .set_str(&k, &s)
                    .map_err(|e| anyhow::anyhow!("USWAP_OVERRIDES: {e}"))?;
            }
        }
        let (mut cfg, _files) =
            load_program_config(self.opts.config_dir.as_deref(), program, None, &client_over)?;
        self.opts.overrides.apply_to(&mut cfg);
        Ok(cfg)
    }

    fn run_client(self: &Arc<Self>, client: Arc<Client>, sock: RawFd) -> anyhow::Result<()> {
        // Registered in `self.clients` by `connection` already.
        let fault_client = Arc::clone(&client);
        let fault = std::thread::Builder::new()
            .name(format!("uswap-fault-{}", client.id))
            .spawn(move || super::fault::run(fault_client))
            .context("spawning the fault thread")?;
        crate::protocol::io::set_recv_timeout(sock, 0);
        let result = client.control_loop(sock);
        client
            .counters
            .control_thread_cpu_ns
            .store(super::stats::thread_cpu_ns(), Ordering::Relaxed);
        match &result {
            Err(e) => {
                warn!(client = client.id, "disconnecting: {e:#}");
                send_error(sock, libc::EPROTO as u32, &format!("{e:#}"));
                // The program is still alive: hand its memory back before letting go of it.
                client.give_everything_back();
            }
            // End of stream. Normally the program is gone (exit, exec) and the first copy
            // fails at once with ESRCH. But a program that closed its descriptors (a daemon's
            // closefrom) is alive and its evicted pages live only here: hand them back.
            Ok(()) if client.has_evicted_pages() => {
                client.give_everything_back();
            }
            Ok(()) => {}
        }
        // The program is gone (socket closed at exit/exec) or misbehaved. Its fault thread
        // stops when the uffd reports the mm gone; ask it to stop now in any case.
        client.closing.store(true, Ordering::Release);
        signal(client.cmd_efd.as_raw_fd());
        let why = fault.join().unwrap_or("fault thread panicked");
        tracing::debug!(client = client.id, why, "fault thread ended");
        client.log_summary();
        super::pagetrace::dump(client.id, client.pid);
        let report = client.report(false);
        {
            // From live to finished in one step under the clients lock (then the finished
            // lock, the order `reports` takes them in): a reader sees the client in exactly one
            // of the two lists. Before, `uswap run` could see no live client, read the
            // reports in between and write a stats file without its program.
            let mut live = self.clients.lock();
            live.retain(|c| c.id != client.id);
            let mut fin = self.finished.lock();
            fin.push_back(report);
            while fin.len() > self.opts.keep_finished.max(1) {
                fin.pop_front();
            }
        }
        // Dropping the last Arc frees the window, the store and the descriptor.
        drop(client);
        result.map(|_| ())
    }

    /// Hands every live client its memory back and lets go of it: pages come home, ranges are
    /// unregistered, agents stop. The programs go on, unmanaged. Used when the monitor must stop
    /// while programs still run (`uswap run` whose program left children behind, daemon stop).
    /// Returns how many clients were released and how many pages they got back.
    pub fn release_all(&self) -> (usize, u64) {
        let clients: Vec<Arc<Client>> = self.clients.lock().clone();
        let mut pages = 0;
        for c in &clients {
            pages += c.give_everything_back();
            c.closing.store(true, Ordering::Release);
            signal(c.cmd_efd.as_raw_fd());
        }
        (clients.len(), pages)
    }

    /// Waits until no client is attached, up to `timeout`.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let end = std::time::Instant::now() + timeout;
        while self.live_clients() > 0 {
            if std::time::Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

/// Whether a live monitor answers on `path`. A socket that accepts but never answers a status
/// request (a dead monitor's listening socket, held open for a moment by its arena keeper) is
/// not one: it is waited for, up to 2 s, and then counted as stale.
fn monitor_listening(path: &Path) -> bool {
    let end = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let Ok(fd) = connect(path) else {
            return false;
        };
        crate::protocol::io::set_recv_timeout(fd.as_raw_fd(), 1);
        let mut buf = vec![0u8; MAX_MSG_LEN];
        let answered = Msg::StatusRequest {
            flags: STATUS_DAEMON,
        }
        .encode(&mut buf)
        .ok()
        .and_then(|n| send_packet(fd.as_raw_fd(), &buf[..n], &[]).ok())
        .and_then(|_| recv_packet(fd.as_raw_fd(), &mut buf, 0).ok().flatten())
        .is_some();
        if answered {
            return true;
        }
        if std::time::Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Asks a running monitor for its clients' reports.
pub fn query_status(path: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    serde_json::from_value(query_status_flags(path, 0)?).context("decoding status")
}

/// Asks a running monitor for its own figures (see [`Monitor::daemon_status`]).
pub fn query_daemon_status(path: &Path) -> anyhow::Result<serde_json::Value> {
    query_status_flags(path, STATUS_DAEMON)
}

/// How long a status query waits for the monitor's reply.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

fn query_status_flags(path: &Path, flags: u32) -> anyhow::Result<serde_json::Value> {
    let fd = connect(path)?;
    nix::sys::socket::setsockopt(
        &fd,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(STATUS_TIMEOUT.as_secs() as _, 0),
    )
    .context("setting the status query's timeout")?;
    let mut buf = vec![0u8; MAX_MSG_LEN];
    let n = Msg::StatusRequest { flags }.encode(&mut buf)?;
    send_packet(fd.as_raw_fd(), &buf[..n], &[])?;
    let got = match recv_packet(fd.as_raw_fd(), &mut buf, 0) {
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => bail!(
            "the monitor accepted the connection but did not answer within {} s (is it stuck? see its log)",
            STATUS_TIMEOUT.as_secs()
        ),
        r => r?.context("the monitor closed the connection")?,
    };
    match Msg::decode(&buf[..got.len])? {
        Msg::StatusReply { json } => serde_json::from_slice(json).context("decoding status"),
        Msg::Error { text, .. } => bail!("monitor refused: {}", String::from_utf8_lossy(text)),
        _ => bail!("unexpected reply to a status request"),
    }
}

/// The JSON of `reports` (live clients first, then finished ones, oldest first) in at most
/// `max_len` bytes: the oldest finished clients are left out first, then the last live ones,
/// so the reply always fits one packet and names the newest programs.
fn status_json_fitting(reports: &mut Vec<ClientReport>, max_len: usize) -> anyhow::Result<Vec<u8>> {
    loop {
        let live = reports.iter().filter(|r| r.alive).count();
        let json = serde_json::to_vec(&reports)?;
        if json.len() <= max_len || reports.is_empty() {
            return Ok(json);
        }
        // Roughly how many to drop, at least one.
        let per = json.len() / reports.len().max(1);
        let drop_n = ((json.len() - max_len) / per.max(1))
            .max(1)
            .min(reports.len());
        let finished = reports.len() - live.min(reports.len());
        let from_finished = drop_n.min(finished);
        let first_finished = reports.len() - finished;
        reports.drain(first_finished..first_finished + from_finished);
        let rest = drop_n - from_finished;
        if rest > 0 {
            let keep = reports.len().saturating_sub(rest);
            reports.truncate(keep);
        }
        tracing::debug!(
            left = reports.len(),
            "status reply: the oldest clients left out to fit one packet"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_reply_leaves_out_oldest_finished_clients_first_and_fits() {
        let report = |id: u64, alive: bool| ClientReport {
            id,
            alive,
            name: "x".repeat(64),
            ..Default::default()
        };
        // 10 live, then 300 finished (oldest first): far more than one packet holds.
        let mut reports: Vec<ClientReport> = (0..10)
            .map(|i| report(i, true))
            .chain((10..310).map(|i| report(i, false)))
            .collect();
        let json = status_json_fitting(&mut reports, MAX_MSG_LEN - 64).unwrap();
        assert!(json.len() <= MAX_MSG_LEN - 64);
        let back: Vec<ClientReport> = serde_json::from_slice(&json).unwrap();
        assert!(
            back.len() > 10,
            "more than the live clients fit: {}",
            back.len()
        );
        assert!(back[..10].iter().all(|r| r.alive), "every live client kept");
        assert_eq!(
            back.last().unwrap().id,
            309,
            "the newest finished client kept"
        );
        // Live clients alone too many: the reply still fits and is not empty.
        let mut many: Vec<ClientReport> = (0..400).map(|i| report(i, true)).collect();
        let json = status_json_fitting(&mut many, MAX_MSG_LEN - 64).unwrap();
        let back: Vec<ClientReport> = serde_json::from_slice(&json).unwrap();
        assert!(json.len() <= MAX_MSG_LEN - 64 && !back.is_empty());
    }
}
