//! The guardian: a second thread of the managed program that watches the monitor and, if the
//! monitor dies, keeps the program's evicted pages from being lost or hanging it forever.
//!
//! Every evicted page lives in shared memory the shim holds a descriptor of: compressed pages
//! in the store file (`uswap::protocol::store_layout`), cooling pages in the window's slots
//! (`uswap::protocol::shm`), each with a record naming the page's address; the compressed
//! pages of the disk tier have their records in the store file too (disk chunks) and their
//! payloads in the disk file, whose descriptor the shim also holds and reads with `pread`.
//! When the monitor's
//! end of the socket closes while the program still runs, the guardian
//! 1. stops the agent (no more moves, no more registrations) and waits until it is idle;
//! 2. reads the program's userfaultfd events itself from then on, so a thread in
//!    munmap/mremap/MADV_DONTNEED never stays blocked, and applies each to the records (a
//!    REMAP moves records, a REMOVE/UNMAP drops them, except where an earlier REMAP of this
//!    rescue put pages, see below). Page faults are left waiting;
//! 3. waits up to `rescue_after` (written by the monitor into the window) while nothing
//!    answers on the monitor's socket path;
//! 4. copies every recorded page back into the program with UFFDIO_COPY (decompressing store
//!    pages into its own buffer); a page already present (EEXIST) is newer and kept;
//! 5. unregisters every mapping from the descriptor, which wakes every waiting thread; the
//!    program carries on unmanaged, with all of its memory.
//!
//! If a monitor answers during the wait, it is asked to adopt the program (`adopt`: the store
//! file, and the disk file if there is a disk tier, are handed over); if it refuses, the
//! program is brought home and runs unmanaged.
//!
//! An UNMAP read after a REMAP into the same range may be stale (the kernel queues the
//! unmapping thread's UNMAP after the remapping thread's REMAP, see DESIGN.md): records inside
//! a REMAP destination seen by this rescue are kept, and COPY decides (ENOENT: nothing is
//! mapped there any more).
//!
//! Rules it lives by (as the agent's): all signals blocked, its own stack and scratch memory
//! (reported as excluded, never registered), no allocation, no lock the program may hold, and
//! no call of the shim's own interposers (mmap, munmap, mremap), which wait for the agent.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use uswap::protocol::shm::{self, Window};
use uswap::protocol::store_layout::{self, StoreView};
use uswap::uffd::sys;
use uswap::uffd::Event;
use uswap::PAGE_SIZE;

use crate::{maps, raw, MANAGED, SHIM};

/// The guardian's stack.
pub(crate) const GUARD_STACK_BYTES: usize = 128 * 1024;
/// Its scratch, after the stack: one page buffer, the event buffer, the maps buffer, a
/// buffer for a payload read from the disk file, and the zstd decoder's workspace.
const PAGE_OFF: usize = GUARD_STACK_BYTES;
const EVENTS_OFF: usize = PAGE_OFF + PAGE_SIZE;
const EVENTS_LEN: usize = 64 * std::mem::size_of::<sys::UffdMsg>();
const MAPS_OFF: usize = EVENTS_OFF + 4096;
const MAPS_LEN: usize = 128 * 1024;
const DISK_OFF: usize = MAPS_OFF + MAPS_LEN;
/// The workspace of the decoder of zstd payloads ([`store_layout::PageDecoder`]).
const DECODER_OFF: usize = DISK_OFF + PAGE_SIZE;
/// The relocation table (`Rescue::relocs`): `MAX_RELOCS` entries of 32 bytes. The mapping is
/// MAP_NORESERVE: only the entries an outage uses take memory (the decoder's workspace too).
const RELOCS_OFF: usize = DECODER_OFF + store_layout::DECODER_WORKSPACE_BYTES;
/// The whole guardian mapping.
pub(crate) const GUARD_BYTES: usize = RELOCS_OFF + MAX_RELOCS * std::mem::size_of::<Reloc>();
const _: () = assert!(EVENTS_LEN <= 4096);

/// The range every waiter is woken in: from the lowest address a mapping may have
/// (vm.mmap_min_addr is at most 64 KiB on common systems) to the top of the 47-bit user space.
const WAKE_START: u64 = 0x10000;
const WAKE_END: u64 = (1 << 47) - PAGE_SIZE as u64;

/// REMAP destinations seen during this rescue (see the module doc); more than this and every
/// UNMAP keeps its records (COPY decides).
const MAX_REMAP_DSTS: usize = 64;

fn guard(off: usize, len: usize) -> &'static mut [u8] {
    let base = SHIM.guard_base.load(Ordering::Relaxed);
    assert!(base != 0 && off + len <= GUARD_BYTES);
    // SAFETY: the guardian mapping is made in `init`, never unmapped, and its scratch part is
    // used by the guardian thread alone (or, in a forked child, by its fork handler while it
    // is the child's only thread, on the child's copy); the regions at the fixed offsets do
    // not overlap and each has one user at a time.
    unsafe { std::slice::from_raw_parts_mut((base + off) as *mut u8, len) }
}

pub(crate) fn start() -> Result<(), i32> {
    crate::agent::spawn_on_own_stack(
        SHIM.guard_base.load(Ordering::Relaxed),
        GUARD_STACK_BYTES,
        guardian_main,
        c"uswap-guard",
    )
}

extern "C" fn guardian_main(_: *mut libc::c_void) -> *mut libc::c_void {
    loop {
        // The high-numbered duplicate: the same open socket, out of the program's way (an
        // adoption puts the new monitor's socket under the same number).
        let sock = SHIM.refs[crate::FD_SOCK].load(Ordering::Relaxed);
        loop {
            let mut pfd = libc::pollfd {
                fd: sock,
                events: libc::POLLRDHUP,
                revents: 0,
            };
            // SAFETY: polling one pollfd on our stack.
            let rc = unsafe { libc::poll(&mut pfd, 1, 1000) };
            if SHIM.state.load(Ordering::Acquire) != MANAGED {
                return std::ptr::null_mut();
            }
            if rc > 0 {
                if pfd.revents & libc::POLLNVAL != 0 {
                    return std::ptr::null_mut();
                }
                if pfd.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0 {
                    break;
                }
            }
        }
        // Our descriptors must still be ours (a program that closed them detached the shim).
        if !crate::fds_ok(&[crate::FD_SOCK, crate::FD_UFFD]) {
            return std::ptr::null_mut();
        }
        monitor_gone();
    }
}

