//! The page state machine against a reference model: a simulated program memory, agent,
//! window and store, under random interleavings of writes, reads, eviction posts, agent moves,
//! batch completions, cooling, REMOVE and REMAP. After every step every page must read back the
//! last value the program wrote (or zero after a discard).

use std::collections::HashMap;

use proptest::prelude::*;

use super::*;
use crate::store::{Demotion, DiskConfig, Store, StoreConfig};

const BASE: u64 = 0x10_0000;
const PAGES: u64 = 24;
const SLOTS: usize = 16;

fn addr(p: u64) -> u64 {
    BASE + p * PAGE_BYTES
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u64),
    Read(u64),
    Post(u64, u64),
    AgentMove(usize),
    Complete(usize),
    Cool,
    Remove(u64, u64),
    Remap(u64, u64, u64),
    /// Disk tier: the coldest `n` stored pages start moving to disk (payload copied).
    DemoteBegin(usize),
    /// Disk tier: the writes of every demotion under way complete, and they are committed.
    DemoteCommit,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..PAGES, 1..1000u64).prop_map(|(p, v)| Op::Write(p, v)),
        3 => (0..PAGES).prop_map(Op::Read),
        3 => (0..PAGES, 1..8u64).prop_map(|(p, n)| Op::Post(p, n)),
        3 => (0..4usize).prop_map(Op::AgentMove),
        3 => (0..4usize).prop_map(Op::Complete),
        1 => Just(Op::Cool),
        1 => (0..PAGES, 1..4u64).prop_map(|(p, n)| Op::Remove(p, n)),
        1 => (0..PAGES, 0..PAGES, 1..4u64).prop_map(|(a, b, n)| Op::Remap(a, b, n)),
    ]
}

/// [`op`] and the disk tier's demotion steps.
fn disk_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => op(),
        2 => (1..6usize).prop_map(Op::DemoteBegin),
        1 => Just(Op::DemoteCommit),
    ]
}

struct Batch {
    gen: u64,
    pages: Vec<(u64, u32)>,
    /// Per page: Some(moved) once the agent ran.
    results: Option<Vec<bool>>,
    /// Events logged after the batch was posted, for the agent's overlap check.
    epoch: usize,
}

struct Sim {
    pages: Pages,
    store: Store,
    /// Program memory: Some(value) = resident, None = missing (pte none).
    mem: HashMap<u64, Option<u64>>,
    reference: HashMap<u64, u64>,
    window: Vec<u64>,
    batches: Vec<Batch>,
    events: Vec<(u64, u64)>,
    next_gen: u64,
    now_ms: u64,
    /// Disk tier: its directory, the demotions under way and their payloads.
    disk_dir: Option<tempfile::TempDir>,
    demoting: Vec<Demotion>,
    demote_buf: Vec<u8>,
}

fn page_of(v: u64) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    for c in p.chunks_exact_mut(8) {
        c.copy_from_slice(&v.to_le_bytes());
    }
    p[0] = (v % 251) as u8; // not same-filled: exercises lz4/raw too
    p
}

fn value_of(p: &[u8; PAGE_SIZE]) -> u64 {
    u64::from_le_bytes(p[8..16].try_into().unwrap())
}

impl Sim {
    fn new() -> Sim {
        Sim::with_disk(false)
    }

    fn with_disk(disk: bool) -> Sim {
        let mut mem = HashMap::new();
        for p in 0..PAGES {
            mem.insert(addr(p), None);
        }
        let disk_dir = disk.then(|| tempfile::tempdir().unwrap());
        let mut pages = Pages::new(SLOTS);
        if disk {
            pages.track_stored_order();
        }
        Sim {
            pages,
            store: Store::try_new(StoreConfig {
                durable: true,
                max_bytes: None,
                disk: disk_dir.as_ref().map(|d| DiskConfig {
                    dir: d.path().to_path_buf(),
                    max_bytes: None,
                }),
            })
            .unwrap(),
            mem,
            reference: HashMap::new(),
            window: vec![0; SLOTS],
            batches: Vec::new(),
            events: Vec::new(),
            next_gen: 1,
            now_ms: 0,
            disk_dir,
            demoting: Vec::new(),
            demote_buf: Vec::new(),
        }
    }

