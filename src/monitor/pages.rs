//! The per-page state machine of one client: where each page's last bytes are.
//!
//! Every page the monitor has ever acted on has one 64-bit word (pages never touched by the
//! monitor have none and read as `Absent`). The words live in 512-page chunks keyed by address,
//! allocated on first use, so a huge sparse region costs nothing until pages in it are evicted.
//!
//! | bits 63..61 | state    | bits 60..0                                                   |
//! |-------------|----------|--------------------------------------------------------------|
//! | 0           | Absent   | bit 0: hot; bits 60..1: hot since (ms, monitor clock)         |
//! | 1           | Moving   | generation (bits 60..24) and window slot (bits 23..0)         |
//! | 2           | Window   | generation and window slot, as Moving                         |
//! | 3           | Stored   | the store [`Handle`] (61 bits)                                |
//!
//! - `Absent`: the kernel has the page (resident) or nothing (hole); a fault means fresh memory
//!   and is served with zeros. A hot `Absent` page was refaulted after a trial eviction.
//! - `Moving`: posted to the agent in batch `generation`, destined for `slot`. Its bytes are in
//!   the program, in staging, or in the slot; a fault on it waits for the batch to complete.
//! - `Window`: its bytes are in window `slot`, cooling; a fault copies them back from the slot.
//! - `Stored`: compressed in the store; a fault decompresses and copies it back.
//!
//! The generation is the batch sequence number: a batch completion or a compression result is
//! applied only if the word still holds the generation and slot it was issued for. Anything that
//! happened meanwhile (a REMOVE or UNMAP reset the word, a REMAP moved it) makes a stale result
//! harmless: its slot or blob is freed and the word is left alone. Each slot remembers the
//! address of the page it belongs to, so a REMAP that moves a `Moving`/`Window` page is followed.
//!
//! Owns: the words, the window slot table and the FIFO of cooling pages, the order in which
//! pages were stored (disk tier only: the coldest stored pages are the oldest there), and (stock backend)
//! keeping the window's durable slot records in step with them: a record is rewritten when its
//! page moves or its batch completes, and zeroed when its slot is freed (see
//! [`crate::protocol::shm`]). Must not: issue syscalls or touch the window's page bytes
//! (callers copy); all calls are made under the client's lock.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use std::sync::atomic::Ordering;

use crate::protocol::shm::Window;
use crate::store::Handle;
use crate::PAGE_SIZE;

const PAGE_BYTES: u64 = PAGE_SIZE as u64;
/// Pages per chunk of words.
pub const CHUNK_PAGES: usize = 512;
/// Address span of one chunk.
pub const CHUNK_BYTES: u64 = CHUNK_PAGES as u64 * PAGE_BYTES;

const TAG_SHIFT: u32 = 61;
const TAG_ABSENT: u64 = 0;
const TAG_MOVING: u64 = 1;
const TAG_WINDOW: u64 = 2;
const TAG_STORED: u64 = 3;
const PAYLOAD_MASK: u64 = (1 << TAG_SHIFT) - 1;
const SLOT_BITS: u32 = 24;
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;
/// Generations are compared modulo 2^37.
pub const GEN_MASK: u64 = (1 << (TAG_SHIFT - SLOT_BITS)) - 1;
/// Most window slots a client may have.
pub const MAX_SLOTS: usize = 1 << SLOT_BITS;

/// A decoded page word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    Absent { hot_since_ms: Option<u64> },
    Moving { gen: u64, slot: u32 },
    Window { gen: u64, slot: u32 },
    Stored(Handle),
}

impl PageState {
    fn encode(self) -> u64 {
        match self {
            PageState::Absent { hot_since_ms: None } => 0,
            PageState::Absent {
                hot_since_ms: Some(ms),
            } => ((ms << 1) | 1) & PAYLOAD_MASK,
            PageState::Moving { gen, slot } => {
                (TAG_MOVING << TAG_SHIFT) | ((gen & GEN_MASK) << SLOT_BITS) | slot as u64
            }
            PageState::Window { gen, slot } => {
                (TAG_WINDOW << TAG_SHIFT) | ((gen & GEN_MASK) << SLOT_BITS) | slot as u64
            }
            PageState::Stored(h) => {
                let bits = h.to_bits();
                debug_assert_eq!(bits & !PAYLOAD_MASK, 0, "store handles fit in 61 bits");
                (TAG_STORED << TAG_SHIFT) | (bits & PAYLOAD_MASK)
            }
        }
    }

