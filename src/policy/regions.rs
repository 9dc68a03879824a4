//! Per-region access statistics: pages trial-evicted from and refaulted in each managed region.
//!
//! Owns the counts, keyed by region start, and their attribution to the regions of the last
//! snapshot. Must not touch syscalls, the page map or the clock: the monitor feeds it the
//! region list, the runs it posted and the addresses of the refaults its page map logged.
//! A region that disappears from the snapshot (unmapped, or moved) loses its counts; one that
//! grows or shrinks in place keeps them.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Range;

/// Counts of one region, cumulative since it appeared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Counts {
    end: u64,
    evicted_pages: u64,
    refaults: u64,
}

/// One region's figures, for reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct RegionReport {
    pub start: u64,
    pub bytes: u64,
    /// Pages chosen for trial eviction from it.
    pub evicted_pages: u64,
    /// Faults on its pages served from the window or the store.
    pub refaults: u64,
    /// `refaults / evicted_pages` (0 when nothing was evicted).
    pub refault_ratio: f64,
}

/// The statistics of every managed region of one program.
#[derive(Debug, Clone, Default)]
pub struct RegionStats {
    by_start: BTreeMap<u64, Counts>,
    /// Refaults at addresses no known region holds (regions changed meanwhile).
    pub unattributed_refaults: u64,
}

impl RegionStats {
    /// Follows a new region list (sorted, non-overlapping): keeps the counts of regions that
    /// still start at the same address, starts new ones at zero, drops the rest.
    pub fn sync(&mut self, regions: &[Range<u64>]) {
        let mut next = BTreeMap::new();
        for r in regions {
            let mut c = self.by_start.get(&r.start).copied().unwrap_or_default();
            c.end = r.end;
            next.insert(r.start, c);
        }
        self.by_start = next;
    }

    fn find(&mut self, addr: u64) -> Option<&mut Counts> {
        let (_, c) = self.by_start.range_mut(..=addr).next_back()?;
        (addr < c.end).then_some(c)
    }

    /// `pages` pages from `addr` were posted for trial eviction.
    pub fn record_evicted(&mut self, addr: u64, pages: u64) {
        if let Some(c) = self.find(addr) {
            c.evicted_pages += pages;
        }
    }

    /// A fault at `addr` was served from the window or the store.
    pub fn record_refault(&mut self, addr: u64) {
        match self.find(addr) {
            Some(c) => c.refaults += 1,
            None => self.unattributed_refaults += 1,
        }
    }

    /// Number of regions tracked.
    pub fn len(&self) -> usize {
        self.by_start.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_start.is_empty()
    }

    /// The figures of region starting at `start`, if tracked.
    pub fn get(&self, start: u64) -> Option<RegionReport> {
        self.by_start.get(&start).map(|c| report(start, c))
    }

    /// The `n` regions with the most refaults (then the most evictions), most first; regions
    /// with neither are left out.
    pub fn top(&self, n: usize) -> Vec<RegionReport> {
        let mut v: Vec<RegionReport> = self
            .by_start
            .iter()
            .filter(|(_, c)| c.refaults + c.evicted_pages > 0)
            .map(|(s, c)| report(*s, c))
            .collect();
        v.sort_by(|a, b| {
            (b.refaults, b.evicted_pages, a.start).cmp(&(a.refaults, a.evicted_pages, b.start))
        });
        v.truncate(n);
        v
    }
}

fn report(start: u64, c: &Counts) -> RegionReport {
    RegionReport {
        start,
        bytes: c.end - start,
        evicted_pages: c.evicted_pages,
        refaults: c.refaults,
        refault_ratio: if c.evicted_pages == 0 {
            0.0
        } else {
            c.refaults as f64 / c.evicted_pages as f64
        },
    }
}
