//! `libuswap_shim.so`: loaded into an unmodified program with `LD_PRELOAD`.
//!
//! In the program's own process it
//! 1. creates the program's userfaultfd (the syscall, then `/dev/userfaultfd`; never
//!    `UFFD_USER_MODE_ONLY`) and a second, private one for the agent's staging area;
//! 2. connects to the monitor, forwards the descriptor with SCM_RIGHTS and waits for the
//!    acknowledgement before `main` runs (no monitor: the program runs unmanaged, one line on
//!    stderr at most);
//! 3. starts the agent thread (see [`agent`]), which reports the program's anonymous regions
//!    and moves pages out on the monitor's request;
//! 4. around a `fork`, pauses eviction; the monitor keeps the parent's evicted pages for the
//!    child copy-on-write, and the child, before it runs on, creates its own userfaultfd,
//!    registers its memory and connects as "forked from" its parent (see [`fork_child`]);
//! 5. starts the guardian thread (see [`rescue`]), which brings every evicted page home from
//!    the shared store itself if the monitor dies and none comes back within `rescue_after`.
//!
//! Owns: the program-side state in [`SHIM`]. Must not: allocate or take locks the program may
//! hold anywhere the agent runs or in the interposed memory functions; link lz4 or the monitor.

mod agent;
mod maps;
mod raw;
mod rescue;

use std::os::fd::{AsRawFd, IntoRawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use uswap::protocol::io::{recv_packet, send_packet};
use uswap::protocol::wire::{Hello, Msg, MAX_MSG_LEN};
use uswap::uffd::{sys, Uffd};

/// Shim states.
const OFF: u32 = 0;
const MANAGED: u32 = 2;
const DETACHED: u32 = 3;

/// Everything the shim shares between the constructor, the interposers, the fork handlers and
/// the agent. Lives in the shim's own data segment, which is reported as excluded memory.
pub(crate) struct Shim {
    pub state: AtomicU32,
    pub sock: AtomicI32,
    /// The forwarded descriptor (events on): kept open here so that the program's evicted
    /// memory never reads as zeros while the monitor holds its copy.
    pub uffd: AtomicI32,
    pub req_efd: AtomicI32,
    pub done_efd: AtomicI32,
    pub window_base: AtomicUsize,
    pub window_len: AtomicUsize,
    pub staging_base: AtomicUsize,
    pub staging_len: AtomicUsize,
    pub stack_base: AtomicUsize,
    pub stack_len: AtomicUsize,
    pub scratch_base: AtomicUsize,
    pub scratch_len: AtomicUsize,
    /// Set by the interposers when the address space changed; the agent rescans.
    pub maps_dirty: AtomicBool,
    /// Serialises packets on the socket (agent snapshots vs. fork requests).
    pub sock_busy: AtomicBool,
    /// The agent is registering VMAs with the bounds it just read: a program mremap must not
    /// grow a mapping in place meanwhile (the registration would cover only part of it, and the
    /// split would make the program's next mremap of it fail with EFAULT).
    pub reg_busy: AtomicBool,
    /// Interposed mmap/munmap/mremap calls in progress.
    pub remaps_inflight: AtomicU32,
    /// The store file the monitor sent (a high-numbered descriptor, close-on-exec), or -1.
    pub store_fd: AtomicI32,
    /// The store's disk tier file the monitor sent (high-numbered, close-on-exec), or -1: the
    /// payloads of the store file's disk chunks, read with `pread` by the guardian.
    pub disk_fd: AtomicI32,
    /// This program's member index in the store's fork family (its owner bit in records).
    pub store_member: AtomicU32,
    /// The agent registers the managed VMAs (the monitor asked it to: eviction has begun).
    pub registering: AtomicBool,
    /// The guardian's stack and scratch.
    pub guard_base: AtomicUsize,
    /// Set by the guardian when the monitor is gone: the agent stops moving and registering.
    pub monitor_lost: AtomicBool,
    /// The agent is between waking up and going back to sleep (batches, scans).
    pub agent_busy: AtomicBool,
    /// The agent thread runs (set before it starts, cleared when it returns).
    pub agent_alive: AtomicBool,
    /// The features of the forwarded descriptor (for a `Hello` asking for adoption).
    pub uffd_features: AtomicU64,
    /// The guardian brought every page home after the monitor died.
    pub rescue_done: AtomicBool,
    /// Times a new monitor adopted this program (after the one before died).
    pub adoptions: AtomicU64,
    /// High-numbered duplicates of sock, uffd, req_efd, done_efd (in that order), to tell
    /// whether the program closed one of ours and reused its number (see [`fds_ok`]).
    pub refs: [AtomicI32; 4],
    /// The inode of our socket to the monitor (sockfs inodes are unique while the socket
    /// lives): tells whether `refs[FD_SOCK]` is still our socket after a detach.
    pub sock_ino: AtomicU64,
}

pub(crate) static SHIM: Shim = Shim {
    state: AtomicU32::new(OFF),
    sock: AtomicI32::new(-1),
    uffd: AtomicI32::new(-1),
    req_efd: AtomicI32::new(-1),
    done_efd: AtomicI32::new(-1),
    window_base: AtomicUsize::new(0),
    window_len: AtomicUsize::new(0),
    staging_base: AtomicUsize::new(0),
    staging_len: AtomicUsize::new(0),
    stack_base: AtomicUsize::new(0),
    stack_len: AtomicUsize::new(0),
    scratch_base: AtomicUsize::new(0),
    scratch_len: AtomicUsize::new(0),
    maps_dirty: AtomicBool::new(false),
    sock_busy: AtomicBool::new(false),
    reg_busy: AtomicBool::new(false),
    remaps_inflight: AtomicU32::new(0),
    store_fd: AtomicI32::new(-1),
    disk_fd: AtomicI32::new(-1),
    store_member: AtomicU32::new(0),
    registering: AtomicBool::new(false),
    guard_base: AtomicUsize::new(0),
    monitor_lost: AtomicBool::new(false),
    agent_busy: AtomicBool::new(false),
    agent_alive: AtomicBool::new(false),
    uffd_features: AtomicU64::new(0),
    rescue_done: AtomicBool::new(false),
    adoptions: AtomicU64::new(0),
    refs: [
        AtomicI32::new(-1),
        AtomicI32::new(-1),
        AtomicI32::new(-1),
        AtomicI32::new(-1),
    ],
    sock_ino: AtomicU64::new(0),
};

/// The shim's own anonymous memory (agent stack, staging, scratch, the guardian's memory) as
/// (start, length): never managed, never evicted.
pub(crate) fn own_ranges() -> [(u64, u64); 4] {
    let r = |base: &AtomicUsize, len: &AtomicUsize| {
        (
            base.load(Ordering::Relaxed) as u64,
            len.load(Ordering::Relaxed) as u64,
        )
    };
    [
        r(&SHIM.stack_base, &SHIM.stack_len),
        r(&SHIM.staging_base, &SHIM.staging_len),
        r(&SHIM.scratch_base, &SHIM.scratch_len),
        (
            SHIM.guard_base.load(Ordering::Relaxed) as u64,
            rescue::GUARD_BYTES as u64,
        ),
    ]
}

/// The monitor's socket address, kept by `init` for the guardian's probes.
static SOCK_ADDR: std::sync::OnceLock<(libc::sockaddr_un, libc::socklen_t)> =
    std::sync::OnceLock::new();

/// Whether a monitor accepts connections on the socket again (a connection is opened and
/// closed at once).
pub(crate) fn monitor_answers() -> bool {
    let Some((addr, len)) = SOCK_ADDR.get() else {
        return false;
    };
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return false;
    }
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes; `fd` is ours and closed below.
    let rc = unsafe { libc::connect(fd, (addr as *const libc::sockaddr_un).cast(), *len) };
    // SAFETY: closing our own descriptor.
    unsafe { libc::close(fd) };
    rc == 0
}

