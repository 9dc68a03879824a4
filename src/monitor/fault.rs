//! The fault thread of one client: the only reader of its userfaultfd.
//!
//! Order of work in each round (the order matters):
//! 1. `read_begin += 1`, read every queued message, apply every REMOVE/UNMAP/REMAP first (in
//!    the order read) and log it in the window for the agent, then `read_end = read_begin`.
//!    Applying discards before serving the faults read with them means a fault on a page that
//!    was discarded in the same read gets zeros, which is what the program asked for.
//! 2. Process the agent's completed batches (pages enter the window, or go back to `Absent`).
//! 3. Serve faults: new ones, ones parked on a batch that has now completed, and ones whose
//!    COPY failed with EAGAIN (a REMOVE/UNMAP/REMAP was queued; step 1 of the next round reads
//!    it, then the copy is retried).
//!
//! It never blocks on the agent: it only polls the uffd, the agent's done eventfd and its own
//! command eventfd. After a round that served faults it first spins for a while (non-blocking
//! polls, adaptive budget capped by config `fault_spin`; `monitor/spin.rs`), since waking a
//! blocked thread from the other vCPU takes 20–40 µs on this VM.
//!
//! A fault on an evicted page brings back the evicted pages next to it that the fault's
//! stream will want (`monitor/prefetch.rs`: forward or backward runs, up to
//! `prefetch_pages`). A forward run is split: the COPY that wakes the faulting thread holds
//! the faulting page and the next one only, and the rest follows in COPYs of 4 pages, so the
//! thread waits for two decompressions rather than seventeen (BENCHMARKS.md, "Splitting a
//! forward prefetch run"). A backward run comes back with the faulting page in one ioctl, a
//! run still in the cross-mm arena moves back whole, and a constant-stride stream gets its
//! pages one ioctl each, after the faulting page. Only `Window`/`Stored` pages are ever
//! gathered, and a copy never overwrites a present page (EEXIST; the run stops there and what
//! was copied is settled).

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, warn};

use super::arrivals::Arrivals;
use super::client::{drain, Client};
use super::disktier::DiskReads;
use super::pages::{FaultPlan, PageState, Released};
use super::pagetrace::rec;
use super::prefetch::{self, Detector};
use super::spin::SpinBudget;
use super::stats::Counters;
use crate::protocol::shm;
use crate::store::{DiskRead, Handle};
use crate::uffd::{sys, Event, Probe, UffdError};
use crate::PAGE_SIZE;

const PAGE_BYTES: u64 = PAGE_SIZE as u64;
const MSGS_PER_READ: usize = shm::JOURNAL_MSGS;
/// A fault parked on the agent's batch for longer than this is logged (once per client): the
/// agent's work per batch is bounded (at most `MAX_BATCH_PAGES` moves and copies), so a wait this
/// long means the program's agent thread is not being scheduled.
const SLOW_AGENT: std::time::Duration = std::time::Duration::from_secs(1);
/// `spin_loop` hints between two non-blocking polls of a spin (each poll is also followed by
/// a `sched_yield`, see the spin loop).
const SPIN_HINTS: u32 = 16;
/// Pages after the faulting one in the COPY that wakes the faulting thread of a forward stream
/// (the one it touches next), when they have to be gathered; the rest of its prefetch window
/// follows in COPYs of [`PREFETCH_COPY_PAGES`].
const FIRST_COPY_AHEAD_PAGES: u64 = 1;
const PREFETCH_COPY_PAGES: u64 = 4;
/// How often the fault thread publishes its CPU time while it runs.
const CPU_SAMPLE: std::time::Duration = std::time::Duration::from_millis(100);

struct Pending {
    addr: u64,
    since: Instant,
    /// Set when parked on a batch.
    waited: bool,
    /// Held back until then (config `throttle`) unless resident memory is back under the
    /// throttle line first: read while it was over (`monitor/rss.rs`).
    hold_until: Option<Instant>,
    /// What to prefetch with it, decided once (at the first attempt that finds the page
    /// evicted), so a retried service does not feed the detector twice.
    prefetch: Option<prefetch::Plan>,
}

/// Runs until the client goes away. Returns why.
pub fn run(client: Arc<Client>) -> &'static str {
    let why = serve_loop(&client);
    client
        .counters
        .fault_thread_cpu_ns
        .store(super::stats::thread_cpu_ns(), Ordering::Relaxed);
    why
}

