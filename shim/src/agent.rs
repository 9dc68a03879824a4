//! The agent: a thread of the managed program that moves pages out on the monitor's request.
//!
//! On a stock kernel UFFDIO_MOVE works only inside the descriptor's own mm, so eviction has to
//! be issued from here. For each batch descriptor in the shared window the agent moves every
//! run into its staging area with one UFFDIO_MOVE on the forwarded descriptor (from then on any
//! access to those pages faults to the monitor through the forwarded descriptor), copies the
//! moved pages into the run's window slots, marks each page's result, drops the staging pages
//! (a REMOVE event the monitor reads and ignores; the agent may wait for the monitor, never
//! the other way round) and signals the monitor. The ordering rules against the program's own
//! munmap/mremap/MADV_DONTNEED are in `uswap::protocol::shm`.
//!
//! After a batch flagged `shm::DESC_UNSHARE` is done and signalled, it makes each page the
//! batch found busy the program's own again (`MADV_POPULATE_WRITE`: a write fault that changes
//! nothing, for pages still marked shared with a forked child that has exited), so the next
//! batch can move them. This is its only touch of program memory, and it runs outside any
//! batch: if such a page was discarded meanwhile, the fault it raises is served by the
//! monitor without waiting for this thread.
//!
//! It also reports the program's anonymous regions (a snapshot of /proc/self/maps after any
//! change, and on request) and its resident anonymous size.
//!
//! Rules it lives by: it blocks every signal; it runs on its own stack and scratch memory,
//! which are never registered and reported as excluded; it never allocates (the program's
//! allocator's memory can be evicted) and never waits for the monitor's fault thread while
//! holding anything the program needs. It is the only code in the program that issues
//! UFFDIO_MOVE.

use std::sync::atomic::Ordering;

use uswap::protocol::io::send_packet;
use uswap::protocol::shm::{self, Window};
use uswap::protocol::wire::{
    RegionEntry, RegionsBuilder, REGIONS_FIRST, REGIONS_LAST, REGION_EXCLUDED, REGION_MANAGED,
    REGION_REGISTERED,
};
use uswap::uffd::{sys, UffdError};
use uswap::PAGE_SIZE;

use crate::{maps, raw, sock_lock, sock_unlock, SCRATCH_BYTES, SHIM};

/// Minimum time between two unrequested rescans of /proc/self/maps.
const RESCAN_MIN_INTERVAL_NS: u64 = 10_000_000;
/// Scratch layout: [0, 64K) packet buffer, [64K, 192K) maps buffer, [192K, 196K) mincore
/// vector, [196K, 204K) status buffer, [204K, 220K) busy pages to unshare.
const PKT_OFF: usize = 0;
const MAPS_OFF: usize = 64 * 1024;
const MAPS_LEN: usize = 128 * 1024;
const MINCORE_OFF: usize = 192 * 1024;
const STATUS_OFF: usize = 196 * 1024;
const STATUS_LEN: usize = 8 * 1024;
/// Busy pages of the batches just run, to make the program's own again (`shm::DESC_UNSHARE`):
/// one address each, at most [`UNSHARE_MAX`].
const UNSHARE_OFF: usize = 204 * 1024;
const UNSHARE_MAX: usize = 2048;
const _: () = assert!(UNSHARE_OFF + UNSHARE_MAX * 8 <= SCRATCH_BYTES);
const _: () = assert!(STATUS_OFF + STATUS_LEN <= UNSHARE_OFF);

pub(crate) fn kick() {
    let efd = SHIM.req_efd.load(Ordering::Relaxed);
    if efd >= 0 && crate::fds_ok(&[crate::FD_REQ]) {
        let one: u64 = 1;
        // SAFETY: an 8-byte write to an eventfd.
        unsafe { libc::write(efd, (&one as *const u64).cast(), 8) };
    }
}

