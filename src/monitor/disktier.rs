//! The disk tier, monitor side: the control thread moves the coldest stored pages to the disk
//! file in batches (*demotion*), and a fault thread reads the disk pages a fault needs back,
//! both through io_uring ([`super::diskio`]) and never holding the client's or the store's lock
//! across the I/O.
//!
//! Owns: when to demote (the watermarks below), which pages (the page map's stored order:
//! stored longest ago and not brought back since), the order of a demotion's steps, and the
//! fault thread's cache of the disk payloads read for the fault it serves ([`DiskReads`]).
//! Must not: publish a disk record before its write has completed (the store's
//! `commit_demote` is called only after `write_all` returned), serve a payload read without the
//! lock unless the store's disk epoch says no disk slot was freed since (see [`DiskReads`]), or
//! touch the program other than through the fault path it is called from.
//!
//! A demotion batch:
//! 1. under the client's lock (and the store's): take up to [`DEMOTE_BATCH_PAGES`] coldest
//!    stored pages, and for each one only this program owns reserve a disk slot, copy its
//!    payload out and pin its memory slot (`Store::begin_demote`);
//! 2. without any lock: write the payloads, one write per run of consecutive disk slots
//!    (padded to whole slots), and wait until every write has completed;
//! 3. under the locks again: a page still stored under the same handle whose memory slot was
//!    never freed gets its disk record published, then its memory slot freed, then its page
//!    word pointed at the disk slot; any other is given up (its disk slot freed).

use std::sync::atomic::Ordering;
use std::time::Instant;

use tracing::{debug, warn};

use super::client::Client;
use super::diskio::DiskIo;
use super::pages::PageState;
use super::stats::Counters;
use crate::store::{Demotion, DiskRead, Handle, Store, StoreError};

/// Pages per demotion batch.
pub const DEMOTE_BATCH_PAGES: usize = 512;
/// Batches one tick may write at most (the control thread also evicts and compresses).
const MAX_BATCHES_PER_TICK: usize = 8;
/// After a failed write, no demotion for this long.
const ERROR_PAUSE_MS: u64 = 1000;
/// Rounds of storing and demoting [`Client::store_window_for_fork`] makes at most.
const MAX_FORK_ROUNDS: usize = 16;
/// Demotion starts when the memory slots in use pass `HIGH_NUM / DEN` of `max_store`, or a
/// page was refused because the store is full (a size class may need a chunk the quota has no
/// room for), and goes on until the slots in use are under `LOW_NUM / DEN` of it and a whole
/// chunk could be mapped again.
const HIGH_NUM: u64 = 7;
const LOW_NUM: u64 = 6;
const DEN: u64 = 8;

impl Client {
    /// One tick's demotion (see the module doc): batches while the store is over its
    /// high-water mark, down to its low-water mark. Whether any page moved.
    pub(super) fn demote_cold(&self) -> bool {
        let Some(max) = self.cfg.max_store_bytes else {
            return false;
        };
        if self.disk.is_none() || self.now_ms() < self.disk_pause_until_ms.load(Ordering::Relaxed) {
            return false;
        }
        let mut moved = false;
        let (high, low) = (max / DEN * HIGH_NUM, max / DEN * LOW_NUM);
        for _ in 0..MAX_BATCHES_PER_TICK {
            let (used, mapped, refused) = {
                let st = self.state.lock();
                let s = st.store.lock();
                (
                    s.slot_bytes_used(),
                    s.mapped_bytes(),
                    s.inserts_refused_full(),
                )
            };
            let refused_new = refused != self.disk_last_refused.swap(refused, Ordering::Relaxed);
            let settled = used <= low && mapped + crate::store::CHUNK_BYTES as u64 <= max;
            let draining = self.disk_draining.load(Ordering::Relaxed);
            let go = used > high || refused_new || (draining && !settled);
            self.disk_draining.store(go && !settled, Ordering::Relaxed);
            if !go || !self.demote_batch() {
                return moved;
            }
            moved = true;
        }
        moved
    }

