//! The arena keeper (cross-mm backend): closes the window in which a page moved out of a
//! program lives only in the monitor.
//!
//! With the cross-mm backend the monitor moves a run of pages straight into its own private
//! arena, and only then compresses it into the shared store (the page's *shadow*). Killed in
//! between, the monitor would take those pages with its address space. So the monitor starts
//! one *keeper*: a process made with `clone(CLONE_VM | CLONE_FILES)`, which shares the
//! monitor's memory and descriptor table but is not in its thread group, so a SIGKILL of the
//! monitor does not reach it. It waits on a pidfd of the monitor. When the monitor dies, the
//! arena is still mapped (the keeper holds the mm) and every descriptor still open (it holds
//! the table, so no program sees its socket close yet). For each cross-mm client it copies
//! every arena page that has a slot record (the monitor keeps its own records in step with
//! the page map, exactly as the stock backend keeps the window's: set when a page enters a
//! slot, moved with a REMAP, zeroed when the slot is freed) into the client's shared window and
//! writes the window's record; pages of a run caught inside the move (moved, not yet completed,
//! so without a record) are found with mincore. Then it clears the in-flight announcement and
//! exits. Only then do the sockets close, and each shim's guardian brings those pages home from
//! the window with the rest (or a restarted monitor adopts the program).
//!
//! Owns: the static table of cross-mm clients ([`register`]/`unregister`, the slot of the
//! run in flight), and the keeper process. Must not: allocate, take locks, touch thread-local
//! storage or call libc functions that set `errno` in the keeper (it runs on the creating
//! thread's TLS, in an address space whose other threads may have died holding any lock):
//! it uses raw `syscall` instructions, atomics and `copy_nonoverlapping` only.
//!
//! Residual: a keeper killed together with the monitor (a signal to the whole process group or
//! cgroup, e.g. `systemctl kill`) protects nothing; the shim's fencing (DESIGN.md) remains.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::protocol::shm::{self, Window};
use crate::PAGE_SIZE;

/// Cross-mm clients one monitor tracks at once; more are served without a keeper (their
/// in-flight runs are fenced by the shim if the monitor dies, as before).
const MAX_ENTRIES: usize = 1024;

struct Entry {
    /// 0 free, 1 live.
    live: AtomicU32,
    win_base: AtomicUsize,
    win_len: AtomicUsize,
    arena_base: AtomicUsize,
    arena_slots: AtomicUsize,
    /// The monitor's slot records (one `AtomicU64` per slot).
    records: AtomicUsize,
    /// The first arena slot of the run in flight (its pages use consecutive slots).
    inflight_first_slot: AtomicU64,
}

static TABLE: [Entry; MAX_ENTRIES] = [const {
    Entry {
        live: AtomicU32::new(0),
        win_base: AtomicUsize::new(0),
        win_len: AtomicUsize::new(0),
        arena_base: AtomicUsize::new(0),
        arena_slots: AtomicUsize::new(0),
        records: AtomicUsize::new(0),
        inflight_first_slot: AtomicU64::new(0),
    }
}; MAX_ENTRIES];

/// The monitor's listening sockets: the keeper closes them first, so a monitor started right
/// after the dead one finds the path free (a listening socket held open would accept its
/// probe, and it would refuse to start).
static LISTENERS: [std::sync::atomic::AtomicI32; 8] =
    [const { std::sync::atomic::AtomicI32::new(-1) }; 8];

/// Notes a listening socket of the monitor (see `LISTENERS`).
pub fn note_listener(fd: i32) {
    for l in &LISTENERS {
        if l.compare_exchange(-1, fd, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            return;
        }
    }
}

