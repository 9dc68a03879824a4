//! The shared memory window between the monitor and the shim's agent.
//!
//! The monitor creates a memfd of [`window_len_bytes`] and sends it with `HelloAck`; both map
//! it shared. Layout (all offsets in bytes, little-endian, naturally aligned):
//!
//! | offset                  | what                                                        |
//! |-------------------------|-------------------------------------------------------------|
//! | 0 .. 4096               | `Control` header: sequence numbers, epoch, agent reports    |
//! | 4096 × (1 + i)          | batch descriptor `i` of the ring (`RING_LEN` of them)        |
//! | `JOURNAL_OFF`           | event journal: the monitor's last read of the userfaultfd    |
//! | `DATA_OFF` + 4096 × k   | page slot `k`: the bytes of one evicted page                 |
//! | after the last slot     | slot record `k` (8 bytes each, padded to a page): 0, or the  |
//! |                         | program address of the page slot `k` holds                   |
//!
//! Slot records let the shim bring the window's pages home itself if the monitor dies (see
//! [`super::store_layout`] for the store's pages). The agent writes a slot's record after
//! copying a page into the slot and before marking it moved; the monitor rewrites it when the
//! program moves the page (REMAP) and when it completes the batch, and zeroes it only when the
//! slot is freed, that is after the page is safe elsewhere (compressed into the store, copied
//! back into the program) or was discarded by the program.
//!
//! Request ring (single producer: the monitor's policy; single consumer: the agent):
//! the monitor fills descriptor `post_seq % RING_LEN`, stores `post_seq + 1` (release) and
//! writes the request eventfd. The agent processes descriptors from `done_seq` up to
//! `post_seq`; for each run it issues one UFFDIO_MOVE into staging, copies the moved pages into
//! the run's slots, writes one result byte per page, then stores `done_seq + 1` (release) and
//! writes the done eventfd. The monitor never posts more than `RING_LEN` descriptors ahead.
//!
//! Address-space changes. The agent issues its moves on the forwarded descriptor, with staging
//! registered there too, so a move fails with EAGAIN while a REMOVE/UNMAP/REMAP event of the
//! program is queued and unread (the kernel's `mmap_changing`). What remains is the moment after
//! the monitor's fault thread has read such an event. The fault thread therefore
//! 1. increments `read_begin` before every read(2) of the descriptor;
//! 2. for every REMOVE/UNMAP/REMAP it read, appends `(seq, start, end)` to the event log and
//!    sets `epoch = seq`;
//! 3. sets `read_end = read_begin`.
//!
//! Before a run the agent waits until `read_end == read_begin` (no read in progress), then
//! cancels the run (result [`RESULT_CANCELLED`]) if a logged event since the batch's epoch
//! overlaps it; an event log that overflowed counts as overlapping. Pages moved anyway around
//! a REMOVE/UNMAP need nothing from the agent: the monitor applies every event it reads to the
//! page words before it processes completions, so a result for a page whose word was reset
//! meanwhile is stale and dropped, and a REMAP carries the word (and the result) to the new
//! address. (An earlier design had the agent drop such pages itself; it was redundant and, on a
//! torn read of the log, lost a page no event had touched.)
//!
//! Event journal. An event the monitor has read from the program's descriptor is gone from
//! the kernel; until the monitor has applied it to the records (a REMAP moves records, a
//! REMOVE/UNMAP drops them), the records alone are wrong, and a monitor killed in between
//! left the shim's guardian to bring pages home to the old address of a moved range (zeros at
//! the new one) or old bytes into a discarded one. So the fault thread reads the descriptor
//! straight into the journal: it zeroes the journal's messages, sets `applied = 0` and
//! `state = APPLYING`, calls read(2) with the journal as its buffer (the kernel writes the
//! messages into this shared page before the call returns, so a SIGKILL cannot fall between
//! the read and the journal), stores `applied = i + 1` after each message `i` is fully
//! applied, and sets `state = IDLE` at the end of the round. The guardian, taking over,
//! applies the messages from `applied` on (a message whose event byte is 0 ends them). The
//! message at `applied` may be half done: a REMAP there moves what is still at its source and
//! keeps what is already at its destination. It also takes the destination of every REMAP of
//! the journal, and the monitor's unconfirmed REMAP destinations (`dests`, see
//! `monitor/arrivals.rs`), as ranges where an UNMAP may be stale.
//!
//! Trust: each side treats the other's writes as untrusted bytes. The monitor clamps
//! `done_seq`, maps unknown result bytes to [`RESULT_FAILED`] and validates the reported RSS;
//! the agent validates run addresses against slot bounds. Non-atomic fields are accessed with
//! volatile reads and writes, atomic ones through `AtomicU64`/`AtomicU32` views.
//!
//! Owns: the layout and its accessors. Must not: make syscalls, allocate.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub const SHM_MAGIC: u64 = 0x5553_5741_5057_494e; // "USWAPWIN"
pub const SHM_VERSION: u32 = 4;
pub const SLOT_BYTES: usize = 4096;
/// Batch descriptors in the ring.
pub const RING_LEN: usize = 8;
/// Runs per batch descriptor.
pub const MAX_RUNS: usize = 128;
/// Pages per batch descriptor.
pub const MAX_BATCH_PAGES: usize = 1024;
pub const DESC_BYTES: usize = 4096;
/// The event journal page (see the module doc).
pub const JOURNAL_OFF: usize = 4096 * (1 + RING_LEN);
pub const DATA_OFF: usize = 4096 * (2 + RING_LEN);
/// Messages the journal holds: the most the fault thread reads at once.
pub const JOURNAL_MSGS: usize = 64;
/// Unconfirmed REMAP destinations the journal holds; past this `dests_len` says how many there
/// were, and the guardian treats every UNMAP as possibly stale.
pub const JOURNAL_DESTS: usize = 32;
/// Journal states: no read is being applied.
pub const JOURNAL_IDLE: u64 = 0;
/// The messages of the journal were (or are being) read and may not all be applied.
pub const JOURNAL_APPLYING: u64 = 1;