/// A monitor answers again before `rescue_after`: asks it to adopt the program instead of
/// bringing every page home. The window's pages (the dead monitor's staging) and the shared
/// pages moved meanwhile come home; the store's pages stay where they are, and the new
/// monitor rebuilds its page map from their records (the guardian stops reading the
/// program's events before it says `Hello`: the new monitor reads the rest). The agent is
/// restarted on the new window. Returns false, having changed nothing the rescue needs, if
/// the monitor refused or cannot be reached; the caller then brings everything home.
fn adopt(r: &mut Rescue) -> Result<(), NotAdopted> {
    // Cross-mm: a run the dead monitor was moving has no complete record; such a program is
    // rescued (and the lost pages fenced) instead.
    if r.win.inflight_state().load(Ordering::Acquire) != shm::INFLIGHT_NONE {
        return Err(NotAdopted::Final(
            b"the dead monitor was moving a run out (cross-mm)",
        ));
    }
    // The agent has stopped (monitor_lost) and must be gone before a new one starts.
    let end = raw::monotonic_ns() + 2_000_000_000;
    while SHIM.agent_alive.load(Ordering::SeqCst) {
        if raw::monotonic_ns() > end {
            return Err(NotAdopted::Final(
                b"the old agent thread did not stop within 2 s",
            ));
        }
        r.drain_events(1);
    }
    let mut t = r.bring_home(false);
    // Events read now may move more shared pages or records into REMAP destinations: they
    // come home too (the new monitor knows nothing of this guardian's relocations).
    loop {
        let before = (r.relocs_len, r.remap_dst_count);
        r.drain_events(0);
        if (r.relocs_len, r.remap_dst_count) == before {
            break;
        }
        t.restored += r.bring_home(false).restored;
    }
    // Counted now: if the adoption fails below, these pages are home all the same.
    r.earlier.absorb(&t);
    let Ok(sock) = crate::connect_again() else {
        return Err(NotAdopted::Retry(b"connecting to the new monitor failed"));
    };
    let close = |fd: i32| {
        // SAFETY: closing a descriptor this function opened or received.
        unsafe { libc::close(fd) };
    };
    let mut name = [0u8; 256];
    let name_len = crate::program_name(&mut name);
    let hello = uswap::protocol::wire::Msg::Hello(uswap::protocol::wire::Hello {
        // SAFETY: getpid has no preconditions.
        pid: unsafe { libc::getpid() } as u32,
        page_size: PAGE_SIZE as u32,
        uffd_features: SHIM.uffd_features.load(Ordering::Relaxed),
        fork_token: 0,
        forked_from: 0,
        flags: uswap::protocol::wire::HELLO_ADOPT,
        store_member: SHIM.store_member.load(Ordering::Relaxed),
        name: &name[..name_len],
        app: raw::getenv(c"USWAP_APP").unwrap_or(b""),
        overrides: raw::getenv(c"USWAP_OVERRIDES").unwrap_or(b""),
    });
    let pkt = guard(MAPS_OFF, uswap::protocol::wire::MAX_MSG_LEN);
    let Ok(n) = hello.encode(pkt) else {
        close(sock);
        return Err(NotAdopted::Final(
            b"the adoption request could not be encoded",
        ));
    };
    // The store file, and the disk tier's file if there is one (the store's disk pages are
    // there; the new monitor keeps the tier).
    let disk_fd = SHIM.disk_fd.load(Ordering::Relaxed);
    let fds = [
        SHIM.uffd.load(Ordering::Relaxed),
        SHIM.store_fd.load(Ordering::Relaxed),
        disk_fd,
    ];
    let fds = if disk_fd >= 0 { &fds[..] } else { &fds[..2] };
    if uswap::protocol::io::send_packet(sock, &pkt[..n], fds).is_err() {
        close(sock);
        return Err(NotAdopted::Retry(b"sending the adoption request failed"));
    }
    let got = match uswap::protocol::io::recv_packet(sock, pkt, 0) {
        Ok(Some(g)) => g,
        _ => {
            close(sock);
            return Err(NotAdopted::Retry(
                b"the new monitor closed the connection without an answer",
            ));
        }
    };
    let mut got = got;
    let window_len = match uswap::protocol::wire::Msg::decode(&pkt[..got.len]) {
        Ok(uswap::protocol::wire::Msg::HelloAck(a)) if a.status == 0 => a.window_len_bytes as usize,
        _ => {
            close(sock);
            return Err(NotAdopted::Final(
                b"the new monitor refused to adopt this program (its log says why)",
            ));
        }
    };
    let (Some(win), Some(req), Some(done)) = (got.take_fd(0), got.take_fd(1), got.take_fd(2))
    else {
        close(sock);
        return Err(NotAdopted::Final(
            b"the new monitor's answer lacked its descriptors",
        ));
    };
    drop(got.take_fd(3));
    // The memfd the monitor sent, shared, at a new address.
    let base = raw::map_shared(win.as_raw_fd(), window_len);
    let stack = raw::map_anon(
        crate::AGENT_STACK_BYTES,
        libc::MAP_NORESERVE | libc::MAP_STACK,
    );
    if base == 0 || stack == 0 || window_len < shm::DATA_OFF {
        // The monitor holds our descriptor now: closing the connection makes it let go.
        close(sock);
        return Err(NotAdopted::Final(
            b"mapping the new window or the agent's stack failed",
        ));
    }
    // SAFETY: advising the mapping just made; the raw syscall.
    unsafe { libc::syscall(libc::SYS_madvise, base, window_len, libc::MADV_DONTFORK) };
    // The new connection and eventfds take the numbers of the old ones (ours, checked by
    // fds_ok), so every holder of a number keeps a valid descriptor.
    for (new, idx) in [
        (sock, crate::FD_SOCK),
        (req.as_raw_fd(), crate::FD_REQ),
        (done.as_raw_fd(), crate::FD_DONE),
    ] {
        let old = crate::fd_number(idx);
        let dup = SHIM.refs[idx].load(Ordering::Relaxed);
        // SAFETY: dup3 onto descriptor numbers the shim owns (its own and their duplicates).
        unsafe {
            libc::dup3(new, old, libc::O_CLOEXEC);
            libc::dup3(new, dup, libc::O_CLOEXEC);
        }
    }
    close(sock);
    crate::record_sock_ino();
    drop((req, done, win));
    let old_base = SHIM.window_base.swap(base as usize, Ordering::AcqRel);
    let old_len = SHIM.window_len.swap(window_len, Ordering::AcqRel);
    SHIM.stack_base.store(stack, Ordering::Relaxed);
    SHIM.stack_len
        .store(crate::AGENT_STACK_BYTES, Ordering::Relaxed);
    // SAFETY: the dead monitor's window: the agent that used it is gone, and so is its
    // Rescue view (not used past this point).
    unsafe { libc::syscall(libc::SYS_munmap, old_base, old_len) };
    SHIM.maps_dirty.store(true, Ordering::Release);
    SHIM.monitor_lost.store(false, Ordering::SeqCst);
    // Threads whose fault messages this guardian read fault again, for the new monitor.
    wake_all(r.uffd);
    SHIM.adoptions.fetch_add(1, Ordering::AcqRel);
    if crate::agent::start().is_err() {
        raw::eprint_line(&[b"uswap: adopted, but the agent could not restart; eviction stops"]);
    }
    let (mut a, mut b) = ([0u8; 20], [0u8; 20]);
    let left = r.count_store_records();
    raw::eprint_line(&[
        b"uswap: a new monitor adopted this program: ",
        fmt_u64(left, &mut a),
        b" evicted pages stay in its store; ",
        fmt_u64(t.restored, &mut b),
        b" window pages brought home",
    ]);
    Ok(())
}

