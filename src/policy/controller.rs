//! The pressure controller: how much to evict *below* the budget, and how long a trial-evicted
//! page must stay untouched before it is compressed (the cold age).
//!
//! Owns the feedback arithmetic of two signals the monitor measures: the stall time of the
//! program's threads on uswap faults (a Senpai-style pressure target) and the promotion rate
//! (refaults per minute as a fraction of the evicted pages, a far-memory SLO in the spirit of
//! Google's). Must not touch any syscall, clock, page map or counter: the caller passes
//! cumulative counter values and the time in milliseconds, so every decision is a pure
//! function of the samples fed in, and a recorded trace replays to the same decisions.
//!
//! # What it decides, and what it does not
//!
//! - The **budget is a hard limit** and is not the controller's business: while RssAnon is over
//!   it, [`super::ClockPolicy::eviction_target_pages`] asks for eviction at the full
//!   `max_evict_rate`, from the oldest hot pages if no cold candidate is left; stall does not
//!   slow it, and the budget never grows. The controller only reports [`State::OverBudget`].
//! - **Proactive reclaim** (below the budget, or with no budget) is the controller's: up to
//!   `proactive_rate` bytes per second of trial eviction of cold candidates (hot pages are never
//!   taken for it), scaled by `1 - stall / stall_target`; none while the stall is at or above
//!   the target ([`State::BackingOff`]) or the promotion SLO is breached ([`State::SloBreach`]).
//!   Off when `proactive_rate` is 0 (the default).
//! - **Cold age**: the time a trial-evicted page waits untouched in the window before it is
//!   compressed. It starts at `cooling` (its floor); each second in breach of the promotion SLO
//!   doubles it, up to `max_cold_age`; each second under half the SLO halves it, down to
//!   `cooling`. (Window pressure still compresses the oldest pages early: the window is
//!   bounded.)
//!
//! # Signals
//!
//! - Stall: ns of stall accrued since the previous sample, divided by the wall time between
//!   them, smoothed with an exponential moving average of time constant [`STALL_TAU_MS`].
//!   Reported in ms of stall per second of wall time (1000 = one thread stalled all the time).
//! - Promotion rate: refaults in the last [`PROMOTION_WINDOW_MS`] (per-second buckets), scaled
//!   to a minute (extrapolated while less than a minute has been seen, from at least one
//!   second), divided by the pages evicted now (window + store).

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::Duration;

/// Bytes in one page.
const PAGE_BYTES: u64 = crate::PAGE_SIZE as u64;

/// Time constant of the stall average, in ms.
pub const STALL_TAU_MS: u64 = 1_000;

/// Span of the promotion-rate window, in ms.
pub const PROMOTION_WINDOW_MS: u64 = 60_000;

/// How often the cold age may change, in ms.
pub const COLD_AGE_STEP_MS: u64 = 1_000;

/// The controller's knobs; a subset of the program's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ControllerParams {
    /// Stall the program may see, in ns per second of wall time; 0 = no stall feedback
    /// (proactive reclaim, if on, runs at its full rate).
    pub stall_target_ns_per_s: u64,
    /// Proactive reclaim rate at zero stall, bytes per second; 0 = no proactive reclaim.
    pub proactive_bytes_per_sec: u64,
    /// Promotion SLO: refaults per minute as a fraction of the evicted pages; 0 = no SLO.
    pub promotion_slo_per_min: f64,
    /// Floor of the cold age (config `cooling`).
    pub cooling: Duration,
    /// Ceiling of the cold age (config `max_cold_age`; below `cooling` it counts as `cooling`).
    pub max_cold_age: Duration,
}

/// What the controller is doing, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Under budget and no proactive reclaim configured: nothing to do.
    #[default]
    Idle,
    /// RssAnon over the budget: the hard limit is being enforced (at full rate).
    OverBudget,
    /// Proactive reclaim running, stall under the target.
    Probing,
    /// Stall at or above the target: no proactive reclaim.
    BackingOff,
    /// Promotion rate above the SLO: no proactive reclaim, the cold age is raised.
    SloBreach,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::OverBudget => "over-budget",
            State::Probing => "probing",
            State::BackingOff => "backing-off",
            State::SloBreach => "slo-breach",
        }
    }
}

/// One sample of the monitor's counters, taken at a policy tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sample {
    /// Monitor clock, ms.
    pub now_ms: u64,
    /// Cumulative stall of the program's threads on faults in evicted memory (served from the
    /// window or store, or parked on a page in flight), ns.
    pub stall_ns: u64,
    /// Cumulative refaults (faults served from the window or the store).
    pub refaults: u64,
    /// Pages evicted now (in the window or the store).
    pub evicted_pages: u64,
    /// Whether the hard budget is being enforced this tick (RssAnon over the budget).
    pub over_budget: bool,
}

/// The controller's answer for one tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Pages of proactive trial eviction for this tick (cold candidates only).
    pub proactive_pages: u64,
    /// Trial-evicted pages untouched this long are compressed.
    pub cold_age_ms: u64,
    pub state: State,
}

