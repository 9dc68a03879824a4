//! Tests of the store as a whole: round trips, interleavings against a model, quota.
//!
//! Owns: nothing but test code. Must not touch: anything outside `store`.

use super::slab::{slots_per_chunk, RAW_CLASS_IDX};
use super::*;
use crate::protocol::store_layout::StoreView;
use crate::store::OwnedPageDecoder;
use proptest::prelude::*;
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;

type Page = Box<[u8; PAGE_SIZE]>;

fn page_from(bytes: &[u8]) -> Page {
    let mut p: Page = Box::new([0u8; PAGE_SIZE]);
    p.copy_from_slice(bytes);
    p
}

/// xorshift64*: deterministic pseudo-random numbers for page generators.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A durable store (a store file, as the monitor makes for every client) with no quota.
fn durable_store() -> Store {
    Store::try_new(StoreConfig {
        durable: true,
        max_bytes: None,
        disk: None,
    })
    .unwrap()
}

/// A low-entropy, text-like page (words from a small vocabulary).
fn text_page(seed: u64) -> Page {
    const WORDS: [&str; 12] = [
        "the ", "page ", "store ", "monitor ", "cold ", "fault ", "uswap ", "lz4 ", "slab ", "\n",
        "id=", "0123 ",
    ];
    let mut rng = Rng(seed | 1);
    let mut p: Page = Box::new([0u8; PAGE_SIZE]);
    let mut pos = 0;
    while pos < PAGE_SIZE {
        let w = WORDS[(rng.next() % WORDS.len() as u64) as usize].as_bytes();
        let n = w.len().min(PAGE_SIZE - pos);
        p[pos..pos + n].copy_from_slice(&w[..n]);
        pos += n;
    }
    p
}

/// `n` pages, text (compressible) at even indices and random (incompressible) at odd ones.
fn text_and_random_pages(n: u64) -> Vec<Page> {
    (0..n)
        .map(|i| {
            if i % 2 == 0 {
                text_page(i)
            } else {
                random_page(i)
            }
        })
        .collect()
}

fn random_page(seed: u64) -> Page {
    let mut rng = Rng(seed | 1);
    let mut p: Page = Box::new([0u8; PAGE_SIZE]);
    for w in p.chunks_exact_mut(8) {
        w.copy_from_slice(&rng.next().to_ne_bytes());
    }
    p
}

fn filled_page(word: u64) -> Page {
    let mut p: Page = Box::new([0u8; PAGE_SIZE]);
    encode::fill_word(&mut p, word);
    p
}

/// A page of one of several shapes, chosen by `shape`.
fn page_of_shape(shape: u8, seed: u64) -> Page {
    match shape % 5 {
        0 => filled_page(0),
        1 => filled_page(seed % 4), // few distinct words: shares table entries
        2 => text_page(seed),
        3 => random_page(seed),
        _ => {
            // Partly zero: random head, zero tail of varying length (many lz4 classes).
            let mut p = random_page(seed);
            let keep = (seed % PAGE_SIZE as u64) as usize;
            p[keep..].fill(0);
            p
        }
    }
}

fn arb_page() -> impl Strategy<Value = Page> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), PAGE_SIZE).prop_map(|v| page_from(&v)),
        any::<u64>().prop_map(filled_page),
        (
            prop::collection::vec(any::<u8>(), PAGE_SIZE),
            0..PAGE_SIZE,
            0..PAGE_SIZE
        )
            .prop_map(|(v, start, len)| {
                let mut p = page_from(&v);
                let end = (start + len).min(PAGE_SIZE);
                p[start..end].fill(0);
                p
            }),
        any::<u64>().prop_map(text_page),
        (any::<u8>(), any::<u64>()).prop_map(|(s, seed)| page_of_shape(s, seed)),
    ]
}

fn read_back(store: &Store, h: Handle) -> Page {
    let mut out: Page = Box::new([0xAAu8; PAGE_SIZE]);
    store.get(h, &mut out).expect("live handle reads back");
    out
}

/// Checks the store's stats against the live pages of a model.
fn check_against_model(store: &Store, model: &HashMap<u64, (Handle, Page)>) {
    let stats = store.stats();
    let mut want_kinds = [0u64; 3];
    let mut want_bytes_out = 0u64;
    for (h, page) in model.values() {
        assert_eq!(&read_back(store, *h), page, "{h:?}");
        match h.kind() {
            PageKind::SameFilled => want_kinds[0] += 1,
            PageKind::Lz4 => want_kinds[1] += 1,
            PageKind::Raw => want_kinds[2] += 1,
        }
        if h.kind() != PageKind::SameFilled {
            want_bytes_out += u64::from(match h.decode() {
                Some(handle::Decoded::Blob(loc)) => loc.len_bytes,
                other => panic!("blob kind with {other:?}"),
            });
        }
    }
    assert_eq!(
        [stats.pages_same_filled, stats.pages_lz4, stats.pages_raw],
        want_kinds
    );
    assert_eq!(store.stored_pages(), model.len() as u64);
    assert_eq!(stats.pages(), model.len() as u64);
    assert_eq!(stats.bytes_in, model.len() as u64 * PAGE_SIZE as u64);
    assert_eq!(stats.bytes_out, want_bytes_out);
    assert_eq!(stats.slab_bytes_used, want_bytes_out);
    assert!(stats.slab_bytes_used <= stats.slab_bytes_slots);
    assert!(stats.slab_bytes_slots <= stats.slab_bytes_mapped);
    assert_eq!(stats.slab_bytes_mapped, stats.chunks * CHUNK_BYTES as u64);
    assert!((0.0..=1.0).contains(&stats.fragmentation));
    store.slabs.check_invariants();
}

/// Compacts `store` (every blob movable), at most `max_moves` moves, and renames the moved
/// pages in `model`; checks that each move named a page of the model by its handle.
fn compact_model(store: &mut Store, model: &mut HashMap<u64, (Handle, Page)>, max_moves: usize) {
    let by_handle: HashMap<Handle, u64> = model.iter().map(|(k, (h, _))| (*h, *k)).collect();
    let c = store.compact(
        0,
        max_moves,
        &mut |_, h| {
            assert!(by_handle.contains_key(&h), "asked about a live handle");
            true
        },
        &mut |_| {},
    );
    assert!(c.moves.len() <= max_moves);
    for (_, old, new) in c.moves {
        assert_ne!(old, new);
        let key = by_handle[&old];
        model.get_mut(&key).unwrap().0 = new;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn put_get_arbitrary_page_round_trips(page in arb_page()) {
        let mut store = Store::new(StoreConfig::default());
        let h = store.put(&page, 0x1000).unwrap();
        prop_assert!(h.to_bits() < 1 << 61);
        prop_assert_eq!(&read_back(&store, h), &page);
        let want_kind = if same_filled_word(&page).is_some() {
            PageKind::SameFilled
        } else {
            h.kind()
        };
        prop_assert_eq!(h.kind(), want_kind);
        prop_assert_eq!(store.stored_pages(), 1);
        // The handle survives a round trip through its bits.
        prop_assert_eq!(&read_back(&store, Handle::from_bits(h.to_bits())), &page);
        store.remove(h);
        prop_assert_eq!(store.stored_pages(), 0);
        prop_assert_eq!(store.stats().slab_bytes_mapped, 0);
    }

    #[test]
    fn insert_remove_interleaving_matches_model(
        ops in prop::collection::vec((any::<bool>(), any::<u8>(), any::<u64>()), 1..400)
    ) {
        let mut store = Store::new(StoreConfig::default());
        let mut model: HashMap<u64, (Handle, Page)> = HashMap::new();
        let mut next_key = 0u64;
        let mut scratch = Vec::new();
        for (i, (insert, shape, seed)) in ops.into_iter().enumerate() {
            if insert || model.is_empty() {
                let page = page_of_shape(shape, seed);
                let enc = encode(&page, &mut scratch);
                let h = store.insert(enc, &page, 0x1000).unwrap();
                model.insert(next_key, (h, page));
                next_key += 1;
            } else if seed % 11 == 0 {
                compact_model(&mut store, &mut model, 1 + (seed >> 8) as usize % 64);
            } else if seed % 13 == 0 {
                let before = store.slack_bytes();
                let pages = store.punch_slack(1 + (seed >> 8) as usize % 8);
                prop_assert_eq!(store.slack_bytes() + pages * PAGE_SIZE as u64, before);
            } else {
                let keys: Vec<u64> = model.keys().copied().collect();
                let key = keys[(seed % keys.len() as u64) as usize];
                let (h, page) = model.remove(&key).unwrap();
                prop_assert_eq!(&read_back(&store, h), &page);
                store.remove(h);
            }
            if i % 37 == 0 {
                check_against_model(&store, &model);
            }
        }
        check_against_model(&store, &model);
        for (h, _) in model.into_values() {
            store.remove(h);
        }
        let stats = store.stats();
        prop_assert_eq!(stats.pages(), 0);
        prop_assert_eq!(stats.chunks, 0, "empty chunks must be unmapped");
        prop_assert_eq!(stats.slab_bytes_mapped, 0);
        prop_assert_eq!(stats.slab_bytes_slots, 0);
        prop_assert_eq!(stats.bytes_out, 0);
        prop_assert_eq!(stats.fill_words, 0);
        store.slabs.check_invariants();
    }
}

#[test]
fn store_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<Store>();
}