/// Why an adoption did not happen.
enum NotAdopted {
    /// The new monitor may not be fully up yet (its socket file is replaced while it starts,
    /// and a probe can even reach the dead one's backlog): try again while time is left.
    Retry(&'static [u8]),
    /// It will not happen: bring every page home.
    Final(&'static [u8]),
}

/// What the rescue did, for its closing line.
#[derive(Default, Clone, Copy)]
struct Tally {
    restored: u64,
    present: u64,
    unmapped: u64,
    corrupt: u64,
    /// Cross-mm: pages the monitor had moved out and no copy of survived it.
    lost: u64,
    /// Records whose copy kept meeting unread events (`COPY_TRIES` times): left in place.
    stuck: u64,
    first_lost: u64,
}

impl Tally {
    /// Adds what another pass did.
    fn absorb(&mut self, o: &Tally) {
        self.restored += o.restored;
        self.present += o.present;
        self.unmapped += o.unmapped;
        self.corrupt += o.corrupt;
        self.lost += o.lost;
        self.stuck += o.stuck;
        if self.first_lost == 0 {
            self.first_lost = o.first_lost;
        }
    }
}

struct Rescue {
    uffd: i32,
    win: Window,
    store: Option<StoreView>,
    remap_dsts: [(u64, u64); MAX_REMAP_DSTS],
    remap_dst_count: usize,
    /// Shared pages (fork family) this program moved while the monitor was gone: (chunk,
    /// slot, new address or 0 once discarded, payload length). Their records name the other
    /// members' pages, so the move is kept here.
    relocs: &'static mut [Reloc],
    relocs_len: usize,
    /// What adoption attempts that then failed brought home (the window's pages come home
    /// before the new monitor is asked), for the closing line.
    earlier: Tally,
}

/// Attempts to copy one record's page home while each meets an unread event (EAGAIN).
const COPY_TRIES: u32 = 1000;

/// Shared pages moved during one outage that the guardian keeps track of: 2^20 (4 GiB of moved
/// shared memory; the first version kept 256 on its stack, and the cross-mm kill loop in the
/// VM overflowed it: the pages past it read as zeros).
const MAX_RELOCS: usize = 1 << 20;

/// A shared page this program moved during the outage: (chunk, slot, new address or 0 once
/// discarded or home, payload length).
type Reloc = (usize, usize, u64, usize);

/// The relocation table in the guardian mapping.
fn relocs_table() -> &'static mut [Reloc] {
    let bytes = guard(RELOCS_OFF, MAX_RELOCS * std::mem::size_of::<Reloc>());
    // SAFETY: RELOCS_OFF is page aligned in a page-aligned mapping, so the bytes are aligned
    // for `Reloc` (four 8-byte fields, any bit pattern valid); only the guardian thread uses
    // them, through this one view per outage.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<Reloc>(), MAX_RELOCS) }
}

/// What becomes of a record after an event of the program.
enum Follow {
    Keep,
    Drop,
    Move(u64),
}

/// This program's owner bit in the store's records.
fn my_bit() -> u16 {
    1u16 << (SHIM.store_member.load(Ordering::Relaxed) & 15)
}

/// Whether a record with owner set `owners` is (also) this program's.
fn mine(owners: u16) -> bool {
    owners & my_bit() != 0
}

fn monitor_gone() {
    SHIM.monitor_lost.store(true, Ordering::SeqCst);
    crate::agent::kick();
    let uffd = SHIM.uffd.load(Ordering::Relaxed);
    // SAFETY: the window mapping was made in `init` and is never unmapped.
    let win = unsafe {
        Window::new(
            SHIM.window_base.load(Ordering::Relaxed) as *mut u8,
            SHIM.window_len.load(Ordering::Relaxed),
        )
    };
    let mut r = Rescue {
        uffd,
        win,
        store: map_store(),
        remap_dsts: [(0, 0); MAX_REMAP_DSTS],
        remap_dst_count: 0,
        relocs: relocs_table(),
        relocs_len: 0,
        earlier: Tally::default(),
    };
    // First what the monitor read but had not applied: it precedes every event still queued.
    let replayed = r.replay_journal();
    if replayed > 0 {
        let mut num = [0u8; 20];
        raw::eprint_line(&[
            b"uswap: the monitor died after reading ",
            fmt_u64(replayed, &mut num),
            b" address-space change(s) of the program it had not yet applied; the shim applied them from its journal",
        ]);
    }
    // The agent finishes the run it is in (it may wait for its own REMOVE event to be read).
    while SHIM.agent_busy.load(Ordering::SeqCst) {
        r.drain_events(10);
    }
    // Shared pages the journal's events moved are this program's too (`relocs`).
    let waiting = r.count_records() + r.relocs_len as u64;
    if waiting > 0 {
        let after_ms = win.rescue_after_ms().load(Ordering::Relaxed).min(3_600_000);
        let mut num = [0u8; 20];
        let mut secs = [0u8; 20];
        raw::eprint_line(&[
            b"uswap: the monitor is gone; ",
            fmt_u64(waiting, &mut num),
            b" evicted pages are safe in shared memory; waiting up to ",
            fmt_u64(after_ms, &mut secs),
            b" ms for a monitor before bringing them home",
        ]);
        let deadline_ns = raw::monotonic_ns() + after_ms * 1_000_000;
        // A monitor that answers again adopts the program (DESIGN.md "Adoption"); with
        // `USWAP_ADOPT=0` it makes the guardian bring every page home at once instead.
        let adopt_on = raw::getenv(c"USWAP_ADOPT").is_none_or(|v| v != b"0");
        let mut next_probe = 0u64;
        let mut not_adopted: Option<&'static [u8]> = None;
        while raw::monotonic_ns() < deadline_ns {
            r.drain_events(50);
            let now = raw::monotonic_ns();
            if now < next_probe {
                continue;
            }
            next_probe = now + 250_000_000;
            if !crate::monitor_answers() {
                continue;
            }
            if !adopt_on {
                break;
            }
            match adopt(&mut r) {
                Ok(()) => return,
                Err(NotAdopted::Retry(why)) => not_adopted = Some(why),
                Err(NotAdopted::Final(why)) => {
                    not_adopted = Some(why);
                    break;
                }
            }
        }
        if let Some(why) = not_adopted {
            raw::eprint_line(&[
                b"uswap: not adopted: ",
                why,
                b"; bringing every page home instead",
            ]);
        }
    }
    let t0 = raw::monotonic_ns();
    let mut t = r.bring_home(true);
    r.fence_lost(&mut t);
    t.absorb(&r.earlier);
    // The disk tier's pages are home: this program's hold on the (unlinked) disk file goes, so
    // its space is freed once no other member of the family holds it.
    let disk = SHIM.disk_fd.swap(-1, Ordering::AcqRel);
    if disk >= 0 {
        // SAFETY: closing the descriptor the shim kept for the disk file (swapped out: once).
        unsafe { libc::close(disk) };
    }
    let home_us = (raw::monotonic_ns() - t0) / 1000;
    r.unregister_all();
    r.drain_events(0);
    SHIM.state.store(crate::DETACHED, Ordering::Release);
    SHIM.rescue_done.store(true, Ordering::Release);
    if waiting == 0 {
        raw::eprint_line(&[
            b"uswap: the monitor is gone (nothing was evicted); the program runs unmanaged from now on",
        ]);
        r.watch_forever();
    }
    let (mut a, mut b, mut c, mut d) = ([0u8; 20], [0u8; 20], [0u8; 20], [0u8; 20]);
    let mut e = [0u8; 20];
    raw::eprint_line(&[
        b"uswap: without the monitor: ",
        fmt_u64(t.restored, &mut a),
        b" pages brought home in ",
        fmt_u64(home_us, &mut e),
        b" us, ",
        fmt_u64(t.present, &mut b),
        b" already present, ",
        fmt_u64(t.unmapped, &mut c),
        b" in memory the program had unmapped, ",
        fmt_u64(t.corrupt, &mut d),
        b" corrupt; the program runs unmanaged from now on",
    ]);
    if t.stuck > 0 {
        let mut n = [0u8; 20];
        raw::eprint_line(&[
            b"uswap: ",
            fmt_u64(t.stuck, &mut n),
            b" evicted pages could not be brought home (every copy met a new address-space change of the program): they read as zeros",
        ]);
    }
    if t.lost > 0 {
        let (mut n, mut a) = ([0u8; 20], [0u8; 20]);
        raw::eprint_line(&[
            b"uswap: ",
            fmt_u64(t.lost, &mut n),
            b" pages were lost with the monitor (cross-mm: it died while moving them out, before their copies existed); they are made inaccessible (first at 0x",
            fmt_hex(t.first_lost, &mut a),
            b"): the program faults if it touches them, rather than read zeros",
        ]);
    }
    r.watch_forever();
}

/// Formats `v` in hexadecimal into `buf`; returns the digits.
fn fmt_hex(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[(v & 15) as usize];
        v >>= 4;
        if v == 0 {
            return &buf[i..];
        }
    }
}

