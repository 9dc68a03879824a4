//! Benchmarks of the compressed page store on realistic mixed pages.
//!
//! Owns: a deterministic generator of heap-like 4 KiB pages (text records, small integers,
//! pointers, zero runs, random bytes, some zero and incompressible pages; about 2x under lz4)
//! and the criterion benches of `encode` (compression) and `Store::get` (decompression) per
//! page, and of idle-time recompression (zstd, lz4hc) per page. Prints once, for 100k pages,
//! the compression ratio, metadata bytes per stored page and fragmentation, and a table of
//! what recompression with each codec and level saves and costs.
//! Must not touch: anything but the public `uswap::store` API.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use std::time::Instant;
use uswap::store::{encode, recompress, Handle, Recompress, RecompressScratch, Store, StoreConfig};
use uswap::PAGE_SIZE;

/// Pages cycled through by the timed loops (16 MiB: larger than a typical L2, like real
/// eviction traffic).
const WORKING_SET_PAGES: usize = 4096;
/// Pages stored for the one-time ratio / metadata report.
const REPORT_PAGES: u64 = 100_000;

/// xorshift64*: the generator is deterministic, so runs are comparable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const NAMES: [&str; 16] = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory",
    "niaj", "olivia", "peggy", "rupert", "sybil",
];
const TAGS: [&str; 8] = [
    "admin", "beta", "cold", "eu-west", "premium", "trial", "us-east", "verified",
];

/// Appends one segment of heap-like data to `buf` (may overshoot; the caller truncates).
fn push_segment(rng: &mut Rng, buf: &mut Vec<u8>) {
    match rng.below(100) {
        // A text record, JSON-ish, with varying numbers.
        0..=39 => {
            let rec = format!(
                "{{\"id\":{},\"user\":\"{}\",\"score\":{},\"tag\":\"{}\",\"ts\":{}}}\n",
                rng.below(1_000_000),
                NAMES[rng.below(16) as usize],
                rng.below(100),
                TAGS[rng.below(8) as usize],
                1_700_000_000 + rng.below(10_000_000),
            );
            buf.extend_from_slice(rec.as_bytes());
        }
        // An array of small integers (counters, lengths, enum tags).
        40..=59 => {
            for _ in 0..8 + rng.below(40) {
                let v = rng.below(1000) as u32;
                buf.extend_from_slice(&v.to_le_bytes());
            }
        }
        // An object full of pointers into one heap region, with a length and flags.
        60..=74 => {
            let base = 0x0000_7f3a_1200_0000u64;
            for _ in 0..2 + rng.below(6) {
                let ptr = base + (rng.below(1 << 24) & !15);
                buf.extend_from_slice(&ptr.to_le_bytes());
            }
            buf.extend_from_slice(&(rng.below(4096)).to_le_bytes());
            buf.extend_from_slice(&(rng.below(4)).to_le_bytes());
        }
        // Zero run: freed or not-yet-written memory.
        75..=94 => buf.resize(buf.len() + 16 + rng.below(240) as usize, 0),
        // Random bytes: hashes, keys, already-compressed data.
        _ => {
            for _ in 0..2 + rng.below(14) {
                buf.extend_from_slice(&rng.next().to_le_bytes());
            }
        }
    }
}

