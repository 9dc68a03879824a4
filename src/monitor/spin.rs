//! How long the fault thread spins for the next message after serving faults, before it
//! blocks in `poll` again.
//!
//! On this VM a thread blocked on one vCPU is woken from the other in 20–40 µs (p99 up to
//! milliseconds when the vCPU idles), longer than a whole fault service. A program that faults
//! again soon after being served (a scan, a burst of random touches) therefore gains when the
//! fault thread keeps checking for a little while instead of sleeping. The budget adapts:
//! - a spin that finds the next message keeps the budget and grows it towards twice the wait
//!   it saw (so it covers the program's usual gap);
//! - a spin that runs out empty halves it (spinning costs a CPU);
//! - after blocking, a message that came within the cap of the last service would have been
//!   caught by a long enough spin: the budget grows to twice that gap (at least doubling);
//! - the budget never exceeds the cap (config `fault_spin`; 0 = never spin), and below
//!   [`MIN_SPIN_NS`] the thread does not spin at all.
//!
//! Owns: the budget arithmetic. Must not: read clocks or descriptors (the fault thread
//! measures and polls; `monitor/fault.rs`).

/// A budget below this is not worth a spin (a single non-blocking poll costs about 1 µs).
pub const MIN_SPIN_NS: u64 = 2_000;

/// The adaptive spin budget of one fault thread.
#[derive(Debug, Clone, Copy)]
pub struct SpinBudget {
    cap_ns: u64,
    budget_ns: u64,
}

impl SpinBudget {
    /// `cap_ns`: the longest spin (config `fault_spin`), 0 = off. Starts at a quarter of it.
    pub fn new(cap_ns: u64) -> SpinBudget {
        SpinBudget {
            cap_ns,
            budget_ns: cap_ns / 4,
        }
    }

    /// How long to spin now; 0 = block at once.
    pub fn budget_ns(&self) -> u64 {
        if self.budget_ns < MIN_SPIN_NS {
            0
        } else {
            self.budget_ns
        }
    }

    /// A spin found a message after `waited_ns`.
    pub fn on_hit(&mut self, waited_ns: u64) {
        self.budget_ns = self
            .budget_ns
            .max(waited_ns.saturating_mul(2))
            .min(self.cap_ns);
    }

    /// A spin ran its whole budget and found nothing.
    pub fn on_empty(&mut self) {
        self.budget_ns /= 2;
    }

    /// The thread blocked (or did not spin) and the next message came `gap_ns` after the last
    /// service ended.
    pub fn on_blocked(&mut self, gap_ns: u64) {
        if gap_ns <= self.cap_ns {
            let grown = self.budget_ns.saturating_mul(2).max(MIN_SPIN_NS);
            self.budget_ns = grown.max(gap_ns.saturating_mul(2)).min(self.cap_ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spin_cap_zero_never_spins() {
        let mut s = SpinBudget::new(0);
        s.on_blocked(0);
        s.on_hit(1_000);
        assert_eq!(s.budget_ns(), 0);
    }

    #[test]
    fn spin_empty_spins_shrink_to_nothing() {
        let mut s = SpinBudget::new(50_000);
        assert_eq!(s.budget_ns(), 12_500);
        s.on_empty();
        s.on_empty();
        s.on_empty();
        assert_eq!(s.budget_ns(), 0, "below the minimum: no spin");
    }

    #[test]
    fn spin_hits_grow_to_cover_the_gap_within_cap() {
        let mut s = SpinBudget::new(50_000);
        s.on_hit(10_000);
        assert_eq!(s.budget_ns(), 20_000);
        s.on_hit(5_000);
        assert_eq!(s.budget_ns(), 20_000, "a hit never shrinks it");
        s.on_hit(40_000);
        assert_eq!(s.budget_ns(), 50_000);
    }

    #[test]
    fn spin_close_message_after_blocking_regrows_budget() {
        let mut s = SpinBudget::new(50_000);
        for _ in 0..10 {
            s.on_empty();
        }
        assert_eq!(s.budget_ns(), 0);
        s.on_blocked(8_000);
        assert_eq!(s.budget_ns(), 16_000);
        s.on_blocked(1_000_000);
        assert_eq!(s.budget_ns(), 16_000, "a far message teaches nothing");
        s.on_blocked(1_000);
        assert_eq!(s.budget_ns(), 32_000);
    }
}