// Per-page results written by the agent.
pub const RESULT_PENDING: u8 = 0;
/// The page was moved out; its bytes are in the slot.
pub const RESULT_MOVED: u8 = 1;
/// Nothing was mapped there (never touched, or discarded): nothing to keep.
pub const RESULT_HOLE: u8 = 2;
/// EBUSY: pinned, or shared copy-on-write after fork. It stays resident.
pub const RESULT_BUSY: u8 = 3;
/// Any other refusal (protection mismatch, VMA gone...). It stays where it was.
pub const RESULT_FAILED: u8 = 4;
/// Skipped: the range changed (REMOVE/UNMAP/REMAP) since the batch was posted.
pub const RESULT_CANCELLED: u8 = 5;
/// Reserved: no longer produced (see the module doc); a monitor treats it as a failure.
pub const RESULT_DISCARDED: u8 = 6;

/// `inflight_state`: no run in flight.
pub const INFLIGHT_NONE: u64 = 0;
/// The run is being moved out: which of its pages left the program is not known yet.
pub const INFLIGHT_MOVING: u64 = 1;
/// The run was moved out; `inflight_moved` says which pages left; their copies are being made.
pub const INFLIGHT_MOVED: u64 = 2;
/// Most pages of one in-flight run (one bit each in `inflight_moved`).
pub const INFLIGHT_MAX_PAGES: u32 = 64;

/// Entries in the event log.
pub const EVENT_LOG_LEN: usize = 128;

// Bits of a batch descriptor's `flags` (monitor → agent).
/// After the batch, make each page it found busy (EBUSY) the program's own again with a write
/// fault that changes nothing (`MADV_POPULATE_WRITE`): a page the program shared copy-on-write
/// with a child that has exited stays marked shared until the program writes it, and cannot be
/// moved until then. Set only while the program has no live forked child (the fault would
/// copy a page still shared, not reclaim one). A pinned page stays busy.
pub const DESC_UNSHARE: u32 = 1;