pub(crate) fn start() -> Result<(), i32> {
    SHIM.agent_alive.store(true, Ordering::SeqCst);
    spawn_on_own_stack(
        SHIM.stack_base.load(Ordering::Relaxed),
        SHIM.stack_len.load(Ordering::Relaxed),
        agent_main,
        c"uswap-agent",
    )
}

/// Starts a detached shim thread running `main` on `stack_len` bytes at `stack_base`, with
/// every signal blocked.
pub(crate) fn spawn_on_own_stack(
    stack_base: usize,
    stack_len: usize,
    main: extern "C" fn(*mut libc::c_void) -> *mut libc::c_void,
    name: &core::ffi::CStr,
) -> Result<(), i32> {
    // SAFETY: pthread attribute calls on a local attr; the stack is a mapping of the shim's
    // own of stack_len bytes, which outlives the thread (it is never unmapped). All signals
    // are blocked around pthread_create so the thread starts with every signal blocked.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        libc::pthread_attr_init(&mut attr);
        let rc = libc::pthread_attr_setstack(&mut attr, stack_base as *mut _, stack_len);
        if rc != 0 {
            return Err(rc);
        }
        libc::pthread_attr_setdetachstate(&mut attr, libc::PTHREAD_CREATE_DETACHED);
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let mut tid: libc::pthread_t = 0;
        let rc = libc::pthread_create(&mut tid, &attr, main, std::ptr::null_mut());
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        libc::pthread_attr_destroy(&mut attr);
        if rc != 0 {
            return Err(rc);
        }
        // A name helps `top -H` and debuggers.
        libc::pthread_setname_np(tid, name.as_ptr());
    }
    Ok(())
}

/// The shared window (mapped in `init`, never unmapped).
fn window() -> Window {
    // SAFETY: the window mapping was made in `init` with this base and length and is never
    // unmapped while the shim runs.
    unsafe {
        Window::new(
            SHIM.window_base.load(Ordering::Relaxed) as *mut u8,
            SHIM.window_len.load(Ordering::Relaxed),
        )
    }
}

fn scratch(off: usize, len: usize) -> &'static mut [u8] {
    let base = SHIM.scratch_base.load(Ordering::Relaxed);
    assert!(off + len <= SHIM.scratch_len.load(Ordering::Relaxed));
    // SAFETY: the scratch mapping is owned by the agent thread alone and never unmapped; the
    // regions handed out by the fixed offsets above do not overlap and each is used by one
    // caller at a time on this single thread.
    unsafe { std::slice::from_raw_parts_mut((base + off) as *mut u8, len) }
}

extern "C" fn agent_main(_: *mut libc::c_void) -> *mut libc::c_void {
    SHIM.agent_alive.store(true, Ordering::SeqCst);
    agent_loop();
    SHIM.agent_alive.store(false, Ordering::SeqCst);
    std::ptr::null_mut()
}

