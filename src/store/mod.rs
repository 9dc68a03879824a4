//! The compressed page store: pages in, handles out.
//!
//! Owns: where evicted page contents live while they are out of their process. A page is kept
//! as a repeated word (no blob), as an lz4 block in a size-class slot, or raw in a page-sized
//! slot; slots live in large anonymous mappings (`slab.rs`), not one heap allocation per page.
//! The [`Handle`] returned for a page *is* its metadata: the store keeps no per-page table, so
//! a stored page costs its 8-byte handle (in the monitor's page map) plus a share of
//! [`Store::metadata_bytes`].
//! Must not touch: uffd, processes, sockets, policy. It works in pages and handles only; its
//! system calls are the mmap/munmap of slab chunks, the store file's (memfd, ftruncate,
//! fallocate) and the disk file's (open, fallocate, and `pread` for a disk page read under its
//! lock).
//!
//! **Disk tier** (optional, [`StoreConfig::disk`]): a blob may live in a *disk chunk*, whose
//! payloads are in a file in the configured directory. Its handle looks like any blob's; the
//! store knows the tier from the chunk. The monitor moves the coldest blobs there in batches
//! ([`Store::begin_demote`], write without any lock, [`Store::commit_demote`]) and reads them
//! back without the lock ([`Store::disk_read`], [`Store::decode_payload`], checked with
//! [`Store::disk_epoch`]); [`Store::get`] reads one with `pread` itself.
//!
//! **Recompression** (idle time): a blob goes in as fast lz4 (eviction must keep up with
//! the program); later the monitor takes the blobs not offered yet
//! ([`Store::recompress_candidates`]), recompresses them with lz4hc without any lock
//! ([`recompress`]) and puts each one that now fits a smaller class back
//! ([`Store::replace_blob`]). The result is still one lz4 block, so no reader changes. What
//! zram's `recompress` does with a second algorithm, without one.
//!
//! Files: `handle.rs` (handle bit layout), `encode.rs` (same-filled detection, lz4; pure),
//! `slab.rs` (chunks, bitmaps, quota), `samefill.rs` (refcounted fill words), `stats.rs`,
//! `shared.rs` (one store shared by a fork family, one handle per member), `disk.rs` (the disk
//! tier's file).
//!
//! Concurrency: [`encode`] is a pure function, so callers compress outside their lock and
//! then [`Store::insert`] the result under it. `Store` is `Send` and has no interior
//! mutability; the monitor wraps it in its own lock.

mod disk;
mod encode;
mod handle;
mod samefill;
mod shared;
mod slab;
mod stats;
#[cfg(test)]
mod tests;

pub use disk::DiskFile;
#[cfg(test)]
pub(crate) use encode::text_page;
pub use encode::{
    encode, recompress, same_filled_word, Encoded, OwnedPageDecoder, Recompress, RecompressScratch,
    LZ4HC_LEVEL_MAX, LZ4_MAX_LEN_BYTES, SCRATCH_BYTES, ZSTD_LEVEL_MAX,
};
pub use handle::{Handle, PageKind};
pub use shared::SharedStore;
pub use slab::{all_disk_bytes, all_mapped_bytes, CHUNK_BYTES, CLASS_STEP_BYTES};
pub use stats::StoreStats;

use crate::protocol::store_layout::{ADDR_LIMIT, MAX_OWNERS};
use crate::PAGE_SIZE;
use handle::{BlobLoc, Decoded};
use samefill::WordTable;
use slab::{lz4_class_for_len, Slabs, SlotLoc, RAW_CLASS_IDX};
use stats::Counters;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Placing the page would pass `StoreConfig::max_bytes` (or an index space is exhausted).
    /// Nothing was stored or lost: the caller keeps the page where it is.
    #[error("store is full")]
    Full,
    /// The handle does not name a live page of this store.
    #[error("corrupt handle {bits:#x}: {reason}")]
    CorruptHandle { bits: u64, reason: &'static str },
    /// A stored lz4 payload did not decompress to one page.
    #[error("decompressing handle {bits:#x} failed: {detail}")]
    DecompressFailed { bits: u64, detail: String },
    /// Mapping a new slab chunk failed.
    #[error("mapping a slab chunk failed: {0}")]
    Map(#[source] std::io::Error),
    /// Creating or reading the disk tier's file failed.
    #[error("disk tier: {0}")]
    Disk(#[source] std::io::Error),
}

/// A blob offered for recompression by [`Store::recompress_candidates`]: the page at `addr`,
/// named by `handle`, whose payload was copied to `arena[off..off + len_bytes]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecompressCandidate {
    pub addr: u64,
    pub handle: Handle,
    pub off: usize,
    pub len_bytes: usize,
}

impl RecompressCandidate {
    /// A new payload is worth placing only if it is shorter than this: it must fit a smaller
    /// size class than the blob's (0 or 1: no smaller class).
    pub fn fits_below(&self) -> usize {
        match self.handle.decode() {
            Some(Decoded::Blob(b)) if b.class_idx != RAW_CLASS_IDX => {
                usize::from(b.class_idx) * CLASS_STEP_BYTES + 1
            }
            _ => 0,
        }
    }
}

/// What one [`Store::compact`] did.
#[derive(Debug, Default)]
pub struct Compaction {
    /// (page address, old handle, new handle) of every blob moved.
    pub moves: Vec<(u64, Handle, Handle)>,
    /// Memory chunks given back.
    pub chunks_freed: u64,
    /// Payload bytes copied.
    pub bytes_moved: u64,
}

/// Store settings.
#[derive(Debug, Clone, Default)]
pub struct StoreConfig {
    /// Keep the slabs in a store file (a memfd, [`Store::file`]) in the layout of
    /// [`crate::protocol::store_layout`], so the pages outlive the monitor: the program's shim
    /// holds the file too. Only all-zero pages then go without a blob (their record-less
    /// absence reads as zeros); other same-filled pages are stored as small lz4 blobs.
    pub durable: bool,
    /// Upper bound on slab bytes mapped ([`StoreStats::slab_bytes_mapped`]), in bytes.
    /// Slabs grow in [`CHUNK_BYTES`] steps, so a bound below one chunk admits only
    /// same-filled pages. Same-filled pages take no slab space and are never refused by it.
    pub max_bytes: Option<u64>,
    /// A disk tier (durable stores only): the coldest blobs can be moved to a file there.
    pub disk: Option<DiskConfig>,
}

/// Where and how big a store's disk tier is.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// The directory the (unlinked) disk file is made in.
    pub dir: std::path::PathBuf,
    /// Upper bound on the disk chunks' bytes; `None` = no bound.
    pub max_bytes: Option<u64>,
}

