//! Idle-time recompression, monitor side (the store's part: `store` module doc,
//! "Recompression"). Pages go into the store as fast lz4, at the rate eviction needs; a
//! CPU left idle afterwards recompresses them with lz4hc, and each blob that then fits a
//! smaller size class takes less memory. Compaction gives the emptied chunks back.
//!
//! Each tick, a client's control thread (1) puts in place the results of its jobs that are
//! done, under its lock, at most `INSTALL_BATCH` per hold, and only for pages its page map
//! still names by the handle the job read and whose slot was never freed since (the store's
//! *offer*; a slot reused by the same page with the same handle is not mistaken for the
//! blob that was read); (2) keeps up to [`JOBS_IN_FLIGHT`] jobs queued, each up to
//! [`JOB_BLOBS`] blobs whose payloads it copied under its lock
//! (`Store::recompress_candidates`). While the program faults (more than
//! `QUIET_FAULTS_PER_TICK` in a tick) no job goes in and one comes out per tick: its
//! faults do not queue behind these lock holds, and its wake-ups do not wait behind a worker
//! that took a CPU the program would have found idle (a redis GET loop, whose client and
//! server leave both CPUs idle half of the time, went from 16.6k to 12.2k GETs/s when the
//! worker ran in those gaps). The daemon's recompression threads (config
//! `recompress_threads`) run at idle priority: `SCHED_IDLE`, so any other runnable thread of
//! the machine (the programs, the fault threads) preempts them at once; `nice 19` where
//! `SCHED_IDLE` is refused.
//!
//! Owns: the recompression threads, their job queue, each client's jobs in flight, and the
//! counters of their CPU time. Must not: let a worker take a client's lock or touch a store
//! (an idle-priority thread holding a lock the fault path waits for would make the fault wait
//! for every other runnable thread of the machine), or hold a client's lock while
//! compressing.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender, TryRecvError};
use tracing::{debug, warn};

use super::client::Client;
use super::pages::PageState;
use super::stats::Counters;
use crate::store::{recompress, Recompress, RecompressCandidate, RecompressScratch, StoreError};

/// Blobs per job (their payloads are copied under the client's lock: 192 KiB at most).
pub const JOB_BLOBS: usize = 64;
/// Jobs a client keeps queued, so a worker finds the next one when it finishes one (a
/// worker recompresses ~700 blobs per 20 ms tick at level 3 here).
pub const JOBS_IN_FLIGHT: usize = 16;
/// Replacements under one hold of the client's lock (a fault waits for it meanwhile).
const INSTALL_BATCH: usize = 16;
/// Faults served in one tick above which the program counts as busy (see
/// [`Client::recompress_tick`]).
const QUIET_FAULTS_PER_TICK: u64 = 16;

/// One client's blobs to recompress.
struct Job {
    codec: Recompress,
    arena: Vec<u8>,
    cands: Vec<RecompressCandidate>,
    reply: Sender<Done>,
}

/// A job's results: for each blob that shrank, (index in `cands`, offset and length of its
/// new payload in `out`).
pub struct Done {
    cands: Vec<RecompressCandidate>,
    shrunk: Vec<(usize, usize, usize)>,
    out: Vec<u8>,
    /// CPU time the worker spent on the job.
    cpu_ns: u64,
}

/// The daemon's recompression threads.
pub struct Recompressor {
    tx: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Recompressor {
    /// Starts `threads` workers (at least one).
    pub fn new(threads: usize) -> std::io::Result<Recompressor> {
        let (tx, rx) = unbounded::<Job>();
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("uswap-recomp-{i}"))
                    .spawn(move || worker(rx))?,
            );
        }
        Ok(Recompressor {
            tx: Some(tx),
            threads: handles,
        })
    }

    /// Queues a job; its result arrives on the returned channel.
    fn submit(
        &self,
        codec: Recompress,
        arena: Vec<u8>,
        cands: Vec<RecompressCandidate>,
    ) -> Receiver<Done> {
        let (reply, rx) = bounded(1);
        if let Some(tx) = &self.tx {
            // A send fails only once every worker is gone; the receiver then reports it.
            let _ = tx.send(Job {
                codec,
                arena,
                cands,
                reply,
            });
        }
        rx
    }
}

