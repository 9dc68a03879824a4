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
    pub pages_prefetched: AtomicU64,
    pub pages_posted: AtomicU64,
    pub pages_moved: AtomicU64,
    /// Pages moved (not copied) back into the program: cross-mm backend.
    pub pages_moved_in: AtomicU64,
    pub pages_holes: AtomicU64,
    pub pages_busy: AtomicU64,
    pub pages_failed: AtomicU64,
    pub pages_cancelled: AtomicU64,
    pub pages_discarded: AtomicU64,
    pub pages_compressed: AtomicU64,
    pub pages_store_full: AtomicU64,
    pub batches: AtomicU64,
    pub events_remove: AtomicU64,
    pub events_unmap: AtomicU64,
    pub events_remap: AtomicU64,
    pub compress_ns: AtomicU64,
    /// Bytes given to the compressor and bytes it kept (cumulative).
    pub compressed_bytes_in: AtomicU64,
    pub compressed_bytes_out: AtomicU64,
    pub fault_service_ns: AtomicU64,
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
    /// Largest (evicted bytes - bytes uswap held for them) seen at a tick.
    pub peak_saved_bytes: AtomicU64,
    /// CPU time (user + system) of the client's fault and control threads, set when they end.
    pub fault_thread_cpu_ns: AtomicU64,
    pub control_thread_cpu_ns: AtomicU64,
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
    pub backend: String,
    pub budget_bytes: Option<u64>,
    pub rss_anon_bytes: u64,
    pub peak_rss_anon_bytes: u64,
    pub managed_bytes: u64,
    pub pages_in_flight: u64,
    pub pages_in_window: u64,
    pub pages_stored: u64,
    pub window_bytes: u64,
    pub faults: u64,
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
    pub pages_failed: u64,
    pub pages_cancelled: u64,
    pub pages_discarded: u64,
    pub pages_compressed: u64,
    pub pages_store_full: u64,
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
    pub agent_cpu_s: f64,
    /// Time the monitor spent moving pages out itself (cross-mm backend; the agent's share
    /// is `agent_cpu_s` on the stock backend).
    pub monitor_move_out_s: f64,
    /// Cross-mm: time spent giving moved pages their durable copy in the store.
    pub monitor_shadow_s: f64,
    /// Cross-mm: runs given durable copies, and the longest (the most a monitor death could
    /// catch in flight), in µs.
    pub shadow_runs: u64,
    pub shadow_max_us: f64,
    /// Cross-mm: pages that lived only in the arena (no shadow: store quota).
    pub pages_unshadowed: u64,
    /// CPU of the monitor's threads for this client (known once it detached).
    pub monitor_cpu_s: f64,
    pub store: StoreStats,
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