#[test]
fn put_zero_page_uses_no_slab_or_word_entry() {
    let mut store = Store::new(StoreConfig::default());
    let h = store.put(&filled_page(0), 0x1000).unwrap();
    assert_eq!(h, Handle::ZERO_PAGE);
    let stats = store.stats();
    assert_eq!((stats.pages_same_filled, stats.pages_zero), (1, 1));
    assert_eq!((stats.chunks, stats.fill_words), (0, 0));
}

#[test]
fn put_same_word_pages_share_one_table_entry() {
    let mut store = Store::new(StoreConfig::default());
    let page = filled_page(0x0101_0101_0101_0101);
    let a = store.put(&page, 0x1000).unwrap();
    let b = store.put(&page, 0x1000).unwrap();
    assert_eq!(a, b);
    assert_eq!(store.stats().fill_words, 1);
    store.remove(a);
    assert_eq!(
        &read_back(&store, b),
        &page,
        "second reference keeps the word"
    );
    store.remove(b);
    assert_eq!(store.stats().fill_words, 0);
    assert!(matches!(
        store.get(b, &mut filled_page(0)),
        Err(StoreError::CorruptHandle { .. })
    ));
}

#[test]
fn remove_then_put_reuses_slot_memory() {
    let mut store = Store::new(StoreConfig::default());
    let pages: Vec<Page> = (0..300).map(|i| text_page(i + 1)).collect();
    let handles: Vec<Handle> = pages
        .iter()
        .map(|p| store.put(p, 0x1000).unwrap())
        .collect();
    let mapped_full = store.stats().slab_bytes_mapped;
    assert!(mapped_full > 0);
    // Remove every other page, then put as many new ones: no new chunk is needed.
    let mut live = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        if i % 2 == 0 {
            store.remove(h);
        } else {
            live.push((h, i));
        }
    }
    // The same contents again (so the same size classes), at other addresses.
    for i in (0..300).step_by(2) {
        store
            .put(&pages[i], 0x1000_0000 + i as u64 * 0x1000)
            .unwrap();
    }
    assert!(
        store.stats().slab_bytes_mapped <= mapped_full,
        "freed slots must be reused before mapping more"
    );
    for (h, i) in live {
        assert_eq!(read_back(&store, h), pages[i]);
    }
}

#[test]
fn remove_all_raw_pages_releases_every_chunk() {
    let mut store = Store::new(StoreConfig::default());
    let per_chunk = slots_per_chunk(RAW_CLASS_IDX);
    let handles: Vec<Handle> = (0..per_chunk as u64 * 3 + 1)
        .map(|i| store.put(&random_page(i + 7), 0x1000).unwrap())
        .collect();
    assert!(handles.iter().all(|h| h.kind() == PageKind::Raw));
    assert_eq!(store.stats().chunks, 4);
    let meta_full = store.metadata_bytes();
    // Emptying the first chunk's slots releases exactly one chunk.
    for h in &handles[..per_chunk] {
        store.remove(*h);
    }
    assert_eq!(store.stats().chunks, 3);
    for h in &handles[per_chunk..] {
        store.remove(*h);
    }
    let stats = store.stats();
    assert_eq!(stats.chunks, 0);
    assert_eq!(stats.slab_bytes_mapped, 0);
    assert_eq!(stats.fragmentation, 0.0);
    assert!(store.metadata_bytes() < meta_full, "bitmaps are freed too");
}

#[test]
fn quota_exceeded_full_and_nothing_lost() {
    let max_bytes = 2 * CHUNK_BYTES as u64;
    let mut store = Store::new(StoreConfig {
        max_bytes: Some(max_bytes),
        disk: None,
        ..Default::default()
    });
    let per_chunk = slots_per_chunk(RAW_CLASS_IDX) as u64;
    let mut handles = Vec::new();
    let mut seed = 1;
    let refused = loop {
        match store.put(&random_page(seed), 0x1000) {
            Ok(h) => handles.push((h, seed)),
            Err(e) => break e,
        }
        seed += 1;
        assert!(seed < 10_000, "quota never enforced");
    };
    assert!(matches!(refused, StoreError::Full), "{refused:?}");
    assert_eq!(handles.len() as u64, 2 * per_chunk);
    let stats = store.stats();
    assert!(stats.slab_bytes_mapped <= max_bytes);
    assert_eq!(stats.inserts_refused_full, 1);
    assert_eq!(store.stored_pages(), 2 * per_chunk);
    // Same-filled pages take no slab space and are still accepted.
    let z = store.put(&filled_page(5), 0x1000).unwrap();
    // A different class needs a new chunk: refused too.
    assert!(matches!(
        store.put(&text_page(3), 0x1000),
        Err(StoreError::Full)
    ));
    // Every stored page is intact.
    for (h, seed) in &handles {
        assert_eq!(read_back(&store, *h), random_page(*seed));
    }
    // Freeing one slot makes room again in the same class.
    let (h0, _) = handles.swap_remove(0);
    store.remove(h0);
    store.put(&random_page(seed), 0x1000).unwrap();
    store.remove(z);
}