/// Forgets a listening socket about to be closed.
pub fn forget_listener(fd: i32) {
    for l in &LISTENERS {
        let _ = l.compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// A cross-mm client's place in the keeper's table; holds its slot records alive.
#[derive(Debug)]
pub struct Registration {
    idx: usize,
    _records: std::sync::Arc<[AtomicU64]>,
}

/// Adds a client (its window, arena and slot records, one per arena slot); starts the keeper
/// the first time. `None` when the table is full or no keeper could be started (said once in
/// the log).
pub fn register(
    win: &Window,
    arena_base: usize,
    records: std::sync::Arc<[AtomicU64]>,
) -> Option<Registration> {
    if !ensure_started() {
        return None;
    }
    for (i, e) in TABLE.iter().enumerate() {
        if e.live
            .compare_exchange(0, 2, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            e.win_base.store(win.base() as usize, Ordering::Relaxed);
            e.win_len.store(win.len_bytes(), Ordering::Relaxed);
            e.arena_base.store(arena_base, Ordering::Relaxed);
            e.arena_slots.store(records.len(), Ordering::Relaxed);
            e.records
                .store(records.as_ptr() as usize, Ordering::Relaxed);
            e.live.store(1, Ordering::Release);
            return Some(Registration {
                idx: i,
                _records: records,
            });
        }
    }
    tracing::warn!("arena keeper: table full; this client's in-flight runs are not kept");
    None
}

impl Registration {
    /// The run about to be announced in the window starts at arena slot `first_slot`.
    pub fn set_inflight_first_slot(&self, first_slot: u32) {
        TABLE[self.idx]
            .inflight_first_slot
            .store(u64::from(first_slot), Ordering::Release);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        TABLE[self.idx].live.store(0, Ordering::Release);
    }
}

/// Starts the keeper once per process. Returns whether it runs.
fn ensure_started() -> bool {
    static STARTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *STARTED.get_or_init(|| match start() {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                "arena keeper not started ({e}): pages moved out and not yet shadowed die with \
                 the monitor (the shim fences them)"
            );
            false
        }
    })
}

const KEEPER_STACK_BYTES: usize = 64 * 1024;

#[cfg(target_arch = "x86_64")]
fn start() -> std::io::Result<()> {
    // SAFETY: pidfd_open of our own pid; returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if pidfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh private anonymous mapping for the keeper's stack, never unmapped.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            KEEPER_STACK_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the keeper runs `keeper_main` on its own stack (the top of the mapping above)
    // in our address space; it only uses raw syscalls, atomics and copies (module doc). Not
    // CLONE_THREAD: a SIGKILL of the monitor's thread group does not reach it.
    let pid = unsafe {
        libc::clone(
            keeper_main,
            (stack as *mut u8).add(KEEPER_STACK_BYTES).cast(),
            libc::CLONE_VM | libc::CLONE_FILES | libc::CLONE_FS,
            pidfd as usize as *mut libc::c_void,
        )
    };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    tracing::info!(pid, "arena keeper started");
    Ok(())
}

#[cfg(not(target_arch = "x86_64"))]
fn start() -> std::io::Result<()> {
    Err(std::io::Error::other(
        "the keeper's raw syscalls are written for x86-64",
    ))
}

/// A raw system call that never touches `errno` (the keeper must not write thread-local
/// storage). Returns the kernel's result (negative errno on failure).
#[cfg(target_arch = "x86_64")]
unsafe fn raw_syscall(nr: libc::c_long, a: usize, b: usize, c: usize, d: usize) -> isize {
    let ret: isize;
    // SAFETY: the x86-64 syscall ABI; the caller passes a valid call and arguments.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a,
            in("rsi") b,
            in("rdx") c,
            in("r10") d,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret
}

#[cfg(target_arch = "x86_64")]
extern "C" fn keeper_main(arg: *mut libc::c_void) -> libc::c_int {
    let pidfd = arg as usize;
    // SAFETY: raw syscalls with valid arguments (a full signal mask on our stack; a pollfd on
    // our stack); see `raw_syscall`.
    unsafe {
        let all: u64 = !0;
        raw_syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK as usize,
            &all as *const u64 as usize,
            0,
            8,
        );
        loop {
            let mut pfd = libc::pollfd {
                fd: pidfd as i32,
                events: libc::POLLIN,
                revents: 0,
            };
            let r = raw_syscall(
                libc::SYS_poll,
                &mut pfd as *mut libc::pollfd as usize,
                1,
                usize::MAX, // -1: no timeout
                0,
            );
            if r > 0 {
                break;
            }
            if r < 0 && r != -(libc::EINTR as isize) {
                break;
            }
        }
    }
    for l in &LISTENERS {
        let fd = l.swap(-1, Ordering::AcqRel);
        if fd >= 0 {
            // SAFETY: closing the dead monitor's listening socket in the shared table.
            unsafe { raw_syscall(libc::SYS_close, fd as usize, 0, 0, 0) };
        }
    }
    for e in TABLE.iter() {
        if e.live.load(Ordering::Acquire) == 1 {
            keep(e);
        }
    }
    // SAFETY: leaving the keeper's own thread group; the monitor's memory and descriptors go
    // with it.
    unsafe { raw_syscall(libc::SYS_exit_group, 0, 0, 0, 0) };
    0
}