/// Where a disk page's payload is in the disk file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskRead {
    pub off: u64,
    pub len_bytes: u32,
    /// The size of its slot (a slot right after it in the file starts at `off + slot_bytes`).
    pub slot_bytes: u32,
}

/// A page on its way from a memory slot to a disk slot: see [`Store::begin_demote`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demotion {
    /// The program address its record names.
    pub addr: u64,
    /// Its handle now, and once committed.
    pub old: Handle,
    pub new: Handle,
    /// Where its payload goes in the disk file, and where [`Store::begin_demote`] put it in
    /// the caller's buffer.
    pub disk_off: u64,
    pub buf_off: usize,
    pub len_bytes: u32,
    /// The size of its slot: the slot after it starts `slot_bytes` after `disk_off`.
    pub slot_bytes: u32,
    /// The memory slot's record when the demotion began.
    rec: u64,
}

/// A page found in an adopted store file: (page address, owner set, handle).
pub type AdoptedPage = (u64, u16, Handle);

/// Compressed pages in size-class slabs. See the module doc.
pub struct Store {
    slabs: Slabs,
    words: WordTable,
    counters: Counters,
    /// Compression scratch for [`Store::put`]; empty until its first call.
    put_scratch: Vec<u8>,
    /// Live members of the fork family sharing this store (bit `m` = member `m`); member 0,
    /// the program the store was made for, joins at creation.
    members: u16,
    /// Disk pages read with `pread` by [`Store::get`].
    disk_sync_reads: std::sync::atomic::AtomicU64,
}

impl Store {
    /// An empty store; maps nothing until the first blob arrives. A durable store creates
    /// its (empty) store file first, which can fail.
    pub fn try_new(cfg: StoreConfig) -> Result<Store, StoreError> {
        let mut slabs = if cfg.durable {
            Slabs::new_durable(cfg.max_bytes)?
        } else {
            Slabs::new(cfg.max_bytes)
        };
        if let Some(d) = &cfg.disk {
            assert!(cfg.durable, "a disk tier needs a durable store");
            slabs.set_disk(
                DiskFile::create(&d.dir).map_err(StoreError::Disk)?,
                d.max_bytes,
            );
        }
        Ok(Store {
            slabs,
            words: WordTable::default(),
            counters: Counters::default(),
            put_scratch: Vec::new(),
            members: 1,
            disk_sync_reads: Default::default(),
        })
    }

    /// A durable store over `file`, the store file of a monitor that died (handed over by the
    /// program that holds it too; see `Slabs::adopt` for what is checked). Returns the store
    /// and every page in it as (page address, owner set, handle).
    /// With `disk` (the disk file the program handed over too, validated by
    /// [`DiskFile::adopt`], and the bound on the disk tier), a store with pages on disk is
    /// adopted with its disk tier.
    pub fn adopt(
        file: std::fs::File,
        max_bytes: Option<u64>,
        disk: Option<(DiskFile, Option<u64>)>,
    ) -> Result<(Store, Vec<AdoptedPage>), String> {
        let (slabs, used) = Slabs::adopt(file, max_bytes, disk)?;
        let mut store = Store {
            slabs,
            words: WordTable::default(),
            counters: Counters::default(),
            put_scratch: Vec::new(),
            members: 0,
            disk_sync_reads: Default::default(),
        };
        let mut pages = Vec::with_capacity(used.len());
        for (loc, rec) in used {
            let (addr, len_bytes) = crate::protocol::store_layout::record_parts(rec);
            let owners = crate::protocol::store_layout::record_owners(rec);
            let h = Self::blob_handle(loc, len_bytes);
            if Self::blob_slot(
                h.to_bits(),
                match h.decode() {
                    Some(Decoded::Blob(b)) => b,
                    _ => return Err("a record does not fit a handle".into()),
                },
            )
            .is_err()
            {
                return Err(format!(
                    "a record of chunk {} slot {} names a length ({len_bytes}) its class cannot hold",
                    loc.chunk_idx, loc.slot_idx
                ));
            }
            if store.slabs.is_on_disk(loc) == Ok(true) {
                store
                    .counters
                    .account_disk_added(h.kind(), len_bytes as u64);
            } else {
                store.counters.account(h.kind(), false, len_bytes as u64, 1);
            }
            store.counters.shared_refs += u64::from(owners.count_ones().saturating_sub(1));
            pages.push((addr, owners, h));
        }
        Ok((store, pages))
    }

    /// The pages of member `member` (records carrying its owner bit), as (page address,
    /// handle): what an adopted program's page map starts from.
    pub fn member_pages(&self, member: u8) -> Vec<(u64, Handle)> {
        let bit = 1u16 << member;
        self.slabs
            .used_slots()
            .into_iter()
            .filter(|(_, rec)| crate::protocol::store_layout::record_owners(*rec) & bit != 0)
            .map(|(loc, rec)| {
                let (addr, len_bytes) = crate::protocol::store_layout::record_parts(rec);
                (addr, Self::blob_handle(loc, len_bytes))
            })
            .collect()
    }