/// Indices into [`Shim::refs`].
pub(crate) const FD_SOCK: usize = 0;
pub(crate) const FD_UFFD: usize = 1;
pub(crate) const FD_REQ: usize = 2;
pub(crate) const FD_DONE: usize = 3;

/// The descriptor number of [`Shim::refs`] index `idx`'s original.
pub(crate) fn fd_number(idx: usize) -> i32 {
    fd_of(idx).load(Ordering::Relaxed)
}

fn fd_of(idx: usize) -> &'static AtomicI32 {
    match idx {
        FD_SOCK => &SHIM.sock,
        FD_UFFD => &SHIM.uffd,
        FD_REQ => &SHIM.req_efd,
        _ => &SHIM.done_efd,
    }
}

/// Whether our descriptors are still ours. Programs that daemonise close every descriptor
/// (closefrom) and open new ones under the same numbers; writing a wake-up or a packet into
/// such a number would corrupt the program's own files. Each descriptor is compared with its
/// high-numbered duplicate (kcmp KCMP_FILE: same open file?). On any mismatch the shim detaches
/// for good and never touches those numbers again; the monitor, seeing its socket closed,
/// hands every evicted page back.
pub(crate) fn fds_ok(which: &[usize]) -> bool {
    if SHIM.state.load(Ordering::Acquire) != MANAGED {
        return false;
    }
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    for &i in which {
        let (fd, r) = (
            fd_of(i).load(Ordering::Relaxed),
            SHIM.refs[i].load(Ordering::Relaxed),
        );
        let same = if NO_KCMP.load(Ordering::Relaxed) {
            same_inode(fd, r)
        } else {
            same_file(pid, fd, r) == 0
        };
        if !same {
            SHIM.state.store(DETACHED, Ordering::Release);
            return false;
        }
    }
    true
}

/// The kernel has no kcmp(2) (built without CONFIG_KCMP): descriptors are then compared by
/// inode only, which still catches a closed descriptor or one reused for another file or
/// socket, but not one reused for another anonymous-inode object (eventfd, userfaultfd).
static NO_KCMP: AtomicBool = AtomicBool::new(false);

/// kcmp(KCMP_FILE) of two descriptors of ours: 0 when they are the same open file.
fn same_file(pid: i32, a: i32, b: i32) -> libc::c_long {
    // SAFETY: kcmp compares two descriptors of our own process; it reads nothing else.
    unsafe {
        libc::syscall(libc::SYS_kcmp, pid, pid, 0 /* KCMP_FILE */, a, b)
    }
}

/// Whether two descriptors of ours refer to the same inode (the weaker check without kcmp).
fn same_inode(a: i32, b: i32) -> bool {
    matches!((file_id(a), file_id(b)), (Some(x), Some(y)) if x == y)
}

/// The (device, inode) of descriptor `fd`; `None` if it is not open.
fn file_id(fd: i32) -> Option<(u64, u64)> {
    // SAFETY: fstat into a zeroed stat buffer on our stack.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        (libc::fstat(fd, &mut st) == 0).then_some((st.st_dev, st.st_ino))
    }
}

/// The inode of the descriptor `fd`, or 0 if it is not open.
fn inode_of(fd: i32) -> u64 {
    file_id(fd).map_or(0, |(_, ino)| ino)
}

/// Records the inode of our socket's high-numbered duplicate (at start, and after an
/// adoption put a new monitor's socket under the same numbers).
pub(crate) fn record_sock_ino() {
    SHIM.sock_ino.store(
        inode_of(SHIM.refs[FD_SOCK].load(Ordering::Relaxed)),
        Ordering::Relaxed,
    );
}

/// After a detach: makes sure the monitor sees the end of our stream. A program that closed
/// only the socket's number leaves our high-numbered duplicate open, and the monitor would go
/// on managing a program whose shim no longer talks to it. Shut down only if that number
/// still holds our socket (same inode): the program may have reused it.
fn hang_up_monitor() {
    let r = SHIM.refs[FD_SOCK].load(Ordering::Relaxed);
    let ino = SHIM.sock_ino.load(Ordering::Relaxed);
    if r >= 0 && ino != 0 && inode_of(r) == ino {
        // SAFETY: shutdown of our own socket (checked by inode just above).
        unsafe { libc::shutdown(r, libc::SHUT_RDWR) };
    }
}

/// Makes the high-numbered duplicates (at 512 or above, close-on-exec).
fn make_refs() -> Result<(), &'static str> {
    for i in [FD_SOCK, FD_UFFD, FD_REQ, FD_DONE] {
        // SAFETY: duplicating our own descriptor.
        let d =
            unsafe { libc::fcntl(fd_of(i).load(Ordering::Relaxed), libc::F_DUPFD_CLOEXEC, 512) };
        if d < 0 {
            return Err("cannot duplicate the shim's descriptors");
        }
        SHIM.refs[i].store(d, Ordering::Relaxed);
    }
    record_sock_ino();
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let kcmp = same_file(
        pid,
        fd_of(FD_SOCK).load(Ordering::Relaxed),
        SHIM.refs[FD_SOCK].load(Ordering::Relaxed),
    );
    if kcmp != 0 {
        NO_KCMP.store(true, Ordering::Relaxed);
        raw::eprint_line(&[
            b"uswap: kcmp(2) is unavailable (kernel without CONFIG_KCMP); descriptor reuse is checked by inode only",
        ]);
    }
    Ok(())
}

/// Size of the agent's stack (its TLS and thread descriptor live at its top).
pub(crate) const AGENT_STACK_BYTES: usize = 256 * 1024;
/// Scratch memory of the agent: maps buffer and packet buffer.
pub(crate) const SCRATCH_BYTES: usize = 256 * 1024;

/// Longest reason kept from a monitor that refused this program.
const REFUSAL_MAX: usize = 240;
/// The monitor's reason when it refused this program (the text of its `Error` or refusing
/// `HelloAck`), for the one line the constructor prints. No allocation: static bytes.
static REFUSAL: [std::sync::atomic::AtomicU8; REFUSAL_MAX] =
    [const { std::sync::atomic::AtomicU8::new(0) }; REFUSAL_MAX];
static REFUSAL_LEN: AtomicUsize = AtomicUsize::new(0);

