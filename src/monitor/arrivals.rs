//! Which UNMAP events may be stale: the fault thread's record of memory that arrived (by
//! mremap) at addresses the kernel may still report as unmapped.
//!
//! The kernel reports an unmap only after it happened, and another thread can reuse the range
//! in between. A thread that mremaps region R1 away from `F` unmaps `F` at once, but its UNMAP
//! event for `F` is queued only after its REMAP event has been read. Meanwhile another thread
//! can mremap region R2 into `F`, and that REMAP can be read first. Applying the UNMAP of `F`
//! then would drop R2's evicted pages: they would read as zeros. The same can happen to a
//! plain munmap whose thread is preempted between unmapping and queueing its event.
//!
//! What the kernel guarantees, and what this relies on: from the moment a range is unmapped
//! until its UNMAP event has been read, the descriptor's `mmap_changing` count is non-zero,
//! and every COPY, ZEROPAGE or MOVE fails with EAGAIN. So:
//! - a REMAP destination read while no COPY has succeeded since is *unconfirmed*: an UNMAP
//!   read later may predate it;
//! - once any COPY (or a probe, see [`crate::uffd::Uffd::probe`]) passes the `mmap_changing`
//!   check, every earlier destination is *confirmed*: an UNMAP read after that was issued
//!   after the mremap, so it is genuine;
//! - the part of an UNMAP that overlaps an unconfirmed destination is *doubtful*: its page
//!   words are kept, faults on it wait, and each page is probed once the address space is
//!   quiet: a page still in a registered VMA stayed (the UNMAP was stale for it); a page in
//!   no registered VMA is gone and its word is dropped.
//!
//! Owns: the unconfirmed destinations and the doubtful ranges. Must not: issue syscalls or
//! touch page words (the fault thread probes and discards).

/// Most unconfirmed destinations kept one by one; past this they are merged into their hull
/// (more doubtful, never less).
const MAX_ARRIVALS: usize = 1024;

#[derive(Debug, Default)]
pub struct Arrivals {
    /// REMAP destinations read since the last confirmation, `[start, end)`.
    unconfirmed: Vec<(u64, u64)>,
    /// Unmapped ranges whose page words are kept until probed, sorted by start, disjoint.
    doubtful: Vec<(u64, u64)>,
}

impl Arrivals {
    /// The REMAP destinations read since the last confirmation (published in the window's
    /// event journal for the shim's guardian).
    pub fn unconfirmed(&self) -> &[(u64, u64)] {
        &self.unconfirmed
    }

    /// A REMAP moved `len` bytes from `from` to `to`. The words of both ranges were rewritten
    /// by it, so neither is doubtful any more; the destination is unconfirmed.
    pub fn on_remap(&mut self, from: u64, to: u64, len: u64) {
        self.forget_doubtful(from, from + len);
        self.forget_doubtful(to, to + len);
        self.unconfirmed.push((to, to + len));
        if self.unconfirmed.len() > MAX_ARRIVALS {
            let lo = self.unconfirmed.iter().map(|r| r.0).min().unwrap_or(0);
            let hi = self.unconfirmed.iter().map(|r| r.1).max().unwrap_or(0);
            self.unconfirmed = vec![(lo, hi)];
        }
    }

    /// An UNMAP of `[start, end)` was read. Returns the parts to discard now; the rest (the
    /// parts over unconfirmed destinations) become doubtful.
    pub fn on_unmap(&mut self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut keep: Vec<(u64, u64)> = self
            .unconfirmed
            .iter()
            .filter(|(s, e)| *s < end && start < *e)
            .map(|(s, e)| ((*s).max(start), (*e).min(end)))
            .collect();
        keep.sort_unstable();
        let mut discard = Vec::new();
        let mut at = start;
        for &(s, e) in &keep {
            if s > at {
                discard.push((at, s));
            }
            at = at.max(e);
        }
        if at < end {
            discard.push((at, end));
        }
        for (s, e) in keep {
            self.add_doubtful(s, e);
        }
        discard
    }

    /// A REMOVE of `[start, end)` (MADV_DONTNEED and the like) is genuine: the range was mapped
    /// when it was queued. Its words are discarded, so it is not doubtful any more.
    pub fn on_remove(&mut self, start: u64, end: u64) {
        self.forget_doubtful(start, end);
    }

    /// The address space was seen quiet after everything read so far.
    pub fn confirm(&mut self) {
        self.unconfirmed.clear();
    }

