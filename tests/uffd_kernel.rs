//! The uffd module against the real kernel: every ioctl it wraps, and the errno mapping callers
//! act on. Single process (stock kernels refuse cross-mm moves); a handler thread serves the
//! faults where a fault is needed.

use std::os::fd::AsRawFd;

use uswap::uffd::{sys, Event, FaultKind, Probe, Uffd, UffdError};

mod common;
use common::PAGE;

struct Map {
    base: u64,
    len: usize,
}

impl Map {
    fn new(pages: usize) -> Map {
        let (base, len) = common::map_anon(pages);
        Map { base, len }
    }
    fn page(&self, i: u64) -> u64 {
        self.base + i * PAGE
    }
    fn read(&self, i: u64) -> u8 {
        // SAFETY: inside our mapping; the page is present (callers make sure) or served.
        unsafe { std::ptr::read_volatile(self.page(i) as *const u8) }
    }
    fn write(&self, i: u64, v: u8) {
        // SAFETY: inside our mapping.
        unsafe { std::ptr::write_volatile(self.page(i) as *mut u8, v) }
    }
    fn resident(&self, i: u64) -> bool {
        let mut v = 0u8;
        // SAFETY: mincore of one page of our mapping into one byte.
        unsafe { libc::mincore(self.page(i) as *mut _, PAGE as usize, &mut v) };
        v & 1 == 1
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.base as *mut _, self.len) };
    }
}

fn uffd(features: u64) -> Uffd {
    Uffd::create(features, 0, true)
        .expect("userfaultfd (run as root or with /dev/userfaultfd access)")
}

#[test]
fn api_negotiates_move_and_events_without_user_mode_only() {
    let u = uffd(uswap::uffd::FORWARDED_FEATURES);
    assert!(
        u.has(sys::UFFD_FEATURE_MOVE),
        "features {:#x}",
        u.features()
    );
    assert!(u.has(
        sys::UFFD_FEATURE_EVENT_REMOVE
            | sys::UFFD_FEATURE_EVENT_UNMAP
            | sys::UFFD_FEATURE_EVENT_REMAP
    ));
    // The descriptor is recognised as a userfaultfd on the receiving side; a pipe is not.
    let fd = u.into_owned_fd();
    assert!(Uffd::from_received(fd, 0).is_ok());
    let mut p = [0i32; 2];
    // SAFETY: pipe(2) into a local array.
    assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
    // SAFETY: taking ownership of the read end; the write end is closed below.
    let not_uffd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(p[0]) };
    // SAFETY: closing our write end.
    unsafe { libc::close(p[1]) };
    assert!(Uffd::from_received(not_uffd, 0).is_err());
}

#[test]
fn copy_zeropage_and_exists() {
    let m = Map::new(8);
    let u = uffd(0);
    let reg = u
        .register(m.base, m.len as u64, sys::UFFDIO_REGISTER_MODE_MISSING)
        .unwrap();
    assert!(reg.supports_move());
    let src = vec![0xabu8; 2 * PAGE as usize];
    assert_eq!(
        u.copy(m.page(0), src.as_ptr(), 2 * PAGE, false).unwrap(),
        2 * PAGE
    );
    assert_eq!((m.read(0), m.read(1)), (0xab, 0xab));
    // A second copy over a present page: EEXIST, nothing done.
    assert!(matches!(
        u.copy(m.page(1), src.as_ptr(), PAGE, false),
        Err(UffdError::Exists { done_bytes: 0, .. })
    ));
    // Zero pages over pages 2..5; a run that hits a present page stops there with EEXIST and
    // reports the part done.
    assert_eq!(u.zeropage(m.page(2), 3 * PAGE, false).unwrap(), 3 * PAGE);
    assert_eq!(m.read(3), 0);
    let e = u.zeropage(m.page(5), 3 * PAGE, false);
    assert!(e.is_ok(), "{e:?}");
    match u.zeropage(m.page(4), 2 * PAGE, false) {
        Err(UffdError::Exists { .. }) => {}
        other => panic!("expected EEXIST, got {other:?}"),
    }
    u.wake(m.base, m.len as u64).unwrap();
    u.unregister(m.base, m.len as u64).unwrap();
}