fn keep_refusal(text: &[u8]) {
    let n = text.len().min(REFUSAL_MAX);
    for (d, s) in REFUSAL.iter().zip(&text[..n]) {
        // Printable ASCII only: the text comes from another process.
        let c = if (0x20..0x7f).contains(s) { *s } else { b'?' };
        d.store(c, Ordering::Relaxed);
    }
    REFUSAL_LEN.store(n, Ordering::Relaxed);
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = uswap_shim_init;

extern "C" fn uswap_shim_init() {
    resolve_fork();
    if let Err(why) = init(Attach::Start) {
        let quiet = raw::getenv(c"USWAP_QUIET").is_some_and(|v| v == b"1");
        if !quiet {
            let mut text = [0u8; REFUSAL_MAX];
            let n = REFUSAL_LEN.load(Ordering::Relaxed).min(REFUSAL_MAX);
            for (d, s) in text.iter_mut().zip(&REFUSAL[..n]) {
                *d = s.load(Ordering::Relaxed);
            }
            let sep: &[u8] = if n > 0 { b": " } else { b"" };
            raw::eprint_line(&[
                b"uswap: running unmanaged: ",
                why.as_bytes(),
                sep,
                &text[..n],
            ]);
        }
        teardown_partial();
    }
}

/// Closes every descriptor the shim opened (and its high-numbered duplicates).
fn close_own_fds() {
    for fd in [
        &SHIM.sock,
        &SHIM.uffd,
        &SHIM.req_efd,
        &SHIM.done_efd,
        &SHIM.store_fd,
        &SHIM.disk_fd,
    ]
    .into_iter()
    .chain(SHIM.refs.iter())
    {
        let v = fd.swap(-1, Ordering::AcqRel);
        if v >= 0 {
            // SAFETY: closing a descriptor this shim opened (swapped out, so closed once).
            unsafe { libc::close(v) };
        }
    }
}

/// Closes whatever a failed `init` left open.
fn teardown_partial() {
    close_own_fds();
    SHIM.state.store(OFF, Ordering::Release);
}

fn connect(path: &[u8]) -> Result<i32, &'static str> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err("cannot create a socket");
    }
    let Some((addr, len)) = uswap::protocol::io::unix_sockaddr(path) else {
        // SAFETY: closing our own descriptor.
        unsafe { libc::close(fd) };
        return Err("socket path too long");
    };
    let _ = SOCK_ADDR.set((addr, len));
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    let rc = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) };
    if rc < 0 {
        // SAFETY: closing our own descriptor.
        unsafe { libc::close(fd) };
        return Err("no monitor answers on the socket (start `uswap daemon` or use `uswap run`)");
    }
    uswap::protocol::io::set_recv_timeout(fd, 10);
    Ok(fd)
}

/// Connects to the address of the first `connect` again (a forked child), without allocating.
pub(crate) fn connect_again() -> Result<i32, &'static str> {
    let Some((addr, len)) = SOCK_ADDR.get() else {
        return Err("the parent's monitor address is unknown");
    };
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err("cannot create a socket");
    }
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    let rc = unsafe { libc::connect(fd, (addr as *const libc::sockaddr_un).cast(), *len) };
    if rc < 0 {
        // SAFETY: closing our own descriptor.
        unsafe { libc::close(fd) };
        return Err("no monitor answers on the socket");
    }
    uswap::protocol::io::set_recv_timeout(fd, 10);
    Ok(fd)
}

