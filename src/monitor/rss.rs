//! A fresh estimate of a program's resident anonymous memory, and the throttle line.
//!
//! Owns: the estimate between two samples of RssAnon, and the decision "hold faults back".
//! Must not touch: the program (the samples come from its agent, `REQ_RSS`), the page states,
//! or anything that blocks: the fault thread asks it once per round.
//!
//! The agent reads `/proc/self/status` when the control thread asks (once per tick), and the
//! control thread sees the figure a tick later. During a refault storm the program can bring
//! back 50 MiB in that time (a sequential re-read with prefetch: 125,000 pages a second on
//! this VM), so a figure a tick old lets resident memory run far past the budget before
//! anything reacts. The estimate adds what the monitor itself brought in (zero-filled and
//! restored pages) since the sample was asked for, and takes off what was moved out since it
//! was read: the agent publishes with the sample the `done_seq` it had answered up to
//! (`Window::publish_rss`, a sequence lock), and the monitor remembers how many pages had
//! been moved out once each recent batch was counted, so the batches answered after the read
//! (which the fault thread may have counted before the sample is looked at, up to a tick
//! later) are still taken off. Until that mark, a seq re-read's estimate stayed high by what
//! eviction moved out in up to a tick, and eviction overshot the budget's low-water mark by
//! as much (RSS settled ~6 MiB under it, and the store held ~3 MiB more). Where no batch
//! mark applies (the cross-mm backend moves without batches) the mark is the count at the
//! arrival. The errors left are on the high side: pages brought in between the request and
//! the agent's read count twice, and on the cross-mm backend pages moved out between the read
//! and the arrival are not taken off; memory the program gives back itself (munmap,
//! MADV_DONTNEED) shows at the next sample. A high estimate holds a fault back a little
//! early. What it cannot see is growth the monitor does not serve: a page written after a
//! zero-page fill, memory touched before its region was registered; that shows at the next
//! sample, and the line's slack allows for it.
//!
//! The throttle (config `throttle`): while the estimate is over the line (budget plus an
//! eighth of it, at least [`THROTTLE_SLACK_MIN_BYTES`]) and eviction is under way, the
//! fault thread holds new faults back until the estimate is under the line again, for
//! `throttle` at most. "Under way" means batches are posted or in flight and eviction made
//! progress within [`PROGRESS_WINDOW`]: a tick at which it had moved pages since the one
//! before, at least as many as it was refused, or at which it started (a tick at which it was
//! refused more ends the progress at once, and only a new start gives the benefit of the
//! doubt again). The window, not the last tick alone, because the agent answers in
//! batches: on the stock backend in the TCG VM a batch of thousands of pages came back every
//! 0.25-0.5 s, and a per-tick test held nothing between them while a fill ran 10 MiB past
//! the line. This is what the kernel does to a cgroup over `memory.high`: the faulting task
//! waits while reclaim catches up, instead of memory running ahead of it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::stats::Counters;
use crate::PAGE_SIZE;

const PAGE_BYTES: u64 = PAGE_SIZE as u64;

/// Smallest slack over the budget before faults are held back: a small program's own
/// unmanaged memory (stacks, the shim's) is not worth a stall.
pub const THROTTLE_SLACK_MIN_BYTES: u64 = 8 << 20;

/// How long after eviction last made progress it still counts as under way (see the module
/// doc).
pub const PROGRESS_WINDOW: Duration = Duration::from_secs(1);

/// The line above which faults are held back, for a budget.
pub fn throttle_line_bytes(budget_bytes: u64) -> u64 {
    budget_bytes + (budget_bytes / 8).max(THROTTLE_SLACK_MIN_BYTES)
}

/// The line above which the control thread posts eviction between compressed chunks, not
/// only at its tick: half way from the budget to the throttle line.
pub fn refill_line_bytes(budget_bytes: u64) -> u64 {
    budget_bytes + (budget_bytes / 8).max(THROTTLE_SLACK_MIN_BYTES) / 2
}