fn serve_loop(client: &Arc<Client>) -> &'static str {
    let client = Arc::clone(client);
    let win = client.win();
    let uffd_fd = client.uffd.as_raw_fd();
    let done_fd = client.done_efd.as_raw_fd();
    let cmd_fd = client.cmd_efd.as_raw_fd();
    let mut raw = [sys::UffdMsg::default(); MSGS_PER_READ];
    let mut events = [Event::Unknown; MSGS_PER_READ];
    let mut pending: Vec<Pending> = Vec::new();
    let mut buf = vec![0u8; PAGE_SIZE * (1 + client.cfg.prefetch_pages as usize)];
    // Cross-mm backend: pages are gathered in private anonymous memory of ours, which the
    // kernel can move into the program (UFFDIO_MOVE needs whole anonymous pages on both sides).
    let mut xbuf = if client.cfg.move_in_decompressed && client.cross_mm.load(Ordering::Relaxed) {
        match memmap2::MmapMut::map_anon(buf.len()) {
            Ok(m) => Some(m),
            Err(e) => {
                warn!(
                    client = client.id,
                    "cannot map the fault buffer ({e}): copying instead"
                );
                None
            }
        }
    } else {
        None
    };
    let mut waiting = 0usize;
    let mut warned_slow = false;
    let mut arrivals = Arrivals::default();
    let mut detector = Detector::new(client.cfg.prefetch_pages);
    // Disk tier: the payloads of disk pages read for the fault being served.
    let mut disk = DiskReads::default();
    let mut spin = SpinBudget::new(client.cfg.fault_spin.as_nanos() as u64);
    // When the last round that served a fault ended.
    let mut served_at: Option<Instant> = None;
    let mut cpu_sampled = Instant::now();
    loop {
        if client.closing.load(Ordering::Acquire) {
            return "closing";
        }
        let unsettled = arrivals.has_unconfirmed() || !arrivals.doubtful().is_empty();
        let timeout_ms = if pending.is_empty() && !unsettled {
            200
        } else {
            1
        };
        let mut pfds = [
            libc::pollfd {
                fd: uffd_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: done_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: cmd_fd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let spin_ns = served_at.map_or(0, |_| spin.budget_ns());
        let mut ready = false;
        if spin_ns > 0 {
            let t0 = Instant::now();
            let waited_ns = loop {
                // SAFETY: polling three pollfds on our stack, without waiting.
                ready = unsafe { libc::poll(pfds.as_mut_ptr(), 3, 0) } > 0;
                let waited_ns = t0.elapsed().as_nanos() as u64;
                if ready || waited_ns >= spin_ns {
                    break waited_ns;
                }
                for _ in 0..SPIN_HINTS {
                    std::hint::spin_loop();
                }
                // When the thread we just woke shares our CPU, it runs now rather than when
                // the spin ends (without this, spinning raised the same-CPU fault p99 from
                // ~15 to 60-1600 µs; BENCHMARKS.md). With nothing else to run it returns at
                // once.
                // SAFETY: no arguments; only gives up the CPU.
                unsafe { libc::sched_yield() };
            };
            Counters::add(&client.counters.fault_spin_ns, waited_ns);
            if !ready {
                spin.on_empty();
                Counters::add(&client.counters.fault_spins_empty, 1);
            } else if pfds[0].revents != 0 {
                spin.on_hit(waited_ns);
                Counters::add(&client.counters.fault_spins_hit, 1);
            }
        }
        if !ready {
            // SAFETY: polling three pollfds on our stack.
            unsafe { libc::poll(pfds.as_mut_ptr(), 3, timeout_ms) };
            if let Some(t) = served_at {
                if pfds[0].revents & libc::POLLIN != 0 {
                    spin.on_blocked(t.elapsed().as_nanos() as u64);
                }
            }
            if cpu_sampled.elapsed() >= CPU_SAMPLE {
                cpu_sampled = Instant::now();
                client
                    .counters
                    .fault_thread_cpu_ns
                    .store(super::stats::thread_cpu_ns(), Ordering::Relaxed);
            }
        }
        served_at = None;
        if pfds[0].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            return "userfaultfd closed";
        }
        if pfds[2].revents & libc::POLLIN != 0 {
            drain(cmd_fd);
        }
        // 1. Events.
        if pfds[0].revents & libc::POLLIN != 0 {
            loop {
                // Cross-mm: the monitor's own moves check the page words under the client's
                // lock, so events are read *and* applied under it: no event can then be read
                // (letting the program's address space change) yet not applied while a move
                // runs. The read never blocks (the descriptor is non-blocking).
                let held = client
                    .cross_mm
                    .load(Ordering::Relaxed)
                    .then(|| client.state.lock());
                win.read_begin().fetch_add(1, Ordering::SeqCst);
                // Read into the window's event journal (see `protocol/shm.rs`): what is read
                // stays readable by the shim's guardian until it is applied, whenever this
                // process dies.
                win.journal_begin();
                // SAFETY: the journal is JOURNAL_MSGS messages of the window mapping, which
                // outlives this loop.
                let read = unsafe { client.uffd.read_raw(win.journal_msgs_ptr(), MSGS_PER_READ) };
                let n = match read {
                    Ok(n) => n,
                    Err(e) => {
                        win.journal_state()
                            .store(shm::JOURNAL_IDLE, Ordering::SeqCst);
                        win.read_end()
                            .store(win.read_begin().load(Ordering::SeqCst), Ordering::SeqCst);
                        warn!(client = client.id, "reading the userfaultfd: {e}");
                        return "userfaultfd read failed";
                    }
                };
                for (i, ev) in events[..n].iter_mut().enumerate() {
                    raw[i] = sys::UffdMsg::from_words(win.journal_msg(i));
                    *ev = Event::decode(&raw[i]);
                }
                let t_read = Instant::now();
                apply_events(&client, &events[..n], &mut arrivals, held);
                // Only a REMAP adds an unconfirmed destination (`settle` publishes the shrink).
                if events[..n].iter().any(|e| matches!(e, Event::Remap { .. })) {
                    win.journal_set_dests(arrivals.unconfirmed());
                }
                win.journal_state()
                    .store(shm::JOURNAL_IDLE, Ordering::SeqCst);
                win.read_end()
                    .store(win.read_begin().load(Ordering::SeqCst), Ordering::SeqCst);
                let hold_until = client
                    .rss
                    .should_hold(&client.counters, client.throttle_line_bytes)
                    .then(|| t_read + client.cfg.throttle);
                for ev in &events[..n] {
                    if let Event::Pagefault { addr, .. } = *ev {
                        rec(client.id, "fault", addr, 0, 0);
                        Counters::add(&client.counters.faults, 1);
                        pending.push(Pending {
                            addr,
                            since: t_read,
                            waited: false,
                            hold_until,
                            prefetch: None,
                        });
                    }
                }
                if n < MSGS_PER_READ {
                    break;
                }
            }
        }
        // 2. Completions (the agent signals each one; parked faults are retried on the next
        //    signal or, as a safety net, on the 1 ms poll timeout).
        if pfds[1].revents & libc::POLLIN != 0 || (waiting > 0 && pfds[0].revents == 0) {
            drain(done_fd);
            complete_batches(&client);
        }
        // 3. Stale unmaps: confirm arrivals, settle doubtful pages.
        if arrivals.has_unconfirmed() || !arrivals.doubtful().is_empty() {
            if let Err(why) = settle(&client, &mut arrivals) {
                return why;
            }
            win.journal_set_dests(arrivals.unconfirmed());
        }
        // 4. Faults.
        if !pending.is_empty() {
            let mut still = Vec::new();
            waiting = 0;
            let throttled = pending.iter().any(|p| p.hold_until.is_some())
                && client
                    .rss
                    .should_hold(&client.counters, client.throttle_line_bytes);
            let now = Instant::now();
            for mut p in pending.drain(..) {
                // Throttle: held until eviction has brought memory back under the line, or for
                // config `throttle` at most; the 1 ms poll timeout while faults are pending
                // releases it on time.
                if let Some(until) = p.hold_until {
                    if throttled && now < until {
                        still.push(p);
                        continue;
                    }
                    p.hold_until = None;
                    Counters::add(&client.counters.faults_throttled, 1);
                    Counters::add(
                        &client.counters.throttle_ns,
                        now.saturating_duration_since(p.since).as_nanos() as u64,
                    );
                }
                // Config `move_in_decompressed` (off by default): in the TCG VM with the debug
                // kernel a fault on a compressed page (isolated, same CPU) took 242 µs p50 moved
                // against 191 µs copied (BENCHMARKS.md): the monitor must first fault its own
                // gather page in, and the move flushes the TLB of the monitor's multi-threaded
                // mm. Pages still in the arena always move back (zero-copy).
                let move_in = client.cfg.move_in_decompressed
                    && client.cross_mm.load(Ordering::Relaxed)
                    && !client.move_in_refused.load(Ordering::Relaxed);
                let gather: &mut [u8] = match xbuf.as_mut() {
                    Some(x) if move_in => &mut x[..],
                    _ => &mut buf[..],
                };
                let fault = Fault {
                    addr: p.addr,
                    prefetch: &mut p.prefetch,
                };
                match serve(
                    &client,
                    fault,
                    gather,
                    &mut arrivals,
                    &mut detector,
                    move_in,
                    &mut disk,
                ) {
                    Served::ReadDisk(..) => unreachable!("handled inside `serve`"),
                    Served::Done { refault, from_disk } => {
                        served_at = Some(Instant::now());
                        let ns = p.since.elapsed().as_nanos() as u64;
                        client.latency.record_fault(ns);
                        if from_disk {
                            Counters::add(&client.counters.faults_disk, 1);
                            Counters::add(&client.counters.disk_fault_service_ns, ns);
                            client.latency.record_disk_fault(ns);
                        }
                        Counters::add(&client.counters.fault_service_ns, ns);
                        if refault || p.waited {
                            Counters::add(&client.counters.stall_ns, ns);
                        }
                        if p.waited {
                            client.latency.record_wait(ns);
                        }
                    }
                    Served::Wait => {
                        waiting += 1;
                        if !p.waited {
                            Counters::add(&client.counters.faults_waited, 1);
                        } else if p.since.elapsed() > SLOW_AGENT && !warned_slow {
                            warned_slow = true;
                            warn!(
                                client = client.id,
                                addr = p.addr,
                                waited_ms = p.since.elapsed().as_millis() as u64,
                                "a fault has waited long for the agent's batch"
                            );
                        }
                        still.push(Pending { waited: true, ..p });
                    }
                    Served::Retry => {
                        Counters::add(&client.counters.faults_retried, 1);
                        still.push(p);
                    }
                    Served::Gone => return "the program is gone",
                }
            }
            pending = still;
            if waiting > 0 {
                // Nudge the agent once per round for the batches these faults wait on.
                super::client::signal(client.req_efd.as_raw_fd());
            }
        }
    }
}