pub(crate) fn program_name(buf: &mut [u8; 256]) -> usize {
    // SAFETY: readlink writes at most buf.len() bytes.
    let n = unsafe {
        libc::readlink(
            c"/proc/self/exe".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n <= 0 {
        return 0;
    }
    let n = n as usize;
    let start = buf[..n]
        .iter()
        .rposition(|c| *c == b'/')
        .map_or(0, |p| p + 1);
    buf.copy_within(start..n, 0);
    n - start
}

/// A forked child's registrations with the userfaultfd it sent in a `Hello` that failed (no
/// answer, a refusal): undone when `init` returns with an error. The monitor received a copy
/// of that descriptor and may keep it open a while; registrations live as long as any copy,
/// so without this the child's own rescue could not register its memory again (EBUSY) and it
/// would have to exit (seen: a child refused by a restarted monitor exited 70).
struct UnregisterOnDrop {
    /// The descriptor, or -1 when there is nothing to undo.
    uffd: i32,
    /// init's scratch mapping (SCRATCH_BYTES), for reading /proc/self/maps.
    scratch: usize,
}

impl Drop for UnregisterOnDrop {
    fn drop(&mut self) {
        if self.uffd < 0 {
            return;
        }
        SHIM.uffd.store(self.uffd, Ordering::Relaxed);
        // SAFETY: init's scratch mapping, SCRATCH_BYTES long; init is over and nothing else
        // uses it.
        let buf = unsafe { std::slice::from_raw_parts_mut(self.scratch as *mut u8, SCRATCH_BYTES) };
        agent::unregister_all(buf);
        SHIM.uffd.store(-1, Ordering::Relaxed);
    }
}

/// How a process attaches to the monitor.
#[derive(Clone, Copy)]
enum Attach {
    /// At program start: connects to `USWAP_SOCKET` (or the default path) and installs the
    /// fork handlers.
    Start,
    /// A child forked from a managed program, with its snapshot's token and its parent's pid:
    /// it registers its memory before it says `Hello`, and reconnects to its parent's address
    /// without allocating.
    Forked { token: u64, ppid: u32 },
    /// A forked child whose memory is whole again (its parent had nothing evicted, or it
    /// brought the pages home itself) after its monitor could not take it as a family member
    /// (a restarted monitor does not know its snapshot): it asks the same monitor to manage
    /// it as a new program. Its fork handlers are inherited.
    Whole,
}

/// Attaches this process to the monitor (see [`Attach`]).
fn init(how: Attach) -> Result<(), &'static str> {
    let fork = match how {
        Attach::Forked { token, ppid } => Some((token, ppid)),
        Attach::Start | Attach::Whole => None,
    };
    // SAFETY: sysconf has no preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page_size != uswap::PAGE_SIZE as i64 {
        return Err("page size is not 4 KiB");
    }
    let sock = if !matches!(how, Attach::Start) {
        // A forked child must not allocate before its memory is registered and the monitor
        // serves it (malloc could touch a page its parent had evicted): it reuses the
        // address its parent connected to.
        connect_again()?
    } else {
        let default_path;
        let path: &[u8] = match raw::getenv(c"USWAP_SOCKET") {
            Some(p) if !p.is_empty() => p,
            _ => {
                default_path = uswap::protocol::default_socket_path();
                use std::os::unix::ffi::OsStrExt;
                let p: &[u8] = default_path.as_os_str().as_bytes();
                // Leak-free: default_path lives until the end of init.
                p
            }
        };
        connect(path)?
    };
    SHIM.sock.store(sock, Ordering::Release);

    let required = sys::UFFD_FEATURE_EVENT_UNMAP
        | sys::UFFD_FEATURE_EVENT_REMOVE
        | sys::UFFD_FEATURE_EVENT_REMAP
        | sys::UFFD_FEATURE_MOVE;
    let uffd = Uffd::create(uswap::uffd::FORWARDED_FEATURES, required, true).map_err(|e| match e {
        uswap::uffd::UffdError::Os { errno: libc::EINVAL, .. } => "this kernel lacks UFFDIO_MOVE or the uffd events (Linux 6.8 or later is needed)",
        _ => "cannot create a userfaultfd (a non-root user needs read-write access to /dev/userfaultfd; see `uswap doctor`)",
    })?;

    // Agent memory: stack, staging and scratch, never registered with the forwarded
    // descriptor, never inherited by a fork.
    let stack = raw::map_anon(AGENT_STACK_BYTES, libc::MAP_NORESERVE | libc::MAP_STACK);
    let staging_len = uswap::protocol::shm::MAX_BATCH_PAGES * uswap::PAGE_SIZE;
    let staging = raw::map_anon(staging_len, libc::MAP_NORESERVE);
    let scratch = raw::map_anon(SCRATCH_BYTES, 0);
    // The guardian's stack and scratch; not MADV_DONTFORK, for the same reason as the agent's
    // stack.
    let guard = raw::map_anon(rescue::GUARD_BYTES, libc::MAP_NORESERVE | libc::MAP_STACK);
    if stack == 0 || staging == 0 || scratch == 0 || guard == 0 {
        return Err("cannot map the agent's memory");
    }
    // Staging and scratch do not follow a fork. The agent's stack must: glibc keeps the
    // agent's thread descriptor at its top and walks every thread descriptor in the child.
    for (a, l) in [(staging, staging_len), (scratch, SCRATCH_BYTES)] {
        // SAFETY: advising our own fresh mappings.
        unsafe { libc::madvise(a as *mut _, l, libc::MADV_DONTFORK) };
    }
    // SAFETY: advising our own fresh mapping: staging pages are moved one by one.
    unsafe { libc::madvise(staging as *mut _, staging_len, libc::MADV_NOHUGEPAGE) };
    // Staging is registered with the forwarded descriptor and moves are issued on it: a move
    // then fails with EAGAIN while an address-space event of the program is unread.
    uffd.register(
        staging as u64,
        staging_len as u64,
        sys::UFFDIO_REGISTER_MODE_MISSING,
    )
    .map_err(|_| "cannot register the staging area")?;
    SHIM.stack_base.store(stack, Ordering::Relaxed);
    SHIM.guard_base.store(guard, Ordering::Relaxed);
    SHIM.stack_len.store(AGENT_STACK_BYTES, Ordering::Relaxed);
    SHIM.staging_base.store(staging, Ordering::Relaxed);
    SHIM.staging_len.store(staging_len, Ordering::Relaxed);
    SHIM.scratch_base.store(scratch, Ordering::Relaxed);
    SHIM.scratch_len.store(SCRATCH_BYTES, Ordering::Relaxed);

    // A forked child: the pages its parent had evicted are missing here, in memory the kernel
    // unregistered at the fork. It registers every managed VMA with its new descriptor before
    // anything touches them (the monitor serves them once it has the descriptor).
    // If the attach fails after this, the registrations are undone before the descriptor
    // closes (the guard drops before `uffd`).
    let mut undo = UnregisterOnDrop { uffd: -1, scratch };
    if fork.is_some() && SHIM.registering.load(Ordering::Relaxed) {
        SHIM.uffd.store(uffd.as_raw_fd(), Ordering::Relaxed);
        undo.uffd = uffd.as_raw_fd();
        // SAFETY: the scratch mapping is ours, SCRATCH_BYTES long, and nothing else uses it yet.
        let buf = unsafe { std::slice::from_raw_parts_mut(scratch as *mut u8, SCRATCH_BYTES) };
        let ok = agent::register_all(buf);
        SHIM.uffd.store(-1, Ordering::Relaxed);
        if !ok {
            return Err("cannot register the forked child's memory with its userfaultfd");
        }
    }

    // Hello, with the descriptor attached.
    let mut name = [0u8; 256];
    let name_len = program_name(&mut name);
    let app = raw::getenv(c"USWAP_APP").unwrap_or(b"");
    let overrides = raw::getenv(c"USWAP_OVERRIDES").unwrap_or(b"");
    let hello = Msg::Hello(Hello {
        // SAFETY: getpid has no preconditions.
        pid: unsafe { libc::getpid() } as u32,
        page_size: uswap::PAGE_SIZE as u32,
        uffd_features: uffd.features(),
        fork_token: fork.map_or(0, |f| f.0),
        forked_from: fork.map_or(0, |f| f.1),
        flags: 0,
        store_member: 0,
        name: &name[..name_len],
        app,
        overrides,
    });
    // SAFETY: the scratch mapping is ours and SCRATCH_BYTES >= MAX_MSG_LEN.
    let pkt = unsafe { std::slice::from_raw_parts_mut(scratch as *mut u8, MAX_MSG_LEN) };
    let n = hello
        .encode(pkt)
        .map_err(|_| "hello message does not fit")?;
    send_packet(sock, &pkt[..n], &[uffd.as_raw_fd()])
        .map_err(|_| "the monitor closed the connection")?;

    let mut got = recv_packet(sock, pkt, 0)
        .map_err(|_| "the monitor did not answer in time")?
        .ok_or("the monitor closed the connection")?;
    let (window_len, text, has_disk) = match Msg::decode(&pkt[..got.len]) {
        Ok(Msg::HelloAck(a)) if a.status == 0 => {
            SHIM.store_member.store(a.store_member, Ordering::Relaxed);
            (
                a.window_len_bytes as usize,
                a.text,
                a.flags & uswap::protocol::wire::HELLO_ACK_DISK != 0,
            )
        }
        Ok(Msg::HelloAck(a)) => {
            keep_refusal(a.text);
            return Err("the monitor refused this program");
        }
        Ok(Msg::Error { text, .. }) => {
            keep_refusal(text);
            return Err("the monitor refused this program");
        }
        _ => return Err("the monitor sent an unexpected reply"),
    };
    let _ = text;
    let (Some(win), Some(req), Some(done)) = (got.take_fd(0), got.take_fd(1), got.take_fd(2))
    else {
        return Err("the monitor's reply lacks its descriptors");
    };
    // The store file: kept at a high number, out of the program's way, for the guardian.
    if let Some(store) = got.take_fd(3) {
        // SAFETY: duplicating a descriptor we own; the original closes when `store` drops.
        let d = unsafe { libc::fcntl(store.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 512) };
        SHIM.store_fd.store(d, Ordering::Relaxed);
    }
    // The disk tier's file, likewise: the guardian reads the store's disk pages from it.
    if let Some(disk) = got.take_fd(4).filter(|_| has_disk) {
        // SAFETY: duplicating a descriptor we own; the original closes when `disk` drops.
        let d = unsafe { libc::fcntl(disk.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 512) };
        SHIM.disk_fd.store(d, Ordering::Relaxed);
    }
    // SAFETY: mapping the memfd the monitor sent, shared, at a new address.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            window_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            win.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED || window_len < uswap::protocol::shm::DATA_OFF {
        return Err("cannot map the monitor's window");
    }
    // SAFETY: advising the mapping we just made.
    unsafe { libc::madvise(base, window_len, libc::MADV_DONTFORK) };
    drop(win);
    SHIM.window_base.store(base as usize, Ordering::Relaxed);
    SHIM.window_len.store(window_len, Ordering::Relaxed);
    SHIM.req_efd.store(req.into_raw_fd(), Ordering::Relaxed);
    SHIM.done_efd.store(done.into_raw_fd(), Ordering::Relaxed);
    SHIM.uffd_features.store(uffd.features(), Ordering::Relaxed);
    undo.uffd = -1;
    SHIM.uffd
        .store(uffd.into_owned_fd().into_raw_fd(), Ordering::Relaxed);
    // Blocking from now on (fork requests may wait for a long restore).
    uswap::protocol::io::set_recv_timeout(sock, 0);

    make_refs()?;
    SHIM.maps_dirty.store(true, Ordering::Release);
    SHIM.state.store(MANAGED, Ordering::Release);
    WAS_MANAGED.store(true, Ordering::Relaxed);
    agent::start().map_err(|_| "cannot start the agent thread")?;
    if SHIM.store_fd.load(Ordering::Relaxed) >= 0 {
        rescue::start().map_err(|_| "cannot start the guardian thread")?;
    }
    if matches!(how, Attach::Start) {
        // SAFETY: registering plain extern "C" handlers.
        unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child)) };
    }
    Ok(())
}