#[test]
fn get_forged_handles_corrupt_not_panic() {
    let mut store = Store::new(StoreConfig::default());
    let text = text_page(9);
    let h = store.put(&text, 0x1000).unwrap();
    assert_eq!(h.kind(), PageKind::Lz4);
    let mut out = filled_page(0);
    let Some(handle::Decoded::Blob(loc)) = h.decode() else {
        panic!("lz4 handle is a blob")
    };
    let forged = [
        Handle::from_bits(h.to_bits() | 1 << 62),
        // Wrong chunk, wrong slot, wrong class.
        Handle::blob(handle::BlobLoc {
            chunk_idx: loc.chunk_idx + 1,
            ..loc
        }),
        Handle::blob(handle::BlobLoc {
            slot_idx: loc.slot_idx + 1,
            ..loc
        }),
        Handle::blob(handle::BlobLoc {
            class_idx: RAW_CLASS_IDX,
            len_bytes: PAGE_SIZE as u32,
            ..loc
        }),
        // Length outside the class.
        Handle::blob(handle::BlobLoc {
            len_bytes: loc.len_bytes + 64,
            ..loc
        }),
        // Unknown fill word.
        Handle::from_bits(17),
    ];
    for f in forged {
        assert!(
            matches!(
                store.get(f, &mut out),
                Err(StoreError::CorruptHandle { .. })
            ),
            "{f:?}"
        );
        assert!(store.try_remove(f).is_err(), "{f:?}");
    }
    // Same class, shorter length: the payload is cut and cannot decompress to a page.
    let short = Handle::blob(handle::BlobLoc {
        len_bytes: (loc.len_bytes - 1).max(1),
        ..loc
    });
    if short != h {
        assert!(matches!(
            store.get(short, &mut out),
            Err(StoreError::DecompressFailed { .. })
        ));
    }
    // Nothing was disturbed.
    assert_eq!(read_back(&store, h), text);
    store.try_remove(h).unwrap();
    assert!(matches!(
        store.try_remove(h),
        Err(StoreError::CorruptHandle { .. })
    ));
}

#[test]
fn insert_lz4_payload_too_long_kept_raw() {
    let mut store = Store::new(StoreConfig::default());
    let page = random_page(3);
    let bogus = vec![0u8; LZ4_MAX_LEN_BYTES + 1];
    let h = store.insert(Encoded::Lz4(&bogus), &page, 0x1000).unwrap();
    assert_eq!(h.kind(), PageKind::Raw);
    assert_eq!(read_back(&store, h), page);
}

#[test]
fn metadata_per_page_mixed_10k_pages_at_most_16_bytes() {
    let mut store = Store::new(StoreConfig::default());
    let mut rng = Rng(42);
    for _ in 0..10_000 {
        let r = rng.next();
        store
            .put(&page_of_shape((r % 5) as u8, r >> 8), 0x1000)
            .unwrap();
    }
    let pages = store.stored_pages();
    let per_page = (8 * pages + store.metadata_bytes()) as f64 / pages as f64;
    assert!(per_page <= 16.0, "metadata per page {per_page:.2} bytes");
}

/// Everything a reader of the store file (the shim after the monitor died) finds: address ->
/// page contents, decoded through the layout's own decoder.
fn read_store_file(store: &Store) -> HashMap<u64, Page> {
    read_store_file_of(store, None)
}

/// [`read_store_file`] as the shim of family member `member` reads it (only its records);
/// `None` reads every record.
fn read_store_file_of(store: &Store, member: Option<u8>) -> HashMap<u64, Page> {
    use std::os::fd::AsRawFd;
    let file = store.file().expect("durable");
    let len = file.metadata().unwrap().len() as usize;
    // SAFETY: a new read-write shared mapping of the store file, unmapped below.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED);
    let mut found = HashMap::new();
    {
        // SAFETY: the mapping above, `len` bytes; the store is not written meanwhile.
        let view = unsafe { StoreView::new(base.cast(), len) }.expect("valid header");
        view.for_each_page(|p| {
            assert_ne!(p.owners, 0, "a record always has an owner");
            if member.is_some_and(|m| p.owners & (1 << m) == 0) {
                return;
            }
            let mut out: Page = Box::new([0u8; PAGE_SIZE]);
            assert!(
                OwnedPageDecoder::new().decode_page(&p, &mut out),
                "page at {:#x} decodes",
                p.addr
            );
            assert!(found.insert(p.addr, out).is_none(), "one record per page");
        });
    }
    // SAFETY: unmapping the mapping made above; the view is gone.
    unsafe { libc::munmap(base, len) };
    found
}

#[test]
fn durable_store_file_names_every_nonzero_page_and_follows_moves() {
    let mut store = durable_store();
    let base = 0x7f00_0000_0000u64;
    let at = |i: u64| base + i * PAGE_SIZE as u64;
    let mut want = HashMap::new();
    let mut handles = Vec::new();
    for i in 0..300u64 {
        let page = match i % 4 {
            0 => text_page(i),
            1 => random_page(i),
            2 => filled_page(0xdead_beef_0000_0000 | i),
            _ => filled_page(0),
        };
        handles.push(store.put(&page, at(i)).unwrap());
        if i % 4 != 3 {
            want.insert(at(i), page);
        }
    }
    assert_eq!(
        read_store_file(&store),
        want,
        "zero pages have no record, others do"
    );

    // The program moves pages 0..10 to a new address; pages 10..20 go back to it.
    for i in 0..10u64 {
        store
            .set_addr(handles[i as usize], at(i) + (1 << 30))
            .unwrap();
        if let Some(page) = want.remove(&at(i)) {
            want.insert(at(i) + (1 << 30), page);
        }
    }
    for i in 10..20u64 {
        store.remove(handles[i as usize]);
        want.remove(&at(i));
    }
    assert_eq!(read_store_file(&store), want);

    // Everything out: every chunk is released and the file holds nothing.
    for (i, h) in handles.iter().enumerate() {
        if !(10..20).contains(&i) {
            store.remove(*h);
        }
    }
    assert_eq!(store.stats().chunks, 0);
    assert!(read_store_file(&store).is_empty());
}

/// A fork: the parent's stored pages become the child's too without a copy; each side then
/// drops or moves its own, and the store file tells each member's shim exactly its pages.
#[test]
fn fork_family_shares_pages_copy_on_write() {
    let mut store = durable_store();
    let at = |i: u64| 0x5500_0000_0000u64 + i * PAGE_SIZE as u64;
    let pages = text_and_random_pages(64);
    let handles: Vec<Handle> = pages
        .iter()
        .enumerate()
        .map(|(i, p)| store.put(p, at(i as u64)).unwrap())
        .collect();
    let bytes_before = store.stats().bytes_out;
    let child = store.join_member().unwrap();
    assert_eq!(child, 1);
    for h in &handles {
        store.share(*h, child).unwrap();
    }
    assert!(store.share(handles[0], child).is_err(), "shared twice");
    assert_eq!(
        store.stats().bytes_out,
        bytes_before,
        "sharing copies nothing"
    );
    assert_eq!(store.stats().shared_refs, 64);
    let all: HashMap<u64, Page> = (0..64u64)
        .map(|i| (at(i), pages[i as usize].clone()))
        .collect();
    assert_eq!(read_store_file_of(&store, Some(0)), all);
    assert_eq!(read_store_file_of(&store, Some(child)), all);

    // The parent faults pages 0..16 back: the child still has them.
    for h in &handles[..16] {
        store.try_remove_as(0, *h).unwrap();
    }
    assert!(
        store.try_remove_as(0, handles[0]).is_err(),
        "not the parent's any more"
    );
    let mut out: Page = Box::new([0u8; PAGE_SIZE]);
    store.get(handles[3], &mut out).unwrap();
    assert_eq!(out, pages[3]);
    let parent_view = read_store_file_of(&store, Some(0));
    assert_eq!(parent_view.len(), 48);
    assert_eq!(read_store_file_of(&store, Some(child)), all);

    // The child moves page 20 (mremap): it gets a copy of its own; the parent's stays put.
    let moved = store.set_addr_as(child, handles[20], at(1000)).unwrap();
    assert_ne!(moved, handles[20]);
    assert_eq!(store.stats().shared_copies, 1);
    store.get(moved, &mut out).unwrap();
    assert_eq!(out, pages[20]);
    let child_view = read_store_file_of(&store, Some(child));
    assert_eq!(child_view.get(&at(1000)), Some(&pages[20]));
    assert!(!child_view.contains_key(&at(20)));
    assert_eq!(
        read_store_file_of(&store, Some(0)).get(&at(20)),
        Some(&pages[20])
    );
    // The parent, sole owner now, moves its page 30 in place.
    store.try_remove_as(child, handles[30]).unwrap();
    assert_eq!(
        store.set_addr_as(0, handles[30], at(2000)).unwrap(),
        handles[30]
    );

    // Both go: every slot is freed once, and the file is empty.
    for (i, h) in handles.iter().enumerate() {
        if i >= 16 {
            store.try_remove_as(0, *h).unwrap();
        }
        if i != 20 && i != 30 {
            store.try_remove_as(child, *h).unwrap();
        }
    }
    store.try_remove_as(child, moved).unwrap();
    store.leave_member(child);
    assert_eq!(store.stats().pages(), 0);
    assert_eq!(store.stats().chunks, 0);
    assert_eq!(store.stats().shared_refs, 0);
    assert!(read_store_file(&store).is_empty());
}

