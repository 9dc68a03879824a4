//! The client's address-space picture: managed anonymous regions minus excluded ranges, as
//! reported by the shim's snapshots, and which of them are registered with the descriptor.
//!
//! Owns: range arithmetic. Must not: issue syscalls (registration is done by the caller).

use std::collections::BTreeMap;
use std::ops::Range;

use crate::protocol::wire::{RegionEntry, REGION_EXCLUDED, REGION_MANAGED, REGION_REGISTERED};

/// Entries one snapshot may hold (the kernel's default `vm.max_map_count` is 65530; each VMA
/// is one entry, excluded ranges add a few). More is a flood and refused.
pub const MAX_SNAPSHOT_ENTRIES: usize = 1 << 18;

/// A snapshot that cannot describe an address space.
/// Ranges reported registered and not unmapped since, kept for unregistering on detach. A
/// program's VMAs come and go with unmap events, which forget them; a client reporting ever
/// new ranges without unmapping anything would otherwise grow this without bound.
pub const MAX_EVER_REGISTERED: usize = 2 * MAX_SNAPSHOT_ENTRIES;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionsError {
    #[error("Regions snapshot {snapshot}: more than {MAX_SNAPSHOT_ENTRIES} entries")]
    TooManyEntries { snapshot: u32 },
    #[error(
        "Regions snapshot {snapshot}: more than {MAX_EVER_REGISTERED} ranges reported registered and never unmapped"
    )]
    TooManyRegistered { snapshot: u32 },
    #[error(
        "Regions snapshot {snapshot}: managed entries {a_start:#x}..{a_end:#x} and {b_start:#x}..{b_end:#x} overlap"
    )]
    Overlap {
        snapshot: u32,
        a_start: u64,
        a_end: u64,
        b_start: u64,
        b_end: u64,
    },
}

#[derive(Debug, Default)]
pub struct Regions {
    /// Managed ranges (start → end), excluded parts already cut out, sorted, disjoint.
    managed: BTreeMap<u64, u64>,
    /// Ranges registered with the client's uffd (start → end).
    registered: BTreeMap<u64, u64>,
    /// Every range ever registered and not since unmapped (for unregistering on detach).
    ever_registered: BTreeMap<u64, u64>,
    /// Ranges never to evict (ascending, disjoint).
    excluded: Vec<Range<u64>>,
    /// Address-space changes (UNMAP, REMAP) with the event epoch they were logged at, newest
    /// last; a snapshot whose scan began before one of them is not trusted where they overlap.
    recent_changes: std::collections::VecDeque<(u64, u64, u64)>,
    /// Snapshot being received.
    pending: Vec<RegionEntry>,
    pending_epoch: u64,
    pending_snapshot: Option<u32>,
    pub snapshots: u64,
}

