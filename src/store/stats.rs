//! Store statistics: the counters the store keeps and the snapshot it hands out.
//!
//! Owns: [`StoreStats`] (a plain snapshot, serializable for the monitor's renderers) and the
//! running per-kind counters. Rendering (text, JSON, Prometheus) is the monitor's job.
//! Must not touch: slabs, compression, uffd, processes, syscalls.

use super::handle::PageKind;
use crate::PAGE_SIZE;

/// A snapshot of the store. Byte counts are exact except `metadata_bytes`, which counts
/// container capacities (see [`Store::metadata_bytes`](super::Store::metadata_bytes)).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StoreStats {
    /// Pages kept as a repeated word (no blob).
    pub pages_same_filled: u64,
    /// Of those, pages of the zero word.
    pub pages_zero: u64,
    /// Pages kept lz4-compressed.
    pub pages_lz4: u64,
    /// Pages kept verbatim.
    pub pages_raw: u64,
    /// Uncompressed bytes of all stored pages (`PAGE_SIZE` per page).
    pub bytes_in: u64,
    /// Payload bytes kept: lz4 lengths plus `PAGE_SIZE` per raw page; 0 for same-filled.
    pub bytes_out: u64,
    /// Bytes of all slab chunks mapped (virtual; untouched tails are not resident).
    pub slab_bytes_mapped: u64,
    /// Payload bytes in slabs (equals `bytes_out`).
    pub slab_bytes_used: u64,
    /// Bytes of the slots in use (payload rounded up to its size class).
    pub slab_bytes_slots: u64,
    /// `1 - slab_bytes_used / slab_bytes_mapped`; 0 with nothing mapped.
    pub fragmentation: f64,
    /// Slab chunks mapped.
    pub chunks: u64,
    /// Distinct non-zero fill words in the word table.
    pub fill_words: u64,
    /// Bytes of store bookkeeping (bitmaps, chunk table, word table), handles excluded.
    pub metadata_bytes: u64,
    /// Inserts refused with `StoreError::Full`, since the store was made.
    pub inserts_refused_full: u64,
    /// Extra owners of shared blobs (fork): a blob two members own counts 1. Its bytes are
    /// counted once in `bytes_out`.
    #[serde(default)]
    pub shared_refs: u64,
    /// Shared blobs copied because one member moved its page (`mremap`), since creation.
    #[serde(default)]
    pub shared_copies: u64,
    /// Disk tier: pages whose blob is in the disk file (counted in the per-kind page counts
    /// too, not in `bytes_out`).
    #[serde(default)]
    pub pages_on_disk: u64,
    /// Disk tier: payload bytes in the disk file.
    #[serde(default)]
    pub disk_bytes_used: u64,
    /// Disk tier: bytes of the disk slots in use (payload rounded up to its size class).
    #[serde(default)]
    pub disk_bytes_slots: u64,
    /// Disk tier: bytes of the disk file's chunks (what `max_disk` bounds).
    #[serde(default)]
    pub disk_bytes_mapped: u64,
    /// Disk tier: disk chunks.
    #[serde(default)]
    pub disk_chunks: u64,
    /// Disk tier: bytes the file system has allocated to the disk file.
    #[serde(default)]
    pub disk_file_bytes: u64,
    /// Disk tier: pages moved from the memory slabs to the disk file, since creation.
    #[serde(default)]
    pub pages_demoted: u64,
    /// Disk tier: disk pages read synchronously under the store's lock (`pread`; the fault
    /// path reads through io_uring without it), since creation.
    #[serde(default)]
    pub disk_sync_reads: u64,
    /// Blobs moved by compaction (out of sparse chunks into free slots of fuller ones), since
    /// creation.
    #[serde(default)]
    pub compact_moves: u64,
    /// Memory chunks given back by compaction, since creation.
    #[serde(default)]
    pub compact_chunks_freed: u64,
    /// Blobs replaced by a shorter encoding of the same page (idle-time recompression with
    /// lz4hc), since creation.
    #[serde(default)]
    pub recompressed: u64,
    /// Payload bytes those replacements saved, since creation.
    #[serde(default)]
    pub recompress_bytes_saved: u64,
    /// Memory the store file really holds (its pages allocated: records and slots written,
    /// untouched chunk tails and punched chunks excluded); for a non-durable store, the slab
    /// bytes mapped.
    #[serde(default)]
    pub resident_bytes: u64,
    /// Pages of memory chunks holding nothing live (their slots freed by faults) that are
    /// still allocated, waiting for the next give-back pass.
    #[serde(default)]
    pub slack_bytes: u64,
    /// Bytes of such pages given back (punched out of the store file), since creation.
    #[serde(default)]
    pub punched_bytes: u64,
}