    /// Marks member `member` live in the family (an adopted program names its own index).
    /// Returns false if it already is.
    pub fn adopt_member(&mut self, member: u8) -> bool {
        let bit = 1u16 << member;
        if self.members & bit != 0 {
            return false;
        }
        self.members |= bit;
        true
    }

    /// The store file of a durable store (see [`StoreConfig::durable`]).
    pub fn file(&self) -> Option<&std::fs::File> {
        self.slabs.file()
    }

    /// An empty, non-durable store; maps nothing until the first blob arrives.
    pub fn new(cfg: StoreConfig) -> Store {
        assert!(!cfg.durable, "a durable store is made with Store::try_new");
        assert!(cfg.disk.is_none(), "a disk tier needs a durable store");
        Store {
            slabs: Slabs::new(cfg.max_bytes),
            words: WordTable::default(),
            counters: Counters::default(),
            put_scratch: Vec::new(),
            members: 1,
            disk_sync_reads: Default::default(),
        }
    }

    /// Places an encoded page of the program's page at `addr` (page-aligned, nonzero; kept in
    /// the page's durable record); `page` is the original (used for [`Encoded::Raw`], and for
    /// an [`Encoded::Lz4`] payload too long or empty to be one of ours, which is kept raw).
    /// On [`StoreError::Full`] nothing changed. The page belongs to family member 0.
    pub fn insert(
        &mut self,
        enc: Encoded<'_>,
        page: &[u8; PAGE_SIZE],
        addr: u64,
    ) -> Result<Handle, StoreError> {
        self.insert_as(0, enc, page, addr)
    }

    /// [`Store::insert`] of a page of family member `member` (see
    /// [`crate::protocol::store_layout`], "Fork families").
    pub fn insert_as(
        &mut self,
        member: u8,
        enc: Encoded<'_>,
        page: &[u8; PAGE_SIZE],
        addr: u64,
    ) -> Result<Handle, StoreError> {
        assert!((member as usize) < MAX_OWNERS, "member {member}");
        if addr >= ADDR_LIMIT {
            // A record cannot name it (only programs that ask mmap for addresses above 2^47
            // get such pages); the page stays where it is.
            self.counters.inserts_refused_full += 1;
            return Err(StoreError::Full);
        }
        let owners = 1u16 << member;
        let placed = match enc {
            Encoded::SameFilled(word) if word != 0 && self.slabs.file().is_some() => {
                // A durable store keeps a record (and so a blob) for every page but zero ones.
                let mut scratch = std::mem::take(&mut self.put_scratch);
                scratch.resize(SCRATCH_BYTES, 0);
                let placed = match lz4_flex::block::compress_into(page, &mut scratch) {
                    Ok(len) => match lz4_class_for_len(len) {
                        Some(class_idx) => {
                            self.place_blob(class_idx, &scratch[..len], addr, owners)
                        }
                        None => self.place_blob(RAW_CLASS_IDX, page, addr, owners),
                    },
                    Err(_) => self.place_blob(RAW_CLASS_IDX, page, addr, owners),
                };
                self.put_scratch = scratch;
                placed
            }
            Encoded::SameFilled(word) => {
                debug_assert_eq!(same_filled_word(page), Some(word));
                match self.words.acquire(word) {
                    Some(word_ref) => {
                        self.counters.account(PageKind::SameFilled, word == 0, 0, 1);
                        Ok(Handle::same_filled(word_ref))
                    }
                    None => Err(StoreError::Full),
                }
            }
            Encoded::Lz4(payload) => match lz4_class_for_len(payload.len()) {
                Some(class_idx) => self.place_blob(class_idx, payload, addr, owners),
                None => self.place_blob(RAW_CLASS_IDX, page, addr, owners),
            },
            Encoded::Raw => self.place_blob(RAW_CLASS_IDX, page, addr, owners),
        };
        if matches!(placed, Err(StoreError::Full)) {
            self.counters.inserts_refused_full += 1;
        }
        placed
    }

    fn place_blob(
        &mut self,
        class_idx: u8,
        payload: &[u8],
        addr: u64,
        owners: u16,
    ) -> Result<Handle, StoreError> {
        let loc = self.slabs.store(class_idx, payload, addr, owners)?;
        let h = Self::blob_handle(loc, payload.len());
        self.counters
            .account(h.kind(), false, payload.len() as u64, 1);
        Ok(h)
    }

    /// Places a blob straight in the disk tier, written synchronously (`pwrite`) before its
    /// record is set (layout write order, step 6).
    fn place_on_disk(
        &mut self,
        class_idx: u8,
        payload: &[u8],
        addr: u64,
        owners: u16,
    ) -> Result<Handle, StoreError> {
        use std::os::unix::fs::FileExt;
        let loc = self.slabs.reserve_disk(class_idx)?;
        let written = self
            .slabs
            .disk()
            .expect("reserve_disk needs a disk tier")
            .file()
            .write_all_at(payload, Slabs::disk_off(loc));
        if let Err(e) = written {
            let _ = self.slabs.free(loc);
            return Err(StoreError::Disk(e));
        }
        let rec = crate::protocol::store_layout::record(addr, payload.len(), owners);
        self.slabs
            .publish(loc, rec)
            .map_err(|reason| StoreError::CorruptHandle { bits: 0, reason })?;
        let h = Self::blob_handle(loc, payload.len());
        self.counters
            .account_disk_added(h.kind(), payload.len() as u64);
        Ok(h)
    }

    /// Convenience: [`encode`] + [`Store::insert`], with a scratch buffer of the store's own
    /// (so it compresses under the caller's lock; the monitor's hot path uses `encode` first).
    pub fn put(&mut self, page: &[u8; PAGE_SIZE], addr: u64) -> Result<Handle, StoreError> {
        self.put_as(0, page, addr)
    }

