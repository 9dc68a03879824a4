//! End-to-end tests of hostile and broken clients, least privilege and dead processes, against
//! a real `uswap daemon` (issue 5, parts 3-5).
//!
//! The hostile-client tests run a well-behaved managed program (`uswap-workload fill-verify`
//! under the shim) against the same daemon while something misbehaves, and check that the
//! misbehaviour got a clear error (an `Error` packet naming what was wrong, and a line in the
//! daemon's log) or a disconnect, that the program still verified every page with real
//! evictions, and that the daemon is still up and serving. Hostile clients are this test process itself writing raw
//! packets (and forwarding its own real userfaultfd); nothing is mocked.
//!
//! A custom harness (libtest-mimic), like `tests/e2e.rs`: tests that need root say so and are
//! reported *ignored* when not run as root.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::Value;
use uswap::protocol::io::{recv_packet, send_packet, set_recv_timeout};
use uswap::protocol::shm::Window;
use uswap::protocol::wire::{
    Hello, Msg, RegionEntry, RegionsBuilder, HEADER_LEN, HELLO_ADOPT, KIND_HELLO_ACK, KIND_REGIONS,
    MAGIC, MAX_MSG_LEN, REGIONS_FIRST, REGIONS_LAST, REGION_MANAGED, REGION_REGISTERED,
};
use uswap::uffd::{sys, Uffd};

type R = Result<(), Failed>;

fn uswap() -> &'static str {
    env!("CARGO_BIN_EXE_uswap")
}
fn workload() -> &'static str {
    env!("CARGO_BIN_EXE_uswap-workload")
}