/// Moves the in-flight run of one client from the arena into its window (see the module doc).
#[cfg(target_arch = "x86_64")]
fn keep(e: &Entry) {
    let (base, len) = (
        e.win_base.load(Ordering::Relaxed),
        e.win_len.load(Ordering::Relaxed),
    );
    // SAFETY: the window of a live client, mapped by the monitor in this address space and
    // never unmapped while its entry is live (the client unregisters before unmapping).
    let win = unsafe { Window::new(base as *mut u8, len) };
    let (arena, arena_slots) = (
        e.arena_base.load(Ordering::Relaxed),
        e.arena_slots.load(Ordering::Relaxed),
    );
    let slots = arena_slots.min(win.slots());
    let records = e.records.load(Ordering::Relaxed) as *const AtomicU64;
    // Every page with a record: cooling pages (they have store shadows too; the copy is the
    // same bytes) and the run just moved.
    for slot in 0..slots {
        // SAFETY: `records` has `arena_slots` elements, kept alive by the registration.
        let addr = unsafe { &*records.add(slot) }.load(Ordering::Acquire);
        if addr != 0 {
            copy_to_window(&win, arena, slot, addr);
        }
    }
    // A run caught inside its move: its moved pages are in the arena, without records yet.
    if win.inflight_state().load(Ordering::Acquire) == shm::INFLIGHT_MOVING {
        let run = win.inflight_run().load(Ordering::Acquire);
        let page_mask = !(PAGE_SIZE as u64 - 1);
        let addr = run & page_mask;
        let pages = ((run & !page_mask) as u32).min(shm::INFLIGHT_MAX_PAGES) as usize;
        let first = e.inflight_first_slot.load(Ordering::Acquire) as usize;
        if addr != 0 && first + pages <= slots {
            for i in 0..pages {
                let slot = first + i;
                // SAFETY: as above.
                if unsafe { &*records.add(slot) }.load(Ordering::Acquire) != 0 {
                    continue;
                }
                let src = arena + slot * PAGE_SIZE;
                // Slots are emptied before a move: a resident page here was moved out.
                let mut vec = 0u8;
                // SAFETY: mincore of one page of our own arena into one byte on our stack.
                let r = unsafe {
                    raw_syscall(
                        libc::SYS_mincore,
                        src,
                        PAGE_SIZE,
                        &mut vec as *mut u8 as usize,
                        0,
                    )
                };
                if r == 0 && vec & 1 != 0 {
                    copy_to_window(&win, arena, slot, addr + (i * PAGE_SIZE) as u64);
                }
            }
        }
    }
    win.inflight_state()
        .store(shm::INFLIGHT_NONE, Ordering::SeqCst);
}

/// Copies arena slot `slot` into the window's slot and records it for page `addr`.
#[cfg(target_arch = "x86_64")]
fn copy_to_window(win: &Window, arena: usize, slot: usize, addr: u64) {
    // SAFETY: `slot` is below both the arena's and the window's slot count (callers check);
    // nothing else writes the window's slots in the cross-mm backend. Reading an arena page
    // the kernel swapped out brings it back in (the address space is alive: we hold it).
    unsafe {
        std::ptr::copy_nonoverlapping(
            (arena + slot * PAGE_SIZE) as *const u8,
            win.slot_ptr(slot),
            PAGE_SIZE,
        )
    };
    // Payload first, then the record (the order the shim's rescue relies on).
    win.slot_record(slot).store(addr, Ordering::Release);
}