    /// [`Store::put`] of a page of family member `member`.
    pub fn put_as(
        &mut self,
        member: u8,
        page: &[u8; PAGE_SIZE],
        addr: u64,
    ) -> Result<Handle, StoreError> {
        let mut scratch = std::mem::take(&mut self.put_scratch);
        let placed = self.insert_as(member, encode(page, &mut scratch), page, addr);
        self.put_scratch = scratch;
        placed
    }

    /// Checks a decoded blob handle's length against its class; returns the slab location.
    fn blob_slot(bits: u64, loc: BlobLoc) -> Result<SlotLoc, StoreError> {
        let len_bytes = loc.len_bytes as usize;
        let len_ok = if loc.class_idx == RAW_CLASS_IDX {
            len_bytes == PAGE_SIZE
        } else {
            lz4_class_for_len(len_bytes) == Some(loc.class_idx)
        };
        if !len_ok {
            return Err(StoreError::CorruptHandle {
                bits,
                reason: "length does not match size class",
            });
        }
        Ok(SlotLoc {
            class_idx: loc.class_idx,
            chunk_idx: loc.chunk_idx,
            slot_idx: loc.slot_idx,
        })
    }

    /// The handle of a blob of `len_bytes` in slot `loc`.
    fn blob_handle(loc: SlotLoc, len_bytes: usize) -> Handle {
        Handle::blob(BlobLoc {
            class_idx: loc.class_idx,
            chunk_idx: loc.chunk_idx,
            slot_idx: loc.slot_idx,
            // <= PAGE_SIZE: a slot holds at most a page.
            len_bytes: len_bytes as u32,
        })
    }

    /// Copies the page behind `h` into `out`. The page stays stored.
    pub fn get(&self, h: Handle, out: &mut [u8; PAGE_SIZE]) -> Result<(), StoreError> {
        let bits = h.to_bits();
        let corrupt = |reason| StoreError::CorruptHandle { bits, reason };
        match h.decode().ok_or(corrupt("reserved bits set"))? {
            Decoded::SameFilled { word_ref } => {
                let word = self
                    .words
                    .word(word_ref)
                    .ok_or(corrupt("no such fill word"))?;
                encode::fill_word(out, word);
                Ok(())
            }
            Decoded::Blob(loc) => {
                let slot = Self::blob_slot(bits, loc)?;
                if self.slabs.is_on_disk(slot).map_err(corrupt)? {
                    let mut payload = [0u8; PAGE_SIZE];
                    let payload = &mut payload[..loc.len_bytes as usize];
                    self.read_disk(slot, payload)?;
                    self.disk_sync_reads
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Self::decode_payload(h, payload, out);
                }
                let payload = self
                    .slabs
                    .read(slot, loc.len_bytes as usize)
                    .map_err(corrupt)?;
                Self::decode_payload(h, payload, out)
            }
        }
    }

    /// Reads a disk slot's payload with `pread`.
    fn read_disk(&self, slot: SlotLoc, payload: &mut [u8]) -> Result<(), StoreError> {
        let disk = self.slabs.disk().ok_or(StoreError::CorruptHandle {
            bits: 0,
            reason: "a disk chunk without a disk file",
        })?;
        disk.read_exact_at(payload, Slabs::disk_off(slot))
            .map_err(StoreError::Disk)
    }

    /// Decodes `payload`, the blob of `h` (read from the slabs or, for a disk page, from the
    /// disk file by the caller), into `out`. Its length must be the handle's.
    pub fn decode_payload(
        h: Handle,
        payload: &[u8],
        out: &mut [u8; PAGE_SIZE],
    ) -> Result<(), StoreError> {
        let bits = h.to_bits();
        let Some(Decoded::Blob(loc)) = h.decode() else {
            return Err(StoreError::CorruptHandle {
                bits,
                reason: "not a blob handle",
            });
        };
        if payload.len() != loc.len_bytes as usize {
            return Err(StoreError::CorruptHandle {
                bits,
                reason: "payload length differs from the handle's",
            });
        }
        if loc.class_idx == RAW_CLASS_IDX {
            out.copy_from_slice(payload);
            Ok(())
        } else {
            encode::decompress(payload, out)
                .map_err(|detail| StoreError::DecompressFailed { bits, detail })
        }
    }

    /// The payload of a blob in use, read from the disk file when it is there.
    fn payload(&self, slot: SlotLoc, len_bytes: usize) -> Result<Vec<u8>, StoreError> {
        let corrupt = |reason| StoreError::CorruptHandle { bits: 0, reason };
        if self.slabs.is_on_disk(slot).map_err(corrupt)? {
            let mut v = vec![0u8; len_bytes];
            self.read_disk(slot, &mut v)?;
            return Ok(v);
        }
        Ok(self.slabs.read(slot, len_bytes).map_err(corrupt)?.to_vec())
    }

    /// Bytes of the memory slots in use (what the disk tier's watermarks compare with
    /// `max_store`).
    pub fn slot_bytes_used(&self) -> u64 {
        self.slabs.used_slot_bytes()
    }

    /// Bytes of the memory chunks mapped (what `max_bytes` bounds).
    pub fn mapped_bytes(&self) -> u64 {
        self.slabs.mapped_bytes()
    }

    /// Inserts refused with [`StoreError::Full`] so far.
    pub fn inserts_refused_full(&self) -> u64 {
        self.counters.inserts_refused_full
    }

    /// Whether the store has a disk tier.
    pub fn has_disk(&self) -> bool {
        self.slabs.disk().is_some()
    }

    /// The disk tier's file, if any.
    pub fn disk_file(&self) -> Option<&std::fs::File> {
        self.slabs.disk().map(DiskFile::file)
    }

    /// The disk tier's directory, if any.
    pub fn disk_dir(&self) -> Option<&std::path::Path> {
        self.slabs.disk().map(DiskFile::dir)
    }

