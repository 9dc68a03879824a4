//! Tests of the clock policy: budget arithmetic, the sweep, cooling, a simulated trace, and a
//! property test of the sweep's invariants. A `HashMap` stands in for the monitor's page map.

use super::*;
use proptest::prelude::*;
use std::collections::HashMap;

const P: u64 = PAGE_BYTES;
const BASE: u64 = 0x7f00_0000_0000;

fn params() -> PolicyParams {
    PolicyParams {
        budget_bytes: Some(1000 * P),
        cooling: Duration::from_secs(2),
        tick: Duration::from_millis(20),
        max_evict_bytes_per_sec: 1 << 30,
        batch_pages: 512,
        run_pages: 64,
        hot_ttl: Duration::from_secs(10),
    }
}

/// Page map stand-in: pages not in the map are candidates.
#[derive(Default)]
struct FakeView {
    classes: HashMap<u64, PageClass>,
    cleared: Vec<u64>,
}

impl FakeView {
    fn with(pages: &[(u64, PageClass)]) -> Self {
        let mut v = FakeView::default();
        for &(i, c) in pages {
            v.classes.insert(BASE + i * P, c);
        }
        v
    }
}

impl PageView for FakeView {
    fn class(&self, page_addr: u64) -> PageClass {
        assert_eq!(page_addr % P, 0, "unaligned page address {page_addr:#x}");
        self.classes
            .get(&page_addr)
            .copied()
            .unwrap_or(PageClass::Candidate)
    }
    fn clear_hot(&mut self, page_addr: u64) {
        self.classes.remove(&page_addr);
        self.cleared.push(page_addr);
    }
}

/// Pages `[first, first + n)` above BASE, as a region.
fn region(first: u64, n: u64) -> Range<u64> {
    BASE + first * P..BASE + (first + n) * P
}

fn run(first: u64, pages: u32) -> Run {
    Run {
        addr: BASE + first * P,
        pages,
    }
}

// ---- budget arithmetic ----

#[test]
fn target_no_budget_is_zero() {
    let pol = ClockPolicy::new(PolicyParams {
        budget_bytes: None,
        ..params()
    });
    assert_eq!(pol.eviction_target_pages(u64::MAX / 2, 0), 0);
}

#[test]
fn target_under_or_at_budget_is_zero() {
    let pol = ClockPolicy::new(params());
    assert_eq!(pol.eviction_target_pages(0, 0), 0);
    assert_eq!(pol.eviction_target_pages(999 * P, 0), 0);
    assert_eq!(pol.eviction_target_pages(1000 * P, 0), 0);
}

#[test]
fn target_over_budget_aims_below_it_hysteresis() {
    let pol = ClockPolicy::new(params());
    // low water = 1000 - 1000/64 pages (in bytes: 1000P - 1000P/64 = 984.375 pages).
    let low_water = 1000 * P - 1000 * P / 64;
    let t = pol.eviction_target_pages(1001 * P, 0);
    assert_eq!(t, (1001 * P - low_water).div_ceil(P));
    assert_eq!(t, 17);
    // Somewhere between low water and budget: no eviction (no oscillation around budget).
    assert_eq!(pol.eviction_target_pages(990 * P, 0), 0);
    // A partial page over budget still evicts whole pages.
    assert_eq!(pol.eviction_target_pages(1000 * P + 1, 0), 16);
}

#[test]
fn target_subtracts_inflight() {
    let pol = ClockPolicy::new(params());
    assert_eq!(pol.eviction_target_pages(1100 * P, 0), 116);
    assert_eq!(pol.eviction_target_pages(1100 * P, 100), 16);
    assert_eq!(pol.eviction_target_pages(1100 * P, 500), 0);
}

#[test]
fn target_capped_by_rate() {
    // 1 MiB/s * 20ms = 20971 bytes = 5 pages per tick.
    let pol = ClockPolicy::new(PolicyParams {
        max_evict_bytes_per_sec: 1 << 20,
        ..params()
    });
    assert_eq!(pol.rate_cap_pages(), 5);
    assert_eq!(pol.eviction_target_pages(2000 * P, 0), 5);
    assert_eq!(pol.eviction_target_pages(2000 * P, 3), 5);
    // Default: 1 GiB/s * 20ms = 5242 pages.
    let pol = ClockPolicy::new(params());
    assert_eq!(pol.rate_cap_pages(), 5242);
    // A tiny rate still makes progress.
    let pol = ClockPolicy::new(PolicyParams {
        max_evict_bytes_per_sec: 1,
        ..params()
    });
    assert_eq!(pol.eviction_target_pages(2000 * P, 0), 1);
}

