//! Adaptive prefetch on refault: which evicted pages to bring back with a fault.
//!
//! A small table of *streams* per client, fed with the page index of every fault on an evicted
//! page. A stream is a constant stride (in pages, either sign: +1 sequential, -1 reverse, ±k
//! strided, |k| ≤ [`MAX_STRIDE_PAGES`]) seen in consecutive faults. Its window (pages to bring
//! back ahead of the fault, along the stride) starts at 0: two nearby faults are a guess, and
//! a program whose accesses touch two or three unrelated nearby pages each (redis: a dict
//! entry, a key, a value) makes such pairs all the time. The window becomes 1 when a third
//! fault confirms the stride, then doubles, up to the cap (`prefetch_pages`), each time the
//! stream's next fault lands past the span the fault thread went through for it (pages it
//! prefetched, or skipped as present): the program walked through those pages, so they were
//! used (*hits*). A fault inside that span means a page was evicted again before the program
//! got to it: the window was too large, it is halved, and the prefetched pages from the
//! faulting one on are counted as *waste*. A stream that is not continued is eventually
//! replaced (least recently used first) and its last window counts as waste. A fault that
//! continues no stream and has no recent neighbour within [`MAX_STRIDE_PAGES`] (random
//! access) prefetches nothing.
//!
//! So every prefetched page is accounted exactly once as hit or waste, or is still
//! outstanding in a live stream.
//!
//! Owns: the stream table and the recent-fault history. Must not: issue syscalls or look at
//! page states; the fault thread decides which of the proposed pages are evicted and can be
//! brought back, and reports how many it did ([`Detector::prefetched`]).

/// Streams tracked per client.
pub const STREAMS: usize = 8;
/// Recent faults that continued no stream, kept to start new ones.
pub const HISTORY: usize = 8;
/// Largest stride a stream may have, in pages.
pub const MAX_STRIDE_PAGES: i64 = 64;
/// A stream's next fault may land this many strides past the end of its prefetched pages
/// (pages in between that were resident, or a prefetch cut short) and still continue it.
pub const SLACK_STEPS: i64 = 8;

/// What to bring back with one fault: `pages` pages at `fault + k × stride_pages` for
/// `k = 1..=pages`. `pages == 0`: the faulting page alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub stride_pages: i64,
    pub pages: u32,
    /// Prefetched pages of earlier faults this fault settled as used.
    pub hit_pages: u64,
    /// Prefetched pages of earlier faults this fault settled as wasted.
    pub waste_pages: u64,
    /// The stream this plan belongs to, for [`Detector::prefetched`].
    stream: Option<(usize, u64)>,
}

impl Plan {
    /// Only the faulting page.
    pub const NONE: Plan = Plan {
        stride_pages: 1,
        pages: 0,
        hit_pages: 0,
        waste_pages: 0,
        stream: None,
    };
}

#[derive(Debug, Clone, Copy)]
struct Stream {
    /// Page index of the stream's last fault.
    last_page: u64,
    stride_pages: i64,
    /// Pages to prefetch at its next fault.
    window_pages: u32,
    /// Pages prefetched at its last fault, not yet settled as hit or waste.
    outstanding_pages: u32,
    /// Strides past its last fault that the fault thread took care of (prefetched, or found
    /// present already): its next fault is expected just past them.
    covered_steps: u32,
    /// Identity, so a report for a replaced stream is ignored.
    id: u64,
    /// Last use, for replacement.
    stamp: u64,
}

/// The per-client stream detector.
#[derive(Debug)]
pub struct Detector {
    cap_pages: u32,
    streams: [Option<Stream>; STREAMS],
    history: [Option<u64>; HISTORY],
    history_next: usize,
    clock: u64,
    next_id: u64,
}

impl Detector {
    /// `cap_pages` is the largest window (config `prefetch_pages`); 0 turns prefetch off.
    pub fn new(cap_pages: u32) -> Detector {
        Detector {
            cap_pages,
            streams: [None; STREAMS],
            history: [None; HISTORY],
            history_next: 0,
            clock: 0,
            next_id: 1,
        }
    }