    /// Where `h`'s payload is in the disk file, if `h` names a disk page (and `None` for any
    /// other handle, a corrupt one included: [`Store::get`] then says what is wrong).
    pub fn disk_read(&self, h: Handle) -> Option<DiskRead> {
        let Some(Decoded::Blob(loc)) = h.decode() else {
            return None;
        };
        let slot = Self::blob_slot(h.to_bits(), loc).ok()?;
        self.slabs.is_on_disk(slot).ok()?.then_some(DiskRead {
            off: Slabs::disk_off(slot),
            len_bytes: loc.len_bytes,
            slot_bytes: slab::slot_bytes(loc.class_idx) as u32,
        })
    }

    /// Counts disk slots freed so far. A disk payload read without the store's lock is the
    /// blob of its handle if this is unchanged once the lock is held again and the handle
    /// still names the page: no disk slot was freed (so none reused) in between.
    pub fn disk_epoch(&self) -> u64 {
        self.slabs.disk_frees()
    }

    /// Starts moving member `member`'s page at `addr`, stored as `h`, to the disk tier: a disk
    /// slot of its class is reserved (no record yet), the payload is appended to `buf`, and
    /// the memory slot is pinned. The caller writes `buf[buf_off..][..len_bytes]` at
    /// `disk_off` of the disk file (without any lock), waits for the write to complete, then
    /// calls [`Store::commit_demote`] (or [`Store::abort_demote`]). `Ok(None)`: not a page to
    /// demote (same-filled, on disk already, shared with another member, or being demoted).
    /// [`StoreError::Full`]: the disk tier is full or absent.
    pub fn begin_demote(
        &mut self,
        member: u8,
        h: Handle,
        addr: u64,
        buf: &mut Vec<u8>,
    ) -> Result<Option<Demotion>, StoreError> {
        let bits = h.to_bits();
        let corrupt = |reason| StoreError::CorruptHandle { bits, reason };
        let Some(Decoded::Blob(loc)) = h.decode() else {
            return Ok(None);
        };
        let slot = Self::blob_slot(bits, loc)?;
        if self.slabs.is_on_disk(slot).map_err(corrupt)? || self.slabs.is_pinned(slot) {
            return Ok(None);
        }
        let rec = self.slabs.record(slot).map_err(corrupt)?;
        let owners = crate::protocol::store_layout::record_owners(rec);
        let (rec_addr, _) = crate::protocol::store_layout::record_parts(rec);
        if owners != 1u16 << member || rec_addr != addr {
            return Ok(None);
        }
        let dst = self.slabs.reserve_disk(loc.class_idx)?;
        let payload = self
            .slabs
            .read(slot, loc.len_bytes as usize)
            .map_err(corrupt)?;
        let buf_off = buf.len();
        buf.extend_from_slice(payload);
        self.slabs.pin(slot);
        Ok(Some(Demotion {
            addr,
            old: h,
            new: Self::blob_handle(dst, loc.len_bytes as usize),
            disk_off: Slabs::disk_off(dst),
            buf_off,
            len_bytes: loc.len_bytes,
            slot_bytes: slab::slot_bytes(loc.class_idx) as u32,
            rec,
        }))
    }

    /// Finishes a demotion whose payload is written to the disk file: if the memory slot was
    /// not freed since [`Store::begin_demote`] and its record is unchanged (same address, same
    /// sole owner), the disk record is published and then the memory slot is freed (layout
    /// write order, step 6), and `true` is returned: the caller's page map must name the page
    /// by `d.new` from now on (it checked, under its own lock, that it still names it by
    /// `d.old`). Otherwise the reserved disk slot is given back and `false` is returned.
    pub fn commit_demote(&mut self, d: &Demotion) -> bool {
        let (old, new) = (Self::loc_of(d.old), Self::loc_of(d.new));
        let still = self.slabs.unpin(old) && self.slabs.record(old) == Ok(d.rec);
        if !still {
            let _ = self.slabs.free(new);
            return false;
        }
        if let Err(e) = self.slabs.publish(new, d.rec) {
            tracing::error!(error = e, "store: publishing a disk record failed");
            let _ = self.slabs.free(new);
            return false;
        }
        self.slabs
            .free(old)
            .expect("the pinned slot is in use (checked above)");
        self.counters.account_demoted(u64::from(d.len_bytes));
        true
    }

    /// Gives up a demotion (the write failed, or the page map no longer names the page by
    /// `d.old`): the reserved disk slot is freed, the memory slot unpinned.
    pub fn abort_demote(&mut self, d: &Demotion) {
        self.slabs.unpin(Self::loc_of(d.old));
        let _ = self.slabs.free(Self::loc_of(d.new));
    }

    /// The slot of a blob handle this store made.
    fn loc_of(h: Handle) -> SlotLoc {
        match h.decode() {
            Some(Decoded::Blob(b)) => SlotLoc {
                class_idx: b.class_idx,
                chunk_idx: b.chunk_idx,
                slot_idx: b.slot_idx,
            },
            _ => unreachable!("demotions are made of blob handles only"),
        }
    }

    /// Records that the page behind `h` now belongs at `addr` (the program moved it). A
    /// same-filled handle has no record and nothing changes. For member 0; see
    /// [`Store::set_addr_as`].
    pub fn set_addr(&mut self, h: Handle, addr: u64) -> Result<(), StoreError> {
        let h2 = self.set_addr_as(0, h, addr)?;
        debug_assert_eq!(h2, h, "member 0 alone owns the pages of an unshared store");
        Ok(())
    }