/// Takes the socket for one request/response exchange.
pub(crate) fn sock_lock(spin: bool) -> bool {
    loop {
        if SHIM
            .sock_busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return true;
        }
        if !spin {
            return false;
        }
        // SAFETY: sched_yield has no preconditions.
        unsafe { libc::sched_yield() };
    }
}

pub(crate) fn sock_unlock() {
    SHIM.sock_busy.store(false, Ordering::Release);
}

/// Whether this process was managed (stays set when the shim detached because the program
/// closed its descriptors; cleared in a forked child, whose memory is whole).
static WAS_MANAGED: AtomicBool = AtomicBool::new(false);
/// `fork_prepare` holds the socket lock for `fork_parent`/`fork_child` to release.
static FORK_LOCKED: AtomicBool = AtomicBool::new(false);
/// Forks prepared so far: the agent's unshare (`agent::Busy`) stops when one starts, since the
/// pages it would make the program's own are then shared with a live child again.
pub(crate) static FORKS_STARTED: AtomicU64 = AtomicU64::new(0);
/// The monitor could not bring every page home: the child must not run on a partial copy.
static FORK_UNSAFE: AtomicBool = AtomicBool::new(false);
/// The monitor's snapshot of this fork's evicted pages, for the child (0 = none: every page is
/// home and the child runs unmanaged). Set by `fork_prepare`; the child reads its copy.
static FORK_TOKEN: AtomicU64 = AtomicU64::new(0);
/// The child's member index in the family store, from `ForkReady` (255: none).
static FORK_MEMBER: AtomicU32 = AtomicU32::new(255);
/// madvise(2) advice that faults pages in for reading (Linux 5.14).
const MADV_POPULATE_READ: i32 = 22;
const MADV_POPULATE_WRITE: i32 = 23;

/// Bytes of the forking thread's stack below its stack pointer that a forked child makes
/// resident before it registers anything (see [`populate_stack_below_sp`]).
const CHILD_STACK_PREFAULT_BYTES: u64 = 256 * 1024;

/// In a forked child, before any of its memory is registered: the stack below the stack
/// pointer (dead data of the forking thread, at most [`CHILD_STACK_PREFAULT_BYTES`], within
/// the stack's mapping) is made resident. The parent's monitor may have evicted those pages;
/// the child's own attach, and the rescue it runs if no monitor takes it, use that stack
/// (buffers, decompression) after registering the child's memory with its new userfaultfd,
/// and a fault there would wait for a monitor that may never come (seen: a child refused by a
/// restarted monitor hung in its rescue's decompression). Nothing is registered yet, so
/// these faults are ordinary ones (zero pages; the content below the stack pointer is dead).
fn populate_stack_below_sp() {
    let marker = 0u8;
    let sp = std::hint::black_box(&marker) as *const u8 as u64;
    let page = uswap::PAGE_SIZE as u64;
    let top = sp & !(page - 1);
    let mut lo = top;
    let mut buf = [0u8; 4096];
    maps::for_each_mapping(&mut buf, |m| {
        if m.start <= sp && sp < m.end {
            lo = m.start.max(top.saturating_sub(CHILD_STACK_PREFAULT_BYTES));
        }
    });
    if lo < top {
        // SAFETY: madvise(MADV_POPULATE_WRITE) only faults in pages of our own stack mapping
        // below the stack pointer, which no frame uses; the raw syscall.
        unsafe {
            libc::syscall(
                libc::SYS_madvise,
                lo,
                (top - lo) as usize,
                MADV_POPULATE_WRITE,
            )
        };
    }
}

/// Test hook: `USWAP_TEST_CHILD_WAIT_MS=N` makes a forked child wait N ms before it
/// attaches, so a test can kill the monitor between the fork and the child's connection
/// (`USWAP_TEST_DIE=fork:done` in the monitor). Unset, one getenv per fork.
fn test_child_wait() {
    let Some(v) = raw::getenv(c"USWAP_TEST_CHILD_WAIT_MS") else {
        return;
    };
    let ms = v
        .iter()
        .take_while(|c| c.is_ascii_digit())
        .fold(0u64, |n, c| {
            n.saturating_mul(10).saturating_add(u64::from(c - b'0'))
        });
    let ts = libc::timespec {
        tv_sec: (ms / 1000) as libc::time_t,
        tv_nsec: ((ms % 1000) * 1_000_000) as libc::c_long,
    };
    // SAFETY: nanosleep with a valid timespec on our stack.
    unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
}

/// libc's `fork`, found once by the constructor (see [`fork`]).
static REAL_FORK: AtomicUsize = AtomicUsize::new(0);

fn resolve_fork() {
    REAL_FORK.store(next_symbol(c"fork"), Ordering::Relaxed);
}

/// Before fork: asks the monitor to pause eviction and keep a copy-on-write snapshot of the
/// evicted pages for the child (or, when it cannot, to bring every page home).
extern "C" fn fork_prepare() {
    FORKS_STARTED.fetch_add(1, Ordering::SeqCst);
    FORK_UNSAFE.store(false, Ordering::Relaxed);
    FORK_TOKEN.store(0, Ordering::Relaxed);
    match SHIM.state.load(Ordering::Acquire) {
        MANAGED => {}
        // The guardian brought every page home and unregistered everything: nothing to do.
        DETACHED if SHIM.rescue_done.load(Ordering::Acquire) => return,
        DETACHED if WAS_MANAGED.load(Ordering::Relaxed) => {
            detached_fork_prepare();
            return;
        }
        _ => return,
    }
    sock_lock(true);
    FORK_LOCKED.store(true, Ordering::Relaxed);
    if !fds_ok(&[FD_SOCK]) {
        // The program closed our socket: the monitor is handing every page back.
        detached_fork_prepare();
        return;
    }
    let mut ok = None;
    for _ in 0..4 {
        let adoptions = SHIM.adoptions.load(Ordering::Acquire);
        ok = fork_exchange();
        if ok.is_some() {
            break;
        }
        // The monitor died. The guardian either brings every page home (the child then gets
        // a complete copy), or a new monitor adopts the program: ask that one.
        match wait_for_rescue(adoptions) {
            Rescued::Home => return,
            Rescued::Adopted => continue,
            Rescued::Neither => break,
        }
    }
    if ok == Some(true) && FORK_TOKEN.load(Ordering::Relaxed) != 0 {
        // The memory libc touches in the child before our `fork_child` runs must be present
        // at the fork (in the child it is unregistered until then). Brought home now that
        // eviction is paused (until ForkDone), so nothing moves it out again before the fork.
        touch_fork_path();
    }
    if ok != Some(true) {
        FORK_UNSAFE.store(true, Ordering::Relaxed);
        raw::eprint_line(&[b"uswap: the monitor could not prepare the fork: the child exits (70) rather than run on a partial copy"]);
    }
    // The socket stays locked until fork_parent / fork_child.
}

