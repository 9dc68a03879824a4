//! The durable store layout: the one format both the monitor (writer) and the shim (reader,
//! after the monitor died) understand. Versioned; change [`STORE_VERSION`] with any change.
//!
//! The monitor keeps each client's compressed pages in one memfd and sends its descriptor to
//! the client's shim in `HelloAck`, so no evicted page lives only in the monitor: if the
//! monitor dies, the shim still holds the store and can bring every page home itself
//! ("rescue"), or a restarted monitor can adopt it.
//!
//! Layout (byte offsets; all integers little-endian, naturally aligned):
//!
//! | offset                                   | what                                          |
//! |------------------------------------------|-----------------------------------------------|
//! | 0 .. 4096                                | header, see `OFF_*` below                      |
//! | [`CLASS_TABLE_OFF`] + i (1 byte)         | chunk `i`'s kind and size class, see below     |
//! | [`EXTENTS_OFF`] + i × [`EXTENT_BYTES`]   | chunk `i`'s extent                             |
//!
//! An extent is [`CHUNK_BYTES`]: [`slots_per_chunk`]`(c)` 8-byte **records** (one per slot),
//! then the slots. Slot `s` of a chunk of class `c` starts at [`slot_off`]`(c, s)` =
//! [`records_bytes`]`(c) + s × slot_bytes(c)`: right after the records for an lz4 class, at the
//! chunk's second page for the raw class (raw slots are page-aligned). Records and slots share
//! the extent (version 5), so a chunk's records cost 8 bytes per slot, not a page. A record is
//! 0 when its slot holds nothing, else `owners << 48 | page_addr | (len_bytes - 1)`: the
//! program address of the page the slot holds (page-aligned, nonzero, below 2^48), the payload
//! length (1..=4096), and the set of programs the page belongs to (bit `m` = family member
//! `m`, see below; never empty).
//!
//! A class-table byte is 0 when chunk `i` does not exist, `c + 1` for a chunk of class `c` whose
//! slots are in the extent (a *memory chunk*), and [`DISK_CHUNK_FLAG`]` | (c + 1)` for a *disk
//! chunk* of class `c` (version 3): its extent holds only the records (the slot part is never
//! written, so it stays a hole of the memfd), and slot `s`'s payload is in the **disk file**
//! at [`disk_slot_off`]`(i, c, s)` = `i × CHUNK_BYTES + s × slot_bytes(c)`. The disk file (the
//! program's disk tier, DESIGN.md "Disk tier") is a plain file of payloads with no header,
//! created unlinked (`O_TMPFILE`) in the configured directory and sent to the shim next to the
//! store file; it is read with `pread`. A record of a disk chunk has the same format and the
//! same meaning as a memory chunk's.
//!
//! **Fork families (version 2).** A program forked from a managed program shares its parent's
//! store: at the fork every page the parent had evicted becomes a page of the child too (its
//! record gains the child's owner bit; nothing is copied), so each side later reads what was
//! there at the fork. A page faulted back into one member loses that member's bit; the slot is
//! freed when no bit is left. A shared page the program moves (`mremap`) is first copied to a
//! slot of its own. Each member's shim is told its member index and, on a rescue, brings home
//! only the records carrying its bit. A payload of the raw class ([`RAW_CLASS_IDX`]) is the
//! page itself; any other decompresses to exactly one page and is either one lz4 block or
//! (version 4) one zstd frame, which begins with the zstd magic number [`ZSTD_MAGIC`] (an lz4
//! block of a whole page never does: its first sequence would copy from 253 or more bytes
//! back, before the start of the page). See [`PageDecoder`]. Pages that are all zero bytes
//! have no record: once a range is unregistered from userfaultfd, a missing page reads as
//! zeros, which is their content.
//!
//! Order of writes (crash consistency: the monitor may die between any two):
//! 1. a new chunk: the file is grown (`ftruncate`) first, then its class byte is set;
//! 2. a page in: its payload is written to the slot, then its record (one aligned 8-byte
//!    store, release), and only after that does the monitor drop any other copy of the page;
//! 3. a page moved by the program (`mremap`): the record is rewritten with the new address;
//! 4. a page out (faulted back, or discarded by the program): the record is zeroed only
//!    after the page was copied into the program (or the program discarded it);
//! 5. an empty chunk: its class byte is zeroed, then its extent is punched out of the file
//!    (and, for a disk chunk, its range of the disk file);
//! 6. a page demoted to the disk tier (version 3): a slot of a disk chunk is reserved (its
//!    record stays 0), the payload is written to the disk file and the write has *completed*,
//!    then, with the memory slot found unchanged (same record, never freed meanwhile), the disk
//!    record is set (release) and only then is the memory slot's record zeroed. A page read
//!    back from disk follows step 4 like any other.
//! 7. a page moved by compaction (a blob of a sparse memory chunk moved to a free slot of a
//!    fuller chunk of its class, so the sparse chunk empties and is given back by step 5): the
//!    payload is copied to the new slot, then the *same* record is written there (release),
//!    and only then is the old slot's record zeroed. A reader may find both, naming the same
//!    page with the same bytes; it brings the page home once (the second copy fails with
//!    EEXIST), and an adopting monitor keeps one and frees the other.
//! 8. a page recompressed (idle time: its lz4 block replaced by a shorter lz4 block or zstd
//!    frame of the same page, in a smaller class): the new payload is written to a slot of
//!    the smaller class, then its record (the old one with the new length; release), and
//!    only then is the old slot's record zeroed. As in step 7, a reader may find both; the
//!    two decode to the same page, so it does not matter which one it brings home or keeps.
//!
//! So a reader sees, for every page, either a complete record with its payload (in the store
//! file or, for a disk chunk, already in the disk file), or no record while another copy
//! exists. It may also see a stale record of a page that is already back
//! in the program (step 4 not done yet): copying it in again fails with EEXIST and is skipped,
//! which is why a reader never overwrites a present page.
//!
//! Owns: the layout, its constants and a reader that does not allocate. Must not: make
//! syscalls or allocate (the shim's agent calls it while the program's allocator may be
//! unusable).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

