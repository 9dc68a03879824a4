//! Store compaction, monitor side: when a client's store keeps chunks mapped that its slots in
//! use no longer need (pages faulted back or discarded leave holes, and a chunk is given back
//! only once it is empty), the control thread moves the blobs of the sparsest chunks into the
//! free slots of fuller ones, so whole chunks empty and go back to the system. What zsmalloc's
//! compaction does for zram.
//!
//! Owns: when to compact (the thresholds below), how much per tick, and keeping the page map
//! in step with the moves. The moves themselves, and their order of writes (new copy complete
//! and published before the old one is dropped, so a monitor killed half way leaves at worst
//! two identical records, which a rescue or an adoption tolerates), are the store's
//! (`Store::compact`, layout write order step 7).
//! Must not: move a blob the page map does not name by that handle under the lock it holds
//! (a shared blob of a fork family, a window shadow, a page being faulted or demoted), map a
//! chunk to make room, or hold the client's lock for more than one batch.

use std::sync::atomic::Ordering;
use std::time::Instant;

use tracing::debug;

use super::client::Client;
use super::pages::PageState;
use super::stats::Counters;
use crate::store::CHUNK_BYTES;

/// Compaction starts when the store could give back at least this many chunks; at rest (no
/// fault served since the last tick), at least one.
const MIN_COMPACTABLE_CHUNKS: u64 = 4;
const MIN_COMPACTABLE_CHUNKS_AT_REST: u64 = 1;
/// Blobs moved under one hold of the client's lock (a fault waits for it meanwhile).
const BATCH_MOVES: usize = 128;
/// Blobs moved per tick at most.
const MAX_MOVES_PER_TICK: usize = 8192;
/// Free pages inside chunks are given back once this many bytes of them wait: below it, a
/// page freed is likely taken again by the next slot of its class before a pass would pay.
const MIN_SLACK_BYTES: u64 = 128 * 1024;
/// Runs of free pages punched under one hold of the client's lock (one fallocate each).
const BATCH_PUNCH_RUNS: usize = 32;
/// Runs punched per tick at most.
const MAX_PUNCH_RUNS_PER_TICK: usize = 1024;

impl Client {
    /// Gives back the pages inside the store's chunks that hold nothing live (`Store::
    /// punch_slack`): what compaction cannot, since it frees whole chunks only and a size
    /// class keeps its last, partly used ones. Returns the pages given back.
    pub(super) fn punch_store_slack(&self) -> u64 {
        let mut pages = 0;
        let mut runs = 0;
        while runs < MAX_PUNCH_RUNS_PER_TICK {
            let st = self.state.lock();
            let mut store = st.store.lock();
            if store.slack_bytes() < MIN_SLACK_BYTES {
                break;
            }
            let n = store.punch_slack(BATCH_PUNCH_RUNS);
            pages += n;
            runs += BATCH_PUNCH_RUNS;
            if n == 0 {
                break;
            }
        }
        if pages > 0 {
            debug!(client = self.id, pages, "store: free pages given back");
        }
        pages
    }

    /// One tick's compaction (see the module doc); returns the chunks given back.
    pub(super) fn compact_store(&self) -> u64 {
        let mut freed = 0;
        let mut moved = 0;
        // The death point counts the bytes compaction moved over the client's life.
        let mut bytes_before = Counters::get(&self.counters.compact_bytes);
        let counters = &self.counters;
        let faults = Counters::get(&counters.faults_store)
            + Counters::get(&counters.faults_window)
            + Counters::get(&counters.faults_zero);
        let at_rest = self.compact_faults_mark.swap(faults, Ordering::Relaxed) == faults;
        let min_chunks = if at_rest {
            MIN_COMPACTABLE_CHUNKS_AT_REST
        } else {
            MIN_COMPACTABLE_CHUNKS
        };
        while moved < MAX_MOVES_PER_TICK {
            let (n, chunks, mapped, ns) = {
                let mut st = self.state.lock();
                let t0 = Instant::now();
                let st = &mut *st;
                let mut store = st.store.lock();
                if store.compactable_bytes() < min_chunks * CHUNK_BYTES as u64 {
                    break;
                }
                let member = st.store.member();
                let pages = &st.pages;
                let c = store.compact(
                    member,
                    BATCH_MOVES,
                    &mut |addr, h| pages.state(addr) == PageState::Stored(h),
                    &mut |bytes| super::die::point_over("compact:copied", bytes_before + bytes),
                );
                bytes_before += c.bytes_moved;
                Counters::add(&self.counters.compact_bytes, c.bytes_moved);
                let n = st.pages.rehandled(&c.moves);
                debug_assert_eq!(n, c.moves.len(), "checked under the same lock");
                let mapped = store.mapped_bytes();
                (
                    c.moves.len(),
                    c.chunks_freed,
                    mapped,
                    t0.elapsed().as_nanos() as u64,
                )
            };
            Counters::add(&self.counters.compact_ns, ns);
            self.counters
                .compact_max_ns
                .fetch_max(ns, Ordering::Relaxed);
            freed += chunks;
            moved += n;
            if self.limits.uid_store.is_some() {
                self.update_uid_store(mapped);
            }
            if n == 0 {
                break;
            }
        }
        if moved > 0 {
            debug!(
                client = self.id,
                moved,
                chunks_freed = freed,
                "store compacted"
            );
        }
        freed
    }
}
