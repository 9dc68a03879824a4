//! Page encoding: same-filled detection and lz4 compression, as pure functions.
//!
//! Owns: the decision of how a page is kept (same-filled word, lz4 blob, or raw) and the
//! compression and decompression calls themselves. Runs outside any lock: it never sees the
//! [`Store`](super::Store), only a page and a caller-owned scratch buffer.
//! Must not touch: slabs, the word table, uffd, processes, syscalls.

use crate::PAGE_SIZE;

/// Longest lz4 payload kept compressed, in bytes: 3/4 of a page. A page that compresses to
/// more than this is kept raw, since the saving would not pay for a decompression per fault.
pub const LZ4_MAX_LEN_BYTES: usize = PAGE_SIZE * 3 / 4;

/// Bytes in a same-filled word.
const WORD_BYTES: usize = 8;

/// Scratch capacity lz4_flex insists on for one page (it refuses smaller outputs up front).
pub const SCRATCH_BYTES: usize = lz4_flex::block::get_maximum_output_size(PAGE_SIZE);

/// How a page is to be kept, as decided by [`encode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoded<'a> {
    /// Every 8-byte word of the page equals this one (native byte order).
    SameFilled(u64),
    /// The lz4 block-format payload, `1..=LZ4_MAX_LEN_BYTES` bytes, borrowed from the scratch.
    Lz4(&'a [u8]),
    /// Incompressible: keep the page verbatim.
    Raw,
}

/// Returns the word a page is filled with, if every 8-byte word of it is the same.
pub fn same_filled_word(page: &[u8; PAGE_SIZE]) -> Option<u64> {
    let mut words = page
        .chunks_exact(WORD_BYTES)
        .map(|w| u64::from_ne_bytes(w.try_into().expect("chunks_exact yields 8 bytes")));
    let first = words.next()?;
    words.all(|w| w == first).then_some(first)
}

/// Decides how to keep `page` and compresses it if that is worth it. Pure: no `&Store`, so
/// it can run before the store's lock is taken. `scratch` is grown once to
/// [`SCRATCH_BYTES`](super::SCRATCH_BYTES) and reused; an [`Encoded::Lz4`] borrows from it.
pub fn encode<'a>(page: &[u8; PAGE_SIZE], scratch: &'a mut Vec<u8>) -> Encoded<'a> {
    if let Some(word) = same_filled_word(page) {
        return Encoded::SameFilled(word);
    }
    if scratch.len() < SCRATCH_BYTES {
        scratch.resize(SCRATCH_BYTES, 0);
    }
    match lz4_flex::block::compress_into(page, scratch) {
        Ok(len_bytes) if (1..=LZ4_MAX_LEN_BYTES).contains(&len_bytes) => {
            Encoded::Lz4(&scratch[..len_bytes])
        }
        // Too long to be worth it, or (cannot happen with SCRATCH_BYTES) no room: raw.
        Ok(_) | Err(_) => Encoded::Raw,
    }
}

/// Highest lz4hc level (liblz4's `LZ4HC_CLEVEL_MAX`).
pub const RECOMPRESS_LEVEL_MAX: u32 = 12;

/// Recompresses one stored lz4 `payload` with lz4's high-compression encoder at `level`
/// (1..=[`RECOMPRESS_LEVEL_MAX`]) into `out`, and returns the new length, only if the new
/// payload is shorter than `fits_below` bytes (the caller's bound: the next smaller size
/// class) and decodes back to exactly the page `payload` held. `page` and `check` are scratch
/// pages. The output is an ordinary lz4 block: readers need no change.
///
/// `None`: nothing better (or the old payload does not decode: the caller leaves it as it is
/// and the fault path reports it).
///
/// Why liblz4 (the `lz4` crate) and not lz4_flex: lz4_flex has no high-compression mode.
pub fn recompress(
    payload: &[u8],
    level: u32,
    fits_below: usize,
    page: &mut [u8; PAGE_SIZE],
    check: &mut [u8; PAGE_SIZE],
    out: &mut Vec<u8>,
) -> Option<usize> {
    decompress(payload, page).ok()?;
    if fits_below <= 1 {
        return None;
    }
    // A buffer one short of the bound: liblz4 gives up (an error) as soon as the output cannot
    // fit, instead of finishing a block that would not be kept.
    out.resize(fits_below - 1, 0);
    let level = level.clamp(1, RECOMPRESS_LEVEL_MAX) as i32;
    let len_bytes = lz4::block::compress_to_buffer(
        &page[..],
        Some(lz4::block::CompressionMode::HIGHCOMPRESSION(level)),
        false,
        out,
    )
    .ok()?;
    if len_bytes == 0 || len_bytes >= fits_below {
        return None;
    }
    // Read it back with the decoder every reader uses before it replaces anything.
    decompress(&out[..len_bytes], check).ok()?;
    (check[..] == page[..]).then_some(len_bytes)
}