/// Sorts ranges and merges overlapping or touching ones: ascending and disjoint.
fn merge(mut v: Vec<Range<u64>>) -> Vec<Range<u64>> {
    v.sort_unstable_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(l) if r.start <= l.end => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// `r` minus `cuts` (ascending and disjoint, see [`merge`]): O(log n + cuts inside `r`), so
/// a snapshot of many managed and many excluded entries costs n log n, not n × m.
fn subtract(r: Range<u64>, cuts: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut cur = r.start;
    let first = cuts.partition_point(|c| c.end <= r.start);
    for c in &cuts[first..] {
        if c.start >= r.end {
            break;
        }
        if c.start > cur {
            out.push(cur..c.start);
        }
        cur = cur.max(c.end);
        if cur >= r.end {
            break;
        }
    }
    if cur < r.end {
        out.push(cur..r.end);
    }
    out
}

impl Regions {
    /// Feeds one `Regions` packet. Returns true when a snapshot completed. A snapshot with too
    /// many entries or with overlapping managed entries (VMAs never overlap) is refused and
    /// changes nothing.
    pub fn feed(
        &mut self,
        snapshot: u32,
        first: bool,
        last: bool,
        epoch: u64,
        entries: impl Iterator<Item = RegionEntry>,
        min_region_bytes: u64,
    ) -> Result<bool, RegionsError> {
        if first {
            self.pending.clear();
            self.pending_snapshot = Some(snapshot);
            self.pending_epoch = epoch;
        }
        if self.pending_snapshot != Some(snapshot) {
            return Ok(false); // a chunk of a snapshot whose start we missed: ignore it
        }
        self.pending.extend(entries);
        if self.pending.len() > MAX_SNAPSHOT_ENTRIES {
            self.pending.clear();
            self.pending_snapshot = None;
            return Err(RegionsError::TooManyEntries { snapshot });
        }
        if !last {
            return Ok(false);
        }
        self.pending_snapshot = None;
        let mut spans: Vec<(u64, u64)> = self
            .pending
            .iter()
            .filter(|e| e.flags & REGION_MANAGED != 0)
            .map(|e| (e.start, e.start + e.len_bytes))
            .collect();
        spans.sort_unstable();
        if let Some(w) = spans.windows(2).find(|w| w[1].0 < w[0].1) {
            self.pending.clear();
            return Err(RegionsError::Overlap {
                snapshot,
                a_start: w[0].0,
                a_end: w[0].1,
                b_start: w[1].0,
                b_end: w[1].1,
            });
        }
        let excluded: Vec<Range<u64>> = merge(
            self.pending
                .iter()
                .filter(|e| e.flags & REGION_EXCLUDED != 0)
                .map(|e| e.start..e.start + e.len_bytes)
                .collect(),
        );
        let mut managed = BTreeMap::new();
        let mut registered = BTreeMap::new();
        for e in self
            .pending
            .iter()
            .filter(|e| e.flags & REGION_MANAGED != 0)
        {
            for r in subtract(e.start..e.start + e.len_bytes, &excluded) {
                if e.flags & REGION_REGISTERED != 0 {
                    registered.insert(r.start, r.end);
                    self.ever_registered.insert(r.start, r.end);
                }
                if r.end - r.start >= min_region_bytes {
                    managed.insert(r.start, r.end);
                }
            }
        }
        if self.ever_registered.len() > MAX_EVER_REGISTERED {
            self.pending.clear();
            return Err(RegionsError::TooManyRegistered { snapshot });
        }
        // A range that was unmapped or moved after the scan began may hold another mapping
        // now (possibly one the agent has not registered yet): not evictable until the next
        // snapshot shows it.
        let since = self.pending_epoch;
        let stale = |s: u64, e: u64, changes: &std::collections::VecDeque<(u64, u64, u64)>| {
            changes
                .iter()
                .any(|&(ep, cs, ce)| ep > since && cs < e && s < ce)
        };
        managed.retain(|s, e| !stale(*s, *e, &self.recent_changes));
        registered.retain(|s, e| !stale(*s, *e, &self.recent_changes));
        // The agent registers and reports; the snapshot is the truth.
        self.registered = registered;
        self.managed = managed;
        self.excluded = excluded;
        self.pending.clear();
        self.snapshots += 1;
        Ok(true)
    }

    pub fn managed(&self) -> Vec<Range<u64>> {
        self.managed.iter().map(|(s, e)| *s..*e).collect()
    }

    pub fn managed_bytes(&self) -> u64 {
        self.managed.iter().map(|(s, e)| e - s).sum()
    }

    /// The managed range containing `addr`.
    pub fn containing(&self, addr: u64) -> Option<Range<u64>> {
        let (s, e) = self.managed.range(..=addr).next_back()?;
        (addr < *e).then_some(*s..*e)
    }

    pub fn is_registered(&self, r: &Range<u64>) -> bool {
        self.registered.get(&r.start) == Some(&r.end)
    }

    /// Every range the agent has reported registered and not unmapped since.
    pub fn ever_registered(&self) -> Vec<Range<u64>> {
        self.ever_registered.iter().map(|(s, e)| *s..*e).collect()
    }

    /// Managed ranges that are registered (may be evicted).
    pub fn evictable(&self) -> Vec<Range<u64>> {
        self.managed
            .iter()
            .filter(|(s, e)| self.registered.get(s) == Some(e))
            .map(|(s, e)| *s..*e)
            .collect()
    }

    /// Whether some managed range is not registered yet.
    pub fn any_unregistered(&self) -> bool {
        self.managed
            .iter()
            .any(|(s, e)| self.registered.get(s) != Some(e))
    }

    #[cfg(test)]
    pub fn mark_registered(&mut self, r: Range<u64>) {
        self.ever_registered.insert(r.start, r.end);
        self.registered.insert(r.start, r.end);
    }

    /// UNMAP/REMAP of `[start, end)`, logged at event `epoch`: the ranges that overlap it are
    /// gone until a snapshot taken after it says otherwise.
    pub fn forget(&mut self, start: u64, end: u64, epoch: u64) {
        self.recent_changes.push_back((epoch, start, end));
        while self.recent_changes.len() > 4096 {
            self.recent_changes.pop_front();
        }
        let gone: Vec<u64> = self
            .managed
            .range(..end)
            .filter(|(s, e)| **s < end && start < **e)
            .map(|(s, _)| *s)
            .collect();
        for s in gone {
            self.managed.remove(&s);
            self.registered.remove(&s);
        }
        self.ever_registered
            .retain(|s, e| !(*s >= start && *e <= end));
    }

    pub fn is_excluded(&self, start: u64, end: u64) -> bool {
        let i = self.excluded.partition_point(|r| r.start <= start);
        i > 0 && end <= self.excluded[i - 1].end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(start: u64, len: u64, flags: u64) -> RegionEntry {
        RegionEntry {
            start,
            len_bytes: len,
            flags,
        }
    }

    #[test]
    fn snapshot_subtracts_excluded_and_small_ranges() {
        let mut r = Regions::default();
        let entries = [
            e(0x10000, 0x100000, REGION_MANAGED),
            e(0x20000, 0x1000, REGION_EXCLUDED),
            e(0x500000, 0x1000, REGION_MANAGED),
        ];
        assert!(r
            .feed(1, true, true, 0, entries.into_iter(), 0x2000)
            .unwrap());
        assert_eq!(r.managed(), vec![0x10000..0x20000, 0x21000..0x110000]);
        assert!(r.is_excluded(0x20000, 0x21000));
        assert_eq!(r.containing(0x30000), Some(0x21000..0x110000));
        assert_eq!(r.containing(0x20000), None);
        assert_eq!(r.containing(0x500000), None);
    }

    #[test]
    fn chunks_of_a_snapshot_accumulate_and_strays_are_ignored() {
        let mut r = Regions::default();
        assert!(!r
            .feed(
                2,
                false,
                true,
                0,
                [e(0x1000, 0x10000, REGION_MANAGED)].into_iter(),
                0
            )
            .unwrap());
        assert!(!r
            .feed(
                3,
                true,
                false,
                0,
                [e(0x1000, 0x10000, REGION_MANAGED)].into_iter(),
                0
            )
            .unwrap());
        assert!(r
            .feed(
                3,
                false,
                true,
                0,
                [e(0x100000, 0x10000, REGION_MANAGED)].into_iter(),
                0
            )
            .unwrap());
        assert_eq!(r.managed().len(), 2);
        r.mark_registered(0x1000..0x11000);
        r.forget(0x2000, 0x3000, 1);
        assert_eq!(r.managed(), vec![0x100000..0x110000]);
        assert!(!r.is_registered(&(0x1000..0x11000)));
        // A snapshot whose scan began before that unmap (epoch 0) still shows the old range:
        // it is not trusted there; one that began after it (epoch 1) is.
        let old = [e(0x1000, 0x10000, REGION_MANAGED | REGION_REGISTERED)];
        assert!(r.feed(4, true, true, 0, old.into_iter(), 0).unwrap());
        assert!(r.evictable().is_empty());
        assert!(r.feed(5, true, true, 1, old.into_iter(), 0).unwrap());
        assert_eq!(r.evictable(), vec![0x1000..0x11000]);
    }

    /// The subtraction of the version before issue 5 (n × m), as the reference.
    fn subtract_naive(r: Range<u64>, cuts: &[Range<u64>]) -> Vec<Range<u64>> {
        let mut out = vec![r];
        for c in cuts {
            let mut next = Vec::new();
            for p in out {
                if c.end <= p.start || p.end <= c.start {
                    next.push(p);
                    continue;
                }
                if p.start < c.start {
                    next.push(p.start..c.start);
                }
                if c.end < p.end {
                    next.push(c.end..p.end);
                }
            }
            out = next;
        }
        out
    }

    proptest::proptest! {
        #[test]
        fn subtract_matches_the_naive_subtraction(
            start in 0u64..64, len in 1u64..64,
            cuts in proptest::collection::vec((0u64..80, 1u64..20), 0..12),
        ) {
            let r = start..start + len;
            let cuts: Vec<Range<u64>> = cuts.into_iter().map(|(s, l)| s..s + l).collect();
            let merged = merge(cuts.clone());
            proptest::prop_assert!(merged.windows(2).all(|w| w[0].end < w[1].start));
            proptest::prop_assert_eq!(subtract(r.clone(), &merged), subtract_naive(r, &cuts));
        }
    }

    #[test]
    fn large_snapshot_of_managed_and_excluded_entries_is_fast() {
        // 2^16 managed ranges, each with an excluded page inside and one after it: about 2^33
        // range comparisons for the quadratic subtraction, a few million here.
        let n = 1u64 << 16;
        let mut v = Vec::new();
        for i in 0..n {
            let base = 0x1000_0000 + i * 0x10000;
            v.push(e(base, 0x4000, REGION_MANAGED | REGION_REGISTERED));
            v.push(e(base + 0x1000, 0x1000, REGION_EXCLUDED));
            v.push(e(base + 0x8000, 0x1000, REGION_EXCLUDED));
        }
        let mut r = Regions::default();
        let t0 = std::time::Instant::now();
        for (i, chunk) in v.chunks(1024).enumerate() {
            let last = (i + 1) * 1024 >= v.len();
            r.feed(1, i == 0, last, 0, chunk.iter().copied(), 0)
                .unwrap();
        }
        assert_eq!(r.managed().len(), 2 * n as usize);
        assert!(r.is_excluded(0x1000_1000, 0x1000_2000));
        assert!(!r.is_excluded(0x1000_0000, 0x1000_1000));
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            t0.elapsed()
        );
    }

    #[test]
    fn ranges_registered_without_end_are_capped() {
        let mut r = Regions::default();
        let mut snap = 0;
        let res = loop {
            snap += 1;
            let base = 0x1000_0000u64 + snap as u64 * (1 << 28);
            let entries: Vec<RegionEntry> = (0..1024u64)
                .map(|i| {
                    e(
                        base + i * 0x2000,
                        0x1000,
                        REGION_MANAGED | REGION_REGISTERED,
                    )
                })
                .collect();
            match r.feed(snap, true, true, 0, entries.into_iter(), 0) {
                Ok(_) if (snap as usize) * 1024 <= MAX_EVER_REGISTERED + 1024 => continue,
                other => break other,
            }
        };
        assert!(
            matches!(res, Err(RegionsError::TooManyRegistered { .. })),
            "{res:?}"
        );
    }

    #[test]
    fn overlapping_or_flooding_snapshots_are_refused_and_change_nothing() {
        let mut r = Regions::default();
        let good = [e(0x10000, 0x10000, REGION_MANAGED)];
        assert!(r.feed(1, true, true, 0, good.into_iter(), 0).unwrap());
        let bad = [
            e(0x100000, 0x10000, REGION_MANAGED),
            e(0x108000, 0x10000, REGION_MANAGED | REGION_REGISTERED),
        ];
        let err = r.feed(2, true, true, 0, bad.into_iter(), 0).unwrap_err();
        assert!(
            matches!(err, RegionsError::Overlap { snapshot: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("0x108000"), "{err}");
        assert_eq!(r.managed(), vec![0x10000..0x20000]);
        // Excluded ranges may overlap managed ones: that is what they are for.
        let ok = [
            e(0x100000, 0x10000, REGION_MANAGED),
            e(0x104000, 0x1000, REGION_EXCLUDED),
        ];
        assert!(r.feed(3, true, true, 0, ok.into_iter(), 0).unwrap());
        // A snapshot that never ends cannot grow without bound.
        let chunk = vec![e(0x1000, 0x1000, REGION_MANAGED); 1024];
        let mut res = Ok(false);
        for i in 0..=(MAX_SNAPSHOT_ENTRIES / 1024) {
            res = r.feed(4, i == 0, false, 0, chunk.iter().copied(), 0);
            if res.is_err() {
                break;
            }
        }
        assert_eq!(res, Err(RegionsError::TooManyEntries { snapshot: 4 }));
        assert!(r.pending.is_empty());
    }
}