fn apply_events(
    client: &Client,
    events: &[Event],
    arrivals: &mut Arrivals,
    held: Option<parking_lot::MutexGuard<'_, super::client::State>>,
) {
    let win = client.win();
    let mut st = held;
    for (i, ev) in events.iter().enumerate() {
        // Messages before `i` are applied (journal, `protocol/shm.rs`).
        win.journal_applied().store(i as u64, Ordering::SeqCst);
        let (start, end) = match *ev {
            Event::Remove { start, end } => {
                rec(client.id, "ev_remove", start, end, 0);
                Counters::add(&client.counters.events_remove, 1);
                (start, end)
            }
            Event::Unmap { start, end } => {
                rec(client.id, "ev_unmap", start, end, 0);
                Counters::add(&client.counters.events_unmap, 1);
                (start, end)
            }
            Event::Remap { from, to, len } => {
                super::die::point_over("read:remap", len);
                rec(client.id, "ev_remap", from, to, len);
                Counters::add(&client.counters.events_remap, 1);
                win.log_event(from, from + len, false);
                win.log_event(to, to + len, false);
                let st = st.get_or_insert_with(|| client.state.lock());
                let st = &mut **st;
                let epoch = win.epoch().load(Ordering::Relaxed);
                st.regions.forget(from, from + len, epoch);
                st.regions.forget(to, to + len, epoch);
                let store = &mut st.store;
                let mut moved = Vec::new();
                st.pages.remap(
                    from,
                    to,
                    len,
                    |h| store.remove(h),
                    |h, a| moved.push((h, a)),
                );
                super::die::point_over("apply:remap", len);
                for (h, a) in moved {
                    match store.set_addr(h, a) {
                        Ok(h2) if h2 != h => st.pages.rehandle(a, h, h2),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::error!(error = %e, "store: a moved page's record could not follow it")
                        }
                    }
                }
                arrivals.on_remap(from, to, len);
                continue;
            }
            _ => continue,
        };
        let st = st.get_or_insert_with(|| client.state.lock());
        let st = &mut **st;
        // The agent's own staging cleanup raises REMOVE events too; they touch nothing of the
        // program and are not logged (they would only age the agent's event log).
        if st.regions.is_excluded(start, end) {
            continue;
        }
        super::die::point_over(
            if matches!(ev, Event::Unmap { .. }) {
                "read:unmap"
            } else {
                "read:remove"
            },
            end - start,
        );
        win.log_event(start, end, true);
        let store = &mut st.store;
        if matches!(ev, Event::Unmap { .. }) {
            // Parts over memory that may have arrived after this unmap happened stay until
            // probed (see `arrivals`).
            for (s, e) in arrivals.on_unmap(start, end) {
                st.regions.forget(s, e, win.epoch().load(Ordering::Relaxed));
                st.pages.discard_range(s, e, |h| store.remove(h));
            }
        } else {
            arrivals.on_remove(start, end);
            st.pages.discard_range(start, end, |h| store.remove(h));
        }
    }
}

