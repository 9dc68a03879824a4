//! Replays of trace fixtures (`src/policy/traces/*.txt`; synthetic, written to the shape of
//! measured runs, not captured from the monitor) through the pressure controller and
//! the clock policy, plus unit tests of the controller and the per-region statistics.
//!
//! Two trace formats, both one record per line, `#` comments:
//! - controller traces: `t_ms stall_us refaults evicted_pages rss_pages`, where `stall_us` and
//!   `refaults` accrued since the previous line (the replay sums them into the cumulative
//!   counters the monitor keeps);
//! - page traces: `t_ms touch FIRST-LAST` (page indices, inclusive), a policy tick after each.

use super::controller::{ControllerParams, Decision, PressureController, Sample, State};
use super::regions::RegionStats;
use super::*;
use std::collections::HashMap;

const P: u64 = PAGE_BYTES;
const BASE: u64 = 0x7f00_0000_0000;

/// Pages `[first, first + n)` above BASE, as a region.
fn pages(first: u64, n: u64) -> Range<u64> {
    BASE + first * P..BASE + (first + n) * P
}

/// One controller-trace record.
#[derive(Debug, Clone, Copy)]
struct CtlRecord {
    t_ms: u64,
    stall_us: u64,
    refaults: u64,
    evicted_pages: u64,
    rss_pages: u64,
}

fn data_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

fn parse_ctl(name: &str, text: &str) -> Vec<CtlRecord> {
    data_lines(text)
        .map(|(n, l)| {
            let f: Vec<u64> = l
                .split_whitespace()
                .map(|w| {
                    w.parse()
                        .unwrap_or_else(|_| panic!("{name}:{n}: bad number {w:?}"))
                })
                .collect();
            assert_eq!(f.len(), 5, "{name}:{n}: expected 5 columns");
            CtlRecord {
                t_ms: f[0],
                stall_us: f[1],
                refaults: f[2],
                evicted_pages: f[3],
                rss_pages: f[4],
            }
        })
        .collect()
}

/// A page-trace record: pages `first..=last` touched at `t_ms`.
fn parse_touches(name: &str, text: &str) -> Vec<(u64, u64, u64)> {
    data_lines(text)
        .map(|(n, l)| {
            let w: Vec<&str> = l.split_whitespace().collect();
            assert!(
                w.len() == 3 && w[1] == "touch",
                "{name}:{n}: expected `t_ms touch FIRST-LAST`"
            );
            let (a, b) = w[2]
                .split_once('-')
                .unwrap_or_else(|| panic!("{name}:{n}: bad range"));
            let num = |s: &str| -> u64 { s.parse().unwrap_or_else(|_| panic!("{name}:{n}")) };
            (num(w[0]), num(a), num(b))
        })
        .collect()
}

fn ctl_params() -> ControllerParams {
    ControllerParams {
        stall_target_ns_per_s: 10_000_000, // 10 ms/s
        proactive_bytes_per_sec: 64 << 20, // 16384 pages/s
        promotion_slo_per_min: 0.0,
        cooling: Duration::from_secs(2),
        max_cold_age: Duration::from_secs(30),
    }
}

/// One replayed tick: the decision and the hard eviction target of the clock policy.
struct Replayed {
    rec: CtlRecord,
    d: Decision,
    hard_pages: u64,
}

/// Replays a controller trace with a budget of `budget_pages`, as the control thread does:
/// the clock policy's hard target says whether the budget is being enforced.
fn replay(text: &str, name: &str, params: ControllerParams, budget_pages: u64) -> Vec<Replayed> {
    let pol = ClockPolicy::new(PolicyParams {
        budget_bytes: Some(budget_pages * P),
        cooling: params.cooling,
        tick: Duration::from_millis(100),
        max_evict_bytes_per_sec: 1 << 30,
        batch_pages: 512,
        run_pages: 64,
        hot_ttl: Duration::from_secs(10),
    });
    let mut ctl = PressureController::new(params);
    let (mut stall_ns, mut refaults) = (0u64, 0u64);
    parse_ctl(name, text)
        .into_iter()
        .map(|rec| {
            stall_ns += rec.stall_us * 1000;
            refaults += rec.refaults;
            let hard_pages = pol.eviction_target_pages(rec.rss_pages * P, 0);
            let d = ctl.update(Sample {
                now_ms: rec.t_ms,
                stall_ns,
                refaults,
                evicted_pages: rec.evicted_pages,
                over_budget: hard_pages > 0,
            });
            Replayed { rec, d, hard_pages }
        })
        .collect()
}

