//! Per-client metrics: counters as atomics next to the code that bumps them, latency
//! histograms, and one rendering into a serialisable [`ClientReport`] (used by `uswap run`'s
//! summary, `--stats-json` and `uswap status`).
//!
//! Owns: numbers. Must not: decide anything.

use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::store::StoreStats;

#[derive(Debug, Default)]
pub struct Counters {
    pub faults: AtomicU64,
    pub faults_zero: AtomicU64,
    pub faults_window: AtomicU64,
    pub faults_store: AtomicU64,
    pub faults_waited: AtomicU64,
    pub faults_retried: AtomicU64,
    pub zero_pages_filled: AtomicU64,
    pub pages_restored: AtomicU64,
    /// Forks whose child inherited the evicted pages copy-on-write.
    pub forks_shared: AtomicU64,
    /// Pages those children inherited.
    pub fork_pages_shared: AtomicU64,
    pub pages_prefetched: AtomicU64,
    pub pages_posted: AtomicU64,
    pub pages_moved: AtomicU64,
    /// Pages moved (not copied) back into the program: cross-mm backend.
    pub pages_moved_in: AtomicU64,
    pub pages_holes: AtomicU64,
    pub pages_busy: AtomicU64,
    /// Busy pages the agent made the program's own again (the window's counter, copied each
    /// tick).
    pub pages_unshared: AtomicU64,
    pub pages_failed: AtomicU64,
    pub pages_cancelled: AtomicU64,
    pub pages_discarded: AtomicU64,
    pub pages_compressed: AtomicU64,
    pub pages_store_full: AtomicU64,
    /// Of `pages_store_full`: refused by the uid's shared quota (daemon `max_store_per_uid`).
    pub pages_uid_quota_full: AtomicU64,
    /// Batches the agent left unanswered for `agent_timeout`.
    pub agent_timeouts: AtomicU64,
    pub batches: AtomicU64,
    pub events_remove: AtomicU64,
    pub events_unmap: AtomicU64,
    pub events_remap: AtomicU64,
    pub compress_ns: AtomicU64,
    /// Bytes given to the compressor and bytes it kept (cumulative).
    pub compressed_bytes_in: AtomicU64,
    pub compressed_bytes_out: AtomicU64,
    pub fault_service_ns: AtomicU64,
    /// Stall of the program's threads on faults in evicted memory (served from the window or
    /// the store, or parked on a page in flight), from reading each fault to waking its
    /// thread, in ns. Fresh-memory (zero-fill) faults are not counted: eviction does not cause
    /// them. The pressure controller's input.
    pub stall_ns: AtomicU64,
    /// Pages chosen from hot pages to hold the budget (no cold candidate was left).
    pub pages_evicted_hot: AtomicU64,
    /// Pages chosen by proactive reclaim (under the budget).
    pub pages_proactive: AtomicU64,
    pub register_errors: AtomicU64,
    pub rss_anon_bytes: AtomicU64,
    pub peak_rss_anon_bytes: AtomicU64,
    pub agent_busy_ns: AtomicU64,
    /// Time the monitor spent moving pages out itself (cross-mm backend).
    pub move_out_ns: AtomicU64,
    /// Cross-mm: time spent giving moved pages their durable copy (shadow) in the store.
    pub shadow_ns: AtomicU64,
    /// Cross-mm: runs given durable copies, and the longest such step, in ns.
    pub shadow_runs: AtomicU64,
    pub shadow_max_ns: AtomicU64,
    /// Cross-mm: pages that got no shadow (store quota) and lived only in the arena.
    pub pages_unshadowed: AtomicU64,
    /// Store compaction (`monitor/compact.rs`): the control thread's wall time in it, and its
    /// longest single lock hold, in ns.
    pub compact_ns: AtomicU64,
    pub compact_max_ns: AtomicU64,
    /// Payload bytes compaction moved.
    pub compact_bytes: AtomicU64,
    /// Idle-time recompression (`monitor/recompress.rs`): blobs offered to the workers, the
    /// workers' CPU time on them, and the control thread's longest lock hold putting the
    /// results in place (blobs replaced and bytes saved are in `store`).
    pub recompress_offered: AtomicU64,
    pub recompress_ns: AtomicU64,
    pub recompress_max_hold_ns: AtomicU64,
    /// Window trim: bytes of free window slots given back (stock backend), since the start.
    pub window_trimmed_bytes: AtomicU64,
    /// Times resident memory went well over the budget (prefetch held back meanwhile).
    pub over_budget_spells: AtomicU64,
    /// Faults held back (config `throttle`) while resident memory was well over the budget,
    /// and their total time held, in ns.
    pub faults_throttled: AtomicU64,
    pub throttle_ns: AtomicU64,
    /// Largest (evicted bytes - bytes uswap held for them) seen at a tick.
    pub peak_saved_bytes: AtomicU64,
    /// CPU time (user + system) of the client's fault and control threads, set when they end.
    pub fault_thread_cpu_ns: AtomicU64,
    pub control_thread_cpu_ns: AtomicU64,
    /// Faults per second over the last full second, sampled at each policy tick.
    pub fault_rate: FaultRate,
    /// Prefetched pages settled as used (the program's fault stream walked past them) and as
    /// wasted (evicted again before being reached, or their stream was abandoned); see
    /// `monitor/prefetch.rs`. `pages_prefetched` counts them as they are brought back.
    pub prefetch_hit_pages: AtomicU64,
    pub prefetch_waste_pages: AtomicU64,
    /// Fault thread: wall time spent spinning for the next message after serving faults
    /// (config `fault_spin`), spins that found one, spins that ran out.
    pub fault_spin_ns: AtomicU64,
    pub fault_spins_hit: AtomicU64,
    pub fault_spins_empty: AtomicU64,
    /// Disk tier (`monitor/disktier.rs`): pages moved from the store to the disk file, and
    /// demotions given up (the page changed while its payload was being written).
    pub pages_demoted: AtomicU64,
    pub demote_aborted: AtomicU64,
    /// Demotion batches, and the control thread's wall time in them.
    pub demote_batches: AtomicU64,
    pub demote_ns: AtomicU64,
    /// Batches cut short because the disk tier is full (`max_disk`).
    pub disk_full_batches: AtomicU64,
    /// Writes and reads submitted to the disk file (one per run of consecutive slots), and
    /// their bytes.
    pub disk_writes: AtomicU64,
    pub disk_write_bytes: AtomicU64,
    pub disk_reads: AtomicU64,
    pub disk_read_bytes: AtomicU64,
    /// Failed disk batches (no page is lost: a failed write is never published, a failed
    /// read is retried with `pread` under the lock).
    pub disk_errors: AtomicU64,
    /// Faults whose page was on disk, and pages brought back from the disk reads of the fault
    /// path (prefetched ones included).
    pub faults_disk: AtomicU64,
    pub pages_from_disk: AtomicU64,
    /// Service time of the faults on disk pages, summed.
    pub disk_fault_service_ns: AtomicU64,
}