/// Fills `out` with `word` repeated.
pub(crate) fn fill_word(out: &mut [u8; PAGE_SIZE], word: u64) {
    if word == 0 {
        out.fill(0);
        return;
    }
    let bytes = word.to_ne_bytes();
    for w in out.chunks_exact_mut(WORD_BYTES) {
        w.copy_from_slice(&bytes);
    }
}

/// Decompresses one lz4 payload into `out`; `Err(detail)` unless it yields exactly one page.
pub(crate) fn decompress(payload: &[u8], out: &mut [u8; PAGE_SIZE]) -> Result<(), String> {
    match lz4_flex::block::decompress_into(payload, out) {
        Ok(PAGE_SIZE) => Ok(()),
        Ok(n) => Err(format!("decompressed to {n} bytes, not {PAGE_SIZE}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Heap-like text for tests (`seed` picks the page): lz4 compresses it, lz4hc compresses it
/// better.
#[cfg(test)]
pub(crate) fn text_page(seed: u64) -> [u8; PAGE_SIZE] {
    let words: [&[u8]; 8] = [
        b"alpha ",
        b"kernel ",
        b"latency ",
        b"memory ",
        b"page ",
        b"queue ",
        b"token ",
        b"worker ",
    ];
    let mut page = [0u8; PAGE_SIZE];
    let mut x = 0x2545_f491_4f6c_dd1du64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut pos = 0;
    while pos < PAGE_SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let w = words[(x % 8) as usize];
        let n = w.len().min(PAGE_SIZE - pos);
        page[pos..pos + n].copy_from_slice(&w[..n]);
        pos += n;
        if x % 5 == 0 && pos + 2 <= PAGE_SIZE {
            page[pos..pos + 2].copy_from_slice(&((x >> 20) as u16).to_le_bytes());
            pos += 2;
        }
    }
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_zero_page_same_filled_zero() {
        let page = [0u8; PAGE_SIZE];
        assert_eq!(encode(&page, &mut Vec::new()), Encoded::SameFilled(0));
    }

    #[test]
    fn encode_repeated_word_same_filled() {
        let mut page = [0u8; PAGE_SIZE];
        fill_word(&mut page, 0xdead_beef_0123_4567);
        assert_eq!(
            encode(&page, &mut Vec::new()),
            Encoded::SameFilled(0xdead_beef_0123_4567)
        );
    }

    #[test]
    fn encode_one_byte_differs_not_same_filled() {
        let mut page = [0u8; PAGE_SIZE];
        page[PAGE_SIZE - 1] = 1;
        let mut scratch = Vec::new();
        match encode(&page, &mut scratch) {
            Encoded::Lz4(p) => assert!(p.len() < 100, "mostly-zero page: {} bytes", p.len()),
            other => panic!("expected Lz4, got {other:?}"),
        }
    }

    #[test]
    fn encode_random_page_raw() {
        // xorshift: incompressible bytes.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut page = [0u8; PAGE_SIZE];
        for b in page.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        assert_eq!(encode(&page, &mut Vec::new()), Encoded::Raw);
    }

    /// The lz4 payload eviction stores for `page` (which must compress).
    fn fast_payload(page: &[u8; PAGE_SIZE]) -> Vec<u8> {
        let mut scratch = Vec::new();
        let Encoded::Lz4(fast) = encode(page, &mut scratch) else {
            panic!("expected Lz4")
        };
        fast.to_vec()
    }

    #[test]
    fn recompress_is_shorter_and_decodes_to_the_same_page() {
        let page = text_page(1);
        let fast = fast_payload(&page);
        let (mut p, mut c, mut out) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE], Vec::new());
        let len = recompress(&fast, 9, fast.len(), &mut p, &mut c, &mut out)
            .expect("lz4hc beats lz4 on text");
        assert!(len < fast.len(), "{len} >= {}", fast.len());
        let mut back = [0u8; PAGE_SIZE];
        decompress(&out[..len], &mut back).expect("an ordinary lz4 block");
        assert_eq!(back, page);
    }

    #[test]
    fn recompress_gives_up_below_the_bound() {
        let page = text_page(1);
        let fast = fast_payload(&page);
        let (mut p, mut c, mut out) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE], Vec::new());
        // No encoder gets a page of text into 16 bytes.
        assert_eq!(recompress(&fast, 9, 16, &mut p, &mut c, &mut out), None);
        assert_eq!(recompress(&fast, 9, 0, &mut p, &mut c, &mut out), None);
        // A payload that does not decode is left alone.
        assert_eq!(
            recompress(&fast[..fast.len() / 2], 9, 4096, &mut p, &mut c, &mut out),
            None
        );
    }

    #[test]
    fn decompress_truncated_payload_err() {
        let mut page = [0u8; PAGE_SIZE];
        page[..26].copy_from_slice(b"abcdefghijklmnopqrstuvwxyz");
        let mut scratch = Vec::new();
        let Encoded::Lz4(p) = encode(&page, &mut scratch) else {
            panic!("expected Lz4")
        };
        let mut out = [0u8; PAGE_SIZE];
        decompress(p, &mut out).expect("whole payload decodes");
        assert_eq!(out, page);
        assert!(decompress(&p[..p.len() - 1], &mut out).is_err());
    }
}