/// Pages the monitor has brought into the program (zero-filled or restored) and moved out
/// of it, over its life.
fn pages_in(c: &Counters) -> u64 {
    Counters::get(&c.zero_pages_filled) + Counters::get(&c.pages_restored)
}

fn pages_out(c: &Counters) -> u64 {
    Counters::get(&c.pages_moved)
}

/// RssAnon as last sampled, with the monitor's own traffic since (see the module doc).
/// Written by the control thread, read by the fault thread.
#[derive(Default)]
pub struct RssGauge {
    /// Last sample, in bytes; 0 until the first.
    base_bytes: AtomicU64,
    /// `pages_in` when the sample in `base_bytes` was asked for.
    in_mark: AtomicU64,
    /// `pages_out` when it arrived.
    out_mark: AtomicU64,
    /// A sample has been asked for and has not arrived: the mark of the oldest request.
    requested: AtomicBool,
    request_in_mark: AtomicU64,
    /// Eviction is under way and moving pages (set each tick): holding faults back lets it
    /// catch up.
    evicting: AtomicBool,
    /// `pages_out` and the pages eviction could not take (busy, failed) at the last tick.
    tick_moved: AtomicU64,
    tick_refused: AtomicU64,
    /// The last tick at which eviction made progress or started (control thread only).
    progress_at: Mutex<Option<Instant>>,
    /// `under_way` at the last tick.
    was_under_way: AtomicBool,
}

impl RssGauge {
    /// The control thread is about to ask the agent for a sample. A request still
    /// unanswered keeps its older mark (the agent reads once for both).
    pub fn on_request(&self, c: &Counters) {
        if !self.requested.swap(true, Ordering::Relaxed) {
            self.request_in_mark.store(pages_in(c), Ordering::Relaxed);
        }
    }

    /// A sample of `rss_bytes` has arrived.
    pub fn on_sample(&self, rss_bytes: u64, c: &Counters) {
        let in_mark = if self.requested.swap(false, Ordering::Relaxed) {
            self.request_in_mark.load(Ordering::Relaxed)
        } else {
            // Not asked for by us (the first scan's): count from now.
            pages_in(c)
        };
        self.in_mark.store(in_mark, Ordering::Relaxed);
        self.out_mark.store(pages_out(c), Ordering::Relaxed);
        self.base_bytes.store(rss_bytes, Ordering::Relaxed);
    }

    /// A sample of `rss_bytes` has arrived that the agent read when `out_mark_pages` pages
    /// had been moved out (the count once the batches it had answered were counted): what
    /// moved out after the read, even if counted before the sample arrived, is taken off.
    pub fn on_sample_at(&self, rss_bytes: u64, out_mark_pages: u64, c: &Counters) {
        self.on_sample(rss_bytes, c);
        self.out_mark
            .store(out_mark_pages.min(pages_out(c)), Ordering::Relaxed);
    }

    /// The estimate now, in bytes.
    pub fn estimate_bytes(&self, c: &Counters) -> u64 {
        let brought_in = pages_in(c).saturating_sub(self.in_mark.load(Ordering::Relaxed));
        let moved_out = pages_out(c).saturating_sub(self.out_mark.load(Ordering::Relaxed));
        (self.base_bytes.load(Ordering::Relaxed) + brought_in * PAGE_BYTES)
            .saturating_sub(moved_out * PAGE_BYTES)
    }

