//! `uswap-bench`: the core benchmarks, printed as one markdown table per section.
//!
//! 1. The bare userfaultfd round trip, measured from the faulting thread: a handler thread in
//!    the same process serves each fault with UFFDIO_COPY. Same CPU and across CPUs, with the
//!    handler waiting in `poll` + `read` (as the monitor's fault thread does when it blocks),
//!    spinning on non-blocking polls (as it does right after a fault), or waiting in one
//!    io_uring READ of the descriptor (`io_uring_enter` both waits and reads).
//! 2. Fault-in latency of uswap from the faulting thread's side (the workload's
//!    `fault-latency`), for pages still in the window and for compressed pages, same CPU and
//!    across CPUs (the program pinned to one CPU, the monitor to the same or the other one),
//!    beside the bare round trip.
//! 3. Eviction throughput (pages moved by the agent, pages compressed) and monitor CPU per
//!    evicted GiB.
//! 4. Fresh-memory fill rate under uswap against the plain program.
//!
//! Usage: `uswap-bench [--quick] [--bare-only] [--backend B] [--set KEY=VALUE]...` from a release build
//! (`cargo build --release --workspace`); each `--set` is added to every `uswap run`.
//! Needs `taskset` (util-linux) for the CPU placement.

use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use uswap::uffd::{sys, Event, Uffd};

fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain old data; sched_setaffinity on the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

/// How the bare round trip's handler waits for the next fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// `poll` (50 ms timeout), then a non-blocking `read`.
    Poll,
    /// Non-blocking `poll` in a loop with `spin_loop` hints, then `read`.
    Spin,
    /// One io_uring READ of a blocking descriptor per message batch (`submit_and_wait`).
    Uring,
    /// One io_uring POLL_ADD of the (non-blocking) descriptor, waited for in
    /// `submit_and_wait`, then `read`: what the monitor could do with the program's
    /// descriptor, which must stay non-blocking.
    UringPoll,
    /// `Uring` on a non-blocking descriptor (the kernel arms a poll and retries the read).
    UringNonblock,
}