fn between(r: &[Replayed], from_ms: u64, to_ms: u64) -> impl Iterator<Item = &Replayed> {
    r.iter()
        .filter(move |x| x.rec.t_ms >= from_ms && x.rec.t_ms < to_ms)
}

// ---- controller: recorded traces ----

#[test]
fn trace_stall_above_target_backs_off_then_probes_again() {
    let r = replay(
        include_str!("traces/stall_backoff.txt"),
        "stall_backoff.txt",
        ctl_params(),
        10_000,
    );
    // 1 ms/s against 10 ms/s: probing at ~90% of 1638 pages per 100 ms.
    for x in between(&r, 100, 3000) {
        assert_eq!(x.d.state, State::Probing, "at {} ms", x.rec.t_ms);
        assert!(
            (1300..=1640).contains(&x.d.proactive_pages),
            "at {} ms: {}",
            x.rec.t_ms,
            x.d.proactive_pages
        );
    }
    // 50 ms/s: the average crosses 10 ms/s within ~250 ms, then no proactive eviction at all.
    for x in between(&r, 3300, 6000) {
        assert_eq!(x.d.state, State::BackingOff, "at {} ms", x.rec.t_ms);
        assert_eq!(x.d.proactive_pages, 0, "at {} ms", x.rec.t_ms);
    }
    // No stall: the average decays under the target (~1.6 s), then probing resumes and
    // approaches the full rate.
    assert!(between(&r, 6000, 7000).all(|x| x.d.proactive_pages == 0));
    for x in between(&r, 8000, 10_001) {
        assert_eq!(x.d.state, State::Probing, "at {} ms", x.rec.t_ms);
        assert!(x.d.proactive_pages > 0);
    }
    let last = r.last().unwrap();
    assert!(
        last.d.proactive_pages >= 1500,
        "near full rate again: {}",
        last.d.proactive_pages
    );
    // Cold age untouched (no SLO).
    assert!(r.iter().all(|x| x.d.cold_age_ms == 2000));
}

#[test]
fn trace_over_budget_enforced_despite_stall_then_proactive_after_stall_drops() {
    let r = replay(
        include_str!("traces/overbudget_stall.txt"),
        "overbudget_stall.txt",
        ctl_params(),
        10_000,
    );
    // Over budget with 80 ms/s of stall: the hard target stands, the state says so, and no
    // proactive pages are added on top.
    for x in between(&r, 0, 2000) {
        assert!(x.hard_pages > 0, "budget not enforced at {} ms", x.rec.t_ms);
        assert_eq!(x.d.state, State::OverBudget);
        assert_eq!(x.d.proactive_pages, 0);
    }
    // Under budget, still stalling: backing off.
    for x in between(&r, 2000, 4000) {
        assert_eq!(x.hard_pages, 0);
        assert_eq!(x.d.state, State::BackingOff, "at {} ms", x.rec.t_ms);
        assert_eq!(x.d.proactive_pages, 0);
    }
    // Stall gone: once the average is under the target, proactive reclaim returns.
    assert_eq!(r.last().unwrap().d.state, State::Probing);
    assert!(between(&r, 4000, 6000).all(|x| x.d.proactive_pages == 0));
    assert!(between(&r, 6500, 8001).all(|x| x.d.proactive_pages > 0));
}