// The view holds a raw pointer into shared memory; it is used by one thread at a time.

use crate::PAGE_SIZE;

pub const STORE_MAGIC: u64 = 0x524f_5453_5057_5355; // "USWPSTOR"
/// Version 4: a payload may be a zstd frame (idle-time recompression). Version 5: records share
/// the extent with the slots, and lz4 classes are 32 bytes apart.
pub const STORE_VERSION: u32 = 5;

/// The first four bytes of a zstd frame (RFC 8878, magic number 0xFD2FB528 little-endian).
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// Class-table bit of a disk chunk (its payloads are in the disk file; see the module doc).
pub const DISK_CHUNK_FLAG: u8 = 0x80;

/// Record bits 48..63: the set of *owners* of the slot, one bit per member of the client's
/// fork family (see [`record`]). Program addresses stay below 2^47 on x86-64 unless a program
/// asks for more with an mmap hint; a page above 2^48 is never stored (see `Store::insert`).
pub const OWNER_SHIFT: u32 = 48;
/// Members one store (one fork family) can have.
pub const MAX_OWNERS: usize = 16;
/// Highest page address a record can name, exclusive.
pub const ADDR_LIMIT: u64 = 1 << OWNER_SHIFT;

/// Bytes of one chunk's extent: its records, then its slots.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// Step between lz4 size classes, in bytes.
pub const CLASS_STEP_BYTES: usize = 32;
/// Largest lz4 payload kept compressed; anything longer is stored raw.
pub const LZ4_MAX_LEN_BYTES: usize = PAGE_SIZE * 3 / 4;
/// Number of lz4 size classes.
pub const LZ4_CLASSES: usize = LZ4_MAX_LEN_BYTES / CLASS_STEP_BYTES;
/// The class of raw (page-sized) slots; it comes after the lz4 classes.
pub const RAW_CLASS_IDX: u8 = LZ4_CLASSES as u8;
/// Number of size classes, raw included.
pub const NUM_CLASSES: usize = LZ4_CLASSES + 1;
pub const RECORD_BYTES: usize = 8;
/// Most slots (and records) a chunk of any class has: the smallest class has this many.
pub const RECORDS_PER_CHUNK: usize = slots_per_chunk(0);
/// Bytes of one chunk's extent in the file (the records are inside it, see the module doc).
pub const EXTENT_BYTES: usize = CHUNK_BYTES;
/// Most chunks of a durable store (256 GiB of extents).
pub const MAX_CHUNKS: usize = 1 << 20;
pub const HEADER_BYTES: usize = 4096;
pub const CLASS_TABLE_OFF: usize = HEADER_BYTES;
pub const EXTENTS_OFF: usize = CLASS_TABLE_OFF + MAX_CHUNKS;

