//! Compression workers shared by every client of one monitor (crossbeam channels).
//!
//! Each client's control thread takes cooled window pages in chunks of up to 256 and
//! compresses them outside the client's lock before placing them in the store under it. With
//! a pool (daemon config `compress_threads`, default: none on one or two CPUs, else one worker
//! per CPU beyond the first, at most 4), a chunk is split among the workers and the calling thread, which compress their
//! parts at once: one client's eviction uses the idle CPUs, and many clients share a bounded
//! set of threads. The fault path never uses the pool. Without workers (`compress_threads =
//! 0`, or a chunk too small to be worth a hand-off) the caller compresses alone.
//!
//! Owns: the worker threads, their job queue, the [`Compressed`] results. Must not: take any
//! client's lock or touch a store; workers only read the pages they are given and write into
//! buffers of their own.

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use crate::store::{encode, Encoded};
use crate::PAGE_SIZE;

const PAGE_BYTES: u64 = PAGE_SIZE as u64;

/// Chunks smaller than this are compressed by the caller alone (a hand-off costs a wake-up,
/// 20–40 µs across CPUs on the project's VM, about what 8 pages of lz4 take).
const MIN_PAGES_TO_SPLIT: usize = 32;

/// A page compressed outside the lock, waiting to be placed: its payload is in an arena.
#[derive(Clone, Copy, Debug)]
pub enum Compressed {
    Same(u64),
    Lz4(usize, usize),
    Raw,
}

impl Compressed {
    /// Encodes `page`, appending an lz4 payload to `arena`.
    pub fn of(page: &[u8; PAGE_SIZE], scratch: &mut Vec<u8>, arena: &mut Vec<u8>) -> Compressed {
        match encode(page, scratch) {
            Encoded::SameFilled(w) => Compressed::Same(w),
            Encoded::Lz4(b) => {
                arena.extend_from_slice(b);
                Compressed::Lz4(arena.len() - b.len(), b.len())
            }
            Encoded::Raw => Compressed::Raw,
        }
    }

    /// The encoding again, its payload borrowed from `arena`.
    pub fn encoded(self, arena: &[u8]) -> Encoded<'_> {
        match self {
            Compressed::Same(w) => Encoded::SameFilled(w),
            Compressed::Lz4(off, len) => Encoded::Lz4(&arena[off..off + len]),
            Compressed::Raw => Encoded::Raw,
        }
    }

    /// Bytes it keeps in the store.
    pub fn out_bytes(self) -> u64 {
        match self {
            Compressed::Same(_) => 0,
            Compressed::Lz4(_, len) => len as u64,
            Compressed::Raw => PAGE_BYTES,
        }
    }

    /// The same result with its payload `by` bytes further into a concatenated arena.
    fn shifted(self, by: usize) -> Compressed {
        match self {
            Compressed::Lz4(off, len) => Compressed::Lz4(off + by, len),
            other => other,
        }
    }
}

/// The address of one page a job reads.
#[derive(Clone, Copy, Debug)]
struct PagePtr(*const [u8; PAGE_SIZE]);

// SAFETY: a `PagePtr` is only dereferenced by a worker while the `compress` call that made it
// waits for that worker's answer, and the caller guarantees the page stays mapped and
// unchanged for the duration of the call (see `Pool::compress`).
unsafe impl Send for PagePtr {}

#[derive(Debug)]
struct Job {
    part_idx: usize,
    pages: Vec<PagePtr>,
    reply: Sender<Part>,
}

#[derive(Debug)]
struct Part {
    part_idx: usize,
    outs: Vec<Compressed>,
    arena: Vec<u8>,
}

fn compress_part(pages: &[PagePtr], scratch: &mut Vec<u8>) -> (Vec<Compressed>, Vec<u8>) {
    let mut arena = Vec::with_capacity(pages.len() * PAGE_SIZE / 2);
    let outs = pages
        .iter()
        // SAFETY: see `PagePtr`: the page is mapped and unchanged while the caller waits.
        .map(|p| Compressed::of(unsafe { &*p.0 }, scratch, &mut arena))
        .collect();
    (outs, arena)
}

/// The monitor's compression workers.
#[derive(Debug)]
pub struct Pool {
    tx: Sender<Job>,
    workers: usize,
}