impl std::fmt::Debug for Recompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recompressor")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl Drop for Recompressor {
    fn drop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Makes the calling thread run only when a CPU is otherwise idle.
fn lower_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 names the calling thread; `param` is a valid sched_param on our stack.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0 {
        return;
    }
    let err = std::io::Error::last_os_error();
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority on this thread's own id (Linux: per-thread nice value).
    let niced = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) } == 0;
    warn!(
        "recompression thread: SCHED_IDLE refused ({err}); running at {}",
        if niced { "nice 19" } else { "normal priority" }
    );
}

/// CPU time of the calling thread.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec on our stack.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn worker(rx: Receiver<Job>) {
    lower_priority();
    let mut scratch = RecompressScratch::new();
    for job in rx {
        let t0 = thread_cpu_ns();
        let mut shrunk = Vec::new();
        let mut out = Vec::new();
        for (i, c) in job.cands.iter().enumerate() {
            let payload = &job.arena[c.off..c.off + c.len_bytes];
            if let Some(len) = recompress(payload, job.codec, c.fits_below(), &mut scratch) {
                shrunk.push((i, out.len(), len));
                out.extend_from_slice(&scratch.out[..len]);
            }
        }
        let cpu_ns = thread_cpu_ns().saturating_sub(t0);
        // The client may be gone; its results go with it.
        let _ = job.reply.send(Done {
            cands: job.cands,
            shrunk,
            out,
            cpu_ns,
        });
    }
}