    fn decode(w: u64) -> PageState {
        let payload = w & PAYLOAD_MASK;
        match w >> TAG_SHIFT {
            TAG_ABSENT if payload & 1 == 1 => PageState::Absent {
                hot_since_ms: Some(payload >> 1),
            },
            TAG_ABSENT => PageState::Absent { hot_since_ms: None },
            TAG_MOVING => PageState::Moving {
                gen: payload >> SLOT_BITS,
                slot: (payload & SLOT_MASK) as u32,
            },
            TAG_WINDOW => PageState::Window {
                gen: payload >> SLOT_BITS,
                slot: (payload & SLOT_MASK) as u32,
            },
            TAG_STORED => PageState::Stored(Handle::from_bits(payload)),
            _ => unreachable!("tags 4..7 are never written: encode() produces only 0..=3"),
        }
    }

    /// Whether the page's bytes are with the monitor (a fault must be served from them).
    pub fn is_evicted(&self) -> bool {
        !matches!(self, PageState::Absent { .. })
    }
}

/// Where the durable slot records are kept in step: the shared window (stock backend, read by
/// the shim's guardian) or the monitor's own array (cross-mm, read by the arena keeper).
#[derive(Debug)]
enum SlotRecords {
    Window(Window),
    Private(std::sync::Arc<[std::sync::atomic::AtomicU64]>),
}

/// One window slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    /// Address of the page it belongs to (follows REMAP).
    addr: u64,
    gen: u64,
    in_use: bool,
    /// Cross-mm backend: the page's durable copy in the store, made as soon as it entered the
    /// window (the arena is the monitor's private memory, lost if the monitor dies). Freed
    /// with the slot, unless the page becomes `Stored` with it.
    shadow: Option<Handle>,
}

/// Something the owner must release after a page left the monitor's care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    Nothing,
    /// The store blob of a page that was discarded or faulted in.
    Blob(Handle),
}

/// How a fault on a page must be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPlan {
    /// Fresh memory: zeros, for up to `pages` pages from the fault (a run of `Absent` pages).
    Zero { pages: u64 },
    /// Copy from window slot `slot`.
    FromWindow { slot: u32 },
    /// Decompress from the store.
    FromStore(Handle),
    /// The page is being moved by the agent: wait for batch `gen`.
    Wait { gen: u64 },
}

/// Counts kept by the page map.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageCounts {
    pub moving: u64,
    pub window: u64,
    pub stored: u64,
}

/// The page words, window slots and cooling FIFO of one client.
#[derive(Debug)]
pub struct Pages {
    chunks: BTreeMap<u64, Box<[u64; CHUNK_PAGES]>>,
    slots: Vec<Slot>,
    /// Free slots, ordered: allocation prefers the slot after the previous one, so a run of
    /// pages gets contiguous slots and the agent moves it with one ioctl.
    free_slots: BTreeSet<u32>,
    /// Per slot: whether it may hold memory (taken since it was last given back by a window
    /// trim; a fresh window counts as holding memory everywhere).
    slot_resident: Vec<bool>,
    /// Free slots that may hold memory.
    free_resident: u32,
    /// Pages that entered the window: (slot, gen, entered_ms), oldest first. Entries whose slot
    /// has since been reused or freed are skipped when popped.
    cooling: VecDeque<(u32, u64, u64)>,
    counts: PageCounts,
    /// The window whose slot records mirror the slot table (stock backend); `None` when the
    /// slots are not in shared memory (cross-mm arena, tests).
    records: Option<SlotRecords>,
    /// Addresses of refaults (a touched page brought back from the window or the store) since
    /// the control thread last took them, for per-region statistics; at most
    /// [`MAX_REFAULT_LOG`], further ones only counted.
    refault_log: Vec<u64>,
    refaults_dropped: u64,
    /// Disk tier: pages in the order they became `Stored` (address, handle), oldest first;
    /// entries whose page has since changed are skipped when popped. `None` without one.
    stored_order: Option<VecDeque<(u64, Handle)>>,
    /// Disk tier: blobs moved since their stored-order entry was made (compaction,
    /// recompression), (address, old handle) → new handle; followed when an entry is popped,
    /// folded into the order when it grows (so a move costs O(1), not a pass over the order).
    stored_renames: HashMap<(u64, Handle), Handle>,
}

/// Entries of `stored_order` beyond twice the stored pages (plus this) make it drop its stale
/// ones.
const STORED_ORDER_SLACK: usize = 4096;

/// Refault addresses kept between two policy ticks.
pub const MAX_REFAULT_LOG: usize = 1 << 16;

fn chunk_of(addr: u64) -> (u64, usize) {
    (
        addr & !(CHUNK_BYTES - 1),
        ((addr % CHUNK_BYTES) / PAGE_BYTES) as usize,
    )
}