/// Bare round trip: returns per-fault latencies in µs.
fn bare_round_trip(fault_cpu: usize, handler_cpu: usize, pages: usize, wait: Wait) -> Vec<f64> {
    // One more page than measured: touched last, after `stop`, to release a handler blocked
    // in its read.
    let len = (pages + 1) * 4096;
    // SAFETY: a fresh anonymous mapping, unmapped at the end.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    } as u64;
    let uffd = Arc::new(Uffd::create(0, 0, wait != Wait::Uring).expect("userfaultfd"));
    uffd.register(base, len as u64, sys::UFFDIO_REGISTER_MODE_MISSING)
        .expect("register");
    let stop = Arc::new(AtomicBool::new(false));
    let (u, s) = (Arc::clone(&uffd), Arc::clone(&stop));
    let handler = std::thread::spawn(move || {
        pin(handler_cpu);
        let src = vec![7u8; 4096];
        let mut raw = [sys::UffdMsg::default(); 16];
        let mut ev = [Event::Unknown; 16];
        let mut ring = matches!(wait, Wait::Uring | Wait::UringPoll | Wait::UringNonblock)
            .then(|| io_uring::IoUring::new(8).expect("io_uring"));
        // Until the extra page, touched after `stop`, is served.
        let last_addr = base + (pages * 4096) as u64;
        let mut served_last = false;
        while !served_last {
            let n = match (wait, ring.as_mut()) {
                (Wait::Uring | Wait::UringNonblock, Some(ring)) => {
                    let read = io_uring::opcode::Read::new(
                        io_uring::types::Fd(u.as_raw_fd()),
                        raw.as_mut_ptr().cast(),
                        std::mem::size_of_val(&raw) as u32,
                    )
                    .build();
                    // SAFETY: `raw` outlives the request: we wait for its completion below
                    // before touching `raw` again.
                    unsafe { ring.submission().push(&read).expect("queue has room") };
                    ring.submit_and_wait(1).expect("io_uring_enter");
                    let res = ring.completion().next().map_or(-1, |c| c.result());
                    let count = res.max(0) as usize / std::mem::size_of::<sys::UffdMsg>();
                    for i in 0..count {
                        ev[i] = Event::decode(&raw[i]);
                    }
                    count
                }
                (Wait::UringPoll, Some(ring)) => {
                    let poll = io_uring::opcode::PollAdd::new(
                        io_uring::types::Fd(u.as_raw_fd()),
                        libc::POLLIN as u32,
                    )
                    .build();
                    // SAFETY: the request refers to no memory of ours.
                    unsafe { ring.submission().push(&poll).expect("queue has room") };
                    ring.submit_and_wait(1).expect("io_uring_enter");
                    let _ = ring.completion().next();
                    u.read_events(&mut raw, &mut ev).unwrap_or(0)
                }
                _ => {
                    let mut pfd = libc::pollfd {
                        fd: u.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    let timeout_ms = if wait == Wait::Spin { 0 } else { 50 };
                    // SAFETY: polling one pollfd on our stack.
                    let ready = unsafe { libc::poll(&mut pfd, 1, timeout_ms) } > 0;
                    if wait == Wait::Spin && !ready {
                        for _ in 0..64 {
                            std::hint::spin_loop();
                        }
                        continue;
                    }
                    u.read_events(&mut raw, &mut ev).unwrap_or(0)
                }
            };
            for e in &ev[..n] {
                if let Event::Pagefault { addr, .. } = e {
                    let _ = u.copy(*addr, src.as_ptr(), 4096, false);
                    served_last |= *addr == last_addr && s.load(Ordering::Relaxed);
                }
            }
        }
    });
    pin(fault_cpu);
    let mut lat = Vec::with_capacity(pages);
    for i in 0..pages {
        let p = (base + (i * 4096) as u64) as *const u8;
        let t = Instant::now();
        // SAFETY: reading one byte of our registered mapping; the handler fills it.
        let v = unsafe { std::ptr::read_volatile(p) };
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        assert_eq!(v, 7);
    }
    stop.store(true, Ordering::Relaxed);
    // SAFETY: reading the last page of our registered mapping; the handler fills it.
    let _ = unsafe { std::ptr::read_volatile((base + (pages * 4096) as u64) as *const u8) };
    handler.join().unwrap();
    // SAFETY: unmapping our own mapping.
    unsafe { libc::munmap(base as *mut _, len) };
    lat
}

fn exe_dir() -> std::path::PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

struct Out {
    stdout: String,
    stats: serde_json::Value,
}

/// `--set` values added to every `uswap run`: `backend=...` from `--backend`, and each `--set`.
static EXTRA_SETS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

fn uswap_run(
    monitor_cpu: Option<usize>,
    prog_cpu: Option<usize>,
    sets: &[&str],
    budget: &str,
    prog: &[&str],
) -> Out {
    let dir = exe_dir();
    let stats = std::env::temp_dir().join(format!("uswap-bench-{}.json", std::process::id()));
    let mut cmd = match monitor_cpu {
        Some(c) => {
            let mut c2 = Command::new("taskset");
            c2.args(["-c", &c.to_string()]).arg(dir.join("uswap"));
            c2
        }
        None => Command::new(dir.join("uswap")),
    };
    cmd.args(["run", "--quiet", "--budget", budget]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    for s in EXTRA_SETS.get().into_iter().flatten() {
        cmd.args(["--set", s]);
    }
    cmd.arg("--stats-json").arg(&stats).arg("--");
    if let Some(c) = prog_cpu {
        cmd.args(["taskset", "-c", &c.to_string()]);
    }
    cmd.args(prog);
    let out = cmd.output().expect("running uswap");
    let st = std::fs::read(&stats)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    let _ = std::fs::remove_file(&stats);
    Out {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stats: st,
    }
}

fn field(text: &str, prefix: &str, key: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{key}=")))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(f64::NAN)
}

fn line_value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let quick = argv.iter().any(|a| a == "--quick");
    // `--backend stock|cross-mm`: every run under that backend (the kernel VM compares them).
    let backend = argv
        .iter()
        .position(|a| a == "--backend")
        .and_then(|i| argv.get(i + 1))
        .map(|b| format!("backend={b}"));
    let mut extra: Vec<String> = backend.into_iter().collect();
    extra.extend(
        argv.windows(2)
            .filter(|w| w[0] == "--set")
            .map(|w| w[1].clone()),
    );
    if !extra.is_empty() {
        println!("(all runs with --set {})\n", extra.join(" --set "));
    }
    EXTRA_SETS.set(extra).expect("set once");
    let wl = exe_dir().join("uswap-workload");
    let wl = wl.to_str().unwrap();
    let mib = if quick { "128" } else { "512" };
    let touches = if quick { "5000" } else { "20000" };
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cross = if ncpu > 1 { 1 } else { 0 };

    println!("## Fault-in latency from the faulting thread (µs)\n");
    println!("| case | CPUs | p50 | p99 | p99.9 | n |");
    println!("|---|---|---|---|---|---|");
    let mut bare = [0.0f64; 2];
    for (i, (name, f, h, wait)) in [
        ("bare uffd round trip (COPY)", 0, 0, Wait::Poll),
        ("bare uffd round trip (COPY)", cross, 0, Wait::Poll),
        ("bare round trip, handler spins (poll 0)", 0, 0, Wait::Spin),
        (
            "bare round trip, handler spins (poll 0)",
            cross,
            0,
            Wait::Spin,
        ),
        (
            "bare round trip, handler waits in io_uring READ",
            0,
            0,
            Wait::Uring,
        ),
        (
            "bare round trip, handler waits in io_uring READ",
            cross,
            0,
            Wait::Uring,
        ),
        (
            "bare round trip, handler waits in io_uring POLL_ADD, then read",
            0,
            0,
            Wait::UringPoll,
        ),
        (
            "bare round trip, handler waits in io_uring POLL_ADD, then read",
            cross,
            0,
            Wait::UringPoll,
        ),
        (
            "bare round trip, handler waits in io_uring READ, O_NONBLOCK",
            0,
            0,
            Wait::UringNonblock,
        ),
        (
            "bare round trip, handler waits in io_uring READ, O_NONBLOCK",
            cross,
            0,
            Wait::UringNonblock,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let mut v = bare_round_trip(f, h, if quick { 5000 } else { 20000 }, wait);
        let n = v.len();
        let (p50, p99, p999) = (pct(&mut v, 0.5), pct(&mut v, 0.99), pct(&mut v, 0.999));
        if i < 2 {
            bare[i] = p50;
        }
        println!(
            "| {name} | {} | {p50:.1} | {p99:.1} | {p999:.1} | {n} |",
            if f == h { "same" } else { "cross" }
        );
    }
    if argv.iter().any(|a| a == "--bare-only") {
        return;
    }
    let mut evict_rows = Vec::new();
    // Two settings: "under eviction" (budget 32M: touching pages raises RSS over the budget, so
    // the agent keeps evicting other pages on the program's CPU while it is measured) and
    // "isolated" (budget half the data, 1000 touches of pages known to be evicted: the program
    // stays within the budget's hysteresis and no eviction runs while it is measured).
    let half = format!("{}M", mib.parse::<u64>().unwrap_or(512) / 2);
    let cases = [
        ("under eviction", "32M", touches, false),
        ("isolated", half.as_str(), "1000", true),
    ];
    for (label, cooling, window) in [
        ("uswap, page in window", "60s", "1G"),
        ("uswap, compressed page", "100ms", "32M"),
    ] {
        for (setting, budget, n_touch, only_evicted) in cases {
            for (cpus, mon, prog) in [("same", 0usize, 0usize), ("cross", 0, cross)] {
                let sets = [
                    &format!("cooling={cooling}")[..],
                    &format!("window={window}")[..],
                    "prefetch_pages=0",
                    "tick=10ms",
                ];
                let mut args = vec![
                    wl,
                    "fault-latency",
                    "--mib",
                    mib,
                    "--idle-ms",
                    "4000",
                    "--pattern",
                    "random",
                    "--touches",
                    n_touch,
                ];
                if only_evicted {
                    args.push("--only-evicted");
                }
                let o = uswap_run(Some(mon), Some(prog), &sets, budget, &args);
                let (p50, p99, p999, n) = (
                    field(&o.stdout, "LAT_US", "p50"),
                    field(&o.stdout, "LAT_US", "p99"),
                    field(&o.stdout, "LAT_US", "p999"),
                    field(&o.stdout, "LAT_US", "n"),
                );
                let ratio = p50 / bare[if cpus == "same" { 0 } else { 1 }];
                println!("| {label}, {setting} | {cpus} | {p50:.1} ({ratio:.2}× bare) | {p99:.1} | {p999:.1} | {n} |");
                if !only_evicted {
                    evict_rows.push((format!("{label}, {cpus} CPU"), o.stats));
                }
            }
        }
    }

    println!("\n## Eviction throughput and monitor CPU\n");
    println!("| run | backend | pages moved | eviction MiB/s (agent moves + copy to window, or monitor moves) | compressed MiB | compression MiB/s | ratio | monitor CPU s per evicted GiB | agent CPU s per evicted GiB |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let o = uswap_run(
        None,
        None,
        &["cooling=100ms", "tick=10ms"],
        "32M",
        &[wl, "fill-verify", "--mib", mib, "--idle-ms", "4000"],
    );
    evict_rows.insert(0, ("fill-verify (eviction run)".into(), o.stats));
    for (name, st) in &evict_rows {
        // `taskset` attaches first and execs the workload: take the workload's report.
        let c = st["clients"]
            .as_array()
            .and_then(|a| a.iter().rev().find(|c| c["name"] == "uswap-workload"))
            .cloned()
            .unwrap_or_default();
        let moved = c["pages_evicted"].as_f64().unwrap_or(0.0);
        let agent_s = c["agent_cpu_s"].as_f64().unwrap_or(f64::NAN);
        let move_s = c["monitor_move_out_s"].as_f64().unwrap_or(0.0);
        let evict_s = if move_s > 0.0 { move_s } else { agent_s };
        let backend = c["backend"]
            .as_str()
            .unwrap_or("?")
            .split(' ')
            .next()
            .unwrap_or("?");
        let cin = c["compressed_bytes_in"].as_f64().unwrap_or(0.0);
        let comp_s = c["monitor_compress_cpu_s"].as_f64().unwrap_or(f64::NAN);
        let mon_s = c["monitor_cpu_s"].as_f64().unwrap_or(f64::NAN);
        let gib = moved * 4096.0 / (1u64 << 30) as f64;
        println!(
            "| {name} | {backend} | {moved:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |",
            moved * 4096.0 / (1 << 20) as f64 / evict_s,
            cin / (1 << 20) as f64,
            cin / (1 << 20) as f64 / comp_s,
            c["compression_ratio"].as_f64().unwrap_or(0.0),
            mon_s / gib,
            agent_s / gib
        );
    }

    println!("\n## Fresh-memory fill rate (MiB/s, best of 3; fresh mapping each repeat)\n");
    println!("| case | fill MiB/s | × plain |");
    println!("|---|---|---|");
    let plain = Command::new(wl)
        .args(["fill-rate", "--mib", mib, "--repeat", "3"])
        .output()
        .unwrap();
    let plain = line_value(&String::from_utf8_lossy(&plain.stdout), "FILL_MIBS ");
    println!("| plain program | {plain:.0} | 1.00 |");
    for (label, budget) in [
        ("under uswap, no budget (nothing registered)", "none"),
        (
            "under uswap, budget 64M (regions registered, evicting)",
            "64M",
        ),
    ] {
        let o = uswap_run(
            None,
            None,
            &["tick=10ms"],
            budget,
            &[wl, "fill-rate", "--mib", mib, "--repeat", "3"],
        );
        let v = line_value(&o.stdout, "FILL_MIBS ");
        println!("| {label} | {v:.0} | {:.2} |", v / plain);
    }
}
