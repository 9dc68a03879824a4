//! Batched reads and writes of a disk tier's file through io_uring.
//!
//! Owns: one io_uring instance and a duplicate of the file's descriptor, and the submission and
//! completion of a batch of transfers at offsets of that file (a short transfer is resubmitted
//! for its remainder; a batch returns only once the kernel is done with every buffer, also when
//! one of them failed). Where io_uring cannot be set up (`kernel.io_uring_disabled`, a seccomp
//! filter) the same batches go through plain `pread`/`pwrite`, said once in the log.
//! Must not touch: store bookkeeping, page state, locks. Callers run it with no lock held: the
//! control thread for demotion writes, a fault thread for the reads of one fault.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use io_uring::{opcode, types, IoUring};

/// Submission queue entries of one ring.
const RING_ENTRIES: u32 = 64;

/// One ring over one file (or none, where io_uring is unavailable).
pub struct DiskIo {
    ring: Option<IoUring>,
    file: File,
}

/// One transfer: `len` bytes at `ptr` to or from offset `off`; `done` of them so far.
struct Transfer {
    off: u64,
    ptr: *mut u8,
    len: usize,
    done: usize,
}

impl DiskIo {
    /// A ring for `file` (a duplicate of the disk file's descriptor). Where io_uring is
    /// unavailable, a `DiskIo` that uses `pread`/`pwrite` (warned once per process).
    pub fn new(file: File) -> DiskIo {
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        let ring = match IoUring::new(RING_ENTRIES) {
            Ok(r) => Some(r),
            Err(e) => {
                if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(
                        error = %e,
                        "io_uring is not available: the disk tier reads and writes with pread/pwrite"
                    );
                }
                None
            }
        };
        DiskIo { ring, file }
    }

    /// Whether transfers go through io_uring.
    pub fn uses_uring(&self) -> bool {
        self.ring.is_some()
    }

    /// Writes every `(offset, bytes)`; returns once all are on the file (in the page cache:
    /// what any reader of the file, the shim's `pread` included, sees), or the first error.
    pub fn write_all(&mut self, ops: &[(u64, &[u8])]) -> io::Result<()> {
        if self.ring.is_none() {
            use std::os::unix::fs::FileExt;
            return ops
                .iter()
                .try_for_each(|(off, b)| self.file.write_all_at(b, *off));
        }
        let mut t: Vec<Transfer> = ops
            .iter()
            .map(|(off, b)| Transfer {
                off: *off,
                ptr: b.as_ptr() as *mut u8,
                len: b.len(),
                done: 0,
            })
            .collect();
        // SAFETY: every pointer is valid for reads of its length for the whole call (the
        // slices are borrowed until it returns), and `run` returns only after the kernel has
        // completed every submission; writes only read the buffers.
        unsafe { self.run(&mut t, true) }
    }

    /// Fills every `(offset, buffer)` from the file; a read past its end is an error.
    pub fn read_all(&mut self, ops: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        if self.ring.is_none() {
            use std::os::unix::fs::FileExt;
            return ops
                .iter_mut()
                .try_for_each(|(off, b)| self.file.read_exact_at(b, *off));
        }
        let mut t: Vec<Transfer> = ops
            .iter_mut()
            .map(|(off, b)| Transfer {
                off: *off,
                ptr: b.as_mut_ptr(),
                len: b.len(),
                done: 0,
            })
            .collect();
        // SAFETY: every pointer is valid for writes of its length for the whole call (the
        // buffers are borrowed mutably until it returns, and do not overlap: distinct `&mut`),
        // and `run` returns only after the kernel has completed every submission.
        unsafe { self.run(&mut t, false) }
    }

    /// Submits every transfer (at most a ring's worth at a time) and reaps completions until
    /// all are done; a short one is resubmitted for the rest.
    ///
    /// # Safety
    /// Each transfer's `ptr` must be valid for `len` bytes (reads for a write, writes for a
    /// read) until this returns, and no two read buffers may overlap.
    unsafe fn run(&mut self, t: &mut [Transfer], write: bool) -> io::Result<()> {
        let fd = types::Fd(self.file.as_raw_fd());
        let ring = self.ring.as_mut().expect("checked by the callers");
        let mut todo: Vec<usize> = (0..t.len()).rev().collect();
        let mut inflight = 0usize;
        let mut first_err: Option<io::Error> = None;
        while inflight > 0 || (first_err.is_none() && !todo.is_empty()) {
            if first_err.is_none() {
                let mut sq = ring.submission();
                // At most a ring's worth in flight: the completion queue (twice the size)
                // never overflows.
                while !sq.is_full() && inflight < RING_ENTRIES as usize {
                    let Some(i) = todo.pop() else { break };
                    let x = &t[i];
                    let rest = (x.len - x.done).min(u32::MAX as usize) as u32;
                    // SAFETY (of the arithmetic): `done < len`, so the pointer stays inside
                    // the caller's buffer.
                    let p = x.ptr.wrapping_add(x.done);
                    let off = x.off + x.done as u64;
                    let e = if write {
                        opcode::Write::new(fd, p, rest).offset(off).build()
                    } else {
                        opcode::Read::new(fd, p, rest).offset(off).build()
                    }
                    .user_data(i as u64);
                    // SAFETY: the entry names a buffer valid until this function returns (the
                    // caller's contract), and we wait for its completion before returning.
                    if unsafe { sq.push(&e) }.is_err() {
                        todo.push(i);
                        break;
                    }
                    inflight += 1;
                }
            }
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if inflight == 0 => return Err(e),
                Err(e) => {
                    // Nothing new is submitted; the ones in flight are still reaped below.
                    first_err.get_or_insert(e);
                }
            }
            for cqe in ring.completion() {
                inflight -= 1;
                let i = cqe.user_data() as usize;
                let res = cqe.result();
                let x = &mut t[i];
                if res == -libc::EINTR || res == -libc::EAGAIN {
                    todo.push(i);
                } else if res < 0 {
                    first_err.get_or_insert(io::Error::from_raw_os_error(-res));
                } else if res == 0 {
                    first_err.get_or_insert(io::Error::new(
                        if write {
                            io::ErrorKind::WriteZero
                        } else {
                            io::ErrorKind::UnexpectedEof
                        },
                        format!("disk tier: a transfer at offset {} stopped short", x.off),
                    ));
                } else {
                    x.done += res as usize;
                    if x.done < x.len {
                        todo.push(i);
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_larger_than_the_ring_write_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let f = tempfile::tempfile_in(dir.path()).unwrap();
        let mut io = DiskIo::new(f.try_clone().unwrap());
        if !io.uses_uring() {
            eprintln!("io_uring unavailable here: testing the pread/pwrite path only");
        }
        let n = 3 * RING_ENTRIES as usize + 5;
        let data: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; 100 + i]).collect();
        let ops: Vec<(u64, &[u8])> = data
            .iter()
            .enumerate()
            .map(|(i, d)| ((i * 4096) as u64, &d[..]))
            .collect();
        io.write_all(&ops).unwrap();
        let mut back: Vec<Vec<u8>> = (0..n).map(|i| vec![0u8; 100 + i]).collect();
        let mut rops: Vec<(u64, &mut [u8])> = back
            .iter_mut()
            .enumerate()
            .map(|(i, d)| ((i * 4096) as u64, &mut d[..]))
            .collect();
        io.read_all(&mut rops).unwrap();
        assert_eq!(back, data);
        // A plain pread (the shim's way) sees the same bytes.
        let mut one = vec![0u8; 107];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut one, 7 * 4096).unwrap();
        assert_eq!(one, data[7]);
    }

    #[test]
    fn read_past_the_end_is_an_error_after_every_completion() {
        let f = tempfile::tempfile().unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[1u8; 100], 0).unwrap();
        let mut io = DiskIo::new(f);
        let (mut a, mut b) = (vec![0u8; 50], vec![0u8; 50]);
        let mut ops: Vec<(u64, &mut [u8])> = vec![(0, &mut a[..]), (1 << 20, &mut b[..])];
        let err = io.read_all(&mut ops).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(a, vec![1u8; 50]);
    }
}