impl Pages {
    pub fn new(slot_count: usize) -> Pages {
        assert!(slot_count <= MAX_SLOTS);
        Pages {
            chunks: BTreeMap::new(),
            slots: vec![
                Slot {
                    addr: 0,
                    gen: 0,
                    in_use: false,
                    shadow: None,
                };
                slot_count
            ],
            free_slots: (0..slot_count as u32).collect(),
            // Unknown at first (an adopted window may hold pages): the first trim looks at all.
            slot_resident: vec![true; slot_count],
            free_resident: slot_count as u32,
            cooling: VecDeque::new(),
            counts: PageCounts::default(),
            records: None,
            refault_log: Vec::new(),
            refaults_dropped: 0,
            stored_order: None,
            stored_renames: HashMap::new(),
        }
    }

    /// Whether the stored order is kept (disk tier).
    pub fn tracks_stored_order(&self) -> bool {
        self.stored_order.is_some()
    }

    /// Disk tier: remembers from now on the order in which pages are stored (see
    /// [`Pages::pop_coldest_stored`]).
    pub fn track_stored_order(&mut self) {
        if self.stored_order.is_none() {
            self.stored_order = Some(
                self.evicted_pages()
                    .into_iter()
                    .filter_map(|(a, s)| match s {
                        PageState::Stored(h) => Some((a, h)),
                        _ => None,
                    })
                    .collect(),
            );
        }
    }

    /// Disk tier: up to `max` stored pages, coldest first: stored longest ago and neither
    /// brought back nor moved since (a page that was is stored again at the back). Each is
    /// taken off the order; [`Pages::unpop_stored`] puts back those not used.
    pub fn pop_coldest_stored(&mut self, max: usize, out: &mut Vec<(u64, Handle)>) {
        let stored = self.counts.stored as usize;
        let Some(mut q) = self.stored_order.take() else {
            return;
        };
        if q.len() > 2 * stored + STORED_ORDER_SLACK {
            self.fold_renames(&mut q);
        }
        while out.len() < max {
            let Some((a, h)) = q.pop_front() else { break };
            if let Some(h) = self.resolve_stored(a, h) {
                out.push((a, h));
            }
        }
        self.stored_order = Some(q);
    }

    /// Puts pages taken by [`Pages::pop_coldest_stored`] back at the front, in their order.
    pub fn unpop_stored(&mut self, pages: &[(u64, Handle)]) {
        if let Some(q) = &mut self.stored_order {
            for p in pages.iter().rev() {
                q.push_front(*p);
            }
        }
    }

    /// Disk tier: the page at `addr`, stored as `old`, is stored as `new` now (its blob moved
    /// to the disk file). Returns false, changing nothing, if the page is not `Stored(old)`.
    pub fn demoted(&mut self, addr: u64, old: Handle, new: Handle) -> bool {
        if self.state(addr) != PageState::Stored(old) {
            return false;
        }
        self.set_noting(addr, PageState::Stored(new), false);
        true
    }

    /// Store compaction and recompression: each page `addr` stored as `old` is stored as
    /// `new` now (its blob moved to another slot). A page no longer `Stored(old)` is left
    /// alone; returns how many were updated. The stored order (disk tier) keeps each renamed
    /// page's place.
    pub fn rehandled(&mut self, moves: &[(u64, Handle, Handle)]) -> usize {
        let mut n = 0;
        for &(addr, old, new) in moves {
            if self.state(addr) == PageState::Stored(old) {
                self.set_noting(addr, PageState::Stored(new), false);
                if self.stored_order.is_some() {
                    self.stored_renames.insert((addr, old), new);
                }
                n += 1;
            }
        }
        if let Some(mut q) = self.stored_order.take() {
            if self.stored_renames.len() > q.len() / 4 + STORED_ORDER_SLACK {
                self.fold_renames(&mut q);
            }
            self.stored_order = Some(q);
        }
        n
    }

    /// The handle a stored-order entry's page is stored under now, following its renames;
    /// `None` if it is no longer stored as that entry (or any blob moved from it).
    fn resolve_stored(&mut self, addr: u64, mut h: Handle) -> Option<Handle> {
        loop {
            if self.state(addr) == PageState::Stored(h) {
                return Some(h);
            }
            h = self.stored_renames.remove(&(addr, h))?;
        }
    }