    /// Records that member `member`'s page behind `h` now belongs at `addr`. A blob other
    /// members own too is first copied to a slot of the member's own (the others' pages did
    /// not move); the handle to keep is returned. On error nothing changed.
    pub fn set_addr_as(&mut self, member: u8, h: Handle, addr: u64) -> Result<Handle, StoreError> {
        let bits = h.to_bits();
        let corrupt = |reason| StoreError::CorruptHandle { bits, reason };
        match h.decode().ok_or(corrupt("reserved bits set"))? {
            Decoded::SameFilled { .. } => Ok(h),
            Decoded::Blob(loc) => {
                let slot = Self::blob_slot(bits, loc)?;
                let me = 1u16 << member;
                let owners = self.slabs.owners(slot).map_err(corrupt)?;
                if owners & me == 0 {
                    return Err(corrupt("page not owned by this member"));
                }
                if addr >= ADDR_LIMIT {
                    return Err(corrupt("address above what a record can name"));
                }
                if owners == me {
                    self.slabs.set_addr(slot, addr).map_err(corrupt)?;
                    return Ok(h);
                }
                // The copy goes to memory (a disk page's payload read back with `pread`); when
                // the memory quota refuses it, to the disk tier if there is one.
                let payload = self.payload(slot, loc.len_bytes as usize)?;
                let copy = match self.place_blob(loc.class_idx, &payload, addr, me) {
                    Err(StoreError::Full) if self.has_disk() => {
                        self.place_on_disk(loc.class_idx, &payload, addr, me)?
                    }
                    other => other?,
                };
                self.slabs.set_owners(slot, owners & !me).map_err(corrupt)?;
                self.counters.shared_refs -= 1;
                self.counters.shared_copies += 1;
                Ok(copy)
            }
        }
    }

    /// Makes the page behind `h` a page of member `member` too (a fork): a blob's record
    /// gains the member's owner bit, a same-filled page gains a reference. The same handle
    /// then names the page for both; each side drops it with [`Store::try_remove_as`].
    pub fn share(&mut self, h: Handle, member: u8) -> Result<(), StoreError> {
        assert!((member as usize) < MAX_OWNERS, "member {member}");
        let bits = h.to_bits();
        let corrupt = |reason| StoreError::CorruptHandle { bits, reason };
        match h.decode().ok_or(corrupt("reserved bits set"))? {
            Decoded::SameFilled { word_ref } => {
                let word = self
                    .words
                    .word(word_ref)
                    .ok_or(corrupt("no such fill word"))?;
                let again = self.words.acquire(word).ok_or(StoreError::Full)?;
                debug_assert_eq!(again, word_ref);
                self.counters
                    .account(PageKind::SameFilled, word_ref == 0, 0, 1);
                Ok(())
            }
            Decoded::Blob(loc) => {
                let slot = Self::blob_slot(bits, loc)?;
                let owners = self.slabs.owners(slot).map_err(corrupt)?;
                let me = 1u16 << member;
                if owners & me != 0 {
                    return Err(corrupt("page already owned by this member"));
                }
                self.slabs.set_owners(slot, owners | me).map_err(corrupt)?;
                self.counters.shared_refs += 1;
                Ok(())
            }
        }
    }

    /// Takes a free member index for a new member of this store's fork family (at most
    /// [`MAX_OWNERS`] live at once); `None` when all are taken.
    pub fn join_member(&mut self) -> Option<u8> {
        let free = !self.members;
        if free == 0 {
            return None;
        }
        let m = free.trailing_zeros() as u8;
        self.members |= 1 << m;
        Some(m)
    }

    /// Gives member `member`'s index back. Its pages must have been dropped first.
    pub fn leave_member(&mut self, member: u8) {
        self.members &= !(1u16 << member);
    }

    /// Members of the family still live.
    pub fn member_count(&self) -> u32 {
        self.members.count_ones()
    }

    /// Drops the page behind `h`, freeing its slot (and its chunk, if that was the last).
    /// A handle that names no live page changes nothing and returns
    /// [`StoreError::CorruptHandle`]; it means the caller's page map is wrong.
    pub fn try_remove(&mut self, h: Handle) -> Result<(), StoreError> {
        self.try_remove_as(0, h)
    }

    /// Drops member `member`'s page behind `h`: the member's owner bit is cleared, and the
    /// slot freed once no member owns it. On error nothing changed.
    pub fn try_remove_as(&mut self, member: u8, h: Handle) -> Result<(), StoreError> {
        let bits = h.to_bits();
        let corrupt = |reason| StoreError::CorruptHandle { bits, reason };
        match h.decode().ok_or(corrupt("reserved bits set"))? {
            Decoded::SameFilled { word_ref } => {
                if !self.words.release(word_ref) {
                    return Err(corrupt("no such fill word"));
                }
                self.counters
                    .account(PageKind::SameFilled, word_ref == 0, 0, -1);
            }
            Decoded::Blob(loc) => {
                let slot = Self::blob_slot(bits, loc)?;
                let owners = self.slabs.owners(slot).map_err(corrupt)?;
                let me = 1u16 << member;
                if owners & me == 0 {
                    return Err(corrupt("page not owned by this member"));
                }
                if owners != me {
                    self.slabs.set_owners(slot, owners & !me).map_err(corrupt)?;
                    self.counters.shared_refs -= 1;
                    return Ok(());
                }
                let on_disk = self.slabs.is_on_disk(slot).map_err(corrupt)?;
                self.slabs.free(slot).map_err(corrupt)?;
                if on_disk {
                    self.counters
                        .account_disk_removed(h.kind(), u64::from(loc.len_bytes));
                } else {
                    self.counters
                        .account(h.kind(), false, u64::from(loc.len_bytes), -1);
                }
            }
        }
        Ok(())
    }

    /// [`Store::try_remove`] for callers that hold only handles the store gave them. A bad
    /// handle is logged (and is a panic in debug builds: the page map is inconsistent).
    pub fn remove(&mut self, h: Handle) {
        self.remove_as(0, h)
    }

