//! Size-class slabs: fixed-size slots carved out of large mappings, with one durable record
//! per slot.
//!
//! Owns: the chunks (one mapping of [`EXTENT_BYTES`] each: the slots of one size class,
//! preceded by their records; see [`crate::protocol::store_layout`]), the
//! per-chunk used-slot bitmaps, the per-class lists of chunks with a free slot, and the byte
//! quota on mapped memory. Chunks live either in anonymous mappings or, for a durable store,
//! at fixed offsets of one memfd (the store file) whose descriptor the program's shim also
//! holds. An empty chunk is unmapped (and punched out of the file) at once, so memory comes
//! back as pages leave.
//!
//! Disk tier: a durable store may also have *disk chunks* (class byte with
//! [`layout::DISK_CHUNK_FLAG`]): their records are mapped from the store file like any chunk's,
//! their slots are ranges of the disk file ([`super::disk::DiskFile`]), which this module only
//! reserves, frees and punches (the payloads are written and read by the caller). Memory chunks
//! count against `max_mapped_bytes`, disk chunks against `max_disk_bytes`. A memory slot being
//! demoted is *pinned* ([`Slabs::pin`]): freeing it unpins it, so the demotion can tell that the
//! slot it copied may since hold another page.
//! Must not touch: compression, handle bits (it works in class/chunk/slot indices), uffd,
//! processes. Its only system calls are the mmap/munmap done by `memmap2` and, for a durable
//! store, memfd_create, ftruncate and fallocate(PUNCH_HOLE) on the store file and the disk
//! file.
//!
//! Size classes: slots of 32, 64, ..., 3072 bytes for lz4 payloads (32-byte steps, so at most
//! 31 bytes of a slot go unused), and one class of 4096-byte slots for raw pages.

use std::collections::HashSet;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use super::disk::DiskFile;
use super::handle::{MAX_CHUNK_IDX, MAX_SLOT_IDX};
use super::StoreError;
use crate::protocol::store_layout as layout;
use crate::PAGE_SIZE;
use memmap2::{MmapMut, MmapOptions};

pub use layout::{
    slot_bytes, slots_per_chunk, CHUNK_BYTES, CLASS_STEP_BYTES, EXTENT_BYTES, NUM_CLASSES,
    RAW_CLASS_IDX,
};

const BITS_PER_WORD: usize = u64::BITS as usize;
/// Pages of one extent: one bit each in a chunk's page masks.
const PAGES_PER_CHUNK: usize = EXTENT_BYTES / PAGE_SIZE;
const _: () = assert!(PAGES_PER_CHUNK <= u64::BITS as usize);

/// Mask of pages `first..=last`.
fn page_mask(first: usize, last: usize) -> u64 {
    debug_assert!(first <= last && last < PAGES_PER_CHUNK);
    (u64::MAX >> (u64::BITS as usize - 1 - last)) & (u64::MAX << first)
}
/// Slack pages [`Slabs::punch_slack`] leaves in the chunk its class fills next: the lowest
/// ones, which the next slots of the class take again first.
const KEEP_NEXT_SLACK_PAGES: usize = 4;
/// `Chunk::partial_pos` of a chunk that is full (on no partial list).
const NOT_PARTIAL: u32 = u32::MAX;

const _: () = assert!(NUM_CLASSES <= 1 << super::handle::CLASS_BITS);
const _: () = assert!(layout::RECORDS_PER_CHUNK <= MAX_SLOT_IDX as usize + 1);
const _: () = assert!(CHUNK_BYTES / PAGE_SIZE * PAGE_SIZE == CHUNK_BYTES);
const _: () = assert!(super::encode::LZ4_MAX_LEN_BYTES == layout::LZ4_MAX_LEN_BYTES);

/// The smallest lz4 class that holds a payload of `len_bytes`; `None` if it needs more than
/// [`layout::LZ4_MAX_LEN_BYTES`] or is empty.
pub fn lz4_class_for_len(len_bytes: usize) -> Option<u8> {
    if len_bytes == 0 || len_bytes > layout::LZ4_MAX_LEN_BYTES {
        return None;
    }
    // < LZ4_CLASSES <= 128, so it fits in u8.
    Some(len_bytes.div_ceil(CLASS_STEP_BYTES) as u8 - 1)
}

/// The store file of a durable store: the memfd, its size, and the mapping of its header and
/// class table.
struct StoreFile {
    file: std::fs::File,
    len_bytes: u64,
    head: MmapMut,
}

impl StoreFile {
    fn create() -> Result<StoreFile, StoreError> {
        let io = |e| StoreError::Map(e);
        // SAFETY: memfd_create with a static name and flags; the result is checked.
        let fd = unsafe {
            libc::memfd_create(
                c"uswap-store".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        // SAFETY: a new descriptor we own.
        let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let len_bytes = layout::EXTENTS_OFF as u64;
        file.set_len(len_bytes).map_err(io)?;
        // It may grow, never shrink: a monitor that adopts the file from a program (which
        // holds it too) maps it without risking SIGBUS on a truncated page.
        // SAFETY: fcntl(F_ADD_SEALS) on our own memfd.
        if unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
            )
        } != 0
        {
            return Err(io(std::io::Error::last_os_error()));
        }
        // SAFETY: a shared mapping of our own memfd, which no one truncates below this length
        // (the file only grows; extents are punched, which keeps the size).
        let mut head =
            unsafe { MmapOptions::new().len(layout::EXTENTS_OFF).map_mut(&file) }.map_err(io)?;
        layout::write_header(&mut head[..layout::HEADER_BYTES]);
        Ok(StoreFile {
            file,
            len_bytes,
            head,
        })
    }

    fn class_byte(&self, chunk_idx: u32) -> &AtomicU8 {
        let off = layout::CLASS_TABLE_OFF + chunk_idx as usize;
        assert!(off < self.head.len());
        // SAFETY: in bounds (asserted); AtomicU8 has the size and alignment of u8; the mapping
        // lives as long as `self`.
        unsafe { &*(self.head.as_ptr().add(off) as *const AtomicU8) }
    }

    /// Maps the first `len_bytes` of chunk `chunk_idx`'s extent (all of it for a memory
    /// chunk, the records of a disk chunk), growing the file to the extent's end first (layout
    /// write order, step 1; a reader sees a chunk only within the file's length).
    fn map_extent(&mut self, chunk_idx: u32, len_bytes: usize) -> Result<MmapMut, StoreError> {
        let io = |e| StoreError::Map(e);
        let off = layout::extent_off(chunk_idx as usize) as u64;
        let end = off + EXTENT_BYTES as u64;
        if end > self.len_bytes {
            self.file.set_len(end).map_err(io)?;
            self.len_bytes = end;
        }
        // SAFETY: a shared mapping of our own memfd within its length (grown just above; it
        // never shrinks).
        unsafe {
            MmapOptions::new()
                .offset(off)
                .len(len_bytes)
                .map_mut(&self.file)
        }
        .map_err(io)
    }

    /// Gives an empty extent's memory back (layout write order, step 5: after its class byte).
    fn punch(&self, chunk_idx: u32) {
        if let Err(e) = self.punch_range(chunk_idx, 0, EXTENT_BYTES) {
            tracing::warn!(
                chunk_idx,
                error = %e,
                "store: punching an empty chunk out of the store file failed (memory stays charged)"
            );
        }
    }