/// The controller of one program.
#[derive(Debug, Clone)]
pub struct PressureController {
    params: ControllerParams,
    /// The previous sample (None before the first).
    last: Option<Sample>,
    /// Smoothed stall, ns per second of wall time.
    stall_ns_per_s: f64,
    /// Refaults per second bucket (bucket = now_ms / 1000), oldest first.
    buckets: VecDeque<(u64, u64)>,
    /// When the first sample came (start of the promotion window).
    first_ms: Option<u64>,
    promotion_per_min: f64,
    cold_age_ms: u64,
    last_cold_step_ms: u64,
    /// Fractional pages of proactive credit carried to the next tick.
    credit_pages: f64,
    state: State,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl PressureController {
    pub fn new(params: ControllerParams) -> Self {
        let cold_age_ms = ms(params.cooling);
        PressureController {
            params,
            last: None,
            stall_ns_per_s: 0.0,
            buckets: VecDeque::new(),
            first_ms: None,
            promotion_per_min: 0.0,
            cold_age_ms,
            last_cold_step_ms: 0,
            credit_pages: 0.0,
            state: State::Idle,
        }
    }

    pub fn params(&self) -> &ControllerParams {
        &self.params
    }

    /// Replaces the parameters; the measured state stays, the cold age is clamped to the new
    /// bounds.
    pub fn set_params(&mut self, params: ControllerParams) {
        self.params = params;
        self.cold_age_ms = self.cold_age_ms.clamp(self.floor_ms(), self.ceiling_ms());
    }

    /// Whether proactive reclaim is configured (the monitor then evicts without a budget too).
    pub fn proactive(&self) -> bool {
        self.params.proactive_bytes_per_sec > 0
    }

    /// Smoothed stall in ms per second of wall time.
    pub fn stall_ms_per_s(&self) -> f64 {
        self.stall_ns_per_s / 1e6
    }

    /// Refaults per minute as a fraction of the evicted pages (last computed).
    pub fn promotion_rate_per_min(&self) -> f64 {
        self.promotion_per_min
    }

    pub fn cold_age_ms(&self) -> u64 {
        self.cold_age_ms
    }

    pub fn state(&self) -> State {
        self.state
    }

    fn floor_ms(&self) -> u64 {
        ms(self.params.cooling)
    }

    fn ceiling_ms(&self) -> u64 {
        ms(self.params.max_cold_age).max(self.floor_ms())
    }

    /// Feeds one sample and decides the tick. Samples must come in time order; a sample no
    /// later than the previous one only re-decides (no time passed, no proactive pages).
    pub fn update(&mut self, s: Sample) -> Decision {
        let first_ms = *self.first_ms.get_or_insert(s.now_ms);
        let dt_ms = self.last.map_or(0, |l| s.now_ms.saturating_sub(l.now_ms));
        if let Some(l) = self.last.filter(|_| dt_ms > 0) {
            // Stall: instantaneous rate over the interval, folded into the average.
            let stall = s.stall_ns.saturating_sub(l.stall_ns) as f64;
            let inst_ns_per_s = stall * 1000.0 / dt_ms as f64;
            let alpha = 1.0 - (-(dt_ms as f64) / STALL_TAU_MS as f64).exp();
            self.stall_ns_per_s += alpha * (inst_ns_per_s - self.stall_ns_per_s);
            // Refaults into the bucket of this second.
            let refaults = s.refaults.saturating_sub(l.refaults);
            let sec = s.now_ms / 1000;
            match self.buckets.back_mut() {
                Some((b, n)) if *b == sec => *n += refaults,
                _ => self.buckets.push_back((sec, refaults)),
            }
        }
        // Forget buckets that left the window.
        let oldest_sec = s.now_ms.saturating_sub(PROMOTION_WINDOW_MS) / 1000;
        while self.buckets.front().is_some_and(|(b, _)| *b < oldest_sec) {
            self.buckets.pop_front();
        }
        let seen_ms = s
            .now_ms
            .saturating_sub(first_ms)
            .clamp(1000, PROMOTION_WINDOW_MS);
        let recent: u64 = self.buckets.iter().map(|(_, n)| n).sum();
        self.promotion_per_min = if s.evicted_pages == 0 {
            0.0
        } else {
            recent as f64 * (60_000.0 / seen_ms as f64) / s.evicted_pages as f64
        };
        if self.last.is_none() || dt_ms > 0 {
            self.last = Some(s);
        }

        // Cold age: one step per COLD_AGE_STEP_MS at most.
        let slo = self.params.promotion_slo_per_min;
        let breach = slo > 0.0 && self.promotion_per_min > slo;
        if s.now_ms >= self.last_cold_step_ms + COLD_AGE_STEP_MS {
            if breach {
                self.cold_age_ms = self
                    .cold_age_ms
                    .max(1)
                    .saturating_mul(2)
                    .min(self.ceiling_ms());
                self.last_cold_step_ms = s.now_ms;
            } else if slo <= 0.0 || self.promotion_per_min < slo / 2.0 {
                self.cold_age_ms = (self.cold_age_ms / 2).max(self.floor_ms());
                self.last_cold_step_ms = s.now_ms;
            }
        }

        // Proactive reclaim, below the budget only.
        let target = self.params.stall_target_ns_per_s as f64;
        let stall_over = target > 0.0 && self.stall_ns_per_s >= target;
        let (state, factor) = if s.over_budget {
            (State::OverBudget, 0.0)
        } else if !self.proactive() {
            (State::Idle, 0.0)
        } else if breach {
            (State::SloBreach, 0.0)
        } else if stall_over {
            (State::BackingOff, 0.0)
        } else if target > 0.0 {
            (State::Probing, 1.0 - self.stall_ns_per_s / target)
        } else {
            (State::Probing, 1.0)
        };
        self.state = state;
        let proactive_pages = if factor > 0.0 && dt_ms > 0 {
            self.credit_pages += self.params.proactive_bytes_per_sec as f64 * dt_ms as f64
                / 1000.0
                / PAGE_BYTES as f64
                * factor;
            let whole = self.credit_pages.floor();
            self.credit_pages -= whole;
            whole as u64
        } else {
            // Credit does not pile up while backing off or over budget.
            self.credit_pages = 0.0;
            0
        };
        Decision {
            proactive_pages,
            cold_age_ms: self.cold_age_ms,
            state,
        }
    }
}