fn agent_loop() {
    let base = SHIM.window_base.load(Ordering::Relaxed);
    let len = SHIM.window_len.load(Ordering::Relaxed);
    // SAFETY: the window mapping was made in `init` and is never unmapped while we run.
    let win = unsafe { Window::new(base as *mut u8, len) };
    if !win.is_valid() {
        raw::eprint_line(&[b"uswap: the monitor's window is not valid; eviction disabled"]);
        return;
    }
    win.staging_addr().store(
        SHIM.staging_base.load(Ordering::Relaxed) as u64,
        Ordering::Relaxed,
    );
    let req_efd = SHIM.req_efd.load(Ordering::Relaxed);
    let done_efd = SHIM.done_efd.load(Ordering::Relaxed);
    let mut last_scan_ns = 0u64;
    let mut snapshot: u32 = 0;
    // Set by the monitor's REQ_REGISTER (its first eviction): from then on every scan
    // registers the managed VMAs it finds.
    let mut registering = false;
    loop {
        let now = raw::monotonic_ns();
        let dirty = SHIM.maps_dirty.load(Ordering::Acquire);
        let timeout_ms = if dirty {
            // Rounded up: a sub-millisecond remainder must sleep, not spin.
            (last_scan_ns + RESCAN_MIN_INTERVAL_NS)
                .saturating_sub(now)
                .div_ceil(1_000_000) as i32
        } else {
            -1
        };
        let mut pfd = libc::pollfd {
            fd: req_efd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polling one pollfd on our stack.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        // Our descriptors must still be ours before we read, write or move through them.
        if !crate::fds_ok(&[
            crate::FD_SOCK,
            crate::FD_UFFD,
            crate::FD_REQ,
            crate::FD_DONE,
        ]) {
            return;
        }
        // The guardian sets `monitor_lost` and then waits for `agent_busy` to clear; we set
        // `agent_busy` and then check `monitor_lost` (both SeqCst): one of us sees the other.
        SHIM.agent_busy.store(true, Ordering::SeqCst);
        if SHIM.monitor_lost.load(Ordering::SeqCst) {
            SHIM.agent_busy.store(false, Ordering::SeqCst);
            return;
        }
        if rc > 0 {
            let mut v = 0u64;
            // SAFETY: an 8-byte read from our eventfd (checked just above) into a local.
            unsafe { libc::read(req_efd, (&mut v as *mut u64).cast(), 8) };
        }
        let requests = win.requests().swap(0, Ordering::AcqRel);
        if requests & shm::REQ_REGISTER != 0 {
            registering = true;
            SHIM.registering.store(true, Ordering::Relaxed);
        }
        if requests & shm::REQ_UNREGISTER != 0 {
            // The monitor has brought every page home: unregister every managed VMA, with the
            // bounds read now, so nothing is left registered with a monitor that lets go.
            registering = false;
            SHIM.registering.store(false, Ordering::Relaxed);
            snapshot = snapshot.wrapping_add(1);
            send_snapshot_retrying(snapshot, Reg::Unregister);
        }
        if requests & shm::REQ_SHUTDOWN != 0 {
            SHIM.agent_busy.store(false, Ordering::SeqCst);
            return;
        }
        let mut busy = Busy::default();
        let worked = run_batches(&win, &mut busy);
        if requests & shm::REQ_RSS != 0 {
            // The batches answered so far are out of the figure read next.
            let done_seq = win.done_seq().load(Ordering::Acquire);
            if let Some(rss) = maps::rss_anon_bytes(scratch(STATUS_OFF, STATUS_LEN)) {
                win.publish_rss(rss, done_seq);
            }
        }
        let now = raw::monotonic_ns();
        let due =
            SHIM.maps_dirty.load(Ordering::Acquire) && now >= last_scan_ns + RESCAN_MIN_INTERVAL_NS;
        if requests & (shm::REQ_RESCAN | shm::REQ_REGISTER) != 0 || due {
            // Clear first: a change during the scan marks it dirty again.
            SHIM.maps_dirty.store(false, Ordering::Release);
            snapshot = snapshot.wrapping_add(1);
            let reg = if registering {
                Reg::Register
            } else {
                Reg::Keep
            };
            if !send_snapshot(snapshot, reg) {
                SHIM.maps_dirty.store(true, Ordering::Release);
            }
            last_scan_ns = now;
        }
        if (worked || requests != 0) && crate::fds_ok(&[crate::FD_DONE]) {
            let one: u64 = 1;
            // SAFETY: an 8-byte write to an eventfd.
            unsafe { libc::write(done_efd, (&one as *const u64).cast(), 8) };
        }
        SHIM.agent_busy.store(false, Ordering::SeqCst);
        // After the batches are done and said so, and outside `agent_busy`: a page made the
        // program's own here is in no batch, so a fault on it (one the program discarded
        // meanwhile) is served without waiting for this thread; and if the monitor dies while
        // this thread waits in such a fault, the guardian does not wait for it (its rescue
        // unregisters the memory, which ends the fault). It moves nothing, so it cannot
        // conflict with the rescue.
        let unshared = busy.unshare();
        if unshared > 0 {
            win.agent_unshared_pages()
                .fetch_add(unshared, Ordering::Relaxed);
        }
    }
}

/// Processes every posted batch. Returns whether there was any.
fn run_batches(win: &Window, busy: &mut Busy) -> bool {
    let mut worked = false;
    loop {
        let done = win.done_seq().load(Ordering::Relaxed);
        let posted = win.post_seq().load(Ordering::Acquire);
        if done >= posted || posted - done > shm::RING_LEN as u64 {
            return worked;
        }
        let t0 = raw::monotonic_ns();
        let desc = win.desc(done);
        // No interposed mmap/munmap/mremap of the program may run while the batch is checked
        // against the event log and moved: otherwise a range unmapped and mapped anew between
        // the check and the move would give up a page of the new mapping, attributed to the
        // old one. Calls already in progress finish first (their events are read and logged
        // before `quiescent` lets the check run).
        let moved = if hold_remaps() {
            let m = run_batch(win, &desc, busy);
            SHIM.reg_busy.store(false, Ordering::SeqCst);
            m
        } else {
            for p in 0..desc.npages() {
                desc.set_result(p, shm::RESULT_CANCELLED);
            }
            0
        };
        desc.set_agent_ns(raw::monotonic_ns() - t0);
        win.agent_busy_ns()
            .fetch_add(raw::monotonic_ns() - t0, Ordering::Relaxed);
        win.agent_moved_pages().fetch_add(moved, Ordering::Relaxed);
        win.done_seq().store(done + 1, Ordering::Release);
        worked = true;
    }
}

/// Runs one batch; with `shm::DESC_UNSHARE`, the pages it finds busy are noted in `busy`.
fn run_batch(win: &Window, desc: &shm::Desc<'_>, busy: &mut Busy) -> u64 {
    let unshare = desc.flags() & shm::DESC_UNSHARE != 0;
    let uffd = SHIM.uffd.load(Ordering::Relaxed);
    let staging = SHIM.staging_base.load(Ordering::Relaxed) as u64;
    let staging_pages = SHIM.staging_len.load(Ordering::Relaxed) / PAGE_SIZE;
    let slots = win.slots();
    let mut page_idx = 0usize;
    let mut used_pages = 0usize;
    let mut moved_total = 0u64;
    let npages = desc.npages();
    for r in 0..desc.nruns() {
        let run = desc.run(r);
        let pages = run.pages as usize;
        let valid = pages > 0
            && page_idx + pages <= npages
            && page_idx + pages <= staging_pages
            && run.first_slot as usize + pages <= slots
            && run.addr % PAGE_SIZE as u64 == 0;
        if !valid {
            for p in page_idx..npages.min(page_idx + pages.max(1)) {
                desc.set_result(p, shm::RESULT_FAILED);
            }
            page_idx += pages.max(1);
            continue;
        }
        let run_end = run.addr + (pages * PAGE_SIZE) as u64;
        if SHIM.monitor_lost.load(Ordering::SeqCst) {
            // The monitor is gone: no page leaves the program any more.
            mark(desc, page_idx, pages, shm::RESULT_CANCELLED);
            page_idx += pages;
            continue;
        }
        // No read of the program's events in progress, and none since the batch was posted
        // that touches this run.
        let Some(_) = quiescent(win) else {
            mark(desc, page_idx, pages, shm::RESULT_CANCELLED);
            page_idx += pages;
            continue;
        };
        if win.events_overlap(desc.epoch(), run.addr, run_end) != Some(false) {
            mark(desc, page_idx, pages, shm::RESULT_CANCELLED);
            page_idx += pages;
            continue;
        }
        let dst = staging + (page_idx * PAGE_SIZE) as u64;
        move_run(
            uffd,
            dst,
            run.addr,
            pages,
            desc,
            page_idx,
            unshare.then_some(&mut *busy),
        );
        // Which staging pages now hold a page. Holes (never touched, or already gone) stay
        // unpopulated; reading one would fault to the monitor for nothing. If mincore could
        // not tell (it does not fail on our own mapping), every page is treated as present:
        // a hole then reads as zeros, and nothing moved is ever dropped.
        let vec = scratch(MINCORE_OFF, 4096);
        // SAFETY: mincore on our own staging range writes `pages` bytes (<= 4096) into `vec`.
        let rc = unsafe { libc::mincore(dst as *mut _, pages * PAGE_SIZE, vec.as_mut_ptr()) };
        for (i, residency) in vec.iter().take(pages).enumerate() {
            let p = page_idx + i;
            if desc.result(p) != shm::RESULT_PENDING {
                continue;
            }
            let present = rc != 0 || residency & 1 != 0;
            if !present {
                desc.set_result(p, shm::RESULT_HOLE);
            } else {
                let slot = win.slot_ptr(run.first_slot as usize + i);
                // SAFETY: the staging page is ours and mapped (present, or a hole the monitor
                // fills with zeros); the slot lies inside the window; the two never overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        (dst + (i * PAGE_SIZE) as u64) as *const u8,
                        slot,
                        PAGE_SIZE,
                    )
                };
                // The slot's record names the page before the page counts as moved: from now
                // on the slot is its only copy, and the guardian must find it if the monitor
                // dies (see `uswap::protocol::shm`).
                win.slot_record(run.first_slot as usize + i)
                    .store(run.addr + (i * PAGE_SIZE) as u64, Ordering::Release);
                desc.set_result(p, shm::RESULT_MOVED);
                moved_total += 1;
            }
        }
        page_idx += pages;
        used_pages = used_pages.max(page_idx);
    }
    for p in page_idx..npages {
        desc.set_result(p, shm::RESULT_FAILED);
    }
    if used_pages > 0 {
        // SAFETY: dropping our own staging pages. This raises a REMOVE event that blocks us until
        // the monitor's fault thread reads it (it never waits for us). The raw syscall: libc's
        // `madvise` is the shim's own interposer, which waits while we hold `reg_busy`.
        unsafe {
            libc::syscall(
                libc::SYS_madvise,
                staging as usize,
                used_pages * PAGE_SIZE,
                libc::MADV_DONTNEED,
            )
        };
    }
    moved_total
}