/// Reads (so the monitor brings home) the pages libc's fork touches in the child before the
/// child's handlers run, and that the parent's own fork path does not: the thread descriptors
/// at the top of other threads' stacks (`reclaim_stacks`) and every open `FILE` and its lock
/// (`fresetlockfiles`). Also the first pages of every managed mapping (malloc arena and heap
/// headers). What the parent's fork path touches itself (its arenas' locks, its own thread
/// descriptor) is brought home by those touches, before the fork.
fn touch_fork_path() {
    let own = own_ranges();
    let mut buf = [0u8; 16 * 1024];
    let page = uswap::PAGE_SIZE as u64;
    maps::for_each_mapping(&mut buf, |m| {
        if !m.is_manageable() || own.iter().any(|(s, l)| *s <= m.start && m.start < s + l) {
            return;
        }
        let pages = (m.end - m.start) / page;
        let head = pages.min(2);
        let tail = pages.saturating_sub(4).max(head);
        for (first, n) in [(0, head), (tail, pages - tail)] {
            if n == 0 {
                continue;
            }
            // Populating (a read fault the monitor serves) rather than reading: another thread
            // may unmap the range meanwhile, which then fails with ENOMEM instead of SIGSEGV.
            // SAFETY: madvise(MADV_POPULATE_READ) only faults pages in; the raw syscall.
            unsafe {
                libc::syscall(
                    libc::SYS_madvise,
                    m.start + first * page,
                    (n * page) as usize,
                    MADV_POPULATE_READ,
                )
            };
        }
    });
    extern "C" {
        static _IO_list_all: *mut u8;
        fn _IO_list_lock();
        fn _IO_list_unlock();
    }
    /// `struct _IO_FILE` (x86-64 glibc): `_chain` and `_lock` offsets.
    const CHAIN_OFF: usize = 104;
    const LOCK_OFF: usize = 136;
    // SAFETY: glibc's exported list of open FILEs, walked under its own lock (as fork does);
    // each entry is a live FILE whose `_chain` and `_lock` fields are at these offsets.
    unsafe {
        _IO_list_lock();
        let mut f = _IO_list_all;
        let mut n = 0;
        while !f.is_null() && n < 100_000 {
            std::ptr::read_volatile(f);
            let lock = std::ptr::read_volatile(f.add(LOCK_OFF) as *const *const u8);
            if !lock.is_null() {
                std::ptr::read_volatile(lock);
            }
            f = std::ptr::read_volatile(f.add(CHAIN_OFF) as *const *mut u8);
            n += 1;
        }
        _IO_list_unlock();
    }
}

/// `ForkPrepare` and its answer on the monitor's socket (held). `None` if the socket failed.
fn fork_exchange() -> Option<bool> {
    let sock = SHIM.sock.load(Ordering::Acquire);
    let mut buf = [0u8; 256];
    Msg::ForkPrepare
        .encode(&mut buf)
        .ok()
        .and_then(|n| send_packet(sock, &buf[..n], &[]).ok())
        .and_then(|_| loop {
            match recv_packet(sock, &mut buf, 0) {
                Ok(Some(r)) => match Msg::decode(&buf[..r.len]) {
                    Ok(Msg::ForkReady {
                        status,
                        token,
                        child_member,
                        ..
                    }) => {
                        FORK_TOKEN.store(token, Ordering::Relaxed);
                        FORK_MEMBER.store(child_member, Ordering::Relaxed);
                        break Some(status == 0);
                    }
                    _ => continue,
                },
                _ => break None,
            }
        })
}

/// What became of a program whose monitor died during a fork request.
enum Rescued {
    /// The guardian brought every page home.
    Home,
    /// A new monitor adopted the program (the socket is a new one).
    Adopted,
    /// Neither within the bound (no guardian, or it never finished).
    Neither,
}

/// The monitor's socket failed during a fork request: if the guardian runs, waits for it to
/// notice and either bring every page home (at most `rescue_after` plus the copying) or have a
/// new monitor adopt the program (`adoptions` was the count before the request).
fn wait_for_rescue(adoptions: u64) -> Rescued {
    if SHIM.guard_base.load(Ordering::Relaxed) == 0 || SHIM.store_fd.load(Ordering::Relaxed) < 0 {
        return Rescued::Neither;
    }
    // Bounded, so a guardian that never runs cannot hang the fork forever.
    let deadline = raw::monotonic_ns() + 3_700_000_000_000;
    while raw::monotonic_ns() < deadline {
        if SHIM.rescue_done.load(Ordering::Acquire) {
            return Rescued::Home;
        }
        if SHIM.adoptions.load(Ordering::Acquire) != adoptions {
            return Rescued::Adopted;
        }
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 10_000_000,
        };
        // SAFETY: nanosleep with a valid timespec on our stack.
        unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
    }
    Rescued::Neither
}

/// How long a detached shim's fork waits for its ranges to be unregistered (the monitor's
/// hand-back waits up to `agent_timeout` for batches in flight; the guardian's rescue starts
/// `rescue_after` after the monitor is gone).
const DETACHED_FORK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Before a fork once the shim has detached (the program closed our descriptors). The child
/// has no userfaultfd, so every page must be present in the parent at the fork. Reading the
/// pages is not enough while any range is still registered: until the monitor has read the end
/// of our stream it keeps evicting, and the cross-mm backend moves pages out without our agent,
/// so a page read now could be gone again at the fork. The monitor unregisters every range
/// once it has handed every page back (the guardian does after a rescue): wait for that, then
/// read everything (a no-op by then, unless a range was never registered). If the ranges stay
/// registered, the child exits (70) rather than run on a partial copy.
fn detached_fork_prepare() {
    hang_up_monitor();
    let mut buf = [0u8; 16 * 1024];
    let t0 = std::time::Instant::now();
    loop {
        match maps::any_manageable_registered(&mut buf) {
            Some(false) => break,
            // No smaps (a kernel without CONFIG_PROC_PAGE_MONITOR): read and hope, as before.
            None => break,
            Some(true) if t0.elapsed() >= DETACHED_FORK_WAIT => {
                FORK_UNSAFE.store(true, Ordering::Relaxed);
                raw::eprint_line(&[b"uswap: the monitor did not let go of the program before the fork: the child exits (70) rather than run on a partial copy"]);
                return;
            }
            Some(true) => {
                let ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 2_000_000,
                };
                // SAFETY: nanosleep with a valid timespec on our stack.
                unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
            }
        }
    }
    touch_all_anonymous();
}

