//! Reading the program's own `/proc/self/maps`, `/proc/self/smaps` and `/proc/self/status`
//! without allocating, to find the anonymous regions worth managing (including the ones libc
//! maps for itself, whose `mmap`/`brk` calls never pass through our interposers), whether any
//! is still registered with a userfaultfd, and the resident anonymous size.
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
    for_each_line(c"/proc/self/maps", buf, |line| {
        if let Some(l) = parse_line(line) {
            f(&l);
        }
    })
}

/// Whether some manageable mapping that a fork copies is still registered with a userfaultfd
/// for missing pages (`um`, and not `dc`, among its /proc/self/smaps VmFlags). The shim's
/// staging area is registered too, but MADV_DONTFORK (`dc`): the child gets none of it.
/// `None` if smaps could not be read.
pub fn any_manageable_registered(buf: &mut [u8]) -> Option<bool> {
    let mut current_manageable = false;
    let mut found = false;
    let ok = for_each_line(c"/proc/self/smaps", buf, |line| {
        if let Some(l) = parse_line(line) {
            current_manageable = l.is_manageable();
        } else if let Some(flags) = line.strip_prefix(b"VmFlags:") {
            let has = |flag: &[u8]| flags.split(|c| *c == b' ').any(|f| f == flag);
            if current_manageable && has(b"um") && !has(b"dc") {
                found = true;
            }
        }
    });
    ok.then_some(found)
}

/// Calls `f` for each line of the file at `path`, streaming through `buf` (which must be
/// larger than the longest line). Returns false if the file could not be read.
fn for_each_line(path: &core::ffi::CStr, buf: &mut [u8], mut f: impl FnMut(&[u8])) -> bool {
    let fd = open_proc(path);
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
                f(&buf[line_start..i]);
                line_start = i + 1;
            }
        }
        if n == 0 {
            if line_start < end {
                f(&buf[line_start..end]);
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