/// Pages a batch found busy (EBUSY), kept in the agent's scratch until its batches are done.
#[derive(Default)]
struct Busy {
    len: usize,
}

impl Busy {
    fn addrs(&mut self) -> &'static mut [u64] {
        let b = scratch(UNSHARE_OFF, UNSHARE_MAX * 8);
        // SAFETY: the scratch region is UNSHARE_MAX * 8 bytes of our page-aligned mapping
        // (so aligned for u64), used by this thread alone, and any bit pattern is a u64.
        unsafe { std::slice::from_raw_parts_mut(b.as_mut_ptr().cast(), UNSHARE_MAX) }
    }

    /// Notes a busy page (beyond [`UNSHARE_MAX`] pages, it waits for a later batch).
    fn note(&mut self, addr: u64) {
        if self.len < UNSHARE_MAX {
            self.addrs()[self.len] = addr;
            self.len += 1;
        }
    }

    /// A write fault that changes nothing on each noted page (`MADV_POPULATE_WRITE`, one call
    /// per contiguous run): a page still marked shared after the child that shared it exited
    /// becomes the program's own (the kernel reuses it, no copy), so the next batch can move
    /// it. A pinned page stays busy; a page unmapped meanwhile fails harmlessly. Stops if the
    /// monitor is lost or the program starts a fork. Returns the pages of the runs that
    /// succeeded.
    fn unshare(&mut self) -> u64 {
        let n = self.len;
        if n == 0 {
            return 0;
        }
        let addrs = &mut self.addrs()[..n];
        addrs.sort_unstable();
        let mut done = 0u64;
        let mut i = 0;
        // A fork from now on shares these pages with a live child: unsharing them would copy.
        let forks = crate::FORKS_STARTED.load(Ordering::SeqCst);
        while i < n
            && !SHIM.monitor_lost.load(Ordering::SeqCst)
            && crate::FORKS_STARTED.load(Ordering::SeqCst) == forks
        {
            let start = addrs[i];
            let mut pages = 1usize;
            while i + pages < n && addrs[i + pages] == start + (pages * PAGE_SIZE) as u64 {
                pages += 1;
            }
            // SAFETY: the raw syscall (libc's `madvise` is the shim's interposer); a populate
            // of pages of the program's own anonymous memory writes nothing into them.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_madvise,
                    start as usize,
                    pages * PAGE_SIZE,
                    libc::MADV_POPULATE_WRITE,
                )
            };
            if rc == 0 {
                done += pages as u64;
            }
            i += pages;
        }
        self.len = 0;
        done
    }
}