// ---- sweep ----

#[test]
fn sweep_all_candidates_split_at_run_pages() {
    let mut pol = ClockPolicy::new(PolicyParams {
        run_pages: 4,
        ..params()
    });
    let mut view = FakeView::default();
    let runs = pol.sweep(0, &[region(0, 10)], &mut view, 10, 100);
    assert_eq!(runs, vec![run(0, 4), run(4, 4), run(8, 2)]);
    assert_eq!(pol.hand_addr(), BASE + 10 * P);
}

#[test]
fn sweep_run_limit_bounded_by_batch_pages() {
    let mut pol = ClockPolicy::new(PolicyParams {
        run_pages: 64,
        batch_pages: 3,
        ..params()
    });
    let runs = pol.sweep(0, &[region(0, 7)], &mut FakeView::default(), 7, 100);
    assert_eq!(runs, vec![run(0, 3), run(3, 3), run(6, 1)]);
}

#[test]
fn sweep_runs_split_at_non_candidates() {
    let mut pol = ClockPolicy::new(params());
    let mut view = FakeView::with(&[
        (2, PageClass::Busy),
        (5, PageClass::Hot { since_ms: 0 }),
        (6, PageClass::Busy),
    ]);
    let runs = pol.sweep(1000, &[region(0, 10)], &mut view, 100, 100);
    assert_eq!(runs, vec![run(0, 2), run(3, 2), run(7, 3)]);
    assert!(view.cleared.is_empty(), "hot page within ttl must stay hot");
}

#[test]
fn sweep_runs_split_at_region_boundary_even_if_adjacent() {
    let mut pol = ClockPolicy::new(params());
    let runs = pol.sweep(
        0,
        &[region(0, 3), region(3, 3)],
        &mut FakeView::default(),
        6,
        100,
    );
    assert_eq!(runs, vec![run(0, 3), run(3, 3)]);
}

#[test]
fn sweep_stops_at_want_pages_and_resumes_from_hand() {
    let mut pol = ClockPolicy::new(params());
    let mut view = FakeView::default();
    let regions = [region(0, 10)];
    assert_eq!(pol.sweep(0, &regions, &mut view, 3, 100), vec![run(0, 3)]);
    assert_eq!(pol.hand_addr(), BASE + 3 * P);
    assert_eq!(pol.sweep(0, &regions, &mut view, 3, 100), vec![run(3, 3)]);
}

#[test]
fn sweep_wraps_around_at_most_once() {
    let mut pol = ClockPolicy::new(params());
    let regions = [region(0, 4), region(10, 4)];
    pol.set_hand_addr(BASE + 12 * P);
    let mut view = FakeView::with(&[(1, PageClass::Busy)]);
    let runs = pol.sweep(0, &regions, &mut view, 100, 100);
    // From the hand to the end, wrap to the first region, stop where it started.
    assert_eq!(runs, vec![run(12, 2), run(0, 1), run(2, 2), run(10, 2)]);
    assert_eq!(pol.hand_addr(), BASE + 12 * P);
}

#[test]
fn sweep_hot_skipped_then_cleared_after_ttl_then_chosen_next_pass() {
    let mut pol = ClockPolicy::new(params()); // hot_ttl 10s
    let regions = [region(0, 3)];
    let mut view = FakeView::with(&[(1, PageClass::Hot { since_ms: 5_000 })]);
    // Within ttl: skipped, mark kept.
    let runs = pol.sweep(14_999, &regions, &mut view, 100, 100);
    assert_eq!(runs, vec![run(0, 1), run(2, 1)]);
    assert!(view.cleared.is_empty());
    // ttl over: mark cleared, but not chosen on this pass.
    let runs = pol.sweep(15_000, &regions, &mut view, 100, 100);
    assert_eq!(runs, vec![run(0, 1), run(2, 1)]);
    assert_eq!(view.cleared, vec![BASE + P]);
    // Next pass: a candidate like any other.
    let runs = pol.sweep(15_020, &regions, &mut view, 100, 100);
    assert_eq!(runs, vec![run(0, 3)]);
}