    /// Before a fork, with a disk tier: the pages cooling in the window are stored (and room
    /// made for them on disk), so the child shares them copy-on-write like every stored page
    /// instead of needing a copy of its own each, which a full store would refuse (and the
    /// fork would then bring every page home). Pages that still do not fit get their copies
    /// as without a disk tier.
    pub(super) fn store_window_for_fork(&self) {
        if self.disk.is_none() || self.cfg.max_store_bytes.is_none() {
            return;
        }
        for _ in 0..MAX_FORK_ROUNDS {
            self.compress_cooled(0);
            if self.state.lock().pages.counts().window == 0 {
                return;
            }
            let mut moved = false;
            for _ in 0..MAX_BATCHES_PER_TICK {
                if !self.demote_batch() {
                    break;
                }
                moved = true;
            }
            if !moved {
                return;
            }
        }
    }

    /// One batch; whether it moved any page (false: nothing to move, the disk tier is full,
    /// or the write failed).
    fn demote_batch(&self) -> bool {
        let t0 = Instant::now();
        let c = &self.counters;
        let mut buf: Vec<u8> = Vec::new();
        let mut ds: Vec<Demotion> = Vec::new();
        let mut full = false;
        {
            let mut st = self.state.lock();
            let st = &mut *st;
            let member = st.store.member();
            let mut cold = Vec::with_capacity(DEMOTE_BATCH_PAGES);
            st.pages.pop_coldest_stored(DEMOTE_BATCH_PAGES, &mut cold);
            let mut store = st.store.lock();
            for (i, &(addr, h)) in cold.iter().enumerate() {
                match store.begin_demote(member, h, addr, &mut buf) {
                    Ok(Some(d)) => ds.push(d),
                    Ok(None) => {}
                    Err(e) => {
                        // The disk tier is full (max_disk): these pages wait in the store.
                        if !matches!(e, StoreError::Full) {
                            warn!(client = self.id, "disk tier: cannot demote a page: {e}");
                        }
                        full = true;
                        st.pages.unpop_stored(&cold[i..]);
                        break;
                    }
                }
            }
        }
        if full {
            Counters::add(&c.disk_full_batches, 1);
        }
        if ds.is_empty() {
            return false;
        }
        // 2. The write, without any lock.
        let written = self.write_demotions(&ds, &buf);
        if let Err(e) = &written {
            // A full or failing disk: the pages stay in the store, and no batch is tried for
            // a while (the store is a hard quota meanwhile).
            Counters::add(&c.disk_errors, 1);
            self.disk_pause_until_ms
                .store(self.now_ms() + ERROR_PAUSE_MS, Ordering::Relaxed);
            warn!(client = self.id, error = %e, pages = ds.len(), "disk tier: writing a batch failed; its pages stay in the store, no batch for {ERROR_PAUSE_MS} ms");
        }
        // 3. Commit what is still as it was.
        let (mut moved, mut aborted) = (0u64, 0u64);
        {
            let mut st = self.state.lock();
            let st = &mut *st;
            let mut store = st.store.lock();
            for d in &ds {
                if written.is_err() || st.pages.state(d.addr) != PageState::Stored(d.old) {
                    store.abort_demote(d);
                    aborted += 1;
                } else if store.commit_demote(d) {
                    let ok = st.pages.demoted(d.addr, d.old, d.new);
                    debug_assert!(ok, "checked above under the same lock");
                    super::pagetrace::rec(self.id, "demoted", d.addr, d.disk_off, 0);
                    moved += 1;
                } else {
                    aborted += 1;
                }
            }
            if self.limits.uid_store.is_some() {
                let mapped = store.stats().slab_bytes_mapped;
                drop(store);
                self.update_uid_store(mapped);
            }
        }
        Counters::add(&c.pages_demoted, moved);
        Counters::add(&c.demote_aborted, aborted);
        Counters::add(&c.demote_batches, 1);
        Counters::add(&c.demote_ns, t0.elapsed().as_nanos() as u64);
        debug!(client = self.id, moved, aborted, "disk tier: batch demoted");
        written.is_ok() && moved > 0
    }

    /// Writes the payloads of `ds` (in `buf`) to their disk slots: runs of consecutive slots
    /// are written whole (each payload padded to its slot), one write per run.
    fn write_demotions(&self, ds: &[Demotion], buf: &[u8]) -> std::io::Result<()> {
        let slots: Vec<(u64, u32, &[u8])> = ds
            .iter()
            .map(|d| {
                (
                    d.disk_off,
                    d.slot_bytes,
                    &buf[d.buf_off..d.buf_off + d.len_bytes as usize],
                )
            })
            .collect();
        let (wbuf, runs) = write_runs(slots);
        let ops: Vec<(u64, &[u8])> = runs.iter().map(|&(o, s, e)| (o, &wbuf[s..e])).collect();
        let mut io = self.disk_writer.lock();
        if io.is_none() {
            *io = Some(self.disk.as_ref().expect("checked").io()?);
        }
        io.as_mut().expect("set above").write_all(&ops)?;
        Counters::add(&self.counters.disk_writes, ops.len() as u64);
        Counters::add(
            &self.counters.disk_write_bytes,
            ops.iter().map(|(_, b)| b.len() as u64).sum(),
        );
        Ok(())
    }
}