/// Confirms arrivals when the address space is quiet, and probes the pages of doubtful ranges:
/// a page no registered VMA holds any more is discarded; one still held stays. Returns why the
/// client must stop, if it must.
fn settle(client: &Client, arrivals: &mut Arrivals) -> Result<(), &'static str> {
    let mut st = client.state.lock();
    let st = &mut *st;
    // Pages no registered VMA holds. The kernel looks the VMA up before it checks
    // `mmap_changing`, so this answer alone may predate an unread REMAP that moved the page
    // away; it counts only if the address space is then seen quiet (no event read since).
    let mut gone: Vec<u64> = Vec::new();
    let mut settled: Vec<(u64, u64)> = Vec::new();
    let mut quiet = false;
    'ranges: for &(start, end) in arrivals.doubtful() {
        let mut a = st.pages.next_with_word(start, end);
        while a < end {
            match client.uffd.probe(a) {
                Probe::Changing => break 'ranges,
                Probe::Gone => return Err("the program is gone"),
                Probe::NotRegistered => {
                    // Only a quiet moment *after* this answer validates it.
                    quiet = false;
                    gone.push(a);
                }
                Probe::Registered => {
                    // It stayed: the unmap was stale for this page.
                    quiet = true;
                    rec(client.id, "doubtful_kept", a, 0, 0);
                }
                Probe::Unknown => rec(client.id, "doubtful_kept", a, 1, 0),
            }
            a = st.pages.next_with_word(a + PAGE_BYTES, end);
        }
        settled.push((start, end));
    }
    if !quiet {
        quiet = probe_quiet(client, st);
    }
    if !quiet {
        return Ok(());
    }
    arrivals.confirm();
    for a in gone {
        rec(client.id, "doubtful_gone", a, 0, 0);
        let store = &mut st.store;
        st.pages
            .discard_range(a, a + PAGE_BYTES, |h| store.remove(h));
    }
    for (s, e) in settled {
        arrivals.forget_doubtful(s, e);
    }
    Ok(())
}

/// Whether the address space is quiet now: a probe of a page known to be registered (the
/// agent's staging area, else a managed range) passes the kernel's `mmap_changing` check.
fn probe_quiet(client: &Client, st: &super::client::State) -> bool {
    let staging = client.win().staging_addr().load(Ordering::Relaxed);
    let managed = st.regions.managed();
    let targets = std::iter::once(staging)
        .filter(|a| *a != 0)
        .chain(managed.iter().take(4).map(|r| r.start));
    for a in targets {
        match client.uffd.probe(a) {
            Probe::Registered => return true,
            Probe::Changing => return false,
            _ => {}
        }
    }
    false
}

/// Applies the agent's completed batches (from the window's `done_seq`).
pub(super) fn complete_batches(client: &Client) {
    let win = client.win();
    let done = win.done_seq().load(Ordering::Acquire);
    let mut st = client.state.lock();
    let now_ms = client.now_ms();
    while let Some((seq, _)) = st.inflight.front() {
        let seq = *seq;
        if seq >= done {
            break;
        }
        let (_, slots) = st.inflight.pop_front().expect("front exists");
        let desc = win.desc(seq);
        for (i, slot) in slots.iter().enumerate() {
            let r = if desc.seq() == seq {
                desc.result(i)
            } else {
                shm::RESULT_FAILED
            };
            let moved = r == shm::RESULT_MOVED;
            super::client::count_result(&client.counters, r);
            let owner = st.pages.slot_owner(*slot, seq).unwrap_or(0);
            let entered = st
                .pages
                .complete(*slot, seq, moved, now_ms, r == shm::RESULT_BUSY);
            rec(
                client.id,
                "complete",
                owner,
                seq,
                ((r as u64) << 8) | entered as u64,
            );
        }
        let out = Counters::get(&client.counters.pages_moved);
        st.out_marks.push_back((seq + 1, out));
        if st.out_marks.len() > OUT_MARKS {
            st.out_marks.pop_front();
        }
    }
}

/// Completed batches whose moved-out count is remembered for the RSS estimate (a tick sees
/// at most a few dozen batches complete).
const OUT_MARKS: usize = 64;

enum Served {
    /// `refault`: served from the window or the store (a stall caused by eviction);
    /// `from_disk`: the page was in the disk tier.
    Done {
        refault: bool,
        from_disk: bool,
    },
    Wait,
    Retry,
    Gone,
    /// Disk tier: the fault needs these disk payloads, to be read without the lock (the
    /// store's disk epoch when they were chosen comes first). Only [`serve_once`] returns it.
    ReadDisk(u64, Vec<(Handle, DiskRead)>),
}

/// How often a fault goes back for disk payloads (a page that moved to disk meanwhile)
/// before the last attempt reads any still missing under the lock.
const DISK_READ_ATTEMPTS: usize = 3;

/// One fault being served: its address and its prefetch plan (decided at the first attempt
/// that finds the page evicted).
struct Fault<'a> {
    addr: u64,
    prefetch: &'a mut Option<prefetch::Plan>,
}

/// Serves one fault. `buf` receives the pages gathered for it; with `move_in` (cross-mm
/// backend) it is private anonymous memory of ours and its pages are moved into the program
/// rather than copied. Disk pages the fault needs are read first, without the client's lock
/// (through io_uring, `disk`), then the fault is served under it as usual.
#[allow(clippy::too_many_arguments)]
fn serve(
    client: &Client,
    fault: Fault<'_>,
    buf: &mut [u8],
    arrivals: &mut Arrivals,
    detector: &mut Detector,
    move_in: bool,
    disk: &mut DiskReads,
) -> Served {
    disk.clear();
    let mut attempt = 0;
    loop {
        let f = Fault {
            addr: fault.addr,
            prefetch: &mut *fault.prefetch,
        };
        let may_read = attempt < DISK_READ_ATTEMPTS;
        match serve_once(client, f, buf, arrivals, detector, move_in, disk, may_read) {
            Served::ReadDisk(epoch, want) => disk.fetch(client, epoch, want),
            done => return done,
        }
        attempt += 1;
    }
}