    pub fn has_unconfirmed(&self) -> bool {
        !self.unconfirmed.is_empty()
    }

    pub fn doubtful(&self) -> &[(u64, u64)] {
        &self.doubtful
    }

    pub fn is_doubtful(&self, addr: u64) -> bool {
        let i = self.doubtful.partition_point(|(s, _)| *s <= addr);
        i > 0 && addr < self.doubtful[i - 1].1
    }

    /// `[start, end)` was probed (or its words otherwise settled): no longer doubtful.
    pub fn forget_doubtful(&mut self, start: u64, end: u64) {
        let mut out = Vec::with_capacity(self.doubtful.len() + 1);
        for &(s, e) in &self.doubtful {
            if e <= start || end <= s {
                out.push((s, e));
                continue;
            }
            if s < start {
                out.push((s, start));
            }
            if end < e {
                out.push((end, e));
            }
        }
        self.doubtful = out;
    }

    fn add_doubtful(&mut self, start: u64, end: u64) {
        self.doubtful.push((start, end));
        self.doubtful.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.doubtful.len());
        for &(s, e) in &self.doubtful {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.doubtful = merged;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmap_with_no_arrivals_is_discarded_whole() {
        let mut a = Arrivals::default();
        assert_eq!(a.on_unmap(0x1000, 0x5000), vec![(0x1000, 0x5000)]);
        assert!(a.doubtful().is_empty());
    }

    #[test]
    fn stale_unmap_over_a_remapped_region_keeps_its_pages() {
        // R1 leaves F = [0x10000, 0x20000); R2 lands at [0x14000, 0x18000) before the UNMAP of
        // F is read.
        let mut a = Arrivals::default();
        a.on_remap(0x10000, 0x90000, 0x10000);
        a.on_remap(0x50000, 0x14000, 0x4000);
        let discard = a.on_unmap(0x10000, 0x20000);
        assert_eq!(discard, vec![(0x10000, 0x14000), (0x18000, 0x20000)]);
        assert_eq!(a.doubtful(), &[(0x14000, 0x18000)]);
        assert!(a.is_doubtful(0x14000) && a.is_doubtful(0x17fff));
        assert!(!a.is_doubtful(0x18000) && !a.is_doubtful(0x13fff));
    }

    #[test]
    fn confirmed_arrivals_make_later_unmaps_genuine() {
        let mut a = Arrivals::default();
        a.on_remap(0x50000, 0x14000, 0x4000);
        assert!(a.has_unconfirmed());
        a.confirm();
        assert!(!a.has_unconfirmed());
        assert_eq!(a.on_unmap(0x10000, 0x20000), vec![(0x10000, 0x20000)]);
        assert!(a.doubtful().is_empty());
    }

    #[test]
    fn remap_and_remove_settle_doubtful_ranges() {
        let mut a = Arrivals::default();
        a.on_remap(0x50000, 0x10000, 0x10000);
        a.on_unmap(0x10000, 0x20000);
        assert_eq!(a.doubtful(), &[(0x10000, 0x20000)]);
        a.on_remove(0x12000, 0x13000);
        assert_eq!(a.doubtful(), &[(0x10000, 0x12000), (0x13000, 0x20000)]);
        a.on_remap(0x18000, 0x70000, 0x8000);
        assert_eq!(a.doubtful(), &[(0x10000, 0x12000), (0x13000, 0x18000)]);
        a.forget_doubtful(0, u64::MAX);
        assert!(a.doubtful().is_empty());
    }

    #[test]
    fn doubtful_ranges_merge() {
        let mut a = Arrivals::default();
        a.on_remap(0, 0x10000, 0x4000);
        a.on_remap(0, 0x14000, 0x4000);
        a.on_unmap(0x10000, 0x18000);
        assert_eq!(a.doubtful(), &[(0x10000, 0x18000)]);
    }

    #[test]
    fn too_many_arrivals_merge_into_their_hull() {
        let mut a = Arrivals::default();
        for i in 0..(MAX_ARRIVALS as u64 + 1) {
            a.on_remap(0, 0x100_0000 + i * 0x2000, 0x1000);
        }
        // A gap between two arrivals is now doubtful too: safe, never less.
        a.on_unmap(0x100_1000, 0x100_2000);
        assert_eq!(a.doubtful(), &[(0x100_1000, 0x100_2000)]);
    }
}