    /// [`Store::try_remove_as`], logging a bad handle as [`Store::remove`] does.
    pub fn remove_as(&mut self, member: u8, h: Handle) {
        if let Err(e) = self.try_remove_as(member, h) {
            tracing::error!(error = %e, "store: remove of a handle naming no live page");
            debug_assert!(false, "store: remove failed: {e}");
        }
    }

    /// Gives back the memory of pages inside memory chunks that hold no slot in use and no
    /// record (`Slabs::punch_slack`), at most `max_runs` runs of them; returns the pages.
    pub fn punch_slack(&mut self, max_runs: usize) -> u64 {
        self.slabs.punch_slack(max_runs)
    }

    /// Bytes of such pages not given back yet.
    pub fn slack_bytes(&self) -> u64 {
        self.slabs.slack_bytes()
    }

    /// Slot bytes the store's memory chunks could give back by compaction: per size class,
    /// the chunks mapped beyond those its slots in use need. O(chunks).
    pub fn compactable_bytes(&self) -> u64 {
        self.slabs
            .class_usage()
            .iter()
            .enumerate()
            .map(|(class_idx, &(chunks, used))| {
                let per_chunk = slab::slots_per_chunk(class_idx as u8) as u64;
                (u64::from(chunks) - used.div_ceil(per_chunk)) * CHUNK_BYTES as u64
            })
            .sum()
    }

    /// Compaction (see `Slabs::compact_class`; layout write order, step 7): blobs of member
    /// `member` alone are moved out of the sparsest memory chunks of each size class into
    /// free slots of its other chunks, and the chunks so emptied are given back. A blob moves
    /// only if `movable(addr, handle)` (the caller's page map still names the page at `addr`
    /// by `handle`, under the lock the caller holds), at most `max_moves` in all, classes with
    /// the most to give back first. Returns each move as (page address, old handle, new
    /// handle): the caller's page map must name each page by its new handle from now on.
    /// `published(bytes)` is called with the payload bytes moved so far each time a new copy
    /// is published and its old one not yet dropped (for the kill tests' death point).
    pub fn compact(
        &mut self,
        member: u8,
        max_moves: usize,
        movable: &mut dyn FnMut(u64, Handle) -> bool,
        published: &mut dyn FnMut(u64),
    ) -> Compaction {
        let usage = self.slabs.class_usage();
        let mut classes: Vec<(u64, u8)> = usage
            .iter()
            .enumerate()
            .filter_map(|(class_idx, &(chunks, used))| {
                let per_chunk = slab::slots_per_chunk(class_idx as u8) as u64;
                let freeable = u64::from(chunks) - used.div_ceil(per_chunk);
                (freeable > 0).then_some((freeable, class_idx as u8))
            })
            .collect();
        classes.sort_unstable_by(|a, b| b.cmp(a));
        let me = 1u16 << member;
        let mut out = Compaction::default();
        let mut copied = 0u64;
        let handle = Self::blob_handle;
        for (freeable, class_idx) in classes {
            let left = max_moves.saturating_sub(out.moves.len());
            if left == 0 {
                break;
            }
            let (moves, freed) = self.slabs.compact_class(
                class_idx,
                freeable as usize,
                left,
                &mut |loc, rec| {
                    let (addr, len_bytes) = crate::protocol::store_layout::record_parts(rec);
                    crate::protocol::store_layout::record_owners(rec) == me
                        && movable(addr, handle(loc, len_bytes))
                },
                &mut |len_bytes| {
                    copied += len_bytes as u64;
                    published(copied);
                },
            );
            out.chunks_freed += freed;
            for (old, new, rec) in moves {
                let (addr, len_bytes) = crate::protocol::store_layout::record_parts(rec);
                out.bytes_moved += len_bytes as u64;
                out.moves
                    .push((addr, handle(old, len_bytes), handle(new, len_bytes)));
            }
        }
        self.counters.compact_moves += out.moves.len() as u64;
        self.counters.compact_chunks_freed += out.chunks_freed;
        out
    }

    /// Idle-time recompression, first half (under the caller's lock): up to `max` lz4 blobs
    /// in memory that member `member` alone owns and that were never offered in their slot
    /// (see `Slabs::unsettled`), each only if `movable(addr, handle)` (the caller's page map
    /// names the page by that handle). Their payloads are appended to `arena`, so the caller
    /// can recompress them without the lock ([`encode::recompress`]) and then
    /// [`Store::replace_blob`] each under it again (or [`Store::withdraw_candidate`] it). Each
    /// candidate's slot stays *offered* until then: freeing it (the page went back, say) ends
    /// the offer, so a slot reused meanwhile by another page with the same handle is never
    /// taken for the one that was read.
    pub fn recompress_candidates(
        &mut self,
        member: u8,
        max: usize,
        movable: &mut dyn FnMut(u64, Handle) -> bool,
        arena: &mut Vec<u8>,
    ) -> Vec<RecompressCandidate> {
        let me = 1u16 << member;
        let picked = self.slabs.unsettled(max, &mut |loc, rec| {
            let (addr, len_bytes) = crate::protocol::store_layout::record_parts(rec);
            crate::protocol::store_layout::record_owners(rec) == me
                && lz4_class_for_len(len_bytes) == Some(loc.class_idx)
                && movable(addr, Self::blob_handle(loc, len_bytes))
        });
        let mut out = Vec::with_capacity(picked.len());
        for (loc, rec) in picked {
            let (addr, len_bytes) = crate::protocol::store_layout::record_parts(rec);
            let Ok(payload) = self.slabs.read(loc, len_bytes) else {
                continue;
            };
            let off = arena.len();
            arena.extend_from_slice(payload);
            self.slabs.offer(loc);
            out.push(RecompressCandidate {
                addr,
                handle: Self::blob_handle(loc, len_bytes),
                off,
                len_bytes,
            });
        }
        out
    }