fn mark(desc: &shm::Desc<'_>, first: usize, pages: usize, result: u8) {
    for p in first..first + pages {
        desc.set_result(p, result);
    }
}

/// Waits (briefly) until no read of the program's events is in progress; returns the read
/// sequence number then, or `None` if the monitor stays mid-read for too long.
fn quiescent(win: &Window) -> Option<u64> {
    for spin in 0..10_000 {
        let begin = win.read_begin().load(Ordering::SeqCst);
        if win.read_end().load(Ordering::SeqCst) == begin {
            return Some(begin);
        }
        if spin > 100 {
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        }
    }
    None
}

fn move_ioctl(uffd: i32, dst: u64, src: u64, len: u64) -> Result<u64, UffdError> {
    let mut m = sys::UffdioMove {
        dst,
        src,
        len,
        mode: sys::UFFDIO_MOVE_MODE_DONTWAKE | sys::UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES,
        moved: 0,
    };
    // SAFETY: UFFDIO_MOVE reads and writes one `struct uffdio_move`.
    let rc = unsafe { libc::ioctl(uffd, sys::UFFDIO_MOVE as _, &mut m) };
    if rc < 0 {
        let errno = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        return Err(UffdError::from_errno(
            uswap::uffd::Op::Move,
            errno,
            m.moved.max(0) as u64,
        ));
    }
    Ok(m.moved as u64)
}