// Bits of `requests` (monitor → agent).
/// Re-read /proc/self/maps and send a `Regions` snapshot.
pub const REQ_RESCAN: u32 = 1;
/// Refresh `rss_anon_bytes`.
pub const REQ_RSS: u32 = 2;
/// Stop: the agent exits its loop (the monitor is detaching).
pub const REQ_SHUTDOWN: u32 = 4;
/// Register every managed VMA with the forwarded descriptor from now on (at each scan, with
/// the exact bounds just read, so a program mapping is never split by a stale range: a split
/// mapping makes the program's own mremap of it fail with EFAULT).
pub const REQ_REGISTER: u32 = 8;
/// Unregister every managed VMA (the monitor is detaching; all pages are home).
pub const REQ_UNREGISTER: u32 = 16;

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_SLOTS: usize = 12;
const OFF_EPOCH: usize = 16;
const OFF_POST_SEQ: usize = 24;
const OFF_DONE_SEQ: usize = 32;
const OFF_RSS: usize = 40;
const OFF_RSS_SEQ: usize = 48;
const OFF_REQUESTS: usize = 56;
const OFF_AGENT_NS: usize = 64;
const OFF_AGENT_MOVED: usize = 72;
const OFF_READ_BEGIN: usize = 80;
const OFF_READ_END: usize = 88;
const OFF_AGENT_DISCARDED: usize = 96;
const OFF_STAGING: usize = 104;
const OFF_RESCUE_AFTER_MS: usize = 112;
const OFF_INFLIGHT_RUN: usize = 120;
const OFF_INFLIGHT_MOVED: usize = 128;
const OFF_INFLIGHT_STATE: usize = 136;
const OFF_AGENT_UNSHARED: usize = 144;
const OFF_RSS_DONE_SEQ: usize = 152;
const OFF_EVENT_LOG: usize = 512;
const _: () = assert!(OFF_EVENT_LOG + EVENT_LOG_LEN * 24 <= 4096);
const J_STATE: usize = JOURNAL_OFF;
const J_APPLIED: usize = JOURNAL_OFF + 8;
const J_DESTS_LEN: usize = JOURNAL_OFF + 16;
const J_DESTS: usize = JOURNAL_OFF + 64;
const J_MSGS: usize = JOURNAL_OFF + 1024;
const _: () = assert!(J_DESTS + JOURNAL_DESTS * 16 <= J_MSGS);
const _: () = assert!(J_MSGS + JOURNAL_MSGS * 32 <= JOURNAL_OFF + 4096);

const D_SEQ: usize = 0;
const D_EPOCH: usize = 8;
const D_NRUNS: usize = 16;
const D_NPAGES: usize = 20;
const D_AGENT_NS: usize = 24;
const D_FLAGS: usize = 32;
const D_RUNS: usize = 64;
const D_RESULTS: usize = D_RUNS + MAX_RUNS * 16;
const _: () = assert!(D_RESULTS + MAX_BATCH_PAGES <= DESC_BYTES);

/// Slot records per page of the record area.
const RECORDS_PER_PAGE: usize = SLOT_BYTES / 8;

/// Bytes of a window holding `slots` page slots (and their records).
pub const fn window_len_bytes(slots: usize) -> usize {
    DATA_OFF + (slots + slots.div_ceil(RECORDS_PER_PAGE)) * SLOT_BYTES
}

/// Page slots in a window of `len` bytes: the most whose slots and records fit.
pub const fn slots_in(len: usize) -> usize {
    if len < DATA_OFF {
        0
    } else {
        let pages = (len - DATA_OFF) / SLOT_BYTES;
        pages - pages.div_ceil(RECORDS_PER_PAGE + 1)
    }
}

/// One contiguous run of a batch: `pages` pages from `addr`, into slots `first_slot..`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub addr: u64,
    pub pages: u32,
    pub first_slot: u32,
}

/// A view of a mapped window. Copyable handle; the mapping is owned elsewhere.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    base: *mut u8,
    len: usize,
}

// SAFETY: the window is shared memory accessed only through atomics and volatile operations;
// the raw pointer is valid for as long as the owner keeps the mapping.
unsafe impl Send for Window {}
// SAFETY: as above.
unsafe impl Sync for Window {}