/// What the fault thread's prefetch relies on: a COPY of a run that meets a present page
/// installs the pages before it, reports them as done (the kernel turns the EEXIST into a
/// partial copy, EAGAIN, once something was copied), overwrites nothing, and leaves the pages
/// after it alone; a run starting at a present page does nothing (EEXIST).
#[test]
fn copy_run_stopping_at_present_page_reports_part_done() {
    let m = Map::new(8);
    let u = uffd(0);
    u.register(m.base, m.len as u64, sys::UFFDIO_REGISTER_MODE_MISSING)
        .unwrap();
    let present = vec![0x11u8; PAGE as usize];
    assert_eq!(
        u.copy(m.page(3), present.as_ptr(), PAGE, false).unwrap(),
        PAGE
    );
    let run = vec![0x22u8; 6 * PAGE as usize];
    match u.copy(m.page(0), run.as_ptr(), 6 * PAGE, false) {
        Err(e @ (UffdError::Retry { .. } | UffdError::Exists { .. })) => {
            assert_eq!(e.done_bytes(), 3 * PAGE, "{e:?}")
        }
        other => panic!("expected a partial copy, got {other:?}"),
    }
    assert_eq!((m.read(0), m.read(2), m.read(3)), (0x22, 0x22, 0x11));
    assert!(!m.resident(4) && !m.resident(5));
    assert!(matches!(
        u.copy(m.page(3), run.as_ptr(), 3 * PAGE, false),
        Err(UffdError::Exists { done_bytes: 0, .. })
    ));
    assert!(!m.resident(4));
    u.unregister(m.base, m.len as u64).unwrap();
}

#[test]
fn move_with_src_holes_busy_and_errors() {
    let m = Map::new(8);
    let staging = Map::new(8);
    let u = uffd(sys::UFFD_FEATURE_MOVE);
    u.register(
        staging.base,
        staging.len as u64,
        sys::UFFDIO_REGISTER_MODE_MISSING,
    )
    .unwrap();
    for i in 0..4 {
        if i != 2 {
            m.write(i, 10 + i as u8);
        }
    }
    // Page 2 is a hole: without ALLOW_SRC_HOLES the move stops there.
    match u.move_pages(
        staging.page(0),
        m.page(0),
        4 * PAGE,
        sys::UFFDIO_MOVE_MODE_DONTWAKE,
    ) {
        Err(UffdError::Retry { done_bytes, .. }) | Err(UffdError::NoSource { done_bytes, .. }) => {
            assert_eq!(done_bytes, 2 * PAGE)
        }
        other => panic!("expected a partial move, got {other:?}"),
    }
    // With ALLOW_SRC_HOLES the rest moves and the hole stays a hole in staging.
    let n = u
        .move_pages(
            staging.page(2),
            m.page(2),
            2 * PAGE,
            sys::UFFDIO_MOVE_MODE_DONTWAKE | sys::UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES,
        )
        .unwrap();
    assert_eq!(n, 2 * PAGE);
    assert_eq!(
        (staging.read(0), staging.read(1), staging.read(3)),
        (10, 11, 13)
    );
    assert!(!staging.resident(2));
    assert!(
        !m.resident(0) && !m.resident(3),
        "moved pages leave the source"
    );
    // Destination already populated: EEXIST.
    m.write(5, 1);
    assert!(matches!(
        u.move_pages(
            staging.page(0),
            m.page(5),
            PAGE,
            sys::UFFDIO_MOVE_MODE_DONTWAKE
        ),
        Err(UffdError::Exists { .. })
    ));
    // Destination not registered with this descriptor: EINVAL.
    m.write(6, 1);
    assert!(matches!(
        u.move_pages(m.page(7), m.page(6), PAGE, 0),
        Err(UffdError::Os {
            errno: libc::EINVAL,
            ..
        })
    ));
    // A page shared copy-on-write with a forked child: EBUSY (even after the child is gone).
    m.write(6, 66);
    // SAFETY: the child only exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: leaving the child at once.
        unsafe { libc::_exit(0) };
    }
    let mut st = 0;
    // SAFETY: reaping our child.
    unsafe { libc::waitpid(pid, &mut st, 0) };
    assert!(matches!(
        u.move_pages(staging.page(4), m.page(6), PAGE, 0),
        Err(UffdError::Busy { .. })
    ));
    // After the parent writes it, the page is exclusive again and moves.
    m.write(6, 67);
    u.move_pages(staging.page(4), m.page(6), PAGE, 0).unwrap();
    assert_eq!(staging.read(4), 67);
}