impl StoreStats {
    /// All stored pages.
    pub fn pages(&self) -> u64 {
        self.pages_same_filled + self.pages_lz4 + self.pages_raw
    }

    /// `bytes_in / (slab_bytes_mapped + metadata_bytes)`: what the store really saves; 0 when empty.
    pub fn effective_ratio(&self) -> f64 {
        let cost = self.slab_bytes_mapped + self.metadata_bytes;
        if cost == 0 {
            0.0
        } else {
            self.bytes_in as f64 / cost as f64
        }
    }
}

/// Running counters, updated on every insert and remove.
#[derive(Debug, Default, Clone)]
pub(crate) struct Counters {
    pub pages_zero: u64,
    pub pages_same_filled: u64,
    pub pages_lz4: u64,
    pub pages_raw: u64,
    pub bytes_out: u64,
    pub inserts_refused_full: u64,
    pub shared_refs: u64,
    pub shared_copies: u64,
    pub pages_on_disk: u64,
    pub disk_bytes_out: u64,
    pub pages_demoted: u64,
    pub compact_moves: u64,
    pub compact_chunks_freed: u64,
    pub recompressed: u64,
    pub recompress_bytes_saved: u64,
}

impl Counters {
    /// Accounts one page coming in (`sign = 1`) or leaving (`sign = -1`), its payload in
    /// memory.
    pub fn account(&mut self, kind: PageKind, is_zero: bool, payload_bytes: u64, sign: i64) {
        let step = |v: &mut u64, by: u64| {
            *v = if sign > 0 { *v + by } else { *v - by };
        };
        match kind {
            PageKind::SameFilled => {
                step(&mut self.pages_same_filled, 1);
                if is_zero {
                    step(&mut self.pages_zero, 1);
                }
            }
            PageKind::Lz4 => step(&mut self.pages_lz4, 1),
            PageKind::Raw => step(&mut self.pages_raw, 1),
        }
        step(&mut self.bytes_out, payload_bytes);
    }

    /// Accounts a page whose payload is in the disk file coming in (a disk slot published, or
    /// found by an adoption).
    pub fn account_disk_added(&mut self, kind: PageKind, payload_bytes: u64) {
        self.account(kind, false, 0, 1);
        self.pages_on_disk += 1;
        self.disk_bytes_out += payload_bytes;
    }

    /// Accounts a page whose payload is in the disk file leaving the store.
    pub fn account_disk_removed(&mut self, kind: PageKind, payload_bytes: u64) {
        self.account(kind, false, 0, -1);
        self.pages_on_disk -= 1;
        self.disk_bytes_out -= payload_bytes;
    }

    /// Accounts a page whose payload moved from memory to the disk file.
    pub fn account_demoted(&mut self, payload_bytes: u64) {
        self.bytes_out -= payload_bytes;
        self.pages_on_disk += 1;
        self.disk_bytes_out += payload_bytes;
        self.pages_demoted += 1;
    }

    pub fn pages(&self) -> u64 {
        self.pages_same_filled + self.pages_lz4 + self.pages_raw
    }

    pub fn bytes_in(&self) -> u64 {
        self.pages() * PAGE_SIZE as u64
    }
}
