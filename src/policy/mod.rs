//! Eviction policy: how much to evict each tick, which pages, and when a trial-evicted page
//! has cooled enough to be compressed.
//!
//! Owns the clock hand and the arithmetic of budget, hysteresis, rate cap and cooling. Must
//! not touch any syscall, uffd, process or store: it sees pages only through [`PageView`]
//! (supplied by the monitor's page map) and time only as milliseconds passed in by the caller,
//! so every decision is a pure function of its inputs and unit-testable on its own.
//!
//! # Model
//!
//! The program's managed resident memory is kept near `budget`. A clock hand sweeps the
//! registered regions. The kernel's reference bit is not available, so a *trial eviction*
//! stands in for it: the monitor moves a chosen page out into a staging window. If the page
//! is refaulted within `cooling`, it is hot: the monitor marks it hot and the hand skips it
//! until `hot_ttl` has passed, then clears the mark (second chance) and may choose it on a
//! later pass. A page not refaulted within `cooling` is compressed and released from the
//! window ([`ClockPolicy::cooled`]).
//!
//! **The budget is a hard limit.** While resident memory is over it, the eviction target is
//! the excess (plus hysteresis) at the full rate cap, and if a sweep finds too few cold
//! candidates, the oldest hot pages it passed are taken for the shortfall
//! ([`SweepLimits::hot_fallback_pages`]): `hot_ttl` protects a refaulted page from being chosen
//! before colder ones, never from the budget. (Without this, a scan that touched every page
//! within `hot_ttl` made the whole program unevictable: BENCHMARKS.md, "Holding the budget".)
//!
//! Below the budget, [`controller::PressureController`] decides how much to reclaim
//! proactively (cold candidates only) from the measured stall and promotion rate, and how long
//! the cold age (the wait before compression, at least `cooling`) is; [`regions::RegionStats`]
//! keeps per-region eviction and refault counts.

pub mod controller;
pub mod regions;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod trace_tests;

use std::ops::Range;
use std::time::Duration;

/// Bytes in one page, as u64 for address arithmetic.
const PAGE_BYTES: u64 = crate::PAGE_SIZE as u64;

/// Once over budget, eviction aims this fraction below it (1/64 ≈ 1.6%), so that a program
/// hovering at its budget is not trial-evicting a page or two on every tick.
const HYSTERESIS_DIVISOR: u64 = 64;

/// The knobs of the policy; a subset of the program's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyParams {
    /// Target managed resident memory; `None` = no limit, nothing is evicted.
    pub budget_bytes: Option<u64>,
    /// How long a trial-evicted page waits in the window before it counts as cold.
    pub cooling: Duration,
    /// The policy period; with `max_evict_bytes_per_sec` it gives the per-tick cap.
    pub tick: Duration,
    /// Eviction bandwidth cap.
    pub max_evict_bytes_per_sec: u64,
    /// Pages per agent batch; also an upper bound for `run_pages`.
    pub batch_pages: u32,
    /// Maximum pages per contiguous run (one ioctl).
    pub run_pages: u32,
    /// How long a hot page is skipped by the clock hand.
    pub hot_ttl: Duration,
}

/// What the clock hand sees of one page; supplied by the monitor's page map.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PageClass {
    /// Resident and evictable: may be chosen.
    Candidate,
    /// Resident, refaulted after a trial eviction at `since_ms`: skipped until
    /// `since_ms + hot_ttl`, then its mark is cleared.
    Hot { since_ms: u64 },
    /// In flight, in the window, stored, or unevictable: skipped.
    Busy,
}

/// The monitor's page map as the clock hand sees it.
pub trait PageView {
    /// The class of the page at `page_addr` (page-aligned).
    fn class(&self, page_addr: u64) -> PageClass;
    /// Clears the hot mark of `page_addr`: its hot time is over, it is a candidate again.
    fn clear_hot(&mut self, page_addr: u64);
    /// Optional fast skip: the first page address in `[from_addr, end_addr)` that may be
    /// something other than [`PageClass::Busy`], or `end_addr` if there is none. Pages skipped
    /// this way do not count against the scan limit. The default skips nothing.
    fn next_interesting(&self, from_addr: u64, end_addr: u64) -> u64 {
        let _ = end_addr;
        from_addr
    }
}