#[test]
fn sweep_regions_changed_hand_moves_to_next_region_above() {
    let mut pol = ClockPolicy::new(params());
    pol.set_hand_addr(BASE + 5 * P); // in a region that has since been unmapped
    let runs = pol.sweep(
        0,
        &[region(0, 2), region(8, 2)],
        &mut FakeView::default(),
        1,
        100,
    );
    assert_eq!(runs, vec![run(8, 1)]);
    // Hand above every region: wrap to the first.
    pol.set_hand_addr(BASE + 100 * P);
    let runs = pol.sweep(
        0,
        &[region(0, 2), region(8, 2)],
        &mut FakeView::default(),
        1,
        100,
    );
    assert_eq!(runs, vec![run(0, 1)]);
}

#[test]
fn sweep_empty_regions_return_nothing() {
    let mut pol = ClockPolicy::new(params());
    let mut view = FakeView::default();
    assert!(pol.sweep(0, &[], &mut view, 10, 10).is_empty());
    assert!(pol
        .sweep(0, &[region(3, 0), region(5, 0)], &mut view, 10, 10)
        .is_empty());
    assert!(pol.sweep(0, &[region(0, 4)], &mut view, 0, 10).is_empty());
    assert!(pol.sweep(0, &[region(0, 4)], &mut view, 10, 0).is_empty());
    // Only an empty region among real ones: ignored.
    let runs = pol.sweep(0, &[region(0, 0), region(2, 1)], &mut view, 10, 10);
    assert_eq!(runs, vec![run(2, 1)]);
}

#[test]
fn sweep_max_scan_bounds_examined_pages() {
    let mut pol = ClockPolicy::new(params());
    let mut view = FakeView::with(&(0..8).map(|i| (i, PageClass::Busy)).collect::<Vec<_>>());
    let runs = pol.sweep(0, &[region(0, 20)], &mut view, 10, 5);
    assert!(runs.is_empty());
    assert_eq!(pol.hand_addr(), BASE + 5 * P);
    let runs = pol.sweep(0, &[region(0, 20)], &mut view, 10, 5);
    assert_eq!(runs, vec![run(8, 2)]);
}

#[test]
fn sweep_next_interesting_skips_without_counting_against_scan() {
    struct Skipping(FakeView);
    impl PageView for Skipping {
        fn class(&self, a: u64) -> PageClass {
            self.0.class(a)
        }
        fn clear_hot(&mut self, a: u64) {
            self.0.clear_hot(a)
        }
        fn next_interesting(&self, from: u64, end: u64) -> u64 {
            // Pages 0..1000 are all busy: jump over them (unaligned answer on purpose).
            if from < BASE + 1000 * P {
                (BASE + 1000 * P - 1).min(end)
            } else {
                from
            }
        }
    }
    let mut pol = ClockPolicy::new(params());
    let mut view = Skipping(FakeView::default());
    let runs = pol.sweep(0, &[region(0, 1010)], &mut view, 4, 4);
    assert_eq!(runs, vec![run(1000, 4)]);
}

#[test]
fn sweep_unaligned_hand_and_regions_stay_page_aligned() {
    let mut pol = ClockPolicy::new(params());
    pol.set_hand_addr(BASE + P + 123);
    assert_eq!(pol.hand_addr(), BASE + P);
    let unaligned = Range {
        start: BASE + 5,
        end: BASE + 4 * P + 7,
    };
    let runs = pol.sweep(0, &[unaligned], &mut FakeView::default(), 100, 100);
    // Shrunk to the whole pages [1, 4); starts at the hand (page 1).
    assert_eq!(runs, vec![run(1, 3)]);
    for r in &runs {
        assert_eq!(r.addr % P, 0);
    }
}

// ---- cooling ----

#[test]
fn cooled_by_age_only() {
    let pol = ClockPolicy::new(params()); // cooling 2s
    let fifo = [(1, 0), (2, 500), (3, 1_000), (4, 2_500)];
    assert_eq!(pol.cooled(2_000, fifo, 100, 10), vec![1]);
    assert_eq!(pol.cooled(3_000, fifo, 100, 10), vec![1, 2, 3]);
    assert_eq!(pol.cooled(100, fifo, 100, 10), Vec::<u64>::new());
    // Clock before entry time (should not happen): age 0, not cooled.
    assert_eq!(pol.cooled(0, [(9, 50)], 100, 10), Vec::<u64>::new());
}