/// One attempt of [`serve`]: returns [`Served::ReadDisk`] (only while `may_read`) when disk
/// pages it would gather have not been read yet, before it changes anything.
#[allow(clippy::too_many_arguments)]
fn serve_once(
    client: &Client,
    fault: Fault<'_>,
    buf: &mut [u8],
    arrivals: &mut Arrivals,
    detector: &mut Detector,
    move_in: bool,
    disk: &mut DiskReads,
    may_read: bool,
) -> Served {
    let addr = fault.addr;
    if arrivals.is_doubtful(addr) {
        // Its word may belong to memory that is gone: wait until it is probed.
        return Served::Retry;
    }
    let mut st = client.state.lock();
    if client.disk.is_some() {
        disk.validate(st.store.disk_epoch());
    }
    let (region_start, region_end) = st
        .regions
        .containing(addr)
        .map_or((addr, addr + PAGE_BYTES), |r| (r.start, r.end));
    // Well over the budget or the throttle line: fresh memory one page per fault too, as
    // prefetch below (see `Client::one_page_per_fault`).
    let one_page = client.one_page_per_fault();
    let fill_ahead_pages = if one_page {
        1
    } else {
        client.cfg.fill_ahead_pages as u64
    };
    let plan = st.pages.plan_fault(addr, fill_ahead_pages, region_end);
    let c = &client.counters;
    rec(
        client.id,
        "plan",
        addr,
        match plan {
            FaultPlan::Zero { pages } => pages,
            FaultPlan::FromWindow { .. } => 1 << 32,
            FaultPlan::FromStore(_) => 2 << 32,
            FaultPlan::Wait { .. } => 3 << 32,
        },
        region_end,
    );
    // Pages brought back other than the faulting one, and the strides of the window that were
    // looked at (reported to the detector once served).
    let mut prefetched = 0u64;
    let mut covered_steps = 0u64;
    let mut pf = prefetch::Plan::NONE;
    let mut from_disk = false;
    let result = match plan {
        FaultPlan::Wait { .. } => return Served::Wait,
        FaultPlan::Zero { pages } => {
            let zeroed = client.uffd.zeropage(addr, pages * PAGE_BYTES, false);
            rec(
                client.id,
                "zero",
                addr,
                pages,
                match zeroed {
                    Ok(d) => d,
                    Err(e) => (1 << 63) | ((e.errno() as u64) << 32) | e.done_bytes(),
                },
            );
            if matches!(zeroed, Ok(_) | Err(UffdError::Exists { .. })) {
                // Passed the kernel's `mmap_changing` check: every arrival read is confirmed.
                arrivals.confirm();
            }
            match zeroed {
                Ok(n) => {
                    Counters::add(&c.zero_pages_filled, n / PAGE_BYTES);
                    Ok(())
                }
                // Part done, then a present page: the faulting page itself was zeroed if any
                // progress was made; if not, it is present already. Wake either way.
                Err(UffdError::Exists { .. }) => client.uffd.wake(addr, PAGE_BYTES).map(|_| ()),
                Err(e) => Err(e),
            }
        }
        FaultPlan::FromWindow { .. } | FaultPlan::FromStore(_) => {
            pf = *fault.prefetch.get_or_insert_with(|| {
                let p = detector.on_fault(addr / PAGE_BYTES);
                Counters::add(&c.prefetch_hit_pages, p.hit_pages);
                Counters::add(&c.prefetch_waste_pages, p.waste_pages);
                p
            });
            // `buf` holds the faulting page and up to `prefetch_pages` others.
            // Well over the budget or the throttle line: the faulting page alone (see
            // `Client::one_page_per_fault`).
            let cap_pages = if one_page {
                0
            } else {
                (buf.len() / PAGE_SIZE) as u64 - 1
            };
            let window_pages = (pf.pages as u64).min(cap_pages);
            let cross_mm = client.cross_mm.load(Ordering::Relaxed);
            // The contiguous part of the plan: evicted pages after the fault (forward stream)
            // or before it (reverse stream; not on the cross-mm backend, whose arena runs move
            // back forward only).
            let (ahead_pages, behind_pages) = match pf.stride_pages {
                1 => (window_pages, 0),
                -1 if !cross_mm => (0, window_pages),
                _ => (0, 0),
            };
            if let FaultPlan::FromStore(h) = plan {
                from_disk = client.disk.is_some() && st.store.lock().disk_read(h).is_some();
            }
            if may_read && client.disk.is_some() {
                let range = Span {
                    addr,
                    region_start,
                    region_end,
                    ahead_pages,
                    behind_pages,
                };
                let want = disk_wanted(&st, &range, &pf, window_pages, disk);
                if !want.is_empty() {
                    return Served::ReadDisk(st.store.disk_epoch(), want);
                }
            }
            // Cross-mm: the first slot of a run of pages waiting in consecutive arena slots,
            // which moves back as it is (zero-copy).
            let arena_run = match plan {
                FaultPlan::FromWindow { slot } if cross_mm => Some(slot),
                _ => None,
            };
            // Evicted pages right below the fault, counted first so the run can be laid out
            // in address order: buf[back] is the faulting page.
            let mut back = 0u64;
            while back < behind_pages && addr - region_start > back * PAGE_BYTES {
                let a = addr - (back + 1) * PAGE_BYTES;
                if arrivals.is_doubtful(a) || !is_copyable(st.pages.state(a)) {
                    break;
                }
                back += 1;
            }
            // Gather the faulting page and the evicted pages right after it into `buf`. The
            // faulting thread waits for this first COPY only, so a forward run that has to be
            // gathered (decompressed) is cut after the page the thread will want next; the
            // rest of the stream follows in COPYs of `PREFETCH_COPY_PAGES`, each waking a
            // thread that faulted on them meanwhile (`more_runs`). A run still in the arena
            // moves back whole: it costs no gathering.
            let first_ahead = if arena_run.is_some() {
                ahead_pages
            } else {
                ahead_pages.min(FIRST_COPY_AHEAD_PAGES)
            };
            let max_pages = 1 + first_ahead;
            let mut n = 0u64;
            while n < max_pages {
                let a = addr + n * PAGE_BYTES;
                if n > 0 && (a >= region_end || arrivals.is_doubtful(a)) {
                    break;
                }
                let state = st.pages.state(a);
                if let Some(first) = arena_run {
                    // The run moves straight from the arena: nothing to gather. Stop where it
                    // ends rather than copy the whole run.
                    match state {
                        PageState::Window { slot, .. } if slot as u64 == first as u64 + n => {
                            n += 1;
                            continue;
                        }
                        _ => break,
                    }
                }
                // The faulting page itself is copied from its slot if it ends up alone.
                if n == 0 && max_pages == 1 && back == 0 {
                    if let PageState::Window { .. } = state {
                        n += 1;
                        continue;
                    }
                }
                let i = (back + n) as usize;
                let dst: &mut [u8; PAGE_SIZE] = (&mut buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])
                    .try_into()
                    .expect("one page");
                match gather(client, &st, a, state, dst, disk) {
                    Gathered::Page => n += 1,
                    Gathered::NotEvicted => break,
                    // Never hand out wrong bytes: leave the page evicted and, if it is the
                    // faulting one, stop serving this client (fail closed).
                    Gathered::Unreadable if n == 0 => return Served::Gone,
                    Gathered::Unreadable => break,
                }
            }
            // Then the pages below it, nearest first; the run starts at the lowest gathered.
            let mut first_idx = back;
            for k in 1..=back {
                let a = addr - k * PAGE_BYTES;
                let i = (back - k) as usize;
                let dst: &mut [u8; PAGE_SIZE] = (&mut buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])
                    .try_into()
                    .expect("one page");
                match gather(client, &st, a, st.pages.state(a), dst, disk) {
                    Gathered::Page => first_idx = back - k,
                    Gathered::NotEvicted | Gathered::Unreadable => break,
                }
            }
            let below = back - first_idx;
            let mut run_start = addr - below * PAGE_BYTES;
            let run_pages = below + n;
            // A single page still in the window is copied straight from its slot; a run still
            // in the arena moves straight from it.
            let src = match (run_pages, plan, arena_run) {
                (_, _, Some(first)) => client.slot_ptr(first) as *const u8,
                (1, FaultPlan::FromWindow { slot }, _) => client.slot_ptr(slot) as *const u8,
                _ => buf[first_idx as usize * PAGE_SIZE..].as_ptr(),
            };
            let len = run_pages * PAGE_BYTES;
            let mut copied = None;
            // Cross-mm: pages waiting in the arena move back as they are (zero-copy). Pages
            // gathered in `buf` (decompressed, or mixed) are copied: a fresh page has to be
            // filled either way, and moving the monitor's own page in also costs a page fault
            // in the monitor and a TLB flush of the monitor's mm (measured slower in
            // BENCHMARKS.md), unless `move_in_decompressed` asks for it.
            let from_arena = arena_run.is_some();
            if cross_mm && (from_arena || move_in) {
                let mode = sys::UFFDIO_MOVE_MODE_CROSS_MM_IN;
                match client.uffd.move_pages(addr, src as u64, len, mode) {
                    Err(e @ UffdError::Os { done_bytes: 0, .. })
                    | Err(e @ UffdError::Busy { done_bytes: 0, .. }) => {
                        // EXDEV (the monitor's pages are charged to another memory cgroup than
                        // the program) or another refusal: copy the same bytes instead.
                        if !from_arena && !client.move_in_refused.swap(true, Ordering::Relaxed) {
                            warn!(
                                client = client.id,
                                "moving a decompressed page into the program was refused \
                                 ({e}); copying them from now on"
                            );
                        }
                    }
                    other => {
                        if let Ok(d) | Err(UffdError::Retry { done_bytes: d, .. }) = other {
                            Counters::add(&c.pages_moved_in, d / PAGE_BYTES);
                        }
                        copied = Some(other);
                    }
                }
            }
            let mut copied = copied.unwrap_or_else(|| client.uffd.copy(run_start, src, len, false));
            trace_copy(client, run_start, run_pages, &copied);
            if below > 0 {
                // The run starts below the fault. If it stopped before reaching the faulting
                // page (a page below is present: EEXIST, which the kernel reports as a partial
                // copy, or a refusal), settle what was copied and copy from the faulting page
                // on. EAGAIN with nothing done is retried whole, like any other.
                let done_pages = copied.unwrap_or_else(|e| e.done_bytes()) / PAGE_BYTES;
                let retry_all = matches!(
                    copied,
                    Err(UffdError::Retry { done_bytes: 0, .. } | UffdError::TargetGone { .. })
                );
                if done_pages <= below && !retry_all {
                    prefetched += finish(client, &mut st, run_start, done_pages, addr);
                    run_start = addr;
                    let src = buf[back as usize * PAGE_SIZE..].as_ptr();
                    copied = client.uffd.copy(addr, src, n * PAGE_BYTES, false);
                    trace_copy(client, addr, n, &copied);
                }
            }
            if matches!(copied, Ok(_) | Err(UffdError::Exists { .. })) {
                arrivals.confirm();
            }
            let served = match copied {
                Ok(done) => {
                    prefetched += finish(client, &mut st, run_start, done / PAGE_BYTES, addr);
                    Ok(())
                }
                Err(UffdError::Exists { done_bytes, .. }) => {
                    // Some page in the run is present already (served by a concurrent path):
                    // keep the ones copied, leave the rest as they are.
                    prefetched += finish(client, &mut st, run_start, done_bytes / PAGE_BYTES, addr);
                    client.uffd.wake(addr, PAGE_BYTES).map(|_| ())
                }
                Err(UffdError::Retry { done_bytes, .. }) if done_bytes > 0 => {
                    prefetched += finish(client, &mut st, run_start, done_bytes / PAGE_BYTES, addr);
                    Ok(())
                }
                Err(e) => Err(e),
            };
            if served.is_ok() {
                // The rest of the window: further runs of evicted pages beyond the pages that
                // stopped the first run (present ones are skipped), one COPY per run; or the
                // pages of a strided stream, one COPY each.
                let (steps, pages) = if pf.stride_pages.abs() > 1 {
                    strided(
                        client,
                        &mut st,
                        addr,
                        &pf,
                        window_pages,
                        buf,
                        arrivals,
                        disk,
                    )
                } else if ahead_pages > 0 {
                    let end = region_end.min(addr + (1 + ahead_pages) * PAGE_BYTES);
                    let from = addr + n * PAGE_BYTES;
                    let pages = more_runs(
                        client,
                        &mut st,
                        from..end,
                        addr,
                        PREFETCH_COPY_PAGES,
                        buf,
                        arrivals,
                        disk,
                    );
                    ((end - addr) / PAGE_BYTES - 1, pages)
                } else if behind_pages > 0 {
                    let start = region_start.max(addr - behind_pages * PAGE_BYTES);
                    let pages = more_runs(
                        client,
                        &mut st,
                        start..run_start,
                        addr,
                        u64::MAX,
                        buf,
                        arrivals,
                        disk,
                    );
                    ((addr - start) / PAGE_BYTES, pages)
                } else {
                    (0, 0)
                };
                covered_steps = steps;
                prefetched += pages;
            }
            served
        }
    };
    let evicted = !matches!(plan, FaultPlan::Zero { .. });
    match result {
        Ok(()) => {
            if evicted {
                detector.prefetched(&pf, covered_steps as u32, prefetched as u32);
            }
            // Counted once per fault served (a retried copy is not counted twice).
            Counters::add(
                match plan {
                    FaultPlan::Zero { .. } => &c.faults_zero,
                    FaultPlan::FromWindow { .. } => &c.faults_window,
                    _ => &c.faults_store,
                },
                1,
            );
            Served::Done {
                refault: !matches!(plan, FaultPlan::Zero { .. }),
                from_disk,
            }
        }
        Err(UffdError::Retry { .. }) => Served::Retry,
        Err(UffdError::TargetGone { .. }) => Served::Gone,
        Err(e) => {
            if evicted {
                detector.prefetched(&pf, covered_steps as u32, prefetched as u32);
            }
            // The range is not mapped or not registered any more (an UNMAP is on its way):
            // release the faulting thread; if it touches the address again it faults anew.
            debug!(client = client.id, addr, "fault service: {e}");
            let _ = client.uffd.wake(addr, PAGE_BYTES);
            Served::Done {
                refault: false,
                from_disk: false,
            }
        }
    }
}

