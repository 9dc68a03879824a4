//! `uswap-demo`: the bundled demo program for `uswap run`.
//!
//! An ordinary program (it knows nothing about uswap): it fills a few hundred MiB with
//! heap-like data (text fragments, small integers, pointer-like values, zero runs and a
//! little random noise), remembers a checksum of every 4 KiB page, sits idle while
//! printing its resident anonymous memory, then reads everything back and checks it.
//!
//! Run it under `uswap run -- uswap-demo` and watch `RssAnon` drop while it is idle: the
//! monitor has evicted the cold pages. The final re-read brings them back, and the
//! checksums prove they came back intact.
//!
//! Usage: `uswap-demo [--mib N] [--idle-secs N]` (defaults: 384 MiB, 4 s). Exit code 0
//! if every page verified, 1 otherwise, 2 on a usage error.

use std::time::{Duration, Instant};

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;

const WORDS: [&str; 32] = [
    "alpha", "buffer", "cache", "delta", "error", "fault", "guest", "heap", "index", "json",
    "kernel", "latency", "memory", "node", "offset", "page", "queue", "request", "session",
    "token", "user", "value", "worker", "config", "status", "timeout", "connect", "thread", "name",
    "id", "http", "retry",
];

/// xorshift64*: small, fast, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Appends one heap-like record: an 8-byte header (tag, length) and a payload.
fn push_record(buf: &mut Vec<u8>, rng: &mut Rng) {
    let r = rng.next();
    let start = buf.len();
    buf.extend_from_slice(&[0u8; 8]);
    let tag = match r % 100 {
        0..=39 => {
            // A text fragment, like a string on the heap.
            for k in 0..3 + (r >> 8) % 6 {
                if k > 0 {
                    buf.push(b' ');
                }
                buf.extend_from_slice(WORDS[((r >> (16 + 5 * k)) % 32) as usize].as_bytes());
            }
            buf.push(0);
            1u8
        }
        40..=59 => {
            // Small integers: counters, lengths, enum values.
            for k in 0..4 + (r >> 8) % 5 {
                let v = ((r >> (12 + 4 * k)) % 1000) as u32;
                buf.extend_from_slice(&v.to_le_bytes());
            }
            2
        }
        60..=74 => {
            // Pointer-like values into a heap arena.
            for _ in 0..2 + (r >> 8) % 3 {
                let p = 0x0000_7f3a_c000_0000u64 | ((rng.next() % 0x10_0000) << 4);
                buf.extend_from_slice(&p.to_le_bytes());
            }
            3
        }
        75..=95 => {
            // Zeroed space: padding, fresh structs, unused capacity.
            buf.resize(buf.len() + 16 + ((r >> 8) % 113) as usize, 0);
            4
        }
        _ => {
            // Incompressible bytes: hashes, keys, compressed blobs.
            for _ in 0..4 + (r >> 8) % 6 {
                buf.extend_from_slice(&rng.next().to_le_bytes());
            }
            5
        }
    };
    let len = (buf.len() - start - 8) as u32;
    buf[start] = tag;
    buf[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
}

fn page_checksum(page: &[u8]) -> u64 {
    let mut h = 0xCBF2_9CE4_8422_2325u64;
    for c in page.chunks_exact(8) {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

fn rss_anon_mib() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or("unknown".to_string(), |kb| format!("{} MiB", kb / 1024))
}

fn parse_args() -> Result<(usize, u64), String> {
    let (mut mib, mut idle) = (384usize, 4u64);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            let v = args.next().ok_or(format!("{name} needs a value"))?;
            v.parse::<u64>()
                .map_err(|_| format!("{name}: not a number: {v:?}"))
        };
        match a.as_str() {
            "--mib" => mib = value("--mib")? as usize,
            "--idle-secs" => idle = value("--idle-secs")?,
            "-h" | "--help" => {
                println!("usage: uswap-demo [--mib N (default 384)] [--idle-secs N (default 4)]");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    if mib == 0 {
        return Err("--mib must be at least 1".into());
    }
    Ok((mib, idle))
}

fn main() {
    let (mib, idle_secs) = parse_args().unwrap_or_else(|e| {
        eprintln!("uswap-demo: {e}\nusage: uswap-demo [--mib N] [--idle-secs N]");
        std::process::exit(2);
    });
    let len = mib * MIB;
    let pages = len / PAGE;

    println!("uswap-demo: filling {mib} MiB with heap-like data");
    let t0 = Instant::now();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut data: Vec<u8> = Vec::with_capacity(len + 1024);
    let step = (len / 4).max(1);
    let mut next_report = step;
    while data.len() < len {
        push_record(&mut data, &mut rng);
        if mib >= 64 && data.len() >= next_report && data.len() < len {
            println!("  {} / {mib} MiB", data.len() / MIB);
            next_report += step;
        }
    }
    data.truncate(len);
    let sums: Vec<u64> = data.chunks_exact(PAGE).map(page_checksum).collect();
    println!(
        "filled {mib} MiB in {:.1} s ({pages} pages checksummed)",
        t0.elapsed().as_secs_f64()
    );

    println!("idle for {idle_secs} s (under `uswap run`, cold pages get evicted now)");
    for _ in 0..idle_secs {
        std::thread::sleep(Duration::from_secs(1));
        println!("idle: RssAnon {}", rss_anon_mib());
    }

    let t0 = Instant::now();
    let mut bad = 0usize;
    for (i, (page, &sum)) in data.chunks_exact(PAGE).zip(&sums).enumerate() {
        if page_checksum(page) != sum {
            bad += 1;
            if bad <= 10 {
                println!(
                    "page {i} (offset {:#x}) does not match its checksum",
                    i * PAGE
                );
            }
        }
    }
    println!(
        "verified {pages} pages, {bad} mismatches (re-read in {:.2} s)",
        t0.elapsed().as_secs_f64()
    );
    println!("after re-read: RssAnon {}", rss_anon_mib());
    std::process::exit(if bad == 0 { 0 } else { 1 });
}
