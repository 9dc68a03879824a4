//! Reading the program's own `/proc/self/maps` and `/proc/self/status` without allocating, to
//! find the anonymous regions worth managing (including the ones libc maps for itself, whose
//! `mmap`/`brk` calls never pass through our interposers) and the resident anonymous size.
//!
//! Owns: parsing. Must not: allocate or touch memory outside the caller's buffers (runs on the
//! agent thread).

use crate::raw::{parse_hex, parse_u64};

/// One line of /proc/self/maps.
#[derive(Debug, Clone, Copy)]
pub struct MapLine<'a> {
    pub start: u64,
    pub end: u64,
    pub readable: bool,
    pub writable: bool,
    pub private: bool,
    pub path: &'a [u8],
}

impl MapLine<'_> {
    /// Anonymous private writable memory the monitor may evict: no backing file (or the brk
    /// heap, or a name given with PR_SET_VMA_ANON_NAME), not a stack that grows down, not the
    /// kernel's special mappings.
    pub fn is_manageable(&self) -> bool {
        if !(self.readable && self.writable && self.private) {
            return false;
        }
        self.path.is_empty() || self.path == b"[heap]" || self.path.starts_with(b"[anon:")
    }
}

fn parse_line(line: &[u8]) -> Option<MapLine<'_>> {
    // "start-end perms offset dev inode   path"
    let mut fields = line.splitn(6, |c| *c == b' ');
    let range = fields.next()?;
    let perms = fields.next()?;
    let _offset = fields.next()?;
    let _dev = fields.next()?;
    let _inode = fields.next()?;
    let path = fields.next().unwrap_or(b"");
    let path = {
        let mut p = path;
        while let [b' ', rest @ ..] = p {
            p = rest;
        }
        p
    };
    let dash = range.iter().position(|c| *c == b'-')?;
    let start = parse_hex(&range[..dash])?;
    let end = parse_hex(&range[dash + 1..])?;
    if perms.len() < 4 {
        return None;
    }
    Some(MapLine {
        start,
        end,
        readable: perms[0] == b'r',
        writable: perms[1] == b'w',
        private: perms[3] == b'p',
        path,
    })
}

fn open_proc(path: &core::ffi::CStr) -> i32 {
    // SAFETY: a NUL-terminated path; returns a new descriptor or -1.
    unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) }
}

/// Calls `f` for each line of /proc/self/maps, streaming through `buf` (which must be larger
/// than the longest line). Returns false if the file could not be read.
pub fn for_each_mapping(buf: &mut [u8], mut f: impl FnMut(&MapLine<'_>)) -> bool {
    let fd = open_proc(c"/proc/self/maps");
    if fd < 0 {
        return false;
    }
    let mut have = 0usize;
    let mut ok = true;
    loop {
        // SAFETY: reads into the unused tail of our buffer.
        let n = unsafe { libc::read(fd, buf[have..].as_mut_ptr().cast(), buf.len() - have) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            ok = false;
            break;
        }
        let n = n as usize;
        let end = have + n;
        let mut line_start = 0;
        for i in have..end {
            if buf[i] == b'\n' {
                if let Some(l) = parse_line(&buf[line_start..i]) {
                    f(&l);
                }
                line_start = i + 1;
            }
        }
        if n == 0 {
            if line_start < end {
                if let Some(l) = parse_line(&buf[line_start..end]) {
                    f(&l);
                }
            }
            break;
        }
        buf.copy_within(line_start..end, 0);
        have = end - line_start;
        if have == buf.len() {
            ok = false; // a line longer than the buffer: give up on this scan
            break;
        }
    }
    // SAFETY: closing the descriptor we opened.
    unsafe { libc::close(fd) };
    ok
}

/// RssAnon from /proc/self/status, in bytes.
pub fn rss_anon_bytes(buf: &mut [u8]) -> Option<u64> {
    let fd = open_proc(c"/proc/self/status");
    if fd < 0 {
        return None;
    }
    let mut total = 0usize;
    while total < buf.len() {
        // SAFETY: reads into the unused tail of our buffer.
        let n = unsafe { libc::read(fd, buf[total..].as_mut_ptr().cast(), buf.len() - total) };
        if n <= 0 {
            break;
        }
        total += n as usize;
    }
    // SAFETY: closing the descriptor we opened.
    unsafe { libc::close(fd) };
    let text = &buf[..total];
    let key = b"RssAnon:";
    let pos = text.windows(key.len()).position(|w| w == key)?;
    parse_u64(&text[pos + key.len()..]).map(|kb| kb * 1024)
}
