//! Page encoding: same-filled detection and lz4 compression, as pure functions.
//!
//! Owns: the decision of how a page is kept (same-filled word, lz4 blob, or raw) and the
//! compression and decompression calls themselves. Runs outside any lock: it never sees the
//! [`Store`](super::Store), only a page and a caller-owned scratch buffer.
//! Must not touch: slabs, the word table, uffd, processes, syscalls.

use crate::protocol::store_layout::{PageDecoder, DECODER_WORKSPACE_BYTES, ZSTD_MAGIC};
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
pub const LZ4HC_LEVEL_MAX: u32 = 12;
/// Highest zstd level offered (levels above 19 are zstd's "ultra" levels, for large windows;
/// a page gains nothing from them).
pub const ZSTD_LEVEL_MAX: u32 = 19;

/// How idle-time recompression re-encodes a cold blob. Key `recompress` (`"zstd:3"`,
/// `"lz4hc:9"`, `"none"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recompress {
    /// Blobs stay as eviction stored them.
    Off,
    /// lz4's high-compression encoder, 1..=[`LZ4HC_LEVEL_MAX`]: an ordinary lz4 block, which
    /// decodes faster than the fast encoder's; about 10 % smaller on heap-like pages.
    Lz4hc(u32),
    /// A zstd frame, 1..=[`ZSTD_LEVEL_MAX`]: about 28 % smaller than lz4 on heap-like pages,
    /// decoded in ~6 µs instead of ~2 µs (BENCHMARKS.md, "zstd for cold blobs").
    Zstd(u32),
}

impl Recompress {
    /// As written in a config file (`"zstd:3"`), parsed back by the config.
    pub fn name(self) -> String {
        match self {
            Recompress::Off => "none".to_string(),
            Recompress::Lz4hc(l) => format!("lz4hc:{l}"),
            Recompress::Zstd(l) => format!("zstd:{l}"),
        }
    }
}

impl serde::Serialize for Recompress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

/// A recompression worker's buffers and zstd compression context, reused across blobs.
pub struct RecompressScratch {
    page: Box<[u8; PAGE_SIZE]>,
    check: Box<[u8; PAGE_SIZE]>,
    /// The last output; [`recompress`] returns its length.
    pub out: Vec<u8>,
    zstd: zstd_safe::CCtx<'static>,
}

impl RecompressScratch {
    pub fn new() -> RecompressScratch {
        use zstd_safe::CParameter;
        let mut zstd = zstd_safe::CCtx::create();
        // Frame parameters for every blob (a session reset keeps them; only the level is set
        // per blob).
        for p in [
            CParameter::ChecksumFlag(false),
            CParameter::ContentSizeFlag(true),
            CParameter::DictIdFlag(false),
        ] {
            zstd.set_parameter(p)
                .expect("a fresh zstd context takes frame parameters");
        }
        RecompressScratch {
            page: Box::new([0; PAGE_SIZE]),
            check: Box::new([0; PAGE_SIZE]),
            out: Vec::new(),
            zstd,
        }
    }
}

impl Default for RecompressScratch {
    fn default() -> Self {
        Self::new()
    }
}