const _: () = assert!(EXTENTS_OFF % PAGE_SIZE == 0 && EXTENT_BYTES % PAGE_SIZE == 0);
const _: () = assert!(
    records_bytes(RAW_CLASS_IDX) == PAGE_SIZE
        && slots_per_chunk(RAW_CLASS_IDX) * RECORD_BYTES <= PAGE_SIZE,
    "raw slots stay page-aligned, their records fit the first page"
);
const _: () = assert!(LZ4_CLASSES * CLASS_STEP_BYTES == LZ4_MAX_LEN_BYTES);

// Header fields.
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_PAGE_BYTES: usize = 12;
const OFF_CHUNK_BYTES: usize = 16;
const OFF_EXTENT_BYTES: usize = 20;
const OFF_CLASS_STEP: usize = 24;
const OFF_MAX_CHUNKS: usize = 28;

/// Slot size of a class, in bytes.
pub const fn slot_bytes(class_idx: u8) -> usize {
    if class_idx == RAW_CLASS_IDX {
        PAGE_SIZE
    } else {
        (class_idx as usize + 1) * CLASS_STEP_BYTES
    }
}

/// Slots in one chunk of a class: as many as fit with their records (raw: the records take
/// the first page, so the slots stay page-aligned).
pub const fn slots_per_chunk(class_idx: u8) -> usize {
    if class_idx == RAW_CLASS_IDX {
        CHUNK_BYTES / PAGE_SIZE - 1
    } else {
        CHUNK_BYTES / (slot_bytes(class_idx) + RECORD_BYTES)
    }
}

/// Bytes at the start of a chunk's extent before its first slot: its records (raw: the whole
/// first page).
pub const fn records_bytes(class_idx: u8) -> usize {
    if class_idx == RAW_CLASS_IDX {
        PAGE_SIZE
    } else {
        slots_per_chunk(class_idx) * RECORD_BYTES
    }
}

/// Offset of chunk `chunk_idx`'s extent in the file.
pub const fn extent_off(chunk_idx: usize) -> usize {
    EXTENTS_OFF + chunk_idx * EXTENT_BYTES
}

/// Offset of slot `slot_idx` within an extent.
pub const fn slot_off(class_idx: u8, slot_idx: usize) -> usize {
    records_bytes(class_idx) + slot_idx * slot_bytes(class_idx)
}

/// Offset in the disk file of slot `slot_idx` of disk chunk `chunk_idx` of class `class_idx`.
pub const fn disk_slot_off(chunk_idx: usize, class_idx: u8, slot_idx: usize) -> u64 {
    (chunk_idx * CHUNK_BYTES + slot_idx * slot_bytes(class_idx)) as u64
}

/// The class-table byte of a chunk of class `class_idx`, in memory or on disk.
pub const fn class_byte(class_idx: u8, on_disk: bool) -> u8 {
    if on_disk {
        DISK_CHUNK_FLAG | (class_idx + 1)
    } else {
        class_idx + 1
    }
}

/// What a class-table byte says about its chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    /// Slots of this class in the extent.
    Memory(u8),
    /// Records in the extent, payloads of this class in the disk file.
    Disk(u8),
}

impl ChunkKind {
    /// The chunk's size class.
    pub fn class_idx(self) -> u8 {
        match self {
            ChunkKind::Memory(c) | ChunkKind::Disk(c) => c,
        }
    }

    /// Decodes a class-table byte (`None`: no chunk, or a byte no writer produces).
    pub fn from_byte(b: u8) -> Option<ChunkKind> {
        let class = b & !DISK_CHUNK_FLAG;
        if class == 0 || usize::from(class) > NUM_CLASSES {
            return None;
        }
        Some(if b & DISK_CHUNK_FLAG != 0 {
            ChunkKind::Disk(class - 1)
        } else {
            ChunkKind::Memory(class - 1)
        })
    }
}

