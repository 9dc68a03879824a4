//! Helpers shared by the kernel-level test binaries.

/// Bytes in one page.
pub const PAGE: u64 = 4096;

/// A fresh private anonymous read-write mapping of `pages` pages: (base, length in bytes). The
/// caller owns it and unmaps it.
pub fn map_anon(pages: usize) -> (u64, usize) {
    let len = pages * PAGE as usize;
    // SAFETY: a fresh anonymous mapping at an address the kernel picks; nothing else uses it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    (p as u64, len)
}