    /// Renames every entry of the stored order to its current handle, drops the entries of
    /// pages no longer stored, and forgets the renames. O(stored order).
    fn fold_renames(&mut self, q: &mut VecDeque<(u64, Handle)>) {
        q.retain_mut(|e| match self.resolve_stored(e.0, e.1) {
            Some(h) => {
                e.1 = h;
                true
            }
            None => false,
        });
        self.stored_renames.clear();
    }

    /// Keeps `win`'s slot records in step with the slot table from now on.
    pub fn set_slot_records(&mut self, win: Window) {
        assert_eq!(win.slots(), self.slots.len());
        self.records = Some(SlotRecords::Window(win));
    }

    /// Cross-mm: keeps `records` (the monitor's own, one per slot, read by the arena keeper
    /// if the monitor dies; see [`super::keeper`]) in step with the slot table from now on.
    pub fn set_private_slot_records(
        &mut self,
        records: std::sync::Arc<[std::sync::atomic::AtomicU64]>,
    ) {
        assert_eq!(records.len(), self.slots.len());
        self.records = Some(SlotRecords::Private(records));
    }

    fn record(&self, slot: u32) -> u64 {
        match &self.records {
            Some(SlotRecords::Window(w)) => w.slot_record(slot as usize).load(Ordering::Acquire),
            Some(SlotRecords::Private(r)) => r[slot as usize].load(Ordering::Acquire),
            None => 0,
        }
    }

    fn set_record(&self, slot: u32, addr: u64) {
        match &self.records {
            Some(SlotRecords::Window(w)) => {
                w.slot_record(slot as usize).store(addr, Ordering::Release)
            }
            Some(SlotRecords::Private(r)) => r[slot as usize].store(addr, Ordering::Release),
            None => {}
        }
    }

    pub fn counts(&self) -> PageCounts {
        self.counts
    }

    pub fn free_slot_count(&self) -> usize {
        self.free_slots.len()
    }

    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Window trim: the free slots that may hold memory beyond the `reserve` lowest of them
    /// (slots are taken lowest first, so those are reused first), as runs of contiguous slots,
    /// highest first, at most `max_slots` slots in all; empty when fewer than `min` slots
    /// would go. The caller gives each run's memory back, then calls [`Pages::trimmed`].
    pub fn trimmable_runs(
        &self,
        reserve: u32,
        min: u32,
        max_slots: u32,
    ) -> Vec<std::ops::Range<u32>> {
        let excess = self.free_resident.saturating_sub(reserve).min(max_slots);
        let mut runs: Vec<std::ops::Range<u32>> = Vec::new();
        if excess < min.max(1) {
            return runs;
        }
        let mut left = excess;
        for &slot in self.free_slots.iter().rev() {
            if left == 0 {
                break;
            }
            if !self.slot_resident[slot as usize] {
                continue;
            }
            left -= 1;
            match runs.last_mut() {
                Some(r) if r.start == slot + 1 => r.start = slot,
                _ => runs.push(slot..slot + 1),
            }
        }
        runs
    }

    /// The free slots in `run` hold no memory now (see [`Pages::trimmable_runs`]).
    pub fn trimmed(&mut self, run: std::ops::Range<u32>) {
        for slot in run {
            let i = slot as usize;
            if self.slot_resident[i] && !self.slots[i].in_use {
                self.slot_resident[i] = false;
                self.free_resident -= 1;
            }
        }
    }

    /// Free window slots that may hold memory.
    pub fn free_resident_slots(&self) -> u32 {
        self.free_resident
    }

    /// Bytes of page-map metadata (chunk words, and the stored order of a disk tier).
    pub fn metadata_bytes(&self) -> u64 {
        let order = self
            .stored_order
            .as_ref()
            .map_or(0, |q| q.capacity() * std::mem::size_of::<(u64, Handle)>())
            + self.stored_renames.capacity() * std::mem::size_of::<((u64, Handle), Handle)>();
        (self.chunks.len() * (CHUNK_PAGES * 8 + 48) + order) as u64
    }

    /// The words of the chunk starting at `base` (a multiple of [`CHUNK_BYTES`]), if any.
    pub fn chunk_words(&self, base: u64) -> Option<&[u64; CHUNK_PAGES]> {
        self.chunks.get(&base).map(|b| &**b)
    }

    /// Decodes a word from [`Pages::chunk_words`].
    pub fn decode_word(w: u64) -> PageState {
        PageState::decode(w)
    }

    pub fn state(&self, addr: u64) -> PageState {
        let (base, idx) = chunk_of(addr);
        match self.chunks.get(&base) {
            Some(c) => PageState::decode(c[idx]),
            None => PageState::Absent { hot_since_ms: None },
        }
    }

    fn set(&mut self, addr: u64, s: PageState) {
        self.set_noting(addr, s, true);
    }