impl Counters {
    /// The disk tier's figures, for [`ClientReport::disk`] (`store` gives the family store's
    /// disk pages and bytes, `latency` the service time of faults on disk pages).
    pub fn disk_report(
        &self,
        dir: Option<String>,
        store: &StoreStats,
        latency: Percentiles,
    ) -> DiskReport {
        let g = Counters::get;
        DiskReport {
            enabled: dir.is_some(),
            dir: dir.unwrap_or_default(),
            pages_on_disk: store.pages_on_disk,
            bytes_used: store.disk_bytes_used,
            bytes_mapped: store.disk_bytes_mapped,
            file_bytes: store.disk_file_bytes,
            pages_demoted: g(&self.pages_demoted),
            demote_aborted: g(&self.demote_aborted),
            demote_batches: g(&self.demote_batches),
            demote_s: g(&self.demote_ns) as f64 / 1e9,
            full_batches: g(&self.disk_full_batches),
            writes: g(&self.disk_writes),
            write_bytes: g(&self.disk_write_bytes),
            reads: g(&self.disk_reads),
            read_bytes: g(&self.disk_read_bytes),
            sync_reads: store.disk_sync_reads,
            errors: g(&self.disk_errors),
            faults: g(&self.faults_disk),
            pages_read_back: g(&self.pages_from_disk),
            fault_latency: latency,
            fault_service_s: g(&self.disk_fault_service_ns) as f64 / 1e9,
        }
    }

