//! The kernel fact behind `monitor::arrivals`, alone in its own test binary: no other test
//! may map memory while it runs, since a mapping made by another thread could land in the
//! range it frees and moves into.

use std::os::fd::AsRawFd;

use uswap::uffd::{sys, Event, Uffd};

mod common;
use common::{map_anon as map, PAGE};

/// The kernel fact behind `monitor::arrivals`: an mremap unmaps its old range at once but
/// reports that unmap only after its REMAP has been read, so another mremap can land in the
/// old range and be reported first. An UNMAP read later may be stale.
#[test]
fn unmap_of_a_moved_range_can_be_reported_after_another_region_moved_in() {
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    use std::sync::Arc;
    // A watchdog: an unexpected event order would leave a thread blocked on an unread event.
    std::thread::spawn(|| {
        std::thread::sleep(std::time::Duration::from_secs(30));
        eprintln!("unmap_of_a_moved_range...: no progress in 30 s (an event was never read)");
        std::process::exit(1);
    });
    let (r1_old, r1_len) = map(4);
    let (r2_old, r2_len) = map(2);
    let u = Arc::new(
        Uffd::create(
            sys::UFFD_FEATURE_EVENT_UNMAP | sys::UFFD_FEATURE_EVENT_REMAP,
            0,
            true,
        )
        .expect("userfaultfd (run as root or with /dev/userfaultfd access)"),
    );
    for (base, len) in [(r1_old, r1_len), (r2_old, r2_len)] {
        u.register(base, len as u64, sys::UFFDIO_REGISTER_MODE_MISSING)
            .unwrap();
    }
    let src = vec![9u8; PAGE as usize];
    u.copy(r2_old, src.as_ptr(), PAGE, false).unwrap();
    // Thread B is started before anything moves: a thread start maps memory (its signal
    // stack) that could otherwise land in R1's old range and be clobbered by B's move.
    let (go_b, wait_b) = std::sync::mpsc::channel::<()>();
    let b = std::thread::spawn(move || {
        wait_b.recv().unwrap();
        // SAFETY: moving the test's own mapping R2 into R1's old range, which thread A has
        // already unmapped (A's mremap is past its unmap, blocked on its REMAP event).
        (unsafe {
            libc::mremap(
                r2_old as *mut _,
                r2_len,
                r2_len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                r1_old as *mut libc::c_void,
            )
        }) as u64
    });
    // Thread A moves R1 away (growing it so that it must move).
    let a_new = Arc::new(AtomicU64::new(0));
    let an = Arc::clone(&a_new);
    let a = std::thread::spawn(move || {
        // SAFETY: moving the test's own mapping; its old address is not used by A afterwards.
        let p =
            unsafe { libc::mremap(r1_old as *mut _, r1_len, r1_len * 64, libc::MREMAP_MAYMOVE) };
        an.store(p as u64, SeqCst);
    });
    let mut raw = [sys::UffdMsg::default(); 1];
    let mut ev = [Event::Unknown; 1];
    let mut next = || {
        let mut pfd = libc::pollfd {
            fd: u.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polling one pollfd on our stack.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1, "no event");
        assert_eq!(u.read_events(&mut raw, &mut ev).unwrap(), 1);
        ev[0]
    };
    // A's REMAP is queued (not read yet). A has already unmapped R1's old range and waits.
    let mut pfd = libc::pollfd {
        fd: u.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polling one pollfd on our stack.
    let ready = unsafe { libc::poll(&mut pfd, 1, 5000) };
    assert_eq!(ready, 1, "no REMAP from A");

    // B moves R2 into R1's old range, free already; its REMAP queues behind A's.
    go_b.send(()).unwrap();
    // Wait until B's move is visible, then give it time to queue its event.
    let needle = format!("{:x}-", r1_old);
    let t0 = std::time::Instant::now();
    while !std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .any(|l| l.starts_with(&needle))
    {
        assert!(t0.elapsed().as_secs() < 5, "B's mremap never happened");
        std::thread::yield_now();
    }

    std::thread::sleep(std::time::Duration::from_millis(100));
    // Four events: both REMAPs, then (once each thread is woken) the unmap of each old range.
    let order: Vec<Event> = (0..4).map(|_| next()).collect();
    a.join().unwrap();
    assert_eq!(b.join().unwrap(), r1_old, "R2 landed in R1's old range");
    let pos = |want: &dyn Fn(&Event) -> bool| order.iter().position(want).unwrap_or(usize::MAX);
    let a_remap = pos(&|e| matches!(e, Event::Remap { from, .. } if *from == r1_old));
    let b_remap =
        pos(&|e| matches!(e, Event::Remap { from, to, .. } if *from == r2_old && *to == r1_old));
    let a_unmap = pos(&|e| {
        *e == Event::Unmap {
            start: r1_old,
            end: r1_old + r1_len as u64,
        }
    });
    assert_eq!(a_remap, 0, "{order:?}");
    // A's unmap of its old range is reported after R2 moved in: stale for R2's pages.
    assert!(b_remap < a_unmap && a_unmap < 4, "{order:?}");
    // R2's page survived at its new address: an UNMAP applied blindly would have dropped it.
    // SAFETY: reading the first page of R2 at its new address (present: copied above).
    assert_eq!(unsafe { std::ptr::read_volatile(r1_old as *const u8) }, 9);
    // Closing the descriptor unregisters everything, so the unmaps below raise no event.
    drop(u);
    // SAFETY: unmapping what the test mapped (both threads are done).
    unsafe {
        libc::munmap(a_new.load(SeqCst) as *mut _, r1_len * 64);
        libc::munmap(r1_old as *mut _, r2_len);
    }
}