/// The pages around a fault its service may gather: the faulting page, the forward or
/// backward run of its stream, inside its region.
struct Span {
    addr: u64,
    region_start: u64,
    region_end: u64,
    ahead_pages: u64,
    behind_pages: u64,
}

/// Disk tier: the disk pages among those a fault may gather (its [`Span`], or the pages of its
/// strided stream) whose payloads have not been read yet.
fn disk_wanted(
    st: &super::client::State,
    span: &Span,
    pf: &prefetch::Plan,
    window_pages: u64,
    disk: &DiskReads,
) -> Vec<(Handle, DiskRead)> {
    let mut addrs: Vec<u64> = Vec::new();
    for k in 0..=span.ahead_pages {
        let a = span.addr + k * PAGE_BYTES;
        if a >= span.region_end {
            break;
        }
        addrs.push(a);
    }
    for k in 1..=span.behind_pages {
        match span.addr.checked_sub(k * PAGE_BYTES) {
            Some(a) if a >= span.region_start => addrs.push(a),
            _ => break,
        }
    }
    if pf.stride_pages.abs() > 1 {
        let step_bytes = pf.stride_pages * PAGE_BYTES as i64;
        for k in 1..=window_pages as i64 {
            match span.addr.checked_add_signed(k * step_bytes) {
                Some(a) if (span.region_start..span.region_end).contains(&a) => addrs.push(a),
                _ => break,
            }
        }
    }
    let store = st.store.lock();
    addrs
        .into_iter()
        .filter_map(|a| match st.pages.state(a) {
            PageState::Stored(h) if !disk.has(h) => store.disk_read(h).map(|r| (h, r)),
            _ => None,
        })
        .collect()
}