/// Lays out payloads bound for disk slots `(offset, slot size, payload)` as writes: sorted by
/// offset, a payload whose slot starts where the previous one's ends joins its run (the gap
/// after the previous payload is zero-filled). Returns the buffer and each run's (offset,
/// start, end) in it.
fn write_runs(mut slots: Vec<(u64, u32, &[u8])>) -> (Vec<u8>, Vec<(u64, usize, usize)>) {
    slots.sort_unstable_by_key(|s| s.0);
    let mut wbuf: Vec<u8> = Vec::new();
    let mut runs: Vec<(u64, usize, usize)> = Vec::new();
    let mut prev: Option<(u64, u32)> = None;
    for (off, slot_bytes, payload) in slots {
        match prev {
            Some((p_off, p_slot)) if p_off + u64::from(p_slot) == off => {
                let run = runs.last_mut().expect("a run is open");
                wbuf.resize(run.1 + (off - run.0) as usize, 0);
                wbuf.extend_from_slice(payload);
                run.2 = wbuf.len();
            }
            _ => {
                let start = wbuf.len();
                wbuf.extend_from_slice(payload);
                runs.push((off, start, wbuf.len()));
            }
        }
        prev = Some((off, slot_bytes));
    }
    (wbuf, runs)
}

/// Plans the reads of `want`: sorted by offset, one read per run of consecutive slots.
/// Returns each run's (offset, start in the buffer, length), each page's (handle bits, start
/// in the buffer, length), and the buffer's length.
#[allow(clippy::type_complexity)]
fn read_runs(
    mut want: Vec<(Handle, DiskRead)>,
) -> (Vec<(u64, usize, usize)>, Vec<(u64, usize, u32)>, usize) {
    want.sort_unstable_by_key(|(_, r)| r.off);
    want.dedup_by_key(|(_, r)| r.off);
    let mut runs: Vec<(u64, usize, usize)> = Vec::new();
    let mut got = Vec::with_capacity(want.len());
    let mut prev: Option<DiskRead> = None;
    for (h, r) in &want {
        match prev {
            Some(p) if p.off + u64::from(p.slot_bytes) == r.off => {
                let run = runs.last_mut().expect("a run is open");
                run.2 = (r.off + u64::from(r.len_bytes) - run.0) as usize;
            }
            _ => {
                let start = runs.last().map_or(0, |r| r.1 + r.2);
                runs.push((r.off, start, r.len_bytes as usize));
            }
        }
        let run = runs.last().expect("just pushed");
        got.push((h.to_bits(), run.1 + (r.off - run.0) as usize, r.len_bytes));
        prev = Some(*r);
    }
    let total = runs.last().map_or(0, |r| r.1 + r.2);
    (runs, got, total)
}

/// A client's disk file, as the monitor's threads use it (a duplicate of the store's).
#[derive(Debug)]
pub struct ClientDisk {
    file: std::fs::File,
}

impl ClientDisk {
    pub fn new(file: std::fs::File) -> ClientDisk {
        ClientDisk { file }
    }

    /// A new ring (or plain I/O) on a duplicate of the descriptor.
    fn io(&self) -> std::io::Result<DiskIo> {
        Ok(DiskIo::new(self.file.try_clone()?))
    }

    /// The file itself.
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }
}

/// The fault thread's disk payloads for the fault it serves: read through io_uring without
/// the client's lock, and used under it only if the store's disk epoch (disk slots freed) is
/// what it was when the reads were decided. Every page this cache has a payload for was named
/// by this client's page map then, which holds the page's owner bit: its slot can be freed only
/// by this client, under its lock, and that moves the epoch.
#[derive(Default)]
pub struct DiskReads {
    io: Option<DiskIo>,
    epoch: u64,
    /// (handle bits, offset in `buf`, length).
    got: Vec<(u64, usize, u32)>,
    buf: Vec<u8>,
}

impl DiskReads {
    /// Forgets what was read (at the start of each fault).
    pub fn clear(&mut self) {
        self.got.clear();
        self.buf.clear();
    }