    /// The fault path's own figures, for [`ClientReport::fault_path`].
    pub fn fault_path_report(&self) -> FaultPathReport {
        let g = Counters::get;
        FaultPathReport {
            prefetch_hit_pages: g(&self.prefetch_hit_pages),
            prefetch_waste_pages: g(&self.prefetch_waste_pages),
            spin_s: g(&self.fault_spin_ns) as f64 / 1e9,
            spins_hit: g(&self.fault_spins_hit),
            spins_empty: g(&self.fault_spins_empty),
            fault_thread_cpu_s: g(&self.fault_thread_cpu_ns) as f64 / 1e9,
        }
    }
}

/// Prefetch accuracy and the cost of spinning, per client.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct FaultPathReport {
    /// Prefetched pages the program went on to use (see `Counters::prefetch_hit_pages`).
    pub prefetch_hit_pages: u64,
    /// Prefetched pages wasted.
    pub prefetch_waste_pages: u64,
    /// Wall time the fault thread spun waiting for the next fault: an upper bound of the
    /// CPU it cost (between its polls it yields the CPU to any thread that wants it).
    pub spin_s: f64,
    pub spins_hit: u64,
    pub spins_empty: u64,
    /// CPU time of the fault thread so far (updated at most every 100 ms, and at its end).
    pub fault_thread_cpu_s: f64,
}

/// The disk tier of one client (DESIGN.md, "Disk tier"): what is on disk (its family
/// store's figures), what moved, and the faults it served.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct DiskReport {
    /// A disk tier is configured and its file exists.
    pub enabled: bool,
    /// Its directory (config `disk_dir`).
    pub dir: String,
    /// Pages whose compressed copy is in the disk file now.
    pub pages_on_disk: u64,
    /// Their payload bytes, the bytes of the disk chunks holding them (what `max_disk`
    /// bounds), and what the file system has allocated to the file.
    pub bytes_used: u64,
    pub bytes_mapped: u64,
    pub file_bytes: u64,
    /// Pages moved from the store to the disk file, demotions given up, batches and the
    /// control thread's time in them, batches cut short by `max_disk`.
    pub pages_demoted: u64,
    pub demote_aborted: u64,
    pub demote_batches: u64,
    pub demote_s: f64,
    pub full_batches: u64,
    /// Writes and reads submitted (one per run of consecutive disk slots) and their bytes.
    pub writes: u64,
    pub write_bytes: u64,
    pub reads: u64,
    pub read_bytes: u64,
    /// Disk pages read with `pread` under the store's lock (fallback; bringing pages home).
    pub sync_reads: u64,
    /// Failed disk batches (nothing is lost: see `Counters::disk_errors`).
    pub errors: u64,
    /// Faults whose page was on disk, pages read back for faults (prefetched ones included),
    /// and the service time of faults on disk pages.
    pub faults: u64,
    pub pages_read_back: u64,
    pub fault_latency: Percentiles,
    /// Their service time, summed.
    pub fault_service_s: f64,
}

/// Faults per second, measured over windows of at least [`FaultRate::WINDOW`]: the control
/// thread samples the fault counter at each tick, and a window that has lasted long enough
/// closes with `faults in it / its length`. Readers see the last closed window.
#[derive(Debug, Default)]
pub struct FaultRate {
    inner: Mutex<FaultRateInner>,
}

#[derive(Debug, Default)]
struct FaultRateInner {
    /// Start of the open window and the fault count then (None before the first sample).
    window_start: Option<(std::time::Instant, u64)>,
    per_s: f64,
}

impl FaultRate {
    /// Shortest window a rate is computed over.
    pub const WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

    /// Records the cumulative fault count `faults` as of now.
    pub fn sample(&self, faults: u64) {
        self.sample_at(std::time::Instant::now(), faults);
    }

    fn sample_at(&self, now: std::time::Instant, faults: u64) {
        let mut g = self.inner.lock();
        match g.window_start {
            None => g.window_start = Some((now, faults)),
            Some((t0, f0)) => {
                let dt = now.duration_since(t0);
                if dt >= Self::WINDOW {
                    g.per_s = faults.saturating_sub(f0) as f64 / dt.as_secs_f64();
                    g.window_start = Some((now, faults));
                }
            }
        }
    }

    /// Faults per second in the last closed window (0 before the first one closes).
    pub fn per_s(&self) -> f64 {
        self.inner.lock().per_s
    }
}

