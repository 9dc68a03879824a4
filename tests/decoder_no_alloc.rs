//! The shim's rule for its rescue path, checked: decoding a stored payload (raw page, lz4
//! block, zstd frame, and a corrupt one of each) through `store_layout::PageDecoder` over a
//! caller's workspace makes no heap allocation at all. The shim decodes while the program's
//! allocator may hold a lock or live in evicted memory, so one malloc there could hang it.
//!
//! Alone in its own binary: it installs a counting global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use uswap::protocol::store_layout::{PageDecoder, DECODER_WORKSPACE_BYTES};
use uswap::store::{encode, recompress, Encoded, Recompress, RecompressScratch};
use uswap::PAGE_SIZE;

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; only counts allocations
// made by the calling thread (a const-initialised thread-local Cell, which never allocates).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|a| a.set(a.get() + 1));
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc`, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.with(|a| a.set(a.get() + 1));
        // SAFETY: the caller's contract for `realloc`, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(|a| a.get())
}

/// Heap-like text with a little noise: lz4 and zstd both compress it.
fn text_page(seed: u64) -> [u8; PAGE_SIZE] {
    let words: [&[u8]; 6] = [
        b"alpha ", b"kernel ", b"memory ", b"page ", b"queue ", b"token ",
    ];
    let mut page = [0u8; PAGE_SIZE];
    let mut x = seed | 1;
    let mut pos = 0;
    while pos < PAGE_SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let w = words[(x % 6) as usize];
        let n = w.len().min(PAGE_SIZE - pos);
        page[pos..pos + n].copy_from_slice(&w[..n]);
        pos += n;
    }
    page
}

#[test]
fn decoding_every_kind_of_payload_allocates_nothing() {
    // Payloads made beforehand (this may allocate).
    let page = text_page(7);
    let mut scratch = Vec::new();
    let Encoded::Lz4(lz4) = encode(&page, &mut scratch) else {
        panic!("text compresses")
    };
    let lz4 = lz4.to_vec();
    let mut s = RecompressScratch::new();
    let len = recompress(&lz4, Recompress::Zstd(3), lz4.len(), &mut s).expect("zstd is shorter");
    let zstd = s.out[..len].to_vec();
    assert!(zstd.starts_with(&uswap::protocol::store_layout::ZSTD_MAGIC));
    let mut bad_zstd = zstd.clone();
    bad_zstd.truncate(len - 3);
    let bad_lz4 = lz4[..lz4.len() / 2].to_vec();
    // The workspace, as the shim's mapping would give it (u64-aligned).
    let mut words = vec![0u64; DECODER_WORKSPACE_BYTES / 8];
    // SAFETY: the u64 buffer viewed as bytes for the decoder alone, for its length.
    let ws = unsafe {
        std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), DECODER_WORKSPACE_BYTES)
    };
    let mut out = [0u8; PAGE_SIZE];

    let before = allocs();
    let mut d = PageDecoder::new(ws).expect("a workspace of the declared size");
    let ok = [
        d.decode_payload(true, &page, &mut out) && out == page,
        d.decode_payload(false, &lz4, &mut out) && out == page,
        d.decode_payload(false, &zstd, &mut out) && out == page,
        // Again: a context decodes frame after frame.
        d.decode_payload(false, &zstd, &mut out) && out == page,
    ];
    let refused = [
        d.decode_payload(false, &bad_zstd, &mut out),
        d.decode_payload(false, &bad_lz4, &mut out),
        d.decode_payload(true, &lz4, &mut out),
    ];
    let made = allocs() - before;
    assert_eq!(ok, [true; 4], "raw, lz4, zstd, zstd again");
    assert_eq!(
        refused, [false; 3],
        "cut zstd frame, cut lz4 block, short raw page"
    );
    assert_eq!(made, 0, "decoding allocated {made} times");
}