/// At most 16 members share a store; a freed index is reused.
#[test]
fn fork_family_member_indices() {
    let mut store = Store::new(StoreConfig::default());
    let got: Vec<u8> = (0..15).map(|_| store.join_member().unwrap()).collect();
    assert_eq!(got, (1..16).collect::<Vec<u8>>());
    assert_eq!(store.join_member(), None);
    store.leave_member(7);
    assert_eq!(store.join_member(), Some(7));
    assert_eq!(store.member_count(), 16);
}

/// A page above what a record can name is refused, not stored wrongly.
#[test]
fn address_above_record_limit_is_refused() {
    let mut store = durable_store();
    let p = text_page(1);
    assert!(matches!(store.put(&p, 1 << 48), Err(StoreError::Full)));
    assert_eq!(store.stats().pages(), 0);
}

// ---- disk tier ----

/// A durable store with a disk tier in a new temporary directory (kept alive by the caller).
fn disk_store(max_bytes: Option<u64>, max_disk: Option<u64>) -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::try_new(StoreConfig {
        durable: true,
        max_bytes,
        disk: Some(DiskConfig {
            dir: dir.path().to_path_buf(),
            max_bytes: max_disk,
        }),
    })
    .unwrap();
    (store, dir)
}

/// Moves every page of `pages` (address, handle) to the disk tier as the monitor does:
/// begin, write the buffer with plain `pwrite`, commit. Returns the new handles.
fn demote(store: &mut Store, member: u8, pages: &[(u64, Handle)]) -> Vec<Option<Handle>> {
    use std::os::unix::fs::FileExt;
    let mut buf = Vec::new();
    let ds: Vec<Option<Demotion>> = pages
        .iter()
        .map(|&(a, h)| store.begin_demote(member, h, a, &mut buf).unwrap())
        .collect();
    let file = store.disk_file().unwrap().try_clone().unwrap();
    for d in ds.iter().flatten() {
        let range = d.buf_off..d.buf_off + d.len_bytes as usize;
        file.write_all_at(&buf[range], d.disk_off).unwrap();
    }
    ds.iter()
        .map(|d| d.and_then(|d| store.commit_demote(&d).then_some(d.new)))
        .collect()
}

#[test]
fn demoted_pages_read_back_exactly_and_free_their_slots() {
    let (mut store, _dir) = disk_store(None, None);
    let at = |i: u64| 0x6000_0000_0000u64 + i * PAGE_SIZE as u64;
    let pages: Vec<Page> = (0..600u64)
        .map(|i| match i % 3 {
            0 => text_page(i),
            1 => random_page(i),
            _ => filled_page(0x1234_5678_0000_0000 | i),
        })
        .collect();
    let stored: Vec<(u64, Handle)> = pages
        .iter()
        .enumerate()
        .map(|(i, p)| (at(i as u64), store.put(p, at(i as u64)).unwrap()))
        .collect();
    let mem_before = store.stats().slab_bytes_mapped;
    assert!(mem_before > 0);
    let moved = demote(&mut store, 0, &stored);
    assert!(moved.iter().all(Option::is_some), "every blob page moves");
    let st = store.stats();
    assert_eq!(st.pages_on_disk, 600);
    assert_eq!(st.pages_demoted, 600);
    assert_eq!(st.bytes_out, 0, "no payload left in memory");
    assert_eq!(st.slab_bytes_mapped, 0, "every memory chunk was released");
    assert!(st.disk_bytes_mapped > 0 && st.disk_bytes_used > 0);
    store.slabs.check_invariants();
    // Synchronous reads (pread) and the fault path's way (read, then decode) agree.
    let file = store.disk_file().unwrap().try_clone().unwrap();
    let epoch = store.disk_epoch();
    let mut out: Page = Box::new([0u8; PAGE_SIZE]);
    for (i, h) in moved.iter().enumerate() {
        let h = h.unwrap();
        store.get(h, &mut out).unwrap();
        assert_eq!(out, pages[i], "page {i} via pread");
        let r = store.disk_read(h).expect("on disk");
        let mut payload = vec![0u8; r.len_bytes as usize];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut payload, r.off).unwrap();
        out.fill(0);
        Store::decode_payload(h, &payload, &mut out).unwrap();
        assert_eq!(out, pages[i], "page {i} via its disk offset");
        assert_eq!(store.disk_read(stored[i].1), None, "the old handle is gone");
    }
    assert_eq!(store.stats().disk_sync_reads, 600);
    assert_eq!(store.disk_epoch(), epoch, "reads free nothing");
    // The store file names every page exactly once, at its address, with its disk offset.
    let mut seen = 0;
    with_view(&store, |view| {
        view.for_each_page(|p| {
            let i = ((p.addr - at(0)) / PAGE_SIZE as u64) as usize;
            assert!(p.disk_off.is_some() && p.payload.is_empty());
            assert_eq!(p.owners, 1);
            let mut payload = vec![0u8; p.len_bytes];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut payload, p.disk_off.unwrap())
                .unwrap();
            let mut out: Page = Box::new([0u8; PAGE_SIZE]);
            assert!(OwnedPageDecoder::new().decode_payload(p.raw, &payload, &mut out));
            assert_eq!(out, pages[i]);
            seen += 1;
        })
    });
    assert_eq!(seen, 600);
    // Pages out: each free moves the epoch; the last one gives the disk chunks back.
    for h in moved.iter().flatten() {
        store.try_remove(*h).unwrap();
    }
    assert_eq!(store.disk_epoch(), epoch + 600);
    let st = store.stats();
    assert_eq!(
        (st.pages(), st.pages_on_disk, st.disk_bytes_mapped),
        (0, 0, 0)
    );
    assert_eq!(st.disk_bytes_used, 0);
    store.slabs.check_invariants();
    with_view(&store, |view| {
        view.for_each_page(|p| panic!("record left at {:#x}", p.addr))
    });
}