/// Faults in every page of every anonymous region outside the shim's own memory, so every
/// evicted page is brought back (by the monitor, or the guardian) before a fork.
fn touch_all_anonymous() {
    let own = own_ranges();
    let mut buf = [0u8; 16 * 1024];
    maps::for_each_mapping(&mut buf, |m| {
        if !m.is_manageable() {
            return;
        }
        // Populated page by page around our own ranges, else in one call: a read fault per
        // page, which another thread's munmap meanwhile turns into ENOMEM, not SIGSEGV.
        let populate = |a: u64, len: u64| {
            // SAFETY: madvise(MADV_POPULATE_READ) only faults pages in; the raw syscall.
            unsafe { libc::syscall(libc::SYS_madvise, a, len as usize, MADV_POPULATE_READ) };
        };
        if !own.iter().any(|(s, l)| *s < m.end && m.start < s + l) {
            populate(m.start, m.end - m.start);
            return;
        }
        let mut a = m.start;
        while a < m.end {
            if !own.iter().any(|(s, l)| *s <= a && a < s + l) {
                populate(a, uswap::PAGE_SIZE as u64);
            }
            a += uswap::PAGE_SIZE as u64;
        }
    });
}

/// Sends `ForkDone` (the socket must be held).
fn send_fork_done(child_pid: u32, token: u64) {
    if SHIM.state.load(Ordering::Acquire) == MANAGED && fds_ok(&[FD_SOCK]) {
        let sock = SHIM.sock.load(Ordering::Acquire);
        let mut buf = [0u8; 64];
        if let Ok(n) = (Msg::ForkDone { child_pid, token }).encode(&mut buf) {
            let _ = send_packet(sock, &buf[..n], &[]);
        }
    }
}

extern "C" fn fork_parent() {
    if !FORK_LOCKED.swap(false, Ordering::Relaxed) {
        return;
    }
    // Eviction resumes; the child's pid follows from our `fork` wrapper, if it is the caller.
    send_fork_done(0, FORK_TOKEN.load(Ordering::Relaxed));
    sock_unlock();
}

/// In the child. With a snapshot (a token), the child is managed in its own right: its
/// memory lacks the pages its parent had evicted, and the kernel dropped the parent's
/// registrations, so before the program runs on it creates its own userfaultfd, registers
/// every managed VMA and says `Hello` as forked from its parent; the monitor serves those
/// pages from the shared store. Without one, every page is home and the child runs unmanaged.
extern "C" fn fork_child() {
    if FORK_UNSAFE.load(Ordering::Relaxed) {
        raw::eprint_line(&[b"uswap: forked child exits: its memory copy may be incomplete"]);
        // SAFETY: leaving the child at once, without running the parent's exit handlers.
        unsafe { libc::_exit(70) };
    }
    WAS_MANAGED.store(false, Ordering::Relaxed);
    let locked = FORK_LOCKED.swap(false, Ordering::Relaxed);
    let token = FORK_TOKEN.swap(0, Ordering::Relaxed);
    let managed = SHIM.state.load(Ordering::Acquire) == MANAGED;
    // The family store, inherited: kept (not closed with the parent's other descriptors) in
    // case the child must bring its pages home itself.
    let (inherited_store, inherited_disk) = if managed && token != 0 {
        (
            SHIM.store_fd.swap(-1, Ordering::AcqRel),
            SHIM.disk_fd.swap(-1, Ordering::AcqRel),
        )
    } else {
        (-1, -1)
    };
    if managed {
        SHIM.state.store(DETACHED, Ordering::Release);
        // The child's copies of the parent's descriptors.
        close_own_fds();
    }
    if locked {
        sock_unlock();
    }
    if !managed {
        return;
    }
    if token == 0 {
        // No snapshot: every page was brought home before the fork (the family is full, or
        // the guardian had them home), so this copy is whole. The child is managed as a new
        // program, with a family of its own, as any forked child is; quietly unmanaged if the
        // monitor will not take it, as before.
        if locked {
            let _ = attach_whole();
        }
        return;
    }
    populate_stack_below_sp();
    // The parent's threads are not here: whatever they held is released.
    SHIM.reg_busy.store(false, Ordering::SeqCst);
    SHIM.remaps_inflight.store(0, Ordering::SeqCst);
    SHIM.agent_busy.store(false, Ordering::SeqCst);
    SHIM.monitor_lost.store(false, Ordering::SeqCst);
    SHIM.rescue_done.store(false, Ordering::SeqCst);
    SHIM.sock_busy.store(false, Ordering::SeqCst);
    let had_evicted = SHIM.registering.load(Ordering::Relaxed);
    let member = FORK_MEMBER.load(Ordering::Relaxed);
    // SAFETY: getppid has no preconditions.
    let ppid = unsafe { libc::getppid() } as u32;
    test_child_wait();
    let attached = init(Attach::Forked { token, ppid });
    if let Err(why) = attached {
        teardown_partial();
        if had_evicted && member != uswap::protocol::wire::NO_MEMBER {
            // The monitor is gone (or refused us): our pages are in the shared store.
            match rescue::rescue_forked_child(inherited_store, inherited_disk, member) {
                Some(n) => {
                    let mut num = [0u8; 20];
                    let n = rescue::fmt_u64(n, &mut num);
                    let again = attach_whole();
                    raw::eprint_line(&[
                        b"uswap: forked child could not attach (",
                        why.as_bytes(),
                        b"); ",
                        n,
                        b" pages its parent had evicted brought home from the shared store; ",
                        again,
                    ]);
                }
                None => {
                    raw::eprint_line(&[
                        b"uswap: forked child exits (70): it cannot get the pages its parent had evicted: ",
                        why.as_bytes(),
                    ]);
                    // SAFETY: leaving the child at once; its memory is incomplete.
                    unsafe { libc::_exit(70) };
                }
            }
        } else if had_evicted {
            raw::eprint_line(&[
                b"uswap: forked child exits (70): it cannot get the pages its parent had evicted: ",
                why.as_bytes(),
            ]);
            // SAFETY: leaving the child at once; its memory is incomplete.
            unsafe { libc::_exit(70) };
        } else {
            let again = attach_whole();
            raw::eprint_line(&[
                b"uswap: forked child could not attach (",
                why.as_bytes(),
                b"); ",
                again,
            ]);
        }
    }
    for fd in [inherited_store, inherited_disk] {
        if fd >= 0 {
            // SAFETY: closing an inherited descriptor we kept (the monitor sent a new one, or
            // the rescue is over).
            unsafe { libc::close(fd) };
        }
    }
}

/// A forked child whose memory is whole and who could not join its family: asks the same
/// monitor to manage it as a new program ([`Attach::Whole`]). Returns the end of its stderr
/// line.
fn attach_whole() -> &'static [u8] {
    match init(Attach::Whole) {
        Ok(()) => b"the monitor manages it as a new program",
        Err(_) => {
            teardown_partial();
            b"it runs unmanaged"
        }
    }
}