    /// The monitor dies now: every page the program misses must be named by a record of the
    /// store file (read as the shim's guardian reads it, disk pages with `pread`) with the
    /// bytes the program last wrote, unless it is in the window or in flight (their copies
    /// are elsewhere). A missing page with no record must read as zeros. One record per page.
    fn check_records(&self) {
        use std::os::fd::AsRawFd;
        let file = self.store.file().expect("durable");
        let len = file.metadata().unwrap().len() as usize;
        // SAFETY: a new read-write shared mapping of the store file, unmapped below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let mut found: HashMap<u64, u64> = HashMap::new();
        {
            // SAFETY: the mapping above, `len` bytes; the store is not written meanwhile.
            let view = unsafe { crate::protocol::store_layout::StoreView::new(base.cast(), len) }
                .expect("valid header");
            view.for_each_page(|p| {
                let mut out = [0u8; PAGE_SIZE];
                let payload = match p.disk_off {
                    Some(off) => {
                        let mut b = vec![0u8; p.len_bytes];
                        let disk = self.store.disk_file().expect("a disk chunk has a file");
                        std::os::unix::fs::FileExt::read_exact_at(disk, &mut b, off).unwrap();
                        b
                    }
                    None => p.payload.to_vec(),
                };
                assert!(
                    crate::store::OwnedPageDecoder::new().decode_payload(p.raw, &payload, &mut out)
                );
                assert!(
                    found.insert(p.addr, value_of(&out)).is_none(),
                    "two records for {:#x}",
                    p.addr
                );
            });
        }
        // SAFETY: unmapping the mapping made above; the view is gone.
        unsafe { libc::munmap(base, len) };
        for p in 0..PAGES {
            let a = addr(p);
            if self.mem[&a].is_some() {
                continue; // present: a stale record would lose to it (EEXIST)
            }
            match self.pages.state(a) {
                PageState::Window { .. } | PageState::Moving { .. } => continue,
                _ => {}
            }
            let want = self.reference.get(&a).copied().unwrap_or(0);
            assert_eq!(
                found.get(&a).copied().unwrap_or(0),
                want,
                "page {p} as a rescue would bring it home"
            );
        }
    }

    /// The monitor serves a fault at `a` (the program's page is missing).
    fn fault(&mut self, a: u64) {
        loop {
            match self.pages.plan_fault(a, 4, BASE + PAGES * PAGE_BYTES) {
                FaultPlan::Zero { pages } => {
                    for i in 0..pages {
                        let x = a + i * PAGE_BYTES;
                        match self.mem.get(&x) {
                            Some(None) => {
                                self.mem.insert(x, Some(0));
                            }
                            _ => break, // EEXIST: the zero run stops at a present page
                        }
                    }
                    return;
                }
                FaultPlan::FromWindow { slot } => {
                    self.mem.insert(a, Some(self.window[slot as usize]));
                    assert_eq!(self.pages.faulted_in(a, self.now_ms), Released::Nothing);
                    return;
                }
                FaultPlan::FromStore(h) => {
                    let mut out = [0u8; PAGE_SIZE];
                    self.store.get(h, &mut out).unwrap();
                    self.mem.insert(a, Some(value_of(&out)));
                    match self.pages.faulted_in(a, self.now_ms) {
                        Released::Blob(b) => self.store.remove(b),
                        Released::Nothing => panic!("stored page released no blob"),
                    }
                    return;
                }
                FaultPlan::Wait { gen } => {
                    let i = self
                        .batches
                        .iter()
                        .position(|b| b.gen & GEN_MASK == gen)
                        .expect("waiting on a batch that exists");
                    self.agent_move(i);
                    self.complete(i);
                }
            }
        }
    }

    fn access(&mut self, p: u64) -> u64 {
        let a = addr(p);
        if self.mem[&a].is_none() {
            self.fault(a);
        }
        self.mem[&a].expect("fault service leaves the page present")
    }