#[test]
fn cooled_window_pressure_takes_oldest_early() {
    let pol = ClockPolicy::new(params());
    let fifo = [(1, 0), (2, 500), (3, 1_000), (4, 1_500)];
    // 3 slots short, nothing aged yet: the 3 oldest.
    assert_eq!(pol.cooled(1_600, fifo, 2, 5), vec![1, 2, 3]);
    // 1 slot short, 2 aged: aged ones already relieve it.
    assert_eq!(pol.cooled(2_600, fifo, 4, 5), vec![1, 2]);
    // More pressure than entries: all of them.
    assert_eq!(pol.cooled(0, fifo, 0, 100), vec![1, 2, 3, 4]);
}

// ---- recorded trace ----

/// Page state in the simulated monitor.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Sim {
    Resident,
    Window { entered_ms: u64 },
    Stored,
}

struct SimView<'a> {
    state: &'a [Sim],
    hot_since: &'a mut HashMap<u64, u64>,
}

impl PageView for SimView<'_> {
    fn class(&self, page_addr: u64) -> PageClass {
        let i = ((page_addr - BASE) / P) as usize;
        match (self.state[i], self.hot_since.get(&page_addr)) {
            (Sim::Resident, Some(&since_ms)) => PageClass::Hot { since_ms },
            (Sim::Resident, None) => PageClass::Candidate,
            _ => PageClass::Busy,
        }
    }
    fn clear_hot(&mut self, page_addr: u64) {
        self.hot_since.remove(&page_addr);
    }
}

/// A program with a hot working set of 100 pages (touched every tick) and 1000 cold pages
/// (one of them touched every 5th tick, pseudo-randomly), budget 200 pages, 2000 ticks of
/// 20ms. The resident set must converge under budget (plus a little slack: a cold page
/// refaulted from the window counts as hot and is protected for hot_ttl) and the hot pages
/// must stop refaulting.
#[test]
fn trace_hot_set_stays_resident_under_budget() {
    const HOT: usize = 100;
    const TOTAL: usize = 1100;
    const BUDGET_PAGES: u64 = 200;
    const TICKS: u64 = 2000;
    let mut pol = ClockPolicy::new(PolicyParams {
        budget_bytes: Some(BUDGET_PAGES * P),
        ..params()
    });
    let regions = [region(0, TOTAL as u64)];
    let mut state = vec![Sim::Resident; TOTAL];
    let mut hot_since: HashMap<u64, u64> = HashMap::new();
    let mut lcg: u64 = 12345;
    let mut hot_refaults_per_tick = Vec::new();
    let mut resident_after_evict = Vec::new();
    let mut hot_resident_before_access = Vec::new();

    for t in 0..TICKS {
        let now_ms = t * 20;
        // The program runs: touches its hot set and two cold pages.
        hot_resident_before_access
            .push(state[..HOT].iter().filter(|s| **s == Sim::Resident).count());
        let mut touched: Vec<usize> = (0..HOT).collect();
        if t % 5 == 0 {
            lcg = lcg
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            touched.push(HOT + (lcg >> 33) as usize % (TOTAL - HOT));
        }
        let mut hot_refaults = 0;
        for i in touched {
            if state[i] != Sim::Resident {
                if i < HOT {
                    hot_refaults += 1;
                }
                // Refault from the window means hot; from the store it is brought back too
                // and (as the monitor does for window refaults) marked hot.
                if matches!(state[i], Sim::Window { .. }) {
                    hot_since.insert(BASE + i as u64 * P, now_ms);
                }
                state[i] = Sim::Resident;
            }
        }
        hot_refaults_per_tick.push(hot_refaults);

        // The policy tick.
        let resident = state.iter().filter(|s| **s == Sim::Resident).count() as u64;
        let want = pol
            .eviction_target_pages(resident * P, 0)
            .min(u64::from(pol.params().batch_pages));
        let mut view = SimView {
            state: &state,
            hot_since: &mut hot_since,
        };
        let runs = pol.sweep(now_ms, &regions, &mut view, want, TOTAL as u64);
        for r in runs {
            for k in 0..u64::from(r.pages) {
                let i = ((r.addr - BASE) / P + k) as usize;
                assert_eq!(state[i], Sim::Resident);
                state[i] = Sim::Window { entered_ms: now_ms };
            }
        }
        resident_after_evict.push(state.iter().filter(|s| **s == Sim::Resident).count() as u64);

        // Cooling: the window holds 8192 pages; no pressure here.
        let mut fifo: Vec<(u64, u64)> = state
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Sim::Window { entered_ms } => Some((i as u64, *entered_ms)),
                _ => None,
            })
            .collect();
        fifo.sort_by_key(|&(i, e)| (e, i));
        let free = 8192 - fifo.len() as u64;
        for id in pol.cooled(now_ms, fifo, free, 64) {
            state[id as usize] = Sim::Stored;
        }
    }

    // Converged: after every tick in the second half, resident is within the budget + 5%.
    let second_half = (TICKS / 2) as usize..;
    assert!(
        resident_after_evict[second_half.clone()]
            .iter()
            .all(|&r| r <= BUDGET_PAGES + BUDGET_PAGES / 20),
        "resident over budget: {:?}",
        &resident_after_evict[second_half.clone()]
    );
    // The first eviction took hot pages (the hand cannot know yet); they came back once.
    let early: usize = hot_refaults_per_tick[..10].iter().sum();
    assert!(
        early >= 50,
        "expected the first sweep to hit the hot set, got {early}"
    );
    // Later, hot pages rarely refault: well under one per tick.
    let late: usize = hot_refaults_per_tick[second_half.clone()].iter().sum();
    let late_rate = late as f64 / (TICKS / 2) as f64;
    assert!(late_rate < 0.25, "hot refault rate {late_rate} per tick");
    // And they are mostly resident when the program touches them.
    let hot_res: usize = hot_resident_before_access[second_half].iter().sum();
    let hot_res_avg = hot_res as f64 / (TICKS / 2) as f64;
    assert!(
        hot_res_avg >= 99.0,
        "hot pages resident on average {hot_res_avg}"
    );
}