    /// Each tick, at `now`: `under_way` (batches posted or in flight, not paused, the agent
    /// answering). Faults are held back only while eviction also made progress within
    /// [`PROGRESS_WINDOW`]: moved pages, at least as many as it was refused, or started.
    /// Pages it cannot take (shared with a forked child during a BGSAVE, pinned) do not get
    /// lower by holding the program back.
    pub fn on_tick(&self, c: &Counters, under_way: bool, now: Instant) {
        let moved = pages_out(c);
        let refused = Counters::get(&c.pages_busy) + Counters::get(&c.pages_failed);
        let moved_since = moved.saturating_sub(self.tick_moved.swap(moved, Ordering::Relaxed));
        let refused_since =
            refused.saturating_sub(self.tick_refused.swap(refused, Ordering::Relaxed));
        let mut progress_at = self.progress_at.lock();
        if refused_since > moved_since {
            *progress_at = None;
        } else if moved_since > 0 || (under_way && !self.was_under_way.load(Ordering::Relaxed)) {
            // Progress, or eviction starting: its first batch gets the benefit of the doubt
            // for a window (a program filling fresh memory between the registration of its
            // region and the first answered batch otherwise ran 5-8 MiB past the line here).
            *progress_at = Some(now);
        }
        self.was_under_way.store(under_way, Ordering::Relaxed);
        let recent =
            progress_at.is_some_and(|t| now.saturating_duration_since(t) <= PROGRESS_WINDOW);
        self.evicting.store(under_way && recent, Ordering::Relaxed);
    }

    /// Whether eviction was under way at the last tick (see [`Self::on_tick`]).
    pub fn was_under_way(&self) -> bool {
        self.was_under_way.load(Ordering::Relaxed)
    }

    /// Whether the estimate is over `line_bytes` (fresh memory and prefetch are then one page
    /// per fault, see `monitor/fault.rs`).
    pub fn over_line(&self, c: &Counters, line_bytes: Option<u64>) -> bool {
        line_bytes.is_some_and(|line| self.estimate_bytes(c) > line)
    }