    /// Frees the pages of `len_bytes` at `off_bytes` in chunk `chunk_idx`'s extent; they must
    /// hold no live record and no slot in use (the file keeps its size, the pages read as
    /// zeros).
    fn punch_range(
        &self,
        chunk_idx: u32,
        off_bytes: usize,
        len_bytes: usize,
    ) -> std::io::Result<()> {
        debug_assert!(off_bytes % PAGE_SIZE == 0 && off_bytes + len_bytes <= EXTENT_BYTES);
        let off = (layout::extent_off(chunk_idx as usize) + off_bytes) as i64;
        // SAFETY: fallocate on our own memfd; PUNCH_HOLE|KEEP_SIZE changes no size and frees
        // only the given pages of the extent, which the caller checked hold nothing live.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len_bytes as i64,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Slab bytes mapped by every store of this process (the monitor's daemon-wide figure).
static ALL_MAPPED_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Disk chunk bytes of every store of this process.
static ALL_DISK_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Slab bytes mapped by every live store of this process.
pub fn all_mapped_bytes() -> u64 {
    ALL_MAPPED_BYTES.load(Ordering::Relaxed)
}

/// Disk chunk bytes (slots in disk files) of every live store of this process.
pub fn all_disk_bytes() -> u64 {
    ALL_DISK_BYTES.load(Ordering::Relaxed)
}

impl Drop for Slabs {
    fn drop(&mut self) {
        ALL_MAPPED_BYTES.fetch_sub(self.live_chunks * CHUNK_BYTES as u64, Ordering::Relaxed);
        ALL_DISK_BYTES.fetch_sub(self.disk_chunks * CHUNK_BYTES as u64, Ordering::Relaxed);
    }
}

/// One extent: the records, then the slots of a single class (a disk chunk maps only the
/// records; its slots are in the disk file).
struct Chunk {
    map: MmapMut,
    on_disk: bool,
    /// Bit `i` set = slot `i` in use. Bits past the last slot are set, so they never look free.
    used_bitmap: Box<[u64]>,
    /// Bit `i` set = slot `i`'s blob was offered for recompression already (or the slot is
    /// free, or past the last slot): [`Slabs::unsettled`] skips it. Monitor memory only; an
    /// adopted store starts with every blob unsettled.
    settled_bitmap: Box<[u64]>,
    used_slots: u32,
    /// Slots in use and not settled: a chunk with none is skipped without reading its bitmaps.
    unsettled_slots: u32,
    class_idx: u8,
    /// Index in `Slabs::partial[class_idx]`, or [`NOT_PARTIAL`] while the chunk is full.
    partial_pos: u32,
    /// Bit `p` set = page `p` of the extent may hold memory: a slot on it was taken since
    /// the page was last punched (or the chunk was adopted). Memory chunks only.
    written_pages: u64,
    /// Bit `p` set = page `p` is written, holds no record and no slot in use overlaps it:
    /// memory [`Slabs::punch_slack`] can give back. A subset of `written_pages`.
    slack_pages: u64,
}

impl Chunk {
    fn new(class_idx: u8, map: MmapMut, on_disk: bool) -> Chunk {
        debug_assert_eq!(map.len(), Slabs::map_len(class_idx, on_disk));
        let slots = slots_per_chunk(class_idx);
        let words = slots.div_ceil(BITS_PER_WORD);
        let mut used_bitmap = vec![0u64; words].into_boxed_slice();
        let tail_bits = slots % BITS_PER_WORD;
        if tail_bits != 0 {
            used_bitmap[words - 1] = !((1u64 << tail_bits) - 1);
        }
        let settled_bitmap = vec![u64::MAX; words].into_boxed_slice();
        Chunk {
            map,
            on_disk,
            used_bitmap,
            settled_bitmap,
            used_slots: 0,
            unsettled_slots: 0,
            class_idx,
            partial_pos: NOT_PARTIAL,
            written_pages: 0,
            slack_pages: 0,
        }
    }

    /// The pages of the extent that slot `slot_idx`'s bytes lie on, as a mask.
    fn slot_pages(&self, slot_idx: usize) -> u64 {
        let range = self.slot_range(slot_idx, slot_bytes(self.class_idx));
        let first = range.start / PAGE_SIZE;
        let last = (range.end - 1) / PAGE_SIZE;
        page_mask(first, last)
    }

    /// Whether page `page_idx` of the extent holds no record and no byte of a slot in use.
    fn page_is_slack(&self, page_idx: usize) -> bool {
        let records_end = layout::records_bytes(self.class_idx);
        let start = page_idx * PAGE_SIZE;
        if start < records_end {
            return false;
        }
        let sb = slot_bytes(self.class_idx);
        let slots = slots_per_chunk(self.class_idx);
        let first = (start - records_end) / sb;
        let last = ((start + PAGE_SIZE - 1 - records_end) / sb).min(slots.saturating_sub(1));
        (first..=last).all(|s| s >= slots || !self.is_used(s))
    }

    /// The slack of the written pages in `mask` (see `slack_pages`), recomputed.
    fn slack_of(&self, mask: u64) -> u64 {
        let mut slack = 0;
        let mut left = mask & self.written_pages;
        while left != 0 {
            let page_idx = left.trailing_zeros() as usize;
            left &= left - 1;
            if self.page_is_slack(page_idx) {
                slack |= 1 << page_idx;
            }
        }
        slack
    }

    /// The record of slot `slot_idx` (see the layout doc).
    fn record(&self, slot_idx: usize) -> &AtomicU64 {
        assert!(slot_idx < slots_per_chunk(self.class_idx));
        // SAFETY: records are the first `records_bytes(class)` of the page-aligned extent
        // mapping (which maps at least them, see `Slabs::map_len`), so
        // this is in bounds and 8-byte aligned; the mapping lives as long as `self`.
        unsafe { &*(self.map.as_ptr().add(slot_idx * layout::RECORD_BYTES) as *const AtomicU64) }
    }

    fn is_used(&self, slot_idx: usize) -> bool {
        self.used_bitmap[slot_idx / BITS_PER_WORD] & (1 << (slot_idx % BITS_PER_WORD)) != 0
    }

    fn is_settled(&self, slot_idx: usize) -> bool {
        self.settled_bitmap[slot_idx / BITS_PER_WORD] & (1 << (slot_idx % BITS_PER_WORD)) != 0
    }

    /// Sets a slot's settled bit; the slot must be in use (a free slot is always settled).
    fn set_settled(&mut self, slot_idx: usize, settled: bool) {
        debug_assert!(self.is_used(slot_idx));
        let bit = 1 << (slot_idx % BITS_PER_WORD);
        let word = &mut self.settled_bitmap[slot_idx / BITS_PER_WORD];
        let was = *word & bit != 0;
        if settled {
            *word |= bit;
        } else {
            *word &= !bit;
        }
        match (was, settled) {
            (false, true) => self.unsettled_slots -= 1,
            (true, false) => self.unsettled_slots += 1,
            _ => {}
        }
    }

    /// Marks the lowest free slot used and returns it; `None` when full. Lowest-first keeps
    /// the touched (resident) part of a chunk a prefix of it.
    fn take_slot(&mut self) -> Option<usize> {
        let (word_idx, word) = self
            .used_bitmap
            .iter_mut()
            .enumerate()
            .find(|(_, w)| **w != u64::MAX)?;
        let bit = word.trailing_ones() as usize;
        *word |= 1 << bit;
        self.used_slots += 1;
        // A new blob: not offered for recompression yet.
        self.set_settled(word_idx * BITS_PER_WORD + bit, false);
        Some(word_idx * BITS_PER_WORD + bit)
    }

    fn is_full(&self) -> bool {
        self.used_slots as usize == slots_per_chunk(self.class_idx)
    }

    fn slot_range(&self, slot_idx: usize, len_bytes: usize) -> std::ops::Range<usize> {
        let start = layout::slot_off(self.class_idx, slot_idx);
        start..start + len_bytes
    }
}

/// All chunks of all classes.
pub(crate) struct Slabs {
    /// Indexed by `chunk_idx`; `None` for a released chunk whose index is on `free_chunk_idxs`.
    chunks: Vec<Option<Chunk>>,
    free_chunk_idxs: Vec<u32>,
    /// Per class and tier ([`plist`]): indices of its chunks that have at least one free slot.
    partial: Vec<Vec<u32>>,
    /// Memory chunks mapped.
    live_chunks: u64,
    /// Sum of the slot sizes of the memory slots in use.
    used_slot_bytes: u64,
    bitmap_words: u64,
    max_mapped_bytes: Option<u64>,
    /// The store file of a durable store; `None`: chunks are anonymous mappings.
    file: Option<StoreFile>,
    /// The disk tier's file; `None`: no disk tier.
    disk: Option<DiskFile>,
    /// Disk chunks, and the slot bytes of their slots in use (reserved included).
    disk_chunks: u64,
    disk_used_slot_bytes: u64,
    /// Bytes of the store file mapped for the records of disk chunks.
    disk_records_bytes: u64,
    max_disk_bytes: Option<u64>,
    /// Disk slots freed so far: a reader that read a disk payload without the lock and finds
    /// this unchanged knows no disk slot was reused meanwhile.
    disk_frees: u64,
    /// Memory slots being demoted (see [`Slabs::pin`]).
    pinned: HashSet<SlotLoc>,
    /// Where [`Slabs::unsettled`] resumes (a chunk index).
    settle_cursor: u32,
    /// Memory slots whose blob was handed out for recompression and not freed since (see
    /// [`Slabs::offer`]): a separate set from `pinned`, so neither user can mistake the
    /// other's mark for its own.
    offered: HashSet<SlotLoc>,
    /// Pages of memory chunks that hold nothing live and were not given back yet (the sum of
    /// the chunks' `slack_pages`).
    slack_pages: u64,
    /// Bytes [`Slabs::punch_slack`] gave back over the store's life.
    punched_bytes: u64,
}

/// Index of the partial list of class `class_idx` in memory or on disk.
fn plist(class_idx: u8, on_disk: bool) -> usize {
    usize::from(class_idx) + if on_disk { NUM_CLASSES } else { 0 }
}

/// Where a blob is, as the slabs see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SlotLoc {
    pub class_idx: u8,
    pub chunk_idx: u32,
    pub slot_idx: u32,
}

impl Slabs {
    pub fn new(max_mapped_bytes: Option<u64>) -> Slabs {
        Slabs {
            file: None,
            chunks: Vec::new(),
            free_chunk_idxs: Vec::new(),
            partial: (0..2 * NUM_CLASSES).map(|_| Vec::new()).collect(),
            live_chunks: 0,
            used_slot_bytes: 0,
            bitmap_words: 0,
            max_mapped_bytes,
            disk: None,
            disk_chunks: 0,
            disk_used_slot_bytes: 0,
            disk_records_bytes: 0,
            max_disk_bytes: None,
            disk_frees: 0,
            pinned: HashSet::new(),
            settle_cursor: 0,
            offered: HashSet::new(),
            slack_pages: 0,
            punched_bytes: 0,
        }
    }