// ---- property test ----

fn class_of(code: u8) -> PageClass {
    match code % 4 {
        0 | 1 => PageClass::Candidate,
        2 => PageClass::Hot {
            since_ms: u64::from(code) * 100,
        },
        _ => PageClass::Busy,
    }
}

proptest! {
    #[test]
    fn sweep_invariants_hold(
        spans in prop::collection::vec((0u64..6, 0u64..40), 0..6),
        codes in prop::collection::vec(any::<u8>(), 300),
        hand_page in 0u64..320,
        run_pages in 1u32..10,
        want in 0u64..200,
        max_scan in 0u64..400,
        now_ms in 0u64..30_000,
        calls in 1usize..4,
    ) {
        // Sorted, non-overlapping regions from (gap, length) pairs.
        let mut regions = Vec::new();
        let mut next = 0u64;
        for (gap, len) in spans {
            let start = next + gap;
            regions.push(region(start, len));
            next = start + len;
        }
        let mut view = FakeView::with(
            &codes.iter().enumerate().map(|(i, &c)| (i as u64, class_of(c))).collect::<Vec<_>>(),
        );
        let mut pol = ClockPolicy::new(PolicyParams { run_pages, ..params() });
        pol.set_hand_addr(BASE + hand_page * P);
        for _ in 0..calls {
            let before: HashMap<u64, PageClass> = view.classes.clone();
            let runs = pol.sweep(now_ms, &regions, &mut view, want, max_scan);
            let total: u64 = runs.iter().map(|r| u64::from(r.pages)).sum();
            prop_assert!(total <= want);
            prop_assert!(total <= max_scan);
            let mut seen = std::collections::HashSet::new();
            for r in &runs {
                prop_assert!(r.pages >= 1 && r.pages <= run_pages);
                prop_assert_eq!(r.addr % P, 0);
                prop_assert!(
                    regions.iter().any(|g| g.start <= r.addr && r.end_addr() <= g.end),
                    "run {:?} outside regions", r
                );
                for k in 0..u64::from(r.pages) {
                    let a = r.addr + k * P;
                    prop_assert!(seen.insert(a), "page {:#x} chosen twice", a);
                    let class = before.get(&a).copied().unwrap_or(PageClass::Candidate);
                    prop_assert_eq!(class, PageClass::Candidate);
                }
            }
            // Mark chosen pages busy, as the monitor would.
            for a in seen {
                view.classes.insert(a, PageClass::Busy);
            }
        }
    }
}