/// The bounds of one sweep ([`ClockPolicy::sweep_with`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct SweepLimits {
    /// Pages to choose.
    pub want_pages: u64,
    /// Pages to examine at most (pages skipped via [`PageView::next_interesting`] are free).
    pub max_scan_pages: u64,
    /// Of the shortfall (fewer cold candidates than `want_pages`), how many pages may be taken
    /// from the hot pages examined, oldest first. 0 below the budget: hot pages are then
    /// never chosen.
    pub hot_fallback_pages: u64,
}

/// A contiguous run of pages chosen for trial eviction.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Run {
    /// First page address (page-aligned).
    pub addr: u64,
    /// Number of pages, at least 1.
    pub pages: u32,
}

impl Run {
    /// One past the last byte of the run.
    pub fn end_addr(&self) -> u64 {
        self.addr + u64::from(self.pages) * PAGE_BYTES
    }

    /// Length of the run in bytes.
    pub fn bytes(&self) -> u64 {
        u64::from(self.pages) * PAGE_BYTES
    }
}

/// The clock policy of one program: its parameters and the position of its clock hand.
#[derive(Debug, Clone)]
pub struct ClockPolicy {
    params: PolicyParams,
    /// Address of the next page the hand looks at (page-aligned; may lie outside every
    /// region after regions changed).
    hand_addr: u64,
}

impl ClockPolicy {
    /// A policy with its hand at the lowest address.
    pub fn new(params: PolicyParams) -> Self {
        ClockPolicy {
            params,
            hand_addr: 0,
        }
    }

    /// Replaces the parameters (e.g. a new budget from `uswap budget`); the hand stays.
    pub fn set_params(&mut self, params: PolicyParams) {
        self.params = params;
    }

    /// The current parameters.
    pub fn params(&self) -> &PolicyParams {
        &self.params
    }

    /// Where the hand will look next.
    pub fn hand_addr(&self) -> u64 {
        self.hand_addr
    }

    /// Moves the hand (aligned down to a page), e.g. to restart a sweep.
    pub fn set_hand_addr(&mut self, addr: u64) {
        self.hand_addr = addr & !(PAGE_BYTES - 1);
    }

    /// The largest run the sweep builds: `run_pages`, at most `batch_pages`, at least 1.
    pub fn run_limit_pages(&self) -> u32 {
        self.params.run_pages.min(self.params.batch_pages).max(1)
    }

    /// The most pages one tick may evict: `max_evict_bytes_per_sec * tick`, at least one
    /// page (a non-zero rate always makes progress).
    pub fn rate_cap_pages(&self) -> u64 {
        let bytes_per_tick = u128::from(self.params.max_evict_bytes_per_sec)
            * self.params.tick.as_nanos()
            / 1_000_000_000;
        let pages = u64::try_from(bytes_per_tick / u128::from(PAGE_BYTES)).unwrap_or(u64::MAX);
        pages.max(1)
    }

    /// Pages to trial-evict this tick.
    ///
    /// 0 when there is no budget or `rss_bytes` is within it. Once over budget the target is
    /// the excess over a low-water mark 1/64 (≈1.6%) below the budget, rounded up to whole
    /// pages, minus `inflight_pages` (chosen earlier, still counted in `rss_bytes`), capped by
    /// [`Self::rate_cap_pages`].
    pub fn eviction_target_pages(&self, rss_bytes: u64, inflight_pages: u64) -> u64 {
        let Some(budget) = self.params.budget_bytes else {
            return 0;
        };
        if rss_bytes <= budget {
            return 0;
        }
        let low_water = budget - budget / HYSTERESIS_DIVISOR;
        let excess_pages = (rss_bytes - low_water).div_ceil(PAGE_BYTES);
        excess_pages
            .saturating_sub(inflight_pages)
            .min(self.rate_cap_pages())
    }