    /// Slabs over an existing store file, handed over by a program whose monitor died: the
    /// file must be a memfd sealed against shrinking (so mapping it cannot SIGBUS) in this
    /// build's layout. Every chunk with a class is mapped (a disk chunk's records only), and a
    /// slot is in use when its record names an owner. A store with disk chunks needs `disk`,
    /// the disk file the program handed over too (and the bound on its chunks); with it the
    /// adopted store keeps its disk tier. Returns the slabs and every used slot with its
    /// record.
    pub fn adopt(
        file: std::fs::File,
        max_mapped_bytes: Option<u64>,
        disk: Option<(DiskFile, Option<u64>)>,
    ) -> Result<(Slabs, Vec<(SlotLoc, u64)>), String> {
        // SAFETY: fcntl(F_GET_SEALS) on a descriptor we hold.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err("the store file is not a memfd sealed against shrinking".into());
        }
        let len_bytes = file.metadata().map_err(|e| e.to_string())?.len();
        if len_bytes < layout::EXTENTS_OFF as u64 {
            return Err(format!("the store file has only {len_bytes} bytes"));
        }
        // SAFETY: a shared mapping of the sealed memfd within its length; it cannot shrink.
        let head = unsafe { MmapOptions::new().len(layout::EXTENTS_OFF).map_mut(&file) }
            .map_err(|e| e.to_string())?;
        // SAFETY: the mapping above, EXTENTS_OFF bytes, alive while `view` is used; payloads
        // are not read through the view.
        let view = unsafe { layout::StoreView::new(head.as_ptr() as *mut u8, layout::EXTENTS_OFF) }
            .map_err(|e| e.to_string())?;
        let capacity =
            ((len_bytes as usize - layout::EXTENTS_OFF) / EXTENT_BYTES).min(layout::MAX_CHUNKS);
        let mut slabs = Slabs::new(max_mapped_bytes);
        slabs.file = Some(StoreFile {
            file,
            len_bytes,
            head,
        });
        if let Some((d, max_disk_bytes)) = disk {
            slabs.set_disk(d, max_disk_bytes);
        }
        let mut used = Vec::new();
        for chunk_idx in 0..capacity {
            let (class_idx, on_disk) = match view.chunk_kind(chunk_idx) {
                None => continue,
                Some(layout::ChunkKind::Memory(c)) => (c, false),
                Some(layout::ChunkKind::Disk(_)) if slabs.disk.is_none() => {
                    // Its payloads are in a disk file the program has not handed over; the
                    // guardian brings those pages home itself instead.
                    return Err(
                        "the store has pages in a disk tier but its disk file was not handed over"
                            .into(),
                    );
                }
                Some(layout::ChunkKind::Disk(c)) => (c, true),
            };
            let map = slabs
                .file
                .as_mut()
                .expect("set above")
                .map_extent(chunk_idx as u32, Slabs::map_len(class_idx, on_disk))
                .map_err(|e| e.to_string())?;
            let mut chunk = Chunk::new(class_idx, map, on_disk);
            for slot_idx in 0..slots_per_chunk(class_idx) {
                let rec = chunk.record(slot_idx).load(Ordering::Acquire);
                if rec == 0 || layout::record_owners(rec) == 0 {
                    continue;
                }
                chunk.used_bitmap[slot_idx / BITS_PER_WORD] |= 1 << (slot_idx % BITS_PER_WORD);
                chunk.set_settled(slot_idx, false);
                chunk.used_slots += 1;
                slabs.count_slot_taken(class_idx, on_disk);
                used.push((
                    SlotLoc {
                        class_idx,
                        chunk_idx: chunk_idx as u32,
                        slot_idx: slot_idx as u32,
                    },
                    rec,
                ));
            }
            while slabs.chunks.len() < chunk_idx {
                slabs.free_chunk_idxs.push(slabs.chunks.len() as u32);
                slabs.chunks.push(None);
            }
            slabs.bitmap_words += chunk.used_bitmap.len() as u64;
            if !on_disk {
                // Which pages the dead monitor wrote is unknown: all of them, as far as we
                // know; the free ones among them are slack at once.
                chunk.written_pages = page_mask(0, PAGES_PER_CHUNK - 1);
                chunk.slack_pages = chunk.slack_of(u64::MAX);
                slabs.slack_pages += u64::from(chunk.slack_pages.count_ones());
            }
            if !chunk.is_full() {
                let list = plist(class_idx, on_disk);
                chunk.partial_pos = slabs.partial[list].len() as u32;
                slabs.partial[list].push(chunk_idx as u32);
            }
            slabs.chunks.push(Some(chunk));
            slabs.count_chunk_added(class_idx, on_disk);
        }
        // Chunks the dead monitor left empty are given back now.
        let empty: Vec<u32> = slabs
            .chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| c.as_ref().is_some_and(|c| c.used_slots == 0))
            .map(|(i, _)| i as u32)
            .collect();
        for chunk_idx in empty {
            slabs.release_chunk(chunk_idx);
        }
        Ok((slabs, used))
    }

    /// Every slot in use, with its record.
    pub fn used_slots(&self) -> Vec<(SlotLoc, u64)> {
        let mut v = Vec::new();
        for (chunk_idx, chunk) in self.chunks.iter().enumerate() {
            let Some(chunk) = chunk else { continue };
            for slot_idx in 0..slots_per_chunk(chunk.class_idx) {
                if chunk.is_used(slot_idx) {
                    v.push((
                        SlotLoc {
                            class_idx: chunk.class_idx,
                            chunk_idx: chunk_idx as u32,
                            slot_idx: slot_idx as u32,
                        },
                        chunk.record(slot_idx).load(Ordering::Acquire),
                    ));
                }
            }
        }
        v
    }

    /// Slabs in a new store file (a memfd), for a store that must outlive the monitor.
    pub fn new_durable(max_mapped_bytes: Option<u64>) -> Result<Slabs, StoreError> {
        let mut slabs = Slabs::new(max_mapped_bytes);
        slabs.file = Some(StoreFile::create()?);
        Ok(slabs)
    }

    /// The store file, if durable.
    pub fn file(&self) -> Option<&std::fs::File> {
        self.file.as_ref().map(|f| &f.file)
    }

    /// Gives a durable store a disk tier in `disk`, of at most `max_disk_bytes` of disk chunks.
    pub fn set_disk(&mut self, disk: DiskFile, max_disk_bytes: Option<u64>) {
        assert!(self.file.is_some(), "a disk tier needs a durable store");
        self.disk = Some(disk);
        self.max_disk_bytes = max_disk_bytes;
    }

    /// The disk tier's file, if there is one.
    pub fn disk(&self) -> Option<&DiskFile> {
        self.disk.as_ref()
    }

    /// Disk slots freed so far (see `disk_frees`).
    pub fn disk_frees(&self) -> u64 {
        self.disk_frees
    }

    /// Takes a slot of `class_idx`, copies `data` (1 byte up to the slot size) to its start,
    /// then writes its record naming the page at `addr` (layout write order, step 2).
    /// Maps a new chunk when the class has no free slot; that fails with
    /// [`StoreError::Full`] when it would pass the quota, leaving everything unchanged.
    pub fn store(
        &mut self,
        class_idx: u8,
        data: &[u8],
        addr: u64,
        owners: u16,
    ) -> Result<SlotLoc, StoreError> {
        assert!(
            usize::from(class_idx) < NUM_CLASSES,
            "class_idx {class_idx}"
        );
        assert!(
            data.len() <= slot_bytes(class_idx),
            "blob larger than its slot"
        );
        let loc = self.take(class_idx, false)?;
        let chunk = self.chunks[loc.chunk_idx as usize]
            .as_mut()
            .expect("just taken");
        let slot_idx = loc.slot_idx as usize;
        let range = chunk.slot_range(slot_idx, data.len());
        chunk.map[range].copy_from_slice(data);
        chunk
            .record(slot_idx)
            .store(layout::record(addr, data.len(), owners), Ordering::Release);
        Ok(loc)
    }

    /// Reserves a slot of `class_idx` in a disk chunk (a new one when the class has no free
    /// disk slot; that fails with [`StoreError::Full`] past `max_disk_bytes`, or when the
    /// store has no disk tier). Its record stays 0 until [`Slabs::publish`]: a reader ignores
    /// it, and its disk range is the caller's to write meanwhile (layout write order, step 6).
    pub fn reserve_disk(&mut self, class_idx: u8) -> Result<SlotLoc, StoreError> {
        if self.disk.is_none() {
            return Err(StoreError::Full);
        }
        self.take(class_idx, true)
    }

    /// Sets the record of a reserved disk slot, whose payload is written (step 6).
    pub fn publish(&mut self, loc: SlotLoc, rec: u64) -> Result<(), &'static str> {
        let chunk = self.chunk_of(loc)?;
        if !chunk.on_disk {
            return Err("not a disk slot");
        }
        chunk
            .record(loc.slot_idx as usize)
            .store(rec, Ordering::Release);
        Ok(())
    }

    /// Takes the lowest free slot of a chunk of `class_idx` in the tier, mapping a new chunk
    /// when none has one. Its record is left as it is (0).
    fn take(&mut self, class_idx: u8, on_disk: bool) -> Result<SlotLoc, StoreError> {
        let list = plist(class_idx, on_disk);
        let chunk_idx = match self.partial[list].last() {
            Some(&idx) => idx,
            None => self.add_chunk(class_idx, on_disk)?,
        };
        let chunk = self.chunks[chunk_idx as usize]
            .as_mut()
            .expect("partial lists name live chunks only");
        let slot_idx = chunk
            .take_slot()
            .expect("a chunk on a partial list has a free slot");
        if !on_disk {
            let pages = chunk.slot_pages(slot_idx);
            chunk.written_pages |= pages;
            let reused = chunk.slack_pages & pages;
            chunk.slack_pages &= !pages;
            self.slack_pages -= u64::from(reused.count_ones());
        }
        if chunk.is_full() {
            let popped = self.partial[list].pop();
            debug_assert_eq!(popped, Some(chunk_idx));
            chunk.partial_pos = NOT_PARTIAL;
        }
        self.count_slot_taken(class_idx, on_disk);
        Ok(SlotLoc {
            class_idx,
            chunk_idx,
            // < slots_per_chunk <= MAX_SLOT_IDX + 1 (asserted at compile time).
            slot_idx: slot_idx as u32,
        })
    }

    /// Bytes of a chunk's extent that are mapped: a disk chunk maps its records only (the
    /// pages that hold them).
    fn map_len(class_idx: u8, on_disk: bool) -> usize {
        if on_disk {
            layout::records_bytes(class_idx).next_multiple_of(PAGE_SIZE)
        } else {
            EXTENT_BYTES
        }
    }

    /// Counts a slot of `class_idx` taken in the tier.
    fn count_slot_taken(&mut self, class_idx: u8, on_disk: bool) {
        if on_disk {
            self.disk_used_slot_bytes += slot_bytes(class_idx) as u64;
        } else {
            self.used_slot_bytes += slot_bytes(class_idx) as u64;
        }
    }

    /// Counts a chunk of `class_idx` added to the tier (here and in the process-wide totals).
    fn count_chunk_added(&mut self, class_idx: u8, on_disk: bool) {
        if on_disk {
            self.disk_chunks += 1;
            self.disk_records_bytes += Self::map_len(class_idx, true) as u64;
            ALL_DISK_BYTES.fetch_add(CHUNK_BYTES as u64, Ordering::Relaxed);
        } else {
            self.live_chunks += 1;
            ALL_MAPPED_BYTES.fetch_add(CHUNK_BYTES as u64, Ordering::Relaxed);
        }
    }

    /// Maps a chunk for `class_idx` in the tier and puts it on its partial list.
    fn add_chunk(&mut self, class_idx: u8, on_disk: bool) -> Result<u32, StoreError> {
        let (count, max) = if on_disk {
            (self.disk_chunks, self.max_disk_bytes)
        } else {
            (self.live_chunks, self.max_mapped_bytes)
        };
        if max.is_some_and(|max| (count + 1) * CHUNK_BYTES as u64 > max) {
            return Err(StoreError::Full);
        }
        let max_chunks = if self.file.is_some() {
            layout::MAX_CHUNKS
        } else {
            MAX_CHUNK_IDX as usize + 1
        };
        let chunk_idx = match self.free_chunk_idxs.last() {
            Some(&idx) => idx,
            None if self.chunks.len() < max_chunks => self.chunks.len() as u32,
            None => return Err(StoreError::Full),
        };
        let map_len = Self::map_len(class_idx, on_disk);
        let map = match &mut self.file {
            Some(f) => f.map_extent(chunk_idx, map_len)?,
            None => MmapMut::map_anon(map_len).map_err(StoreError::Map)?,
        };
        if let Some(f) = &self.file {
            f.class_byte(chunk_idx)
                .store(layout::class_byte(class_idx, on_disk), Ordering::Release);
        }
        let mut chunk = Chunk::new(class_idx, map, on_disk);
        let partial = &mut self.partial[plist(class_idx, on_disk)];
        chunk.partial_pos = partial.len() as u32;
        partial.push(chunk_idx);
        self.bitmap_words += chunk.used_bitmap.len() as u64;
        if self.free_chunk_idxs.pop().is_none() {
            self.chunks.push(None);
        }
        self.chunks[chunk_idx as usize] = Some(chunk);
        self.count_chunk_added(class_idx, on_disk);
        Ok(chunk_idx)
    }

    /// The live chunk holding `loc`, or why there is none.
    fn chunk_of(&self, loc: SlotLoc) -> Result<&Chunk, &'static str> {
        if usize::from(loc.class_idx) >= NUM_CLASSES {
            return Err("no such size class");
        }
        let chunk = self
            .chunks
            .get(loc.chunk_idx as usize)
            .and_then(Option::as_ref)
            .ok_or("chunk not mapped")?;
        if chunk.class_idx != loc.class_idx {
            return Err("chunk belongs to another size class");
        }
        if loc.slot_idx as usize >= slots_per_chunk(loc.class_idx) {
            return Err("slot index past the end of the chunk");
        }
        if !chunk.is_used(loc.slot_idx as usize) {
            return Err("slot is free");
        }
        Ok(chunk)
    }

    /// Whether a slot in use is in a disk chunk.
    pub fn is_on_disk(&self, loc: SlotLoc) -> Result<bool, &'static str> {
        Ok(self.chunk_of(loc)?.on_disk)
    }

    /// Offset of a disk slot's payload in the disk file.
    pub fn disk_off(loc: SlotLoc) -> u64 {
        layout::disk_slot_off(loc.chunk_idx as usize, loc.class_idx, loc.slot_idx as usize)
    }

    /// The record of a slot in use.
    pub fn record(&self, loc: SlotLoc) -> Result<u64, &'static str> {
        Ok(self
            .chunk_of(loc)?
            .record(loc.slot_idx as usize)
            .load(Ordering::Acquire))
    }

    /// Pins a memory slot in use for a demotion: [`Slabs::free`] of it unpins it.
    pub fn pin(&mut self, loc: SlotLoc) {
        self.pinned.insert(loc);
    }

    /// Whether a slot is pinned (a demotion of it is under way).
    pub fn is_pinned(&self, loc: SlotLoc) -> bool {
        self.pinned.contains(&loc)
    }

    /// Unpins a slot; whether it was still pinned (not freed since [`Slabs::pin`]).
    pub fn unpin(&mut self, loc: SlotLoc) -> bool {
        self.pinned.remove(&loc)
    }

    /// The first `len_bytes` of a memory slot in use (a disk slot's payload is in the disk
    /// file: an error here).
    pub fn read(&self, loc: SlotLoc, len_bytes: usize) -> Result<&[u8], &'static str> {
        let chunk = self.chunk_of(loc)?;
        if chunk.on_disk {
            return Err("slot is on disk");
        }
        if len_bytes > slot_bytes(loc.class_idx) {
            return Err("length larger than the slot");
        }
        Ok(&chunk.map[chunk.slot_range(loc.slot_idx as usize, len_bytes)])
    }

    /// Rewrites a used slot's record for a page that moved to `addr` (layout write order,
    /// step 3).
    pub fn set_addr(&mut self, loc: SlotLoc, addr: u64) -> Result<(), &'static str> {
        let chunk = self.chunk_of(loc)?;
        let rec = chunk.record(loc.slot_idx as usize);
        let old = rec.load(Ordering::Relaxed);
        let (_, len_bytes) = layout::record_parts(old);
        rec.store(
            layout::record(addr, len_bytes, layout::record_owners(old)),
            Ordering::Release,
        );
        Ok(())
    }

    /// The owner set in a used slot's record.
    pub fn owners(&self, loc: SlotLoc) -> Result<u16, &'static str> {
        let chunk = self.chunk_of(loc)?;
        Ok(layout::record_owners(
            chunk.record(loc.slot_idx as usize).load(Ordering::Relaxed),
        ))
    }

    /// Rewrites the owner set of a used slot's record; `owners` must not be empty (free the
    /// slot instead).
    pub fn set_owners(&mut self, loc: SlotLoc, owners: u16) -> Result<(), &'static str> {
        assert!(owners != 0, "a used slot has an owner");
        let chunk = self.chunk_of(loc)?;
        let rec = chunk.record(loc.slot_idx as usize);
        let old = rec.load(Ordering::Relaxed);
        rec.store(layout::with_owners(old, owners), Ordering::Release);
        Ok(())
    }

    /// Frees a slot (memory or disk, reserved or published); unmaps its chunk if that was the
    /// chunk's last slot in use. On error (the slot was not in use) nothing changes.
    pub fn free(&mut self, loc: SlotLoc) -> Result<(), &'static str> {
        self.chunk_of(loc)?;
        if !self.pinned.is_empty() {
            self.pinned.remove(&loc);
        }
        if !self.offered.is_empty() {
            self.offered.remove(&loc);
        }
        let chunk = self.chunks[loc.chunk_idx as usize]
            .as_mut()
            .expect("checked by chunk_of");
        let list = plist(loc.class_idx, chunk.on_disk);
        let slot_idx = loc.slot_idx as usize;
        let published = chunk.record(slot_idx).swap(0, Ordering::AcqRel) != 0;
        let was_full = chunk.is_full();
        chunk.set_settled(slot_idx, true);
        chunk.used_bitmap[slot_idx / BITS_PER_WORD] &= !(1 << (slot_idx % BITS_PER_WORD));
        chunk.used_slots -= 1;
        if !chunk.on_disk && chunk.used_slots > 0 {
            let freed = chunk.slack_of(chunk.slot_pages(slot_idx)) & !chunk.slack_pages;
            chunk.slack_pages |= freed;
            self.slack_pages += u64::from(freed.count_ones());
        }
        if chunk.on_disk {
            self.disk_used_slot_bytes -= slot_bytes(loc.class_idx) as u64;
            // A reserved slot (no record yet) was never named by a handle: no reader can
            // hold its payload.
            self.disk_frees += u64::from(published);
        } else {
            self.used_slot_bytes -= slot_bytes(loc.class_idx) as u64;
        }
        if was_full {
            chunk.partial_pos = self.partial[list].len() as u32;
            self.partial[list].push(loc.chunk_idx);
        }
        if chunk.used_slots == 0 {
            self.release_chunk(loc.chunk_idx);
        }
        Ok(())
    }

    /// Unmaps an empty chunk and frees its index (a disk chunk's range of the disk file is
    /// punched too).
    fn release_chunk(&mut self, chunk_idx: u32) {
        let listed = self.chunks[chunk_idx as usize]
            .as_ref()
            .expect("releasing a live chunk")
            .partial_pos
            != NOT_PARTIAL;
        // (A chunk being compacted was taken off its list already; see `compact_class`.)
        if listed {
            self.unlist(chunk_idx);
        }
        let chunk = self.chunks[chunk_idx as usize]
            .take()
            .expect("releasing a live chunk");
        debug_assert_eq!(chunk.used_slots, 0);
        self.slack_pages -= u64::from(chunk.slack_pages.count_ones());
        self.bitmap_words -= chunk.used_bitmap.len() as u64;
        if chunk.on_disk {
            self.disk_chunks -= 1;
            self.disk_records_bytes -= chunk.map.len() as u64;
            ALL_DISK_BYTES.fetch_sub(CHUNK_BYTES as u64, Ordering::Relaxed);
        } else {
            self.live_chunks -= 1;
            ALL_MAPPED_BYTES.fetch_sub(CHUNK_BYTES as u64, Ordering::Relaxed);
        }
        self.free_chunk_idxs.push(chunk_idx);
        let on_disk = chunk.on_disk;
        // Dropping the MmapMut unmaps it.
        drop(chunk);
        if let Some(f) = &self.file {
            f.class_byte(chunk_idx).store(0, Ordering::Release);
            f.punch(chunk_idx);
        }
        if on_disk {
            if let Some(d) = &self.disk {
                d.punch(
                    layout::disk_slot_off(chunk_idx as usize, 0, 0),
                    CHUNK_BYTES as u64,
                );
            }
        }
    }

    /// Takes a partial chunk off its list (it gets no new slot until [`Slabs::relist`]).
    fn unlist(&mut self, chunk_idx: u32) {
        let chunk = self.chunks[chunk_idx as usize]
            .as_mut()
            .expect("unlisting a live chunk");
        let pos = chunk.partial_pos as usize;
        chunk.partial_pos = NOT_PARTIAL;
        let partial = &mut self.partial[plist(chunk.class_idx, chunk.on_disk)];
        debug_assert_eq!(
            partial.get(pos),
            Some(&chunk_idx),
            "unlisting a partial chunk"
        );
        partial.swap_remove(pos);
        if let Some(&moved_idx) = partial.get(pos) {
            self.chunks[moved_idx as usize]
                .as_mut()
                .expect("partial lists name live chunks only")
                .partial_pos = pos as u32;
        }
    }

    /// Puts a chunk taken off its list back on it, if it is still mapped and not full.
    fn relist(&mut self, chunk_idx: u32) {
        let Some(chunk) = self.chunks[chunk_idx as usize].as_mut() else {
            return;
        };
        if chunk.is_full() || chunk.partial_pos != NOT_PARTIAL {
            return;
        }
        let list = plist(chunk.class_idx, chunk.on_disk);
        chunk.partial_pos = self.partial[list].len() as u32;
        self.partial[list].push(chunk_idx);
    }

    /// Recompression candidates (see `Store::recompress_candidates`): up to `max` memory slots
    /// of the lz4 classes whose blob was not offered yet, as (slot, record), scanning the
    /// chunks round-robin from where the last call stopped, at most once round. Every slot it
    /// looks at is marked settled, whether `pick(slot, record)` takes it or not (pinned slots,
    /// being demoted, are not looked at), so a blob is offered once in its life in a slot;
    /// a blob placed in a slot later (a new page, or compaction's move of an unsettled one)
    /// is offered again.
    pub fn unsettled(
        &mut self,
        max: usize,
        pick: &mut dyn FnMut(SlotLoc, u64) -> bool,
    ) -> Vec<(SlotLoc, u64)> {
        let mut out = Vec::new();
        let n = self.chunks.len();
        for step in 0..n {
            if out.len() >= max {
                break;
            }
            let chunk_idx = (self.settle_cursor as usize + step) % n;
            let Some(chunk) = self.chunks[chunk_idx].as_mut() else {
                continue;
            };
            if chunk.on_disk || chunk.class_idx == RAW_CLASS_IDX || chunk.unsettled_slots == 0 {
                continue;
            }
            let class_idx = chunk.class_idx;
            for word_idx in 0..chunk.used_bitmap.len() {
                let mut todo = chunk.used_bitmap[word_idx] & !chunk.settled_bitmap[word_idx];
                while todo != 0 && out.len() < max {
                    let bit = todo.trailing_zeros() as usize;
                    todo &= todo - 1;
                    let slot_idx = word_idx * BITS_PER_WORD + bit;
                    let loc = SlotLoc {
                        class_idx,
                        chunk_idx: chunk_idx as u32,
                        slot_idx: slot_idx as u32,
                    };
                    if !self.pinned.is_empty() && self.pinned.contains(&loc) {
                        continue;
                    }
                    chunk.set_settled(slot_idx, true);
                    let rec = chunk.record(slot_idx).load(Ordering::Acquire);
                    if rec != 0 && pick(loc, rec) {
                        out.push((loc, rec));
                    }
                }
            }
            if out.len() >= max {
                // Resume in this chunk: it may have more.
                self.settle_cursor = chunk_idx as u32;
                return out;
            }
        }
        self.settle_cursor = 0;
        out
    }

    /// Marks a slot in use as handed out for recompression: until it is freed, or
    /// [`Slabs::take_offer`], the slot's blob is the one that was read (a slot's payload never
    /// changes while it is in use), and compaction leaves it where it is.
    pub fn offer(&mut self, loc: SlotLoc) {
        self.offered.insert(loc);
    }

    /// Ends an offer; whether the slot was still offered (never freed since [`Slabs::offer`]).
    pub fn take_offer(&mut self, loc: SlotLoc) -> bool {
        self.offered.remove(&loc)
    }

    /// Marks a memory slot's blob settled (see [`Slabs::unsettled`]): a recompressed blob is
    /// not offered again.
    pub fn settle(&mut self, loc: SlotLoc) {
        if let Some(Some(chunk)) = self.chunks.get_mut(loc.chunk_idx as usize) {
            if (loc.slot_idx as usize) < slots_per_chunk(chunk.class_idx) {
                chunk.set_settled(loc.slot_idx as usize, true);
            }
        }
    }

    /// Per size class, the memory chunks mapped and their slots in use.
    pub fn class_usage(&self) -> [(u32, u64); NUM_CLASSES] {
        let mut usage = [(0u32, 0u64); NUM_CLASSES];
        for chunk in self.chunks.iter().flatten().filter(|c| !c.on_disk) {
            let u = &mut usage[usize::from(chunk.class_idx)];
            u.0 += 1;
            u.1 += u64::from(chunk.used_slots);
        }
        usage
    }

    /// Compaction of one size class's memory chunks (layout write order, step 7): the slots
    /// in use of the sparsest chunks, as many chunks as the class's free slots elsewhere could
    /// absorb (at most `max_chunks`), are moved into the free slots of its other chunks, so
    /// the emptied chunks are given back. A slot moves only if it is not pinned and
    /// `movable(old, record)` says so; each move copies the payload, publishes the same
    /// record in the new slot, and only then frees the old slot (zeroing its record), so a
    /// reader always finds at least one complete copy. No chunk is mapped for it. Stops after
    /// `max_moves` moves. Returns the moves as (old, new, record) and the chunks given back.
    ///
    /// `published(len_bytes)` is called after each new record is published and before the old
    /// slot is freed (the kill tests' death point).
    pub fn compact_class(
        &mut self,
        class_idx: u8,
        max_chunks: usize,
        max_moves: usize,
        movable: &mut dyn FnMut(SlotLoc, u64) -> bool,
        published: &mut dyn FnMut(usize),
    ) -> (Vec<(SlotLoc, SlotLoc, u64)>, u64) {
        let list = plist(class_idx, false);
        let per_chunk = slots_per_chunk(class_idx) as u64;
        let (chunks, used) = self.class_usage()[usize::from(class_idx)];
        let freeable = (u64::from(chunks) - used.div_ceil(per_chunk)) as usize;
        let mut sources: Vec<(u32, u32)> = self.partial[list]
            .iter()
            .map(|&i| {
                let c = self.chunks[i as usize]
                    .as_ref()
                    .expect("listed chunks live");
                (c.used_slots, i)
            })
            .collect();
        sources.sort_unstable();
        sources.truncate(freeable.min(max_chunks));
        let mut moves = Vec::new();
        if sources.is_empty() {
            return (moves, 0);
        }
        for &(_, chunk_idx) in &sources {
            self.unlist(chunk_idx);
        }
        let live_before = self.live_chunks;
        let mut buf = [0u8; PAGE_SIZE];
        'chunks: for &(_, chunk_idx) in &sources {
            for slot_idx in 0..per_chunk as usize {
                if moves.len() >= max_moves || self.partial[list].is_empty() {
                    break 'chunks;
                }
                let Some(chunk) = self.chunks[chunk_idx as usize].as_ref() else {
                    break;
                };
                if !chunk.is_used(slot_idx) {
                    continue;
                }
                let old = SlotLoc {
                    class_idx,
                    chunk_idx,
                    slot_idx: slot_idx as u32,
                };
                let rec = chunk.record(slot_idx).load(Ordering::Acquire);
                if rec == 0
                    || self.pinned.contains(&old)
                    || self.offered.contains(&old)
                    || !movable(old, rec)
                {
                    continue;
                }
                let (_, len_bytes) = layout::record_parts(rec);
                let range = chunk.slot_range(slot_idx, len_bytes);
                buf[..len_bytes].copy_from_slice(&chunk.map[range]);
                // A moved blob keeps its recompression state.
                let settled = chunk.is_settled(slot_idx);
                let new = self
                    .take(class_idx, false)
                    .expect("a listed chunk has a free slot");
                let dst = self.chunks[new.chunk_idx as usize]
                    .as_mut()
                    .expect("just taken");
                let range = dst.slot_range(new.slot_idx as usize, len_bytes);
                dst.map[range].copy_from_slice(&buf[..len_bytes]);
                dst.set_settled(new.slot_idx as usize, settled);
                dst.record(new.slot_idx as usize)
                    .store(rec, Ordering::Release);
                published(len_bytes);
                self.free(old).expect("a used slot");
                moves.push((old, new, rec));
            }
        }
        let freed = live_before - self.live_chunks;
        for &(_, chunk_idx) in &sources {
            self.relist(chunk_idx);
        }
        (moves, freed)
    }

    /// Gives back the memory of slack pages (see `Chunk::slack_pages`): each run of them in a
    /// chunk is punched out of the store file (or, for an anonymous store, discarded with
    /// MADV_DONTNEED), at most `max_runs` runs per call; in the chunk each class fills next,
    /// its lowest [`KEEP_NEXT_SLACK_PAGES`] slack pages are left (they are taken again first).
    /// Returns the pages given back. The
    /// caller holds whatever excludes every other use of the slabs (the store's lock), so no
    /// slot on such a page is taken meanwhile; a page punched and then taken again is
    /// allocated anew (zeroed) by the write that fills the slot.
    pub fn punch_slack(&mut self, max_runs: usize) -> u64 {
        let mut runs = 0;
        let mut pages = 0u64;
        let mut failed = false;
        for chunk_idx in 0..self.chunks.len() {
            if runs >= max_runs || self.slack_pages == 0 {
                break;
            }
            let Some(chunk) = self.chunks[chunk_idx].as_mut() else {
                continue;
            };
            if chunk.slack_pages == 0 {
                continue;
            }
            // The chunk its class takes its next slots from (lowest first) refills its lowest
            // holes first: punching those would only have them allocated again.
            let mut eligible = chunk.slack_pages;
            if self.partial[plist(chunk.class_idx, false)].last() == Some(&(chunk_idx as u32)) {
                for _ in 0..KEEP_NEXT_SLACK_PAGES {
                    eligible &= eligible.wrapping_sub(1);
                }
            }
            while eligible != 0 && runs < max_runs {
                let first = eligible.trailing_zeros() as usize;
                let len = (eligible >> first).trailing_ones() as usize;
                let mask = page_mask(first, first + len - 1);
                let (off, len_bytes) = (first * PAGE_SIZE, len * PAGE_SIZE);
                let res = match &self.file {
                    Some(f) => f.punch_range(chunk_idx as u32, off, len_bytes),
                    // SAFETY: the range lies in this chunk's mapping and holds no slot in use
                    // and no record (slack), so no reference into it is live; its pages read
                    // as zeros afterwards, which nothing reads before a slot there is written.
                    None => unsafe {
                        chunk.map.unchecked_advise_range(
                            memmap2::UncheckedAdvice::DontNeed,
                            off,
                            len_bytes,
                        )
                    },
                };
                runs += 1;
                eligible &= !mask;
                chunk.slack_pages &= !mask;
                self.slack_pages -= len as u64;
                match res {
                    Ok(()) => {
                        chunk.written_pages &= !mask;
                        pages += len as u64;
                    }
                    // The pages stay written (and charged); they are not tried again until
                    // a slot on them is used and freed.
                    Err(e) if !failed => {
                        failed = true;
                        tracing::warn!(
                            chunk_idx,
                            error = %e,
                            "store: giving back free pages of a chunk failed (memory stays charged)"
                        );
                    }
                    Err(_) => {}
                }
            }
        }
        self.punched_bytes += pages * PAGE_SIZE as u64;
        pages
    }

    /// Bytes of slack pages not given back yet (see [`Slabs::punch_slack`]).
    pub fn slack_bytes(&self) -> u64 {
        self.slack_pages * PAGE_SIZE as u64
    }

    /// Bytes [`Slabs::punch_slack`] gave back over the store's life.
    pub fn punched_bytes(&self) -> u64 {
        self.punched_bytes
    }

    /// Memory the store holds: for a durable store the store file's allocated pages (one
    /// fstat), else the chunks mapped.
    pub fn resident_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        match &self.file {
            Some(f) => f
                .file
                .metadata()
                .map_or(self.mapped_bytes(), |m| m.blocks() * 512),
            None => self.mapped_bytes(),
        }
    }

    /// Chunks currently mapped.
    pub fn live_chunks(&self) -> u64 {
        self.live_chunks
    }

    /// Bytes of all mapped memory chunks.
    pub fn mapped_bytes(&self) -> u64 {
        self.live_chunks * CHUNK_BYTES as u64
    }

    /// Sum of the slot sizes of the memory slots in use.
    pub fn used_slot_bytes(&self) -> u64 {
        self.used_slot_bytes
    }

    /// Disk chunks.
    pub fn disk_chunks(&self) -> u64 {
        self.disk_chunks
    }

    /// Bytes of the disk file's range the disk chunks cover.
    pub fn disk_mapped_bytes(&self) -> u64 {
        self.disk_chunks * CHUNK_BYTES as u64
    }

    /// Sum of the slot sizes of the disk slots in use (reserved ones included).
    pub fn disk_used_slot_bytes(&self) -> u64 {
        self.disk_used_slot_bytes
    }

    /// Bytes of bookkeeping: the chunk table, bitmaps, partial lists and free index list (and
    /// the records of disk chunks, which live in the store file's memory).
    pub fn metadata_bytes(&self) -> u64 {
        let table = self.chunks.capacity() * std::mem::size_of::<Option<Chunk>>()
            + self.disk_records_bytes as usize;
        let free = self.free_chunk_idxs.capacity() * std::mem::size_of::<u32>();
        let partial: usize = self.partial.iter().map(|p| p.capacity() * 4).sum::<usize>()
            + self.partial.capacity() * std::mem::size_of::<Vec<u32>>();
        // Two bitmaps per chunk of `bitmap_words` words in all: used and settled.
        (table + free + partial) as u64 + self.bitmap_words * 16
    }

    /// Checks the internal invariants; for tests.
    #[cfg(test)]
    pub fn check_invariants(&self) {
        let mut live = 0;
        let mut disk = 0;
        let mut used_bytes = 0;
        let mut disk_bytes = 0;
        let mut words = 0;
        let mut slack = 0;
        for (idx, chunk) in self.chunks.iter().enumerate() {
            let Some(chunk) = chunk else {
                assert!(self.free_chunk_idxs.contains(&(idx as u32)));
                continue;
            };
            words += chunk.used_bitmap.len() as u64;
            let slots = slots_per_chunk(chunk.class_idx);
            let counted = (0..slots).filter(|&s| chunk.is_used(s)).count();
            assert_eq!(counted, chunk.used_slots as usize, "chunk {idx} count");
            let unsettled = (0..slots)
                .filter(|&s| chunk.is_used(s) && !chunk.is_settled(s))
                .count();
            assert_eq!(unsettled, chunk.unsettled_slots as usize, "chunk {idx}");
            assert!(
                (slots..chunk.settled_bitmap.len() * BITS_PER_WORD).all(|s| chunk.is_settled(s)),
                "chunk {idx}: bits past the last slot are settled"
            );
            assert!(chunk.used_slots > 0, "empty chunk {idx} still mapped");
            if chunk.on_disk {
                assert_eq!(
                    chunk.slack_pages, 0,
                    "chunk {idx}: a disk chunk has no slack"
                );
            } else {
                assert_eq!(chunk.slack_pages & !chunk.written_pages, 0, "chunk {idx}");
                assert_eq!(
                    chunk.slack_pages,
                    chunk.slack_of(u64::MAX),
                    "chunk {idx}: slack is the written pages with nothing live"
                );
                slack += u64::from(chunk.slack_pages.count_ones());
            }
            let bytes = counted as u64 * slot_bytes(chunk.class_idx) as u64;
            if chunk.on_disk {
                disk += 1;
                disk_bytes += bytes;
            } else {
                live += 1;
                used_bytes += bytes;
            }
            for &loc in &self.pinned {
                if loc.chunk_idx == idx as u32 {
                    assert!(!chunk.on_disk, "a pinned slot is a memory slot");
                    assert!(
                        chunk.is_used(loc.slot_idx as usize),
                        "a pinned slot is in use"
                    );
                }
            }
            let partial = &self.partial[plist(chunk.class_idx, chunk.on_disk)];
            if chunk.is_full() {
                assert_eq!(chunk.partial_pos, NOT_PARTIAL);
                assert!(!partial.contains(&(idx as u32)));
            } else {
                assert_eq!(partial[chunk.partial_pos as usize], idx as u32);
            }
        }
        assert_eq!(live, self.live_chunks);
        assert_eq!(disk, self.disk_chunks);
        assert_eq!(used_bytes, self.used_slot_bytes);
        assert_eq!(disk_bytes, self.disk_used_slot_bytes);
        assert_eq!(words, self.bitmap_words);
        assert_eq!(slack, self.slack_pages);
        let partial_total: usize = self.partial.iter().map(Vec::len).sum();
        let partial_live = self
            .chunks
            .iter()
            .flatten()
            .filter(|c| !c.is_full())
            .count();
        assert_eq!(partial_total, partial_live);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LZ4_MAX_LEN_BYTES;

    #[test]
    fn lz4_class_for_len_rounds_up_to_32_bytes() {
        assert_eq!(lz4_class_for_len(0), None);
        assert_eq!(lz4_class_for_len(1), Some(0));
        assert_eq!(lz4_class_for_len(32), Some(0));
        assert_eq!(lz4_class_for_len(33), Some(1));
        assert_eq!(lz4_class_for_len(2049), Some(64));
        assert_eq!(
            lz4_class_for_len(LZ4_MAX_LEN_BYTES),
            Some(RAW_CLASS_IDX - 1)
        );
        assert_eq!(lz4_class_for_len(LZ4_MAX_LEN_BYTES + 1), None);
        for len in 1..=LZ4_MAX_LEN_BYTES {
            let c = lz4_class_for_len(len).unwrap();
            assert!(slot_bytes(c) >= len && slot_bytes(c) < len + CLASS_STEP_BYTES);
        }
    }

    #[test]
    fn chunk_tail_bits_never_allocated() {
        // 1088-byte class: 239 slots (with their records), so the last bitmap word is partly
        // tail.
        let class_idx = lz4_class_for_len(1088).unwrap();
        let mut chunk = Chunk::new(class_idx, MmapMut::map_anon(EXTENT_BYTES).unwrap(), false);
        let slots = slots_per_chunk(class_idx);
        assert_eq!(slots, 239);
        for want in 0..slots {
            assert_eq!(chunk.take_slot(), Some(want));
        }
        assert!(chunk.is_full());
        assert_eq!(chunk.take_slot(), None);
    }

    #[test]
    fn free_last_slot_unmaps_chunk_and_reuses_index() {
        let mut s = Slabs::new(None);
        let a = s.store(RAW_CLASS_IDX, &[1; PAGE_SIZE], 0x1000, 1).unwrap();
        let b = s.store(0, &[2; 10], 0x2000, 1).unwrap();
        assert_eq!(s.live_chunks(), 2);
        s.free(a).unwrap();
        assert_eq!(s.live_chunks(), 1);
        assert_eq!(s.free(a), Err("chunk not mapped"));
        s.check_invariants();
        let c = s
            .store(lz4_class_for_len(300).unwrap(), &[3; 300], 0x3000, 1)
            .unwrap();
        assert_eq!(c.chunk_idx, a.chunk_idx, "freed chunk index reused");
        assert_eq!(s.read(b, 10).unwrap(), &[2; 10]);
        s.check_invariants();
    }
}