impl Client {
    /// One tick's recompression (see the module doc).
    pub(super) fn recompress_tick(&self) {
        let Some(pool) = &self.limits.recompress else {
            return;
        };
        let codec = self.cfg.recompress;
        if codec == Recompress::Off {
            return;
        }
        // A program that faults is left alone: while it faults more than
        // QUIET_FAULTS_PER_TICK a tick, no job goes in (the queue drains, and the workers
        // sleep) and one comes out per tick, so its faults do not queue behind this work's
        // lock holds, nor its wake-ups behind a worker that keeps a CPU it would find idle.
        let c = &self.counters;
        let faults = Counters::get(&c.faults_store)
            + Counters::get(&c.faults_window)
            + Counters::get(&c.faults_zero);
        let busy = faults - self.recompress_faults_mark.swap(faults, Ordering::Relaxed)
            > QUIET_FAULTS_PER_TICK;
        let (max_in, max_out) = if busy {
            (0, 1)
        } else {
            (JOBS_IN_FLIGHT, JOBS_IN_FLIGHT)
        };
        let mut jobs = self.recompress_jobs.lock();
        let mut taken = 0;
        while let Some(rx) = jobs.front() {
            if taken == max_out {
                break;
            }
            match rx.try_recv() {
                Ok(done) => {
                    jobs.pop_front();
                    taken += 1;
                    self.install_recompressed(done);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    jobs.pop_front();
                }
            }
        }
        let mut submitted = 0;
        while jobs.len() < JOBS_IN_FLIGHT && submitted < max_in {
            let mut arena = Vec::new();
            let cands = {
                let mut st = self.state.lock();
                let t0 = Instant::now();
                let st = &mut *st;
                let member = st.store.member();
                let mut store = st.store.lock();
                let pages = &st.pages;
                let cands = store.recompress_candidates(
                    member,
                    JOB_BLOBS,
                    &mut |addr, h| pages.state(addr) == PageState::Stored(h),
                    &mut arena,
                );
                self.counters
                    .recompress_max_hold_ns
                    .fetch_max(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                cands
            };
            if cands.is_empty() {
                break;
            }
            Counters::add(&self.counters.recompress_offered, cands.len() as u64);
            jobs.push_back(pool.submit(codec, arena, cands));
            submitted += 1;
        }
    }

    /// Puts a job's shorter blobs in place of the ones it read, where the page map still
    /// names the page by the handle read and the slot was never freed since (a page faulted
    /// back, discarded, moved or demoted meanwhile is left as it is); ends the offer of every
    /// other blob of the job.
    fn install_recompressed(&self, done: Done) {
        Counters::add(&self.counters.recompress_ns, done.cpu_ns);
        let mut replaced = 0u64;
        let mut shrunk = done.shrunk.iter().peekable();
        for (b, batch) in done.cands.chunks(INSTALL_BATCH).enumerate() {
            let base = b * INSTALL_BATCH;
            let mut st = self.state.lock();
            let t0 = Instant::now();
            let st = &mut *st;
            let member = st.store.member();
            let mut store = st.store.lock();
            let mut moves = Vec::with_capacity(batch.len());
            for (k, c) in batch.iter().enumerate() {
                let payload = match shrunk.peek() {
                    Some(&&(i, off, len)) if i == base + k => {
                        shrunk.next();
                        Some(&done.out[off..off + len])
                    }
                    _ => None,
                };
                let named = st.pages.state(c.addr) == PageState::Stored(c.handle);
                let Some(payload) = payload.filter(|_| named) else {
                    store.withdraw_candidate(c.handle);
                    continue;
                };
                match store.replace_blob(member, c.handle, c.addr, payload, &mut |saved| {
                    super::die::point_over("recompress:published", saved)
                }) {
                    Ok(new) => moves.push((c.addr, c.handle, new)),
                    // No room for the smaller slot: the blob stays as it is.
                    Err(StoreError::Full) => {}
                    Err(e) => debug!(client = self.id, "recompression not applied: {e}"),
                }
            }
            let n = st.pages.rehandled(&moves);
            debug_assert_eq!(n, moves.len(), "checked under the same lock");
            replaced += moves.len() as u64;
            drop(store);
            let ns = t0.elapsed().as_nanos() as u64;
            self.counters
                .recompress_max_hold_ns
                .fetch_max(ns, Ordering::Relaxed);
        }
        if replaced > 0 {
            debug!(
                client = self.id,
                offered = done.cands.len(),
                replaced,
                "blobs recompressed"
            );
        }
    }
}

/// The recompression jobs a client has queued, oldest first.
pub type Jobs = VecDeque<Receiver<Done>>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker runs at idle priority and returns each job's shorter payloads, which decode
    /// to the pages the job's blobs held.
    #[test]
    fn worker_shrinks_text_blobs_at_idle_priority() {
        let pool = Recompressor::new(1).unwrap();
        let mut store = crate::store::Store::new(crate::store::StoreConfig::default());
        let mut pages = Vec::new();
        for i in 0..64u64 {
            let p = crate::store::text_page(i);
            let h = store.put(&p, 0x1000 * (i + 1)).unwrap();
            pages.push((h, p));
        }
        let mut arena = Vec::new();
        let cands = store.recompress_candidates(0, usize::MAX, &mut |_, _| true, &mut arena);
        assert_eq!(cands.len(), 64);
        let done = pool
            .submit(Recompress::Zstd(3), arena, cands)
            .recv()
            .unwrap();
        assert!(done.shrunk.len() > 32, "{} of 64 shrank", done.shrunk.len());
        assert!(done.cpu_ns > 0);
        for &(i, off, len) in &done.shrunk {
            let c = done.cands[i];
            assert!(len < c.len_bytes);
            let mut back = [0u8; crate::PAGE_SIZE];
            assert!(crate::store::OwnedPageDecoder::new().decode_payload(
                false,
                &done.out[off..off + len],
                &mut back
            ));
            let want = pages.iter().find(|(h, _)| *h == c.handle).unwrap();
            assert_eq!(back, want.1);
        }
        // The worker's scheduling policy: SCHED_IDLE (a test host may refuse it: then nice).
        let policy = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| {
                let t = t.ok()?.path();
                let comm = std::fs::read_to_string(t.join("comm")).ok()?;
                comm.trim()
                    .starts_with("uswap-recomp")
                    .then(|| std::fs::read_to_string(t.join("stat")).ok())
                    .flatten()
            })
            .next()
            .expect("the worker thread is listed");
        // Field 41 of /proc/.../stat is the policy (after the comm in parentheses).
        let fields: Vec<&str> = policy
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        let sched: u32 = fields[38].parse().unwrap();
        let nice: i32 = fields[16].parse().unwrap();
        assert!(
            sched == libc::SCHED_IDLE as u32 || nice == 19,
            "policy {sched}, nice {nice}"
        );
        drop(pool);
    }
}