    /// Sets a word; with `note`, a page becoming `Stored` joins the back of the stored order.
    fn set_noting(&mut self, addr: u64, s: PageState, note: bool) {
        if let (Some(q), PageState::Stored(h), true) = (&mut self.stored_order, s, note) {
            q.push_back((addr, h));
        }
        let old = self.state(addr);
        self.count(old, -1);
        self.count(s, 1);
        let (base, idx) = chunk_of(addr);
        let w = s.encode();
        if w == 0 {
            if let Some(c) = self.chunks.get_mut(&base) {
                c[idx] = 0;
                if c.iter().all(|w| *w == 0) {
                    self.chunks.remove(&base);
                }
            }
            return;
        }
        self.chunks
            .entry(base)
            .or_insert_with(|| Box::new([0; CHUNK_PAGES]))[idx] = w;
    }

    fn count(&mut self, s: PageState, d: i64) {
        let c = match s {
            PageState::Moving { .. } => &mut self.counts.moving,
            PageState::Window { .. } => &mut self.counts.window,
            PageState::Stored(_) => &mut self.counts.stored,
            PageState::Absent { .. } => return,
        };
        *c = c.wrapping_add_signed(d);
    }

    fn take_slot(&mut self, addr: u64, gen: u64) -> Option<u32> {
        // Continue the previous page's run of slots when the next slot is free.
        let prev = addr.checked_sub(PAGE_BYTES).map(|a| self.state(a));
        let s = match prev {
            Some(PageState::Moving { slot, .. }) if self.free_slots.contains(&(slot + 1)) => {
                slot + 1
            }
            _ => *self.free_slots.first()?,
        };
        self.free_slots.remove(&s);
        if std::mem::replace(&mut self.slot_resident[s as usize], true) {
            self.free_resident -= 1;
        }
        self.slots[s as usize] = Slot {
            addr,
            gen: gen & GEN_MASK,
            in_use: true,
            shadow: None,
        };
        Some(s)
    }

    /// Frees a slot; returns its shadow, which the caller must release.
    #[must_use]
    fn free_slot(&mut self, slot: u32) -> Option<Handle> {
        let s = &mut self.slots[slot as usize];
        if s.in_use {
            s.in_use = false;
            let shadow = s.shadow.take();
            self.free_slots.insert(slot);
            self.free_resident += 1;
            self.set_record(slot, 0);
            shadow
        } else {
            None
        }
    }

    /// Frees a slot that cannot have a shadow (its page never entered the window).
    fn free_unshadowed_slot(&mut self, slot: u32) {
        let shadow = self.free_slot(slot);
        debug_assert!(shadow.is_none(), "a slot outside the window has no shadow");
    }

    /// Cross-mm: `h` is the durable copy of the page that entered the window in `slot` with
    /// batch `gen`. Returns `h` back if the page left the window meanwhile (or has a copy).
    pub fn set_shadow(&mut self, slot: u32, gen: u64, h: Handle) -> Result<(), Handle> {
        let Some(addr) = self.slot_owner(slot, gen) else {
            return Err(h);
        };
        let here = PageState::Window {
            gen: gen & GEN_MASK,
            slot,
        };
        let s = &mut self.slots[slot as usize];
        if s.shadow.is_some() || self.state(addr) != here {
            return Err(h);
        }
        self.slots[slot as usize].shadow = Some(h);
        Ok(())
    }

    /// Cross-mm: a cooled page with a shadow becomes `Stored` with it (no compression).
    /// Returns false if it has none (or is no longer in the window).
    pub fn commit_shadow(&mut self, slot: u32, gen: u64) -> bool {
        let Some(addr) = self.slot_owner(slot, gen) else {
            return false;
        };
        if self.state(addr)
            != (PageState::Window {
                gen: gen & GEN_MASK,
                slot,
            })
        {
            return false;
        }
        let Some(h) = self.slots[slot as usize].shadow.take() else {
            return false;
        };
        self.set(addr, PageState::Stored(h));
        self.free_unshadowed_slot(slot);
        true
    }

    /// Policy: marks `addr` as posted in batch `gen`. Returns its slot, or `None` if the page
    /// is not a candidate (not `Absent`) or the window is full.
    pub fn begin_evict(&mut self, addr: u64, gen: u64) -> Option<u32> {
        if !matches!(self.state(addr), PageState::Absent { .. }) {
            return None;
        }
        let slot = self.take_slot(addr, gen)?;
        self.set(
            addr,
            PageState::Moving {
                gen: gen & GEN_MASK,
                slot,
            },
        );
        Some(slot)
    }