/// Whether a page's bytes are with the monitor and can be copied back now.
fn is_copyable(s: PageState) -> bool {
    matches!(s, PageState::Window { .. } | PageState::Stored(_))
}

enum Gathered {
    Page,
    /// Not in the window or the store (present, fresh, or on its way out): not to be copied.
    NotEvicted,
    /// Its stored copy could not be read (logged).
    Unreadable,
}

/// Copies the bytes of the page at `a`, whose state is `state`, into `dst`. A disk page
/// comes from the payload read for this fault, else (rarely: it moved to disk after the reads
/// were decided) from a `pread` under the lock.
fn gather(
    client: &Client,
    st: &super::client::State,
    a: u64,
    state: PageState,
    dst: &mut [u8; PAGE_SIZE],
    disk: &DiskReads,
) -> Gathered {
    if let PageState::Stored(h) = state {
        match disk.decode(h, dst) {
            Some(Ok(())) => {
                Counters::add(&client.counters.pages_from_disk, 1);
                return Gathered::Page;
            }
            Some(Err(e)) => {
                warn!(client = client.id, addr = a, "disk page unreadable: {e}");
                return Gathered::Unreadable;
            }
            None => {}
        }
    }
    match state {
        PageState::Window { slot, .. } => {
            // SAFETY: the slot lies inside the window mapping; the page is ours to read while
            // the caller holds the client's lock (the slot cannot be reused meanwhile).
            let src = unsafe { &*(client.slot_ptr(slot) as *const [u8; PAGE_SIZE]) };
            dst.copy_from_slice(src);
            Gathered::Page
        }
        PageState::Stored(h) => match st.store.get(h, dst) {
            Ok(_) => Gathered::Page,
            Err(e) => {
                warn!(client = client.id, addr = a, "stored page unreadable: {e}");
                Gathered::Unreadable
            }
        },
        PageState::Absent { .. } | PageState::Moving { .. } => Gathered::NotEvicted,
    }
}

