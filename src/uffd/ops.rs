//! Range operations on a userfaultfd: REGISTER, UNREGISTER, WAKE, COPY, ZEROPAGE, MOVE and
//! WRITEPROTECT, plus reading event messages.
//!
//! Owns: the ioctl calls and their partial-progress reporting. Must not: allocate, retry or
//! keep state; callers (the monitor's fault service, the shim's agent) decide what to do with
//! a [`UffdError`].

use std::os::fd::AsRawFd;

use super::create::Uffd;
use super::error::{Op, UffdError};
use super::msg::Event;
use super::sys;

/// What [`Uffd::probe`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// A VMA registered with the descriptor holds the page, and no address-space event was
    /// pending at that moment.
    Registered,
    /// No VMA, or one not registered with the descriptor, holds the page.
    NotRegistered,
    /// An address-space event is pending (`mmap_changing`): nothing can be concluded now.
    Changing,
    /// The program's mm is gone.
    Gone,
    /// Any other answer (kept conservative by callers).
    Unknown,
}

/// One PROT_NONE page of our own, mapped once per process: a source the kernel cannot read.
fn unreadable_page() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: a fresh private anonymous mapping with no access; never unmapped, never
        // accessed by us.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                crate::PAGE_SIZE,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            0
        } else {
            p as usize
        }
    })
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Outcome of a successful UFFDIO_REGISTER: which ioctls the range supports.
#[derive(Debug, Clone, Copy)]
pub struct Registered {
    pub ioctls: u64,
}

impl Registered {
    /// Whether UFFDIO_MOVE may target this range (anonymous private memory).
    pub fn supports_move(&self) -> bool {
        self.ioctls & (1 << 0x05) != 0
    }
}

impl Uffd {
    fn ioctl<T>(&self, request: u64, arg: &mut T) -> i32 {
        // SAFETY: every caller passes the `#[repr(C)]` struct that `request` reads and writes;
        // the kernel touches nothing outside it.
        unsafe { libc::ioctl(self.as_raw_fd(), request as _, arg as *mut T) }
    }

    /// Registers `[start, start+len)` in `mode` (a combination of `UFFDIO_REGISTER_MODE_*`).
    pub fn register(&self, start: u64, len: u64, mode: u64) -> Result<Registered, UffdError> {
        let mut reg = sys::UffdioRegister {
            range: sys::UffdioRange { start, len },
            mode,
            ioctls: 0,
        };
        if self.ioctl(sys::UFFDIO_REGISTER, &mut reg) < 0 {
            return Err(UffdError::from_errno(Op::Register, errno(), 0));
        }
        Ok(Registered { ioctls: reg.ioctls })
    }

    pub fn unregister(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut range = sys::UffdioRange { start, len };
        if self.ioctl(sys::UFFDIO_UNREGISTER, &mut range) < 0 {
            return Err(UffdError::from_errno(Op::Unregister, errno(), 0));
        }
        Ok(())
    }