    /// Address the page in `slot` belongs to now, if the slot is in use for batch `gen`.
    pub fn slot_owner(&self, slot: u32, gen: u64) -> Option<u64> {
        let s = self.slots.get(slot as usize)?;
        (s.in_use && s.gen == gen & GEN_MASK).then_some(s.addr)
    }

    /// Agent finished the page of batch `gen` in `slot`: `moved` says whether its bytes are
    /// now in the slot. Returns whether the page entered the window.
    pub fn complete(&mut self, slot: u32, gen: u64, moved: bool, now_ms: u64, busy: bool) -> bool {
        let Some(addr) = self.slot_owner(slot, gen) else {
            return false;
        };
        let current = PageState::Moving {
            gen: gen & GEN_MASK,
            slot,
        };
        if self.state(addr) != current {
            // Stale: the page was removed or unmapped meanwhile; its bytes are not wanted.
            self.free_unshadowed_slot(slot);
            return false;
        }
        if moved {
            // The agent wrote the address it moved the page from; the page may have moved on.
            self.set_record(slot, addr);
            self.set(
                addr,
                PageState::Window {
                    gen: gen & GEN_MASK,
                    slot,
                },
            );
            self.cooling.push_back((slot, gen & GEN_MASK, now_ms));
            true
        } else {
            // Nothing there, or refused: the kernel keeps it. A busy page is skipped by the
            // clock hand for a while, like a hot one.
            self.set(
                addr,
                PageState::Absent {
                    hot_since_ms: busy.then_some(now_ms),
                },
            );
            self.free_unshadowed_slot(slot);
            false
        }
    }

    /// A slot whose page was found stale by other means (batch outcome unknown).
    pub fn release_slot_if(&mut self, slot: u32, gen: u64) {
        if self.slot_owner(slot, gen).is_some() {
            let addr = self.slots[slot as usize].addr;
            if self.state(addr)
                == (PageState::Moving {
                    gen: gen & GEN_MASK,
                    slot,
                })
            {
                self.set(addr, PageState::Absent { hot_since_ms: None });
            }
            self.free_unshadowed_slot(slot);
        }
    }

    /// How to serve a fault at `addr`; `fill_ahead_pages` bounds a zero run, `region_end`
    /// bounds everything.
    pub fn plan_fault(&self, addr: u64, fill_ahead_pages: u64, region_end: u64) -> FaultPlan {
        match self.state(addr) {
            PageState::Absent { .. } => {
                let mut pages = 1;
                while pages < fill_ahead_pages.max(1) {
                    let next = addr + pages * PAGE_BYTES;
                    if next >= region_end || self.state(next).is_evicted() {
                        break;
                    }
                    pages += 1;
                }
                FaultPlan::Zero { pages }
            }
            PageState::Moving { gen, .. } => FaultPlan::Wait { gen },
            PageState::Window { slot, .. } => FaultPlan::FromWindow { slot },
            PageState::Stored(h) => FaultPlan::FromStore(h),
        }
    }

    /// The page at `addr` is back in the program (COPY succeeded): it is hot now. Returns the
    /// blob to free.
    pub fn faulted_in(&mut self, addr: u64, now_ms: u64) -> Released {
        self.bring_back(addr, Some(now_ms))
    }

    /// The page at `addr` is back in the program; `hot_since_ms` is `None` for a page brought
    /// back without being touched (prefetch). Returns the blob to free. A touched page that
    /// was in the window or the store is a refault and is logged ([`Self::take_refaults`]).
    pub fn brought_back(&mut self, addr: u64, hot_since_ms: Option<u64>) -> Released {
        if hot_since_ms.is_some()
            && matches!(
                self.state(addr),
                PageState::Window { .. } | PageState::Stored(_)
            )
        {
            if self.refault_log.len() < MAX_REFAULT_LOG {
                self.refault_log.push(addr);
            } else {
                self.refaults_dropped += 1;
            }
        }
        self.bring_back(addr, hot_since_ms)
    }

    /// The refault addresses logged since the last call, and how many more were not kept.
    pub fn take_refaults(&mut self) -> (Vec<u64>, u64) {
        (
            std::mem::take(&mut self.refault_log),
            std::mem::take(&mut self.refaults_dropped),
        )
    }

    fn bring_back(&mut self, addr: u64, hot_since_ms: Option<u64>) -> Released {
        let old = self.state(addr);
        self.set(addr, PageState::Absent { hot_since_ms });
        match old {
            PageState::Window { slot, .. } => match self.free_slot(slot) {
                Some(shadow) => Released::Blob(shadow),
                None => Released::Nothing,
            },
            PageState::Stored(h) => Released::Blob(h),
            _ => Released::Nothing,
        }
    }