    /// A fault on the evicted page with index `page` (address / page size). Call once per
    /// fault (not again when its service is retried).
    pub fn on_fault(&mut self, page: u64) -> Plan {
        if self.cap_pages == 0 {
            return Plan::NONE;
        }
        self.clock += 1;
        let mut hit_pages = 0u64;
        let mut waste_pages = 0u64;
        // 1. Continue the stream this fault lies ahead of (fewest steps wins).
        let mut best: Option<(usize, i64)> = None;
        for (i, s) in self.streams.iter().enumerate() {
            let Some(s) = s else { continue };
            let d = page as i64 - s.last_page as i64;
            if d == 0 || d.signum() != s.stride_pages.signum() || d % s.stride_pages != 0 {
                continue;
            }
            let steps = d / s.stride_pages;
            if steps <= s.covered_steps as i64 + 1 + SLACK_STEPS
                && best.is_none_or(|(_, b)| steps < b)
            {
                best = Some((i, steps));
            }
        }
        let idx = if let Some((i, steps)) = best {
            let s = self.streams[i].as_mut().expect("matched a live stream");
            let out = s.outstanding_pages as u64;
            if steps > s.covered_steps as i64 {
                // Past everything prefetched: all of it was walked through.
                hit_pages += out;
                s.window_pages = match s.window_pages {
                    // The stride is confirmed (or confirmed again after a halving to 0).
                    0 => 1,
                    w => (w * 2).min(self.cap_pages),
                };
            } else {
                // A fault inside the span it took care of: a prefetched page evicted again
                // before it was reached (or one that was on its way out then). The pages
                // before it were used at most; count the rest as waste.
                let used = ((steps - 1) as u64).min(out);
                hit_pages += used;
                waste_pages += out - used;
                s.window_pages /= 2;
            }
            s.last_page = page;
            s.outstanding_pages = 0;
            s.covered_steps = 0;
            s.stamp = self.clock;
            i
        } else {
            // 2. Start a stream from the nearest recent fault, if one is close enough.
            let n = self.history.len();
            let near = (1..=n)
                .filter_map(|k| self.history[(self.history_next + n - k) % n])
                .map(|p| page as i64 - p as i64)
                .find(|d| *d != 0 && d.abs() <= MAX_STRIDE_PAGES);
            match near {
                Some(stride_pages) => {
                    let (slot, waste) = self.free_slot();
                    waste_pages += waste;
                    let id = self.next_id;
                    self.next_id += 1;
                    self.streams[slot] = Some(Stream {
                        last_page: page,
                        stride_pages,
                        window_pages: 0,
                        outstanding_pages: 0,
                        covered_steps: 0,
                        id,
                        stamp: self.clock,
                    });
                    slot
                }
                None => {
                    self.history[self.history_next] = Some(page);
                    self.history_next = (self.history_next + 1) % n;
                    return Plan {
                        hit_pages,
                        waste_pages,
                        ..Plan::NONE
                    };
                }
            }
        };
        let s = self.streams[idx].expect("stream just set");
        Plan {
            stride_pages: s.stride_pages,
            pages: s.window_pages.min(self.cap_pages),
            hit_pages,
            waste_pages,
            stream: Some((idx, s.id)),
        }
    }

    /// The fault of `plan` was served: of the `covered_steps` strides after it that the
    /// fault thread went through (≤ `plan.pages`; fewer at the region's end or a failed
    /// copy), `pages` were evicted and came back (the others were present already, or on
    /// their way out, and were skipped).
    pub fn prefetched(&mut self, plan: &Plan, covered_steps: u32, pages: u32) {
        let Some((i, id)) = plan.stream else { return };
        if let Some(s) = self.streams[i].as_mut().filter(|s| s.id == id) {
            s.outstanding_pages = pages;
            s.covered_steps = covered_steps.max(pages);
        }
    }

    /// Pages prefetched and not yet settled, over all streams.
    pub fn outstanding_pages(&self) -> u64 {
        self.streams
            .iter()
            .flatten()
            .map(|s| s.outstanding_pages as u64)
            .sum()
    }

