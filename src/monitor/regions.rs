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
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionsError {
    #[error("Regions snapshot {snapshot}: more than {MAX_SNAPSHOT_ENTRIES} entries")]
    TooManyEntries { snapshot: u32 },
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
    /// Ranges never to evict.
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

fn subtract(r: Range<u64>, cuts: &[Range<u64>]) -> Vec<Range<u64>> {
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
        let excluded: Vec<Range<u64>> = self
            .pending
            .iter()
            .filter(|e| e.flags & REGION_EXCLUDED != 0)
            .map(|e| e.start..e.start + e.len_bytes)
            .collect();
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
        self.excluded
            .iter()
            .any(|r| r.start <= start && end <= r.end)
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