/// A record word for a page at `addr` with a payload of `len_bytes`, owned by the family
/// members in `owners` (bit `m` = member `m`).
pub fn record(addr: u64, len_bytes: usize, owners: u16) -> u64 {
    debug_assert!(addr != 0 && addr % PAGE_SIZE as u64 == 0 && addr < ADDR_LIMIT);
    debug_assert!((1..=PAGE_SIZE).contains(&len_bytes));
    debug_assert!(owners != 0);
    (u64::from(owners) << OWNER_SHIFT) | addr | (len_bytes as u64 - 1)
}

/// `(page_addr, len_bytes)` of a nonzero record.
pub fn record_parts(rec: u64) -> (u64, usize) {
    (
        rec & (ADDR_LIMIT - 1) & !(PAGE_SIZE as u64 - 1),
        (rec & (PAGE_SIZE as u64 - 1)) as usize + 1,
    )
}

/// The owner set of a record (bit `m` = family member `m`).
pub fn record_owners(rec: u64) -> u16 {
    (rec >> OWNER_SHIFT) as u16
}

/// The same record with another owner set (0 = no owner left: the record is cleared).
pub fn with_owners(rec: u64, owners: u16) -> u64 {
    if owners == 0 {
        0
    } else {
        (rec & (ADDR_LIMIT - 1)) | (u64::from(owners) << OWNER_SHIFT)
    }
}

/// Writes the header into the first [`HEADER_BYTES`] of a new store file's mapping.
pub fn write_header(hdr: &mut [u8]) {
    hdr[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&STORE_MAGIC.to_le_bytes());
    hdr[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&STORE_VERSION.to_le_bytes());
    let put = |h: &mut [u8], off: usize, v: usize| {
        h[off..off + 4].copy_from_slice(&(v as u32).to_le_bytes())
    };
    put(hdr, OFF_PAGE_BYTES, PAGE_SIZE);
    put(hdr, OFF_CHUNK_BYTES, CHUNK_BYTES);
    put(hdr, OFF_EXTENT_BYTES, EXTENT_BYTES);
    put(hdr, OFF_CLASS_STEP, CLASS_STEP_BYTES);
    put(hdr, OFF_MAX_CHUNKS, MAX_CHUNKS);
}

/// Why a store file cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("store file of {len} bytes is shorter than its header and class table")]
    Short { len: usize },
    #[error("store file has magic {found:#x}, not USWPSTOR")]
    Magic { found: u64 },
    #[error("store file has layout version {found}, this build reads {STORE_VERSION}")]
    Version { found: u32 },
    #[error(
        "store file geometry (page, chunk, extent, class step, chunks) differs from this build's"
    )]
    Geometry,
}

/// A view of a mapped store file (`len` bytes at `base`), for a reader that brings pages home
/// or adopts the store: it reads payloads and reads and rewrites records. A copy is another
/// view of the same mapping.
#[derive(Clone, Copy)]
pub struct StoreView {
    base: *mut u8,
    len: usize,
}

/// One stored page found by [`StoreView::for_each_page`].
pub struct StoredPage<'a> {
    pub addr: u64,
    /// The family members the page belongs to (bit `m` = member `m`).
    pub owners: u16,
    /// The raw page, or an lz4 block that decompresses to one page. Empty for a page of a disk
    /// chunk (its payload is at `disk_off` in the disk file) and for a corrupt record.
    pub payload: &'a [u8],
    /// Payload length, from the record.
    pub len_bytes: usize,
    pub raw: bool,
    /// A disk chunk's page: the offset of its payload in the disk file.
    pub disk_off: Option<u64>,
    pub chunk_idx: usize,
    pub class_idx: u8,
    pub slot_idx: usize,
}

