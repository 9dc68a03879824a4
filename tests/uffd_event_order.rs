//! The kernel fact behind `monitor::arrivals`, alone in its own test binary: no other test
//! may map memory while it runs, since a mapping made by another thread could land in the
//! range it frees and moves into.
//!
//! Its own threads map memory too: std maps a signal stack for every thread it spawns (guard
//! page included, 4 pages here: as large as R1) in the new thread as it starts, not in
//! `spawn`, and unmaps it when the thread exits. A thread first scheduled after A freed R1's old
//! range got its signal stack there; B's move into that range replaced half of it, and B's exit
//! unmapped R2 with it (SIGSEGV reading R2 at its new address, 1 run in 5). So each thread
//! spawned before the moves reports that it runs before anything moves.

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
    // Each thread started before the moves says so once it runs (its signal stack is mapped).
    let (started, wait_started) = std::sync::mpsc::channel::<()>();
    // A watchdog: an unexpected event order would leave a thread blocked on an unread event.
    // Generous: every step below has its own 5 s limit, and on a loaded machine (a kernel VM
    // on both CPUs) their sum passed the 30 s this used to allow without anything being stuck.
    static STAGE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let watchdog_started = started.clone();
    std::thread::spawn(move || {
        watchdog_started.send(()).unwrap();
        std::thread::sleep(std::time::Duration::from_secs(120));
        eprintln!(
            "unmap_of_a_moved_range...: no progress in 120 s, at stage {} (an event was never read)",
            STAGE.load(SeqCst)
        );
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
    // Thread B is started before anything moves, and runs before A is spawned: a thread's start
    // maps its signal stack, which could otherwise land in R1's old range, be half replaced by
    // B's move and unmapped over R2 at B's exit.
    let (go_b, wait_b) = std::sync::mpsc::channel::<()>();
    let b = std::thread::spawn(move || {
        started.send(()).unwrap();
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
    for _ in 0..2 {
        wait_started.recv().unwrap();
    }
    // Thread A moves R1 away (growing it so that it must move). It maps its own signal stack
    // before its mremap, so not in R1's old range.
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
    STAGE.store(1, SeqCst);
    // The first half of the fact: R1's old range is unmapped already, while A's REMAP is unread
    // (and nothing else was mapped there, which B's move would replace).
    let in_r1_old = mappings_within(r1_old, r1_old + r1_len as u64);
    assert!(
        in_r1_old.is_empty(),
        "R1's old range is not free while A's REMAP is unread (not unmapped yet, or a \
         thread's mapping landed in it): {in_r1_old:#?}"
    );

    // B moves R2 into R1's old range, free already; its REMAP queues behind A's.
    go_b.send(()).unwrap();
    // Wait until B's move is visible (R2's two pages mapped at R1's old address: nothing else
    // maps memory now), then give it time to queue its event.
    let t0 = std::time::Instant::now();
    while !r2_mapped_at(r1_old, r2_len) {
        assert!(t0.elapsed().as_secs() < 5, "B's mremap never happened");
        std::thread::yield_now();
    }

    std::thread::sleep(std::time::Duration::from_millis(100));
    STAGE.store(2, SeqCst);
    // Four events: both REMAPs, then (once each thread is woken) the unmap of each old range.
    let order: Vec<Event> = (0..4).map(|_| next()).collect();
    STAGE.store(3, SeqCst);
    // Later events are read and dropped until both threads are done: a thread's exit can
    // unmap memory of its own in a registered range's neighbourhood (the sigaltstack std maps
    // per thread), and its munmap would wait for that event forever (seen: 2 runs in 40 on a
    // loaded machine hung in B's exit).
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drain = {
        let (u, done) = (Arc::clone(&u), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut raw = [sys::UffdMsg::default(); 8];
            let mut ev = [Event::Unknown; 8];
            let mut extra = Vec::new();
            while !done.load(SeqCst) {
                let mut pfd = libc::pollfd {
                    fd: u.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: polling one pollfd on our stack.
                if unsafe { libc::poll(&mut pfd, 1, 20) } == 1 {
                    let n = u.read_events(&mut raw, &mut ev).unwrap_or(0);
                    extra.extend_from_slice(&ev[..n]);
                }
            }
            extra
        })
    };
    a.join().unwrap();
    let b_to = b.join().unwrap();
    done.store(true, SeqCst);
    let extra = drain.join().unwrap();
    STAGE.store(4, SeqCst);
    assert_eq!(
        b_to, r1_old,
        "R2 landed in R1's old range (later events: {extra:?})"
    );
    let pos = |want: &dyn Fn(&Event) -> bool| order.iter().position(want).unwrap_or(usize::MAX);
    let a_remap = pos(&|e| matches!(e, Event::Remap { from, .. } if *from == r1_old));
    let b_remap =
        pos(&|e| matches!(e, Event::Remap { from, to, .. } if *from == r2_old && *to == r1_old));
    // A's unmap of its old range: usually the whole range, sometimes (seen 1 run in 40 under
    // load) only its part past the first page, so any unmap within that range counts.
    let a_unmap = pos(&|e| {
        matches!(*e, Event::Unmap { start, end }
            if start >= r1_old && end <= r1_old + r1_len as u64 && start < end)
    });
    assert_eq!(a_remap, 0, "{order:?}");
    // A's unmap of its old range is reported after R2 moved in: stale for R2's pages.
    assert!(b_remap < a_unmap && a_unmap < 4, "{order:?}");
    // R2's page survived at its new address: an UNMAP applied blindly would have dropped it.
    assert!(
        r2_mapped_at(r1_old, r2_len),
        "R2 is not mapped at R1's old address any more: {:#?} (events: {order:?}, later: {extra:?})",
        mappings_within(r1_old, r1_old + r1_len as u64)
    );
    // SAFETY: reading the first page of R2 at its new address (mapped, checked just above, and
    // present: copied above).
    assert_eq!(unsafe { std::ptr::read_volatile(r1_old as *const u8) }, 9);
    // Closing the descriptor unregisters everything, so the unmaps below raise no event.
    drop(u);
    // SAFETY: unmapping what the test mapped (both threads are done).
    unsafe {
        libc::munmap(a_new.load(SeqCst) as *mut _, r1_len * 64);
        libc::munmap(r1_old as *mut _, r2_len);
    }
}

/// The lines of /proc/self/maps whose mapping overlaps `[start, end)`.
fn mappings_within(start: u64, end: u64) -> Vec<String> {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| {
            let range = l.split(' ').next().unwrap_or("");
            let (lo, hi) = range.split_once('-').unwrap_or(("0", "0"));
            let lo = u64::from_str_radix(lo, 16).unwrap();
            let hi = u64::from_str_radix(hi, 16).unwrap();
            lo < end && start < hi
        })
        .map(str::to_owned)
        .collect()
}

/// Whether one read-write mapping covers `[at, at + len)`, as R2 does once moved to `at`.
fn r2_mapped_at(at: u64, len: usize) -> bool {
    let lines = mappings_within(at, at + len as u64);
    lines.len() == 1 && {
        let mut fields = lines[0].split(' ');
        let (lo, hi) = fields.next().unwrap().split_once('-').unwrap();
        let (lo, hi) = (
            u64::from_str_radix(lo, 16).unwrap(),
            u64::from_str_radix(hi, 16).unwrap(),
        );
        lo <= at && at + len as u64 <= hi && fields.next().unwrap().starts_with("rw")
    }
}