/// A forked child whose monitor died before it could attach: the pages its parent had
/// evicted are in the family store (`store_fd`, inherited), under the child's owner bit
/// `member`. Single-threaded (the child's fork handler): registers every managed VMA with a new
/// descriptor, copies each of its pages home, drops its bits and closes the descriptor (the
/// memory is whole: nothing reads as zeros). Returns the pages brought home, or `None` if the
/// store could not be read.
pub(crate) fn rescue_forked_child(store_fd: i32, disk_fd: i32, member: u32) -> Option<u64> {
    let store = map_store_fd(store_fd)?;
    let uffd = uswap::uffd::Uffd::create(0, 0, true).ok()?;
    SHIM.uffd.store(
        std::os::fd::AsRawFd::as_raw_fd(&uffd),
        std::sync::atomic::Ordering::Relaxed,
    );
    let mut maps_buf = [0u8; 16 * 1024];
    let registered = crate::agent::register_all(&mut maps_buf);
    SHIM.uffd.store(-1, Ordering::Relaxed);
    if !registered {
        return None;
    }
    let bit = 1u16 << (member & 15);
    let mut page = [0u8; PAGE_SIZE];
    let mut payload = [0u8; PAGE_SIZE];
    let mut restored = 0;
    store.for_each_page(|p| {
        if p.owners & bit == 0 {
            return;
        }
        let rec = store.record(p.chunk_idx, p.slot_idx);
        if decode_stored(&p, disk_fd, &mut payload, &mut page) {
            let mut c = sys::UffdioCopy {
                dst: p.addr,
                src: page.as_ptr() as u64,
                len: PAGE_SIZE as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads one page from our buffer and installs it in our own
            // registered memory, only where no page is present.
            if unsafe { libc::ioctl(uffd.as_raw_fd(), sys::UFFDIO_COPY as _, &mut c) } == 0 {
                restored += 1;
            }
        }
        store.set_record(
            p.chunk_idx,
            p.slot_idx,
            store_layout::with_owners(rec, p.owners & !bit),
        );
    });
    // Closing the descriptor unregisters every range; every page is home.
    drop(uffd);
    Some(restored)
}

/// Decodes a stored page into `out`: a memory chunk's payload from the store file, a disk
/// chunk's read with `pread` from `disk_fd` into `scratch` first. `false` if it is corrupt or
/// cannot be read (no disk file, a short read).
fn decode_stored(
    page: &store_layout::StoredPage<'_>,
    disk_fd: i32,
    scratch: &mut [u8],
    out: &mut [u8; PAGE_SIZE],
) -> bool {
    // The guardian thread and a forked child's fork handler (the child's only thread, on its
    // own copy of the mapping) are the only users of the decoder's workspace.
    let Some(mut decoder) =
        store_layout::PageDecoder::new(guard(DECODER_OFF, store_layout::DECODER_WORKSPACE_BYTES))
    else {
        return false;
    };
    let Some(off) = page.disk_off else {
        return decoder.decode_page(page, out);
    };
    let len = page.len_bytes;
    if disk_fd < 0 || len > scratch.len() {
        return false;
    }
    let mut done = 0;
    while done < len {
        // SAFETY: pread into our own scratch buffer, within its length; a plain syscall that
        // allocates nothing and takes no lock.
        let n = unsafe {
            libc::pread(
                disk_fd,
                scratch[done..len].as_mut_ptr().cast(),
                len - done,
                (off + done as u64) as libc::off_t,
            )
        };
        if n > 0 {
            done += n as usize;
        } else if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        } else {
            return false;
        }
    }
    decoder.decode_payload(page.raw, &scratch[..len], out)
}