#[test]
fn trace_promotion_slo_breach_raises_cold_age_then_it_decays() {
    let params = ControllerParams {
        promotion_slo_per_min: 0.01, // 1% of the evicted pages per minute
        ..ctl_params()
    };
    let r = replay(
        include_str!("traces/promotion_breach.txt"),
        "promotion_breach.txt",
        params,
        10_000,
    );
    // No refaults yet: probing, cold age at `cooling`.
    for x in between(&r, 0, 5000) {
        assert_eq!(x.d.cold_age_ms, 2000);
        assert_eq!(x.d.state, State::Probing);
    }
    // 3%/min against 1%/min: breach, no proactive eviction, cold age up to its ceiling.
    let breach: Vec<_> = between(&r, 5500, 15_000).collect();
    assert!(breach
        .iter()
        .all(|x| x.d.state == State::SloBreach && x.d.proactive_pages == 0));
    let ages: Vec<u64> = breach.iter().map(|x| x.d.cold_age_ms).collect();
    assert!(ages.windows(2).all(|w| w[0] <= w[1]), "monotonic: {ages:?}");
    assert_eq!(*ages.last().unwrap(), 30_000);
    // Refaults stop at 15 s; they leave the one-minute window by 75 s: the cold age halves
    // back to `cooling` and proactive reclaim resumes.
    let last = r.last().unwrap();
    assert_eq!(last.d.cold_age_ms, 2000);
    assert_eq!(last.d.state, State::Probing);
    assert!(between(&r, 20_000, 70_000).all(|x| x.d.cold_age_ms > 2000));
}

// ---- controller: unit tests ----

#[test]
fn controller_off_by_default_is_idle_and_keeps_cooling() {
    let mut c = PressureController::new(ControllerParams {
        proactive_bytes_per_sec: 0,
        ..ctl_params()
    });
    for t in 0..100 {
        let d = c.update(Sample {
            now_ms: t * 20,
            stall_ns: t * 1_000_000,
            refaults: t * 10,
            evicted_pages: 100,
            over_budget: false,
        });
        assert_eq!(d.state, State::Idle);
        assert_eq!(d.proactive_pages, 0);
        assert_eq!(d.cold_age_ms, 2000);
    }
    assert!(
        c.stall_ms_per_s() > 40.0,
        "still measured: {}",
        c.stall_ms_per_s()
    );
}

#[test]
fn controller_no_stall_target_runs_proactive_at_full_rate_with_credit() {
    // 1 page per second, ticks of 100 ms: one page every 10th tick (fractions carried).
    let mut c = PressureController::new(ControllerParams {
        stall_target_ns_per_s: 0,
        proactive_bytes_per_sec: P,
        ..ctl_params()
    });
    let total: u64 = (0..=100)
        .map(|t| {
            c.update(Sample {
                now_ms: t * 100,
                stall_ns: t * 1_000_000_000, // would be far over any target
                ..Sample::default()
            })
            .proactive_pages
        })
        .sum();
    assert!((9..=10).contains(&total), "{total}");
}

#[test]
fn controller_same_time_sample_decides_nothing_new() {
    let mut c = PressureController::new(ctl_params());
    let s = Sample {
        now_ms: 1000,
        ..Sample::default()
    };
    c.update(s);
    let d = c.update(s);
    assert_eq!(d.proactive_pages, 0);
    let d = c.update(Sample { now_ms: 1100, ..s });
    assert!(d.proactive_pages > 0);
}

#[test]
fn controller_max_cold_age_below_cooling_acts_as_cooling() {
    let mut c = PressureController::new(ControllerParams {
        promotion_slo_per_min: 0.001,
        max_cold_age: Duration::from_millis(500),
        ..ctl_params()
    });
    for t in 0..50 {
        let d = c.update(Sample {
            now_ms: t * 200,
            refaults: t * 100,
            evicted_pages: 1000,
            ..Sample::default()
        });
        assert_eq!(d.cold_age_ms, 2000);
    }
    assert_eq!(c.state(), State::SloBreach);
}

// ---- the budget is held when every page is hot (page trace) ----