/// Recompresses one stored `payload` (lz4 block or zstd frame) with `codec` into `s.out` and
/// returns the new length, only if the new payload is shorter than `fits_below` bytes (the
/// caller's bound: the next smaller size class) and decodes back, with the decoder every
/// reader uses, to exactly the page `payload` held.
///
/// `None`: nothing better, `codec` is [`Recompress::Off`], or the old payload does not decode
/// (the caller leaves it as it is and the fault path reports it).
///
/// Why liblz4 (the `lz4` crate) and not lz4_flex: lz4_flex has no high-compression mode. Why
/// zstd frames with their magic and no checksum: the magic tells a reader which decoder to
/// use (see `store_layout`), and every output is decoded and compared here before it is kept.
pub fn recompress(
    payload: &[u8],
    codec: Recompress,
    fits_below: usize,
    s: &mut RecompressScratch,
) -> Option<usize> {
    decompress(payload, &mut s.page).ok()?;
    if fits_below <= 1 {
        return None;
    }
    // A buffer one short of the bound: both encoders give up (an error) as soon as the output
    // cannot fit, instead of finishing a payload that would not be kept.
    s.out.resize(fits_below - 1, 0);
    let len_bytes = match codec {
        Recompress::Off => return None,
        Recompress::Lz4hc(level) => lz4::block::compress_to_buffer(
            &s.page[..],
            Some(lz4::block::CompressionMode::HIGHCOMPRESSION(
                level.clamp(1, LZ4HC_LEVEL_MAX) as i32,
            )),
            false,
            &mut s.out,
        )
        .ok()?,
        Recompress::Zstd(level) => {
            use zstd_safe::CParameter;
            let z = &mut s.zstd;
            // A compression that failed (the output did not fit: the usual case for a blob
            // that would not shrink) leaves the context mid-frame, where it refuses every
            // parameter change and every later frame: start each blob from a clean session.
            z.reset(zstd_safe::ResetDirective::SessionOnly).ok()?;
            z.set_parameter(CParameter::CompressionLevel(
                level.clamp(1, ZSTD_LEVEL_MAX) as i32
            ))
            .ok()?;
            z.compress2(&mut s.out[..], &s.page[..]).ok()?
        }
    };
    if len_bytes == 0 || len_bytes >= fits_below {
        return None;
    }
    decompress(&s.out[..len_bytes], &mut s.check).ok()?;
    (s.check[..] == s.page[..]).then_some(len_bytes)
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

thread_local! {
    /// Each monitor thread's zstd decompression context (allocated once per thread).
    static DECODER: std::cell::RefCell<OwnedPageDecoder> =
        std::cell::RefCell::new(OwnedPageDecoder::new());
}

/// Decompresses one payload (lz4 block or zstd frame) into `out`; `Err(detail)` unless it
/// yields exactly one page.
pub(crate) fn decompress(payload: &[u8], out: &mut [u8; PAGE_SIZE]) -> Result<(), String> {
    let zstd = payload.starts_with(&ZSTD_MAGIC);
    if DECODER.with(|d| d.borrow_mut().decode_payload(false, payload, out)) {
        return Ok(());
    }
    Err(format!(
        "the {} payload of {} bytes does not decompress to one page",
        if zstd { "zstd" } else { "lz4" },
        payload.len()
    ))
}

/// A [`PageDecoder`] with its own workspace on the heap, for threads that may allocate (the
/// monitor's, tests).
pub struct OwnedPageDecoder {
    // Declared before the workspace: dropped first, while the workspace still exists.
    decoder: PageDecoder<'static>,
    workspace: std::ptr::NonNull<[u64]>,
}

impl OwnedPageDecoder {
    pub fn new() -> OwnedPageDecoder {
        let words = vec![0u64; DECODER_WORKSPACE_BYTES / 8].into_boxed_slice();
        let workspace = std::ptr::NonNull::from(Box::leak(words));
        // SAFETY: the leaked box is ours until `drop` reclaims it, after the decoder (field
        // order); no other reference to it is made.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(workspace.as_ptr().cast::<u8>(), DECODER_WORKSPACE_BYTES)
        };
        let decoder = PageDecoder::new(bytes).expect("a u64 workspace of the declared size");
        OwnedPageDecoder { decoder, workspace }
    }

    /// [`PageDecoder::decode_payload`]. (The decoder itself is not lent out: it borrows the
    /// workspace as `'static`, and one swapped out of here would outlive it.)
    pub fn decode_payload(&mut self, raw: bool, payload: &[u8], out: &mut [u8; PAGE_SIZE]) -> bool {
        self.decoder.decode_payload(raw, payload, out)
    }

    /// [`PageDecoder::decode_page`].
    pub fn decode_page(
        &mut self,
        page: &crate::protocol::store_layout::StoredPage<'_>,
        out: &mut [u8; PAGE_SIZE],
    ) -> bool {
        self.decoder.decode_page(page, out)
    }
}