/// `fork(3)`: libc's own, then the parent tells the monitor its child's pid, so the monitor
/// can drop the child's snapshot if the child dies before claiming it (or the fork failed).
///
/// # Safety
/// Same contract as fork(2).
#[no_mangle]
pub unsafe extern "C" fn fork() -> libc::pid_t {
    type ForkFn = unsafe extern "C" fn() -> libc::pid_t;
    let mut f = REAL_FORK.load(Ordering::Relaxed);
    if f == 0 {
        resolve_fork();
        f = REAL_FORK.load(Ordering::Relaxed);
    }
    if f == 0 {
        // SAFETY: the raw syscall, as a last resort (no atfork handlers run then).
        return unsafe { libc::syscall(libc::SYS_fork) } as libc::pid_t;
    }
    // SAFETY: `f` is libc's fork, found by dlsym.
    let pid = unsafe { std::mem::transmute::<usize, ForkFn>(f)() };
    if pid != 0 {
        let token = FORK_TOKEN.swap(0, Ordering::Relaxed);
        if token != 0 && sock_lock(true) {
            let child = if pid > 0 {
                pid as u32
            } else {
                uswap::protocol::wire::FORK_FAILED
            };
            send_fork_done(child, token);
            sock_unlock();
        }
    }
    pid
}

/// Waits while the agent registers VMAs (see `Shim::reg_busy`), then counts this call in:
/// a mapping created, grown or moved while the agent holds bounds it has just read could be
/// split by its registration, and the program's next mremap of it would fail with EFAULT.
fn enter_map_change() {
    // Detached programs wait too: the guardian unregisters with the bounds it reads, as the
    // agent registers.
    if SHIM.state.load(Ordering::Relaxed) == OFF {
        SHIM.remaps_inflight.fetch_add(1, Ordering::SeqCst);
        return;
    }
    loop {
        if !SHIM.reg_busy.load(Ordering::SeqCst) {
            SHIM.remaps_inflight.fetch_add(1, Ordering::SeqCst);
            if !SHIM.reg_busy.load(Ordering::SeqCst) {
                return;
            }
            SHIM.remaps_inflight.fetch_sub(1, Ordering::SeqCst);
        }
        // SAFETY: sched_yield has no preconditions.
        unsafe { libc::sched_yield() };
    }
}

fn leave_map_change() {
    SHIM.remaps_inflight.fetch_sub(1, Ordering::SeqCst);
}

/// Marks the address space as changed and wakes the agent (once per burst).
fn note_maps_changed() {
    if SHIM.state.load(Ordering::Relaxed) == MANAGED
        && !SHIM.maps_dirty.swap(true, Ordering::AcqRel)
    {
        agent::kick();
    }
}

// Interposers. They make the raw syscall themselves (no lookup of the next symbol, so no
// allocation and no recursion), then note the change for the agent.

/// # Safety
/// Same contract as mmap(2).
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut libc::c_void,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    off: libc::off_t,
) -> *mut libc::c_void {
    enter_map_change();
    // SAFETY: forwarding the caller's arguments to the syscall unchanged.
    let r = unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, off) };
    leave_map_change();
    if r == -1 {
        return libc::MAP_FAILED;
    }
    if flags & libc::MAP_ANONYMOUS != 0 && flags & libc::MAP_PRIVATE != 0 {
        note_maps_changed();
    }
    r as *mut libc::c_void
}

/// # Safety
/// Same contract as mmap64(3).
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut libc::c_void,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    off: libc::off64_t,
) -> *mut libc::c_void {
    // SAFETY: same contract.
    unsafe { mmap(addr, len, prot, flags, fd, off) }
}

/// # Safety
/// Same contract as madvise(2). Advice that discards memory (and so raises a REMOVE event) is
/// held off while the agent runs a batch, like munmap: a range discarded and rewritten between
/// the monitor's read of the REMOVE and the agent's move of that run would have its rewrite
/// moved out and then dropped as stale (DESIGN.md, "A range changing under a queued move").
#[no_mangle]
pub unsafe extern "C" fn madvise(addr: *mut libc::c_void, len: usize, advice: i32) -> i32 {
    // MADV_DONTNEED_LOCKED (Linux 5.18+) is 24; the libc crate may not name it.
    let discards = matches!(advice, libc::MADV_DONTNEED | libc::MADV_REMOVE | 24);
    if discards {
        enter_map_change();
    }
    // SAFETY: forwarding the caller's arguments to the syscall unchanged.
    let r = unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) };
    if discards {
        leave_map_change();
    }
    r as i32
}

/// # Safety
/// Same contract as munmap(2).
#[no_mangle]
pub unsafe extern "C" fn munmap(addr: *mut libc::c_void, len: usize) -> i32 {
    enter_map_change();
    // SAFETY: forwarding the caller's arguments to the syscall unchanged.
    let r = unsafe { libc::syscall(libc::SYS_munmap, addr, len) };
    leave_map_change();
    note_maps_changed();
    r as i32
}

/// # Safety
/// Same contract as mremap(2). The fifth argument is read only with MREMAP_FIXED, as libc does.
#[no_mangle]
pub unsafe extern "C" fn mremap(
    old: *mut libc::c_void,
    old_len: usize,
    new_len: usize,
    flags: i32,
    new_addr: *mut libc::c_void,
) -> *mut libc::c_void {
    let new_addr = if flags & libc::MREMAP_FIXED != 0 {
        new_addr
    } else {
        std::ptr::null_mut()
    };
    enter_map_change();
    // SAFETY: forwarding the caller's arguments to the syscall unchanged.
    let r = unsafe { libc::syscall(libc::SYS_mremap, old, old_len, new_len, flags, new_addr) };
    leave_map_change();
    note_maps_changed();
    if r == -1 {
        return libc::MAP_FAILED;
    }
    r as *mut libc::c_void
}

type SbrkFn = unsafe extern "C" fn(libc::intptr_t) -> *mut libc::c_void;
type BrkFn = unsafe extern "C" fn(*mut libc::c_void) -> i32;

fn next_symbol(name: &std::ffi::CStr) -> usize {
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
    unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) as usize }
}

/// # Safety
/// Same contract as sbrk(2).
#[no_mangle]
pub unsafe extern "C" fn sbrk(incr: libc::intptr_t) -> *mut libc::c_void {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let mut f = NEXT.load(Ordering::Relaxed);
    if f == 0 {
        f = next_symbol(c"sbrk");
        NEXT.store(f, Ordering::Relaxed);
    }
    // SAFETY: `f` is libc's sbrk, found by dlsym.
    let r = unsafe { std::mem::transmute::<usize, SbrkFn>(f)(incr) };
    note_maps_changed();
    r
}

/// # Safety
/// Same contract as brk(2).
#[no_mangle]
pub unsafe extern "C" fn brk(addr: *mut libc::c_void) -> i32 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let mut f = NEXT.load(Ordering::Relaxed);
    if f == 0 {
        f = next_symbol(c"brk");
        NEXT.store(f, Ordering::Relaxed);
    }
    // SAFETY: `f` is libc's brk, found by dlsym.
    let r = unsafe { std::mem::transmute::<usize, BrkFn>(f)(addr) };
    note_maps_changed();
    r
}