/// Maps the store file read-write (for its records), or `None` if there is none or it is not
/// one this build reads (then only the window's pages can be brought home; said on stderr).
fn map_store() -> Option<StoreView> {
    map_store_fd(SHIM.store_fd.load(Ordering::Relaxed))
}

/// [`map_store`] of descriptor `fd`.
fn map_store_fd(fd: i32) -> Option<StoreView> {
    if fd < 0 {
        return None;
    }
    // SAFETY: fstat into a zeroed buffer on our stack.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above, on our own descriptor.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    let len = st.st_size as usize;
    // A new shared mapping of the store file, never unmapped (the program is detached after
    // the rescue). The raw syscall: libc's `mmap` is our own interposer, which waits while the
    // agent holds `reg_busy`, and the agent may be waiting for us to read its REMOVE event.
    let base = raw::map_shared(fd, len) as *mut libc::c_void;
    if base.is_null() {
        raw::eprint_line(&[b"uswap: cannot map the store file; its pages cannot be brought home"]);
        return None;
    }
    // SAFETY: the mapping above, `len` bytes, never unmapped; the monitor that wrote the
    // payloads is gone.
    match unsafe { StoreView::new(base.cast(), len) } {
        Ok(v) => Some(v),
        Err(_) => {
            raw::eprint_line(&[
                b"uswap: the store file has a layout this shim does not read; its pages cannot be brought home",
            ]);
            None
        }
    }
}

impl Rescue {
    fn count_store_records(&self) -> u64 {
        let mut n = 0;
        if let Some(s) = &self.store {
            s.for_each_page(|p| n += u64::from(mine(p.owners)));
        }
        n
    }

    fn count_records(&self) -> u64 {
        let mut n = 0;
        if let Some(s) = &self.store {
            s.for_each_page(|p| n += u64::from(mine(p.owners)));
        }
        for slot in 0..self.win.slots() {
            n += u64::from(self.win.slot_record(slot).load(Ordering::Acquire) != 0);
        }
        n
    }

    /// Applies `f(page_addr)` to every record of this program: the window's, and the store's
    /// that carry its owner bit (a forked program shares its parent's store; the other members'
    /// records name pages of other address spaces and are left alone).
    fn rewrite_records(&mut self, mut f: impl FnMut(u64) -> Follow) {
        if let Some(s) = self.store {
            s.for_each_page(|p| {
                if !mine(p.owners) {
                    return;
                }
                let rec = s.record(p.chunk_idx, p.slot_idx);
                let (_, len_bytes) = store_layout::record_parts(rec);
                let alone = p.owners == my_bit();
                let new = match f(p.addr) {
                    Follow::Keep => return,
                    Follow::Drop => store_layout::with_owners(rec, p.owners & !my_bit()),
                    Follow::Move(to) if alone => store_layout::record(to, len_bytes, p.owners),
                    Follow::Move(to) => {
                        // Shared with another member, whose page did not move: this program's
                        // copy is brought home from the slot at its new address.
                        self.relocate(p.chunk_idx, p.slot_idx, to, len_bytes);
                        store_layout::with_owners(rec, p.owners & !my_bit())
                    }
                };
                s.set_record(p.chunk_idx, p.slot_idx, new);
            });
        }
        for slot in 0..self.win.slots() {
            let w = self.win.slot_record(slot);
            let rec = w.load(Ordering::Acquire);
            if rec != 0 {
                // Window records hold the bare address.
                match f(rec) {
                    Follow::Keep => {}
                    Follow::Drop => w.store(0, Ordering::Release),
                    Follow::Move(to) => w.store(to, Ordering::Release),
                }
            }
        }
    }

    /// Remembers that slot `slot_idx` of chunk `chunk_idx` holds this program's page now at
    /// `to` (its record names another member's). Called once per page: the record loses this
    /// program's bit here, so `rewrite_records` never meets it again; a second move of the page
    /// updates its entry (`apply_remap`).
    fn relocate(&mut self, chunk_idx: usize, slot_idx: usize, to: u64, len_bytes: usize) {
        if self.relocs_len < MAX_RELOCS {
            self.relocs[self.relocs_len] = (chunk_idx, slot_idx, to, len_bytes);
        }
        self.relocs_len += 1;
    }

