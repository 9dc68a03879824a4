//! The page handle: the only per-page metadata of the store.
//!
//! Owns: the bit layout of [`Handle`] and its packing/unpacking. It knows nothing of chunks,
//! mappings or the word table beyond the widths of their indices; whether a handle points at a
//! live slot is checked by the slab and the word table, not here.
//! Must not touch: memory, uffd, processes, syscalls.
//!
//! The store keeps no per-page table: the monitor keeps the handle in its own page map, so
//! these 8 bytes are the whole per-page cost (plus the store's shared metadata).
//!
//! Bit layout (bit 0 is the least significant):
//!
//! | bits    | blob page (`bit 59 == 1`)                    | same-filled page (`bit 59 == 0`)  |
//! |---------|----------------------------------------------|-----------------------------------|
//! | 0..=12  | `len_bytes` of the payload (1..=4096)        | 0..=31: the word: 0 = the zero    |
//! | 13..=25 | `slot_idx` in the chunk (13 bits)            | word, else word-table index + 1   |
//! | 26..=51 | `chunk_idx` (26 bits)                        | 32..=58: must be zero             |
//! | 52..=58 | `class_idx` (7 bits); [`RAW_CLASS_IDX`] = raw |                                   |
//! | 59      | 1                                            | 0                                 |
//! | 60..=63 | always zero                                  | always zero                       |
//!
//! So every handle fits in 61 bits (bits 61..=63 are free for the monitor's own flags), and
//! [`Handle::kind`] is total: any bit pattern names some kind; the store rejects patterns
//! that do not name a live page with [`StoreError::CorruptHandle`](super::StoreError).

use super::slab::RAW_CLASS_IDX;

/// Width of the payload length field; 13 bits hold 0..=8191, enough for a whole page.
pub(crate) const LEN_BITS: u32 = 13;
/// Width of the slot index within a chunk: a chunk holds at most 8192 slots.
pub(crate) const SLOT_BITS: u32 = 13;
/// Width of the chunk index: 2^26 chunks of 256 KiB = 16 TiB of slabs.
pub(crate) const CHUNK_BITS: u32 = 26;
/// Width of the size-class index.
pub(crate) const CLASS_BITS: u32 = 7;

const LEN_SHIFT: u32 = 0;
const SLOT_SHIFT: u32 = LEN_SHIFT + LEN_BITS;
const CHUNK_SHIFT: u32 = SLOT_SHIFT + SLOT_BITS;
const CLASS_SHIFT: u32 = CHUNK_SHIFT + CHUNK_BITS;
const BLOB_BIT: u32 = CLASS_SHIFT + CLASS_BITS;
/// Bits 60..=63 of a valid handle are zero.
const RESERVED_MASK: u64 = !((1u64 << (BLOB_BIT + 1)) - 1);
/// Bits of a same-filled handle that hold the word reference.
const WORD_REF_MASK: u64 = u32::MAX as u64;

const _: () = assert!(
    BLOB_BIT == 59,
    "layout table in the module doc is out of date"
);
const _: () = assert!(RESERVED_MASK == 0xF000_0000_0000_0000);

/// Largest chunk index a handle can carry.
pub(crate) const MAX_CHUNK_IDX: u32 = (1u32 << CHUNK_BITS) - 1;
/// Largest slot index a handle can carry.
pub(crate) const MAX_SLOT_IDX: u32 = (1u32 << SLOT_BITS) - 1;

fn field(bits: u64, shift: u32, width: u32) -> u64 {
    (bits >> shift) & ((1u64 << width) - 1)
}

/// What kind of storage a page got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum PageKind {
    /// The page is one 8-byte word repeated (zero pages included); no blob is stored.
    SameFilled,
    /// The page is stored lz4-compressed in a size-class slot.
    Lz4,
    /// The page did not compress well and is stored verbatim in a page-sized slot.
    Raw,
}

/// Where a stored page lives. `Copy`, 8 bytes, and always below 2^61.
///
/// A handle is valid from the [`Store::insert`](super::Store::insert) that returned it until
/// the [`Store::remove`](super::Store::remove) of it; afterwards its slot may hold another page.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Handle(u64);

/// A handle taken apart; only the store builds and reads these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    /// `word_ref` is 0 for the zero word, else word-table index + 1.
    SameFilled {
        word_ref: u32,
    },
    Blob(BlobLoc),
}

/// Location and length of a blob in the slabs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BlobLoc {
    pub class_idx: u8,
    pub chunk_idx: u32,
    pub slot_idx: u32,
    pub len_bytes: u32,
}

impl Handle {
    /// The handle of an all-zero page. The store needs nothing to hold it, so
    /// [`Store::remove`](super::Store::remove) of it is a no-op beyond the page count.
    pub const ZERO_PAGE: Handle = Handle(0);

    /// The raw bits, for the monitor's page map. Always `< 1 << 61`.
    pub fn to_bits(self) -> u64 {
        self.0
    }