#[derive(Clone, Copy, PartialEq, Debug)]
enum Sim {
    /// Never touched: no page there (the hand's view: nothing to evict).
    Untouched,
    Resident,
    Window {
        entered_ms: u64,
    },
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

/// Replays the sequential re-read trace through the clock policy, as the control thread does
/// (hard target, sweep with `hot_fallback_pages` = the chunk when over budget, cooling).
/// Returns the resident pages after each tick and the hot pages chosen.
fn replay_seq(hot_fallback: bool) -> (Vec<u64>, u64) {
    const TOTAL: usize = 1000;
    const BUDGET_PAGES: u64 = 200;
    let touches = parse_touches("seq_reread.txt", include_str!("traces/seq_reread.txt"));
    let mut pol = ClockPolicy::new(PolicyParams {
        budget_bytes: Some(BUDGET_PAGES * P),
        cooling: Duration::from_millis(200),
        tick: Duration::from_millis(20),
        max_evict_bytes_per_sec: 1 << 30,
        batch_pages: 512,
        run_pages: 64,
        hot_ttl: Duration::from_secs(10),
    });
    let regions = [pages(0, TOTAL as u64)];
    let mut state = vec![Sim::Untouched; TOTAL];
    let mut hot_since: HashMap<u64, u64> = HashMap::new();
    let mut resident_after = Vec::new();
    let mut hot_chosen = 0u64;
    for (now_ms, first, last) in touches {
        for i in first..=last {
            let s = &mut state[i as usize];
            if !matches!(*s, Sim::Resident | Sim::Untouched) {
                // A refault: the monitor marks the faulting page hot.
                hot_since.insert(BASE + i * P, now_ms);
            }
            *s = Sim::Resident;
        }
        let resident = |s: &[Sim]| s.iter().filter(|s| **s == Sim::Resident).count() as u64;
        let want = pol.eviction_target_pages(resident(&state) * P, 0);
        let mut view = SimView {
            state: &state,
            hot_since: &mut hot_since,
        };
        let limits = SweepLimits {
            want_pages: want,
            max_scan_pages: want * 16 + 4096,
            hot_fallback_pages: if hot_fallback { want } else { 0 },
        };
        for r in pol.sweep_with(now_ms, &regions, &mut view, limits) {
            for k in 0..u64::from(r.pages) {
                let i = ((r.addr - BASE) / P + k) as usize;
                assert_eq!(state[i], Sim::Resident, "chose a non-resident page");
                if hot_since.remove(&(r.addr + k * P)).is_some() {
                    hot_chosen += 1;
                }
                state[i] = Sim::Window { entered_ms: now_ms };
            }
        }
        resident_after.push(resident(&state));
        let fifo: Vec<(u64, u64)> = state
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Sim::Window { entered_ms } => Some((i as u64, *entered_ms)),
                _ => None,
            })
            .collect();
        for id in pol.cooled(now_ms, fifo, 8192, 64) {
            state[id as usize] = Sim::Stored;
        }
    }
    (resident_after, hot_chosen)
}

#[test]
fn trace_seq_reread_budget_held_when_all_pages_hot() {
    let (resident, hot_chosen) = replay_seq(true);
    // After every tick, from the first pass on: at most the budget.
    assert!(
        resident.iter().all(|&r| r <= 200),
        "resident over budget: {resident:?}"
    );
    // From the second pass on every page is hot; the budget was held by taking hot pages.
    assert!(hot_chosen > 1000, "hot pages chosen: {hot_chosen}");
}

#[test]
fn trace_seq_reread_without_fallback_overshoots_budget_regression() {
    // The defect the fallback fixes (bench/run: 965 MiB resident for a 256 MiB budget).
    let (resident, hot_chosen) = replay_seq(false);
    assert_eq!(hot_chosen, 0);
    let max = *resident.iter().max().unwrap();
    assert!(
        max >= 900,
        "expected the hot pages to overrun the budget: {max}"
    );
}

// ---- sweep: hot fallback ----