impl StoreView {
    /// Checks the header of a mapped store file.
    ///
    /// # Safety
    /// `base` must be the page-aligned start of a shared mapping of at least `len` bytes that
    /// stays mapped while the view is used, and no one else may write the slots' payloads
    /// meanwhile (records are accessed atomically).
    pub unsafe fn new(base: *mut u8, len: usize) -> Result<StoreView, LayoutError> {
        if len < EXTENTS_OFF {
            return Err(LayoutError::Short { len });
        }
        // SAFETY: the caller guarantees `len` readable bytes at `base`; the header is read
        // while the view exists, and records are only written atomically.
        let bytes = unsafe { std::slice::from_raw_parts(base as *const u8, HEADER_BYTES) };
        let u32_at = |off: usize| u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap());
        let magic = u64::from_le_bytes(bytes[OFF_MAGIC..OFF_MAGIC + 8].try_into().unwrap());
        if magic != STORE_MAGIC {
            return Err(LayoutError::Magic { found: magic });
        }
        let version = u32_at(OFF_VERSION);
        if version != STORE_VERSION {
            return Err(LayoutError::Version { found: version });
        }
        let geometry = [
            (OFF_PAGE_BYTES, PAGE_SIZE),
            (OFF_CHUNK_BYTES, CHUNK_BYTES),
            (OFF_EXTENT_BYTES, EXTENT_BYTES),
            (OFF_CLASS_STEP, CLASS_STEP_BYTES),
            (OFF_MAX_CHUNKS, MAX_CHUNKS),
        ];
        if geometry
            .iter()
            .any(|&(off, want)| u32_at(off) as usize != want)
        {
            return Err(LayoutError::Geometry);
        }
        Ok(StoreView { base, len })
    }

    /// Chunks the file has room for.
    pub fn chunk_capacity(&self) -> usize {
        ((self.len - EXTENTS_OFF) / EXTENT_BYTES).min(MAX_CHUNKS)
    }

    /// The class of chunk `chunk_idx` if it is a memory chunk (and a valid one); `None` for
    /// no chunk and for a disk chunk (see [`StoreView::chunk_kind`]).
    pub fn chunk_class(&self, chunk_idx: usize) -> Option<u8> {
        match self.chunk_kind(chunk_idx) {
            Some(ChunkKind::Memory(c)) => Some(c),
            _ => None,
        }
    }

    /// The kind and class of chunk `chunk_idx`, if it has one (and a valid one).
    pub fn chunk_kind(&self, chunk_idx: usize) -> Option<ChunkKind> {
        assert!(chunk_idx < MAX_CHUNKS);
        // SAFETY: in bounds (CLASS_TABLE_OFF + chunk_idx < EXTENTS_OFF <= len, checked in
        // `new`), and an AtomicU8 has the alignment and size of a u8.
        let byte = unsafe {
            (*(self.base.add(CLASS_TABLE_OFF + chunk_idx) as *const AtomicU8))
                .load(Ordering::Acquire)
        };
        ChunkKind::from_byte(byte)
    }

    fn record_word(&self, chunk_idx: usize, slot_idx: usize) -> &AtomicU64 {
        let off = extent_off(chunk_idx) + slot_idx * RECORD_BYTES;
        assert!(slot_idx < RECORDS_PER_CHUNK && off + RECORD_BYTES <= self.len);
        // SAFETY: in bounds (asserted), 8-byte aligned (extent offsets and records are
        // multiples of 8 from a page-aligned mapping), and records are only accessed atomically.
        unsafe { &*(self.base.add(off) as *const AtomicU64) }
    }

    /// The record of a slot (0 = empty).
    pub fn record(&self, chunk_idx: usize, slot_idx: usize) -> u64 {
        self.record_word(chunk_idx, slot_idx)
            .load(Ordering::Acquire)
    }

    /// Rewrites a slot's record (0: the page is no longer kept here).
    pub fn set_record(&self, chunk_idx: usize, slot_idx: usize, rec: u64) {
        self.record_word(chunk_idx, slot_idx)
            .store(rec, Ordering::Release)
    }

    /// The page slot `slot_idx` of memory chunk `chunk_idx` (of class `class_idx`) holds, if
    /// its record is set. A record that does not fit its slot (a corrupt length) gives an
    /// empty payload, so the caller can report it.
    pub fn page(&self, chunk_idx: usize, class_idx: u8, slot_idx: usize) -> Option<StoredPage<'_>> {
        self.page_of(chunk_idx, ChunkKind::Memory(class_idx), slot_idx)
    }

    /// The page slot `slot_idx` of chunk `chunk_idx` (of kind `kind`) holds, if its record is
    /// set; a disk chunk's page comes with its offset in the disk file and no payload.
    pub fn page_of(
        &self,
        chunk_idx: usize,
        kind: ChunkKind,
        slot_idx: usize,
    ) -> Option<StoredPage<'_>> {
        let rec = self.record(chunk_idx, slot_idx);
        if rec == 0 {
            return None;
        }
        let (addr, len_bytes) = record_parts(rec);
        let mut page = self
            .page_at(chunk_idx, kind, slot_idx, len_bytes)
            .unwrap_or(StoredPage {
                addr: 0,
                owners: 0,
                payload: &[],
                len_bytes,
                raw: kind.class_idx() == RAW_CLASS_IDX,
                disk_off: None,
                chunk_idx,
                class_idx: kind.class_idx(),
                slot_idx,
            });
        page.addr = addr;
        page.owners = record_owners(rec);
        Some(page)
    }

    /// The payload of slot `slot_idx` of chunk `chunk_idx` (of kind `kind`) as a page of
    /// `len_bytes`, whatever its record says now (a reader that remembered the length); for
    /// a disk chunk, where it is in the disk file. `None` if the length does not fit the slot.
    pub fn page_at(
        &self,
        chunk_idx: usize,
        kind: ChunkKind,
        slot_idx: usize,
        len_bytes: usize,
    ) -> Option<StoredPage<'_>> {
        let class_idx = kind.class_idx();
        let raw = class_idx == RAW_CLASS_IDX;
        let fits = if raw {
            len_bytes == PAGE_SIZE
        } else {
            (1..=slot_bytes(class_idx)).contains(&len_bytes)
        };
        if !fits || slot_idx >= slots_per_chunk(class_idx) {
            return None;
        }
        let (payload, disk_off): (&[u8], _) = match kind {
            ChunkKind::Disk(_) => (&[], Some(disk_slot_off(chunk_idx, class_idx, slot_idx))),
            ChunkKind::Memory(_) => {
                let start = extent_off(chunk_idx) + slot_off(class_idx, slot_idx);
                if start + len_bytes > self.len {
                    return None;
                }
                // SAFETY: in bounds (checked); payloads are not written while the view is
                // used (the contract of `new`).
                let p = unsafe { std::slice::from_raw_parts(self.base.add(start), len_bytes) };
                (p, None)
            }
        };
        Some(StoredPage {
            addr: 0,
            owners: 0,
            payload,
            len_bytes,
            raw,
            disk_off,
            chunk_idx,
            class_idx,
            slot_idx,
        })
    }

    /// Calls `f` for every page with a record, chunk by chunk, memory and disk chunks alike
    /// (see [`StoreView::page_of`]).
    pub fn for_each_page(&self, mut f: impl FnMut(StoredPage<'_>)) {
        for chunk_idx in 0..self.chunk_capacity() {
            let Some(kind) = self.chunk_kind(chunk_idx) else {
                continue;
            };
            for slot_idx in 0..slots_per_chunk(kind.class_idx()) {
                if let Some(p) = self.page_of(chunk_idx, kind, slot_idx) {
                    f(p);
                }
            }
        }
    }
}