    /// Called under the client's lock with the store's disk epoch: drops what was read if a
    /// disk slot was freed since (its payload might be another page's now).
    pub fn validate(&mut self, epoch: u64) {
        if epoch != self.epoch {
            self.clear();
        }
    }

    /// Whether `h`'s payload was read.
    pub fn has(&self, h: Handle) -> bool {
        self.got.iter().any(|g| g.0 == h.to_bits())
    }

    /// `h`'s payload, if read (valid only after [`DiskReads::validate`] under the lock).
    pub fn payload(&self, h: Handle) -> Option<&[u8]> {
        self.got
            .iter()
            .find(|g| g.0 == h.to_bits())
            .map(|g| &self.buf[g.1..g.1 + g.2 as usize])
    }

    /// Decodes `h`'s payload into `out` if it was read; `None` if it was not (the caller reads
    /// it under the lock instead).
    pub fn decode(
        &self,
        h: Handle,
        out: &mut [u8; crate::PAGE_SIZE],
    ) -> Option<Result<(), StoreError>> {
        self.payload(h).map(|p| Store::decode_payload(h, p, out))
    }

    /// Reads `want` (decided under the lock when the store's disk epoch was `epoch`) without
    /// the lock: one read per run of consecutive disk slots. On an error nothing is kept (the
    /// fault then reads each page under the lock, with `pread`, and fails closed if that fails
    /// too).
    pub fn fetch(&mut self, client: &Client, epoch: u64, want: Vec<(Handle, DiskRead)>) {
        let Some(disk) = client.disk.as_ref() else {
            return;
        };
        self.clear();
        self.epoch = epoch;
        let (runs, got, total) = read_runs(want);
        self.got = got;
        self.buf.resize(total, 0);
        let mut ops: Vec<(u64, &mut [u8])> = Vec::with_capacity(runs.len());
        let mut rest = &mut self.buf[..];
        for &(off, _, len) in &runs {
            let (head, tail) = rest.split_at_mut(len);
            ops.push((off, head));
            rest = tail;
        }
        if self.io.is_none() {
            self.io = disk.io().ok();
        }
        let read = match self.io.as_mut() {
            Some(io) => io.read_all(&mut ops),
            None => Err(std::io::Error::other("no descriptor for the disk file")),
        };
        drop(ops);
        match read {
            Ok(()) => {
                Counters::add(&client.counters.disk_reads, runs.len() as u64);
                Counters::add(&client.counters.disk_read_bytes, total as u64);
            }
            Err(e) => {
                Counters::add(&client.counters.disk_errors, 1);
                warn!(client = client.id, error = %e, "disk tier: reading pages back failed; retrying each under the lock");
                self.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_runs_join_consecutive_slots_and_pad_to_them() {
        let (a, b, c) = (vec![1u8; 50], vec![2u8; 64], vec![3u8; 10]);
        // Slots of 64 bytes at 128 and 192 (consecutive), one at 4096; given out of order.
        let (buf, runs) = write_runs(vec![
            (4096, 64, &c[..]),
            (192, 64, &b[..]),
            (128, 64, &a[..]),
        ]);
        assert_eq!(runs, vec![(128, 0, 128), (4096, 128, 138)]);
        assert_eq!(&buf[..50], &a[..]);
        assert_eq!(
            &buf[50..64],
            &[0u8; 14],
            "the rest of the first slot is zeros"
        );
        assert_eq!(&buf[64..128], &b[..]);
        assert_eq!(&buf[128..], &c[..]);
    }

    #[test]
    fn read_runs_read_consecutive_slots_at_once() {
        let h = |i: u64| Handle::from_bits((1 << 59) | (i << 13) | 1);
        let r = |off: u64, len: u32| DiskRead {
            off,
            len_bytes: len,
            slot_bytes: 128,
        };
        let (runs, got, total) = read_runs(vec![
            (h(2), r(256, 100)),
            (h(1), r(128, 128)),
            (h(3), r(1024, 7)),
            (h(2), r(256, 100)),
        ]);
        assert_eq!(runs, vec![(128, 0, 228), (1024, 228, 7)]);
        assert_eq!(
            got,
            vec![
                (h(1).to_bits(), 0, 128),
                (h(2).to_bits(), 128, 100),
                (h(3).to_bits(), 228, 7)
            ]
        );
        assert_eq!(total, 235);
    }
}