    /// REMOVE or UNMAP of `[start, end)`: the program discarded the memory; whatever the monitor
    /// holds for it is dropped. Calls `release` for each blob.
    pub fn discard_range(&mut self, start: u64, end: u64, mut release: impl FnMut(Handle)) {
        let start = start & !(PAGE_BYTES - 1);
        let bases: Vec<u64> = self
            .chunks
            .range(start & !(CHUNK_BYTES - 1)..end)
            .map(|(b, _)| *b)
            .collect();
        for base in bases {
            let lo = base.max(start);
            let hi = (base + CHUNK_BYTES).min(end);
            let mut a = lo;
            while a < hi {
                match self.state(a) {
                    PageState::Absent { hot_since_ms: None } => {}
                    PageState::Absent { .. } => {
                        self.set(a, PageState::Absent { hot_since_ms: None })
                    }
                    PageState::Moving { slot, .. } => {
                        // The agent's result for it will find the word changed and be dropped;
                        // the slot stays taken until then. Its durable record (the agent may
                        // have written it already) goes now: a monitor killed before that
                        // result would otherwise leave the guardian a record of the page the
                        // program just discarded, and it would bring the old bytes back.
                        self.set(a, PageState::Absent { hot_since_ms: None });
                        self.set_record(slot, 0);
                    }
                    PageState::Window { slot, .. } => {
                        self.set(a, PageState::Absent { hot_since_ms: None });
                        if let Some(shadow) = self.free_slot(slot) {
                            release(shadow);
                        }
                    }
                    PageState::Stored(h) => {
                        self.set(a, PageState::Absent { hot_since_ms: None });
                        release(h);
                    }
                }
                a += PAGE_BYTES;
            }
        }
    }

    /// REMAP: the pages of `[from, from+len)` now live at `to`. Words move with them; slots
    /// follow. Whatever the monitor held for the destination range is dropped first (the kernel
    /// unmapped it). Calls `moved` for each stored page with its new address, so its durable
    /// record can follow.
    pub fn remap(
        &mut self,
        from: u64,
        to: u64,
        len: u64,
        mut release: impl FnMut(Handle),
        mut moved_stored: impl FnMut(Handle, u64),
    ) {
        let mut moved = Vec::new();
        let bases: Vec<u64> = self
            .chunks
            .range(from & !(CHUNK_BYTES - 1)..from + len)
            .map(|(b, _)| *b)
            .collect();
        for base in bases {
            let lo = base.max(from);
            let hi = (base + CHUNK_BYTES).min(from + len);
            let mut a = lo;
            while a < hi {
                let s = self.state(a);
                if s != (PageState::Absent { hot_since_ms: None }) {
                    moved.push((a - from, s));
                    self.set(a, PageState::Absent { hot_since_ms: None });
                }
                a += PAGE_BYTES;
            }
        }
        self.discard_range(to, to + len, &mut release);
        for (off, s) in moved {
            let dst = to + off;
            if let PageState::Moving { slot, .. } | PageState::Window { slot, .. } = s {
                self.slots[slot as usize].addr = dst;
                // A batch page whose record the agent wrote already: the record follows too
                // (the program's interposed mremap waits for the batch, so a record written
                // for this page is written by now).
                if matches!(s, PageState::Moving { .. }) && self.record(slot) != 0 {
                    self.set_record(slot, dst);
                }
                if matches!(s, PageState::Window { .. }) {
                    self.set_record(slot, dst);
                    if let Some(shadow) = self.slots[slot as usize].shadow {
                        moved_stored(shadow, dst);
                    }
                }
            }
            if let PageState::Stored(h) = s {
                moved_stored(h, dst);
            }
            self.set(dst, s);
        }
    }

    /// The store replaced handle `old` of the page at `addr` with `new` (a shared page the
    /// program moved got a copy of its own): the word, or the slot's shadow, follows.
    pub fn rehandle(&mut self, addr: u64, old: Handle, new: Handle) {
        match self.state(addr) {
            PageState::Stored(h) if h == old => self.set(addr, PageState::Stored(new)),
            PageState::Moving { slot, .. } | PageState::Window { slot, .. }
                if self.slots[slot as usize].shadow == Some(old) =>
            {
                self.slots[slot as usize].shadow = Some(new)
            }
            s => debug_assert!(false, "rehandle: {addr:#x} holds {s:?}, not {old:?}"),
        }
    }