    /// Idle-time recompression, second half: replaces member `member`'s blob `old` of the page
    /// at `addr` by `payload`, a shorter lz4 block or zstd frame of the same page that fits a
    /// smaller size class (the caller recompressed and checked it; its page map names the
    /// page by `old` under the lock it holds). Layout write order, step 8: the new payload and
    /// the *same* record but its length are published in the new slot first,
    /// `published(bytes)` is called with the payload bytes recompression saved so far, this
    /// blob's included (for the kill tests' death point),
    /// and only then is the old slot freed; a reader in between finds the page twice, with
    /// the same contents. Returns the new handle; on error nothing changed (a full store,
    /// or `old` is not a sole-owned memory blob of that page, or the payload would not
    /// shrink it).
    pub fn replace_blob(
        &mut self,
        member: u8,
        old: Handle,
        addr: u64,
        payload: &[u8],
        published: &mut dyn FnMut(u64),
    ) -> Result<Handle, StoreError> {
        let bits = old.to_bits();
        let corrupt = |reason| StoreError::CorruptHandle { bits, reason };
        let Some(Decoded::Blob(old_loc)) = old.decode() else {
            return Err(corrupt("not a blob"));
        };
        let slot = Self::blob_slot(bits, old_loc)?;
        // Ends the offer either way: the caller is done with this candidate.
        if !self.slabs.take_offer(slot) {
            return Err(corrupt("not offered, or freed since it was offered"));
        }
        let rec = self.slabs.record(slot).map_err(corrupt)?;
        let (rec_addr, _) = crate::protocol::store_layout::record_parts(rec);
        let owners = crate::protocol::store_layout::record_owners(rec);
        if rec == 0 || rec_addr != addr || owners != 1u16 << member {
            return Err(corrupt("not a sole-owned blob of that page"));
        }
        if self.slabs.is_on_disk(slot).map_err(corrupt)? || self.slabs.is_pinned(slot) {
            return Err(corrupt("not a blob in memory at rest"));
        }
        let new_class = match lz4_class_for_len(payload.len()) {
            Some(c) if old_loc.class_idx != RAW_CLASS_IDX && c < old_loc.class_idx => c,
            _ => return Err(corrupt("the new payload does not fit a smaller class")),
        };
        let new_loc = self.slabs.store(new_class, payload, addr, owners)?;
        self.slabs.settle(new_loc);
        let old_len = u64::from(old_loc.len_bytes);
        published(self.counters.recompress_bytes_saved + old_len - payload.len() as u64);
        self.slabs.free(slot).map_err(corrupt)?;
        self.counters.account(PageKind::Lz4, false, old_len, -1);
        self.counters
            .account(PageKind::Lz4, false, payload.len() as u64, 1);
        self.counters.recompressed += 1;
        self.counters.recompress_bytes_saved += old_len - payload.len() as u64;
        Ok(Self::blob_handle(new_loc, payload.len()))
    }

    /// Ends the offer of a candidate that is not replaced (it did not shrink, or its page
    /// changed). Harmless if the slot was freed meanwhile.
    pub fn withdraw_candidate(&mut self, h: Handle) {
        if let Some(Decoded::Blob(b)) = h.decode() {
            self.slabs.take_offer(SlotLoc {
                class_idx: b.class_idx,
                chunk_idx: b.chunk_idx,
                slot_idx: b.slot_idx,
            });
        }
    }

    /// A snapshot of the counters. O(size classes).
    pub fn stats(&self) -> StoreStats {
        let c = &self.counters;
        let mapped = self.slabs.mapped_bytes();
        let used = c.bytes_out;
        StoreStats {
            pages_same_filled: c.pages_same_filled,
            pages_zero: c.pages_zero,
            pages_lz4: c.pages_lz4,
            pages_raw: c.pages_raw,
            bytes_in: c.bytes_in(),
            bytes_out: c.bytes_out,
            slab_bytes_mapped: mapped,
            slab_bytes_used: used,
            slab_bytes_slots: self.slabs.used_slot_bytes(),
            fragmentation: if mapped == 0 {
                0.0
            } else {
                1.0 - used as f64 / mapped as f64
            },
            chunks: self.slabs.live_chunks(),
            fill_words: self.words.live_words() as u64,
            metadata_bytes: self.metadata_bytes(),
            inserts_refused_full: c.inserts_refused_full,
            shared_refs: c.shared_refs,
            shared_copies: c.shared_copies,
            pages_on_disk: c.pages_on_disk,
            disk_bytes_used: c.disk_bytes_out,
            disk_bytes_slots: self.slabs.disk_used_slot_bytes(),
            disk_bytes_mapped: self.slabs.disk_mapped_bytes(),
            disk_chunks: self.slabs.disk_chunks(),
            disk_file_bytes: self.slabs.disk().map_or(0, DiskFile::allocated_bytes),
            pages_demoted: c.pages_demoted,
            compact_moves: c.compact_moves,
            compact_chunks_freed: c.compact_chunks_freed,
            recompressed: c.recompressed,
            recompress_bytes_saved: c.recompress_bytes_saved,
            resident_bytes: self.slabs.resident_bytes(),
            slack_bytes: self.slabs.slack_bytes(),
            punched_bytes: self.slabs.punched_bytes(),
            disk_sync_reads: self
                .disk_sync_reads
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Bytes of store bookkeeping shared by all pages: the `Store` itself, the chunk table,
    /// per-chunk bitmaps, the per-class free lists, the word table and the `put` scratch.
    /// Handles are not included: the monitor holds them, 8 bytes per page. O(size classes).
    pub fn metadata_bytes(&self) -> u64 {
        (std::mem::size_of::<Store>() + self.put_scratch.capacity()) as u64
            + self.slabs.metadata_bytes()
            + self.words.metadata_bytes()
    }

    /// Pages currently stored, of every kind.
    pub fn stored_pages(&self) -> u64 {
        self.counters.pages()
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}