/// Moves `pages` pages from `src` to `dst` in as few ioctls as the kernel allows; a page it
/// refuses is marked (busy or failed) and skipped, a busy one also noted in `busy` if given.
fn move_run(
    uffd: i32,
    dst: u64,
    src: u64,
    pages: usize,
    desc: &shm::Desc<'_>,
    first_page_idx: usize,
    mut busy: Option<&mut Busy>,
) {
    let mut off = 0usize;
    let mut retries = 0;
    while off < pages {
        let at = (off * PAGE_SIZE) as u64;
        let len = ((pages - off) * PAGE_SIZE) as u64;
        match move_ioctl(uffd, dst + at, src + at, len) {
            Ok(n) => {
                off += (n as usize).div_ceil(PAGE_SIZE).max(1);
            }
            Err(e) => {
                off += e.done_bytes() as usize / PAGE_SIZE;
                if off >= pages {
                    break;
                }
                let result = match e {
                    // A program event is queued and unread: the monitor reads it soon.
                    UffdError::Retry { .. } if retries < 1000 => {
                        retries += 1;
                        // SAFETY: sched_yield has no preconditions.
                        unsafe { libc::sched_yield() };
                        continue;
                    }
                    UffdError::Busy { .. } => shm::RESULT_BUSY,
                    _ => shm::RESULT_FAILED,
                };
                desc.set_result(first_page_idx + off, result);
                if let (shm::RESULT_BUSY, Some(b)) = (result, busy.as_deref_mut()) {
                    b.note(src + (off * PAGE_SIZE) as u64);
                }
                off += 1;
                retries = 0;
            }
        }
    }
}

