//! Creating a userfaultfd and negotiating its features (UFFDIO_API).
//!
//! Owns: the descriptor's lifetime. Must not: allocate (called from the shim's constructor).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::error::{Op, UffdError};
use super::sys;

/// A userfaultfd descriptor. Dropping it closes this copy; the kernel context lives while any
/// copy (in the program or the monitor) is open.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Creates a raw descriptor: the syscall first, then `/dev/userfaultfd`. Never with
/// `UFFD_USER_MODE_ONLY`.
fn create_raw(nonblock: bool) -> Result<OwnedFd, UffdError> {
    let flags = libc::O_CLOEXEC | if nonblock { libc::O_NONBLOCK } else { 0 };
    debug_assert_eq!(flags & sys::UFFD_USER_MODE_ONLY, 0);
    // SAFETY: userfaultfd(2) takes an int of flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as RawFd;
    if fd >= 0 {
        // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let syscall_errno = last_errno();
    // SAFETY: a valid NUL-terminated path; open(2) returns a new descriptor or -1.
    let dev = unsafe { libc::open(c"/dev/userfaultfd".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if dev < 0 {
        // Report the syscall's errno: it is the one that says "not permitted".
        return Err(UffdError::from_errno(Op::Create, syscall_errno, 0));
    }
    // SAFETY: `dev` was just opened by us.
    let dev = unsafe { OwnedFd::from_raw_fd(dev) };
    // SAFETY: USERFAULTFD_IOC_NEW takes the new descriptor's flags as its argument.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), sys::USERFAULTFD_IOC_NEW as _, flags) };
    if fd < 0 {
        return Err(UffdError::from_errno(Op::Create, last_errno(), 0));
    }
    // SAFETY: the ioctl returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn api(fd: BorrowedFd<'_>, features: u64) -> Result<sys::UffdioApi, UffdError> {
    let mut api = sys::UffdioApi {
        api: sys::UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one `struct uffdio_api`, which `api` is.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), sys::UFFDIO_API as _, &mut api) };
    if rc < 0 {
        return Err(UffdError::from_errno(Op::Api, last_errno(), 0));
    }
    Ok(api)
}

/// The features this kernel offers, probed on a throwaway descriptor (UFFDIO_API can be
/// called only once per descriptor).
pub fn probe_features() -> Result<u64, UffdError> {
    let fd = create_raw(true)?;
    Ok(api(fd.as_fd(), 0)?.features)
}

impl Uffd {
    /// Creates a descriptor and enables `wanted & available` features. `required` features
    /// must all be available or this fails with EINVAL.
    pub fn create(wanted: u64, required: u64, nonblock: bool) -> Result<Uffd, UffdError> {
        let available = probe_features()?;
        if available & required != required {
            return Err(UffdError::from_errno(Op::Api, libc::EINVAL, 0));
        }
        let fd = create_raw(nonblock)?;
        let got = api(fd.as_fd(), wanted & available)?;
        Ok(Uffd {
            fd,
            features: got.features,
        })
    }

    /// Wraps a descriptor received from elsewhere (the monitor's side of SCM_RIGHTS), after
    /// checking that it really is a userfaultfd (its anon inode name in our own fd table).
    /// `features` is what the sender says it negotiated.
    pub fn from_received(fd: OwnedFd, features: u64) -> Result<Uffd, UffdError> {
        let mut path = [0u8; 40];
        let link = format_fd_link(fd.as_raw_fd(), &mut path);
        let mut target = [0u8; 64];
        // SAFETY: `link` is NUL-terminated inside `path`; `target` is a writable buffer of the given length.
        let n = unsafe {
            libc::readlink(
                link.as_ptr().cast(),
                target.as_mut_ptr().cast(),
                target.len(),
            )
        };
        if n < 0 || &target[..n as usize] != b"anon_inode:[userfaultfd]" {
            return Err(UffdError::from_errno(Op::Api, libc::EBADF, 0));
        }
        Ok(Uffd { fd, features })
    }

    /// The negotiated features.
    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn has(&self, feature: u64) -> bool {
        self.features & feature == feature
    }

    pub fn into_owned_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Writes "/proc/self/fd/N\0" into `buf` without allocating; returns the used prefix.
fn format_fd_link(fd: RawFd, buf: &mut [u8; 40]) -> &[u8] {
    let prefix = b"/proc/self/fd/";
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 12];
    let mut n = fd.max(0) as u32;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[prefix.len() + i] = digits[len - 1 - i];
    }
    buf[prefix.len() + len] = 0;
    &buf[..prefix.len() + len + 1]
}