    fn in_remap_dst(&self, addr: u64) -> bool {
        self.remap_dst_count > MAX_REMAP_DSTS
            || self.remap_dsts[..self.remap_dst_count.min(MAX_REMAP_DSTS)]
                .iter()
                .any(|&(s, e)| (s..e).contains(&addr))
    }

    fn apply(&mut self, ev: Event) {
        let page_mask = !(PAGE_SIZE as u64 - 1);
        match ev {
            Event::Remap { from, to, len } => self.apply_remap(from, to, len, true),
            Event::Remove { start, end } | Event::Unmap { start, end } => {
                let unmap = matches!(ev, Event::Unmap { .. });
                // The program discarded the in-flight run: zeros are its content now.
                let run = self.win.inflight_run().load(Ordering::Acquire);
                if (start..end).contains(&(run & page_mask)) {
                    self.win
                        .inflight_state()
                        .store(shm::INFLIGHT_NONE, Ordering::Release);
                }
                let dsts = (self.remap_dsts, self.remap_dst_count);
                let doubtful = |addr: u64| {
                    dsts.1 > MAX_REMAP_DSTS
                        || dsts.0[..dsts.1.min(MAX_REMAP_DSTS)]
                            .iter()
                            .any(|&(s, e)| (s..e).contains(&addr))
                };
                let n = self.relocs_len.min(MAX_RELOCS);
                for r in &mut self.relocs[..n] {
                    if (start..end).contains(&r.2) && !(unmap && doubtful(r.2)) {
                        r.2 = 0;
                    }
                }
                self.rewrite_records(|addr| {
                    if (start..end).contains(&addr) && !(unmap && doubtful(addr)) {
                        Follow::Drop
                    } else {
                        Follow::Keep
                    }
                });
            }
            _ => {}
        }
    }

    /// Notes `[start, end)` as a REMAP destination: an UNMAP read later over it may be stale.
    fn add_remap_dst(&mut self, start: u64, end: u64) {
        if self.remap_dst_count < MAX_REMAP_DSTS {
            self.remap_dsts[self.remap_dst_count] = (start, end);
        }
        self.remap_dst_count += 1;
    }

    /// Takes over from the dead monitor's event journal (`protocol/shm.rs`): its unconfirmed
    /// REMAP destinations become this guardian's, and the messages it had read but not applied
    /// are applied here, in order, before any event is read from the descriptor. Returns how
    /// many events were applied.
    fn replay_journal(&mut self) -> u64 {
        let dests = self.win.journal_dests_len();
        if dests as usize > shm::JOURNAL_DESTS {
            // Too many to name: every UNMAP is possibly stale from now on.
            self.remap_dst_count = MAX_REMAP_DSTS + 1;
        } else {
            for i in 0..dests as usize {
                let (start, end) = self.win.journal_dest(i);
                self.add_remap_dst(start, end);
            }
        }
        if self.win.journal_state().load(Ordering::Acquire) != shm::JOURNAL_APPLYING {
            return 0;
        }
        let applied =
            (self.win.journal_applied().load(Ordering::Acquire) as usize).min(shm::JOURNAL_MSGS);
        let mut replayed = 0;
        for i in 0..shm::JOURNAL_MSGS {
            let msg = sys::UffdMsg::from_words(self.win.journal_msg(i));
            if msg.event == 0 {
                break;
            }
            let ev = Event::decode(&msg);
            match ev {
                // Applied by the monitor: only its destination is remembered.
                Event::Remap { to, len, .. } if i < applied => self.add_remap_dst(to, to + len),
                _ if i < applied => {}
                // Possibly half applied: what is at the destination already moved there.
                Event::Remap { from, to, len } if i == applied => {
                    self.apply_remap(from, to, len, false);
                    replayed += 1;
                }
                Event::Remap { .. } | Event::Remove { .. } | Event::Unmap { .. } => {
                    self.apply(ev);
                    replayed += 1;
                }
                _ => {}
            }
        }
        self.win
            .journal_state()
            .store(shm::JOURNAL_IDLE, Ordering::Release);
        replayed
    }

    /// A REMAP moved `[from, from+len)` to `to`: records follow. With `drop_dst` what was
    /// recorded at the destination is dropped (the kernel unmapped it first); without, it is
    /// kept (a REMAP the dead monitor had half applied: its destination holds records it
    /// already moved).
    fn apply_remap(&mut self, from: u64, to: u64, len: u64, drop_dst: bool) {
        let page_mask = !(PAGE_SIZE as u64 - 1);
        // The in-flight run moves with its mapping (see `fence_lost`).
        let run = self.win.inflight_run().load(Ordering::Acquire);
        if (from..from + len).contains(&(run & page_mask)) {
            self.win
                .inflight_run()
                .store(run - from + to, Ordering::Release);
        } else if (to..to + len).contains(&(run & page_mask)) {
            self.win
                .inflight_state()
                .store(shm::INFLIGHT_NONE, Ordering::Release);
        }
        // The kernel unmapped the destination first: what was recorded there is gone (unless
        // the dead monitor put it there, see `drop_dst`). Relocated shared pages follow their
        // mapping too.
        let n = self.relocs_len.min(MAX_RELOCS);
        for r in &mut self.relocs[..n] {
            if drop_dst && (to..to + len).contains(&r.2) {
                r.2 = 0;
            } else if (from..from + len).contains(&r.2) {
                r.2 = r.2 - from + to;
            }
        }
        self.rewrite_records(|addr| {
            if (to..to + len).contains(&addr) {
                if drop_dst {
                    Follow::Drop
                } else {
                    Follow::Keep
                }
            } else if (from..from + len).contains(&addr) {
                Follow::Move(addr - from + to)
            } else {
                Follow::Keep
            }
        });
        self.add_remap_dst(to, to + len);
    }