/// What a scan does to the managed VMAs it finds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reg {
    Keep,
    Register,
    Unregister,
}

/// (Un)registers `[start, end)` minus the shim's own ranges with the forwarded descriptor, in
/// MISSING mode. The bounds are those of a VMA just read from /proc/self/maps: registering a
/// whole VMA never splits a program mapping. Returns whether every part succeeded.
fn register_vma(start: u64, end: u64, own: &[(u64, u64)], reg: Reg) -> bool {
    let uffd = SHIM.uffd.load(Ordering::Relaxed);
    let mut ok = true;
    let mut cut = start;
    let mut parts = [(0u64, 0u64); 4];
    let mut n = 0;
    // Own ranges inside the VMA (sorted by address), at most three.
    let mut inside = [(0u64, 0u64); 3];
    let mut k = 0;
    for &(s, l) in own {
        if s < end && start < s + l {
            inside[k] = (s.max(start), (s + l).min(end));
            k += 1;
        }
    }
    inside[..k].sort_unstable();
    for &(s, e) in &inside[..k] {
        if cut < s {
            parts[n] = (cut, s);
            n += 1;
        }
        cut = cut.max(e);
    }
    if cut < end {
        parts[n] = (cut, end);
        n += 1;
    }
    for &(s, e) in &parts[..n] {
        let rc = if reg == Reg::Register {
            let mut r = sys::UffdioRegister {
                range: sys::UffdioRange {
                    start: s,
                    len: e - s,
                },
                mode: sys::UFFDIO_REGISTER_MODE_MISSING,
                ioctls: 0,
            };
            // SAFETY: UFFDIO_REGISTER reads and writes one `struct uffdio_register`.
            unsafe { libc::ioctl(uffd, sys::UFFDIO_REGISTER as _, &mut r) }
        } else {
            let mut r = sys::UffdioRange {
                start: s,
                len: e - s,
            };
            // SAFETY: UFFDIO_UNREGISTER reads one `struct uffdio_range`.
            unsafe { libc::ioctl(uffd, sys::UFFDIO_UNREGISTER as _, &mut r) }
        };
        ok &= rc == 0;
    }
    ok
}

/// In a forked child, before it runs on: registers every managed VMA with the child's new
/// descriptor (the kernel dropped the parent's registrations in the child, and the pages the
/// parent had evicted are missing there). Single-threaded: no mapping changes meanwhile.
/// Returns false if a scan or a registration failed.
pub(crate) fn register_all(buf: &mut [u8]) -> bool {
    for_all_managed(buf, Reg::Register)
}

/// [`register_all`] or [`unregister_all`]: `reg` applied to every managed VMA but the one
/// holding the shim's own state.
fn for_all_managed(buf: &mut [u8], reg: Reg) -> bool {
    let shim_addr = &SHIM as *const _ as u64;
    let own = crate::own_ranges();
    let mut ok = true;
    let scanned = maps::for_each_mapping(buf, |m| {
        let holds_shim =
            m.start < shim_addr + std::mem::size_of::<crate::Shim>() as u64 && shim_addr < m.end;
        if !holds_shim && m.is_manageable() {
            ok &= register_vma(m.start, m.end, &own, reg);
        }
    });
    scanned && ok
}

/// Unregisters every managed VMA from the descriptor in `SHIM.uffd` (see [`register_all`]).
/// A forked child refused by the monitor undoes its registrations this way before it
/// registers again with a new descriptor: the monitor may still hold a copy of the refused
/// one for a while, and the registrations live as long as any copy.
pub(crate) fn unregister_all(buf: &mut [u8]) -> bool {
    for_all_managed(buf, Reg::Unregister)
}