    fn agent_move(&mut self, i: usize) {
        if i >= self.batches.len() || self.batches[i].results.is_some() {
            return;
        }
        let mut results = Vec::new();
        for &(a, slot) in &self.batches[i].pages {
            // The agent's check: an event logged since the batch was posted that overlaps.
            let cancelled = self.events[self.batches[i].epoch..]
                .iter()
                .any(|(s, e)| *s <= a && a < *e);
            match self.mem.get(&a) {
                Some(Some(v)) if !cancelled => {
                    self.window[slot as usize] = *v;
                    self.mem.insert(a, None);
                    results.push(true);
                }
                _ => results.push(false),
            }
        }
        self.batches[i].results = Some(results);
    }

    fn complete(&mut self, i: usize) {
        if i >= self.batches.len() {
            return;
        }
        if self.batches[i].results.is_none() {
            self.agent_move(i);
        }
        let b = self.batches.remove(i);
        for ((_, slot), moved) in b.pages.iter().zip(b.results.unwrap()) {
            self.pages.complete(*slot, b.gen, moved, self.now_ms, false);
        }
    }

    fn step(&mut self, op: &Op) {
        self.now_ms += 1;
        match *op {
            Op::Write(p, v) => {
                self.access(p);
                self.mem.insert(addr(p), Some(v));
                self.reference.insert(addr(p), v);
            }
            Op::Read(p) => {
                let got = self.access(p);
                assert_eq!(
                    got,
                    self.reference.get(&addr(p)).copied().unwrap_or(0),
                    "page {p}"
                );
            }
            Op::Post(p, n) => {
                if self.batches.len() >= 4 {
                    return;
                }
                let gen = self.next_gen;
                self.next_gen += 1;
                let mut pages = Vec::new();
                for q in p..(p + n).min(PAGES) {
                    if let Some(slot) = self.pages.begin_evict(addr(q), gen) {
                        pages.push((addr(q), slot));
                    }
                }
                self.batches.push(Batch {
                    gen,
                    pages,
                    results: None,
                    epoch: self.events.len(),
                });
            }
            Op::AgentMove(i) => self.agent_move(i),
            Op::Complete(i) => self.complete(i),
            Op::Cool => {
                let mut out = Vec::new();
                self.pages.pop_cooled(u64::MAX, 0, 64, &mut out);
                for (a, slot, gen) in out {
                    let h = self
                        .store
                        .put(&page_of(self.window[slot as usize]), a)
                        .unwrap();
                    if let Err(h) = self.pages.commit_stored(slot, gen, h) {
                        self.store.remove(h);
                    }
                }
            }
            Op::Remove(p, n) => {
                let (s, e) = (addr(p), addr((p + n).min(PAGES)));
                // The monitor reads the event (and logs it), then the kernel zaps the range.
                self.events.push((s, e));
                let store = &mut self.store;
                self.pages.discard_range(s, e, |h| store.remove(h));
                let mut a = s;
                while a < e {
                    self.mem.insert(a, None);
                    self.reference.remove(&a);
                    a += PAGE_BYTES;
                }
            }
            Op::Remap(from, to, n) => {
                let n = n.min(PAGES - from).min(PAGES - to);
                if n == 0 || (from < to + n && to < from + n) {
                    return; // the kernel refuses overlapping mremap
                }
                let (f, t, len) = (addr(from), addr(to), n * PAGE_BYTES);
                // The kernel moves the page tables first, then the monitor reads the event.
                let moved: Vec<_> = (0..n)
                    .map(|i| {
                        (
                            self.mem[&(f + i * PAGE_BYTES)],
                            self.reference.remove(&(f + i * PAGE_BYTES)),
                        )
                    })
                    .collect();
                for i in 0..n {
                    self.mem.insert(f + i * PAGE_BYTES, None);
                    self.reference.remove(&(t + i * PAGE_BYTES));
                }
                for (i, (m, r)) in moved.into_iter().enumerate() {
                    self.mem.insert(t + i as u64 * PAGE_BYTES, m);
                    if let Some(r) = r {
                        self.reference.insert(t + i as u64 * PAGE_BYTES, r);
                    }
                }
                self.events.push((f, f + len));
                self.events.push((t, t + len));
                let store = &mut self.store;
                let mut moved = Vec::new();
                self.pages
                    .remap(f, t, len, |h| store.remove(h), |h, a| moved.push((h, a)));
                for (h, a) in moved {
                    if let Err(e) = store.set_addr(h, a) {
                        tracing::error!(error = %e, "store: a moved page's record could not follow it");
                    }
                }
                // The old range is a fresh mapping again in this model (mremap + new mmap).
            }
            Op::DemoteBegin(n) => {
                let mut cold = Vec::new();
                self.pages.pop_coldest_stored(n, &mut cold);
                for (i, &(a, h)) in cold.iter().enumerate() {
                    match self.store.begin_demote(0, h, a, &mut self.demote_buf) {
                        Ok(Some(d)) => self.demoting.push(d),
                        Ok(None) => {}
                        Err(e) => {
                            self.pages.unpop_stored(&cold[i..]);
                            panic!("no disk limit here: {e}");
                        }
                    }
                }
            }
            Op::DemoteCommit => {
                let disk = self
                    .store
                    .disk_file()
                    .expect("disk tier")
                    .try_clone()
                    .unwrap();
                for d in &self.demoting {
                    let b = &self.demote_buf[d.buf_off..d.buf_off + d.len_bytes as usize];
                    std::os::unix::fs::FileExt::write_all_at(&disk, b, d.disk_off).unwrap();
                }
                for d in std::mem::take(&mut self.demoting) {
                    if self.pages.state(d.addr) != PageState::Stored(d.old) {
                        self.store.abort_demote(&d);
                    } else if self.store.commit_demote(&d) {
                        assert!(self.pages.demoted(d.addr, d.old, d.new));
                    }
                }
                self.demote_buf.clear();
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
    #[test]
    fn state_machine_matches_reference_model(ops in proptest::collection::vec(op(), 1..120)) {
        let mut sim = Sim::new();
        for op in &ops {
            sim.step(op);
        }
        // Drain the agent, then every page must read back the reference.
        while !sim.batches.is_empty() {
            sim.complete(0);
        }
        for p in 0..PAGES {
            let got = sim.access(p);
            prop_assert_eq!(got, sim.reference.get(&addr(p)).copied().unwrap_or(0), "page {}", p);
        }
        // Nothing leaked: every slot is free again once nothing is in flight or in the window.
        let c = sim.pages.counts();
        prop_assert_eq!(c.moving, 0);
        prop_assert_eq!(sim.pages.free_slot_count() as u64, SLOTS as u64 - c.window);
        prop_assert_eq!(sim.store.stored_pages(), c.stored);
    }

    /// The same model with a disk tier: demotions begin and commit interleaved with faults,
    /// writes, removes and remaps; after every step a monitor death would bring home exactly
    /// what the program last wrote (disk pages included), and in the end every page reads back.
    #[test]
    fn state_machine_with_disk_tier_matches_reference_model(
        ops in proptest::collection::vec(disk_op(), 1..120)
    ) {
        let mut sim = Sim::with_disk(true);
        for op in &ops {
            sim.step(op);
            sim.check_records();
        }
        sim.step(&Op::DemoteCommit);
        while !sim.batches.is_empty() {
            sim.complete(0);
        }
        for p in 0..PAGES {
            let got = sim.access(p);
            prop_assert_eq!(got, sim.reference.get(&addr(p)).copied().unwrap_or(0), "page {}", p);
        }
        let c = sim.pages.counts();
        prop_assert_eq!(sim.store.stored_pages(), c.stored);
        prop_assert_eq!(c.stored, 0);
        prop_assert_eq!(sim.store.stats().disk_bytes_mapped, 0, "every disk slot was freed");
        prop_assert!(sim.disk_dir.is_some());
    }
}

/// A stored page's handle, distinct for each `i` (the page map does not decode it).
fn h(i: u64) -> crate::store::Handle {
    crate::store::Handle::from_bits((1 << 59) | (i << 13) | 100)
}

/// Pages tracking the stored order, with pages 0..n stored (as `h(i)`) in that order.
fn stored_in_order(n: u64) -> Pages {
    let mut p = Pages::new(16);
    p.track_stored_order();
    for i in 0..n {
        assert!(p.adopt_stored(addr(i), h(i)));
    }
    p
}

/// The stored order: oldest first, stale entries skipped, a moved page goes to the back, a
/// demoted page is not listed again, pages not used can be put back in front.
#[test]
fn stored_order_pops_coldest_first_and_skips_stale() {
    let mut p = stored_in_order(6);
    // Page 1 comes back, page 2 moves to page 10's address.
    assert_eq!(p.faulted_in(addr(1), 0), Released::Blob(h(1)));
    p.remap(addr(2), addr(10), PAGE_BYTES, |_| {}, |_, _| {});
    let mut out = Vec::new();
    p.pop_coldest_stored(3, &mut out);
    assert_eq!(out, vec![(addr(0), h(0)), (addr(3), h(3)), (addr(4), h(4))]);
    p.unpop_stored(&out[1..]);
    assert!(p.demoted(addr(0), h(0), h(40)));
    assert!(!p.demoted(addr(0), h(0), h(41)), "no longer stored as h(0)");
    out.clear();
    p.pop_coldest_stored(10, &mut out);
    assert_eq!(
        out,
        vec![
            (addr(3), h(3)),
            (addr(4), h(4)),
            (addr(5), h(5)),
            (addr(10), h(2))
        ]
    );
}

#[test]
fn word_encoding_roundtrips() {
    let states = [
        PageState::Absent { hot_since_ms: None },
        PageState::Absent {
            hot_since_ms: Some(123_456),
        },
        PageState::Moving {
            gen: GEN_MASK,
            slot: (MAX_SLOTS - 1) as u32,
        },
        PageState::Window { gen: 7, slot: 3 },
    ];
    for s in states {
        assert_eq!(PageState::decode(s.encode()), s);
    }
    let mut store = Store::try_new(StoreConfig {
        durable: true,
        max_bytes: None,
        disk: None,
    })
    .unwrap();
    let h = store.put(&page_of(77), 0x1000).unwrap();
    assert_eq!(
        PageState::decode(PageState::Stored(h).encode()),
        PageState::Stored(h)
    );
}

#[test]
fn stale_completion_after_remove_frees_slot_and_keeps_absent() {
    let mut p = Pages::new(4);
    let slot = p.begin_evict(addr(1), 5).unwrap();
    p.discard_range(addr(0), addr(4), |_| panic!("no blob"));
    assert!(!p.complete(slot, 5, true, 0, false));
    assert_eq!(p.state(addr(1)), PageState::Absent { hot_since_ms: None });
    assert_eq!(p.free_slot_count(), 4);
}

#[test]
fn fill_ahead_stops_at_evicted_page_and_region_end() {
    let mut p = Pages::new(4);
    p.begin_evict(addr(5), 1).unwrap();
    assert_eq!(
        p.plan_fault(addr(2), 16, addr(PAGES)),
        FaultPlan::Zero { pages: 3 }
    );
    assert_eq!(
        p.plan_fault(addr(6), 16, addr(8)),
        FaultPlan::Zero { pages: 2 }
    );
    assert_eq!(
        p.plan_fault(addr(5), 16, addr(8)),
        FaultPlan::Wait { gen: 1 }
    );
}

#[test]
fn shadows_follow_their_page_and_are_released_exactly_once() {
    let mut store = Store::try_new(StoreConfig {
        durable: true,
        max_bytes: None,
        disk: None,
    })
    .unwrap();
    let mut p = Pages::new(8);
    // Three pages enter the window (cross-mm: moved straight into the arena).
    let slots: Vec<u32> = (0..3)
        .map(|i| {
            let s = p.begin_evict(addr(i), 1).unwrap();
            assert!(p.complete(s, 1, true, 0, false));
            s
        })
        .collect();
    let shadows: Vec<Handle> = (0..3)
        .map(|i| {
            let h = store.put(&page_of(i + 1), addr(i)).unwrap();
            p.set_shadow(slots[i as usize], 1, h).unwrap();
            h
        })
        .collect();
    // A second shadow for the same slot, or one for a stale generation, is refused.
    let extra = store.put(&page_of(9), addr(0)).unwrap();
    assert_eq!(p.set_shadow(slots[0], 1, extra), Err(extra));
    assert_eq!(p.set_shadow(slots[1], 2, extra), Err(extra));
    store.remove(extra);

    // Page 0 faults back while cooling: its shadow is handed back to be freed.
    assert_eq!(p.faulted_in(addr(0), 5), Released::Blob(shadows[0]));
    store.remove(shadows[0]);
    // Page 1 moves (mremap): its shadow's record follows.
    let mut moved = Vec::new();
    p.remap(
        addr(1),
        addr(100),
        PAGE_BYTES,
        |_| panic!("nothing at the destination"),
        |h, a| moved.push((h, a)),
    );
    assert_eq!(moved, vec![(shadows[1], addr(100))]);
    // Page 2 cools: the shadow becomes its stored copy, no compression, slot freed.
    assert!(p.commit_shadow(slots[2], 1));
    assert_eq!(p.state(addr(2)), PageState::Stored(shadows[2]));
    assert!(!p.commit_shadow(slots[2], 1), "only once");
    // The moved page is discarded by the program: its shadow is released.
    let mut released = Vec::new();
    p.discard_range(addr(100), addr(101), |h| released.push(h));
    assert_eq!(released, vec![shadows[1]]);
    assert_eq!(p.free_slot_count(), 8);
}

/// The page being demoted comes back, is rewritten and stored again in the same slot with a
/// record identical to the old one before the demotion's write completes: the demotion must
/// not publish the old bytes.
#[test]
fn demotion_racing_a_refault_and_restore_in_the_same_slot_keeps_the_new_bytes() {
    let mut sim = Sim::with_disk(true);
    for op in [
        Op::Write(0, 5),
        Op::Post(0, 1),
        Op::Complete(0),
        Op::Cool,
        Op::DemoteBegin(1),
        Op::Write(0, 6),
        Op::Post(0, 1),
        Op::Complete(0),
        Op::Cool,
    ] {
        sim.step(&op);
    }
    assert_eq!(sim.demoting.len(), 1);
    assert_eq!(
        sim.pages.state(addr(0)),
        PageState::Stored(sim.demoting[0].old),
        "the new bytes were stored under the very handle being demoted"
    );
    sim.step(&Op::DemoteCommit);
    sim.check_records();
    assert_eq!(sim.store.stats().pages_on_disk, 0);
    assert_eq!(sim.access(0), 6);
}

/// Window trim: the free slots that may hold memory, beyond a reserve of the lowest ones, are
/// offered highest first in runs, each only once until it is taken again; slots in use never;
/// nothing when fewer than asked for would go.
#[test]
fn window_trim_offers_free_resident_slots_beyond_the_reserve_once() {
    let mut p = Pages::new(64);
    // A fresh window may hold anything: every free slot but the reserve is offered.
    assert_eq!(p.free_resident_slots(), 64);
    assert_eq!(p.trimmable_runs(8, 1, 1000), vec![8..64]);
    assert_eq!(
        p.trimmable_runs(8, 1, 10),
        vec![54..64],
        "at most max_slots"
    );
    for r in p.trimmable_runs(0, 1, 1000) {
        p.trimmed(r);
    }
    assert_eq!(p.free_resident_slots(), 0);
    assert!(p.trimmable_runs(0, 1, 1000).is_empty());
    // Slots 0..40 taken (scattered addresses: lowest free first), then all but 0..10 and
    // 20 freed again.
    let slots: Vec<u32> = (0..40)
        .map(|i| p.begin_evict(addr(2 * i), 7).unwrap())
        .collect();
    assert_eq!(slots, (0..40).collect::<Vec<u32>>());
    for &s in &slots {
        assert!(p.complete(s, 7, true, 0, false));
    }
    for i in (10..40u64).filter(|&i| i != 20) {
        p.discard_range(addr(2 * i), addr(2 * i + 1), |_| {});
    }
    // Free and holding memory: 10..20 and 21..40 (29 slots); in use: 0..10 and 20.
    assert_eq!(p.free_resident_slots(), 29);
    assert_eq!(p.trimmable_runs(4, 8, 1000), vec![21..40, 14..20]);
    assert_eq!(
        p.trimmable_runs(4, 26, 1000),
        Vec::<std::ops::Range<u32>>::new(),
        "fewer than asked for"
    );
    for r in p.trimmable_runs(4, 8, 1000) {
        p.trimmed(r);
    }
    assert_eq!(p.free_resident_slots(), 4);
    assert!(
        p.trimmable_runs(4, 1, 1000).is_empty(),
        "given back already"
    );
    // A slot in use is never offered, even when asked for more than there is.
    assert_eq!(p.trimmable_runs(0, 1, 1000), vec![10..14]);
    // Taking slots makes them count again once freed: 20 more pages take 10..20 and 21..31.
    let more: Vec<u32> = (0..20)
        .map(|i| p.begin_evict(addr(2 * i + 1), 8).unwrap())
        .collect();
    assert_eq!(more.iter().max(), Some(&30));
    assert_eq!(
        p.free_resident_slots(),
        0,
        "the four held slots were reused first"
    );
    for &s in &more {
        assert!(p.complete(s, 8, true, 0, false));
    }
    for i in 0..20u64 {
        p.discard_range(addr(2 * i + 1), addr(2 * i + 2), |_| {});
    }
    assert_eq!(p.free_resident_slots(), 20);
    assert_eq!(p.trimmable_runs(0, 1, 1000), vec![21..31, 10..20]);
}

/// Store compaction renames stored pages: their words name the new handles at once, and the
/// stored order (disk tier) keeps their places once renamed.
#[test]
fn compaction_renames_keep_the_stored_order() {
    let mut p = stored_in_order(5);
    // Pages 1 and 3 move to new slots; a stale move (page 4 is not stored as h(9)) is ignored.
    let moves = [
        (addr(1), h(1), h(21)),
        (addr(3), h(3), h(23)),
        (addr(4), h(9), h(24)),
    ];
    assert_eq!(p.rehandled(&moves), 2);
    assert_eq!(p.state(addr(1)), PageState::Stored(h(21)));
    assert_eq!(p.state(addr(4)), PageState::Stored(h(4)));
    // Page 3 moves once more (compaction after a recompression): the order follows both.
    assert_eq!(p.rehandled(&[(addr(3), h(23), h(33))]), 1);
    let mut out = Vec::new();
    p.pop_coldest_stored(10, &mut out);
    assert_eq!(
        out,
        vec![
            (addr(0), h(0)),
            (addr(1), h(21)),
            (addr(2), h(2)),
            (addr(3), h(33)),
            (addr(4), h(4))
        ]
    );
}

/// Many renames (a recompression pass renames every stored page) are folded into the stored
/// order without losing a place; a renamed page that then goes back is skipped, and its
/// renames are forgotten.
#[test]
fn many_renames_fold_into_the_stored_order() {
    let n = 2 * (super::STORED_ORDER_SLACK as u64) + 100;
    let mut p = stored_in_order(n);
    // Every page moves once (more than the fold threshold), page 5 twice.
    let moves: Vec<_> = (0..n).map(|i| (addr(i), h(i), h(n + i))).collect();
    assert_eq!(p.rehandled(&moves), n as usize);
    assert_eq!(p.rehandled(&[(addr(5), h(n + 5), h(3 * n))]), 1);
    assert!(
        p.stored_renames.len() <= 1 + super::STORED_ORDER_SLACK + n as usize / 4,
        "renames folded: {} left",
        p.stored_renames.len()
    );
    assert_eq!(p.faulted_in(addr(7), 0), Released::Blob(h(n + 7)));
    let mut out = Vec::new();
    p.pop_coldest_stored(usize::MAX, &mut out);
    let want: Vec<_> = (0..n)
        .filter(|&i| i != 7)
        .map(|i| (addr(i), if i == 5 { h(3 * n) } else { h(n + i) }))
        .collect();
    assert_eq!(out, want);
    assert!(p.stored_renames.is_empty(), "every rename was followed");
}