#[test]
fn writeprotect_and_fault_events_decode() {
    let m = Map::new(4);
    let u = std::sync::Arc::new(uffd(sys::UFFD_FEATURE_THREAD_ID));
    u.register(
        m.base,
        m.len as u64,
        sys::UFFDIO_REGISTER_MODE_MISSING | sys::UFFDIO_REGISTER_MODE_WP,
    )
    .unwrap();
    let page = vec![5u8; PAGE as usize];
    u.copy(m.page(0), page.as_ptr(), PAGE, false).unwrap();
    u.writeprotect(m.page(0), PAGE, true, false).unwrap();
    // A handler thread: serves the missing-page read of page 1, then the WP fault of page 0.
    let (h, base) = (std::sync::Arc::clone(&u), m.base);
    let handler = std::thread::spawn(move || {
        let mut raw = [sys::UffdMsg::default(); 4];
        let mut ev = [Event::Unknown; 4];
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let mut pfd = libc::pollfd {
                fd: h.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polling one pollfd on our stack.
            unsafe { libc::poll(&mut pfd, 1, 5000) };
            let n = h.read_events(&mut raw, &mut ev).unwrap();
            for e in &ev[..n] {
                if let Event::Pagefault { addr, kind, tid } = *e {
                    assert!(tid > 0);
                    match kind {
                        FaultKind::Read => {
                            let z = vec![9u8; PAGE as usize];
                            h.copy(addr, z.as_ptr(), PAGE, false).unwrap();
                        }
                        FaultKind::WriteProtect => {
                            h.writeprotect(addr, PAGE, false, false).unwrap()
                        }
                        k => panic!("unexpected fault kind {k:?}"),
                    }
                    seen.push((addr - base) / PAGE);
                }
            }
        }
        seen
    });
    assert_eq!(m.read(1), 9); // missing fault, served by COPY
    m.write(0, 6); // write-protect fault, served by un-protecting
    assert_eq!(m.read(0), 6);
    let mut seen = handler.join().unwrap();
    seen.sort();
    assert_eq!(seen, vec![0, 1]);
}