impl Counters {
    pub fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Ordering::Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

pub struct Latency {
    /// Fault service time in ns, from reading the message to the page being in place.
    pub fault_ns: Mutex<Histogram<u64>>,
    /// Time a fault waited for the agent's batch, in ns.
    pub wait_ns: Mutex<Histogram<u64>>,
    /// Service time of faults whose page was on disk, in ns.
    pub disk_fault_ns: Mutex<Histogram<u64>>,
}

impl Default for Latency {
    fn default() -> Self {
        let h = || {
            Mutex::new(
                Histogram::new_with_bounds(100, 60_000_000_000, 2).expect("valid histogram bounds"),
            )
        };
        Latency {
            fault_ns: h(),
            wait_ns: h(),
            disk_fault_ns: h(),
        }
    }
}

impl Latency {
    pub fn record_fault(&self, ns: u64) {
        let _ = self.fault_ns.lock().record(ns.max(100));
    }
    pub fn record_wait(&self, ns: u64) {
        let _ = self.wait_ns.lock().record(ns.max(100));
    }
    pub fn record_disk_fault(&self, ns: u64) {
        let _ = self.disk_fault_ns.lock().record(ns.max(100));
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Percentiles {
    pub count: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        let us = |ns: u64| ns as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.5)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// Everything known about one client, for humans and machines.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ClientReport {
    pub id: u64,
    pub pid: i32,
    pub uid: u32,
    pub name: String,
    pub alive: bool,
    /// The parent's pid when this program was forked from a managed program, else 0.
    #[serde(default)]
    pub forked_from: u32,
    /// Adopted by this monitor after the one that managed it died.
    #[serde(default)]
    pub adopted: bool,
    /// This program's member index in its store's fork family.
    #[serde(default)]
    pub store_member: u32,
    /// Forks whose child inherited this program's evicted pages copy-on-write, and how many
    /// pages they inherited.
    #[serde(default)]
    pub forks_shared: u64,
    #[serde(default)]
    pub fork_pages_shared: u64,
    pub backend: String,
    pub budget_bytes: Option<u64>,
    pub rss_anon_bytes: u64,
    pub peak_rss_anon_bytes: u64,
    pub managed_bytes: u64,
    pub pages_in_flight: u64,
    pub pages_in_window: u64,
    /// Pages compressed in the store, those in its disk tier (`disk.pages_on_disk`) included.
    pub pages_stored: u64,
    pub window_bytes: u64,
    pub faults: u64,
    /// Faults per second over the last full second (0 once the program is gone).
    pub fault_rate_per_s: f64,
    pub faults_zero: u64,
    pub faults_window: u64,
    pub faults_store: u64,
    pub faults_waited: u64,
    pub faults_retried: u64,
    pub pages_posted: u64,
    pub pages_evicted: u64,
    pub pages_restored: u64,
    /// Of those, moved back without a copy (cross-mm backend).
    pub pages_moved_in: u64,
    pub pages_prefetched: u64,
    pub pages_holes: u64,
    pub pages_unevictable: u64,
    /// Pages found busy that the agent made the program's own again after its forked
    /// children exited (then evictable); a pinned page stays busy.
    pub pages_unshared: u64,
    pub pages_failed: u64,
    pub pages_cancelled: u64,
    pub pages_discarded: u64,
    pub pages_compressed: u64,
    pub pages_store_full: u64,
    /// Of `pages_store_full`: refused by the uid's shared quota.
    #[serde(default)]
    pub pages_uid_quota_full: u64,
    /// Batches the agent left unanswered for the daemon's `agent_timeout`.
    #[serde(default)]
    pub agent_timeouts: u64,
    /// Eviction is stopped because the agent does not answer.
    #[serde(default)]
    pub agent_stalled: bool,
    pub events_remove: u64,
    pub events_unmap: u64,
    pub events_remap: u64,
    pub compression_ratio: f64,
    /// Largest saving seen: program memory out of RAM minus what uswap held for it.
    pub peak_saved_bytes: u64,
    /// Cumulative over the client's life: bytes compressed and bytes kept.
    pub compressed_bytes_in: u64,
    pub compressed_bytes_out: u64,
    pub metadata_bytes_per_stored_page: f64,
    pub fault_latency: Percentiles,
    pub agent_wait_latency: Percentiles,
    pub monitor_compress_cpu_s: f64,
    /// Wall time spent serving faults (from reading the message to the page in place).
    pub monitor_fault_service_s: f64,
    /// The pressure controller and per-region statistics (DESIGN.md, "Policy").
    pub policy: PolicyReport,
    pub agent_cpu_s: f64,
    /// Time the monitor spent moving pages out itself (cross-mm backend; the agent's share
    /// is `agent_cpu_s` on the stock backend).
    pub monitor_move_out_s: f64,
    /// Cross-mm: time spent giving moved pages their durable copy in the store.
    pub monitor_shadow_s: f64,
    /// Store compaction: control-thread time in it, and its longest lock hold in µs (blob
    /// moves and chunks given back are in `store`).
    #[serde(default)]
    pub compact_s: f64,
    #[serde(default)]
    pub compact_max_us: f64,
    /// Idle-time recompression: blobs offered to the idle-priority workers, their CPU time
    /// on this program's blobs, and the longest lock hold putting results in place, in µs
    /// (blobs replaced and payload bytes saved are in `store`).
    #[serde(default)]
    pub recompress_offered: u64,
    #[serde(default)]
    pub recompress_cpu_s: f64,
    #[serde(default)]
    pub recompress_max_hold_us: f64,
    /// Memory the window (stock) or arena (cross-mm) holds now (its resident pages); 0 once
    /// the program has ended.
    #[serde(default)]
    pub window_resident_bytes: u64,
    /// Stock: bytes of free window slots given back by window trims.
    #[serde(default)]
    pub window_trimmed_bytes: u64,
    /// Times resident memory went over the budget by more than an eighth of it (and 32 MiB);
    /// prefetch is held back for the rest of each such spell.
    #[serde(default)]
    pub over_budget_spells: u64,
    /// Faults held back during those spells (config `throttle`), and their total time held.
    #[serde(default)]
    pub faults_throttled: u64,
    #[serde(default)]
    pub throttle_s: f64,
    /// Cross-mm: runs given durable copies, and the longest (the most a monitor death could
    /// catch in flight), in µs.
    pub shadow_runs: u64,
    pub shadow_max_us: f64,
    /// Cross-mm: pages that lived only in the arena (no shadow: store quota).
    pub pages_unshadowed: u64,
    /// CPU of the monitor's threads for this client (known once it detached).
    pub monitor_cpu_s: f64,
    /// Prefetch accuracy and spinning cost of the fault thread.
    pub fault_path: FaultPathReport,
    pub store: StoreStats,
    /// The disk tier (all zero without one).
    #[serde(default)]
    pub disk: DiskReport,
}

/// The policy's figures: stall, promotion rate, cold age, controller state, busiest regions.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct PolicyReport {
    /// `idle`, `over-budget`, `probing`, `backing-off` or `slo-breach`.
    pub controller_state: String,
    /// Stall of the program's threads on faults in evicted memory, ms per second of wall time
    /// (averaged over about a second; 0 once the program is gone).
    pub stall_ms_per_s: f64,
    /// Total such stall over the program's life, s.
    pub stall_s: f64,
    /// Configured stall target, ms per second (0 = no feedback).
    pub stall_target_ms_per_s: f64,
    /// Refaults in the last minute as a fraction of the pages evicted now.
    pub promotion_rate_per_min: f64,
    /// Configured promotion SLO (0 = off).
    pub promotion_slo_per_min: f64,
    /// Current cold age: trial-evicted pages untouched this long are compressed.
    pub cold_age_ms: u64,
    /// Pages evicted from hot pages to hold the budget.
    pub pages_evicted_hot: u64,
    /// Pages chosen by proactive reclaim under the budget.
    pub pages_proactive: u64,
    /// The regions with the most refaults (at most 4).
    pub regions: Vec<crate::policy::regions::RegionReport>,
}

impl ClientReport {
    pub fn saved_at_peak_bytes(&self) -> Option<u64> {
        (self.peak_saved_bytes > 0).then_some(self.peak_saved_bytes)
    }
}

/// CPU time of the calling thread (user + system), in ns.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn fault_rate_closes_a_window_only_after_one_second() {
        let r = FaultRate::default();
        let t0 = Instant::now();
        r.sample_at(t0, 100);
        r.sample_at(t0 + Duration::from_millis(500), 400);
        assert_eq!(r.per_s(), 0.0, "no window has closed yet");
        r.sample_at(t0 + Duration::from_millis(2000), 700);
        assert!(
            (r.per_s() - 300.0).abs() < 1e-9,
            "600 faults in 2 s: {}",
            r.per_s()
        );
        // The next window starts where the last one ended.
        r.sample_at(t0 + Duration::from_millis(3000), 700);
        assert_eq!(r.per_s(), 0.0);
    }
}