/// A constant-stride stream (|stride| > 1 page): after the faulting page, brings back the
/// evicted pages among the next `window_pages` along the stride, one COPY each. Pages not
/// evicted are skipped; it stops at the region's end, a doubtful page, an unreadable one or a
/// refused copy. Returns the strides looked at and the pages that came back.
#[allow(clippy::too_many_arguments)]
fn strided(
    client: &Client,
    st: &mut super::client::State,
    addr: u64,
    pf: &prefetch::Plan,
    window_pages: u64,
    buf: &mut [u8],
    arrivals: &Arrivals,
    disk: &DiskReads,
) -> (u64, u64) {
    let Some(region) = st.regions.containing(addr).map(|r| r.start..r.end) else {
        return (0, 0);
    };
    let step_bytes = pf.stride_pages * PAGE_BYTES as i64;
    let (mut steps, mut done) = (0u64, 0u64);
    for k in 1..=window_pages as i64 {
        let Some(a) = addr.checked_add_signed(k * step_bytes) else {
            break;
        };
        if !region.contains(&a) || arrivals.is_doubtful(a) {
            break;
        }
        steps += 1;
        let dst: &mut [u8; PAGE_SIZE] = (&mut buf[..PAGE_SIZE]).try_into().expect("one page");
        match gather(client, st, a, st.pages.state(a), dst, disk) {
            Gathered::Page => {}
            Gathered::NotEvicted => continue,
            Gathered::Unreadable => break,
        }
        let copied = client.uffd.copy(a, buf.as_ptr(), PAGE_BYTES, false);
        trace_copy(client, a, 1, &copied);
        match copied {
            Ok(PAGE_BYTES) => done += finish(client, st, a, 1, addr),
            _ => break,
        }
    }
    (steps, done)
}

/// Brings back the evicted pages of `range` (inside the faulting page's region, which is not
/// among them), one COPY per contiguous run of at most `copy_pages` (and `buf`) pages; pages
/// not evicted are skipped. Stops at a doubtful page, an unreadable one, or a copy that did
/// not complete (what it did copy is settled). Returns how many pages came back.
#[allow(clippy::too_many_arguments)]
fn more_runs(
    client: &Client,
    st: &mut super::client::State,
    range: std::ops::Range<u64>,
    fault_addr: u64,
    copy_pages: u64,
    buf: &mut [u8],
    arrivals: &Arrivals,
    disk: &DiskReads,
) -> u64 {
    let (from, to) = (range.start, range.end);
    let max_pages = ((buf.len() / PAGE_SIZE) as u64).min(copy_pages.max(1));
    let mut done = 0u64;
    let mut a = from;
    while a < to {
        if arrivals.is_doubtful(a) {
            break;
        }
        // The next run: gathered from `a` while the pages are evicted.
        let mut n = 0u64;
        while n < max_pages && a + n * PAGE_BYTES < to {
            let p = a + n * PAGE_BYTES;
            if arrivals.is_doubtful(p) {
                break;
            }
            let i = n as usize;
            let dst: &mut [u8; PAGE_SIZE] = (&mut buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])
                .try_into()
                .expect("one page");
            match gather(client, st, p, st.pages.state(p), dst, disk) {
                Gathered::Page => n += 1,
                Gathered::NotEvicted => break,
                Gathered::Unreadable if n == 0 => return done,
                Gathered::Unreadable => break,
            }
        }
        if n == 0 {
            // Present (or fresh), or on its way out: skip it.
            a += PAGE_BYTES;
            continue;
        }
        let copied = client.uffd.copy(a, buf.as_ptr(), n * PAGE_BYTES, false);
        trace_copy(client, a, n, &copied);
        let copied_pages = copied.unwrap_or_else(|e| e.done_bytes()) / PAGE_BYTES;
        done += finish(client, st, a, copied_pages, fault_addr);
        if copied_pages < n {
            break;
        }
        a += n * PAGE_BYTES;
    }
    done
}

fn trace_copy(client: &Client, start: u64, pages: u64, copied: &Result<u64, UffdError>) {
    rec(
        client.id,
        "copy",
        start,
        pages,
        match copied {
            Ok(d) => *d,
            Err(e) => (1 << 63) | ((e.errno() as u64) << 32) | e.done_bytes(),
        },
    );
}

/// `pages` pages from `start` are back in the program; `fault_addr` is the faulting page (the
/// only one touched). Returns how many of them were prefetched (all but the faulting page).
fn finish(
    client: &Client,
    st: &mut super::client::State,
    start: u64,
    pages: u64,
    fault_addr: u64,
) -> u64 {
    let now = client.now_ms();
    let mut faulting = 0;
    for i in 0..pages {
        let a = start + i * PAGE_BYTES;
        // Only the faulting page was touched; prefetched ones are not hot.
        let hot = (a == fault_addr).then_some(now);
        faulting += u64::from(a == fault_addr);
        rec(client.id, "back", a, i, 0);
        if let Released::Blob(h) = st.pages.brought_back(a, hot) {
            st.store.remove(h);
        }
    }
    Counters::add(&client.counters.pages_restored, pages);
    Counters::add(&client.counters.pages_prefetched, pages - faulting);
    pages - faulting
}