    /// Wakes threads waiting on faults in the range.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut range = sys::UffdioRange { start, len };
        if self.ioctl(sys::UFFDIO_WAKE, &mut range) < 0 {
            return Err(UffdError::from_errno(Op::Wake, errno(), 0));
        }
        Ok(())
    }

    /// Copies `len` bytes from the caller's `src` into the descriptor's mm at `dst` and, unless
    /// `dontwake`, wakes the waiters. Returns the bytes copied.
    pub fn copy(
        &self,
        dst: u64,
        src: *const u8,
        len: u64,
        dontwake: bool,
    ) -> Result<u64, UffdError> {
        let mode = if dontwake {
            sys::UFFDIO_COPY_MODE_DONTWAKE
        } else {
            0
        };
        let mut c = sys::UffdioCopy {
            dst,
            src: src as u64,
            len,
            mode,
            copy: 0,
        };
        if self.ioctl(sys::UFFDIO_COPY, &mut c) < 0 {
            return Err(UffdError::from_errno(
                Op::Copy,
                errno(),
                c.copy.max(0) as u64,
            ));
        }
        Ok(c.copy as u64)
    }

    /// Asks, without changing anything, whether the page at `addr` lies in a VMA registered
    /// with this descriptor and whether the address space is quiet (no REMOVE/UNMAP/REMAP
    /// event of the program is unread or being acted on).
    ///
    /// It is a UFFDIO_COPY of one page from a source the kernel cannot read (a PROT_NONE page
    /// of our own): the kernel looks the destination VMA up (ENOENT if there is none, or it is
    /// not registered), then checks `mmap_changing` (EAGAIN), then fails to read the source
    /// (EFAULT) before it installs anything. The page at `addr` is never touched.
    pub fn probe(&self, addr: u64) -> Probe {
        let src = unreadable_page();
        if src == 0 {
            return Probe::Unknown;
        }
        match self.copy(
            addr & !(crate::PAGE_SIZE as u64 - 1),
            src as *const u8,
            crate::PAGE_SIZE as u64,
            true,
        ) {
            Err(UffdError::Os {
                errno: libc::EFAULT,
                ..
            })
            | Err(UffdError::Exists { .. }) => Probe::Registered,
            Err(UffdError::NoSource { .. }) => Probe::NotRegistered,
            Err(UffdError::Retry { .. }) => Probe::Changing,
            Err(UffdError::TargetGone { .. }) => Probe::Gone,
            // The copy cannot succeed (the source is unreadable); anything else says nothing.
            Ok(_) | Err(_) => Probe::Unknown,
        }
    }

    /// Maps the zero page over `[start, start+len)`. Returns the bytes zeroed.
    pub fn zeropage(&self, start: u64, len: u64, dontwake: bool) -> Result<u64, UffdError> {
        let mode = if dontwake {
            sys::UFFDIO_ZEROPAGE_MODE_DONTWAKE
        } else {
            0
        };
        let mut z = sys::UffdioZeropage {
            range: sys::UffdioRange { start, len },
            mode,
            zeropage: 0,
        };
        if self.ioctl(sys::UFFDIO_ZEROPAGE, &mut z) < 0 {
            return Err(UffdError::from_errno(
                Op::Zeropage,
                errno(),
                z.zeropage.max(0) as u64,
            ));
        }
        Ok(z.zeropage as u64)
    }

    /// Moves pages from `src` to `dst` (both in the descriptor's mm, which on a stock kernel
    /// must be the caller's). `dst` must be registered with this descriptor. `mode` is a
    /// combination of `UFFDIO_MOVE_MODE_*`. Returns the bytes moved (holes included when
    /// ALLOW_SRC_HOLES is set).
    pub fn move_pages(&self, dst: u64, src: u64, len: u64, mode: u64) -> Result<u64, UffdError> {
        let mut m = sys::UffdioMove {
            dst,
            src,
            len,
            mode,
            moved: 0,
        };
        if self.ioctl(sys::UFFDIO_MOVE, &mut m) < 0 {
            return Err(UffdError::from_errno(
                Op::Move,
                errno(),
                m.moved.max(0) as u64,
            ));
        }
        Ok(m.moved as u64)
    }

    /// Sets (`protect`) or clears write protection on a range registered in WP mode.
    pub fn writeprotect(
        &self,
        start: u64,
        len: u64,
        protect: bool,
        dontwake: bool,
    ) -> Result<(), UffdError> {
        let mut mode = if protect {
            sys::UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        };
        if dontwake {
            mode |= sys::UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
        }
        let mut wp = sys::UffdioWriteprotect {
            range: sys::UffdioRange { start, len },
            mode,
        };
        if self.ioctl(sys::UFFDIO_WRITEPROTECT, &mut wp) < 0 {
            return Err(UffdError::from_errno(Op::Writeprotect, errno(), 0));
        }
        Ok(())
    }

    /// Reads as many messages as are queued (up to `buf.len()`), decoding each. Returns the
    /// number read: 0 when the descriptor is non-blocking and nothing is queued.
    /// Reads pending messages straight into `dst` (up to `max_msgs` of them): memory the
    /// caller shares with another process, so the messages survive this process being killed
    /// the instant the read returns (the monitor's event journal, `protocol/shm.rs`). Returns
    /// how many messages the kernel wrote (0 when none is pending).
    ///
    /// # Safety
    /// `dst` must be valid for writes of `max_msgs * 32` bytes for the duration of the call.
    pub unsafe fn read_raw(&self, dst: *mut u8, max_msgs: usize) -> Result<usize, UffdError> {
        let msg_len = std::mem::size_of::<sys::UffdMsg>();
        // SAFETY: the caller guarantees `dst` is writable for `max_msgs * msg_len` bytes; the
        // kernel writes whole messages and returns how many bytes it wrote.
        let rc = unsafe { libc::read(self.as_raw_fd(), dst.cast(), max_msgs * msg_len) };
        if rc < 0 {
            let e = errno();
            if e == libc::EAGAIN {
                return Ok(0);
            }
            return Err(UffdError::from_errno(Op::Read, e, 0));
        }
        Ok(rc as usize / msg_len)
    }

    pub fn read_events(
        &self,
        buf: &mut [sys::UffdMsg],
        out: &mut [Event],
    ) -> Result<usize, UffdError> {
        let n = buf.len().min(out.len());
        // SAFETY: `buf` is `n` initialised `UffdMsg` (plain old data); the kernel writes whole
        // 32-byte messages into it and returns how many bytes it wrote.
        let rc = unsafe {
            libc::read(
                self.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                n * std::mem::size_of::<sys::UffdMsg>(),
            )
        };
        if rc < 0 {
            let e = errno();
            if e == libc::EAGAIN {
                return Ok(0);
            }
            return Err(UffdError::from_errno(Op::Read, e, 0));
        }
        let count = rc as usize / std::mem::size_of::<sys::UffdMsg>();
        for i in 0..count {
            out[i] = Event::decode(&buf[i]);
        }
        Ok(count)
    }
}