/// Fills `page` with the `idx`-th page of the mixed data set.
fn mixed_page(idx: u64, page: &mut [u8; PAGE_SIZE], buf: &mut Vec<u8>) {
    let mut rng = Rng((idx + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    match rng.below(100) {
        // Zero pages (fresh allocations, zeroed buffers).
        0..=5 => page.fill(0),
        // Pages of one repeated non-zero word (memset patterns).
        6 => {
            let word = [0xffu64, 0x0101_0101_0101_0101, 0xdead_beef_dead_beef][idx as usize % 3];
            for w in page.chunks_exact_mut(8) {
                w.copy_from_slice(&word.to_le_bytes());
            }
        }
        // Incompressible pages (media, encrypted or compressed buffers).
        7..=11 => {
            for w in page.chunks_exact_mut(8) {
                w.copy_from_slice(&rng.next().to_le_bytes());
            }
        }
        // Heap pages: a mix of segments.
        _ => {
            buf.clear();
            while buf.len() < PAGE_SIZE {
                push_segment(&mut rng, buf);
            }
            page.copy_from_slice(&buf[..PAGE_SIZE]);
        }
    }
}

fn working_set() -> Vec<[u8; PAGE_SIZE]> {
    let mut buf = Vec::new();
    (0..WORKING_SET_PAGES as u64)
        .map(|i| {
            let mut p = [0u8; PAGE_SIZE];
            mixed_page(i, &mut p, &mut buf);
            p
        })
        .collect()
}

/// A durable store (a store file, as the monitor makes) with no quota.
fn durable_store() -> Store {
    Store::try_new(StoreConfig {
        durable: true,
        max_bytes: None,
        disk: None,
    })
    .expect("store file")
}

/// Stores [`REPORT_PAGES`] mixed pages and prints the figures the monitor would report.
fn report_once() {
    let mut store = durable_store();
    let mut page = [0u8; PAGE_SIZE];
    let mut buf = Vec::new();
    let mut handles: Vec<Handle> = Vec::with_capacity(REPORT_PAGES as usize);
    for i in 0..REPORT_PAGES {
        mixed_page(i, &mut page, &mut buf);
        handles.push(store.put(&page, 0x1000).expect("no quota"));
    }
    let s = store.stats();
    let pages = store.stored_pages();
    let meta_per_page = (8 * pages + store.metadata_bytes()) as f64 / pages as f64;
    eprintln!(
        "store report, {pages} mixed pages: same-filled {} lz4 {} raw {}",
        s.pages_same_filled, s.pages_lz4, s.pages_raw
    );
    eprintln!(
        "  ratio bytes_in/bytes_out {:.3}, bytes_in/(slab mapped + metadata) {:.3}, \
         lz4 pages only {:.3}",
        s.bytes_in as f64 / s.bytes_out as f64,
        s.effective_ratio(),
        (s.pages_lz4 * PAGE_SIZE as u64) as f64
            / (s.bytes_out - s.pages_raw * PAGE_SIZE as u64) as f64,
    );
    eprintln!(
        "  bytes_in/(store file resident + metadata) {:.3} (resident {:.1} MiB)",
        s.bytes_in as f64 / (s.resident_bytes + store.metadata_bytes()) as f64,
        s.resident_bytes as f64 / (1 << 20) as f64,
    );
    eprintln!(
        "  metadata per stored page {meta_per_page:.3} bytes (8-byte handle + {} store bytes), \
         slab mapped {} MiB, fragmentation {:.4} (slot rounding {:.4})",
        store.metadata_bytes(),
        s.slab_bytes_mapped >> 20,
        s.fragmentation,
        1.0 - s.slab_bytes_used as f64 / s.slab_bytes_slots as f64,
    );
    // Churn: remove every other page; show what comes back.
    for h in handles.iter().step_by(2) {
        store.remove(*h);
    }
    let t = store.stats();
    eprintln!(
        "  after removing half: slab mapped {} MiB ({} chunks), fragmentation {:.4}",
        t.slab_bytes_mapped >> 20,
        t.chunks,
        t.fragmentation
    );
}

/// Stores [`REPORT_PAGES`] mixed pages, recompresses every lz4 blob with each of a few codecs
/// and levels as the monitor does (candidates, `recompress`, `replace_blob`) and prints a table:
/// payload and slot bytes before and after, CPU per page, and decoding time per page before
/// and after (the fault path's cost).
fn report_recompression() {
    eprintln!(
        "recompression, {REPORT_PAGES} mixed pages (lz4 blobs only; slots = payload rounded to its size class)"
    );
    eprintln!("| codec | payload MiB before → after | slots MiB before → after | blobs replaced | µs/page (recompress) | decode µs/page before → after |");
    eprintln!("|---|---|---|---|---|---|");
    for codec in [
        Recompress::Lz4hc(1),
        Recompress::Lz4hc(3),
        Recompress::Lz4hc(9),
        Recompress::Zstd(1),
        Recompress::Zstd(3),
        Recompress::Zstd(6),
        Recompress::Zstd(9),
    ] {
        let mut store = durable_store();
        let mut page = [0u8; PAGE_SIZE];
        let mut buf = Vec::new();
        let mut handles = std::collections::HashMap::new();
        for i in 0..REPORT_PAGES {
            mixed_page(i, &mut page, &mut buf);
            let addr = 0x1000 * (i + 1);
            handles.insert(addr, store.put(&page, addr).expect("no quota"));
        }
        let lz4_handles = |handles: &std::collections::HashMap<u64, Handle>| -> Vec<Handle> {
            handles
                .values()
                .copied()
                .filter(|h| h.kind() == uswap::store::PageKind::Lz4)
                .collect()
        };
        let decode_us = |store: &Store, hs: &[Handle]| {
            let mut out = [0u8; PAGE_SIZE];
            let t = Instant::now();
            for h in hs {
                store.get(*h, &mut out).unwrap();
            }
            t.elapsed().as_secs_f64() * 1e6 / hs.len() as f64
        };
        let before = store.stats();
        let decode_before = decode_us(&store, &lz4_handles(&handles));
        let mut s = RecompressScratch::new();
        let mut cpu = std::time::Duration::ZERO;
        let mut offered = 0usize;
        loop {
            let mut arena = Vec::new();
            let cands = store.recompress_candidates(0, 4096, &mut |_, _| true, &mut arena);
            if cands.is_empty() {
                break;
            }
            offered += cands.len();
            for cand in cands {
                let t = Instant::now();
                let len = recompress(
                    &arena[cand.off..cand.off + cand.len_bytes],
                    codec,
                    cand.fits_below(),
                    &mut s,
                );
                cpu += t.elapsed();
                if let Some(len) = len {
                    let new = store
                        .replace_blob(0, cand.handle, cand.addr, &s.out[..len], &mut |_| {})
                        .unwrap();
                    handles.insert(cand.addr, new);
                }
            }
        }
        let after = store.stats();
        let decode_after = decode_us(&store, &lz4_handles(&handles));
        let raw = before.pages_raw * PAGE_SIZE as u64;
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        eprintln!(
            "| {} | {:.1} → {:.1} ({:.1} %) | {:.1} → {:.1} ({:.1} %) | {} of {offered} | {:.1} | {:.2} → {:.2} |",
            codec.name(),
            mib(before.bytes_out - raw),
            mib(after.bytes_out - raw),
            100.0 * (1.0 - (after.bytes_out - raw) as f64 / (before.bytes_out - raw) as f64),
            mib(before.slab_bytes_slots),
            mib(after.slab_bytes_slots),
            100.0 * (1.0 - after.slab_bytes_slots as f64 / before.slab_bytes_slots as f64),
            after.recompressed,
            cpu.as_secs_f64() * 1e6 / offered as f64,
            decode_before,
            decode_after,
        );
    }
}

fn bench_store(c: &mut Criterion) {
    report_once();
    report_recompression();
    let pages = working_set();

    let mut group = c.benchmark_group("store");
    group.throughput(Throughput::Bytes(PAGE_SIZE as u64));

    group.bench_function("encode_mixed_page", |b| {
        let mut scratch = Vec::new();
        let mut i = 0;
        b.iter(|| {
            let enc = encode(black_box(&pages[i]), &mut scratch);
            i = (i + 1) % pages.len();
            black_box(enc);
        })
    });

    let mut store = durable_store();
    let handles: Vec<Handle> = pages
        .iter()
        .map(|p| store.put(p, 0x1000).unwrap())
        .collect();
    group.bench_function("get_mixed_page", |b| {
        let mut out = [0u8; PAGE_SIZE];
        let mut i = 0;
        b.iter(|| {
            store.get(black_box(handles[i]), &mut out).unwrap();
            i = (i + 1) % handles.len();
            black_box(&out);
        })
    });

    group.bench_function("get_lz4_page", |b| {
        let lz4: Vec<Handle> = handles
            .iter()
            .copied()
            .filter(|h| h.kind() == uswap::store::PageKind::Lz4)
            .collect();
        let mut out = [0u8; PAGE_SIZE];
        let mut i = 0;
        b.iter(|| {
            store.get(black_box(lz4[i]), &mut out).unwrap();
            i = (i + 1) % lz4.len();
            black_box(&out);
        })
    });

    let lz4: Vec<(Vec<u8>, usize)> = pages
        .iter()
        .filter_map(|p| match encode(p, &mut Vec::new()) {
            uswap::store::Encoded::Lz4(b) => Some((b.to_vec(), b.len() + 1)),
            _ => None,
        })
        .collect();
    for (name, codec) in [
        ("recompress_mixed_page_lz4hc3", Recompress::Lz4hc(3)),
        ("recompress_mixed_page_zstd3", Recompress::Zstd(3)),
    ] {
        group.bench_function(name, |b| {
            let mut s = RecompressScratch::new();
            let mut i = 0;
            b.iter(|| {
                let (payload, bound) = &lz4[i];
                black_box(recompress(black_box(payload), codec, *bound, &mut s));
                i = (i + 1) % lz4.len();
            })
        });
    }

    group.bench_function("encode_insert_remove_mixed_page", |b| {
        let mut scratch = Vec::new();
        let mut i = 0;
        b.iter(|| {
            let page = &pages[i];
            let enc = encode(black_box(page), &mut scratch);
            let h = store.insert(enc, page, 0x1000).unwrap();
            store.remove(h);
            i = (i + 1) % pages.len();
        })
    });
    group.finish();
}

criterion_group!(benches, bench_store);
criterion_main!(benches);