/// `send_snapshot`, waiting for the socket if a fork request holds it (bounded).
fn send_snapshot_retrying(snapshot: u32, reg: Reg) {
    for _ in 0..1000 {
        if send_snapshot(snapshot, reg) || !crate::fds_ok(&[crate::FD_SOCK]) {
            return;
        }
        // SAFETY: sched_yield has no preconditions.
        unsafe { libc::sched_yield() };
    }
}

/// Sends a snapshot of the anonymous regions, the managed ones and those never to be evicted.
/// Returns false if the socket was busy or the scan failed (the caller retries later).
fn send_snapshot(snapshot: u32, reg: Reg) -> bool {
    if !sock_lock(false) {
        return false;
    }
    // While registering, no interposed mmap/munmap/mremap may change a mapping between our read
    // of its bounds and the registration (glibc's own calls inside malloc are not interposed:
    // a split they cause is healed by the next scan, and realloc falls back to copying if its
    // mremap fails).
    let reg = if reg == Reg::Register && !hold_remaps() {
        Reg::Keep
    } else {
        reg
    };
    let ok = send_snapshot_locked(snapshot, reg);
    SHIM.reg_busy.store(false, Ordering::SeqCst);
    sock_unlock();
    ok
}

/// Raises `reg_busy` and waits (bounded) until no interposed mremap is in progress.
fn hold_remaps() -> bool {
    SHIM.reg_busy.store(true, Ordering::SeqCst);
    for spin in 0..100_000 {
        if SHIM.remaps_inflight.load(Ordering::SeqCst) == 0 {
            return true;
        }
        if spin > 100 {
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        }
    }
    SHIM.reg_busy.store(false, Ordering::SeqCst);
    false
}

fn send_snapshot_locked(snapshot: u32, reg: Reg) -> bool {
    let sock = SHIM.sock.load(Ordering::Acquire);
    let pkt = scratch(PKT_OFF, 64 * 1024);
    let maps_buf = scratch(MAPS_OFF, MAPS_LEN);
    let mut builder = RegionsBuilder::new(pkt);
    // Read before /proc/self/maps: the monitor distrusts ranges changed by events after it.
    let epoch = window().epoch().load(Ordering::SeqCst);
    let mut first = true;
    let mut ok = true;
    // The agent's own memory and the shim's data segment are excluded.
    let shim_addr = &SHIM as *const _ as u64;
    let own = crate::own_ranges();
    let flush = |b: &mut RegionsBuilder<'_>, last: bool, first: &mut bool| -> bool {
        let flags = if *first { REGIONS_FIRST } else { 0 } | if last { REGIONS_LAST } else { 0 };
        *first = false;
        let packet = b.finish(snapshot, flags, epoch);
        crate::fds_ok(&[crate::FD_SOCK]) && send_packet(sock, packet, &[]).is_ok()
    };
    // Our own ranges first, always: the kernel may have merged them with a neighbour, so the
    // monitor subtracts them from whatever managed region contains them.
    for (start, len) in own {
        builder.push(RegionEntry {
            start,
            len_bytes: len,
            flags: REGION_EXCLUDED,
        });
    }
    let scanned = maps::for_each_mapping(maps_buf, |m| {
        if !ok {
            return;
        }
        let len = m.end - m.start;
        let holds_shim =
            m.start < shim_addr + std::mem::size_of::<crate::Shim>() as u64 && shim_addr < m.end;
        let mut flags = if holds_shim && m.writable && m.private {
            REGION_EXCLUDED
        } else if m.is_manageable() {
            REGION_MANAGED
        } else {
            return;
        };
        if flags == REGION_MANAGED
            && reg != Reg::Keep
            && register_vma(m.start, m.end, &own, reg)
            && reg == Reg::Register
        {
            flags |= REGION_REGISTERED;
        }
        if builder.is_full() && !flush(&mut builder, false, &mut first) {
            ok = false;
            return;
        }
        builder.push(RegionEntry {
            start: m.start,
            len_bytes: len,
            flags,
        });
    });
    if !scanned || !ok {
        return false;
    }
    flush(&mut builder, true, &mut first)
}
