//! Small allocation-free helpers over raw syscalls for the shim: messages to stderr, env
//! lookups, anonymous mappings, clocks.
//!
//! Owns: nothing stateful. Must not: allocate (these run in the agent thread and in the
//! interposed memory functions).

use std::ffi::CStr;

/// Writes `parts` to stderr as one line (one write call).
pub fn eprint_line(parts: &[&[u8]]) {
    let mut buf = [0u8; 512];
    let mut n = 0;
    for p in parts {
        let take = p.len().min(buf.len() - 1 - n);
        buf[n..n + take].copy_from_slice(&p[..take]);
        n += take;
    }
    buf[n] = b'\n';
    // SAFETY: writes `n + 1` initialised bytes from our stack buffer to fd 2.
    unsafe { libc::write(2, buf.as_ptr().cast(), n + 1) };
}

/// `getenv` without allocating; the bytes stay valid while the environment is not modified
/// (we only call it from the constructor, before `main`).
pub fn getenv(name: &CStr) -> Option<&'static [u8]> {
    // SAFETY: getenv takes a NUL-terminated name and returns NULL or a NUL-terminated string.
    let p = unsafe { libc::getenv(name.as_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null, NUL-terminated, owned by the environment.
    Some(unsafe { CStr::from_ptr(p) }.to_bytes())
}

/// An anonymous private mapping made with the raw syscall (never seen by our own `mmap`
/// interposer). Returns 0 on failure.
pub fn map_anon(len_bytes: usize, extra_flags: i32) -> usize {
    // SAFETY: a fresh anonymous mapping; no existing memory is affected.
    let p = unsafe {
        libc::syscall(
            libc::SYS_mmap,
            0usize,
            len_bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra_flags,
            -1i32,
            0usize,
        )
    };
    if p < 0 {
        0
    } else {
        p as usize
    }
}

/// A read-write shared mapping of `len_bytes` of descriptor `fd`, made with the raw syscall
/// (our own `mmap` interposer may wait for the agent). Returns 0 on failure.
pub fn map_shared(fd: i32, len_bytes: usize) -> usize {
    // SAFETY: a new mapping at an address the kernel picks; no existing memory is affected.
    let p = unsafe {
        libc::syscall(
            libc::SYS_mmap,
            0usize,
            len_bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0usize,
        )
    };
    if p < 0 {
        0
    } else {
        p as usize
    }
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Parses a decimal number at the start of `s` (after spaces).
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    let mut seen = false;
    for &c in s.iter().skip_while(|c| **c == b' ' || **c == b'\t') {
        if c.is_ascii_digit() {
            v = v.checked_mul(10)?.checked_add((c - b'0') as u64)?;
            seen = true;
        } else {
            break;
        }
    }
    seen.then_some(v)
}

pub fn parse_hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in s {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return None,
        };
        v = (v << 4) | d as u64;
    }
    Some(v)
}