    /// A slot for a new stream: a free one, else the least recently used one, whose
    /// outstanding pages are returned as waste.
    fn free_slot(&mut self) -> (usize, u64) {
        if let Some(i) = self.streams.iter().position(Option::is_none) {
            return (i, 0);
        }
        let (i, s) = self
            .streams
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|s| (i, s)))
            .min_by_key(|(_, s)| s.stamp)
            .expect("the table is full");
        (i, s.outstanding_pages as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `touches` as faults, as the fault thread would: the touched pages are the
    /// evicted ones, a proposed page comes back if it is evicted and not back yet (others are
    /// skipped), and a touch of a page already back is no fault.
    /// Returns the faults taken, pages prefetched, hits and waste.
    fn run(d: &mut Detector, touches: impl IntoIterator<Item = u64>) -> (u64, u64, u64, u64) {
        let touches: Vec<u64> = touches.into_iter().collect();
        let evicted: std::collections::HashSet<u64> = touches.iter().copied().collect();
        let mut present = std::collections::HashSet::new();
        let (mut faults, mut pre, mut hit, mut waste) = (0, 0, 0, 0);
        for p in touches {
            if !present.insert(p) {
                continue;
            }
            faults += 1;
            let plan = d.on_fault(p);
            hit += plan.hit_pages;
            waste += plan.waste_pages;
            let (mut covered, mut n) = (0, 0);
            for k in 1..=plan.pages as i64 {
                let q = p as i64 + k * plan.stride_pages;
                if q < 0 {
                    break;
                }
                covered += 1;
                if evicted.contains(&(q as u64)) && present.insert(q as u64) {
                    n += 1;
                }
            }
            d.prefetched(&plan, covered, n);
            pre += n as u64;
        }
        (faults, pre, hit, waste)
    }

    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[test]
    fn prefetch_sequential_window_doubles_to_cap() {
        let mut d = Detector::new(16);
        let mut windows = Vec::new();
        let mut p = 1000u64;
        for _ in 0..8 {
            let plan = d.on_fault(p);
            windows.push(plan.pages);
            assert_eq!(plan.stride_pages, 1);
            d.prefetched(&plan, plan.pages, plan.pages);
            p += plan.pages as u64 + 1;
        }
        // No stream at the first fault; a stream at the second, confirmed at the third.
        assert_eq!(windows, vec![0, 0, 1, 2, 4, 8, 16, 16]);
        let (faults, pre, hit, waste) = run(&mut Detector::new(16), 0..10_000);
        assert!(faults < 700, "{faults} faults for 10000 sequential pages");
        assert_eq!(pre + faults, 10_000);
        assert_eq!(waste, 0);
        assert!(hit + 16 >= pre, "hits {hit} of {pre}");
    }

    #[test]
    fn prefetch_reverse_detected_with_negative_stride() {
        let mut d = Detector::new(32);
        let (faults, pre, _, waste) = run(&mut d, (0..10_000u64).rev());
        assert!(faults < 400, "{faults} faults");
        assert_eq!(pre + faults, 10_000);
        assert_eq!(waste, 0);
        let plan = d.on_fault(20_000);
        assert_eq!(plan.pages, 0, "a far fault continues nothing");
    }

    #[test]
    fn prefetch_strided_follows_the_stride() {
        let mut d = Detector::new(8);
        let touches: Vec<u64> = (0..2000u64).map(|i| 5000 + i * 4).collect();
        let (faults, pre, _, waste) = run(&mut d, touches);
        assert!(faults < 300, "{faults} faults");
        assert_eq!(pre + faults, 2000);
        assert_eq!(waste, 0);
        let mut d = Detector::new(8);
        assert_eq!(d.on_fault(100).pages, 0);
        let plan = d.on_fault(104);
        assert_eq!(
            (plan.stride_pages, plan.pages),
            (4, 0),
            "a guess: no prefetch yet"
        );
        d.prefetched(&plan, 0, 0);
        let plan = d.on_fault(108);
        assert_eq!((plan.stride_pages, plan.pages), (4, 1), "confirmed");
        d.prefetched(&plan, 1, 1);
        let plan = d.on_fault(116);
        assert_eq!((plan.stride_pages, plan.pages), (4, 2));
    }

    #[test]
    fn prefetch_random_stays_near_zero() {
        let mut d = Detector::new(64);
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let touches: Vec<u64> = (0..20_000).map(|_| rng(&mut seed) % 262_144).collect();
        let (faults, pre, _, _) = run(&mut d, touches);
        assert!(
            pre * 100 < faults,
            "random access prefetched {pre} pages for {faults} faults"
        );
    }

    /// Each access faults on two unrelated pages close to each other, as a redis GET does on
    /// a dict entry and a value (different allocator runs a few pages apart): every pair
    /// looks like a stride once. Before a third fault confirmed a stride, each pair started a
    /// stream that prefetched a page, and redis had 420k prefetched pages for 1.5k used.
    #[test]
    fn prefetch_pairs_of_nearby_unrelated_faults_prefetch_nothing() {
        let mut d = Detector::new(16);
        let mut seed = 7u64;
        // The whole heap is evicted: every proposed page that is not back yet comes back.
        let mut present = std::collections::HashSet::new();
        let (mut faults, mut pre) = (0u64, 0u64);
        for _ in 0..20_000 {
            let p = 1_000 + rng(&mut seed) % 1_000_000;
            let off = 1 + rng(&mut seed) % MAX_STRIDE_PAGES as u64;
            for page in [p, p + off] {
                if !present.insert(page) {
                    continue;
                }
                faults += 1;
                let plan = d.on_fault(page);
                let mut n = 0;
                for k in 1..=plan.pages as i64 {
                    if present.insert((page as i64 + k * plan.stride_pages) as u64) {
                        n += 1;
                    }
                }
                d.prefetched(&plan, plan.pages, n);
                pre += n as u64;
            }
        }
        assert!(faults > 35_000, "{faults} faults");
        assert!(
            pre * 200 < faults,
            "{pre} pages prefetched for {faults} faults in unrelated pairs"
        );
    }

    #[test]
    fn prefetch_mixed_streams_are_tracked_apart() {
        // Two sequential streams and a reverse one, interleaved, with random faults between.
        let mut d = Detector::new(16);
        let mut seed = 42u64;
        let mut touches = Vec::new();
        for i in 0..3000u64 {
            touches.push(100_000 + i);
            touches.push(500_000 + i);
            touches.push(900_000 - i);
            touches.push(2_000_000 + rng(&mut seed) % 1_000_000);
        }
        let (faults, pre, _, _) = run(&mut d, touches);
        // 9000 stream pages + 3000 random ones: streams need few faults, random ones all.
        assert!(faults < 3000 + 1200, "{faults} faults");
        assert!(pre > 8000, "{pre} pages prefetched");
    }

    #[test]
    fn prefetch_refault_in_window_counts_waste_and_halves() {
        let mut d = Detector::new(16);
        let mut p = 0u64;
        let mut plan = d.on_fault(p);
        for _ in 0..6 {
            d.prefetched(&plan, plan.pages, plan.pages);
            p += plan.pages as u64 + 1;
            plan = d.on_fault(p);
        }
        assert_eq!(plan.pages, 16);
        d.prefetched(&plan, 16, 16);
        // The page right after the fault was evicted again and faults: 1 step, all 16 wasted
        // but the ones before it (none).
        let again = d.on_fault(p + 1);
        assert_eq!(again.waste_pages, 16);
        assert_eq!(again.hit_pages, 0);
        assert_eq!(again.pages, 8);
    }

    #[test]
    fn prefetch_replaced_stream_counts_its_window_as_waste() {
        let mut d = Detector::new(4);
        // STREAMS sequential streams each get a window, then new streams push them out.
        let mut total_pre = 0u64;
        for s in 0..STREAMS as u64 {
            let base = s * 1_000_000;
            d.on_fault(base);
            let guess = d.on_fault(base + 1);
            d.prefetched(&guess, 0, 0);
            let plan = d.on_fault(base + 2);
            assert_eq!(plan.pages, 1);
            d.prefetched(&plan, plan.pages, plan.pages);
            total_pre += plan.pages as u64;
        }
        assert_eq!(d.outstanding_pages(), total_pre);
        assert_eq!(total_pre, STREAMS as u64);
        let mut waste = 0;
        for s in 0..STREAMS as u64 {
            let base = 50_000_000 + s * 1_000_000;
            waste += d.on_fault(base).waste_pages;
            waste += d.on_fault(base + 1).waste_pages;
        }
        assert_eq!(waste, total_pre);
    }

    #[test]
    fn prefetch_stream_continues_over_present_pages() {
        // A sequential scan where every third page is resident (never evicted, no fault).
        let mut d = Detector::new(16);
        let touches: Vec<u64> = (0..6000u64).filter(|p| p % 3 != 0).collect();
        let n = touches.len() as u64;
        let (faults, pre, _, waste) = run(&mut d, touches);
        assert_eq!(pre + faults, n);
        assert_eq!(waste, 0);
        assert!(faults < n / 8, "{faults} faults for {n} evicted pages");
    }

    #[test]
    fn prefetch_cap_zero_is_off() {
        let mut d = Detector::new(0);
        let (faults, pre, _, _) = run(&mut d, 0..1000);
        assert_eq!((faults, pre), (1000, 0));
    }

    #[test]
    fn prefetch_stale_report_for_replaced_stream_is_ignored() {
        let mut d = Detector::new(4);
        d.on_fault(0);
        let guess = d.on_fault(1);
        d.prefetched(&guess, 0, 0);
        let old = d.on_fault(2);
        assert_eq!(old.pages, 1);
        for s in 1..=STREAMS as u64 {
            d.on_fault(s * 1_000_000);
            d.on_fault(s * 1_000_000 + 1);
        }
        d.prefetched(&old, 4, 4);
        assert_eq!(d.outstanding_pages(), 0);
    }
}