impl Pool {
    /// Starts `workers` threads (0: none; every call then compresses on the caller).
    pub fn new(workers: usize) -> std::io::Result<Pool> {
        let (tx, rx): (Sender<Job>, Receiver<Job>) = unbounded();
        for i in 0..workers {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("uswap-compress-{i}"))
                .spawn(move || {
                    let mut scratch = Vec::new();
                    // Ends when the pool (the only sender) is dropped.
                    while let Ok(job) = rx.recv() {
                        let (outs, arena) = compress_part(&job.pages, &mut scratch);
                        // The caller waits for every part; it cannot be gone.
                        let _ = job.reply.send(Part {
                            part_idx: job.part_idx,
                            outs,
                            arena,
                        });
                    }
                })?;
        }
        Ok(Pool { tx, workers })
    }

    /// The default worker count: none on one or two CPUs (there the program and the monitor's
    /// fault thread already take both, and a worker only adds hand-offs: on the 2-vCPU VM,
    /// under load, compression ran at 290–340 MB/s with one worker against 370 MB/s without);
    /// otherwise one per CPU beyond the first, at most 4.
    pub fn default_workers() -> usize {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cpus <= 2 {
            0
        } else {
            (cpus - 1).min(4)
        }
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Compresses `pages` (with the workers and the caller at once), returning one result per
    /// page, in order, with every lz4 payload in `arena` (cleared first).
    ///
    /// # Safety
    /// Every pointer must point to a page that stays mapped, and is not written, until this
    /// call returns (window slots the caller's thread alone reuses).
    pub unsafe fn compress(
        &self,
        pages: &[*const [u8; PAGE_SIZE]],
        scratch: &mut Vec<u8>,
        arena: &mut Vec<u8>,
    ) -> Vec<Compressed> {
        arena.clear();
        let ptrs: Vec<PagePtr> = pages.iter().map(|&p| PagePtr(p)).collect();
        let parts = if self.workers == 0 || pages.len() < MIN_PAGES_TO_SPLIT {
            1
        } else {
            (self.workers + 1).min(pages.len() / (MIN_PAGES_TO_SPLIT / 2))
        };
        if parts <= 1 {
            let (outs, a) = compress_part(&ptrs, scratch);
            *arena = a;
            return outs;
        }
        let per_part = pages.len().div_ceil(parts);
        let (reply_tx, reply_rx) = bounded(parts);
        let mut sent = 0;
        for (part_idx, chunk) in ptrs.chunks(per_part).enumerate().skip(1) {
            let job = Job {
                part_idx,
                pages: chunk.to_vec(),
                reply: reply_tx.clone(),
            };
            if let Err(e) = self.tx.send(job) {
                // No worker left (cannot happen while the pool lives): do it here.
                let job = e.into_inner();
                let (outs, a) = compress_part(&job.pages, scratch);
                let _ = reply_tx.send(Part {
                    part_idx: job.part_idx,
                    outs,
                    arena: a,
                });
            }
            sent += 1;
        }
        drop(reply_tx);
        let (first_outs, first_arena) = compress_part(&ptrs[..per_part.min(ptrs.len())], scratch);
        let mut results: Vec<Option<(Vec<Compressed>, Vec<u8>)>> = vec![None; sent + 1];
        results[0] = Some((first_outs, first_arena));
        // Wait for every part: the workers read the caller's pages until they answer. A
        // receive error means every sender is gone, so no worker holds a part any more.
        for _ in 0..sent {
            match reply_rx.recv() {
                Ok(p) => results[p.part_idx] = Some((p.outs, p.arena)),
                Err(_) => break,
            }
        }
        let mut outs = Vec::with_capacity(pages.len());
        for (part_idx, r) in results.into_iter().enumerate() {
            let (o, a) = match r {
                Some(r) => r,
                None => {
                    // Lost with a worker that died (the process aborts on a panic, so this is
                    // defensive): compressed here instead.
                    let from = part_idx * per_part;
                    compress_part(&ptrs[from..(from + per_part).min(ptrs.len())], scratch)
                }
            };
            let base = arena.len();
            arena.extend_from_slice(&a);
            outs.extend(o.into_iter().map(|c| c.shifted(base)));
        }
        outs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(n: usize) -> Vec<Box<[u8; PAGE_SIZE]>> {
        (0..n)
            .map(|i| {
                let mut p = Box::new([0u8; PAGE_SIZE]);
                match i % 3 {
                    0 => p.fill(i as u8),
                    1 => {
                        for (j, b) in p.iter_mut().enumerate() {
                            *b = ((j * 7 + i) % 13) as u8;
                        }
                    }
                    _ => {
                        let mut x = i as u64 + 1;
                        for b in p.iter_mut() {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            *b = x as u8;
                        }
                    }
                }
                p
            })
            .collect()
    }

    #[test]
    fn pool_results_match_compressing_alone_in_order() {
        let data = pages(300);
        let ptrs: Vec<*const [u8; PAGE_SIZE]> = data.iter().map(|b| &**b as *const _).collect();
        let (mut s1, mut a1) = (Vec::new(), Vec::new());
        let alone: Vec<Compressed> = data
            .iter()
            .map(|p| Compressed::of(p, &mut s1, &mut a1))
            .collect();
        for workers in [0, 1, 3] {
            let pool = Pool::new(workers).unwrap();
            for n in [0usize, 1, 31, 32, 33, 256, 300] {
                let (mut scratch, mut arena) = (Vec::new(), vec![1, 2, 3]);
                // SAFETY: `data` outlives the call and is not written meanwhile.
                let outs = unsafe { pool.compress(&ptrs[..n], &mut scratch, &mut arena) };
                assert_eq!(outs.len(), n, "workers {workers}, {n} pages");
                for (i, c) in outs.iter().enumerate() {
                    let want = alone[i].encoded(&a1);
                    let got = c.encoded(&arena);
                    match (want, got) {
                        (Encoded::SameFilled(a), Encoded::SameFilled(b)) => assert_eq!(a, b),
                        (Encoded::Raw, Encoded::Raw) => {}
                        (Encoded::Lz4(a), Encoded::Lz4(b)) => assert_eq!(a, b),
                        _ => panic!("page {i}: different encodings (workers {workers}, n {n})"),
                    }
                }
            }
        }
    }
}
