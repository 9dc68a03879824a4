//! The monitor's front door: the listening socket, the handshake with each client, the client
//! registry, and status requests.
//!
//! A connection's first packet decides what it is: a `Hello` with one descriptor attached (a
//! program forwarding its userfaultfd) or a `StatusRequest` (`uswap status`). Anything else is
//! answered with an `Error` naming what was wrong, and closed; other clients are unaffected.
//!
//! Owns: accepting, identifying peers (SO_PEERCRED, never the pid a client claims), per-client
//! threads and their cleanup. Must not: hold a client's lock while talking to another client.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use parking_lot::Mutex;
use tracing::{info, warn};

use super::client::{signal, Client};
use super::stats::ClientReport;
use crate::config::{load_program_config, Overrides, ProgramConfig};
use crate::protocol::io::{recv_packet, send_packet};
use crate::protocol::wire::{HelloAck, Msg, MAX_MSG_LEN};
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
}

pub struct Monitor {
    opts: MonitorOptions,
    next_id: AtomicU64,
    clients: Mutex<Vec<Arc<Client>>>,
    finished: Mutex<VecDeque<ClientReport>>,
    stopping: AtomicBool,
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
            if connect(path).is_ok() {
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

/// Peer credentials from the kernel.
fn peer_cred(fd: RawFd) -> (i32, u32) {
    // SAFETY: ucred is plain old data; getsockopt writes at most `len` bytes into it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: as above.
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (cred.pid, cred.uid)
}

fn send_error(fd: RawFd, code: u32, text: &str) {
    let mut buf = vec![0u8; 1024];
    let text = &text.as_bytes()[..text.len().min(900)];
    if let Ok(n) = (Msg::Error { code, text }).encode(&mut buf) {
        let _ = send_packet(fd, &buf[..n], &[]);
    }
}

impl Monitor {
    pub fn new(opts: MonitorOptions) -> Arc<Monitor> {
        Arc::new(Monitor {
            opts,
            next_id: AtomicU64::new(1),
            clients: Mutex::new(Vec::new()),
            finished: Mutex::new(VecDeque::new()),
            stopping: AtomicBool::new(false),
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
                    if let Err(e) = me.connection(conn) {
                        warn!("client connection: {e:#}");
                    }
                })
                .context("spawning a connection thread")?;
        }
        Ok(())
    }

    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Live and recently finished clients.
    pub fn reports(&self) -> Vec<ClientReport> {
        let mut v: Vec<ClientReport> = self.clients.lock().iter().map(|c| c.report(true)).collect();
        v.extend(self.finished.lock().iter().cloned());
        v
    }

    pub fn live_clients(&self) -> usize {
        self.clients.lock().len()
    }

    fn connection(self: &Arc<Self>, conn: OwnedFd) -> anyhow::Result<()> {
        let fd = conn.as_raw_fd();
        let (peer_pid, peer_uid) = peer_cred(fd);
        crate::protocol::io::set_recv_timeout(fd, 5);
        let mut buf = vec![0u8; MAX_MSG_LEN];
        let Some(mut got) = recv_packet(fd, &mut buf, 0).context("reading the first packet")?
        else {
            return Ok(());
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
        match msg {
            Msg::StatusRequest { .. } => {
                let json = serde_json::to_vec(&self.reports())?;
                let mut out = vec![0u8; MAX_MSG_LEN];
                let json = if json.len() > MAX_MSG_LEN - 64 {
                    b"[]".to_vec()
                } else {
                    json
                };
                let n = Msg::StatusReply { json: &json }.encode(&mut out)?;
                send_packet(fd, &out[..n], &[])?;
                Ok(())
            }
            Msg::Hello(h) => {
                let Some(uffd_fd) = got.take_fd(0) else {
                    send_error(fd, libc::EINVAL as u32, "Hello carries no userfaultfd");
                    bail!("peer pid {peer_pid}: Hello without a descriptor");
                };
                if got.fd_count() > 0 {
                    send_error(
                        fd,
                        libc::EINVAL as u32,
                        "Hello carries more than one descriptor",
                    );
                    bail!("peer pid {peer_pid}: Hello with extra descriptors");
                }
                let uffd = match Uffd::from_received(uffd_fd, h.uffd_features) {
                    Ok(u) => u,
                    Err(_) => {
                        send_error(
                            fd,
                            libc::EBADF as u32,
                            "the descriptor is not a userfaultfd",
                        );
                        bail!("peer pid {peer_pid}: descriptor is not a userfaultfd");
                    }
                };
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
                            window_len_bytes: 0,
                            text: t,
                        })
                        .encode(&mut out)?;
                        let _ = send_packet(fd, &out[..n], &[]);
                        bail!("client {name} (pid {peer_pid}): {text}");
                    }
                };
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let (client, memfd) = Client::new(id, peer_pid, peer_uid, name.clone(), cfg, uffd)?;
                let client = Arc::new(client);
                let mut out = vec![0u8; 256];
                let n = Msg::HelloAck(HelloAck {
                    status: 0,
                    window_len_bytes: client.win().len_bytes() as u64,
                    text: b"",
                })
                .encode(&mut out)?;
                send_packet(
                    fd,
                    &out[..n],
                    &[
                        memfd.as_raw_fd(),
                        client.req_efd.as_raw_fd(),
                        client.done_efd.as_raw_fd(),
                    ],
                )
                .context("sending HelloAck")?;
                drop(memfd);
                info!(client = id, pid = peer_pid, uid = peer_uid, name = %name, budget = ?client.cfg.budget_bytes, "client attached");
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
        self.clients.lock().push(Arc::clone(&client));
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
        self.clients.lock().retain(|c| c.id != client.id);
        let mut fin = self.finished.lock();
        fin.push_back(report);
        while fin.len() > self.opts.keep_finished.max(1) {
            fin.pop_front();
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

/// Asks a running monitor for its clients' reports.
pub fn query_status(path: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let fd = connect(path)?;
    let mut buf = vec![0u8; MAX_MSG_LEN];
    let n = Msg::StatusRequest { flags: 0 }.encode(&mut buf)?;
    send_packet(fd.as_raw_fd(), &buf[..n], &[])?;
    let got =
        recv_packet(fd.as_raw_fd(), &mut buf, 0)?.context("the monitor closed the connection")?;
    match Msg::decode(&buf[..got.len])? {
        Msg::StatusReply { json } => serde_json::from_slice(json).context("decoding status"),
        Msg::Error { text, .. } => bail!("monitor refused: {}", String::from_utf8_lossy(text)),
        _ => bail!("unexpected reply to a status request"),
    }
}