    /// Sweeps `regions` from the hand and chooses up to `want_pages` candidate pages.
    ///
    /// `regions` are sorted, non-overlapping `[start, end)` address ranges (page-aligned; an
    /// unaligned range is shrunk to the whole pages inside it). The sweep starts at the hand
    /// — or, if the hand is in no region (regions changed), at the next region above it, or
    /// at the first region — and goes around at most once. It stops when `want_pages` are
    /// chosen, `max_scan_pages` pages have been examined, or it is back where it started.
    ///
    /// Candidates are grouped into runs of contiguous pages of at most
    /// [`Self::run_limit_pages`]; a run never crosses a region boundary. A hot page whose
    /// `since_ms + hot_ttl <= now_ms` gets its mark cleared (second chance) but is not chosen
    /// on this pass. Runs come in sweep order (ascending, except across the wrap). The hand is
    /// left after the last page examined (or skipped via [`PageView::next_interesting`]).
    pub fn sweep(
        &mut self,
        now_ms: u64,
        regions: &[Range<u64>],
        view: &mut impl PageView,
        want_pages: u64,
        max_scan_pages: u64,
    ) -> Vec<Run> {
        self.sweep_with(
            now_ms,
            regions,
            view,
            SweepLimits {
                want_pages,
                max_scan_pages,
                hot_fallback_pages: 0,
            },
        )
    }

    /// [`Self::sweep`], and when fewer than `want_pages` cold candidates were found, up to
    /// `hot_fallback_pages` of the shortfall taken from the hot pages the sweep examined,
    /// oldest mark first (ties: lowest address). Hot pages whose mark expired during this
    /// sweep count as the oldest. Hot runs follow the candidate runs, in address order; they
    /// obey the same run limit and never cross a region boundary. Used to hold the budget
    /// when every page left has been refaulted recently.
    pub fn sweep_with(
        &mut self,
        now_ms: u64,
        regions: &[Range<u64>],
        view: &mut impl PageView,
        limits: SweepLimits,
    ) -> Vec<Run> {
        let SweepLimits {
            want_pages,
            max_scan_pages,
            hot_fallback_pages,
        } = limits;
        let mut runs = Vec::new();
        if want_pages == 0 || max_scan_pages == 0 {
            return runs;
        }
        let regions: Vec<Range<u64>> = regions
            .iter()
            .map(|r| align_up(r.start)..r.end & !(PAGE_BYTES - 1))
            .filter(|r| r.start < r.end)
            .collect();
        let total_pages: u64 = regions.iter().map(|r| (r.end - r.start) / PAGE_BYTES).sum();
        if total_pages == 0 {
            return runs;
        }

        let run_limit = self.run_limit_pages();
        let hot_ttl_ms = u64::try_from(self.params.hot_ttl.as_millis()).unwrap_or(u64::MAX);
        let hand = self.hand_addr & !(PAGE_BYTES - 1);
        let mut idx = regions.partition_point(|r| r.end <= hand);
        let mut addr = match regions.get(idx) {
            Some(r) => hand.max(r.start),
            None => {
                idx = 0;
                regions[0].start
            }
        };

        // Pages passed (examined or skipped): at most one full turn.
        let mut passed_pages = 0u64;
        let mut examined_pages = 0u64;
        let mut chosen_pages = 0u64;
        let mut open: Option<Run> = None;
        // Hot pages passed, for the fallback: (mark time, address, region index).
        let mut hot_seen: Vec<(u64, u64, usize)> = Vec::new();

        'turn: loop {
            let end = regions[idx].end;
            while addr < end {
                if passed_pages >= total_pages
                    || examined_pages >= max_scan_pages
                    || chosen_pages >= want_pages
                {
                    break 'turn;
                }
                let next = align_up(view.next_interesting(addr, end)).clamp(addr, end);
                if next > addr {
                    let skip_pages = ((next - addr) / PAGE_BYTES).min(total_pages - passed_pages);
                    passed_pages += skip_pages;
                    addr += skip_pages * PAGE_BYTES;
                    self.hand_addr = addr;
                    runs.extend(open.take());
                    continue;
                }
                examined_pages += 1;
                passed_pages += 1;
                match view.class(addr) {
                    PageClass::Candidate => {
                        chosen_pages += 1;
                        match open.as_mut() {
                            Some(run) if run.end_addr() == addr && run.pages < run_limit => {
                                run.pages += 1;
                            }
                            _ => {
                                runs.extend(open.take());
                                open = Some(Run { addr, pages: 1 });
                            }
                        }
                    }
                    PageClass::Hot { since_ms } => {
                        runs.extend(open.take());
                        let expired = since_ms.saturating_add(hot_ttl_ms) <= now_ms;
                        if expired {
                            view.clear_hot(addr);
                        }
                        if hot_fallback_pages > 0 {
                            hot_seen.push((if expired { 0 } else { since_ms }, addr, idx));
                        }
                    }
                    PageClass::Busy => runs.extend(open.take()),
                }
                addr += PAGE_BYTES;
                self.hand_addr = addr;
            }
            // A run never crosses a region boundary (two VMAs need two ioctls).
            runs.extend(open.take());
            idx = (idx + 1) % regions.len();
            addr = regions[idx].start;
        }
        runs.extend(open.take());