impl Default for OwnedPageDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for OwnedPageDecoder {
    fn drop(&mut self) {
        // SAFETY: made by Box::leak in `new`; the decoder that used it holds no resource of
        // its own (a static context is never freed) and is not used after this.
        drop(unsafe { Box::from_raw(self.workspace.as_ptr()) });
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

    const CODECS: [Recompress; 2] = [Recompress::Lz4hc(9), Recompress::Zstd(3)];

    /// Either codec: a shorter payload that the readers' decoder turns back into the page;
    /// zstd's output is a frame (its magic first), lz4hc's an lz4 block.
    #[test]
    fn recompress_is_shorter_and_decodes_to_the_same_page() {
        let page = text_page(1);
        let fast = fast_payload(&page);
        let mut s = RecompressScratch::new();
        let mut lens = Vec::new();
        for codec in CODECS {
            let len = recompress(&fast, codec, fast.len(), &mut s)
                .unwrap_or_else(|| panic!("{codec:?} beats lz4 on text"));
            assert!(len < fast.len(), "{codec:?}: {len} >= {}", fast.len());
            let out = &s.out[..len];
            assert_eq!(
                out.starts_with(&ZSTD_MAGIC),
                matches!(codec, Recompress::Zstd(_))
            );
            let mut back = [0u8; PAGE_SIZE];
            decompress(out, &mut back).expect("decodes");
            assert_eq!(back, page);
            // The shim's decoder, over a workspace it owns, reads it the same.
            let mut ws = vec![0u64; DECODER_WORKSPACE_BYTES / 8];
            // SAFETY: a u64 buffer viewed as bytes, borrowed by the decoder only.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(
                    ws.as_mut_ptr().cast::<u8>(),
                    DECODER_WORKSPACE_BYTES,
                )
            };
            let mut back2 = [0u8; PAGE_SIZE];
            assert!(PageDecoder::new(bytes)
                .unwrap()
                .decode_payload(false, out, &mut back2));
            assert_eq!(back2, page);
            lens.push(len);
            // A zstd frame recompresses again (it decodes first), into nothing shorter.
            let again = out.to_vec();
            assert_eq!(recompress(&again, codec, len, &mut s), None);
        }
        assert!(
            lens[1] < lens[0],
            "zstd {} not below lz4hc {}",
            lens[1],
            lens[0]
        );
    }

    #[test]
    fn recompress_gives_up_below_the_bound() {
        let page = text_page(1);
        let fast = fast_payload(&page);
        let mut s = RecompressScratch::new();
        for codec in CODECS {
            // No encoder gets a page of text into 16 bytes.
            assert_eq!(recompress(&fast, codec, 16, &mut s), None);
            assert_eq!(recompress(&fast, codec, 0, &mut s), None);
            // A payload that does not decode is left alone.
            assert_eq!(
                recompress(&fast[..fast.len() / 2], codec, 4096, &mut s),
                None
            );
        }
        assert_eq!(recompress(&fast, Recompress::Off, 4096, &mut s), None);
        // Giving up leaves the scratch (and zstd's context) usable: the next blob shrinks.
        for codec in CODECS {
            assert_eq!(recompress(&fast, codec, 64, &mut s), None);
            assert!(
                recompress(&fast, codec, fast.len(), &mut s).is_some(),
                "{codec:?} after a blob that did not fit"
            );
        }
    }

    /// A decoder refuses a workspace that is too small or misaligned, and a zstd frame that
    /// is cut short, corrupt, or does not make exactly one page.
    #[test]
    fn decoder_refuses_bad_workspaces_and_bad_frames() {
        let mut ws = vec![0u64; DECODER_WORKSPACE_BYTES / 8 + 1];
        // SAFETY: a u64 buffer viewed as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                ws.as_mut_ptr().cast::<u8>(),
                DECODER_WORKSPACE_BYTES + 8,
            )
        };
        assert!(PageDecoder::new(&mut bytes[..DECODER_WORKSPACE_BYTES - 8]).is_none());
        assert!(PageDecoder::new(&mut bytes[1..DECODER_WORKSPACE_BYTES + 1]).is_none());
        let mut d = PageDecoder::new(&mut bytes[..DECODER_WORKSPACE_BYTES]).unwrap();
        let page = text_page(2);
        let mut s = RecompressScratch::new();
        let len = recompress(&fast_payload(&page), Recompress::Zstd(3), 4096, &mut s).unwrap();
        let frame = s.out[..len].to_vec();
        let mut out = [0u8; PAGE_SIZE];
        assert!(d.decode_payload(false, &frame, &mut out));
        assert_eq!(out, page);
        assert!(
            !d.decode_payload(false, &frame[..len - 1], &mut out),
            "cut short"
        );
        let mut bad = frame.clone();
        bad[len / 2] ^= 0x55;
        let mut back = [0u8; PAGE_SIZE];
        // A flipped byte either fails to decode or (no checksum) decodes to other bytes; the
        // recompressor compares before it keeps anything, so only the first matters here.
        if d.decode_payload(false, &bad, &mut back) {
            assert_ne!(back, page);
        }
        // A frame of half a page is not a page.
        let half = zstd_safe::compress(&mut vec![0u8; 4096][..], &page[..2048], 3).unwrap();
        let mut z = vec![0u8; 4096];
        let n = zstd_safe::compress(&mut z[..], &page[..2048], 3).unwrap();
        assert_eq!(n, half);
        assert!(!d.decode_payload(false, &z[..n], &mut out));
        assert!(decompress(&z[..n], &mut out).unwrap_err().contains("zstd"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        /// Hostile payloads (a store file is shared memory a program could scribble on):
        /// bytes after the zstd magic, a real frame with bytes flipped, or any bytes read as
        /// an lz4 block, never crash a decoder.
        #[test]
        fn hostile_payloads_are_refused_or_decode_to_a_page(
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            flips in proptest::collection::vec((0usize..4096, 1u8..=255), 1..4),
            seed in 0u64..64,
        ) {
            let mut out = [0u8; PAGE_SIZE];
            let mut framed = ZSTD_MAGIC.to_vec();
            framed.extend_from_slice(&tail);
            let _ = decompress(&framed, &mut out);
            let _ = decompress(&tail, &mut out);
            let page = text_page(seed);
            let mut s = RecompressScratch::new();
            let len = recompress(&fast_payload(&page), Recompress::Zstd(3), 4096, &mut s).unwrap();
            let mut frame = s.out[..len].to_vec();
            proptest::prop_assert!(decompress(&frame, &mut out).is_ok() && out == page);
            for (at, x) in flips {
                let at = at % len;
                frame[at] ^= x;
            }
            // No checksum: a flip in a literal may decode to other bytes, which nothing relies
            // on (recompression compares its output before keeping it); it must not crash.
            let _ = decompress(&frame, &mut out);
        }
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