#[test]
fn remove_and_unmap_events_are_delivered() {
    let m = Map::new(4);
    let u = std::sync::Arc::new(uffd(
        sys::UFFD_FEATURE_EVENT_REMOVE | sys::UFFD_FEATURE_EVENT_UNMAP,
    ));
    u.register(m.base, m.len as u64, sys::UFFDIO_REGISTER_MODE_MISSING)
        .unwrap();
    let h = std::sync::Arc::clone(&u);
    let reader = std::thread::spawn(move || {
        let mut raw = [sys::UffdMsg::default(); 4];
        let mut ev = [Event::Unknown; 4];
        let mut got = Vec::new();
        while got.len() < 2 {
            let mut pfd = libc::pollfd {
                fd: h.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polling one pollfd on our stack.
            unsafe { libc::poll(&mut pfd, 1, 5000) };
            let n = h.read_events(&mut raw, &mut ev).unwrap();
            got.extend_from_slice(&ev[..n]);
        }
        got
    });
    // Both calls block until the reader has read their event.
    // SAFETY: advising / unmapping parts of our own mapping.
    unsafe {
        libc::madvise(m.page(0) as *mut _, PAGE as usize, libc::MADV_DONTNEED);
        libc::munmap(m.page(3) as *mut _, PAGE as usize);
    }
    let got = reader.join().unwrap();
    assert_eq!(
        got[0],
        Event::Remove {
            start: m.page(0),
            end: m.page(1)
        }
    );
    assert_eq!(
        got[1],
        Event::Unmap {
            start: m.page(3),
            end: m.page(4)
        }
    );
}

#[test]
fn copy_from_unmapped_source_installs_nothing() {
    // The monitor's liveness probe relies on this: a UFFDIO_COPY whose source is unmapped fails
    // (EFAULT) without installing a page at the destination.
    let m = Map::new(2);
    let u = uffd(0);
    u.register(m.base, m.len as u64, sys::UFFDIO_REGISTER_MODE_MISSING)
        .unwrap();
    match u.copy(m.page(0), PAGE as *const u8, PAGE, true) {
        Err(UffdError::Os {
            errno: libc::EFAULT,
            done_bytes: 0,
            ..
        }) => {}
        other => panic!("expected EFAULT, got {other:?}"),
    }
    assert!(!m.resident(0), "nothing may be installed");
    let src = vec![3u8; PAGE as usize];
    assert_eq!(u.copy(m.page(0), src.as_ptr(), PAGE, false).unwrap(), PAGE);
    assert_eq!(m.read(0), 3);
}

#[test]
fn probe_tells_registered_unregistered_and_changing_without_touching_pages() {
    let m = Map::new(4);
    let other = Map::new(1);
    let u = std::sync::Arc::new(uffd(sys::UFFD_FEATURE_EVENT_UNMAP));
    u.register(m.base, m.len as u64, sys::UFFDIO_REGISTER_MODE_MISSING)
        .unwrap();
    // A missing page and a present one of a registered VMA; neither is changed.
    assert_eq!(u.probe(m.page(0)), Probe::Registered);
    assert!(!m.resident(0), "the probe installed a page");
    let src = vec![7u8; PAGE as usize];
    u.copy(m.page(1), src.as_ptr(), PAGE, false).unwrap();
    assert_eq!(u.probe(m.page(1)), Probe::Registered);
    assert_eq!(m.read(1), 7);
    // Memory not registered with this descriptor, and no memory at all.
    assert_eq!(u.probe(other.page(0)), Probe::NotRegistered);
    let unmapped = m.page(3);
    // While an UNMAP event is unread, the address space is changing.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = std::sync::Arc::clone(&done);
    let unmapper = std::thread::spawn(move || {
        // SAFETY: unmapping the last page of the test's own mapping; nothing uses it after.
        unsafe { libc::munmap(unmapped as *mut _, PAGE as usize) };
        d.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let mut pfd = libc::pollfd {
        fd: u.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polling one pollfd on our stack.
    let ready = unsafe { libc::poll(&mut pfd, 1, 5000) };
    assert_eq!(ready, 1, "no UNMAP event");
    assert_eq!(u.probe(m.page(0)), Probe::Changing);
    // Kernels differ in which they check first (6.12 looks the VMA up first; 6.18 checks
    // `mmap_changing` first); the monitor trusts "not registered" only after a quiet probe.
    let p = u.probe(unmapped);
    assert!(matches!(p, Probe::NotRegistered | Probe::Changing), "{p:?}");
    let mut raw = [sys::UffdMsg::default(); 1];
    let mut ev = [Event::Unknown; 1];
    assert_eq!(u.read_events(&mut raw, &mut ev).unwrap(), 1);
    unmapper.join().unwrap();
    assert!(done.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(u.probe(m.page(0)), Probe::Registered);
    assert!(!m.resident(0));
}