        let shortfall = want_pages
            .saturating_sub(chosen_pages)
            .min(hot_fallback_pages);
        if shortfall > 0 && !hot_seen.is_empty() {
            hot_seen.sort_unstable();
            hot_seen.truncate(usize::try_from(shortfall).unwrap_or(usize::MAX));
            hot_seen.sort_unstable_by_key(|&(_, addr, _)| addr);
            let mut open: Option<(Run, usize)> = None;
            for (_, addr, region) in hot_seen {
                match open.as_mut() {
                    Some((run, r))
                        if *r == region && run.end_addr() == addr && run.pages < run_limit =>
                    {
                        run.pages += 1;
                    }
                    _ => {
                        runs.extend(open.take().map(|(run, _)| run));
                        open = Some((Run { addr, pages: 1 }, region));
                    }
                }
            }
            runs.extend(open.take().map(|(run, _)| run));
        }
        runs
    }

    /// Cooling decisions for the window FIFO: the ids to compress now.
    ///
    /// `fifo_oldest_first` yields `(id, entered_ms)`, oldest first. Chosen are every entry
    /// whose age (`now_ms - entered_ms`) is at least `cooling`, and, when `window_free_slots`
    /// is below `min_free_slots` (window pressure), further entries from the oldest on until
    /// `min_free_slots - window_free_slots` entries are chosen in all. Returned oldest first.
    /// Stops reading the FIFO at the first entry it does not take.
    pub fn cooled<I: IntoIterator<Item = (u64, u64)>>(
        &self,
        now_ms: u64,
        fifo_oldest_first: I,
        window_free_slots: u64,
        min_free_slots: u64,
    ) -> Vec<u64> {
        let cooling_ms = u64::try_from(self.params.cooling.as_millis()).unwrap_or(u64::MAX);
        let pressure_slots = min_free_slots.saturating_sub(window_free_slots);
        let mut ids = Vec::new();
        for (id, entered_ms) in fifo_oldest_first {
            let aged = now_ms.saturating_sub(entered_ms) >= cooling_ms;
            if aged || (ids.len() as u64) < pressure_slots {
                ids.push(id);
            } else {
                break;
            }
        }
        ids
    }
}

/// Rounds an address up to the next page boundary (saturating at the last page).
fn align_up(addr: u64) -> u64 {
    addr.checked_add(PAGE_BYTES - 1)
        .map_or(!(PAGE_BYTES - 1), |a| a & !(PAGE_BYTES - 1))
}