/// Builds the shim with the same profile as this test binary (`USWAP_E2E_SHIM` names a
/// prebuilt one instead).
fn shim() -> &'static Path {
    static SHIM: OnceLock<PathBuf> = OnceLock::new();
    SHIM.get_or_init(|| {
        if let Ok(p) = std::env::var("USWAP_E2E_SHIM") {
            let p = PathBuf::from(p);
            assert!(p.exists(), "USWAP_E2E_SHIM={} does not exist", p.display());
            return p;
        }
        let exe = std::env::current_exe().expect("test exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>")
            .to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let target_dir = profile_dir.parent().expect("target dir");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "uswap-shim", "--quiet"])
            .env("CARGO_TARGET_DIR", target_dir);
        if release {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("running cargo build -p uswap-shim");
        assert!(st.success(), "building the shim failed");
        let p = profile_dir.join("libuswap_shim.so");
        assert!(p.exists(), "{} missing after build", p.display());
        p
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("uswap-hostile-{}-{}", tag, std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

// ---- the daemon ----

struct Daemon {
    child: Child,
    socket: PathBuf,
    dir: PathBuf,
    log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signalling our own child, which has not been reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Daemon {
    /// Starts `uswap daemon` with `daemon_toml` as its daemon config (in its config
    /// directory), logging to a file, and waits for its socket.
    fn start(tag: &str, daemon_toml: &str, mode: Option<&str>) -> Result<Daemon, Failed> {
        let dir = tmpdir(tag);
        std::fs::write(dir.join("daemon.toml"), daemon_toml)?;
        let socket = dir.join("uswap.sock");
        let log = dir.join("daemon.log");
        let mut cmd = Command::new(uswap());
        cmd.arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .arg("--config-dir")
            .arg(&dir);
        if let Some(m) = mode {
            cmd.args(["--mode", m]);
        }
        cmd.env("USWAP_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let child = cmd.spawn()?;
        let mut d = Daemon {
            child,
            socket,
            dir,
            log,
        };
        let end = Instant::now() + Duration::from_secs(10);
        while uswap::monitor::connect(&d.socket).is_err() {
            if let Ok(Some(st)) = d.child.try_wait() {
                return Err(format!("daemon exited {st}: {}", d.log_text()).into());
            }
            if Instant::now() > end {
                return Err(format!("daemon did not listen: {}", d.log_text()).into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon is still running, answers `uswap status`, and has not panicked.
    fn check_alive(&mut self) -> R {
        if let Ok(Some(st)) = self.child.try_wait() {
            return Err(format!("the daemon died ({st}):\n{}", self.log_text()).into());
        }
        status(&self.socket)?;
        if self.log_text().contains("panicked") {
            return Err(format!("the daemon panicked:\n{}", self.log_text()).into());
        }
        Ok(())
    }

    /// Waits until the daemon's log contains `what`.
    fn wait_log(&self, what: &str) -> R {
        let end = Instant::now() + Duration::from_secs(10);
        while !self.log_text().contains(what) {
            if Instant::now() > end {
                return Err(
                    format!("the daemon never logged {what:?}:\n{}", self.log_text()).into(),
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

fn status(socket: &Path) -> Result<Vec<Value>, Failed> {
    uswap::monitor::query_status(socket).map_err(|e| format!("uswap status: {e:#}").into())
}

/// The status entry of the client with `pid`.
fn client_by_pid(socket: &Path, pid: u32) -> Result<Option<Value>, Failed> {
    Ok(status(socket)?
        .into_iter()
        .rev()
        .find(|c| c["pid"].as_u64() == Some(pid as u64)))
}

/// Polls until `pred` holds for the client with `pid`, up to `secs`.
fn wait_client(
    socket: &Path,
    pid: u32,
    secs: u64,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Result<Value, Failed> {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        let c = client_by_pid(socket, pid)?;
        if let Some(c) = &c {
            if pred(c) {
                return Ok(c.clone());
            }
        }
        if Instant::now() > end {
            return Err(format!("client pid {pid}: never {what}: {c:?}").into());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

// ---- a well-behaved managed program ----

/// `uswap-workload fill-verify` under the shim, attached to `socket`.
fn spawn_workload(socket: &Path, mib: u32, idle_ms: u32, budget: &str) -> std::io::Result<Child> {
    Command::new(workload())
        .args([
            "fill-verify",
            "--mib",
            &mib.to_string(),
            "--idle-ms",
            &idle_ms.to_string(),
        ])
        .env("LD_PRELOAD", shim())
        .env("USWAP_SOCKET", socket)
        .env(
            "USWAP_OVERRIDES",
            format!("budget = \"{budget}\"\ncooling = \"100ms\"\ntick = \"10ms\""),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
}

/// The program exited 0 having verified every page, and the daemon evicted some of its pages
/// and brought them back.
fn check_verified(socket: &Path, out: Output, pid: u32, what: &str) -> R {
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.contains("RESULT ok") {
        return Err(format!(
            "{what}: the managed program failed ({:?}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let c = wait_client(socket, pid, 10, "detached", |c| c["alive"] == false)?;
    if c["pages_evicted"].as_u64().unwrap_or(0) < 1000
        || c["pages_restored"].as_u64().unwrap_or(0) == 0
    {
        return Err(format!("{what}: the managed program was not really evicted: {c}").into());
    }
    Ok(())
}

/// Waits until the program `pid` is attached and has had pages evicted.
fn wait_evicting(socket: &Path, pid: u32) -> Result<Value, Failed> {
    wait_client(socket, pid, 20, "evicted", |c| {
        c["pages_evicted"].as_u64().unwrap_or(0) > 500
    })
}

// ---- raw clients ----

fn connect(socket: &Path) -> Result<OwnedFd, Failed> {
    uswap::monitor::connect(socket).map_err(|e| format!("{e:#}").into())
}

fn header(kind: u16, payload_len: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(&MAGIC.to_le_bytes());
    h.extend_from_slice(&uswap::protocol::PROTOCOL_VERSION.to_le_bytes());
    h.extend_from_slice(&kind.to_le_bytes());
    h.extend_from_slice(&payload_len.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h
}

fn encode(m: Msg<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_MSG_LEN];
    let n = m.encode(&mut buf).expect("encodes");
    buf.truncate(n);
    buf
}

fn hello(pid: u32, features: u64, name: &[u8], overrides: &[u8]) -> Vec<u8> {
    hello_with(pid, features, name, overrides, |_| {})
}

/// [`hello`] with some fields changed by `edit` (a forged token, adoption, a page size).
fn hello_with(
    pid: u32,
    features: u64,
    name: &[u8],
    overrides: &[u8],
    edit: impl FnOnce(&mut Hello<'_>),
) -> Vec<u8> {
    let mut h = Hello {
        pid,
        page_size: 4096,
        uffd_features: features,
        fork_token: 0,
        forked_from: 0,
        flags: 0,
        store_member: 0,
        name,
        app: b"",
        overrides,
    };
    edit(&mut h);
    encode(Msg::Hello(h))
}

/// Reads packets until an `Error` arrives; it must contain every one of `want`. A close
/// without an `Error` fails.
fn expect_error(fd: RawFd, case: &str, want: &[&str]) -> Result<String, Failed> {
    set_recv_timeout(fd, 10);
    let mut buf = vec![0u8; MAX_MSG_LEN];
    loop {
        let got = recv_packet(fd, &mut buf, 0)
            .map_err(|e| format!("{case}: reading the monitor's answer: {e}"))?
            .ok_or_else(|| format!("{case}: the monitor closed without an Error"))?;
        match Msg::decode(&buf[..got.len]) {
            Ok(Msg::Error { text, .. }) => {
                let text = String::from_utf8_lossy(text).into_owned();
                if let Some(w) = want.iter().find(|w| !text.contains(**w)) {
                    return Err(format!("{case}: the Error does not name {w:?}: {text}").into());
                }
                return Ok(text);
            }
            Ok(_) => continue, // e.g. a ForkReady or HelloAck before the error
            Err(e) => return Err(format!("{case}: undecodable answer: {e}").into()),
        }
    }
}

/// Sends one raw packet (with descriptors) on a new connection and expects an `Error`.
fn raw_case(socket: &Path, case: &str, packet: &[u8], fds: &[RawFd], want: &[&str]) -> R {
    let fd = connect(socket)?;
    send_packet(fd.as_raw_fd(), packet, fds).map_err(|e| format!("{case}: send: {e}"))?;
    expect_error(fd.as_raw_fd(), case, want)?;
    Ok(())
}

fn new_uffd() -> Result<Uffd, Failed> {
    Uffd::create(
        sys::UFFD_FEATURE_MOVE
            | sys::UFFD_FEATURE_EVENT_REMOVE
            | sys::UFFD_FEATURE_EVENT_UNMAP
            | sys::UFFD_FEATURE_EVENT_REMAP
            | sys::UFFD_FEATURE_THREAD_ID,
        0,
        true,
    )
    .map_err(|e| format!("creating a userfaultfd: {e}").into())
}

/// A mapping in this process, unmapped on drop.
struct Map {
    base: *mut u8,
    len: usize,
}

impl Map {
    fn anon(len: usize) -> Map {
        // SAFETY: a fresh private anonymous mapping at an address the kernel picks.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Map {
            base: p.cast(),
            len,
        }
    }

    fn shared(fd: RawFd, len: usize) -> Result<Map, Failed> {
        // SAFETY: mapping a memfd the monitor sent, shared, at an address the kernel picks.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mapping the window: {}", std::io::Error::last_os_error()).into());
        }
        Ok(Map {
            base: p.cast(),
            len,
        })
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; no reference into it outlives `self`.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// A client that did the handshake with this process's own userfaultfd, and has no agent.
struct Attached {
    conn: OwnedFd,
    uffd: Uffd,
    window: Map,
    efds: Vec<OwnedFd>,
}

impl Attached {
    fn win(&self) -> Window {
        // SAFETY: `window` is a shared mapping of the monitor's memfd of the length it
        // announced, alive as long as `self`; the Window is used only while `self` lives.
        unsafe { Window::new(self.window.base, self.window.len) }
    }

    fn send(&self, packet: &[u8]) -> R {
        send_packet(self.conn.as_raw_fd(), packet, &[]).map_err(|e| format!("send: {e}").into())
    }

    /// Sends one `Regions` snapshot.
    fn regions(&self, snapshot: u32, entries: &[RegionEntry]) -> R {
        let mut buf = vec![0u8; MAX_MSG_LEN];
        let mut b = RegionsBuilder::new(&mut buf);
        for e in entries {
            b.push(*e);
        }
        let pkt = b.finish(snapshot, REGIONS_FIRST | REGIONS_LAST, 0).to_vec();
        self.send(&pkt)
    }
}

/// Attaches with a real userfaultfd of this process, claiming `claimed_pid`.
fn attach(
    socket: &Path,
    name: &[u8],
    claimed_pid: u32,
    overrides: &str,
) -> Result<Attached, Failed> {
    let uffd = new_uffd()?;
    let conn = connect(socket)?;
    let pkt = hello(claimed_pid, uffd.features(), name, overrides.as_bytes());
    send_packet(conn.as_raw_fd(), &pkt, &[uffd.as_raw_fd()])?;
    set_recv_timeout(conn.as_raw_fd(), 10);
    let mut buf = vec![0u8; MAX_MSG_LEN];
    let mut got = recv_packet(conn.as_raw_fd(), &mut buf, 0)?.ok_or("closed before HelloAck")?;
    let len = match Msg::decode(&buf[..got.len])? {
        Msg::HelloAck(a) if a.status == 0 => a.window_len_bytes as usize,
        other => return Err(format!("expected HelloAck, got {other:?}").into()),
    };
    let (Some(memfd), Some(req), Some(done)) = (got.take_fd(0), got.take_fd(1), got.take_fd(2))
    else {
        return Err("HelloAck without its three descriptors".into());
    };
    let window = Map::shared(memfd.as_raw_fd(), len)?;
    Ok(Attached {
        conn,
        uffd,
        window,
        efds: vec![memfd, req, done],
    })
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut p = [0; 2];
    // SAFETY: pipe2 writes two descriptors into our array.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors we own.
    unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
}

fn memfd() -> OwnedFd {
    // SAFETY: memfd_create with a static name.
    let fd = unsafe { libc::memfd_create(c"hostile".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor we own.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

// ---- tests ----

/// Part 3: malformed, truncated, oversized and out-of-order packets, descriptors that are not
/// userfaultfds, and overlapping regions, while a managed program runs against the daemon.
fn hostile_packets_get_named_errors_while_managed_program_verifies() -> R {
    let mut d = Daemon::start("packets", "", None)?;
    let prog = spawn_workload(&d.socket, 32, 2500, "8M")?;
    let pid = prog.id();
    wait_evicting(&d.socket, pid)?;
    let s = &d.socket;

    let good = encode(Msg::StatusRequest { flags: 0 });
    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    raw_case(s, "bad magic", &bad_magic, &[], &["malformed", "magic"])?;
    let mut bad_version = good.clone();
    bad_version[4] = 77;
    raw_case(s, "version", &bad_version, &[], &["version 77"])?;
    raw_case(
        s,
        "short header",
        &good[..7],
        &[],
        &["malformed", "shorter"],
    )?;
    let mut truncated = good.clone();
    truncated[8] = 200; // claims a 200-byte payload it does not carry
    raw_case(s, "truncated", &truncated, &[], &["malformed", "shorter"])?;
    let mut reserved = good.clone();
    reserved[12] = 1;
    raw_case(s, "reserved", &reserved, &[], &["reserved"])?;
    let mut unknown = header(4242, 0);
    unknown.truncate(HEADER_LEN);
    raw_case(
        s,
        "unknown kind",
        &unknown,
        &[],
        &["unknown message kind 4242"],
    )?;
    let mut oversized = header(KIND_REGIONS, 70_000);
    oversized.resize(HEADER_LEN + 70_000, 0);
    raw_case(s, "oversized", &oversized, &[], &["oversized"])?;
    let mut bad_region = header(KIND_REGIONS, 16 + 24);
    bad_region.extend_from_slice(&[0; 16]);
    for v in [0x1001u64, 0x1000, REGION_MANAGED] {
        bad_region.extend_from_slice(&v.to_le_bytes());
    }
    raw_case(
        s,
        "unaligned region",
        &bad_region,
        &[],
        &["region alignment"],
    )?;
    // Out of order: a message that may not open a connection, and a monitor's own message.
    let regions_first = {
        let mut buf = vec![0u8; MAX_MSG_LEN];
        let mut b = RegionsBuilder::new(&mut buf);
        b.push(RegionEntry {
            start: 0x10000,
            len_bytes: 0x1000,
            flags: REGION_MANAGED,
        });
        b.finish(1, REGIONS_FIRST | REGIONS_LAST, 0).to_vec()
    };
    raw_case(
        s,
        "Regions first",
        &regions_first,
        &[],
        &["first message", "kind 2"],
    )?;
    // status, store member, window length, flags, reserved, empty text.
    let mut ack = header(KIND_HELLO_ACK, 28);
    ack.extend_from_slice(&[0; 28]);
    raw_case(
        s,
        "HelloAck from a client",
        &ack,
        &[],
        &["first message", "kind 101"],
    )?;
    raw_case(
        s,
        "ForkPrepare first",
        &encode(Msg::ForkPrepare),
        &[],
        &["kind 3"],
    )?;

    // Descriptors that are not a userfaultfd, none, too many, or on the wrong message.
    let feats = sys::UFFD_FEATURE_MOVE;
    let h = hello(std::process::id(), feats, b"hostile", b"");
    let (rd, _wr) = pipe();
    raw_case(
        s,
        "pipe as uffd",
        &h,
        &[rd.as_raw_fd()],
        &["not a userfaultfd"],
    )?;
    let m = memfd();
    raw_case(
        s,
        "memfd as uffd",
        &h,
        &[m.as_raw_fd()],
        &["not a userfaultfd"],
    )?;
    let null = std::fs::File::open("/dev/null")?;
    raw_case(
        s,
        "/dev/null as uffd",
        &h,
        &[null.as_raw_fd()],
        &["not a userfaultfd"],
    )?;
    raw_case(
        s,
        "Hello without uffd",
        &h,
        &[],
        &["carries no userfaultfd"],
    )?;
    let u = new_uffd()?;
    raw_case(
        s,
        "two descriptors",
        &h,
        &[u.as_raw_fd(), rd.as_raw_fd()],
        &["more than one descriptor"],
    )?;
    raw_case(
        s,
        "fd on status",
        &good,
        &[rd.as_raw_fd()],
        &["carries descriptors"],
    )?;
    let u = new_uffd()?;
    let lie = hello(std::process::id(), u.features() | 1 << 40, b"hostile", b"");
    raw_case(
        s,
        "features",
        &lie,
        &[u.as_raw_fd()],
        &["features 0x10000000000"],
    )?;
    let mut huge = hello_with(std::process::id(), u.features(), b"hostile", b"", |h| {
        h.page_size = 1 << 21
    });
    raw_case(
        s,
        "page size",
        &huge,
        &[u.as_raw_fd()],
        &["page size 2097152"],
    )?;
    huge[HEADER_LEN + 4] = 3; // not a power of two: the decoder refuses it
    raw_case(s, "page size 3", &huge, &[u.as_raw_fd()], &["page_size"])?;
    // A forged fork token: no snapshot has it, so no other program's pages can be claimed.
    let forged = hello_with(std::process::id(), u.features(), b"hostile", b"", |h| {
        h.fork_token = 0x5eed_f00d_dead_beef;
        h.forked_from = 1;
    });
    raw_case(
        s,
        "forged fork token",
        &forged,
        &[u.as_raw_fd()],
        &["forked from pid 1", "no fork snapshot has this token"],
    )?;
    // Adoption requests whose store or disk file is not what a shim holds: each is refused
    // by name, before anything is mapped from it.
    let adopt = hello_with(std::process::id(), u.features(), b"hostile", b"", |h| {
        h.flags = HELLO_ADOPT
    });
    let unsealed = memfd();
    raw_case(
        s,
        "adoption with an unsealed store file",
        &adopt,
        &[u.as_raw_fd(), unsealed.as_raw_fd()],
        &["cannot adopt", "not a memfd sealed against shrinking"],
    )?;
    raw_case(
        s,
        "adoption with a pipe as the disk file",
        &adopt,
        &[u.as_raw_fd(), unsealed.as_raw_fd(), rd.as_raw_fd()],
        &[
            "cannot adopt",
            "disk file handed over is not a regular file",
        ],
    )?;
    let named_dir = tmpdir("named-disk");
    let named = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(named_dir.join("f"))?;
    raw_case(
        s,
        "adoption with a named file as the disk file",
        &adopt,
        &[u.as_raw_fd(), unsealed.as_raw_fd(), named.as_raw_fd()],
        &["cannot adopt", "still has a name"],
    )?;
    raw_case(
        s,
        "adoption with four descriptors",
        &adopt,
        &[
            u.as_raw_fd(),
            unsealed.as_raw_fd(),
            named.as_raw_fd(),
            rd.as_raw_fd(),
        ],
        &["two or three when adopting"],
    )?;
    let _ = std::fs::remove_dir_all(&named_dir);
    // A bad overrides text is refused by the HelloAck (status != 0) naming the key.
    {
        let fd = connect(s)?;
        let u = new_uffd()?;
        let pkt = hello(1, u.features(), b"hostile", b"budget = \"12Q\"");
        send_packet(fd.as_raw_fd(), &pkt, &[u.as_raw_fd()])?;
        set_recv_timeout(fd.as_raw_fd(), 10);
        let mut buf = vec![0u8; MAX_MSG_LEN];
        let got = recv_packet(fd.as_raw_fd(), &mut buf, 0)?.ok_or("closed")?;
        match Msg::decode(&buf[..got.len])? {
            Msg::HelloAck(a)
                if a.status != 0 && String::from_utf8_lossy(a.text).contains("budget") => {}
            other => return Err(format!("bad overrides: expected a refusal, got {other:?}").into()),
        }
    }

    // After the handshake (with a real userfaultfd): violations disconnect with an Error.
    let a = attach(s, b"hostile", std::process::id(), "")?;
    a.send(&h)?;
    expect_error(
        a.conn.as_raw_fd(),
        "second Hello",
        &["unexpected message kind 1"],
    )?;
    let a = attach(s, b"hostile", std::process::id(), "")?;
    a.send(&bad_magic)?;
    expect_error(
        a.conn.as_raw_fd(),
        "garbage after Hello",
        &["malformed", "magic"],
    )?;
    let a = attach(s, b"hostile", std::process::id(), "")?;
    send_packet(
        a.conn.as_raw_fd(),
        &encode(Msg::Bye { status: 0 }),
        &[rd.as_raw_fd()],
    )?;
    expect_error(
        a.conn.as_raw_fd(),
        "fd after Hello",
        &["descriptors after the handshake"],
    )?;
    let a = attach(s, b"hostile", std::process::id(), "")?;
    a.regions(
        1,
        &[
            RegionEntry {
                start: 0x7000_0000_0000,
                len_bytes: 0x10_0000,
                flags: REGION_MANAGED | REGION_REGISTERED,
            },
            RegionEntry {
                start: 0x7000_0008_0000,
                len_bytes: 0x10_0000,
                flags: REGION_MANAGED,
            },
        ],
    )?;
    expect_error(
        a.conn.as_raw_fd(),
        "overlapping regions",
        &["overlap", "0x700000080000"],
    )?;
    drop(a);

    d.wait_log("malformed first packet")?;
    d.wait_log("not a userfaultfd")?;
    d.wait_log("overlap")?;
    let out = prog.wait_with_output()?;
    check_verified(&d.socket, out, pid, "beside hostile packets")?;
    d.check_alive()
}

/// Part 3: floods. Clients per uid over `max_clients_per_uid`, connections that never send
/// their first packet, and a stream of `Regions` packets are each capped with a clear error.
fn hostile_floods_are_capped_with_clear_errors() -> R {
    let mut d = Daemon::start("flood", "max_clients_per_uid = 3\n", None)?;
    let prog = spawn_workload(&d.socket, 32, 2500, "8M")?;
    let pid = prog.id();
    wait_evicting(&d.socket, pid)?;
    // The program is one of this uid's three clients; two more fit, the next is refused.
    let a1 = attach(&d.socket, b"flood", std::process::id(), "")?;
    let a2 = attach(&d.socket, b"flood", std::process::id(), "")?;
    {
        let u = new_uffd()?;
        let fd = connect(&d.socket)?;
        let pkt = hello(std::process::id(), u.features(), b"flood", b"");
        send_packet(fd.as_raw_fd(), &pkt, &[u.as_raw_fd()])?;
        expect_error(
            fd.as_raw_fd(),
            "fourth client",
            &["max_clients_per_uid = 3", "uid 0"],
        )?;
    }
    // A Regions flood from one attached client disconnects it, and only it.
    let entry = [RegionEntry {
        start: 0x7100_0000_0000,
        len_bytes: 0x10_0000,
        flags: REGION_MANAGED,
    }];
    let mut sent = 0u32;
    while sent < 30_000 && a1.regions(sent, &entry).is_ok() {
        sent += 1;
    }
    if sent < 10_000 {
        return Err(format!("the flood stopped after {sent} packets, before the cap").into());
    }
    expect_error(
        a1.conn.as_raw_fd(),
        "Regions flood",
        &["Regions flood", "10000"],
    )?;
    drop(a1);
    drop(a2);
    // Connections that never send anything: 16 may wait per uid, the 17th is refused at once.
    let idle: Vec<OwnedFd> = (0..16)
        .map(|_| connect(&d.socket))
        .collect::<Result<_, _>>()?;
    std::thread::sleep(Duration::from_millis(200));
    let extra = connect(&d.socket)?;
    expect_error(
        extra.as_raw_fd(),
        "17th idle connection",
        &["waiting for their first packet"],
    )?;
    // The idle ones are timed out with an error after 5 s.
    expect_error(
        idle[0].as_raw_fd(),
        "idle connection",
        &["no first packet within 5 s"],
    )?;
    drop(idle);
    d.wait_log("Regions flood")?;
    let out = prog.wait_with_output()?;
    check_verified(&d.socket, out, pid, "beside floods")?;
    d.check_alive()
}

/// Makes the monitor want to evict from an attached agentless client: `pages` of this
/// process's memory, touched, registered with the client's userfaultfd and reported as
/// registered, and a resident size far over its budget in the window.
fn bait(a: &Attached, pages: usize) -> Result<Map, Failed> {
    let m = Map::anon(pages * 4096);
    for i in 0..pages {
        // SAFETY: inside our own fresh mapping.
        unsafe { m.base.add(i * 4096).write_volatile(i as u8 | 1) };
    }
    a.uffd
        .register(
            m.base as u64,
            m.len as u64,
            sys::UFFDIO_REGISTER_MODE_MISSING,
        )
        .map_err(|e| format!("register: {e}"))?;
    a.regions(
        1,
        &[RegionEntry {
            start: m.base as u64,
            len_bytes: m.len as u64,
            flags: REGION_MANAGED | REGION_REGISTERED,
        }],
    )?;
    let win = a.win();
    win.publish_rss(1 << 30, 0);
    Ok(m)
}

/// Part 3: a client whose agent never answers. The monitor posts it batches, times out,
/// logs, and stops evicting from it; the managed program beside it is not held up. When the
/// agent answers at last, eviction resumes.
fn agent_never_answers_monitor_times_out_and_stops_evicting_it() -> R {
    let mut d = Daemon::start("agent", "agent_timeout = \"1s\"\n", None)?;
    let prog = spawn_workload(&d.socket, 32, 3000, "8M")?;
    let pid = prog.id();
    let a = attach(
        &d.socket,
        b"silent-agent",
        std::process::id(),
        "budget = \"1M\"\ntick = \"10ms\"",
    )?;
    let m = bait(&a, 1024)?;
    let me = std::process::id();
    let c = wait_client(&d.socket, me, 10, "stalled", |c| c["agent_stalled"] == true)?;
    let posted = c["pages_posted"].as_u64().unwrap_or(0);
    if posted == 0 || c["agent_timeouts"].as_u64() != Some(1) {
        return Err(format!("no batch was posted, or no timeout counted: {c}").into());
    }
    d.wait_log("has not answered a batch in time")?;
    // No more batches from then on.
    std::thread::sleep(Duration::from_millis(600));
    let c = client_by_pid(&d.socket, me)?.ok_or("the silent client vanished")?;
    if c["pages_posted"].as_u64() != Some(posted) || c["alive"] != true {
        return Err(format!("the monitor went on posting to a silent agent: {c}").into());
    }
    // Our memory was never touched: the only mover is the (absent) agent.
    for i in 0..1024 {
        // SAFETY: inside our own mapping; the pages are present, so this does not fault.
        let v = unsafe { m.base.add(i * 4096).read_volatile() };
        if v != i as u8 | 1 {
            return Err(format!("page {i} of the silent client changed: {v}").into());
        }
    }
    // The agent answers at last (every page cancelled, as an agent does when the program's
    // memory changed under a batch): eviction resumes.
    let win = a.win();
    let post = win.post_seq().load(std::sync::atomic::Ordering::Acquire);
    for seq in win.done_seq().load(std::sync::atomic::Ordering::Acquire)..post {
        let desc = win.desc(seq);
        for p in 0..desc.npages() {
            desc.set_result(p, uswap::protocol::shm::RESULT_CANCELLED);
        }
    }
    win.done_seq()
        .store(post, std::sync::atomic::Ordering::Release);
    let one = 1u64.to_ne_bytes();
    // SAFETY: an 8-byte write to the monitor's done eventfd, which we hold.
    unsafe { libc::write(a.efds[2].as_raw_fd(), one.as_ptr().cast(), 8) };
    d.wait_log("eviction resumes")?;
    wait_client(&d.socket, me, 10, "posted again", |c| {
        c["pages_posted"].as_u64().unwrap_or(0) > posted
            && c["pages_cancelled"].as_u64().unwrap_or(0) > 0
    })?;
    wait_evicting(&d.socket, pid)?;
    drop(a); // disconnect: the monitor gives up on the batches after agent_timeout
    drop(m);
    let out = prog.wait_with_output()?;
    check_verified(&d.socket, out, pid, "beside a silent agent")?;
    wait_client(&d.socket, me, 10, "detached", |c| c["alive"] == false)?;
    d.check_alive()
}

/// Part 3: store quotas. Two programs of one uid share `max_store_per_uid`, and a third has
/// its own `max_store`; every one verifies its data, the quotas hold, and refusals are counted.
fn store_quotas_per_client_and_per_uid_hold_and_programs_verify() -> R {
    let quota: u64 = 1 << 20;
    let mut d = Daemon::start("quota", "max_store_per_uid = \"1M\"\n", None)?;
    let p1 = spawn_workload(&d.socket, 24, 2500, "4M")?;
    let p2 = spawn_workload(&d.socket, 24, 2500, "4M")?;
    let (id1, id2) = (p1.id(), p2.id());
    // The largest store the two held together, sampled while they run.
    let mut peak = 0;
    let mut refused = 0;
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        let st = status(&d.socket)?;
        let live: Vec<&Value> = st.iter().filter(|c| c["alive"] == true).collect();
        let held: u64 = live
            .iter()
            .map(|c| c["store"]["slab_bytes_mapped"].as_u64().unwrap_or(0))
            .sum();
        peak = peak.max(held);
        refused = live
            .iter()
            .map(|c| c["pages_uid_quota_full"].as_u64().unwrap_or(0))
            .sum::<u64>()
            .max(refused);
        if live.is_empty() && peak > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (o1, o2) = (p1.wait_with_output()?, p2.wait_with_output()?);
    check_verified(&d.socket, o1, id1, "first program of the uid")?;
    check_verified(&d.socket, o2, id2, "second program of the uid")?;
    // Slack: each client may pass the quota by one chunk of 256 pages before it checks again.
    if peak == 0 || peak > quota + 2 * (256 << 12) {
        return Err(format!("the uid held {peak} store bytes, quota {quota}").into());
    }
    if refused == 0 {
        return Err("no page was refused by the uid quota: the check proves nothing".into());
    }
    d.check_alive()?;
    // One program with its own max_store (no uid quota from this daemon config applies to
    // a second daemon; reuse this one: the per-client quota is the tighter one here).
    let out = Command::new(workload())
        .args(["fill-verify", "--mib", "24", "--idle-ms", "2000"])
        .env("LD_PRELOAD", shim())
        .env("USWAP_SOCKET", &d.socket)
        .env(
            "USWAP_OVERRIDES",
            "budget = \"4M\"\ncooling = \"100ms\"\ntick = \"10ms\"\nmax_store = \"256K\"",
        )
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.contains("RESULT ok") {
        return Err(format!("the program over its own max_store failed:\n{stdout}").into());
    }
    let st = status(&d.socket)?;
    let c = st
        .iter()
        .rev()
        .find(|c| {
            c["budget_bytes"].as_u64() == Some(4 << 20)
                && c["pages_store_full"].as_u64().unwrap_or(0) > 0
                && c["pid"].as_u64() != Some(id1 as u64)
                && c["pid"].as_u64() != Some(id2 as u64)
        })
        .ok_or_else(|| format!("the max_store client reported no refused page: {st:?}"))?;
    if c["pages_evicted"].as_u64().unwrap_or(0) < 1000 {
        return Err(format!("the max_store client was not evicted: {c}").into());
    }
    d.check_alive()
}

/// Part 4 (b): a client cannot make the monitor act on another process. It claims the pid of
/// a managed program (the monitor records its SO_PEERCRED pid) and names that program's
/// memory in its regions; every action lands on its own descriptor, and the program, evicted
/// meanwhile by the same daemon, verifies every page.
fn foreign_pid_and_regions_only_ever_reach_the_clients_own_mm() -> R {
    let mut d = Daemon::start("foreign", "agent_timeout = \"1s\"\n", None)?;
    let prog = spawn_workload(&d.socket, 32, 3000, "8M")?;
    let victim = prog.id();
    wait_evicting(&d.socket, victim)?;
    // The victim's anonymous writable mappings, from /proc.
    let maps = std::fs::read_to_string(format!("/proc/{victim}/maps"))?;
    let mut entries = Vec::new();
    for l in maps.lines() {
        let mut f = l.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        let Some((s, e)) = range.split_once('-').and_then(|(s, e)| {
            Some((
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
            ))
        }) else {
            continue;
        };
        if perms.starts_with("rw-p") && l.split_whitespace().count() == 5 && e - s >= 1 << 20 {
            entries.push(RegionEntry {
                start: s,
                len_bytes: e - s,
                flags: REGION_MANAGED | REGION_REGISTERED,
            });
        }
    }
    if entries.is_empty() {
        return Err(format!("no large anonymous mapping in the victim:\n{maps}").into());
    }
    let a = attach(
        &d.socket,
        b"impostor",
        victim,
        "budget = \"1M\"\ntick = \"10ms\"",
    )?;
    // Identified by SO_PEERCRED: this process, not the pid it claimed.
    let me = std::process::id();
    let st = status(&d.socket)?;
    let imp = st
        .iter()
        .find(|c| c["name"] == "impostor" && c["alive"] == true)
        .ok_or("the impostor is not attached")?;
    if imp["pid"].as_u64() != Some(me as u64) {
        return Err(format!("the monitor believed the claimed pid {victim}: {imp}").into());
    }
    d.wait_log("Hello claims another pid")?;
    a.regions(1, &entries)?;
    let win = a.win();
    win.publish_rss(1 << 30, 0);
    // The monitor posts batches for those addresses to the impostor's own (absent) agent.
    let c = wait_client(&d.socket, me, 10, "posted", |c| {
        c["pages_posted"].as_u64().unwrap_or(0) > 0
    })?;
    if c["pages_evicted"].as_u64().unwrap_or(0) != 0 {
        return Err(format!("pages were evicted for the impostor: {c}").into());
    }
    // On disconnect the monitor unregisters those ranges: on the impostor's descriptor.
    drop(a);
    wait_client(&d.socket, me, 10, "detached", |c| c["alive"] == false)?;
    let out = prog.wait_with_output()?;
    check_verified(&d.socket, out, victim, "the impostor's victim")?;
    d.check_alive()
}

/// Part 4 (b): a uid that is not on the allow list is refused with a clear error; a program
/// of that uid runs on unmanaged.
fn uid_not_on_allow_list_is_refused_and_program_runs_unmanaged() -> R {
    let mut d = Daemon::start("allow", "allow_uids = [4242]\nallow_gids = [4243]\n", None)?;
    let fd = connect(&d.socket)?;
    send_packet(
        fd.as_raw_fd(),
        &encode(Msg::StatusRequest { flags: 0 }),
        &[],
    )?;
    expect_error(
        fd.as_raw_fd(),
        "uid 0",
        &["uid 0 (gid 0) is not allowed", "allow_uids"],
    )?;
    let out = Command::new(workload())
        .args(["fill-verify", "--mib", "8", "--idle-ms", "100"])
        .env("LD_PRELOAD", shim())
        .env("USWAP_SOCKET", &d.socket)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The program says why, in the one line the shim prints.
    if !out.status.success()
        || !stdout.contains("RESULT ok")
        || !stderr.contains("the monitor refused this program: uid 0 (gid 0) is not allowed")
    {
        return Err(format!("refused program:\n{stdout}\n{stderr}").into());
    }
    d.wait_log("is not allowed")?;
    if d.child.try_wait()?.is_some() {
        return Err("the daemon died".into());
    }
    Ok(())
}

fn proc_status_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

/// Part 4 (a): the daemon, started as root, binds its socket (0660, owned by the user it
/// becomes), drops to `nobody` with no capabilities, and serves a program that runs as yet
/// another user; the program verifies its data.
fn daemon_dropped_to_nobody_serves_program_of_another_user() -> R {
    let uid = 4242;
    let d = Daemon::start(
        "dropped",
        &format!("user = \"nobody\"\nsocket_mode = \"0660\"\nallow_uids = [{uid}, 4243]\n"),
        None,
    )?;
    let dpid = d.child.id();
    let uids = proc_status_field(dpid, "Uid:");
    let caps = [
        proc_status_field(dpid, "CapPrm:"),
        proc_status_field(dpid, "CapEff:"),
        proc_status_field(dpid, "CapAmb:"),
    ];
    if uids.split_whitespace().any(|u| u != "65534")
        || caps.iter().any(|c| !c.trim_start_matches('0').is_empty())
        || proc_status_field(dpid, "NoNewPrivs:") != "1"
        || proc_status_field(dpid, "Groups:") != "65534"
    {
        return Err(format!(
            "the daemon kept privileges: Uid {uids}, caps {caps:?}, groups {:?}\n{}",
            proc_status_field(dpid, "Groups:"),
            d.log_text()
        )
        .into());
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(&d.socket)?;
    if meta.permissions().mode() & 0o777 != 0o660 || meta.uid() != 65534 || meta.gid() != 65534 {
        return Err(format!(
            "socket mode {:o} owner {}:{}",
            meta.permissions().mode() & 0o777,
            meta.uid(),
            meta.gid()
        )
        .into());
    }
    // The program: uid 4242, group nogroup (so it may open the 0660 socket), and
    // CAP_SYS_PTRACE only, to create a userfaultfd with vm.unprivileged_userfaultfd = 0.
    let out = Command::new("setpriv")
        .args([
            format!("--reuid={uid}"),
            "--regid=65534".into(),
            "--clear-groups".into(),
            "--inh-caps=+sys_ptrace".into(),
            "--ambient-caps=+sys_ptrace".into(),
        ])
        .arg(workload())
        .args(["fill-verify", "--mib", "32", "--idle-ms", "2000"])
        .env("LD_PRELOAD", shim())
        .env("USWAP_SOCKET", &d.socket)
        .env(
            "USWAP_OVERRIDES",
            "budget = \"8M\"\ncooling = \"100ms\"\ntick = \"10ms\"",
        )
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.contains("RESULT ok") {
        return Err(format!(
            "program as uid {uid} failed:\n{stdout}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            d.log_text()
        )
        .into());
    }
    // The daemon (uid 0 is not on its allow list) answers uid 4242 about its own programs.
    let st = Command::new("setpriv")
        .args([
            format!("--reuid={uid}"),
            "--regid=65534".into(),
            "--clear-groups".into(),
        ])
        .arg(uswap())
        .args(["status", "--json", "--socket"])
        .arg(&d.socket)
        .output()?;
    let json: Value = serde_json::from_slice(&st.stdout).map_err(|e| {
        format!(
            "status as uid {uid}: {e}: {}",
            String::from_utf8_lossy(&st.stderr)
        )
    })?;
    let c = json
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "uswap-workload"))
        .ok_or_else(|| format!("the program is missing from the status: {json}"))?;
    if c["uid"].as_u64() != Some(uid as u64) || c["pages_evicted"].as_u64().unwrap_or(0) < 1000 {
        return Err(format!("the daemon did not evict for uid {uid}: {c}").into());
    }
    // Another allowed user sees none of uid 4242's programs.
    let other = Command::new("setpriv")
        .args(["--reuid=4243", "--regid=65534", "--clear-groups"])
        .arg(uswap())
        .args(["status", "--json", "--socket"])
        .arg(&d.socket)
        .output()?;
    let json: Value = serde_json::from_slice(&other.stdout).map_err(|e| {
        format!(
            "status as uid 4243: {e}: {}",
            String::from_utf8_lossy(&other.stderr)
        )
    })?;
    if json.as_array().is_none_or(|a| !a.is_empty()) {
        return Err(format!("uid 4243 sees other users' programs: {json}").into());
    }
    if !d.log_text().contains("dropped root") {
        return Err(format!("no log line about the drop:\n{}", d.log_text()).into());
    }
    Ok(())
}

/// Part 5: programs SIGKILLed while the monitor is evicting them (batches in flight, pages in
/// the window and the store) are collected; the daemon stays up and serves the next one.
/// (open descriptors, threads) of a process.
fn fds_and_threads(pid: u32) -> (usize, usize) {
    let count = |d: String| std::fs::read_dir(d).map_or(0, |r| r.count());
    (
        count(format!("/proc/{pid}/fd")),
        count(format!("/proc/{pid}/task")),
    )
}

/// Waits until the daemon has no more descriptors and threads than `baseline`.
fn wait_baseline(d: &Daemon, baseline: (usize, usize), round: u64) -> R {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let now = fds_and_threads(d.child.id());
        if now.0 <= baseline.0 && now.1 <= baseline.1 {
            return Ok(());
        }
        if Instant::now() > end {
            return Err(format!(
                "round {round}: the daemon still holds (fds, threads) {now:?}, baseline {baseline:?}"
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn client_killed_mid_batch_is_collected_and_daemon_serves_next() -> R {
    let mut d = Daemon::start("killed", "", None)?;
    status(&d.socket)?;
    std::thread::sleep(Duration::from_millis(100));
    let baseline = fds_and_threads(d.child.id());
    for round in 0..3u64 {
        let mut prog = Command::new(workload())
            .args([
                "fill-verify",
                "--mib",
                "48",
                "--idle-ms",
                "200",
                "--rounds",
                "4",
            ])
            .env("LD_PRELOAD", shim())
            .env("USWAP_SOCKET", &d.socket)
            .env(
                "USWAP_OVERRIDES",
                "budget = \"4M\"\ncooling = \"50ms\"\ntick = \"5ms\"",
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let pid = prog.id();
        // Kill at a different depth each round: the first batches, in the middle, later.
        let posted = 500 + round * 3000;
        let c = wait_client(&d.socket, pid, 20, "posting", |c| {
            c["pages_posted"].as_u64().unwrap_or(0) >= posted
        })?;
        // SAFETY: killing our own child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let st = prog.wait()?;
        if st.code().is_some() {
            return Err(format!("round {round}: the program finished before the kill: {c}").into());
        }
        wait_client(&d.socket, pid, 10, "collected", |c| c["alive"] == false)?;
        // Everything the monitor held for it is gone: its descriptors (socket, userfaultfd,
        // window memfd, eventfds) and its threads.
        wait_baseline(&d, baseline, round)?;
        d.check_alive()?;
    }
    let prog = spawn_workload(&d.socket, 32, 1500, "8M")?;
    let pid = prog.id();
    let out = prog.wait_with_output()?;
    check_verified(&d.socket, out, pid, "after three killed clients")?;
    d.check_alive()
}

/// Part 4: `uswap doctor` checks `daemon.toml` like the program files, naming file and key.
fn doctor_names_bad_daemon_config_key() -> R {
    let dir = tmpdir("doctor");
    std::fs::create_dir_all(dir.join("config"))?;
    std::fs::write(
        dir.join("config/daemon.toml"),
        "allow_uids = [1000]\nsocket_mode = \"0777\"\n",
    )?;
    let out = Command::new(uswap())
        .arg("doctor")
        .current_dir(&dir)
        .env("USWAP_SHIM", shim())
        .output()?;
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    if out.status.success()
        || !text.contains("daemon.toml:2")
        || !text.contains("key \"socket_mode\"")
        || !text.contains("0777")
    {
        return Err(format!("doctor did not name the bad daemon key:\n{text}").into());
    }
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let root = is_root();
    let needs_root = |t: Trial| if root { t } else { t.with_ignored_flag(true) };
    let etc_uswap = Path::new("/etc/uswap").is_dir();
    let tests = vec![
        needs_root(Trial::test(
            "hostile_packets_get_named_errors_while_managed_program_verifies",
            hostile_packets_get_named_errors_while_managed_program_verifies,
        )),
        needs_root(Trial::test(
            "hostile_floods_are_capped_with_clear_errors",
            hostile_floods_are_capped_with_clear_errors,
        )),
        needs_root(Trial::test(
            "agent_never_answers_monitor_times_out_and_stops_evicting_it",
            agent_never_answers_monitor_times_out_and_stops_evicting_it,
        )),
        Trial::test(
            "store_quotas_per_client_and_per_uid_hold_and_programs_verify",
            store_quotas_per_client_and_per_uid_hold_and_programs_verify,
        ),
        needs_root(Trial::test(
            "foreign_pid_and_regions_only_ever_reach_the_clients_own_mm",
            foreign_pid_and_regions_only_ever_reach_the_clients_own_mm,
        )),
        Trial::test(
            "uid_not_on_allow_list_is_refused_and_program_runs_unmanaged",
            uid_not_on_allow_list_is_refused_and_program_runs_unmanaged,
        ),
        needs_root(Trial::test(
            "daemon_dropped_to_nobody_serves_program_of_another_user",
            daemon_dropped_to_nobody_serves_program_of_another_user,
        )),
        Trial::test(
            "client_killed_mid_batch_is_collected_and_daemon_serves_next",
            client_killed_mid_batch_is_collected_and_daemon_serves_next,
        ),
        // doctor reads /etc/uswap when it exists, not the test's ./config.
        Trial::test(
            "doctor_names_bad_daemon_config_key",
            doctor_names_bad_daemon_config_key,
        )
        .with_ignored_flag(etc_uswap),
    ];
    if etc_uswap {
        eprintln!("note: /etc/uswap exists: doctor_names_bad_daemon_config_key is ignored (doctor would check /etc/uswap, not the test's directory)");
    }
    if !root {
        eprintln!(
            "note: not root: tests that create a userfaultfd in the test process (no access to \
             /dev/userfaultfd with vm.unprivileged_userfaultfd = 0) or switch users are ignored"
        );
    }
    libtest_mimic::run(&args, tests).exit();
}