    /// Whether a fault read now should be held back: over the line, with eviction under way.
    pub fn should_hold(&self, c: &Counters, line_bytes: Option<u64>) -> bool {
        match line_bytes {
            Some(line) => self.evicting.load(Ordering::Relaxed) && self.estimate_bytes(c) > line,
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bump(a: &AtomicU64, n: u64) {
        Counters::add(a, n);
    }

    #[test]
    fn estimate_adds_what_came_in_since_the_request_and_takes_off_what_left_since_arrival() {
        let c = Counters::default();
        let g = RssGauge::default();
        assert_eq!(g.estimate_bytes(&c), 0);
        bump(&c.pages_restored, 10);
        g.on_request(&c);
        // Brought in between the request and the agent's read: in the sample and counted
        // again (high side).
        bump(&c.zero_pages_filled, 5);
        bump(&c.pages_moved, 3);
        g.on_sample(100 * PAGE_BYTES, &c);
        assert_eq!(g.estimate_bytes(&c), 105 * PAGE_BYTES);
        bump(&c.pages_restored, 20);
        bump(&c.pages_moved, 7);
        assert_eq!(g.estimate_bytes(&c), 118 * PAGE_BYTES);
        // Never below zero.
        bump(&c.pages_moved, 1000);
        assert_eq!(g.estimate_bytes(&c), 0);
    }

    #[test]
    fn the_refill_line_is_half_way_from_the_budget_to_the_throttle_line() {
        const MIB: u64 = 1 << 20;
        assert_eq!(refill_line_bytes(256 * MIB), 272 * MIB);
        assert_eq!(throttle_line_bytes(256 * MIB), 288 * MIB);
        // Small budgets: the slack's floor (8 MiB), halved.
        assert_eq!(refill_line_bytes(16 * MIB), 20 * MIB);
        assert_eq!(throttle_line_bytes(16 * MIB), 24 * MIB);
    }

    /// A sample read after the batches that moved 3 pages, arriving when batches answered
    /// after the read had moved 4 more: those 4 are taken off, not lost in the mark.
    #[test]
    fn a_sample_marked_at_its_read_takes_off_what_moved_after_it() {
        let c = Counters::default();
        let g = RssGauge::default();
        g.on_request(&c);
        bump(&c.pages_moved, 3);
        // The agent reads 100 pages here; then 4 more leave and are counted.
        bump(&c.pages_moved, 4);
        g.on_sample_at(100 * PAGE_BYTES, 3, &c);
        assert_eq!(g.estimate_bytes(&c), 96 * PAGE_BYTES);
        // The plain arrival would have missed them.
        let g2 = RssGauge::default();
        g2.on_request(&c);
        g2.on_sample(100 * PAGE_BYTES, &c);
        assert_eq!(g2.estimate_bytes(&c), 100 * PAGE_BYTES);
        // A mark past the count (a confused agent) is clamped: nothing is added back.
        g.on_sample_at(100 * PAGE_BYTES, 1_000, &c);
        assert_eq!(g.estimate_bytes(&c), 100 * PAGE_BYTES);
    }

    #[test]
    fn an_unanswered_request_keeps_the_oldest_mark() {
        let c = Counters::default();
        let g = RssGauge::default();
        g.on_request(&c);
        bump(&c.pages_restored, 8);
        // The agent was slow: a second tick asks again; its read may be after both.
        g.on_request(&c);
        g.on_sample(50 * PAGE_BYTES, &c);
        assert_eq!(g.estimate_bytes(&c), 58 * PAGE_BYTES);
        // An unrequested sample counts from its arrival.
        g.on_sample(50 * PAGE_BYTES, &c);
        assert_eq!(g.estimate_bytes(&c), 50 * PAGE_BYTES);
    }

    #[test]
    fn holds_only_over_the_line_with_eviction_under_way() {
        let c = Counters::default();
        let g = RssGauge::default();
        let budget = 256 << 20;
        let line = throttle_line_bytes(budget);
        assert_eq!(line, budget + (32 << 20));
        assert_eq!(throttle_line_bytes(32 << 20), (32 + 8) << 20);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        g.on_sample(line + 100 * PAGE_BYTES, &c);
        assert!(g.over_line(&c, Some(line)));
        assert!(!g.over_line(&c, None));
        assert!(!g.should_hold(&c, Some(line)), "no eviction under way");
        // Eviction starts: its first batch gets the benefit of the doubt for a window.
        g.on_tick(&c, true, at(0));
        assert!(g.should_hold(&c, Some(line)), "first batch on its way");
        g.on_tick(&c, true, at(PROGRESS_WINDOW.as_millis() as u64 + 1));
        assert!(!g.should_hold(&c, Some(line)), "first batch never answered");
        g.on_tick(&c, false, at(1005));
        bump(&c.pages_moved, 1);
        g.on_tick(&c, true, at(1010));
        assert!(g.should_hold(&c, Some(line)));
        assert!(!g.should_hold(&c, None), "no budget");
        // The agent answers in batches: ticks without a completion keep holding, within the
        // window.
        g.on_tick(&c, true, at(1020));
        g.on_tick(&c, true, at(1500));
        assert!(g.should_hold(&c, Some(line)), "a batch is on its way");
        g.on_tick(&c, false, at(1510));
        assert!(!g.should_hold(&c, Some(line)), "paused or stalled");
        g.on_tick(&c, true, at(1520));
        assert!(g.should_hold(&c, Some(line)), "under way again");
        g.on_tick(&c, true, at(1520 + PROGRESS_WINDOW.as_millis() as u64 + 1));
        assert!(
            !g.should_hold(&c, Some(line)),
            "no progress for longer than the window"
        );
        bump(&c.pages_moved, 2);
        g.on_tick(&c, true, at(3000));
        assert!(g.should_hold(&c, Some(line)));
        // Moved, but refused more than it moved (a forked child shares the pages): the
        // progress ends at once.
        bump(&c.pages_moved, 2);
        bump(&c.pages_busy, 3);
        g.on_tick(&c, true, at(3010));
        assert!(!g.should_hold(&c, Some(line)), "eviction mostly refused");
        g.on_tick(&c, true, at(3020));
        assert!(
            !g.should_hold(&c, Some(line)),
            "still no progress since, and no new start"
        );
        bump(&c.pages_moved, 3);
        bump(&c.pages_busy, 1);
        g.on_tick(&c, true, at(3030));
        assert!(g.should_hold(&c, Some(line)));
        g.on_sample(line + PAGE_BYTES, &c);
        bump(&c.pages_moved, 1);
        g.on_tick(&c, true, at(3040));
        assert!(!g.should_hold(&c, Some(line)), "at the line");
        assert!(!g.over_line(&c, Some(line)));
    }
}