    /// Reads and applies the program's pending events, waiting up to `timeout_ms` for the
    /// first. Page faults are left waiting.
    fn drain_events(&mut self, timeout_ms: i32) {
        let mut timeout = timeout_ms;
        loop {
            let mut pfd = libc::pollfd {
                fd: self.uffd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polling one pollfd on our stack.
            if unsafe { libc::poll(&mut pfd, 1, timeout) } <= 0 || pfd.revents & libc::POLLIN == 0 {
                return;
            }
            timeout = 0;
            let buf = guard(EVENTS_OFF, EVENTS_LEN);
            // SAFETY: reading whole messages into our scratch buffer of EVENTS_LEN bytes.
            let n = unsafe { libc::read(self.uffd, buf.as_mut_ptr().cast(), EVENTS_LEN) };
            if n <= 0 {
                return;
            }
            let msg_len = std::mem::size_of::<sys::UffdMsg>();
            for i in 0..n as usize / msg_len {
                // SAFETY: `i * msg_len + msg_len <= n` bytes of the buffer hold a message the
                // kernel wrote; read unaligned into a local.
                let msg: sys::UffdMsg = unsafe {
                    std::ptr::read_unaligned(buf.as_ptr().add(i * msg_len) as *const sys::UffdMsg)
                };
                self.apply(Event::decode(&msg));
            }
        }
    }

    /// Tries once to copy one page from `src` (page-aligned) to `dst`. Returns the errno, 0 on
    /// success. On EAGAIN (an address-space event of the program is queued and unread) it
    /// reads and applies the pending events first: they may have moved or dropped the very
    /// record being copied, so the caller looks at the record again before it retries. (The
    /// first version retried the same address at once: a record moved by the event it read
    /// was then skipped, its page reading zeros at the new address; and a record dropped by a
    /// MADV_DONTNEED was copied anyway, after the kernel had discarded the page, bringing the
    /// old bytes back.)
    fn copy_once(&mut self, dst: u64, src: *const u8) -> i32 {
        let mut c = sys::UffdioCopy {
            dst,
            src: src as u64,
            len: PAGE_SIZE as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads one page from our buffer and installs it at `dst` in our
        // own registered memory, only where no page is present.
        let rc = unsafe { libc::ioctl(self.uffd, sys::UFFDIO_COPY as _, &mut c) };
        if rc == 0 {
            return 0;
        }
        let errno = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        if errno == libc::EAGAIN {
            self.drain_events(1);
        }
        errno
    }

    /// Brings home the window's pages, then (with `store_too`) the store's, then the shared
    /// pages moved meanwhile. Without `store_too` only the store's records in a REMAP
    /// destination seen during the outage come home (an UNMAP over such a range kept its
    /// records, for the copy to decide: ENOENT where nothing registered is mapped any more); the
    /// others stay for a monitor that adopts the program.
    ///
    /// Every record is read again after a copy that met an unread event (see `copy_once`):
    /// events rewrite records in place (a REMAP changes the address, a REMOVE/UNMAP drops it),
    /// so the record as it is now decides. A record still met by EAGAIN after
    /// `COPY_TRIES` attempts is left in place and counted (`stuck`).
    fn bring_home(&mut self, store_too: bool) -> Tally {
        let mut t = Tally::default();
        let win = self.win;
        // Window pages first: they are whole pages already.
        for slot in 0..win.slots() {
            let w = win.slot_record(slot);
            let mut tries = 0;
            loop {
                let rec = w.load(Ordering::Acquire);
                if rec == 0 {
                    break;
                }
                if tries == COPY_TRIES {
                    t.stuck += 1;
                    break;
                }
                tries += 1;
                let errno = self.copy_once(rec, win.slot_ptr(slot));
                if errno == libc::EAGAIN {
                    continue;
                }
                self.count(&mut t, errno);
                w.store(0, Ordering::Release);
                break;
            }
        }
        // Store pages: decompress into our page buffer, copy in.
        let Some(store) = self.store else {
            return t;
        };
        for chunk_idx in 0..store.chunk_capacity() {
            if !store_too && self.remap_dst_count == 0 {
                break;
            }
            let Some(kind) = store.chunk_kind(chunk_idx) else {
                continue;
            };
            for slot_idx in 0..store_layout::slots_per_chunk(kind.class_idx()) {
                let mut tries = 0;
                while let Some(page) = store.page_of(chunk_idx, kind, slot_idx) {
                    if !mine(page.owners) || (!store_too && !self.in_remap_dst(page.addr)) {
                        break;
                    }
                    if tries == COPY_TRIES {
                        t.stuck += 1;
                        break;
                    }
                    tries += 1;
                    let rec = store.record(chunk_idx, slot_idx);
                    let done = store_layout::with_owners(rec, page.owners & !my_bit());
                    let out: &mut [u8; PAGE_SIZE] =
                        guard(PAGE_OFF, PAGE_SIZE).try_into().expect("one page");
                    let disk = guard(DISK_OFF, PAGE_SIZE);
                    if !decode_stored(&page, SHIM.disk_fd.load(Ordering::Relaxed), disk, out) {
                        t.corrupt += 1;
                        store.set_record(chunk_idx, slot_idx, done);
                        break;
                    }
                    let errno = self.copy_once(page.addr, out.as_ptr());
                    if errno == libc::EAGAIN {
                        continue;
                    }
                    // No event was read since `rec` was: it is still this record.
                    self.count(&mut t, errno);
                    store.set_record(chunk_idx, slot_idx, done);
                    break;
                }
            }
        }
        // Shared pages this program moved while no monitor ran: their slot, at the new address.
        // (Events read by these copies may add more: the length is read again each time.)
        let mut i = 0;
        while i < self.relocs_len.min(MAX_RELOCS) {
            let mut tries = 0;
            loop {
                let (chunk_idx, slot_idx, to, len_bytes) = self.relocs[i];
                if to == 0 {
                    break;
                }
                let Some(kind) = store.chunk_kind(chunk_idx) else {
                    break;
                };
                let Some(page) = store.page_at(chunk_idx, kind, slot_idx, len_bytes) else {
                    break;
                };
                if tries == COPY_TRIES {
                    t.stuck += 1;
                    break;
                }
                tries += 1;
                let out: &mut [u8; PAGE_SIZE] =
                    guard(PAGE_OFF, PAGE_SIZE).try_into().expect("one page");
                let disk = guard(DISK_OFF, PAGE_SIZE);
                if !decode_stored(&page, SHIM.disk_fd.load(Ordering::Relaxed), disk, out) {
                    t.corrupt += 1;
                    break;
                }
                let errno = self.copy_once(to, out.as_ptr());
                if errno == libc::EAGAIN {
                    continue;
                }
                self.count(&mut t, errno);
                self.relocs[i].2 = 0;
                break;
            }
            i += 1;
        }
        if self.relocs_len > MAX_RELOCS {
            raw::eprint_line(&[
                b"uswap: more shared pages were moved while the monitor was gone than the shim tracks; some read as zeros",
            ]);
        }
        t
    }

    /// Cross-mm: the run the monitor was moving out when it died (`Window::inflight_run`).
    /// Each of its pages that left the program and has no copy is gone. Every page the records
    /// could bring home is home by now, so a copy into one of those pages succeeds exactly when
    /// it is missing: it is then made inaccessible, so the program faults on it instead of
    /// reading zeros. (While the monitor was still inside the move, which pages left is not
    /// known: every missing page of the run is treated so, a never-touched one included.)
    fn fence_lost(&mut self, t: &mut Tally) {
        let state = self.win.inflight_state().load(Ordering::Acquire);
        if state == shm::INFLIGHT_NONE {
            return;
        }
        let page_mask = !(PAGE_SIZE as u64 - 1);
        let run = self.win.inflight_run().load(Ordering::Acquire);
        let pages = ((run & !page_mask) as u32).min(shm::INFLIGHT_MAX_PAGES);
        let bits = if state == shm::INFLIGHT_MOVED {
            self.win.inflight_moved().load(Ordering::Acquire)
        } else {
            u64::MAX
        };
        let poison = guard(PAGE_OFF, PAGE_SIZE);
        poison.fill(0xdb);
        let src = poison.as_ptr();
        for i in 0..pages {
            if bits & (1u64 << i) == 0 {
                continue;
            }
            for _ in 0..COPY_TRIES {
                // The run follows a REMAP of its mapping, and a discard ends it (`apply`).
                if self.win.inflight_state().load(Ordering::Acquire) == shm::INFLIGHT_NONE {
                    return;
                }
                let addr = self.win.inflight_run().load(Ordering::Acquire) & page_mask;
                if addr == 0 {
                    return;
                }
                let a = addr + u64::from(i) * PAGE_SIZE as u64;
                match self.copy_once(a, src) {
                    libc::EAGAIN => continue,
                    0 => {
                        // SAFETY: mprotect of one page of the program's own anonymous memory,
                        // whose content is gone; the raw syscall (no interposer involved).
                        unsafe { libc::syscall(libc::SYS_mprotect, a, PAGE_SIZE, libc::PROT_NONE) };
                        if t.lost == 0 {
                            t.first_lost = a;
                        }
                        t.lost += 1;
                    }
                    _ => {}
                }
                break;
            }
        }
        self.win
            .inflight_state()
            .store(shm::INFLIGHT_NONE, Ordering::Release);
    }

    fn count(&self, t: &mut Tally, errno: i32) {
        match errno {
            0 => t.restored += 1,
            libc::EEXIST => t.present += 1,
            libc::ENOENT => t.unmapped += 1,
            _ => t.corrupt += 1,
        }
    }

    /// After the rescue: a mapping the unregistering scan missed (one the program moved while
    /// /proc/self/maps was read) may still be registered. Its events are read here, so no
    /// munmap/mremap of the program ever blocks, and any message makes the scan run again,
    /// which also wakes a thread faulting there (nothing of it is evicted any more).
    fn watch_forever(&mut self) -> ! {
        loop {
            let mut pfd = libc::pollfd {
                fd: self.uffd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polling one pollfd on our stack.
            let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
            if rc > 0 && pfd.revents & libc::POLLIN != 0 {
                self.drain_events(0);
                self.unregister_all();
            } else if rc > 0 {
                // The descriptor is gone (closed by the program): nothing more can reach us.
                loop {
                    // SAFETY: pause has no preconditions; the thread sleeps until the process
                    // exits (every signal is blocked here).
                    unsafe { libc::pause() };
                }
            }
        }
    }

    /// Unregisters every mapping of the program (and the agent's staging) from the forwarded
    /// descriptor; that wakes every thread waiting on a fault there. Errors (a mapping that
    /// was not registered, or cannot be) are ignored. Then wakes every thread still waiting on
    /// any fault of this descriptor: one whose message was read (by the monitor before it died,
    /// or by us) in a mapping the scan missed (moved by the program while /proc/self/maps was
    /// read) faults again, and its new message brings us back here (`watch_forever`).
    fn unregister_all(&mut self) {
        // As the agent does for registering: no interposed mmap/munmap/mremap may change a
        // mapping between our read of its bounds and the unregistering (a mapping grown in
        // place meanwhile would be split into an unregistered and a registered part, and the
        // program's next mremap of it would fail with EFAULT). Calls already in progress may
        // wait for their events, which we read meanwhile.
        SHIM.reg_busy.store(true, Ordering::SeqCst);
        while SHIM.remaps_inflight.load(Ordering::SeqCst) != 0 {
            self.drain_events(1);
        }
        let uffd = self.uffd;
        let buf = guard(MAPS_OFF, MAPS_LEN);
        maps::for_each_mapping(buf, |m| {
            let mut range = sys::UffdioRange {
                start: m.start,
                len: m.end - m.start,
            };
            // SAFETY: UFFDIO_UNREGISTER reads one range; on a mapping not registered with this
            // descriptor it fails and changes nothing.
            unsafe { libc::ioctl(uffd, sys::UFFDIO_UNREGISTER as _, &mut range) };
        });
        wake_all(uffd);
        SHIM.reg_busy.store(false, Ordering::SeqCst);
    }
}

/// Wakes every thread waiting on a fault of `uffd` (they fault again, and whoever reads the
/// descriptor now serves them): the guardian consumed their messages without serving them.
fn wake_all(uffd: i32) {
    // A start below vm.mmap_min_addr is refused (EINVAL): try higher ones.
    for start in [WAKE_START, 1 << 20, 1 << 24] {
        let mut all = sys::UffdioRange {
            start,
            len: WAKE_END - start,
        };
        // SAFETY: UFFDIO_WAKE reads one range and wakes the descriptor's waiters in it; it
        // changes no memory.
        if unsafe { libc::ioctl(uffd, sys::UFFDIO_WAKE as _, &mut all) } == 0 {
            break;
        }
    }
}

/// Formats `v` in decimal into `buf`; returns the digits.
pub(crate) fn fmt_u64(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return &buf[i..];
        }
    }
}