/// Bytes of the workspace a [`PageDecoder`] needs (zstd's decompression context, about 94 KiB
/// with zstd 1.5; checked against `ZSTD_estimateDCtxSize` when a decoder is made).
pub const DECODER_WORKSPACE_BYTES: usize = 128 * 1024;

/// Decodes stored payloads (raw, lz4 block or zstd frame) into a page without allocating:
/// zstd's decompression context lives in a workspace the caller provides once
/// (`ZSTD_initStaticDCtx`; a static context cannot allocate), so the shim can decode on its
/// rescue path, where the program's allocator may be unusable, from its own scratch mapping.
///
/// Why zstd-sys and not a Rust decoder: the pure-Rust zstd decoders allocate their buffers
/// per frame; zstd's static context is the one that guarantees no allocation.
#[cfg(feature = "decode")]
pub struct PageDecoder<'w> {
    dctx: std::ptr::NonNull<zstd_sys::ZSTD_DCtx>,
    _workspace: std::marker::PhantomData<&'w mut [u8]>,
}

#[cfg(feature = "decode")]
impl<'w> PageDecoder<'w> {
    /// A decoder whose context lives in `workspace` (at least [`DECODER_WORKSPACE_BYTES`],
    /// 8-byte aligned; the decoder borrows it for its life). `None` if it is too small or
    /// misaligned.
    pub fn new(workspace: &'w mut [u8]) -> Option<PageDecoder<'w>> {
        // SAFETY: a pure function of the library's build.
        let need_bytes = unsafe { zstd_sys::ZSTD_estimateDCtxSize() };
        if workspace.len() < need_bytes.max(DECODER_WORKSPACE_BYTES)
            || workspace.as_ptr().align_offset(8) != 0
        {
            return None;
        }
        // SAFETY: `workspace` is writable, 8-byte aligned, long enough (checked above) and
        // exclusively borrowed for the decoder's life ('w): nothing else touches it meanwhile.
        let dctx = unsafe {
            zstd_sys::ZSTD_initStaticDCtx(workspace.as_mut_ptr().cast(), workspace.len())
        };
        Some(PageDecoder {
            dctx: std::ptr::NonNull::new(dctx)?,
            _workspace: std::marker::PhantomData,
        })
    }

    /// Decompresses a stored page into `out`. `false` if the payload is corrupt, and for a
    /// disk chunk's page, whose payload must be read first ([`Self::decode_payload`]).
    pub fn decode_page(&mut self, page: &StoredPage<'_>, out: &mut [u8; PAGE_SIZE]) -> bool {
        page.disk_off.is_none() && self.decode_payload(page.raw, page.payload, out)
    }

    /// Decompresses a payload (`raw`: the page itself) into `out`. `false` if it is corrupt
    /// or does not make exactly one page.
    pub fn decode_payload(&mut self, raw: bool, payload: &[u8], out: &mut [u8; PAGE_SIZE]) -> bool {
        if raw {
            if payload.len() != PAGE_SIZE {
                return false;
            }
            out.copy_from_slice(payload);
            return true;
        }
        if payload.starts_with(&ZSTD_MAGIC) {
            return self.zstd(payload, out);
        }
        matches!(
            lz4_flex::block::decompress_into(payload, out),
            Ok(PAGE_SIZE)
        )
    }

    fn zstd(&mut self, payload: &[u8], out: &mut [u8; PAGE_SIZE]) -> bool {
        // SAFETY: `dctx` is a static context in the workspace this decoder borrows
        // exclusively; source and destination are valid for the lengths passed, and the
        // library writes at most `out.len()` bytes.
        let n = unsafe {
            zstd_sys::ZSTD_decompressDCtx(
                self.dctx.as_ptr(),
                out.as_mut_ptr().cast(),
                out.len(),
                payload.as_ptr().cast(),
                payload.len(),
            )
        };
        // SAFETY: a pure function of its argument.
        n == PAGE_SIZE && unsafe { zstd_sys::ZSTD_isError(n) } == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_roundtrip() {
        for (addr, len, owners) in [
            (0x1000u64, 1usize, 1u16),
            (0x7fff_ffff_f000, 4096, 0x8001),
            (0xffff_ffff_f000, 77, 0xffff),
        ] {
            let r = record(addr, len, owners);
            assert_ne!(r, 0);
            assert_eq!(record_parts(r), (addr, len));
            assert_eq!(record_owners(r), owners);
            assert_eq!(record_parts(with_owners(r, 2)), (addr, len));
            assert_eq!(record_owners(with_owners(r, 2)), 2);
            assert_eq!(with_owners(r, 0), 0);
        }
    }

    #[test]
    fn chunk_kind_bytes_roundtrip() {
        for class_idx in 0..NUM_CLASSES as u8 {
            for on_disk in [false, true] {
                let b = class_byte(class_idx, on_disk);
                let want = if on_disk {
                    ChunkKind::Disk(class_idx)
                } else {
                    ChunkKind::Memory(class_idx)
                };
                assert_eq!(ChunkKind::from_byte(b), Some(want));
            }
        }
        assert_eq!(ChunkKind::from_byte(0), None);
        assert_eq!(ChunkKind::from_byte(DISK_CHUNK_FLAG), None);
        assert_eq!(ChunkKind::from_byte(NUM_CLASSES as u8 + 1), None);
        assert_eq!(
            disk_slot_off(3, RAW_CLASS_IDX, 2),
            (3 * CHUNK_BYTES + 2 * PAGE_SIZE) as u64
        );
        assert_eq!(
            disk_slot_off(1, 0, 5),
            (CHUNK_BYTES + 5 * CLASS_STEP_BYTES) as u64
        );
    }

    #[test]
    fn disk_chunk_pages_come_with_their_offset() {
        let mut words = vec![0u64; (EXTENTS_OFF + 2 * EXTENT_BYTES) / 8];
        let len = words.len() * 8;
        let base: *mut u8 = words.as_mut_ptr().cast();
        // SAFETY: `words` is `len` bytes, 8-aligned, alive and only used through this view
        // and the header slice, one at a time.
        write_header(unsafe { std::slice::from_raw_parts_mut(base, HEADER_BYTES) });
        // Class 4: 160-byte slots.
        // SAFETY: as above.
        unsafe { *base.add(CLASS_TABLE_OFF + 1) = class_byte(4, true) };
        // SAFETY: as above.
        let v = unsafe { StoreView::new(base, len) }.unwrap();
        assert_eq!(v.chunk_class(1), None, "not a memory chunk");
        assert_eq!(v.chunk_kind(1), Some(ChunkKind::Disk(4)));
        v.set_record(1, 7, record(0x9000, 150, 1));
        let mut found = Vec::new();
        v.for_each_page(|p| found.push((p.addr, p.len_bytes, p.disk_off, p.payload.len())));
        assert_eq!(found, vec![(0x9000, 150, Some(disk_slot_off(1, 4, 7)), 0)]);
    }

    #[test]
    fn geometry() {
        assert_eq!(slots_per_chunk(0), RECORDS_PER_CHUNK);
        assert_eq!(slots_per_chunk(RAW_CLASS_IDX), CHUNK_BYTES / PAGE_SIZE - 1);
        assert_eq!(slot_off(RAW_CLASS_IDX, 3) % PAGE_SIZE, 0);
        assert_eq!(EXTENT_BYTES, 256 * 1024);
        // Every class's records and slots fit its extent, and its slots follow its records.
        for class_idx in 0..NUM_CLASSES as u8 {
            let slots = slots_per_chunk(class_idx);
            assert!(
                (1..=RECORDS_PER_CHUNK).contains(&slots),
                "class {class_idx}"
            );
            assert!(records_bytes(class_idx) >= slots * RECORD_BYTES);
            assert!(
                slot_off(class_idx, slots) <= EXTENT_BYTES,
                "class {class_idx}"
            );
            // No room is left for one more slot with its record.
            if class_idx != RAW_CLASS_IDX {
                let more = (slots + 1) * (slot_bytes(class_idx) + RECORD_BYTES);
                assert!(more > CHUNK_BYTES, "class {class_idx}");
            }
        }
        // The classes of a ~2 KiB blob (most of a heap's pages) lose under 1 % to records.
        let c = (2048 / CLASS_STEP_BYTES - 1) as u8;
        assert!(slots_per_chunk(c) * slot_bytes(c) * 100 >= 99 * CHUNK_BYTES);
    }

    #[test]
    fn header_checked() {
        let mut words = vec![0u64; (EXTENTS_OFF + EXTENT_BYTES) / 8];
        let len = words.len() * 8;
        let base: *mut u8 = words.as_mut_ptr().cast();
        let view = |len| {
            // SAFETY: `words` is at least `len` bytes, 8-aligned, alive and not otherwise
            // accessed while a view is used.
            unsafe { StoreView::new(base, len) }
        };
        assert_eq!(view(len).err(), Some(LayoutError::Magic { found: 0 }));
        // SAFETY: as above; the header slice is dropped before the next view.
        write_header(unsafe { std::slice::from_raw_parts_mut(base, HEADER_BYTES) });
        let v = view(len).unwrap();
        assert_eq!(v.chunk_capacity(), 1);
        assert_eq!(v.chunk_class(0), None);
        assert_eq!(v.record(0, 5), 0);
        v.set_record(0, 5, record(0x7000, 12, 1));
        assert_eq!(v.record(0, 5), record(0x7000, 12, 1));
        // SAFETY: as above.
        unsafe { *base.add(OFF_VERSION) = 9 };
        assert_eq!(view(len).err(), Some(LayoutError::Version { found: 9 }));
        assert!(matches!(view(100), Err(LayoutError::Short { .. })));
    }
}