    /// Pops the cooling FIFO: pages that entered the window at or before `cooled_before_ms`, or
    /// the oldest ones while fewer than `min_free` slots are free. Returns (addr, slot, gen).
    pub fn pop_cooled(
        &mut self,
        cooled_before_ms: u64,
        min_free: usize,
        max: usize,
        out: &mut Vec<(u64, u32, u64)>,
    ) {
        let mut pressure = min_free.saturating_sub(self.free_slots.len());
        while out.len() < max {
            let Some(&(slot, gen, entered_ms)) = self.cooling.front() else {
                break;
            };
            let live = self
                .slot_owner(slot, gen)
                .filter(|a| self.state(*a) == (PageState::Window { gen, slot }));
            let Some(addr) = live else {
                self.cooling.pop_front();
                continue;
            };
            if entered_ms > cooled_before_ms && pressure == 0 {
                break;
            }
            pressure = pressure.saturating_sub(1);
            self.cooling.pop_front();
            out.push((addr, slot, gen));
        }
    }

    /// A cooled page was compressed into `h`: if it is still in the window under the same
    /// generation, it becomes `Stored` and its slot is freed; otherwise `h` is returned to be
    /// freed (the page was faulted in or discarded meanwhile).
    pub fn commit_stored(&mut self, slot: u32, gen: u64, h: Handle) -> Result<(), Handle> {
        let Some(addr) = self.slot_owner(slot, gen) else {
            return Err(h);
        };
        if self.state(addr)
            != (PageState::Window {
                gen: gen & GEN_MASK,
                slot,
            })
        {
            return Err(h);
        }
        self.set(addr, PageState::Stored(h));
        if let Some(shadow) = self.free_slot(slot) {
            // Not made by this path (commit_shadow is used when a shadow exists); the blob
            // just stored supersedes it.
            return Err(shadow);
        }
        Ok(())
    }

    /// A cooled page could not be stored (quota): it stays in the window, back of the FIFO.
    pub fn requeue(&mut self, slot: u32, gen: u64, now_ms: u64) {
        self.cooling.push_back((slot, gen & GEN_MASK, now_ms));
    }

    /// A cooled page could not be stored yet, but room is being made (the disk tier): it stays
    /// in the window at the front of the FIFO, still cooled, to be stored first next time.
    pub fn requeue_cooled(&mut self, slot: u32, gen: u64) {
        self.cooling.push_front((slot, gen & GEN_MASK, 0));
    }

    /// Clears a hot mark (the clock hand's second chance).
    pub fn clear_hot(&mut self, addr: u64) {
        if let PageState::Absent {
            hot_since_ms: Some(_),
        } = self.state(addr)
        {
            self.set(addr, PageState::Absent { hot_since_ms: None });
        }
    }

    /// First address in `[from, end)` that has a word (anything but plain Absent), or `end`.
    pub fn next_with_word(&self, from: u64, end: u64) -> u64 {
        for (base, c) in self.chunks.range(from & !(CHUNK_BYTES - 1)..end) {
            let lo = (*base).max(from);
            let first = ((lo - base) / PAGE_BYTES) as usize;
            if let Some(i) = c[first..].iter().position(|w| *w != 0) {
                return (base + ((first + i) as u64) * PAGE_BYTES).min(end);
            }
        }
        end
    }

    /// A page inherited at a fork: `addr` (which must be `Absent`) is stored as `h`.
    /// Returns `false`, changing nothing, if the monitor already has a word for it.
    pub fn adopt_stored(&mut self, addr: u64, h: Handle) -> bool {
        if self.state(addr).is_evicted() {
            return false;
        }
        self.set(addr, PageState::Stored(h));
        true
    }

    /// Every store handle the page map holds: stored pages and (cross-mm) window shadows.
    pub fn store_handles(&self) -> Vec<Handle> {
        let mut v: Vec<Handle> = self
            .evicted_pages()
            .into_iter()
            .filter_map(|(_, s)| match s {
                PageState::Stored(h) => Some(h),
                _ => None,
            })
            .collect();
        v.extend(
            self.slots
                .iter()
                .filter(|s| s.in_use)
                .filter_map(|s| s.shadow),
        );
        v
    }

    /// Every evicted page, in address order (for bringing everything home).
    pub fn evicted_pages(&self) -> Vec<(u64, PageState)> {
        let mut v = Vec::new();
        for (base, c) in &self.chunks {
            for (i, w) in c.iter().enumerate() {
                let s = PageState::decode(*w);
                if s.is_evicted() {
                    v.push((base + i as u64 * PAGE_BYTES, s));
                }
            }
        }
        v
    }
}

#[cfg(test)]
mod tests;