    /// Rebuilds a handle from [`Handle::to_bits`]. Never fails: a bad pattern is caught when
    /// the handle is used ([`StoreError::CorruptHandle`](super::StoreError)).
    pub fn from_bits(bits: u64) -> Handle {
        Handle(bits)
    }

    /// The kind of storage this handle names. Total: any bit pattern maps to some kind.
    pub fn kind(self) -> PageKind {
        if field(self.0, BLOB_BIT, 1) == 0 {
            PageKind::SameFilled
        } else if field(self.0, CLASS_SHIFT, CLASS_BITS) == u64::from(RAW_CLASS_IDX) {
            PageKind::Raw
        } else {
            PageKind::Lz4
        }
    }

    pub(crate) fn same_filled(word_ref: u32) -> Handle {
        Handle(u64::from(word_ref))
    }

    pub(crate) fn blob(loc: BlobLoc) -> Handle {
        debug_assert!(u64::from(loc.len_bytes) < 1 << LEN_BITS);
        debug_assert!(loc.slot_idx <= MAX_SLOT_IDX);
        debug_assert!(loc.chunk_idx <= MAX_CHUNK_IDX);
        debug_assert!(u64::from(loc.class_idx) < 1 << CLASS_BITS);
        Handle(
            (u64::from(loc.len_bytes) << LEN_SHIFT)
                | (u64::from(loc.slot_idx) << SLOT_SHIFT)
                | (u64::from(loc.chunk_idx) << CHUNK_SHIFT)
                | (u64::from(loc.class_idx) << CLASS_SHIFT)
                | (1u64 << BLOB_BIT),
        )
    }

    /// Takes the handle apart; `None` when reserved bits are set (not a handle we made).
    pub(crate) fn decode(self) -> Option<Decoded> {
        if self.0 & RESERVED_MASK != 0 {
            return None;
        }
        if field(self.0, BLOB_BIT, 1) == 0 {
            if self.0 & !WORD_REF_MASK != 0 {
                return None;
            }
            // Fits: masked to 32 bits just above.
            return Some(Decoded::SameFilled {
                word_ref: self.0 as u32,
            });
        }
        // Each field is masked to at most 26 bits, so the narrowing casts are lossless.
        Some(Decoded::Blob(BlobLoc {
            class_idx: field(self.0, CLASS_SHIFT, CLASS_BITS) as u8,
            chunk_idx: field(self.0, CHUNK_SHIFT, CHUNK_BITS) as u32,
            slot_idx: field(self.0, SLOT_SHIFT, SLOT_BITS) as u32,
            len_bytes: field(self.0, LEN_SHIFT, LEN_BITS) as u32,
        }))
    }
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.decode() {
            Some(Decoded::SameFilled { word_ref }) => {
                write!(f, "Handle(same-filled word_ref={word_ref})")
            }
            Some(Decoded::Blob(loc)) => write!(
                f,
                "Handle({:?} class_idx={} chunk_idx={} slot_idx={} len_bytes={})",
                self.kind(),
                loc.class_idx,
                loc.chunk_idx,
                loc.slot_idx,
                loc.len_bytes
            ),
            None => write!(f, "Handle(invalid {:#x})", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn zero_page_handle_is_same_filled_zero_word() {
        assert_eq!(Handle::ZERO_PAGE.kind(), PageKind::SameFilled);
        assert_eq!(
            Handle::ZERO_PAGE.decode(),
            Some(Decoded::SameFilled { word_ref: 0 })
        );
    }

    #[test]
    fn decode_reserved_bits_set_is_none() {
        for bit in 60..64 {
            assert_eq!(Handle::from_bits(1 << bit).decode(), None, "bit {bit}");
        }
        // A same-filled handle with junk in the blob fields.
        assert_eq!(Handle::from_bits(1 << 40).decode(), None);
    }

    proptest! {
        #[test]
        fn blob_handle_round_trips_and_fits_61_bits(
            class_idx in 0u8..(1 << CLASS_BITS),
            chunk_idx in 0u32..=MAX_CHUNK_IDX,
            slot_idx in 0u32..=MAX_SLOT_IDX,
            len_bytes in 0u32..(1 << LEN_BITS),
        ) {
            let loc = BlobLoc { class_idx, chunk_idx, slot_idx, len_bytes };
            let h = Handle::blob(loc);
            prop_assert!(h.to_bits() < 1 << 61);
            prop_assert_eq!(Handle::from_bits(h.to_bits()), h);
            prop_assert_eq!(h.decode(), Some(Decoded::Blob(loc)));
            let want = if class_idx == RAW_CLASS_IDX { PageKind::Raw } else { PageKind::Lz4 };
            prop_assert_eq!(h.kind(), want);
        }

        #[test]
        fn same_filled_handle_round_trips(word_ref in any::<u32>()) {
            let h = Handle::same_filled(word_ref);
            prop_assert!(h.to_bits() < 1 << 61);
            prop_assert_eq!(h.kind(), PageKind::SameFilled);
            prop_assert_eq!(h.decode(), Some(Decoded::SameFilled { word_ref }));
        }
    }
}