/// A page freed (faulted back, discarded) while its payload was being written must not be
/// published, even when a new page took its slot with an identical record meanwhile.
#[test]
fn demotion_of_a_slot_freed_meanwhile_is_not_published() {
    let (mut store, _dir) = disk_store(None, None);
    let a = 0x7000_0000_0000u64;
    let old = random_page(1);
    let h = store.put(&old, a).unwrap();
    let mut buf = Vec::new();
    let d = store.begin_demote(0, h, a, &mut buf).unwrap().unwrap();
    assert_eq!(
        store.begin_demote(0, h, a, &mut buf).unwrap(),
        None,
        "one demotion at a time"
    );
    // Faulted back, rewritten, evicted again: a raw page of the same length in the same slot.
    store.try_remove(h).unwrap();
    let new = random_page(2);
    let h2 = store.put(&new, a).unwrap();
    assert_eq!(
        h2, h,
        "the same slot and length: an identical handle and record"
    );
    let epoch = store.disk_epoch();
    assert!(!store.commit_demote(&d));
    assert_eq!(
        store.disk_epoch(),
        epoch,
        "a reserved slot freed is no epoch"
    );
    let mut out: Page = Box::new([0u8; PAGE_SIZE]);
    store.get(h2, &mut out).unwrap();
    assert_eq!(out, new);
    let st = store.stats();
    assert_eq!((st.pages_on_disk, st.disk_bytes_mapped), (0, 0));
    store.slabs.check_invariants();
    // An aborted one leaves everything as it was, and the page can be demoted later.
    let d = store.begin_demote(0, h2, a, &mut buf).unwrap().unwrap();
    store.abort_demote(&d);
    assert_eq!(store.stats().disk_bytes_mapped, 0);
    assert!(demote(&mut store, 0, &[(a, h2)])[0].is_some());
    store.slabs.check_invariants();
}

/// Shared pages (fork) are not demoted; a page shared while its demotion was under way is
/// not published; a page moved meanwhile (its record names another address) is not either.
/// Disk pages themselves share and move like memory ones.
#[test]
fn demotion_respects_owners_and_moves() {
    let (mut store, _dir) = disk_store(None, None);
    let at = |i: u64| 0x4000_0000_0000u64 + i * PAGE_SIZE as u64;
    let pages: Vec<Page> = (0..4u64).map(text_page).collect();
    let hs: Vec<Handle> = (0..4)
        .map(|i| store.put(&pages[i], at(i as u64)).unwrap())
        .collect();
    let child = store.join_member().unwrap();
    store.share(hs[0], child).unwrap();
    let mut buf = Vec::new();
    assert_eq!(store.begin_demote(0, hs[0], at(0), &mut buf).unwrap(), None);
    assert_eq!(
        store.begin_demote(0, hs[1], at(9), &mut buf).unwrap(),
        None,
        "the record names another address"
    );
    let d1 = store
        .begin_demote(0, hs[1], at(1), &mut buf)
        .unwrap()
        .unwrap();
    let d2 = store
        .begin_demote(0, hs[2], at(2), &mut buf)
        .unwrap()
        .unwrap();
    store.share(hs[1], child).unwrap();
    store.set_addr(hs[2], at(20)).unwrap();
    assert!(!store.commit_demote(&d1));
    assert!(!store.commit_demote(&d2));
    // A disk page: shared at a fork, then moved by one member (it gets a memory copy of
    // its own), then dropped by both.
    let h3 = demote(&mut store, 0, &[(at(3), hs[3])])[0].unwrap();
    store.share(h3, child).unwrap();
    let moved = store.set_addr_as(child, h3, at(30)).unwrap();
    assert_ne!(moved, h3);
    assert_eq!(store.disk_read(moved), None, "the copy is in memory");
    let mut out: Page = Box::new([0u8; PAGE_SIZE]);
    store.get(moved, &mut out).unwrap();
    assert_eq!(out, pages[3]);
    store.set_addr(h3, at(31)).unwrap();
    with_view(&store, |view| {
        let mut addrs = Vec::new();
        view.for_each_page(|p| addrs.push((p.addr, p.owners, p.disk_off.is_some())));
        assert!(addrs.contains(&(at(31), 1, true)), "{addrs:x?}");
        assert!(addrs.contains(&(at(30), 2, false)), "{addrs:x?}");
    });
    store.try_remove(h3).unwrap();
    assert_eq!(store.stats().pages_on_disk, 0);
    store.slabs.check_invariants();
}

/// A shared page one member moves needs a copy of its own; with the memory quota full it
/// goes to the disk tier, written before its record is set.
#[test]
fn shared_page_moved_with_memory_full_gets_its_copy_on_disk() {
    let (mut store, _dir) = disk_store(Some(CHUNK_BYTES as u64), None);
    let at = |i: u64| 0x5000_0000_0000u64 + i * PAGE_SIZE as u64;
    // Raw pages fill the one chunk the quota allows.
    let hs: Vec<Handle> = (0..slots_per_chunk(RAW_CLASS_IDX) as u64)
        .map(|i| store.put(&random_page(i), at(i)).unwrap())
        .collect();
    assert!(matches!(
        store.put(&random_page(999), at(999)),
        Err(StoreError::Full)
    ));
    let child = store.join_member().unwrap();
    store.share(hs[3], child).unwrap();
    let moved = store.set_addr_as(child, hs[3], at(300)).unwrap();
    assert!(store.disk_read(moved).is_some(), "the copy is on disk");
    let mut out: Page = Box::new([0u8; PAGE_SIZE]);
    store.get(moved, &mut out).unwrap();
    assert_eq!(out, random_page(3));
    let st = store.stats();
    assert_eq!((st.pages_on_disk, st.shared_copies), (1, 1));
    with_view(&store, |view| {
        let mut found = Vec::new();
        view.for_each_page(|p| {
            if p.disk_off.is_some() {
                found.push((p.addr, p.owners));
            }
        });
        assert_eq!(found, vec![(at(300), 1 << child)]);
    });
    store.try_remove_as(child, moved).unwrap();
    assert_eq!(store.stats().disk_bytes_mapped, 0);
    store.slabs.check_invariants();
}