impl Window {
    /// # Safety
    /// `base` must point to a shared mapping of at least `len` bytes that stays mapped for as
    /// long as this `Window` (or a copy) is used, and `len >= DATA_OFF`.
    pub unsafe fn new(base: *mut u8, len: usize) -> Window {
        assert!(len >= DATA_OFF && (base as usize) % 4096 == 0);
        Window { base, len }
    }

    pub fn base(&self) -> *mut u8 {
        self.base
    }

    pub fn len_bytes(&self) -> usize {
        self.len
    }

    pub fn slots(&self) -> usize {
        slots_in(self.len)
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        assert!(off + 8 <= self.len && off % 8 == 0);
        // SAFETY: in bounds and aligned (checked above); the mapping outlives `self`; an
        // AtomicU64 has the layout of a u64 and all bit patterns are valid.
        unsafe { &*(self.base.add(off) as *const AtomicU64) }
    }

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        assert!(off + 4 <= self.len && off % 4 == 0);
        // SAFETY: as in `u64_at`.
        unsafe { &*(self.base.add(off) as *const AtomicU32) }
    }

    /// Written once by the monitor before sending the window.
    pub fn init(&self) {
        self.u64_at(OFF_MAGIC).store(SHM_MAGIC, Ordering::Relaxed);
        self.u32_at(OFF_VERSION)
            .store(SHM_VERSION, Ordering::Relaxed);
        self.u32_at(OFF_SLOTS)
            .store(self.slots() as u32, Ordering::Relaxed);
    }

    /// Checked by the agent before use.
    pub fn is_valid(&self) -> bool {
        self.u64_at(OFF_MAGIC).load(Ordering::Relaxed) == SHM_MAGIC
            && self.u32_at(OFF_VERSION).load(Ordering::Relaxed) == SHM_VERSION
            && self.u32_at(OFF_SLOTS).load(Ordering::Relaxed) as usize == self.slots()
    }

    pub fn epoch(&self) -> &AtomicU64 {
        self.u64_at(OFF_EPOCH)
    }
    pub fn post_seq(&self) -> &AtomicU64 {
        self.u64_at(OFF_POST_SEQ)
    }
    pub fn done_seq(&self) -> &AtomicU64 {
        self.u64_at(OFF_DONE_SEQ)
    }
    pub fn rss_anon_bytes(&self) -> &AtomicU64 {
        self.u64_at(OFF_RSS)
    }
    pub fn rss_seq(&self) -> &AtomicU64 {
        self.u64_at(OFF_RSS_SEQ)
    }
    /// The agent's `done_seq` when it read the RssAnon in `rss_anon_bytes`: the batches
    /// answered before that read. The monitor counts exactly those batches' moves as already
    /// out of the sample.
    pub fn rss_done_seq(&self) -> &AtomicU64 {
        self.u64_at(OFF_RSS_DONE_SEQ)
    }

    /// Agent side: publishes an RssAnon sample of `rss_bytes`, read after the batches below
    /// `done_seq` were answered. `rss_seq` is a sequence lock: odd while the two fields are
    /// written, so a reader never pairs one sample's figure with another's `done_seq`.
    pub fn publish_rss(&self, rss_bytes: u64, done_seq: u64) {
        self.rss_seq().fetch_add(1, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        self.rss_done_seq().store(done_seq, Ordering::Relaxed);
        self.rss_anon_bytes().store(rss_bytes, Ordering::Relaxed);
        self.rss_seq().fetch_add(1, Ordering::Release);
    }

    /// Monitor side: the last complete sample as (its `rss_seq`, RssAnon bytes, `done_seq`
    /// at the read); `None` while one is being written (or the writer's sequence is odd for
    /// good: an agent that stopped half way publishes nothing more).
    pub fn read_rss(&self) -> Option<(u64, u64, u64)> {
        let seq = self.rss_seq().load(Ordering::Acquire);
        if seq % 2 == 1 {
            return None;
        }
        let rss_bytes = self.rss_anon_bytes().load(Ordering::Relaxed);
        let done_seq = self.rss_done_seq().load(Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Acquire);
        (self.rss_seq().load(Ordering::Relaxed) == seq).then_some((seq, rss_bytes, done_seq))
    }
    pub fn requests(&self) -> &AtomicU32 {
        self.u32_at(OFF_REQUESTS)
    }
    /// Total nanoseconds the agent spent in batches (for CPU accounting).
    pub fn agent_busy_ns(&self) -> &AtomicU64 {
        self.u64_at(OFF_AGENT_NS)
    }
    pub fn agent_moved_pages(&self) -> &AtomicU64 {
        self.u64_at(OFF_AGENT_MOVED)
    }
    pub fn agent_discarded_pages(&self) -> &AtomicU64 {
        self.u64_at(OFF_AGENT_DISCARDED)
    }
    /// Busy pages the agent made the program's own again ([`DESC_UNSHARE`]).
    pub fn agent_unshared_pages(&self) -> &AtomicU64 {
        self.u64_at(OFF_AGENT_UNSHARED)
    }
    /// Address of the agent's staging area (registered with the forwarded descriptor for the
    /// program's lifetime), written by the agent when it starts; 0 until then. The monitor uses
    /// it only as a probe target ([`crate::uffd::Uffd::probe`]); a wrong value only makes
    /// probes inconclusive.
    pub fn staging_addr(&self) -> &AtomicU64 {
        self.u64_at(OFF_STAGING)
    }
    pub fn read_begin(&self) -> &AtomicU64 {
        self.u64_at(OFF_READ_BEGIN)
    }
    pub fn read_end(&self) -> &AtomicU64 {
        self.u64_at(OFF_READ_END)
    }

    /// Monitor side: logs an address-space change and publishes it as the new epoch.
    /// `discard` marks a REMOVE or UNMAP (the range's bytes are gone); a REMAP (the bytes moved
    /// elsewhere) is logged with `discard == false`.
    pub fn log_event(&self, start: u64, end: u64, discard: bool) {
        let seq = self.epoch().load(Ordering::Relaxed) + 1;
        let o = OFF_EVENT_LOG + (seq as usize % EVENT_LOG_LEN) * 24;
        // A sequence lock per entry: invalid (0) while its fields are rewritten, so a reader
        // never takes the range of one event for another (which once dropped a page that no
        // event had touched).
        self.u64_at(o).store(0, Ordering::SeqCst);
        // Starts are page aligned: bit 0 carries the kind.
        self.u64_at(o + 8)
            .store((start & !1) | discard as u64, Ordering::Relaxed);
        self.u64_at(o + 16).store(end, Ordering::Relaxed);
        self.u64_at(o).store(seq, Ordering::SeqCst);
        self.epoch().store(seq, Ordering::SeqCst);
    }

    /// Agent side: whether an event logged after `since` (up to the current epoch) overlaps
    /// `[start, end)`. `None` when the log no longer holds them all.
    pub fn events_overlap(&self, since: u64, start: u64, end: u64) -> Option<bool> {
        self.events_overlap_kind(since, start, end, false)
    }

    /// As [`Window::events_overlap`], counting only discards (REMOVE/UNMAP) when
    /// `discards_only`.
    pub fn events_overlap_kind(
        &self,
        since: u64,
        start: u64,
        end: u64,
        discards_only: bool,
    ) -> Option<bool> {
        let now = self.epoch().load(Ordering::Acquire);
        if now <= since {
            return Some(false);
        }
        if now - since >= EVENT_LOG_LEN as u64 {
            return None;
        }
        for seq in since + 1..=now {
            let o = OFF_EVENT_LOG + (seq as usize % EVENT_LOG_LEN) * 24;
            if self.u64_at(o).load(Ordering::SeqCst) != seq {
                return None; // overwritten meanwhile
            }
            let (s, e) = (
                self.u64_at(o + 8).load(Ordering::Relaxed),
                self.u64_at(o + 16).load(Ordering::Relaxed),
            );
            std::sync::atomic::fence(Ordering::Acquire);
            if self.u64_at(o).load(Ordering::SeqCst) != seq {
                return None; // rewritten while we read it: the fields may be torn
            }
            let discard = s & 1 == 1;
            let s = s & !1;
            if s < end && start < e && (discard || !discards_only) {
                return Some(true);
            }
        }
        if self.epoch().load(Ordering::Acquire) - since >= EVENT_LOG_LEN as u64 {
            return None;
        }
        Some(false)
    }

    /// Address of page slot `slot` in this mapping.
    /// Slot `slot`'s record: 0, or the address of the page it holds (see the module doc).
    pub fn slot_record(&self, slot: usize) -> &AtomicU64 {
        assert!(slot < self.slots());
        self.u64_at(DATA_OFF + self.slots() * SLOT_BYTES + slot * 8)
    }

    /// How long the shim waits for a monitor to come back before it brings every page home
    /// itself, in milliseconds (written by the monitor at `init`).
    pub fn rescue_after_ms(&self) -> &AtomicU64 {
        self.u64_at(OFF_RESCUE_AFTER_MS)
    }

    /// Cross-mm: the run the monitor is moving out right now, as `addr | pages` (at most
    /// [`INFLIGHT_MAX_PAGES`] pages), valid while [`Window::inflight_state`] is not
    /// [`INFLIGHT_NONE`]. Its pages live only in the monitor until their durable copies exist;
    /// if the monitor dies meanwhile, the shim makes any of them it cannot bring home
    /// inaccessible rather than let them read as zeros.
    pub fn inflight_run(&self) -> &AtomicU64 {
        self.u64_at(OFF_INFLIGHT_RUN)
    }

    /// Cross-mm: bit `i` set = page `i` of the in-flight run was moved out (valid in state
    /// [`INFLIGHT_MOVED`]).
    pub fn inflight_moved(&self) -> &AtomicU64 {
        self.u64_at(OFF_INFLIGHT_MOVED)
    }

    pub fn inflight_state(&self) -> &AtomicU64 {
        self.u64_at(OFF_INFLIGHT_STATE)
    }

    /// Journal state: [`JOURNAL_IDLE`] or [`JOURNAL_APPLYING`].
    pub fn journal_state(&self) -> &AtomicU64 {
        self.u64_at(J_STATE)
    }

    /// Journal messages fully applied by the monitor.
    pub fn journal_applied(&self) -> &AtomicU64 {
        self.u64_at(J_APPLIED)
    }

    /// Monitor side, before a read into the journal: zeroes its messages (so the kernel's
    /// messages are told from leftovers by their non-zero event byte), then says a read is
    /// being applied.
    pub fn journal_begin(&self) {
        for i in 0..JOURNAL_MSGS * 4 {
            self.u64_at(J_MSGS + i * 8).store(0, Ordering::Relaxed);
        }
        self.journal_applied().store(0, Ordering::Relaxed);
        self.journal_state()
            .store(JOURNAL_APPLYING, Ordering::SeqCst);
    }

    /// Where the kernel writes the messages of a journalled read: `JOURNAL_MSGS` × 32 bytes.
    pub fn journal_msgs_ptr(&self) -> *mut u8 {
        // SAFETY: `new` checked `len >= DATA_OFF`, which is past the journal page.
        unsafe { self.base.add(J_MSGS) }
    }

    /// Message `i` of the journal, as four little-endian words.
    pub fn journal_msg(&self, i: usize) -> [u64; 4] {
        assert!(i < JOURNAL_MSGS);
        let o = J_MSGS + i * 32;
        [0, 8, 16, 24].map(|w| self.u64_at(o + w).load(Ordering::Acquire))
    }

    /// Monitor side: publishes the unconfirmed REMAP destinations (all of them, or their
    /// count alone when there are more than [`JOURNAL_DESTS`]).
    pub fn journal_set_dests(&self, dests: &[(u64, u64)]) {
        self.u64_at(J_DESTS_LEN).store(0, Ordering::SeqCst);
        for (i, &(s, e)) in dests.iter().take(JOURNAL_DESTS).enumerate() {
            self.u64_at(J_DESTS + i * 16).store(s, Ordering::Relaxed);
            self.u64_at(J_DESTS + i * 16 + 8)
                .store(e, Ordering::Relaxed);
        }
        self.u64_at(J_DESTS_LEN)
            .store(dests.len() as u64, Ordering::SeqCst);
    }

    /// Guardian side: the published destinations' count, and destination `i` (for
    /// `i < min(count, JOURNAL_DESTS)`).
    pub fn journal_dests_len(&self) -> u64 {
        self.u64_at(J_DESTS_LEN).load(Ordering::SeqCst)
    }

    pub fn journal_dest(&self, i: usize) -> (u64, u64) {
        assert!(i < JOURNAL_DESTS);
        (
            self.u64_at(J_DESTS + i * 16).load(Ordering::Relaxed),
            self.u64_at(J_DESTS + i * 16 + 8).load(Ordering::Relaxed),
        )
    }

    pub fn slot_ptr(&self, slot: usize) -> *mut u8 {
        assert!(slot < self.slots());
        // SAFETY: slot < slots(), so the slot lies inside the mapping.
        unsafe { self.base.add(DATA_OFF + slot * SLOT_BYTES) }
    }

    pub fn desc(&self, seq: u64) -> Desc<'_> {
        let idx = (seq % RING_LEN as u64) as usize;
        Desc {
            w: self,
            off: 4096 * (1 + idx),
        }
    }
}