#[test]
fn sweep_hot_fallback_takes_oldest_hot_in_address_order() {
    let mut pol = ClockPolicy::new(PolicyParams {
        budget_bytes: Some(1000 * P),
        cooling: Duration::from_secs(2),
        tick: Duration::from_millis(20),
        max_evict_bytes_per_sec: 1 << 30,
        batch_pages: 512,
        run_pages: 2,
        hot_ttl: Duration::from_secs(10),
    });
    let mut hot = HashMap::new();
    // Pages 0..6 hot, marked at 600, 500, 400, 300, 200, 100 ms; page 6 a candidate.
    for i in 0..6u64 {
        hot.insert(BASE + i * P, 600 - i * 100);
    }
    let state = vec![Sim::Resident; 7];
    let mut view = SimView {
        state: &state,
        hot_since: &mut hot,
    };
    let runs = pol.sweep_with(
        1000,
        &[pages(0, 7)],
        &mut view,
        SweepLimits {
            want_pages: 4,
            max_scan_pages: 100,
            hot_fallback_pages: 4,
        },
    );
    // One candidate (page 6), then the 3 oldest hot pages (5, 4, 3) in address order, in runs
    // of at most 2.
    let r = |i: u64, pages: u32| Run {
        addr: BASE + i * P,
        pages,
    };
    assert_eq!(runs, vec![r(6, 1), r(3, 2), r(5, 1)]);
}

#[test]
fn sweep_hot_fallback_never_crosses_region_boundary_and_zero_means_never() {
    let mut pol = ClockPolicy::new(PolicyParams {
        budget_bytes: Some(1000 * P),
        cooling: Duration::from_secs(2),
        tick: Duration::from_millis(20),
        max_evict_bytes_per_sec: 1 << 30,
        batch_pages: 512,
        run_pages: 64,
        hot_ttl: Duration::from_secs(10),
    });
    let mut hot: HashMap<u64, u64> = (0..4u64).map(|i| (BASE + i * P, 100)).collect();
    let state = vec![Sim::Resident; 4];
    let regions = [BASE..BASE + 2 * P, BASE + 2 * P..BASE + 4 * P];
    let limits = |fb| SweepLimits {
        want_pages: 4,
        max_scan_pages: 100,
        hot_fallback_pages: fb,
    };
    let mut view = SimView {
        state: &state,
        hot_since: &mut hot,
    };
    assert!(pol
        .sweep_with(1000, &regions, &mut view, limits(0))
        .is_empty());
    let runs = pol.sweep_with(1000, &regions, &mut view, limits(4));
    let r = |i: u64, pages: u32| Run {
        addr: BASE + i * P,
        pages,
    };
    assert_eq!(runs, vec![r(0, 2), r(2, 2)]);
}

// ---- per-region statistics ----

#[test]
fn region_stats_attribute_and_follow_snapshots() {
    let mut s = RegionStats::default();
    let a = BASE..BASE + 10 * P;
    let b = BASE + 20 * P..BASE + 30 * P;
    s.sync(&[a.clone(), b.clone()]);
    s.record_evicted(BASE + P, 4);
    s.record_evicted(BASE + 25 * P, 2);
    s.record_refault(BASE + 2 * P);
    s.record_refault(BASE + 2 * P);
    s.record_refault(BASE + 21 * P);
    s.record_refault(BASE + 15 * P); // between regions
    assert_eq!(s.unattributed_refaults, 1);
    let top = s.top(4);
    assert_eq!(top.len(), 2);
    assert_eq!(top[0].start, a.start);
    assert_eq!((top[0].evicted_pages, top[0].refaults), (4, 2));
    assert!((top[0].refault_ratio - 0.5).abs() < 1e-9);
    assert_eq!((top[1].evicted_pages, top[1].refaults), (2, 1));
    // `a` grows in place: counts kept; `b` is gone: dropped.
    s.sync(&[pages(0, 12)]);
    assert_eq!(s.len(), 1);
    let g = s.get(BASE).unwrap();
    assert_eq!((g.bytes, g.evicted_pages, g.refaults), (12 * P, 4, 2));
    assert_eq!(s.get(b.start), None);
    assert_eq!(s.top(0), vec![]);
}