#[test]
fn disk_tier_full_refuses_and_changes_nothing() {
    let (mut store, _dir) = disk_store(None, Some(CHUNK_BYTES as u64));
    let at = |i: u64| 0x3000_0000_0000u64 + i * PAGE_SIZE as u64;
    // Raw pages: 64 fill one disk chunk.
    let stored: Vec<(u64, Handle)> = (0..70u64)
        .map(|i| (at(i), store.put(&random_page(i), at(i)).unwrap()))
        .collect();
    let mut buf = Vec::new();
    let mut ds = Vec::new();
    for &(a, h) in &stored {
        match store.begin_demote(0, h, a, &mut buf) {
            Ok(Some(d)) => ds.push(d),
            Err(StoreError::Full) => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(ds.len(), slots_per_chunk(RAW_CLASS_IDX));
    for d in &ds {
        store.abort_demote(d);
    }
    assert_eq!(store.stats().disk_bytes_mapped, 0);
    let mut out: Page = Box::new([0u8; PAGE_SIZE]);
    for (i, &(_, h)) in stored.iter().enumerate() {
        store.get(h, &mut out).unwrap();
        assert_eq!(out, random_page(i as u64));
    }
    store.slabs.check_invariants();
}

/// A store file with disk chunks: without its disk file it is refused (the program's guardian
/// then brings its pages home); with it, the adopted store finds every page (memory and disk
/// alike), reads each back exactly, keeps its disk tier (another demotion works) and gives an
/// emptied disk chunk back.
#[test]
fn adoption_of_a_store_with_disk_pages_needs_its_disk_file() {
    let (mut store, _dir) = disk_store(None, None);
    let at = |i: u64| 0x2000_0000_0000u64 + i * PAGE_SIZE as u64;
    let pages = text_and_random_pages(400);
    let stored: Vec<(u64, Handle)> = pages
        .iter()
        .enumerate()
        .map(|(i, p)| (at(i as u64), store.put(p, at(i as u64)).unwrap()))
        .collect();
    // The first 300 go to disk, the other 100 stay in memory.
    let moved = demote(&mut store, 0, &stored[..300]);
    assert!(moved.iter().all(Option::is_some));
    let file = || store.file().unwrap().try_clone().unwrap();
    let err = Store::adopt(file(), None, None).expect_err("refused without the disk file");
    assert!(err.contains("disk file was not handed over"), "{err}");

    let disk = DiskFile::adopt(store.disk_file().unwrap().try_clone().unwrap()).unwrap();
    let (mut adopted, found) = Store::adopt(file(), None, Some((disk, None))).unwrap();
    assert_eq!(found.len(), 400);
    let st = adopted.stats();
    assert_eq!(
        (st.pages_on_disk, st.disk_chunks > 0),
        (300, true),
        "{st:?}"
    );
    let mut on_disk = Vec::new();
    for (addr, owners, h) in found {
        assert_eq!(owners, 1);
        let i = ((addr - at(0)) / PAGE_SIZE as u64) as usize;
        assert_eq!(*read_back(&adopted, h), *pages[i], "page {i}");
        if i < 300 {
            on_disk.push(h);
        } else if i == 399 {
            // The tier is kept: a memory page of the adopted store goes to disk too.
            let new = demote(&mut adopted, 0, &[(addr, h)]);
            let new = new[0].expect("demoted");
            assert_eq!(*read_back(&adopted, new), *pages[i]);
        }
    }
    assert_eq!(adopted.stats().pages_on_disk, 301);
    // Every disk page leaves: its chunks go back (records and disk file).
    for h in on_disk {
        adopted.remove(h);
    }
    let st = adopted.stats();
    assert_eq!((st.pages_on_disk, st.disk_chunks), (1, 1), "{st:?}");
    adopted.slabs.check_invariants();
}

/// A disk file handed over for adoption must be an unlinked regular file open read-write:
/// a named file (someone's file the program could open) is refused.
#[test]
fn adoption_refuses_a_named_disk_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("named");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let err = DiskFile::adopt(f).expect_err("a named file");
    assert!(err.contains("still has a name"), "{err}");
    let ro = std::fs::File::open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let err = DiskFile::adopt(ro).expect_err("read-only");
    assert!(err.contains("reading and writing"), "{err}");
    let d = DiskFile::create(dir.path()).unwrap();
    let again = DiskFile::adopt(d.file().try_clone().unwrap()).unwrap();
    assert_eq!(again.dir(), dir.path());
}

/// Calls `f` with a view of the store file.
fn with_view(store: &Store, f: impl FnOnce(&StoreView)) {
    use std::os::fd::AsRawFd;
    let file = store.file().expect("durable");
    let len = file.metadata().unwrap().len() as usize;
    // SAFETY: a new read-write shared mapping of the store file, unmapped below.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED);
    {
        // SAFETY: the mapping above, `len` bytes; the store is not written meanwhile.
        let view = unsafe { StoreView::new(base.cast(), len) }.expect("valid header");
        f(&view);
    }
    // SAFETY: unmapping the mapping made above; the view is gone.
    unsafe { libc::munmap(base, len) };
}

/// Per size class, the chunks its blobs need at least.
fn min_chunks(store: &Store) -> u64 {
    store
        .slabs
        .class_usage()
        .iter()
        .enumerate()
        .map(|(c, &(_, used))| used.div_ceil(slots_per_chunk(c as u8) as u64))
        .sum()
}

/// Inserts the pages `range` (shapes 2..4 in turn, seeds `i * seed_mul`) at `at(i)`, each
/// also into `model`.
fn insert_pages(
    store: &mut Store,
    model: &mut HashMap<u64, (Handle, Page)>,
    at: impl Fn(u64) -> u64,
    range: std::ops::Range<u64>,
    seed_mul: u64,
) {
    let mut scratch = Vec::new();
    for i in range {
        let page = page_of_shape(2 + (i % 3) as u8, i * seed_mul);
        let enc = encode(&page, &mut scratch);
        let h = store.insert(enc, &page, at(i)).unwrap();
        model.insert(at(i), (h, page));
    }
}

/// The program faulted most of its pages back at random: compaction moves the rest into as
/// few chunks as their classes need, gives the others back (memory and file), and every page
/// reads back, through the store and through the store file a rescue would read.
#[test]
fn compaction_gives_back_sparse_chunks_and_every_page_reads_back() {
    let mut store = durable_store();
    let at = |i: u64| 0x6600_0000_0000u64 + i * PAGE_SIZE as u64;
    let mut model: HashMap<u64, (Handle, Page)> = HashMap::new();
    insert_pages(&mut store, &mut model, at, 0..6000, 7919);
    let mut rng = Rng(42);
    let keys: Vec<u64> = model.keys().copied().collect();
    for k in keys {
        if rng.next() % 10 < 7 {
            let (h, _) = model.remove(&k).unwrap();
            store.remove(h);
        }
    }
    let before = store.stats();
    let file_before = store.file().unwrap().metadata().unwrap().blocks();
    assert!(
        store.compactable_bytes() >= 8 * CHUNK_BYTES as u64,
        "the test makes the store sparse: {before:?}"
    );
    compact_model(&mut store, &mut model, usize::MAX);
    let after = store.stats();
    check_against_model(&store, &model);
    assert_eq!(store.compactable_bytes(), 0);
    assert_eq!(after.chunks, min_chunks(&store), "{after:?}");
    assert!(
        after.chunks * 3 < before.chunks * 2,
        "{before:?} -> {after:?}"
    );
    assert_eq!(after.compact_chunks_freed, before.chunks - after.chunks);
    assert!(after.compact_moves > 0);
    let file_after = store.file().unwrap().metadata().unwrap().blocks();
    assert!(
        file_after * 5 < file_before * 3,
        "the store file gives its memory back: {file_before} -> {file_after} blocks"
    );
    let want: HashMap<u64, Page> = model.iter().map(|(a, (_, p))| (*a, p.clone())).collect();
    assert_eq!(
        read_store_file(&store),
        want,
        "one record per page, at its address"
    );
    // A monitor adopting the file finds the same pages.
    let dup = store.file().unwrap().try_clone().unwrap();
    let (adopted, pages) = Store::adopt(dup, None, None).unwrap();
    assert_eq!(pages.len(), model.len());
    for (addr, owners, h) in pages {
        assert_eq!(owners, 1);
        assert_eq!(&read_back(&adopted, h), &model[&addr].1);
    }
}

/// The pages of `model` a reader of the store file finds (same-filled pages have no slot).
fn blob_pages(model: &HashMap<u64, (Handle, Page)>) -> HashMap<u64, Page> {
    model
        .iter()
        .filter(|(_, (h, _))| h.kind() != PageKind::SameFilled)
        .map(|(a, (_, p))| (*a, p.clone()))
        .collect()
}

/// Pages inside chunks that faults emptied (a run of neighbours removed, the chunk still
/// holding others) are slack; punching them gives their memory back, and every page stays
/// exactly readable, in the store and in the store file, before and after new pages take
/// the punched slots again.
#[test]
fn slack_pages_are_given_back_and_every_page_reads_back() {
    let mut store = durable_store();
    let at = |i: u64| 0x6700_0000_0000u64 + i * PAGE_SIZE as u64;
    let mut model: HashMap<u64, (Handle, Page)> = HashMap::new();
    insert_pages(&mut store, &mut model, at, 0..6000, 104_729);
    assert_eq!(store.slack_bytes(), 0, "a store only filled has no slack");
    // A sequential re-read: every page in the first half of each run of 64 comes back.
    for i in (0..6000u64).filter(|i| i % 64 < 32) {
        let (h, _) = model.remove(&at(i)).unwrap();
        store.remove(h);
    }
    let blocks = |s: &Store| s.file().unwrap().metadata().unwrap().blocks() * 512;
    let before = store.stats();
    let slack = store.slack_bytes();
    assert!(
        slack >= 64 * PAGE_SIZE as u64,
        "the removals leave slack: {before:?}"
    );
    assert_eq!(before.slack_bytes, slack);
    let file_before = blocks(&store);
    let pages = store.punch_slack(usize::MAX);
    let punched = pages * PAGE_SIZE as u64;
    // Each class's next chunk keeps its lowest holes (refilled first); the rest is punched.
    assert!(
        punched * 2 > slack,
        "most slack is punched: {punched} of {slack}"
    );
    assert_eq!(store.slack_bytes(), slack - punched);
    assert_eq!(
        store.punch_slack(usize::MAX),
        0,
        "what is left is in next chunks"
    );
    let after = store.stats();
    assert_eq!(after.punched_bytes, punched);
    assert_eq!(after.chunks, before.chunks, "punching unmaps no chunk");
    // A slot's last page counts as written when taken, though a short payload may not reach
    // it: a few of the punched pages may not have been allocated.
    let given_back = file_before - blocks(&store);
    assert!(
        given_back <= punched && given_back + 16 * PAGE_SIZE as u64 >= punched,
        "the store file gives back what was punched: {given_back} bytes of {punched}"
    );
    check_against_model(&store, &model);
    let want = blob_pages(&model);
    assert_eq!(read_store_file(&store), want, "one record per live page");
    // New pages take the punched slots again, and read back.
    insert_pages(&mut store, &mut model, at, 6000..9000, 104_729);
    check_against_model(&store, &model);
    assert!(
        store.stats().chunks <= before.chunks + 2,
        "the holes were refilled"
    );
    let want = blob_pages(&model);
    assert_eq!(read_store_file(&store), want);
    // A monitor adopting the file after punches finds the same pages, and its slack.
    for i in (6000..9000u64).filter(|i| i % 3 == 0) {
        let (h, _) = model.remove(&at(i)).unwrap();
        store.remove(h);
    }
    let dup = store.file().unwrap().try_clone().unwrap();
    let (mut adopted, pages) = Store::adopt(dup, None, None).unwrap();
    assert_eq!(pages.len(), blob_pages(&model).len());
    for (addr, _, h) in pages {
        assert_eq!(&read_back(&adopted, h), &model[&addr].1);
    }
    adopted.slabs.check_invariants();
    let slack = adopted.slack_bytes();
    assert!(slack > 0, "the removals left slack in the adopted file");
    assert!(adopted.punch_slack(usize::MAX) > 0);
    assert!(adopted.slack_bytes() < slack);
    adopted.slabs.check_invariants();
}

/// Only blobs of the compacting member alone, that the caller calls movable and that no
/// demotion pins, move; the others keep their slots and handles.
#[test]
fn compaction_moves_only_the_members_own_unpinned_movable_blobs() {
    let mut store = durable_store();
    let at = |i: u64| 0x6700_0000_0000u64 + i * PAGE_SIZE as u64;
    let handles: Vec<Handle> = (0..2000u64)
        .map(|i| store.put(&random_page(i), at(i)).unwrap())
        .collect();
    let child = store.join_member().unwrap();
    // Keep every 5th page: of those, every 3rd is shared with the child, every 7th refused.
    for (i, h) in handles.iter().enumerate() {
        if i % 5 != 0 {
            store.remove(*h);
        } else if i % 3 == 0 {
            store.share(*h, child).unwrap();
        }
    }
    for (i, h) in handles.iter().enumerate() {
        if i % 5 == 0 && i % 11 == 0 {
            store.slabs.pin(Store::loc_of(*h));
        }
    }
    let refused = |addr: u64| ((addr - at(0)) / PAGE_SIZE as u64) % 7 == 0;
    let c = store.compact(0, usize::MAX, &mut |addr, _| !refused(addr), &mut |_| {});
    // (Every chunk keeps a blob that may not move, so none is given back here.)
    assert!(!c.moves.is_empty(), "{c:?}");
    let moved: HashMap<u64, Handle> = c.moves.iter().map(|&(a, _, new)| (a, new)).collect();
    for (i, h) in handles.iter().enumerate().filter(|(i, _)| i % 5 == 0) {
        let shared = i % 3 == 0;
        let now = match moved.get(&at(i as u64)) {
            Some(new) => {
                assert!(
                    !shared && !refused(at(i as u64)) && i % 11 != 0,
                    "page {i} must not move"
                );
                *new
            }
            None => *h,
        };
        assert_eq!(*read_back(&store, now), *random_page(i as u64), "page {i}");
    }
    store.slabs.check_invariants();
}

/// One round of idle-time recompression as the monitor runs it: candidates under the lock,
/// zstd and lz4hc (alternately, so the store holds both) without it, each shorter blob put
/// back. Renames the replaced pages in `model`;
/// returns (offered, replaced).
fn recompress_model(
    store: &mut Store,
    model: &mut HashMap<u64, (Handle, Page)>,
    max: usize,
) -> (usize, usize) {
    let mut arena = Vec::new();
    let cands = store.recompress_candidates(
        0,
        max,
        &mut |addr, h| model.get(&addr).is_some_and(|(mh, _)| *mh == h),
        &mut arena,
    );
    let mut s = RecompressScratch::new();
    let mut replaced = 0;
    for (i, c) in cands.iter().enumerate() {
        let payload = &arena[c.off..c.off + c.len_bytes];
        let codec = [Recompress::Zstd(3), Recompress::Lz4hc(9)][i % 2];
        let Some(len) = recompress(payload, codec, c.fits_below(), &mut s) else {
            store.withdraw_candidate(c.handle);
            continue;
        };
        let mut published = false;
        let new = store
            .replace_blob(0, c.handle, c.addr, &s.out[..len], &mut |_| {
                published = true
            })
            .expect("a shorter blob of a live page");
        assert!(published);
        assert!(len < c.len_bytes);
        model.get_mut(&c.addr).unwrap().0 = new;
        replaced += 1;
    }
    (cands.len(), replaced)
}

/// Idle-time recompression: blobs shrink into smaller classes, every page reads back exactly
/// (through the handle and through the store file, one record per page), each blob is offered
/// once, and a blob moved by compaction is not offered again while a new page is.
#[test]
fn recompression_shrinks_blobs_and_offers_each_once() {
    let mut store = durable_store();
    let at = |i: u64| 0x6600_0000_0000u64 + i * PAGE_SIZE as u64;
    let mut model = HashMap::new();
    for (i, page) in text_and_random_pages(1200).into_iter().enumerate() {
        let h = store.put(&page, at(i as u64)).unwrap();
        model.insert(at(i as u64), (h, page));
    }
    let before = store.stats();
    let mut offered = 0;
    let mut replaced = 0;
    loop {
        let (o, r) = recompress_model(&mut store, &mut model, 100);
        if o == 0 {
            break;
        }
        offered += o;
        replaced += r;
        check_against_model(&store, &model);
    }
    let after = store.stats();
    assert_eq!(offered, 600, "every lz4 blob once, raw ones never");
    assert!(
        replaced > 300,
        "text shrinks under lz4hc: {replaced} of 600"
    );
    assert_eq!(after.recompressed, replaced as u64);
    assert_eq!(
        after.recompress_bytes_saved,
        before.bytes_out - after.bytes_out
    );
    assert!(after.slab_bytes_slots < before.slab_bytes_slots);
    let want: HashMap<u64, Page> = model.iter().map(|(a, (_, p))| (*a, p.clone())).collect();
    assert_eq!(read_store_file(&store), want, "one record per page");
    assert_eq!(recompress_model(&mut store, &mut model, 100), (0, 0));

    // Most pages go back to the program: compaction moves the rest, and settled ones stay
    // settled.
    let mut rng = Rng(7);
    let keys: Vec<u64> = model.keys().copied().collect();
    for k in keys {
        if rng.next() % 10 < 7 {
            let (h, _) = model.remove(&k).unwrap();
            store.remove(h);
        }
    }
    compact_model(&mut store, &mut model, usize::MAX);
    check_against_model(&store, &model);
    assert!(store.stats().compact_moves > 0);
    assert_eq!(recompress_model(&mut store, &mut model, 100), (0, 0));
    // A new page is offered; and a page dropped in between is simply not replaced.
    let page = text_page(99_999);
    let h = store.put(&page, at(5000)).unwrap();
    model.insert(at(5000), (h, page));
    let (o, r) = recompress_model(&mut store, &mut model, 100);
    assert_eq!((o, r), (1, 1));
    check_against_model(&store, &model);
    // An adopting monitor reads the same pages, and offers every blob again.
    let dup = store.file().unwrap().try_clone().unwrap();
    let (mut adopted, pages) = Store::adopt(dup, None, None).unwrap();
    assert_eq!(pages.len(), model.len());
    let mut arena = Vec::new();
    let again = adopted.recompress_candidates(0, usize::MAX, &mut |_, _| true, &mut arena);
    let lz4_pages = model
        .values()
        .filter(|(h, _)| h.kind() == PageKind::Lz4)
        .count();
    assert_eq!(again.len(), lz4_pages);
}

/// What recompression must not touch, and what `replace_blob` refuses with nothing changed:
/// a shared blob, a blob not offered, the wrong address, a payload that does not shrink it,
/// a page that went back, and a slot freed and taken again by the same page at the same
/// address (the same handle: only the offer, ended by the free, tells them apart).
#[test]
fn recompression_leaves_shared_and_changed_blobs_alone() {
    let mut store = durable_store();
    let at = |i: u64| 0x6700_0000_0000u64 + i * PAGE_SIZE as u64;
    let pages: Vec<Page> = (0..8).map(text_page).collect();
    let mut handles: Vec<Handle> = pages
        .iter()
        .enumerate()
        .map(|(i, p)| store.put(p, at(i as u64)).unwrap())
        .collect();
    // Pages 0 and 1 are shared with a forked child; page 2 is not named by the page map.
    let child = store.join_member().unwrap();
    store.share(handles[0], child).unwrap();
    store.share(handles[1], child).unwrap();
    let mut arena = Vec::new();
    let mut cands =
        store.recompress_candidates(0, usize::MAX, &mut |addr, _| addr != at(2), &mut arena);
    // Offered in store order (by chunk); the steps below name them by address.
    cands.sort_by_key(|c| c.addr);
    let offered: Vec<u64> = cands.iter().map(|c| c.addr).collect();
    assert_eq!(offered, (3..8).map(at).collect::<Vec<_>>());
    let mut s = RecompressScratch::new();
    let mut shorter = |c: &RecompressCandidate| {
        let len = recompress(
            &arena[c.off..c.off + c.len_bytes],
            Recompress::Zstd(3),
            c.fits_below(),
            &mut s,
        )
        .expect("text shrinks");
        s.out[..len].to_vec()
    };
    let new: Vec<Vec<u8>> = cands.iter().map(&mut shorter).collect();
    let stats = store.stats();
    let mut never = |_: u64| panic!("nothing may be published");
    // A shared blob, and a blob never offered (page 2).
    assert!(store
        .replace_blob(0, handles[0], at(0), &new[0], &mut never)
        .is_err());
    assert!(store
        .replace_blob(0, handles[2], at(2), &new[0], &mut never)
        .is_err());
    // The wrong address; the whole old payload (no smaller class).
    assert!(store
        .replace_blob(0, cands[0].handle, at(9), &new[0], &mut never)
        .is_err());
    let old_payload = arena[cands[1].off..cands[1].off + cands[1].len_bytes].to_vec();
    assert!(store
        .replace_blob(0, cands[1].handle, cands[1].addr, &old_payload, &mut never)
        .is_err());
    // The page went back and came out again, into the same slot (lowest free first) with
    // the same length: the same handle names the new blob, which the job never read.
    let i = 6;
    assert_eq!(cands[3].addr, at(i as u64));
    store.remove(cands[3].handle);
    handles[i] = store.put(&pages[i], at(i as u64)).unwrap();
    assert_eq!(
        handles[i], cands[3].handle,
        "the test needs the slot reused"
    );
    assert!(store
        .replace_blob(0, cands[3].handle, cands[3].addr, &new[3], &mut never)
        .is_err());
    // The page went back to the program meanwhile: its handle names nothing.
    store.remove(cands[2].handle);
    assert!(store
        .replace_blob(0, cands[2].handle, cands[2].addr, &new[2], &mut never)
        .is_err());
    let after = store.stats();
    assert_eq!(after.recompressed, 0);
    assert_eq!(after.pages_lz4, stats.pages_lz4 - 1);
    // The last one is replaced.
    let mut published = false;
    let h = store
        .replace_blob(0, cands[4].handle, cands[4].addr, &new[4], &mut |_| {
            published = true
        })
        .unwrap();
    assert!(published);
    assert_eq!(&read_back(&store, h), &pages[7]);
    for (j, h) in handles.iter().enumerate() {
        if j != 5 && j != 7 {
            assert_eq!(&read_back(&store, *h), &pages[j], "page {j}");
        }
    }
    store.slabs.check_invariants();
}

/// A monitor of another build meets a store file of an older layout (a daemon upgraded while
/// its programs ran): it refuses with both versions named and changes nothing, so the
/// program's own shim, which reads that layout, can still bring every page home.
#[test]
fn adoption_refuses_another_layout_version_and_leaves_the_file_alone() {
    use std::os::unix::fs::FileExt;
    let mut store = durable_store();
    let page = text_page(7);
    let h = store.put(&page, 0x7100_0000_0000).unwrap();
    let file = store.file().unwrap();
    // The version field (bytes 8..12 of the header) of the layout before this one.
    let old = (crate::protocol::store_layout::STORE_VERSION - 1).to_le_bytes();
    file.write_at(&old, 8).unwrap();
    let Err(err) = Store::adopt(file.try_clone().unwrap(), None, None) else {
        panic!("another layout version must be refused");
    };
    let want = format!(
        "layout version {}, this build reads {}",
        crate::protocol::store_layout::STORE_VERSION - 1,
        crate::protocol::store_layout::STORE_VERSION
    );
    assert!(err.contains(&want), "{err}");
    // Nothing was changed: the page reads back, and once the file says this build's
    // version again, an adoption finds the page with its record.
    assert_eq!(&read_back(&store, h), &page);
    let now = crate::protocol::store_layout::STORE_VERSION.to_le_bytes();
    file.write_at(&now, 8).unwrap();
    let (_, pages) = Store::adopt(file.try_clone().unwrap(), None, None).unwrap();
    assert_eq!(pages.len(), 1);
    assert_eq!(pages[0].0, 0x7100_0000_0000);
}