/// A batch descriptor in the ring.
pub struct Desc<'a> {
    w: &'a Window,
    off: usize,
}

impl Desc<'_> {
    fn rd64(&self, off: usize) -> u64 {
        self.w.u64_at(self.off + off).load(Ordering::Relaxed)
    }
    fn wr64(&self, off: usize, v: u64) {
        self.w.u64_at(self.off + off).store(v, Ordering::Relaxed)
    }
    fn rd32(&self, off: usize) -> u32 {
        self.w.u32_at(self.off + off).load(Ordering::Relaxed)
    }
    fn wr32(&self, off: usize, v: u32) {
        self.w.u32_at(self.off + off).store(v, Ordering::Relaxed)
    }

    pub fn seq(&self) -> u64 {
        self.rd64(D_SEQ)
    }
    pub fn epoch(&self) -> u64 {
        self.rd64(D_EPOCH)
    }
    pub fn nruns(&self) -> usize {
        (self.rd32(D_NRUNS) as usize).min(MAX_RUNS)
    }
    pub fn npages(&self) -> usize {
        (self.rd32(D_NPAGES) as usize).min(MAX_BATCH_PAGES)
    }
    pub fn agent_ns(&self) -> u64 {
        self.rd64(D_AGENT_NS)
    }
    /// `DESC_*` bits.
    pub fn flags(&self) -> u32 {
        self.rd32(D_FLAGS)
    }
    pub fn set_agent_ns(&self, ns: u64) {
        self.wr64(D_AGENT_NS, ns)
    }

    pub fn run(&self, i: usize) -> Run {
        assert!(i < MAX_RUNS);
        let o = D_RUNS + i * 16;
        Run {
            addr: self.rd64(o),
            pages: self.rd32(o + 8),
            first_slot: self.rd32(o + 12),
        }
    }

    /// Monitor side: writes a whole batch (runs must total at most MAX_BATCH_PAGES pages) with
    /// its `DESC_*` flags.
    pub fn write(&self, seq: u64, epoch: u64, runs: &[Run], flags: u32) {
        assert!(runs.len() <= MAX_RUNS);
        let mut pages = 0usize;
        for (i, r) in runs.iter().enumerate() {
            let o = D_RUNS + i * 16;
            self.wr64(o, r.addr);
            self.wr32(o + 8, r.pages);
            self.wr32(o + 12, r.first_slot);
            pages += r.pages as usize;
        }
        assert!(pages <= MAX_BATCH_PAGES);
        for p in 0..pages {
            self.set_result(p, RESULT_PENDING);
        }
        self.wr64(D_SEQ, seq);
        self.wr64(D_EPOCH, epoch);
        self.wr32(D_NRUNS, runs.len() as u32);
        self.wr32(D_NPAGES, pages as u32);
        self.wr64(D_AGENT_NS, 0);
        self.wr32(D_FLAGS, flags);
    }

    /// Result of the `page_idx`-th page of the batch (runs in order).
    pub fn result(&self, page_idx: usize) -> u8 {
        assert!(page_idx < MAX_BATCH_PAGES);
        // SAFETY: in bounds of the descriptor; a volatile byte read of shared memory.
        unsafe { std::ptr::read_volatile(self.w.base.add(self.off + D_RESULTS + page_idx)) }
    }

    pub fn set_result(&self, page_idx: usize, r: u8) {
        assert!(page_idx < MAX_BATCH_PAGES);
        // SAFETY: in bounds of the descriptor; a volatile byte write of shared memory.
        unsafe { std::ptr::write_volatile(self.w.base.add(self.off + D_RESULTS + page_idx), r) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_and_records_fit_exactly() {
        for slots in (1..3000).chain([8192, 8193, 1 << 20]) {
            assert_eq!(slots_in(window_len_bytes(slots)), slots, "{slots} slots");
            // One byte short of the next page loses nothing; a page short loses a slot.
            assert_eq!(slots_in(window_len_bytes(slots) + SLOT_BYTES - 1), slots);
            assert!(slots_in(window_len_bytes(slots) - SLOT_BYTES) < slots);
        }
    }

    #[test]
    fn layout_roundtrip_in_plain_memory() {
        let len = window_len_bytes(16);
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: non-zero size; freed below.
        let base = unsafe { std::alloc::alloc_zeroed(layout) };
        // SAFETY: `base` is `len` bytes, page aligned, freed after the last use.
        let w = unsafe { Window::new(base, len) };
        w.init();
        assert!(w.is_valid());
        assert_eq!(w.slots(), 16);
        let runs = [
            Run {
                addr: 0x1000,
                pages: 3,
                first_slot: 0,
            },
            Run {
                addr: 0x9000,
                pages: 2,
                first_slot: 3,
            },
        ];
        w.desc(9).write(9, 4, &runs, DESC_UNSHARE);
        let d = w.desc(9);
        assert_eq!((d.seq(), d.epoch(), d.nruns(), d.npages()), (9, 4, 2, 5));
        assert_eq!(d.flags(), DESC_UNSHARE);
        assert_eq!(d.run(1), runs[1]);
        d.set_result(4, RESULT_BUSY);
        assert_eq!(d.result(4), RESULT_BUSY);
        assert_eq!(d.result(0), RESULT_PENDING);
        assert_eq!(w.slot_ptr(1) as usize - w.slot_ptr(0) as usize, SLOT_BYTES);
        w.log_event(0x1000, 0x3000, true);
        w.log_event(0x8000, 0x9000, false);
        assert_eq!(w.events_overlap_kind(0, 0x8000, 0x8001, true), Some(false));
        assert_eq!(w.events_overlap_kind(0, 0x8000, 0x8001, false), Some(true));
        assert_eq!(w.events_overlap_kind(0, 0x2000, 0x2001, true), Some(true));
        assert_eq!(w.events_overlap(0, 0x2000, 0x2001), Some(true));
        assert_eq!(w.events_overlap(1, 0x2000, 0x2001), Some(false));
        assert_eq!(w.events_overlap(2, 0x0, u64::MAX), Some(false));
        for _ in 0..EVENT_LOG_LEN {
            w.log_event(0, 1, true);
        }
        assert_eq!(w.events_overlap(0, 0x2000, 0x2001), None);
        // RSS samples: none at first (sequence 0, even: an empty sample), then each publish
        // is read whole with its done_seq; a writer stopped half way (odd) yields nothing.
        assert_eq!(w.read_rss(), Some((0, 0, 0)));
        w.publish_rss(123 << 12, 7);
        assert_eq!(w.read_rss(), Some((2, 123 << 12, 7)));
        w.rss_seq().fetch_add(1, Ordering::Relaxed);
        assert_eq!(w.read_rss(), None);
        // SAFETY: allocated above with the same layout.
        unsafe { std::alloc::dealloc(base, layout) };
    }
}
