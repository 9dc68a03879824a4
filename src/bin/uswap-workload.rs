//! `uswap-workload`: test and benchmark workload for uswap.
//!
//! A plain program (it does not use the `uswap` library: it is one of the "unmodified
//! programs" under test) with one subcommand per memory-management scenario: fill memory
//! with deterministic page contents, go idle so a monitor can evict the pages, then touch
//! them again in some interesting way (plain reads, syscalls that fault in kernel mode,
//! partial writes, threads, munmap/mremap/madvise/realloc, fork, pinned pages) and verify
//! every page.
//!
//! Every subcommand ends with one line `RESULT ok ...` (exit 0) or `RESULT FAIL <reason>`
//! (exit 1). Machine-readable lines: `RSSANON <bytes>`, `FILL_MIBS <MiB/s>`,
//! `TOUCH_MIBS <MiB/s>`, `LAT_US p50=.. p99=.. p999=.. max=.. n=..`, `TOTAL_S <secs>`; `bench`
//! adds `FILL_S`, `PHASE_S`, `FILL_FAULTS`/`PHASE_FAULTS`, `RSS_END` and `LINGER <ms>` (read by
//! `bench/run`).
//!
//! Page format (4 KiB, little-endian u64 words): word 0 is the page index, word 1 is
//! `MAGIC << 32 | version`, words 2..511 are pseudo-text (16 eight-byte words picked by a
//! counter-based PRNG seeded by index and version: compressible, unique per page), word 511
//! is a checksum of words 0..511. Verification checks the header, a few words at fixed
//! offsets and the embedded checksum, which is cheap even in debug builds.

use std::io::Write;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;
const MIB: usize = 1 << 20;
const CHUNK: usize = 64 * 1024;
const PAGES_PER_CHUNK: usize = CHUNK / PAGE;
const MAGIC: u64 = 0x5553_5750; // "USWP"
const MAX_DIAG: usize = 10;
/// Word indices checked against the generator on every verification.
const SPOT: [usize; 5] = [2, 77, 255, 256, 509];

static DIAG_LINES: AtomicUsize = AtomicUsize::new(0);

const fn w8(b: &[u8; 8]) -> u64 {
    u64::from_le_bytes(*b)
}

const TEXT: [u64; 16] = [
    w8(b"the page"),
    w8(b" memory "),
    w8(b"is cold "),
    w8(b"and then"),
    w8(b" swapped"),
    w8(b" out to "),
    w8(b"a store,"),
    w8(b" fault! "),
    w8(b"compress"),
    w8(b"ed bytes"),
    w8(b" return "),
    w8(b"on touch"),
    w8(b". Again "),
    w8(b"monitor "),
    w8(b"userfaul"),
    w8(b"tfd 4KiB"),
];

// ---------------------------------------------------------------------------------------
// Page contents

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn page_seed(idx: u64, ver: u32) -> u64 {
    mix(idx ^ (u64::from(ver) << 40) ^ 0x0123_4567_89AB_CDEF)
}

fn header1(ver: u32) -> u64 {
    (MAGIC << 32) | u64::from(ver)
}

fn checksum(ws: &[u64]) -> u64 {
    let mut h = 0xCBF2_9CE4_8422_2325u64;
    for &x in ws {
        h = (h ^ x).wrapping_mul(0x0000_0100_0000_01B3);
    }
    h ^ (h >> 29)
}

/// Expected text word `j` (2 <= j < WORDS-1).
fn text_word(seed: u64, j: usize) -> u64 {
    let r = mix(seed.wrapping_add((j / 16) as u64));
    TEXT[((r >> ((j % 16) * 4)) & 15) as usize]
}

/// Writes page `idx` version `ver` into `w` (stores only: the page is not read before it
/// has been fully written).
fn fill_page(w: &mut [u64], idx: u64, ver: u32) {
    let w = &mut w[..WORDS];
    w[0] = idx;
    w[1] = header1(ver);
    let seed = page_seed(idx, ver);
    let mut r = mix(seed);
    for (j, slot) in w.iter_mut().enumerate().take(WORDS - 1).skip(2) {
        if j % 16 == 0 {
            r = mix(seed.wrapping_add((j / 16) as u64));
        }
        *slot = TEXT[((r >> ((j % 16) * 4)) & 15) as usize];
    }
    w[WORDS - 1] = checksum(&w[..WORDS - 1]);
}

fn expected_word(idx: u64, ver: u32, j: usize) -> u64 {
    match j {
        0 => idx,
        1 => header1(ver),
        j if j < WORDS - 1 => text_word(page_seed(idx, ver), j),
        _ => {
            let mut p = [0u64; WORDS];
            fill_page(&mut p, idx, ver);
            p[WORDS - 1]
        }
    }
}

fn word_byte(w: u64, off: usize) -> u8 {
    w.to_le_bytes()[off % 8]
}

fn set_word_byte(w: &mut u64, off: usize, v: u8) {
    let mut b = w.to_le_bytes();
    b[off % 8] = v;
    *w = u64::from_le_bytes(b);
}

/// The byte a partial writer stores at `off` of page `idx`: always differs from the
/// original content so a lost write is detected.
fn patch_value(idx: u64, ver: u32, off: usize) -> u8 {
    word_byte(expected_word(idx, ver, off / 8), off) ^ 0x5A
}

/// Cheap verification: header, spot words, embedded checksum.
fn verify_page(w: &[u64], idx: u64, ver: u32) -> bool {
    if w.len() < WORDS || w[0] != idx || w[1] != header1(ver) {
        return false;
    }
    let seed = page_seed(idx, ver);
    if SPOT.iter().any(|&j| w[j] != text_word(seed, j)) {
        return false;
    }
    w[WORDS - 1] == checksum(&w[..WORDS - 1])
}

/// Verification of a page in which single bytes were overwritten: `patches` lists
/// (byte offset, expected value); offsets must lie in 16..4088.
fn verify_patched(w: &[u64], idx: u64, ver: u32, patches: &[(usize, u8)]) -> bool {
    if patches.is_empty() {
        return verify_page(w, idx, ver);
    }
    let mut s = [0u64; WORDS];
    s.copy_from_slice(&w[..WORDS]);
    for &(off, val) in patches {
        if word_byte(s[off / 8], off) != val {
            return false;
        }
        let orig = word_byte(expected_word(idx, ver, off / 8), off);
        set_word_byte(&mut s[off / 8], off, orig);
    }
    verify_page(&s, idx, ver)
}

fn diag(line: String) {
    let n = DIAG_LINES.fetch_add(1, Ordering::Relaxed);
    if n < MAX_DIAG {
        println!("{line}");
    } else if n == MAX_DIAG {
        println!("MISMATCH (further mismatch lines suppressed)");
    }
}

fn describe_header(w: &[u64]) -> String {
    if w[1] >> 32 == MAGIC {
        format!("idx={} ver={}", w[0], w[1] & 0xFFFF_FFFF)
    } else {
        format!("raw {:#018x} {:#018x}", w[0], w[1])
    }
}

fn report_mismatch(label: &str, w: &[u64], idx: u64, ver: u32, patches: &[(usize, u8)]) {
    let mut e = [0u64; WORDS];
    fill_page(&mut e, idx, ver);
    for &(off, val) in patches {
        set_word_byte(&mut e[off / 8], off, val);
    }
    let first = (0..PAGE).find(|&o| word_byte(w[o / 8], o) != word_byte(e[o / 8], o));
    let zero = w[..WORDS].iter().all(|&x| x == 0);
    let where_ = match first {
        Some(o) => format!(
            "first differing offset {o} (expected {:#04x}, found {:#04x})",
            word_byte(e[o / 8], o),
            word_byte(w[o / 8], o)
        ),
        None => "no differing byte (checksum/patch logic?)".to_string(),
    };
    diag(format!(
        "MISMATCH {label} page {idx}: expected header idx={idx} ver={ver}, found {}{}, {where_}",
        describe_header(w),
        if zero { " (page reads all zeros)" } else { "" },
    ));
}

#[derive(Default, Clone, Copy)]
struct Tally {
    pages: u64,
    bad: u64,
}

impl Tally {
    fn add(&mut self, o: Tally) {
        self.pages += o.pages;
        self.bad += o.bad;
    }
    fn check(&mut self, label: &str, w: &[u64], idx: u64, ver: u32, patches: &[(usize, u8)]) {
        self.pages += 1;
        if !verify_patched(w, idx, ver, patches) {
            self.bad += 1;
            report_mismatch(label, w, idx, ver, patches);
        }
    }
    /// Verifies consecutive pages `first_idx..` of version `ver` in `words`.
    fn range(&mut self, label: &str, words: &[u64], first_idx: u64, ver: u32) {
        for (k, p) in words.chunks_exact(WORDS).enumerate() {
            self.check(label, p, first_idx + k as u64, ver, &[]);
        }
    }
    /// Checks that every page in `words` reads as zeros.
    fn zeros(&mut self, label: &str, words: &[u64], first_idx: u64) {
        for (k, p) in words.chunks_exact(WORDS).enumerate() {
            self.pages += 1;
            if let Some(j) = p.iter().position(|&x| x != 0) {
                self.bad += 1;
                diag(format!(
                    "MISMATCH {label} page {}: expected zeros, found nonzero word at offset {} \
                     ({:#018x}); header {}",
                    first_idx + k as u64,
                    j * 8,
                    p[j],
                    describe_header(p)
                ));
            }
        }
    }
    fn print(&self, what: &str) {
        println!(
            "verify {what}: {} pages verified, {} mismatches",
            self.pages, self.bad
        );
    }
}

fn fill_range(words: &mut [u64], first_idx: u64, ver: u32) {
    for (k, p) in words.chunks_exact_mut(WORDS).enumerate() {
        fill_page(p, first_idx + k as u64, ver);
    }
}

// ---------------------------------------------------------------------------------------
// Memory and OS helpers

/// An anonymous private mapping, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

fn errno_str() -> String {
    std::io::Error::last_os_error().to_string()
}

impl Mapping {
    fn anon(len: usize) -> Result<Mapping, String> {
        Mapping::map(
            len,
            std::ptr::null_mut(),
            libc::PROT_READ | libc::PROT_WRITE,
        )
    }

    fn map(len: usize, hint: *mut u8, prot: i32) -> Result<Mapping, String> {
        // SAFETY: a fresh anonymous private mapping without MAP_FIXED cannot clobber any
        // existing memory; the hint is only a hint.
        let p = unsafe {
            libc::mmap(
                hint.cast(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap of {len} bytes failed: {}", errno_str()));
        }
        Ok(Mapping { ptr: p.cast(), len })
    }

    fn words(&self) -> &[u64] {
        // SAFETY: ptr is page-aligned and valid for len bytes (readable, writable) for as
        // long as self lives; a shared borrow of self excludes words_mut.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u64>(), self.len / 8) }
    }

    fn words_mut(&mut self) -> &mut [u64] {
        // SAFETY: as in words(); the exclusive borrow of self makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast::<u64>(), self.len / 8) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in words_mut().
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    fn atomic_bytes(&self) -> &[AtomicU8] {
        // SAFETY: AtomicU8 has the size and alignment of u8; the mapping is valid for len
        // bytes while self lives. While this shared view is used for concurrent stores,
        // callers do not hold a non-atomic view of the same bytes at the same time.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<AtomicU8>(), self.len) }
    }

    /// mremap; on success self's range now belongs to the returned mapping.
    fn remap(self, new_len: usize, flags: i32, new_addr: *mut u8) -> Result<Mapping, String> {
        // SAFETY: we own [ptr, ptr+len); with MREMAP_FIXED the caller passes an address
        // range it reserved itself, so nothing else is clobbered.
        let p = unsafe { libc::mremap(self.ptr.cast(), self.len, new_len, flags, new_addr) };
        if p == libc::MAP_FAILED {
            return Err(format!("mremap to {new_len} bytes failed: {}", errno_str()));
        }
        std::mem::forget(self);
        Ok(Mapping {
            ptr: p.cast(),
            len: new_len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own this mapping and no borrows of it outlive self.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

fn rss_anon() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn print_rss() -> u64 {
    let r = rss_anon();
    println!("RSSANON {r}");
    r
}

fn idle(ms: u64) {
    println!("idle {ms} ms");
    flush();
    std::thread::sleep(Duration::from_millis(ms));
}

fn flush() {
    let _ = std::io::stdout().flush();
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn pipe() -> Result<(i32, i32), String> {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe2: {}", errno_str()));
    }
    Ok((fds[0], fds[1]))
}

fn close(fd: i32) {
    // SAFETY: fd is a descriptor this program opened and closes exactly once.
    unsafe {
        libc::close(fd);
    }
}

/// read(2) exactly `len` bytes into `ptr`.
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes.
unsafe fn read_full(fd: i32, ptr: *mut u8, len: usize) -> Result<(), String> {
    let mut done = 0;
    while done < len {
        // SAFETY: ptr+done..ptr+len is within the caller's valid range.
        let n = unsafe { libc::read(fd, ptr.add(done).cast(), len - done) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("read(2) at +{done}: {e}"));
        }
        if n == 0 {
            return Err(format!("read(2): early EOF after {done} of {len} bytes"));
        }
        done += n as usize;
    }
    Ok(())
}

/// write(2) exactly `len` bytes from `ptr`.
///
/// # Safety
/// `ptr` must be valid for reads of `len` bytes.
unsafe fn write_full(fd: i32, ptr: *const u8, len: usize) -> Result<(), String> {
    let mut done = 0;
    while done < len {
        // SAFETY: ptr+done..ptr+len is within the caller's valid range.
        let n = unsafe { libc::write(fd, ptr.add(done).cast(), len - done) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("write(2) at +{done}: {e}"));
        }
        done += n as usize;
    }
    Ok(())
}

fn ok_if(t: Tally, what: &str) -> Result<String, String> {
    if t.bad == 0 {
        Ok(format!("{what} pages={} mismatches=0", t.pages))
    } else {
        Err(format!("{what}: {} of {} pages mismatched", t.bad, t.pages))
    }
}

// ---------------------------------------------------------------------------------------
// Arguments

struct Opts {
    vals: Vec<(String, String)>,
    flags: Vec<String>,
}

impl Opts {
    fn parse(args: &[String], valued: &[&str], boolean: &[&str]) -> Result<Opts, String> {
        let mut o = Opts {
            vals: Vec::new(),
            flags: Vec::new(),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let Some(name) = a.strip_prefix("--") else {
                return Err(format!("unexpected argument {a:?}"));
            };
            let (name, inline) = match name.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (name, None),
            };
            if valued.contains(&name) {
                let v = match inline {
                    Some(v) => v,
                    None => it.next().ok_or(format!("--{name} needs a value"))?.clone(),
                };
                o.vals.push((name.to_string(), v));
            } else if boolean.contains(&name) && inline.is_none() {
                o.flags.push(name.to_string());
            } else {
                return Err(format!("unknown option --{name}"));
            }
        }
        Ok(o)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.vals
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn num(&self, name: &str, default: u64) -> Result<u64, String> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{name}: not a number: {v:?}")),
        }
    }

    fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f == name)
    }

    fn mib(&self) -> Result<(usize, usize), String> {
        let mib = self.num("mib", 64)?;
        if mib == 0 || mib > (1 << 20) {
            return Err("--mib must be at least 1".into());
        }
        let len = mib as usize * MIB;
        Ok((len, len / PAGE))
    }
}

// ---------------------------------------------------------------------------------------
// Subcommands

fn fill_timed(m: &mut Mapping, first_idx: u64, ver: u32, what: &str) {
    let t0 = Instant::now();
    fill_range(m.words_mut(), first_idx, ver);
    println!(
        "filled {what}: {} MiB ({} pages) in {:.3} s",
        m.len / MIB,
        m.len / PAGE,
        t0.elapsed().as_secs_f64()
    );
}

fn cmd_fill_verify(o: &Opts) -> Result<String, String> {
    let (len, npages) = o.mib()?;
    let idle_ms = o.num("idle-ms", 1500)?;
    let rounds = o.num("rounds", 1)?.max(1);
    let rss = o.flag("rss-report");
    let mut m = Mapping::anon(len)?;
    fill_timed(&mut m, 0, 1, "region");
    if rss {
        println!("RSS filled anon={}", rss_anon());
    }
    let mut vers = vec![1u32; npages];
    let mut total = Tally::default();
    for round in 1..=rounds {
        if round > 1 {
            let w = m.words_mut();
            let mut n = 0;
            for (i, v) in vers.iter_mut().enumerate() {
                if (i as u64 + round) & 1 == 0 {
                    *v += 1;
                    fill_page(&mut w[i * WORDS..(i + 1) * WORDS], i as u64, *v);
                    n += 1;
                }
            }
            println!("round {round}: rewrote {n} pages with a new version");
        }
        idle(idle_ms);
        print_rss();
        let t0 = Instant::now();
        let mut t = Tally::default();
        for (i, p) in m.words().chunks_exact(WORDS).enumerate() {
            t.check("fill-verify", p, i as u64, vers[i], &[]);
        }
        t.print(&format!(
            "round {round} ({:.3} s)",
            t0.elapsed().as_secs_f64()
        ));
        if rss {
            println!("RSS verified anon={}", rss_anon());
        }
        total.add(t);
    }
    ok_if(total, &format!("fill-verify rounds={rounds}"))
}

fn cmd_read_syscall(o: &Opts) -> Result<String, String> {
    let (len, _) = o.mib()?;
    let idle_ms = o.num("idle-ms", 1500)?;
    let mut m = Mapping::anon(len)?;
    fill_timed(&mut m, 0, 1, "region");
    idle(idle_ms);
    print_rss();
    let nchunks = len / CHUNK;
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let base = m.ptr as usize;
    let t0 = Instant::now();
    let (main_res, writer_res, reader_tally) = std::thread::scope(|s| {
        // Feeds version-7 content of the even chunks into the pipe.
        let writer = s.spawn(move || -> Result<(), String> {
            let mut buf = vec![0u64; CHUNK / 8];
            for c in (0..nchunks).step_by(2) {
                fill_range(&mut buf, (c * PAGES_PER_CHUNK) as u64, 7);
                // SAFETY: buf is a live Vec of exactly CHUNK bytes.
                unsafe { write_full(in_w, buf.as_ptr().cast(), CHUNK)? };
            }
            Ok(())
        });
        // Receives the odd chunks written out of the (evicted) buffer and verifies them.
        let reader = s.spawn(move || -> Result<Tally, String> {
            let mut buf = vec![0u64; CHUNK / 8];
            let mut t = Tally::default();
            for c in (1..nchunks).step_by(2) {
                // SAFETY: buf is a live Vec of exactly CHUNK bytes.
                unsafe { read_full(out_r, buf.as_mut_ptr().cast(), CHUNK)? };
                t.range(
                    "write(2)-from-buffer",
                    &buf,
                    (c * PAGES_PER_CHUNK) as u64,
                    1,
                );
            }
            Ok(t)
        });
        let mut res = Ok(());
        for c in 0..nchunks {
            let p = (base + c * CHUNK) as *mut u8;
            let r = if c % 2 == 0 {
                // SAFETY: p..p+CHUNK lies inside the mapping, which outlives this scope;
                // no Rust reference to it is alive here.
                unsafe { read_full(in_r, p, CHUNK) }
            } else {
                // SAFETY: as above (read-only use).
                unsafe { write_full(out_w, p, CHUNK) }
            };
            if let Err(e) = r {
                res = Err(format!("chunk {c}: {e}"));
                break;
            }
        }
        // Unblock the helper threads if we stopped early.
        close(in_r);
        close(out_w);
        (res, writer.join(), reader.join())
    });
    close(in_w);
    close(out_r);
    main_res?;
    let secs = t0.elapsed().as_secs_f64();
    writer_res.map_err(|_| "writer thread panicked".to_string())??;
    let out_t = reader_tally.map_err(|_| "reader thread panicked".to_string())??;
    println!(
        "syscalls: read(2) into {} chunks, write(2) from {} chunks of 64 KiB in {secs:.3} s",
        nchunks.div_ceil(2),
        nchunks / 2
    );
    out_t.print("data written out of the buffer by write(2)");
    let mut t = Tally::default();
    for (c, ch) in m.words().chunks_exact(CHUNK / 8).enumerate() {
        let ver = if c % 2 == 0 { 7 } else { 1 };
        t.range("read-syscall", ch, (c * PAGES_PER_CHUNK) as u64, ver);
    }
    t.print("buffer (even chunks filled by read(2))");
    t.add(out_t);
    ok_if(t, "read-syscall")
}

const PARTIAL_OFF: usize = 1000;

/// Breaks the protocol on purpose: after its memory was evicted, the program writes garbage
/// into the shim's socket (the only socket it has). The monitor must refuse it and still hand
/// every page back, so the program goes on with all its data.
fn cmd_garbage_to_monitor(o: &Opts) -> Result<String, String> {
    let (len, _npages) = o.mib()?;
    let idle_ms = o.num("idle-ms", 1500)?;
    let mut m = Mapping::anon(len)?;
    fill_timed(&mut m, 0, 1, "region");
    idle(idle_ms);
    print_rss();
    let mut sent = 0;
    for entry in std::fs::read_dir("/proc/self/fd").map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        if !target.to_string_lossy().starts_with("socket:") {
            continue;
        }
        let fd: i32 = entry.file_name().to_string_lossy().parse().unwrap_or(-1);
        let junk = b"this is not a uswap packet";
        // SAFETY: sending our own bytes on a descriptor of this process.
        let n = unsafe { libc::send(fd, junk.as_ptr().cast(), junk.len(), libc::MSG_NOSIGNAL) };
        if n > 0 {
            sent += 1;
        }
    }
    println!("sent garbage on {sent} socket(s)");
    if sent == 0 {
        return Err("found no socket to the monitor".into());
    }
    idle(idle_ms);
    let mut t = Tally::default();
    t.range("region", m.words(), 0, 1);
    t.print("region after the monitor let go");
    ok_if(t, "garbage-to-monitor")
}

/// Behaves like a program that daemonises: after its memory was evicted it closes every
/// descriptor above stderr (closefrom), opens pipes that reuse those numbers, maps and unmaps
/// memory (which makes the shim want to signal its agent) and checks that nothing foreign was
/// written into or read out of its pipes, then verifies every page. `--close-below N` closes
/// only the numbers under N (default 1024): with 512, the shim's high-numbered duplicates stay
/// open, as in a program that closes only the low numbers it thinks it inherited.
fn cmd_close_all_fds(o: &Opts) -> Result<String, String> {
    let (len, _npages) = o.mib()?;
    let idle_ms = o.num("idle-ms", 1500)?;
    let close_below = o.num("close-below", 1024)?.clamp(4, 1 << 20) as i32;
    let mut m = Mapping::anon(len)?;
    fill_timed(&mut m, 0, 1, "region");
    idle(idle_ms);
    print_rss();
    let mut closed = 0;
    for fd in 3..close_below {
        // SAFETY: closing descriptors of this process, as a daemon's closefrom(3) does.
        if unsafe { libc::close(fd) } == 0 {
            closed += 1;
        }
    }
    println!("closed {closed} descriptors");
    if o.flag("fork") {
        // Fork at once, while the monitor may still be handing pages back: the child must get
        // a complete copy all the same.
        // SAFETY: the child only verifies its memory and leaves with _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(format!("fork: {}", errno_str()));
        }
        if pid == 0 {
            let mut t = Tally::default();
            t.range("child", m.words(), 0, 1);
            t.print("child right after closefrom + fork");
            // SAFETY: leaving the child without running the parent's exit handlers.
            unsafe { libc::_exit(if t.bad == 0 { 0 } else { 1 }) };
        }
        let mut st = 0;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        if !(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0) {
            return Err(format!(
                "child after closefrom + fork failed (status {st:#x})"
            ));
        }
        println!("child after closefrom + fork: ok");
    }
    // Reuse the numbers, then give the shim every reason to write to them.
    let mut pipes = Vec::new();
    for _ in 0..8 {
        pipes.push(pipe()?);
    }
    for _ in 0..64 {
        let extra = Mapping::anon(1 << 20)?;
        drop(extra);
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    for &(r, w) in &pipes {
        let mut b = [0u8; 64];
        // SAFETY: non-blocking read from our own pipe into a local buffer.
        let n = unsafe {
            libc::fcntl(r, libc::F_SETFL, libc::O_NONBLOCK);
            libc::read(r, b.as_mut_ptr().cast(), b.len())
        };
        if n > 0 {
            return Err(format!(
                "{n} foreign bytes appeared in pipe fd {r} (written by the shim?)"
            ));
        }
        let msg = b"mine";
        // SAFETY: writing our own bytes to our own pipe.
        unsafe { libc::write(w, msg.as_ptr().cast(), msg.len()) };
        // SAFETY: reading them back into a local buffer.
        let n = unsafe { libc::read(r, b.as_mut_ptr().cast(), b.len()) };
        if n != 4 || &b[..4] != msg {
            return Err(format!(
                "pipe fd {r}: read {n} bytes back, not what was written"
            ));
        }
    }
    idle(idle_ms);
    let mut t = Tally::default();
    t.range("region", m.words(), 0, 1);
    t.print("region after closing every descriptor");
    ok_if(t, "close-all-fds")
}

/// Random operations on many regions from several threads, each checked against a shadow
/// copy of what every page must hold: full-page writes, reads, MADV_DONTNEED (reads zero
/// afterwards), munmap + fresh mmap, mremap grow (moving) and shrink, with pauses so the monitor
/// evicts in between. Every page of every region is verified at the end.
fn cmd_chaos(o: &Opts) -> Result<String, String> {
    let secs = o.num("secs", 5)?;
    let threads = o.num("threads", 4)?.clamp(1, 64) as usize;
    let (len, _) = o.mib()?;
    let per_thread_bytes = (len / threads).max(1 << 20);
    let fork_ms = o.num("fork-ms", 0)?;
    let deadline = Instant::now() + std::time::Duration::from_secs(secs);
    let results: Vec<Result<(u64, u64), String>> = std::thread::scope(|scope| {
        let mut handles: Vec<_> = (0..threads)
            .map(|t| scope.spawn(move || chaos_thread(t as u64, per_thread_bytes, deadline)))
            .collect();
        if fork_ms > 0 {
            handles.push(scope.spawn(move || chaos_forks(per_thread_bytes, deadline, fork_ms)));
        }
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
            .collect()
    });
    let (mut ops, mut checked) = (0, 0);
    for r in results {
        let (o, c) = r?;
        ops += o;
        checked += c;
    }
    println!("chaos: {ops} operations, {checked} page checks, 0 mismatches");
    Ok(format!("chaos ops={ops} checks={checked} mismatches=0"))
}

struct ChaosRegion {
    ptr: *mut u8,
    pages: usize,
    id: u64,
    /// Recent layout changes, for diagnostics: (what, address, pages).
    hist: Vec<(&'static str, usize, usize)>,
    /// Per page: 0 = must read as zeros, else the version last written.
    ver: Vec<u32>,
}

fn chaos_fill(p: *mut u8, id: u64, idx: usize, ver: u32) {
    // SAFETY: callers pass a page of a live mapping of this thread.
    let w = unsafe { std::slice::from_raw_parts_mut(p.cast::<u64>(), WORDS) };
    let seed = mix(id ^ ((idx as u64) << 20) ^ ((ver as u64) << 44));
    w[0] = id;
    w[1] = idx as u64;
    w[2] = ver as u64;
    for (j, x) in w.iter_mut().enumerate().skip(3) {
        *x = if j % 4 == 0 {
            seed.wrapping_add(j as u64)
        } else {
            (j as u64) << 8
        };
    }
}

fn chaos_check(p: *const u8, id: u64, idx: usize, ver: u32) -> Result<(), String> {
    // SAFETY: callers pass a page of a live mapping of this thread.
    let w = unsafe { std::slice::from_raw_parts(p.cast::<u64>(), WORDS) };
    if ver == 0 {
        if let Some(j) = w.iter().position(|x| *x != 0) {
            return Err(format!("region {id} page {idx} at {p:?}: expected zeros, word {j} = {:#x} (header {:#x} {:#x} {:#x})", w[j], w[0], w[1], w[2]));
        }
        return Ok(());
    }
    let seed = mix(id ^ ((idx as u64) << 20) ^ ((ver as u64) << 44));
    if w[0] != id || w[1] != idx as u64 || w[2] != ver as u64 {
        return Err(format!(
            "region {id} page {idx} at {p:?}: expected version {ver}, found header {:#x} {:#x} {:#x}",
            w[0], w[1], w[2]
        ));
    }
    for j in [3usize, 4, 100, 256, 511] {
        let want = if j % 4 == 0 {
            seed.wrapping_add(j as u64)
        } else {
            (j as u64) << 8
        };
        if w[j] != want {
            return Err(format!(
                "region {id} page {idx} version {ver}: word {j} is {:#x}, expected {want:#x}",
                w[j]
            ));
        }
    }
    Ok(())
}

/// [`chaos_check`] without the message (no allocation: usable in a forked child).
fn chaos_matches(p: *const u8, id: u64, idx: usize, ver: u32) -> bool {
    // SAFETY: callers pass a page of a live mapping.
    let w = unsafe { std::slice::from_raw_parts(p.cast::<u64>(), WORDS) };
    if ver == 0 {
        return w.iter().all(|x| *x == 0);
    }
    let seed = mix(id ^ ((idx as u64) << 20) ^ ((ver as u64) << 44));
    w[0] == id
        && w[1] == idx as u64
        && w[2] == ver as u64
        && [3usize, 4, 100, 256, 511].iter().all(|&j| {
            w[j] == if j % 4 == 0 {
                seed.wrapping_add(j as u64)
            } else {
                (j as u64) << 8
            }
        })
}

/// The /proc/self/smaps entries (range and VmFlags) overlapping `[start, start+len)`.
fn smaps_of(start: u64, len: u64) -> String {
    let text = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let mut out = String::new();
    let mut keep = false;
    for line in text.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    keep = a < start + len && start < b;
                    if keep {
                        out.push_str(line);
                        out.push('\n');
                    }
                    continue;
                }
            }
        }
        if keep && line.starts_with("VmFlags") {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn chaos_map(bytes: usize) -> Result<*mut u8, String> {
    // SAFETY: a fresh anonymous private mapping.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap: {}", errno_str()));
    }
    Ok(p.cast())
}

/// Waits for our child `pid`: `None` if it exited 0, else its wait status.
fn reap(pid: libc::pid_t) -> Result<Option<i32>, String> {
    let mut status = 0;
    // SAFETY: waiting for our own child; status is a valid int.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
        return Err(format!("waitpid: {}", errno_str()));
    }
    Ok((!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0)).then_some(status))
}

/// The forking thread of `chaos --fork-ms N`: owns one region; every N ms it rewrites a
/// quarter of it and forks while the other threads go on faulting and remapping. Each child
/// checks the whole region against the versions at the fork and leaves with its verdict.
/// Returns (forks, page checks by the children and by itself).
fn chaos_forks(bytes: usize, deadline: Instant, fork_ms: u64) -> Result<(u64, u64), String> {
    let pages = (bytes / PAGE).max(16);
    let ptr = chaos_map(pages * PAGE)?;
    let id = 0xf0_0000_0000u64;
    let mut ver = vec![1u32; pages];
    for (i, v) in ver.iter().enumerate() {
        // SAFETY: i < pages.
        chaos_fill(unsafe { ptr.add(i * PAGE) }, id, i, *v);
    }
    let (mut forks, mut checks, mut round) = (0u64, 0u64, 0usize);
    while Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(fork_ms));
        round += 1;
        for i in (round % 4..pages).step_by(4) {
            ver[i] += 1;
            // SAFETY: i < pages.
            chaos_fill(unsafe { ptr.add(i * PAGE) }, id, i, ver[i]);
        }
        // SAFETY: the child only reads memory, compares (no allocation: the error path is
        // never formatted there) and leaves with _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(format!("fork: {}", errno_str()));
        }
        if pid == 0 {
            let bad = (0..pages)
                // SAFETY: i < pages.
                .filter(|&i| !chaos_matches(unsafe { ptr.add(i * PAGE) }, id, i, ver[i]))
                .count();
            // SAFETY: _exit ends the child at once.
            unsafe { libc::_exit(if bad == 0 { 0 } else { 1 }) };
        }
        if let Some(status) = reap(pid)? {
            return Err(format!(
                "forked child {forks} found its copy of the fork region wrong (status {status:#x})"
            ));
        }
        forks += 1;
        checks += pages as u64;
    }
    for (i, v) in ver.iter().enumerate() {
        // SAFETY: i < pages.
        chaos_check(unsafe { ptr.add(i * PAGE) }, id, i, *v)?;
    }
    println!("chaos: {forks} forks from a thread, each child checked {pages} pages");
    Ok((forks, checks + pages as u64))
}

fn chaos_thread(t: u64, bytes: usize, deadline: Instant) -> Result<(u64, u64), String> {
    let mut rng = mix(0x9e37_79b9 ^ t);
    let mut next = |n: usize| -> usize {
        rng = mix(rng);
        (rng % n.max(1) as u64) as usize
    };
    let mut next_id = (t << 40) | 1;
    let slots = 6usize;
    let mut regions: Vec<ChaosRegion> = Vec::new();
    for _ in 0..slots {
        let pages = (bytes / slots / PAGE).max(16);
        let ptr = chaos_map(pages * PAGE)?;
        regions.push(ChaosRegion {
            ptr,
            pages,
            id: next_id,
            ver: vec![0; pages],
            hist: vec![("map", ptr as usize, pages)],
        });
        next_id += 1;
    }
    let (mut ops, mut checks) = (0u64, 0u64);
    // Fill most pages first, so there is something to evict.
    for r in &mut regions {
        for i in 0..r.pages {
            if i % 8 != 7 {
                r.ver[i] = 1;
                // SAFETY: i < pages.
                chaos_fill(unsafe { r.ptr.add(i * PAGE) }, r.id, i, 1);
            }
        }
    }
    while Instant::now() < deadline {
        ops += 1;
        let ri = next(regions.len());
        let op = next(100);
        let r = &mut regions[ri];
        match op {
            0..=39 => {
                let i = next(r.pages);
                // SAFETY: i < pages.
                chaos_check(unsafe { r.ptr.add(i * PAGE) }, r.id, i, r.ver[i])?;
                checks += 1;
            }
            40..=69 => {
                let i = next(r.pages);
                r.ver[i] += 1;
                // SAFETY: i < pages.
                chaos_fill(unsafe { r.ptr.add(i * PAGE) }, r.id, i, r.ver[i]);
            }
            70..=77 => {
                let first = next(r.pages);
                let n = (1 + next(16)).min(r.pages - first);
                // SAFETY: advising pages of our own mapping.
                if unsafe {
                    libc::madvise(
                        r.ptr.add(first * PAGE).cast(),
                        n * PAGE,
                        libc::MADV_DONTNEED,
                    )
                } != 0
                {
                    return Err(format!("madvise: {}", errno_str()));
                }
                for v in &mut r.ver[first..first + n] {
                    *v = 0;
                }
            }
            78..=82 => {
                // Verify, unmap, map a fresh region.
                for i in 0..r.pages {
                    // SAFETY: i < pages.
                    chaos_check(unsafe { r.ptr.add(i * PAGE) }, r.id, i, r.ver[i])?;
                }
                checks += r.pages as u64;
                // SAFETY: unmapping our own region.
                unsafe { libc::munmap(r.ptr.cast(), r.pages * PAGE) };
                let pages = 16 + next(bytes / slots / PAGE * 2);
                let ptr = chaos_map(pages * PAGE)?;
                *r = ChaosRegion {
                    ptr,
                    pages,
                    id: next_id,
                    ver: vec![0; pages],
                    hist: vec![("map", ptr as usize, pages)],
                };
                next_id += 1;
            }
            83..=88 => {
                // Grow, letting the kernel move it.
                let new_pages = r.pages + r.pages / 2 + 1;
                // SAFETY: remapping our own region; the old pointer is not used afterwards.
                let p = unsafe {
                    libc::mremap(
                        r.ptr.cast(),
                        r.pages * PAGE,
                        new_pages * PAGE,
                        libc::MREMAP_MAYMOVE,
                    )
                };
                if p == libc::MAP_FAILED {
                    let e = errno_str();
                    return Err(format!(
                        "mremap grow: {e}; mapping {:#x}+{:#x}:\n{}",
                        r.ptr as usize,
                        r.pages * PAGE,
                        smaps_of(r.ptr as u64, (r.pages * PAGE) as u64)
                    ));
                }
                r.ptr = p.cast();
                r.ver.resize(new_pages, 0);
                r.pages = new_pages;
            }
            89..=92 if r.pages > 32 => {
                let new_pages = r.pages / 2;
                // SAFETY: shrinking our own region in place.
                let p = unsafe { libc::mremap(r.ptr.cast(), r.pages * PAGE, new_pages * PAGE, 0) };
                if p == libc::MAP_FAILED {
                    return Err(format!("mremap shrink: {}", errno_str()));
                }
                r.ver.truncate(new_pages);
                r.pages = new_pages;
                r.hist.push(("shrink", r.ptr as usize, new_pages));
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(next(20) as u64)),
        }
    }
    for r in &regions {
        for i in 0..r.pages {
            // SAFETY: i < pages.
            chaos_check(unsafe { r.ptr.add(i * PAGE) }, r.id, i, r.ver[i])?;
        }
        checks += r.pages as u64;
        // SAFETY: unmapping our own region.
        unsafe { libc::munmap(r.ptr.cast(), r.pages * PAGE) };
    }
    Ok((ops, checks))
}

fn cmd_write_after_evict(o: &Opts) -> Result<String, String> {
    let (len, npages) = o.mib()?;
    let idle_ms = o.num("idle-ms", 1500)?;
    let mut m = Mapping::anon(len)?;
    fill_timed(&mut m, 0, 1, "region");
    idle(idle_ms);
    print_rss();
    let t0 = Instant::now();
    {
        let w = m.words_mut();
        for i in (0..npages).step_by(2) {
            fill_page(&mut w[i * WORDS..(i + 1) * WORDS], i as u64, 2);
        }
    }
    {
        let b = m.bytes_mut();
        for i in (1..npages).step_by(2) {
            b[i * PAGE + PARTIAL_OFF] = patch_value(i as u64, 1, PARTIAL_OFF);
        }
    }
    println!(
        "wrote {} pages fully (no read first) and 1 byte of {} pages in {:.3} s",
        npages.div_ceil(2),
        npages / 2,
        t0.elapsed().as_secs_f64()
    );
    let mut t = Tally::default();
    for (i, p) in m.words().chunks_exact(WORDS).enumerate() {
        let idx = i as u64;
        if i % 2 == 0 {
            t.check("full-rewrite", p, idx, 2, &[]);
        } else {
            t.check(
                "partial-write",
                p,
                idx,
                1,
                &[(PARTIAL_OFF, patch_value(idx, 1, PARTIAL_OFF))],
            );
        }
    }
    t.print("all pages");
    ok_if(t, "write-after-evict")
}

fn cmd_threads(o: &Opts) -> Result<String, String> {
    let (len, npages) = o.mib()?;
    let idle_ms = o.num("idle-ms", 1500)?;
    let nthreads = o.num("threads", 4)? as usize;
    if !(1..=256).contains(&nthreads) {
        return Err("--threads must be 1..=256".into());
    }
    let mut m = Mapping::anon(len)?;
    fill_timed(&mut m, 0, 1, "region");
    idle(idle_ms);
    print_rss();

    let barrier = Barrier::new(nthreads);
    let t0 = Instant::now();
    let words = m.words();
    let tallies: Vec<Tally> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..nthreads)
            .map(|_| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let mut t = Tally::default();
                    t.range("threads-read", words, 0, 1);
                    t
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or(Tally { pages: 0, bad: 1 }))
            .collect()
    });
    let mut read_t = Tally::default();
    for t in &tallies {
        read_t.add(*t);
    }
    read_t.print(&format!(
        "{nthreads} threads reading the same pages ({:.3} s)",
        t0.elapsed().as_secs_f64()
    ));

    idle(idle_ms);
    print_rss();
    let offs: Vec<usize> = (0..nthreads).map(|t| 16 + t * 15).collect();
    let t0 = Instant::now();
    let bytes = m.atomic_bytes();
    std::thread::scope(|s| {
        for &off in &offs {
            let barrier = &barrier;
            s.spawn(move || {
                barrier.wait();
                for i in 0..npages {
                    bytes[i * PAGE + off].store(patch_value(i as u64, 1, off), Ordering::Relaxed);
                }
            });
        }
    });
    println!(
        "{nthreads} threads wrote disjoint bytes of the same {npages} pages in {:.3} s",
        t0.elapsed().as_secs_f64()
    );
    let mut write_t = Tally::default();
    let mut patches = Vec::with_capacity(nthreads);
    for (i, p) in m.words().chunks_exact(WORDS).enumerate() {
        let idx = i as u64;
        patches.clear();
        patches.extend(offs.iter().map(|&off| (off, patch_value(idx, 1, off))));
        write_t.check("threads-write", p, idx, 1, &patches);
    }
    write_t.print("after concurrent writes");
    read_t.add(write_t);
    ok_if(read_t, &format!("threads={nthreads}"))
}

fn cmd_munmap(o: &Opts) -> Result<String, String> {
    let (len, npages) = o.mib()?;
    let idle_ms = o.num("idle-ms", 1500)?;
    let mut a = Mapping::anon(len)?;
    let mut b = Mapping::anon(len)?;
    fill_timed(&mut a, 0, 1, "region A");
    fill_timed(&mut b, npages as u64, 1, "region B");
    idle(idle_ms);
    print_rss();
    let old = a.ptr;
    drop(a);
    println!("munmap'ed region A at {old:p}");
    let mut c = Mapping::map(len, old, libc::PROT_READ | libc::PROT_WRITE)?;
    println!(
        "fresh mapping at {:p} ({})",
        c.ptr,
        if c.ptr == old {
            "same address"
        } else {
            "different address"
        }
    );
    let mut t = Tally::default();
    t.zeros("fresh-after-munmap", c.words(), 0);
    t.range("region-B", b.words(), npages as u64, 1);
    t.print("fresh region (zeros) and region B");
    fill_timed(&mut c, 0, 3, "fresh region");
    idle(idle_ms);
    print_rss();
    let mut t2 = Tally::default();
    t2.range("fresh-region", c.words(), 0, 3);
    t2.range("region-B", b.words(), npages as u64, 1);
    t2.print("both regions after another idle");
    t.add(t2);
    ok_if(t, "munmap")
}

fn cmd_mremap(o: &Opts) -> Result<String, String> {
    let (len, npages) = o.mib()?;
    let idle_ms = o.num("idle-ms", 1500)?;
    let reserve = Mapping::map(2 * len, std::ptr::null_mut(), libc::PROT_NONE)?;
    let mut m = Mapping::anon(len)?;
    fill_timed(&mut m, 0, 1, "region");
    idle(idle_ms);
    print_rss();
    let old = m.ptr;
    let mut m = m.remap(2 * len, libc::MREMAP_MAYMOVE, std::ptr::null_mut())?;
    println!(
        "mremap grow {} -> {} MiB: {old:p} -> {:p} ({})",
        len / MIB,
        2 * len / MIB,
        m.ptr,
        if m.ptr == old { "in place" } else { "moved" }
    );
    let mut t = Tally::default();
    t.range("grown-old-part", &m.words()[..len / 8], 0, 1);
    t.zeros("grown-tail", &m.words()[len / 8..], npages as u64);
    t.print("after grow (old part, zero tail)");
    fill_range(&mut m.words_mut()[len / 8..], npages as u64, 2);
    let target = reserve.ptr;
    let before = m.ptr;
    let m = m.remap(2 * len, libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED, target)?;
    // The reservation was replaced by the move; do not unmap it again.
    std::mem::forget(reserve);
    println!("mremap fixed move {before:p} -> {:p}", m.ptr);
    if m.ptr != target {
        return Err(format!(
            "MREMAP_FIXED landed at {:p}, not {target:p}",
            m.ptr
        ));
    }
    idle(idle_ms);
    print_rss();
    let mut t2 = Tally::default();
    t2.range("moved-first-half", &m.words()[..len / 8], 0, 1);
    t2.range("moved-second-half", &m.words()[len / 8..], npages as u64, 2);
    t2.print("after fixed move and idle");
    t.add(t2);
    ok_if(t, "mremap")
}

/// A fresh anonymous mapping of `len` bytes with an inaccessible page right after it (kept
/// for the life of the process), so growing the mapping with mremap must move it.
fn anon_before_guard_page(len: usize) -> Result<Mapping, String> {
    let both = Mapping::anon(len + PAGE)?;
    // SAFETY: MAP_FIXED over the last page of our own fresh mapping.
    let g = unsafe {
        libc::mmap(
            both.ptr.add(len).cast(),
            PAGE,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if g == libc::MAP_FAILED {
        return Err(format!("mmap guard page: {}", errno_str()));
    }
    let m = Mapping { ptr: both.ptr, len };
    // The guard page is never unmapped; `m` owns the rest.
    std::mem::forget(both);
    Ok(m)
}

/// A fresh mapping at exactly `at` (MAP_FIXED_NOREPLACE: fails rather than clobber).
fn map_at(at: *mut u8, len: usize) -> Result<Mapping, String> {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; it fails with EEXIST.
    let p = unsafe {
        libc::mmap(
            at.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!(
            "mmap at {at:p} of {len} bytes failed: {}",
            errno_str()
        ));
    }
    if p.cast::<u8>() != at {
        return Err(format!("mmap at {at:p} landed at {p:p}"));
    }
    Ok(Mapping { ptr: p.cast(), len })
}

/// Address-space changes over evicted memory, each followed by a fresh mapping over the
/// addresses it freed: an mremap that moves a region, MADV_DONTNEED of half a region, munmap
/// of half a region. Then every page is checked: moved pages keep their bytes, discarded and
/// fresh ones read zeros. (The e2e tests run it under a monitor made to die right after it
/// read one of these events, before applying it: `USWAP_TEST_DIE`.)
fn cmd_event_reuse(o: &Opts) -> Result<String, String> {
    let (len, npages) = o.mib()?;
    let idle_ms = o.num("idle-ms", 1500)?;
    let half = len / 2;
    let n = npages as u64;
    // `a` with an inaccessible page right after it, so growing it must move it (an mremap
    // to a fixed address would first unmap the destination: an UNMAP before the REMAP).
    let mut a = anon_before_guard_page(len)?;
    fill_timed(&mut a, 0, 1, "remap region");
    let mut b = Mapping::anon(len)?;
    fill_timed(&mut b, n, 1, "dontneed region");
    let mut c = Mapping::anon(len)?;
    fill_timed(&mut c, 2 * n, 1, "unmap region");
    idle(idle_ms);
    print_rss();
    // 1. Grow `a` (it moves), then map afresh where it was.
    let old = a.ptr;
    let a = a.remap(len + PAGE, libc::MREMAP_MAYMOVE, std::ptr::null_mut())?;
    if a.ptr == old {
        return Err("mremap grew the region in place past its guard page".into());
    }
    // Another thread (the shim's) may take the hole first: then that check is skipped.
    let fresh_a = match map_at(old, len) {
        Ok(m) => Some(m),
        Err(e) => {
            println!("note: no fresh mapping at the old address ({e})");
            None
        }
    };
    println!("mremap {old:p} -> {:p}, fresh mapping at {old:p}", a.ptr);
    // 2. Discard the first half of `b`.
    // SAFETY: the first half of our own mapping; no reference into it is alive.
    if unsafe { libc::madvise(b.ptr.cast(), half, libc::MADV_DONTNEED) } != 0 {
        return Err(format!("madvise(MADV_DONTNEED): {}", errno_str()));
    }
    // 3. Map afresh over the first half of `c` (MAP_FIXED: the kernel unmaps the old pages in
    //    the same call, so no other thread's mapping can take the hole in between).
    // SAFETY: MAP_FIXED replaces the first half of our own mapping `c`, which is rebuilt over
    // its second half below; `fresh_c` owns the first.
    let p = unsafe {
        libc::mmap(
            c.ptr.cast(),
            half,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if p != c.ptr.cast() {
        return Err(format!("mmap MAP_FIXED over {:p}: {}", c.ptr, errno_str()));
    }
    let fresh_c = Mapping {
        ptr: c.ptr,
        len: half,
    };
    // SAFETY: `half < len`, so the offset stays inside `c`'s mapping; the second half stays
    // mapped and is owned by `c_rest` from here.
    let second = unsafe { c.ptr.add(half) };
    let c_rest = Mapping {
        ptr: second,
        len: len - half,
    };
    std::mem::forget(c);
    println!("MADV_DONTNEED of half a region, a fresh mapping over half of another");
    let mut t = Tally::default();
    t.range("moved", &a.words()[..len / 8], 0, 1);
    t.zeros("moved-grown-tail", &a.words()[len / 8..], n);
    if let Some(f) = &fresh_a {
        t.zeros("fresh-at-old-address", f.words(), 0);
    }
    t.zeros("discarded-half", &b.words()[..half / 8], n);
    t.range(
        "kept-half",
        &b.words()[half / 8..],
        n + (half / PAGE) as u64,
        1,
    );
    t.zeros("fresh-over-unmapped", fresh_c.words(), 2 * n);
    t.range(
        "unmapped-kept-half",
        c_rest.words(),
        2 * n + (half / PAGE) as u64,
        1,
    );
    t.print("after the three changes");
    // Drop `b` explicitly after its last use (the compiler would anyway).
    drop(b);
    ok_if(t, "event-reuse")
}

/// A forked family moves shared evicted memory: the parent fills a region, lets it be
/// evicted, forks a child that keeps the fork-time copy (the pages are shared copy-on-write
/// entries of the family store), then grows the region so that it moves, and checks every
/// page; the child checks its own copy after that. (The e2e test kills the monitor right after
/// it read the parent's REMAP: the guardian then relocates every shared page it moved.)
/// Writes `bytes` of this thread's stack below the caller's frame (the pages then hold dead
/// data of this thread, for the monitor to evict once they are cold).
#[inline(never)]
fn use_stack_deeply(bytes: usize) -> u64 {
    const CHUNK: usize = 64 * 1024;
    let mut frame = [0u8; CHUNK];
    for i in (0..CHUNK).step_by(PAGE) {
        frame[i] = (i / PAGE) as u8 | 1;
    }
    let sum = std::hint::black_box(&frame)
        .iter()
        .step_by(PAGE)
        .map(|&b| b as u64)
        .sum::<u64>();
    if bytes > CHUNK {
        sum + use_stack_deeply(bytes - CHUNK)
    } else {
        sum
    }
}

/// How many of the `pages` pages just below this thread's stack pointer are not resident.
#[inline(never)]
fn evicted_below_sp(pages: usize) -> usize {
    let marker = 0u8;
    let sp = std::hint::black_box(&marker) as *const u8 as usize & !(PAGE - 1);
    let mut vec = [0u8; 64];
    let pages = pages.min(vec.len());
    // SAFETY: mincore only reads page-table state of our own stack mapping (the thread's 8 MiB
    // stack extends far below) into `vec`, which holds `pages` entries.
    if unsafe {
        libc::mincore(
            (sp - pages * PAGE) as *mut _,
            pages * PAGE,
            vec.as_mut_ptr(),
        )
    } != 0
    {
        return 0;
    }
    vec[..pages].iter().filter(|&&b| b & 1 == 0).count()
}

/// `fork-cold-stack`: a thread uses `--stack-mib` (6) MiB of its stack, fills a region, idles while the
/// monitor evicts both, then forks. The child checks its copy of the region. The pages below
/// the forking thread's stack pointer are evicted at the fork: a child that must bring its
/// pages home itself (its monitor died when it said `Hello`, test point `fork:hello`) runs
/// its rescue on that stack.
fn cmd_fork_cold_stack(o: &Opts) -> Result<String, String> {
    let (len, npages) = o.mib()?;
    let idle_ms = o.num("idle-ms", 1500)?;
    let stack_mib = o.num("stack-mib", 6)? as usize;
    let a = Mapping::anon(len)?;
    let base = a.ptr as usize;
    let t = std::thread::Builder::new()
        .stack_size((stack_mib + 2) * MIB)
        .spawn(move || -> Result<(), String> {
            let ptr = base as *mut u8;
            std::hint::black_box(use_stack_deeply(stack_mib * MIB));
            for i in 0..npages {
                // SAFETY: i < npages, inside the region the main thread keeps mapped.
                chaos_fill(unsafe { ptr.add(i * PAGE) }, 0x5c, i, 1);
            }
            println!(
                "filled {} MiB ({npages} pages), {stack_mib} MiB of stack used",
                len / MIB
            );
            // Nothing after the idle touches the stack deeply before the fork: the pages below
            // the stack pointer stay evicted.
            print_rss();
            idle(idle_ms);
            // The precondition of the test: the pages below the stack pointer are evicted.
            // The monitor's clock hand may have stopped short of them (the budget was met
            // first): rewriting a slice of the region makes it go on around.
            let mut below = evicted_below_sp(64);
            let slice = (npages / 8).max(1);
            for round in 0..32 {
                if below >= 48 {
                    break;
                }
                for i in (round * slice..(round + 1) * slice).map(|i| i % npages) {
                    // SAFETY: i < npages, inside the region; rewritten with the same version.
                    chaos_fill(unsafe { ptr.add(i * PAGE) }, 0x5c, i, 1);
                }
                std::thread::sleep(Duration::from_millis(200));
                below = evicted_below_sp(64);
            }
            // SAFETY: the child only reads the region, compares without allocating, and
            // leaves with _exit.
            let pid = unsafe { libc::fork() };
            if pid < 0 {
                return Err(format!("fork: {}", errno_str()));
            }
            if pid == 0 {
                let bad = (0..npages)
                    // SAFETY: i < npages, inside our copy of the region.
                    .filter(|&i| !chaos_matches(unsafe { ptr.add(i * PAGE) }, 0x5c, i, 1))
                    .count();
                // SAFETY: _exit ends the child at once.
                unsafe { libc::_exit(if bad == 0 { 0 } else { 1 }) };
            }
            if let Some(status) = reap(pid)? {
                return Err(format!(
                    "the forked child found its copy wrong or died (status {status:#x})"
                ));
            }
            let bad = (0..npages)
                // SAFETY: i < npages, inside the region.
                .filter(|&i| !chaos_matches(unsafe { ptr.add(i * PAGE) }, 0x5c, i, 1))
                .count();
            if bad != 0 {
                return Err(format!("parent: {bad} of {npages} pages wrong"));
            }
            println!(
                "forked child {pid} checked its copy; the parent checked its own; {below} of 64 stack pages below the fork evicted"
            );
            Ok(())
        })
        .map_err(|e| format!("spawning the forking thread: {e}"))?;
    t.join()
        .map_err(|_| "the forking thread panicked".to_string())??;
    drop(a);
    Ok(format!("fork-cold-stack pages={npages} mismatches=0"))
}

fn cmd_fork_remap(o: &Opts) -> Result<String, String> {
    let (len, npages) = o.mib()?;
    let idle_ms = o.num("idle-ms", 1500)?;
    let a = anon_before_guard_page(len)?;
    for i in 0..npages {
        // SAFETY: i < npages, inside our region.
        chaos_fill(unsafe { a.ptr.add(i * PAGE) }, 0x5a, i, 1);
    }
    println!("filled {} MiB ({npages} pages)", len / MIB);
    idle(idle_ms);
    print_rss();
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two descriptors into our array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(format!("pipe: {}", errno_str()));
    }
    // SAFETY: the child only reads its memory and our pipe, compares without allocating, and
    // leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", errno_str()));
    }
    if pid == 0 {
        let mut b = 0u8;
        // SAFETY: closing our copy of the write end, then waiting for the parent's to close.
        unsafe {
            libc::close(fds[1]);
            libc::read(fds[0], (&mut b as *mut u8).cast(), 1);
        }
        let bad = (0..npages)
            // SAFETY: i < npages, inside our copy of the region.
            .filter(|&i| !chaos_matches(unsafe { a.ptr.add(i * PAGE) }, 0x5a, i, 1))
            .count();
        // SAFETY: _exit ends the child at once.
        unsafe { libc::_exit(if bad == 0 { 0 } else { 1 }) };
    }
    // SAFETY: closing the parent's copy of the read end.
    unsafe { libc::close(fds[0]) };
    let old = a.ptr;
    let a = a.remap(len + PAGE, libc::MREMAP_MAYMOVE, std::ptr::null_mut())?;
    if a.ptr == old {
        return Err("mremap grew the region in place past its guard page".into());
    }
    println!("forked child {pid}; mremap {old:p} -> {:p}", a.ptr);
    let bad_parent = (0..npages)
        // SAFETY: i < npages, inside the moved region.
        .filter(|&i| !chaos_matches(unsafe { a.ptr.add(i * PAGE) }, 0x5a, i, 1))
        .count();
    // SAFETY: closing the write end lets the child check its copy.
    unsafe { libc::close(fds[1]) };
    let mut status = 0;
    // SAFETY: waiting for our own child; status is a valid int.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
        return Err(format!("waitpid: {}", errno_str()));
    }
    let child_ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    println!(
        "parent: {bad_parent} of {npages} moved pages wrong; child: {}",
        if child_ok {
            "its copy is right"
        } else {
            "its copy is WRONG"
        }
    );
    if bad_parent == 0 && child_ok {
        Ok(format!("fork-remap pages={npages} mismatches=0"))
    } else {
        Err(format!(
            "fork-remap: {bad_parent} parent pages wrong, child status {status:#x}"
        ))
    }
}

fn cmd_dontneed(o: &Opts) -> Result<String, String> {
    let (len, _) = o.mib()?;
    let idle_ms = o.num("idle-ms", 1500)?;
    // A rest after the discard, before anything is read again: the monitor's store is left
    // with every other record gone, so it compacts while nothing faults.
    let rest_ms = o.num("rest-ms", 0)?;
    let mut m = Mapping::anon(len)?;
    fill_timed(&mut m, 0, 1, "region");
    idle(idle_ms);
    print_rss();
    let nchunks = len / CHUNK;
    for c in (0..nchunks).step_by(2) {
        // SAFETY: the range is a chunk of our own mapping, and no Rust reference into it
        // is alive (m is not borrowed here); its content is intentionally discarded.
        let r = unsafe { libc::madvise(m.ptr.add(c * CHUNK).cast(), CHUNK, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(format!("madvise(MADV_DONTNEED) chunk {c}: {}", errno_str()));
        }
    }
    println!(
        "MADV_DONTNEED on {} of {nchunks} chunks of 64 KiB",
        nchunks.div_ceil(2)
    );
    if rest_ms > 0 {
        idle(rest_ms);
    }
    let mut t = Tally::default();
    for (c, ch) in m.words().chunks_exact(CHUNK / 8).enumerate() {
        let first = (c * PAGES_PER_CHUNK) as u64;
        if c % 2 == 0 {
            t.zeros("dontneed-chunk", ch, first);
        } else {
            t.range("kept-chunk", ch, first, 1);
        }
    }
    t.print("after MADV_DONTNEED (zeros / kept)");
    for (c, ch) in m.words_mut().chunks_exact_mut(CHUNK / 8).enumerate() {
        if c % 2 == 0 {
            fill_range(ch, (c * PAGES_PER_CHUNK) as u64, 2);
        }
    }
    idle(idle_ms);
    print_rss();
    let mut t2 = Tally::default();
    for (c, ch) in m.words().chunks_exact(CHUNK / 8).enumerate() {
        let ver = if c % 2 == 0 { 2 } else { 1 };
        t2.range("dontneed-refilled", ch, (c * PAGES_PER_CHUNK) as u64, ver);
    }
    t2.print("after refill and idle");
    t.add(t2);
    ok_if(t, "dontneed")
}

fn cmd_realloc(o: &Opts) -> Result<String, String> {
    let (len, npages) = o.mib()?;
    let idle_ms = o.num("idle-ms", 1500)?;
    // SAFETY: plain malloc; the result is checked for null and freed below.
    let p = unsafe { libc::malloc(len) }.cast::<u64>();
    if p.is_null() {
        return Err("malloc failed".into());
    }
    {
        // SAFETY: malloc returned len bytes aligned to at least 16; nothing else aliases them.
        let w = unsafe { std::slice::from_raw_parts_mut(p, len / 8) };
        let t0 = Instant::now();
        fill_range(w, 0, 1);
        println!(
            "filled malloc block of {} MiB at {p:p} in {:.3} s",
            len / MIB,
            t0.elapsed().as_secs_f64()
        );
    }
    idle(idle_ms);
    print_rss();
    // SAFETY: p came from malloc and is not used again after a successful realloc.
    let q = unsafe { libc::realloc(p.cast(), 2 * len) }.cast::<u64>();
    if q.is_null() {
        // SAFETY: realloc failed, so p is still ours to free.
        unsafe { libc::free(p.cast()) };
        return Err("realloc failed".into());
    }
    println!("realloc to {} MiB: {p:p} -> {q:p}", 2 * len / MIB);
    let mut t = Tally::default();
    {
        // SAFETY: realloc returned 2*len bytes, 16-aligned, owned by us alone.
        let w = unsafe { std::slice::from_raw_parts_mut(q, 2 * len / 8) };
        t.range("realloc-first-half", &w[..len / 8], 0, 1);
        t.print("first half after realloc");
        fill_range(&mut w[len / 8..], npages as u64, 2);
    }
    idle(idle_ms);
    print_rss();
    {
        // SAFETY: as above.
        let w = unsafe { std::slice::from_raw_parts(q, 2 * len / 8) };
        let mut t2 = Tally::default();
        t2.range("realloc-first-half", &w[..len / 8], 0, 1);
        t2.range("realloc-second-half", &w[len / 8..], npages as u64, 2);
        t2.print("whole block after idle");
        t.add(t2);
    }
    // SAFETY: q came from realloc and no slice into it is alive.
    unsafe { libc::free(q.cast()) };
    ok_if(t, "realloc")
}

fn cmd_fork_cow(o: &Opts) -> Result<String, String> {
    let (len, npages) = o.mib()?;
    let idle_ms = o.num("idle-ms", 1500)?;
    let mut m = Mapping::anon(len)?;
    fill_timed(&mut m, 0, 1, "region");
    idle(idle_ms);
    print_rss();
    // The inodes of the monitor's windows mapped here (the child must not have them).
    let parent_windows: Vec<String> = std::fs::read_to_string("/proc/self/maps")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("uswap-window"))
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .collect();
    println!("parent: {} window mappings", parent_windows.len());
    flush();
    // SAFETY: this program has no other threads of its own at this point; the child only
    // verifies memory, prints, flushes and leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", errno_str()));
    }
    if pid == 0 {
        let mut t = Tally::default();
        t.range("fork-child", m.words(), 0, 1);
        println!("child: verified {} pages, {} mismatches", t.pages, t.bad);
        // The monitor's window and the agent's staging are MADV_DONTFORK: never in a child
        // (a managed child maps a window of its own, another memfd).
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        let leaked = maps
            .lines()
            .filter(|l| {
                !parent_windows.is_empty()
                    && parent_windows.iter().any(|w| {
                        l.contains("uswap-window")
                            && l.split_whitespace().nth(4) == Some(w.as_str())
                    })
            })
            .count();
        println!("child: {leaked} window mappings inherited");
        if leaked > 0 {
            t.bad += 1;
        }
        flush();
        // SAFETY: _exit ends the child without running the parent's atexit handlers.
        unsafe { libc::_exit(if t.bad == 0 { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child; status is a valid int.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    if r != pid {
        return Err(format!("waitpid: {}", errno_str()));
    }
    let child_ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    println!(
        "child exited: status {status:#x} ({})",
        if child_ok { "ok" } else { "FAILED" }
    );
    let mut t = Tally::default();
    t.range("fork-parent", m.words(), 0, 1);
    t.print("parent after child exit");
    let mut vers = vec![1u32; npages];
    {
        let w = m.words_mut();
        for i in (0..npages).step_by(4) {
            vers[i] = 2;
            fill_page(&mut w[i * WORDS..(i + 1) * WORDS], i as u64, 2);
        }
    }
    let mut t2 = Tally::default();
    for (i, p) in m.words().chunks_exact(WORDS).enumerate() {
        t2.check("fork-parent-rewritten", p, i as u64, vers[i], &[]);
    }
    t2.print("parent after rewriting every 4th page");
    idle(idle_ms);
    print_rss();
    let mut t3 = Tally::default();
    for (i, p) in m.words().chunks_exact(WORDS).enumerate() {
        t3.check("fork-parent-idle2", p, i as u64, vers[i], &[]);
    }
    t3.print("parent after second idle");
    t.add(t2);
    t.add(t3);
    if !child_ok {
        return Err(format!("child failed (status {status:#x})"));
    }
    ok_if(t, "fork-cow")
}

/// Waits (at most `max_ms`) until RssAnon is below `below` bytes: the monitor has evicted
/// most of the data. Returns the last RssAnon seen.
fn wait_rss_below(below: u64, max_ms: u64) -> u64 {
    let t0 = Instant::now();
    loop {
        let r = rss_anon();
        if r < below || t0.elapsed() >= Duration::from_millis(max_ms) {
            println!(
                "RSSANON {r} (waited {} ms for < {below})",
                t0.elapsed().as_millis()
            );
            return r;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Checks every page of `words` against `vers` (page `i` must hold version `vers[i]`).
fn check_versions(t: &mut Tally, label: &str, words: &[u64], vers: &[u32]) {
    for (i, p) in words.chunks_exact(WORDS).enumerate() {
        t.check(label, p, i as u64, vers[i], &[]);
    }
}

/// The userfaultfd descriptors this process has open (`/proc/self/fd`).
fn userfaultfds_open() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|t| t.to_string_lossy() == "anon_inode:[userfaultfd]")
                .count()
        })
        .unwrap_or(0)
}

/// Waits for child `pid`; returns whether it exited with status 0.
fn wait_child(pid: libc::pid_t, what: &str) -> Result<bool, String> {
    let failed = reap(pid)?;
    println!(
        "{what} exited: status {:#x} ({})",
        failed.unwrap_or(0),
        if failed.is_none() { "ok" } else { "FAILED" }
    );
    Ok(failed.is_none())
}

/// Redis BGSAVE under eviction: the parent fills the region and waits until the monitor has
/// evicted most of it, then forks. The child checksums every page (it must see the data as
/// it was at the fork) while the parent rewrites half of them; then the child rewrites a third
/// of its own pages, idles (its pages are evicted in turn) and checks again; the parent checks
/// its own view twice. Each side must see exactly what it wrote, or what was there at the fork.
/// `fork-then-hot`: what a program that forks a short-lived child (a snapshot, a helper)
/// leaves behind: after the fork every page it had resident is shared copy-on-write with the
/// child, and stays marked shared after the child exits, until the program writes it. Fills
/// the region, lets the monitor evict down to its budget, forks a child that exits at once,
/// then reads a hot set (the first `--hot-mib` MiB, long evicted) over and over for
/// `--secs` seconds without writing anything. Prints how many hot-set reads took over 5 µs in
/// the last second (a fault, or the machine's noise when the hot set stays resident) and RSS,
/// and checks every page.
fn cmd_fork_then_hot(o: &Opts) -> Result<String, String> {
    let (len, npages) = o.mib()?;
    let idle_ms = o.num("idle-ms", 1500)?;
    let hot_pages = (o.num("hot-mib", 4)? as usize * MIB / PAGE).min(npages);
    let secs = o.num("secs", 4)?;
    // With `--child-ms`, the child lives that long (through the hot phase) instead of exiting
    // at once; it is waited for at the end.
    let child_ms = o.num("child-ms", 0)?;
    let mut m = Mapping::anon(len)?;
    fill_timed(&mut m, 0, 1, "region");
    wait_rss_below(len as u64 / 2, idle_ms.max(1) * 20);
    idle(idle_ms);
    let rss = rss_anon();
    flush();
    // SAFETY: the child only leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", errno_str()));
    }
    if pid == 0 {
        // (This program has no other thread: a plain sleep is safe in the child.)
        std::thread::sleep(Duration::from_millis(child_ms));
        // SAFETY: leaving the child, without the parent's atexit handlers.
        unsafe { libc::_exit(0) };
    }
    if child_ms == 0 {
        if !wait_child(pid, "the short-lived child")? {
            return Err("the short-lived child failed".into());
        }
        println!("forked with RSSANON {rss}; the child has exited");
    } else {
        println!("forked with RSSANON {rss}; the child lives {child_ms} ms");
    }
    let words = m.words();
    let t0 = Instant::now();
    let mut passes = 0u64;
    let mut last_slow = 0u64;
    let mut t = Tally::default();
    while t0.elapsed() < Duration::from_secs(secs) {
        let last_second = t0.elapsed() + Duration::from_secs(1) >= Duration::from_secs(secs);
        let mut slow = 0u64;
        for (i, p) in words.chunks_exact(WORDS).take(hot_pages).enumerate() {
            let t1 = Instant::now();
            // Reads only: the hot set is never written after the fork.
            t.check("hot", p, i as u64, 1, &[]);
            if t1.elapsed() > Duration::from_micros(5) {
                slow += 1;
            }
        }
        passes += 1;
        if last_second {
            last_slow += slow;
        }
    }
    let rss_end = print_rss();
    println!(
        "hot set {hot_pages} pages, {passes} passes; reads over 5 us in the last second {last_slow}; RSSANON {rss_end}"
    );
    if child_ms > 0 && !wait_child(pid, "the child")? {
        return Err("the child failed".into());
    }
    let mut t2 = Tally::default();
    t2.range("fork-then-hot-all", m.words(), 0, 1);
    t2.print("every page at the end");
    t.add(t2);
    ok_if(t, "fork-then-hot")
}

fn cmd_bgsave(o: &Opts) -> Result<String, String> {
    let (len, npages) = o.mib()?;
    let idle_ms = o.num("idle-ms", 1500)?;
    let mut m = Mapping::anon(len)?;
    fill_timed(&mut m, 0, 1, "region");
    let rss = wait_rss_below(len as u64 * 2 / 5, idle_ms.max(1) * 20);
    let evicted_pct = 100u64.saturating_sub(rss * 100 / len as u64);
    println!("BGSAVE fork with about {evicted_pct}% of the region evicted");
    flush();
    let fork_t0 = Instant::now();
    // SAFETY: the child only reads and writes its own memory, prints and leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", errno_str()));
    }
    if pid > 0 {
        println!(
            "FORK parent: fork() took {:.1} ms; RSSANON right after it {}",
            fork_t0.elapsed().as_secs_f64() * 1e3,
            rss_anon()
        );
    }
    if pid == 0 {
        let t0 = Instant::now();
        let mut sum = 0u64;
        let mut t = Tally::default();
        for (i, p) in m.words().chunks_exact(WORDS).enumerate() {
            sum = sum.wrapping_mul(31).wrapping_add(p[WORDS - 1]);
            t.check("bgsave-child", p, i as u64, 1, &[]);
        }
        println!(
            "child: checksummed {} pages in {:.3} s (sum {sum:#x}), {} mismatches; RSSANON {}",
            t.pages,
            t0.elapsed().as_secs_f64(),
            t.bad,
            rss_anon()
        );
        let mut vers = vec![1u32; npages];
        {
            let w = m.words_mut();
            for i in (0..npages).step_by(3) {
                vers[i] = 3;
                fill_page(&mut w[i * WORDS..(i + 1) * WORDS], i as u64, 3);
            }
        }
        idle(idle_ms);
        let mut t2 = Tally::default();
        check_versions(&mut t2, "bgsave-child-own-writes", m.words(), &vers);
        t2.print("child after its own writes and an idle");
        t.add(t2);
        flush();
        // SAFETY: _exit ends the child without running the parent's atexit handlers.
        unsafe { libc::_exit(if t.bad == 0 { 0 } else { 1 }) };
    }
    // The parent rewrites every other page while the child reads.
    let mut vers = vec![1u32; npages];
    {
        let w = m.words_mut();
        for i in (0..npages).step_by(2) {
            vers[i] = 2;
            fill_page(&mut w[i * WORDS..(i + 1) * WORDS], i as u64, 2);
        }
    }
    println!(
        "parent: rewrote {} pages during the child's checksum",
        npages.div_ceil(2)
    );
    let mut t = Tally::default();
    check_versions(&mut t, "bgsave-parent", m.words(), &vers);
    t.print("parent after its rewrite");
    let child_ok = wait_child(pid, "bgsave child")?;
    idle(idle_ms);
    print_rss();
    let mut t2 = Tally::default();
    check_versions(&mut t2, "bgsave-parent-idle", m.words(), &vers);
    t2.print("parent after the child exited and an idle");
    t.add(t2);
    if !child_ok {
        return Err("the BGSAVE child found wrong data".into());
    }
    ok_if(t, "bgsave")
}

/// posix_spawn, vfork + exec and system() from a program whose memory is mostly evicted: each
/// child (which runs no fork handler) must start and exit 0, and the parent's memory must be
/// whole afterwards.
fn cmd_spawn(o: &Opts) -> Result<String, String> {
    let (len, npages) = o.mib()?;
    let idle_ms = o.num("idle-ms", 1500)?;
    let mut m = Mapping::anon(len)?;
    fill_timed(&mut m, 0, 1, "region");
    wait_rss_below(len as u64 / 2, idle_ms.max(1) * 20);
    let truth = c"/bin/true";
    let argv = [truth.as_ptr() as *mut libc::c_char, std::ptr::null_mut()];
    extern "C" {
        static environ: *const *mut libc::c_char;
    }
    // posix_spawn (glibc: clone(CLONE_VM | CLONE_VFORK), no atfork handlers).
    let mut pid: libc::pid_t = 0;
    // SAFETY: a NUL-terminated path and argv; default attributes; the process environment.
    let rc = unsafe {
        libc::posix_spawn(
            &mut pid,
            truth.as_ptr(),
            std::ptr::null(),
            std::ptr::null(),
            argv.as_ptr(),
            environ,
        )
    };
    if rc != 0 {
        return Err(format!("posix_spawn: errno {rc}"));
    }
    if !wait_child(pid, "posix_spawn child")? {
        return Err("the posix_spawn child failed".into());
    }
    // vfork semantics (CLONE_VM | CLONE_VFORK): the child shares our memory until it execs.
    extern "C" fn exec_true(_: *mut libc::c_void) -> i32 {
        let truth = c"/bin/true";
        let argv = [truth.as_ptr(), std::ptr::null()];
        extern "C" {
            static environ: *const *const libc::c_char;
        }
        // SAFETY: execve replaces the image; _exit leaves if it fails.
        unsafe {
            libc::execve(truth.as_ptr(), argv.as_ptr(), environ);
            libc::_exit(127)
        }
    }
    let mut stack = vec![0u8; 64 * 1024];
    // SAFETY: the child runs `exec_true` on its own stack (the top of `stack`, alive until
    // the parent resumes after the child's exec) and only calls execve or _exit.
    let pid = unsafe {
        libc::clone(
            exec_true,
            stack.as_mut_ptr().add(stack.len()).cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::null_mut(),
        )
    };
    drop(stack);
    if pid < 0 {
        return Err(format!("clone(CLONE_VM | CLONE_VFORK): {}", errno_str()));
    }
    if !wait_child(pid, "vfork child")? {
        return Err("the vfork child failed".into());
    }
    // SAFETY: a NUL-terminated command.
    let st = unsafe { libc::system(c"exit 0".as_ptr()) };
    println!("system() returned {st:#x}");
    if st != 0 {
        return Err(format!("system() returned {st:#x}"));
    }
    let mut t = Tally::default();
    check_versions(&mut t, "after-spawns", m.words(), &vec![1u32; npages]);
    t.print("parent after posix_spawn, vfork and system");
    ok_if(t, "spawn")
}

/// A chain of forks `--depth` deep: each generation waits for eviction, forks, and its child
/// checks every page against what its parent had at the fork, rewrites its own share with its
/// own version, and forks the next generation. Each parent checks its own view after its
/// child exits.
fn cmd_fork_chain(o: &Opts) -> Result<String, String> {
    let (len, npages) = o.mib()?;
    let idle_ms = o.num("idle-ms", 1500)?;
    let depth = o.num("depth", 3)? as u32;
    let mut m = Mapping::anon(len)?;
    fill_timed(&mut m, 0, 1, "region");
    let mut vers = vec![1u32; npages];
    let mut total = Tally::default();
    let mut level = 0u32;
    loop {
        wait_rss_below(len as u64 / 2, idle_ms.max(1) * 20);
        // Whether this process is managed: its shim keeps the userfaultfd it forwarded.
        println!(
            "generation {level}: {} userfaultfd descriptors open",
            userfaultfds_open()
        );
        if level == depth {
            break;
        }
        flush();
        // SAFETY: the child only touches its own memory, prints, forks and leaves with _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(format!("fork: {}", errno_str()));
        }
        if pid == 0 {
            level += 1;
            let mut t = Tally::default();
            check_versions(
                &mut t,
                &format!("chain-{level}-inherited"),
                m.words(),
                &vers,
            );
            t.print(&format!("generation {level}: inherited pages"));
            total.add(t);
            if total.bad > 0 {
                flush();
                // SAFETY: leaving the child at once.
                unsafe { libc::_exit(1) };
            }
            let w = m.words_mut();
            let step = (level + 1) as usize;
            for i in (0..npages).step_by(step) {
                vers[i] = level + 1;
                fill_page(&mut w[i * WORDS..(i + 1) * WORDS], i as u64, level + 1);
            }
            continue;
        }
        // The parent rewrites a different share meanwhile, then checks after its child.
        {
            let w = m.words_mut();
            for i in (1..npages).step_by(5) {
                vers[i] = 100 + level;
                fill_page(&mut w[i * WORDS..(i + 1) * WORDS], i as u64, 100 + level);
            }
        }
        let child_ok = wait_child(pid, &format!("generation {}", level + 1))?;
        let mut t = Tally::default();
        check_versions(
            &mut t,
            &format!("chain-{level}-after-child"),
            m.words(),
            &vers,
        );
        t.print(&format!("generation {level}: own pages after its child"));
        total.add(t);
        if !child_ok {
            total.bad += 1;
        }
        break;
    }
    if level > 0 {
        println!("generation {level}: done, {} mismatches", total.bad);
        flush();
        // SAFETY: a child of the chain leaves with its verdict, without the atexit handlers.
        unsafe { libc::_exit(if total.bad == 0 { 0 } else { 1 }) };
    }
    ok_if(total, &format!("fork-chain depth={depth}"))
}

/// `count` page iovecs of `m` starting at page `first`.
fn iov_for(m: &Mapping, first: usize, count: usize) -> Vec<libc::iovec> {
    (first..first + count)
        .map(|i| libc::iovec {
            // SAFETY: callers keep first + count within the mapping.
            iov_base: unsafe { m.ptr.add(i * PAGE) }.cast(),
            iov_len: PAGE,
        })
        .collect()
}

/// Registers `iov` as io_uring fixed buffers, which pins the pages long-term. Returns the ring
/// descriptor (the pins last while it is open), or None.
fn pin_with_io_uring(iov: &[libc::iovec]) -> Option<i32> {
    // struct io_uring_params is 120 bytes; all-zero asks for defaults.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup writes at most sizeof(struct io_uring_params) into `params`.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) } as i32;
    if fd < 0 {
        return None;
    }
    // SAFETY: IORING_REGISTER_BUFFERS (0) reads `iov.len()` iovecs describing our own memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            fd,
            0u32,
            iov.as_ptr(),
            iov.len() as u32,
        )
    };
    if rc < 0 {
        close(fd);
        return None;
    }
    Some(fd)
}

fn cmd_pin(o: &Opts) -> Result<String, String> {
    let (len, npages) = o.mib()?;
    let idle_ms = o.num("idle-ms", 1500)?;
    let want = (o.num("pin-pages", 16)? as usize).min(npages / 2);
    let mut m = Mapping::anon(len)?;
    fill_timed(&mut m, 0, 1, "region");
    let (pr, pw) = pipe()?;
    // SAFETY: fcntl on our own pipe; failure is harmless (default capacity 16 pages).
    let cap = unsafe { libc::fcntl(pw, libc::F_SETPIPE_SZ, (want * PAGE).max(CHUNK) as i32) };
    let iov: Vec<libc::iovec> = (0..want)
        .map(|i| libc::iovec {
            // SAFETY: i < npages, so the page lies inside the mapping.
            iov_base: unsafe { m.ptr.add(i * PAGE) }.cast(),
            iov_len: PAGE,
        })
        .collect();
    let mut pinned = 0usize;
    let mut vi = 0;
    while vi < iov.len() {
        // SAFETY: the iovecs describe pages of our mapping, which stays mapped while the
        // pipe holds references to them (the pipe is closed before m is dropped).
        let n = unsafe {
            libc::vmsplice(
                pw,
                iov[vi..].as_ptr(),
                iov.len() - vi,
                libc::SPLICE_F_NONBLOCK,
            )
        };
        if n <= 0 {
            println!("vmsplice stopped after {pinned} bytes: {}", errno_str());
            break;
        }
        pinned += n as usize;
        vi = pinned / PAGE;
        if pinned & (PAGE - 1) != 0 {
            break;
        }
    }
    let pinned_pages = pinned / PAGE;
    println!("pinned {pinned_pages} pages with vmsplice into an unread pipe (capacity {cap})");
    // Long-term pins (FOLL_PIN | FOLL_LONGTERM), as a driver doing DMA would hold: io_uring
    // fixed buffers over the next `want` pages. Raw syscalls: no io_uring crate here.
    let ring = pin_with_io_uring(&iov_for(&m, want, want));
    match ring {
        Some(_) => println!("pinned {want} more pages with io_uring fixed buffers"),
        None => println!("io_uring fixed buffers unavailable: {}", errno_str()),
    }
    if pinned_pages == 0 {
        close(pr);
        close(pw);
        return Err("vmsplice pinned nothing".into());
    }
    idle(idle_ms);
    print_rss();
    let mut t = Tally::default();
    t.range("pin", m.words(), 0, 1);
    t.print("region with pinned pages");
    let mut buf = vec![0u64; pinned_pages * WORDS];
    // SAFETY: buf is a live Vec of pinned_pages * PAGE bytes.
    let r = unsafe { read_full(pr, buf.as_mut_ptr().cast(), pinned_pages * PAGE) };
    close(pr);
    close(pw);
    if let Some(fd) = ring {
        close(fd);
    }
    r?;
    let mut tp = Tally::default();
    tp.range("pipe-content", &buf, 0, 1);
    tp.print("pinned pages read back out of the pipe");
    t.add(tp);
    ok_if(t, &format!("pin pinned_pages={pinned_pages}"))
}

fn cmd_fill_rate(o: &Opts) -> Result<String, String> {
    let (len, npages) = o.mib()?;
    let repeat = o.num("repeat", 3)?.max(1);
    let mib = (len / MIB) as f64;
    let (mut best_touch, mut best_fill) = (0f64, 0f64);
    for r in 1..=repeat {
        let a = Mapping::anon(len)?;
        let t0 = Instant::now();
        for i in 0..npages {
            // SAFETY: i*PAGE < len, inside the fresh mapping; no references to it exist.
            unsafe { std::ptr::write_volatile(a.ptr.add(i * PAGE).cast::<u64>(), i as u64) };
        }
        let touch_s = t0.elapsed().as_secs_f64();
        drop(a);
        let b = Mapping::anon(len)?;
        let t0 = Instant::now();
        // SAFETY: b is a fresh mapping of len bytes with no references into it.
        unsafe { std::ptr::write_bytes(b.ptr, 0x5A, len) };
        let fill_s = t0.elapsed().as_secs_f64();
        drop(b);
        let (touch, fill) = (mib / touch_s, mib / fill_s);
        println!(
            "repeat {r}: first touch {touch:.1} MiB/s ({:.3} us/page), full fill {fill:.1} MiB/s",
            touch_s * 1e6 / npages as f64
        );
        best_touch = best_touch.max(touch);
        best_fill = best_fill.max(fill);
    }
    println!("TOUCH_MIBS {best_touch:.1}");
    println!("FILL_MIBS {best_fill:.1}");
    Ok(format!(
        "fill-rate fill_mibs={best_fill:.1} touch_mibs={best_touch:.1}"
    ))
}

fn cmd_fault_latency(o: &Opts) -> Result<String, String> {
    let (len, npages) = o.mib()?;
    let idle_ms = o.num("idle-ms", 1500)?;
    let random = match o.get("pattern").unwrap_or("seq") {
        "seq" => false,
        "random" => true,
        p => return Err(format!("--pattern must be seq or random, not {p:?}")),
    };
    let default_k = if random { 20_000 } else { npages as u64 };
    let k = (o.num("touches", default_k)? as usize).min(npages);
    let mut m = Mapping::anon(len)?;
    fill_timed(&mut m, 0, 1, "region");
    let order: Vec<usize> = if random {
        let mut v: Vec<usize> = (0..npages).collect();
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        for i in (1..v.len()).rev() {
            s = mix(s);
            v.swap(i, (s % (i as u64 + 1)) as usize);
        }
        if !o.flag("only-evicted") {
            v.truncate(k);
        }
        v
    } else if o.flag("only-evicted") {
        (0..npages).collect()
    } else {
        (0..k).collect()
    };
    idle(idle_ms);
    println!("RSS idle anon={}", rss_anon());
    // --only-evicted: touch only pages that are not resident now (mincore), so every touch is
    // a fault served by the monitor; with a small --touches the program stays under its
    // budget and no eviction runs while it is measured.
    let order: Vec<usize> = if o.flag("only-evicted") {
        let mut vec = vec![0u8; npages];
        // SAFETY: mincore over our own mapping writes one byte per page into `vec`.
        if unsafe { libc::mincore(m.ptr.cast(), len, vec.as_mut_ptr()) } != 0 {
            return Err(format!("mincore: {}", errno_str()));
        }
        let evicted: Vec<usize> = order.iter().copied().filter(|&i| vec[i] & 1 == 0).collect();
        println!(
            "touching {} of {} pages that are not resident",
            evicted.len().min(k),
            evicted.len()
        );
        evicted
    } else {
        order
    };
    let mut lat = Vec::with_capacity(k);
    let mut bad = 0u64;
    let base = m.ptr;
    let t_all = now_ns();
    for &i in order.iter().take(k) {
        let t0 = now_ns();
        // SAFETY: i < npages so the page lies in the mapping; volatile reads of plain data
        // that no one writes concurrently.
        let (b, w0, w1) = unsafe {
            let p = base.add(i * PAGE);
            (
                std::ptr::read_volatile(p),
                std::ptr::read_volatile(p.cast::<u64>()),
                std::ptr::read_volatile(p.cast::<u64>().add(1)),
            )
        };
        let good = b == (i as u64).to_le_bytes()[0] && w0 == i as u64 && w1 == header1(1);
        let t1 = now_ns();
        lat.push(t1 - t0);
        if !good {
            bad += 1;
            diag(format!(
                "MISMATCH fault-latency page {i}: expected header idx={i} ver=1, found {}",
                describe_header(&[w0, w1])
            ));
        }
    }
    let total_s = (now_ns() - t_all) as f64 / 1e9;
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((p * lat.len() as f64).ceil() as usize)
            .saturating_sub(1)
            .min(lat.len() - 1);
        lat[i] as f64 / 1000.0
    };
    println!(
        "LAT_US p50={:.2} p99={:.2} p999={:.2} max={:.2} n={}",
        pct(0.50),
        pct(0.99),
        pct(0.999),
        lat.last().map_or(0.0, |&x| x as f64 / 1000.0),
        lat.len()
    );
    println!("TOTAL_S {total_s:.4}");
    print_rss();
    if bad > 0 {
        return Err(format!(
            "fault-latency: {bad} of {} touched pages had a wrong header",
            lat.len()
        ));
    }
    Ok(format!(
        "fault-latency pattern={} n={}",
        if random { "random" } else { "seq" },
        lat.len()
    ))
}

// ---------------------------------------------------------------------------------------
// Benchmark workloads (`bench/run`): fill a region with heap-like data, idle, then one phase
// of touches (sequential re-read, uniform random touches, or a zipfian key-value pattern),
// timed per touch. The same program runs unchanged with no limit, in a memory cgroup over
// zram, and under `uswap run`.

/// Words of the text fragments in heap-like pages (as in `uswap-demo`).
const MIXED_WORDS: [&[u8]; 32] = [
    b"alpha", b"buffer", b"cache", b"delta", b"error", b"fault", b"guest", b"heap", b"index",
    b"json", b"kernel", b"latency", b"memory", b"node", b"offset", b"page", b"queue", b"request",
    b"session", b"token", b"user", b"value", b"worker", b"config", b"status", b"timeout",
    b"connect", b"thread", b"name", b"id", b"http", b"retry",
];

/// Writes page `idx` version `ver` as heap-like records (text fragments, small integers,
/// pointer-like values, zero runs and a little random noise, as `uswap-demo` makes them; lz4
/// compresses it about 2×), framed like the text pages: word 0 the index, word 1 the version
/// header, word 511 the checksum of the rest.
fn fill_mixed_page(w: &mut [u64], idx: u64, ver: u32) {
    let mut b = [0u8; PAGE];
    let mut rng = page_seed(idx, ver) | 1;
    let mut next = || {
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    const END: usize = PAGE - 8;
    /// Appends `src` at `pos`, cut at the checksum word.
    fn put(b: &mut [u8; PAGE], pos: &mut usize, src: &[u8]) {
        let n = src.len().min(END - *pos);
        b[*pos..*pos + n].copy_from_slice(&src[..n]);
        *pos += n;
    }
    let end = END;
    let mut pos = 16;
    while pos < end {
        let r = next();
        let start = pos;
        pos = (pos + 8).min(end); // record header: tag, length
        let tag = match r % 100 {
            0..=39 => {
                for k in 0..3 + (r >> 8) % 6 {
                    if k > 0 {
                        put(&mut b, &mut pos, b" ");
                    }
                    put(
                        &mut b,
                        &mut pos,
                        MIXED_WORDS[((r >> (16 + 5 * k)) % 32) as usize],
                    );
                }
                put(&mut b, &mut pos, &[0]);
                1u8
            }
            40..=59 => {
                for k in 0..4 + (r >> 8) % 5 {
                    let v = ((r >> (12 + 4 * k)) % 1000) as u32;
                    put(&mut b, &mut pos, &v.to_le_bytes());
                }
                2
            }
            60..=74 => {
                for _ in 0..2 + (r >> 8) % 3 {
                    let p = 0x0000_7f3a_c000_0000u64 | ((next() % 0x10_0000) << 4);
                    put(&mut b, &mut pos, &p.to_le_bytes());
                }
                3
            }
            75..=95 => {
                pos = (pos + 16 + ((r >> 8) % 113) as usize).min(end);
                4
            }
            _ => {
                for _ in 0..4 + (r >> 8) % 6 {
                    let v = next();
                    put(&mut b, &mut pos, &v.to_le_bytes());
                }
                5
            }
        };
        if start + 8 <= end {
            b[start] = tag;
            let len = (pos - start - 8) as u32;
            b[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
        }
    }
    let w = &mut w[..WORDS];
    for (j, slot) in w.iter_mut().enumerate().take(WORDS - 1).skip(2) {
        let c = &b[j * 8..j * 8 + 8];
        *slot = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
    }
    w[0] = idx;
    w[1] = header1(ver);
    w[WORDS - 1] = checksum(&w[..WORDS - 1]);
}

/// Full check of a heap-like page: header and the checksum over every word.
fn verify_mixed_page(w: &[u64], idx: u64, ver: u32) -> bool {
    w[0] == idx && w[1] == header1(ver) && w[WORDS - 1] == checksum(&w[..WORDS - 1])
}

/// YCSB's zipfian generator (Gray et al.) over `0..n`, ranks scrambled over the key space.
struct Zipf {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
    state: u64,
}

impl Zipf {
    fn new(n: u64, theta: f64, seed: u64) -> Zipf {
        let zeta = |k: u64| (1..=k).map(|i| 1.0 / (i as f64).powf(theta)).sum::<f64>();
        let zetan = zeta(n);
        let zeta2 = zeta(2);
        Zipf {
            n,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zetan,
            eta: (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan),
            state: seed,
        }
    }

    fn rank(&mut self) -> u64 {
        self.state = mix(self.state);
        let u = (self.state >> 11) as f64 / (1u64 << 53) as f64;
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1;
        }
        ((self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64).min(self.n - 1)
    }

    /// A key: the rank scrambled, so hot keys are spread over the region.
    fn key(&mut self) -> u64 {
        mix(self.rank() ^ 0x5EED) % self.n
    }
}

/// (major faults, minor faults, user + system CPU seconds) of this process so far.
fn rusage_self() -> (u64, u64, f64) {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: ru is a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (
        ru.ru_majflt as u64,
        ru.ru_minflt as u64,
        tv(ru.ru_utime) + tv(ru.ru_stime),
    )
}

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
}

/// `bench --pattern stride`: pages between two touches of a pass.
const STRIDE_PAGES: usize = 4;

fn cmd_bench(o: &Opts) -> Result<String, String> {
    let (len, npages) = o.mib()?;
    let idle_ms = o.num("idle-ms", 2000)?;
    let threshold_ns = o.num("threshold-ns", 2000)?;
    let pattern = o.get("pattern").unwrap_or("seq").to_string();
    let default_touches = match pattern.as_str() {
        "seq" | "rev" | "stride" => npages as u64,
        "random" => 200_000,
        "zipf" => 500_000,
        p => {
            return Err(format!(
                "--pattern must be seq, rev, stride, random or zipf, not {p:?}"
            ))
        }
    };
    let touches = o.num("touches", default_touches)? as usize;
    let write_pct = o.num("write-pct", 10)?.min(100);
    let theta = match o.get("theta") {
        None => 0.99,
        Some(t) => t
            .parse::<f64>()
            .ok()
            .filter(|t| *t > 0.0 && *t < 1.0)
            .ok_or(format!("--theta must be in (0, 1), not {t:?}"))?,
    };
    let mut m = Mapping::anon(len)?;
    let (mj0, mn0, cpu0) = rusage_self();
    let t0 = Instant::now();
    for (i, p) in m.words_mut().chunks_exact_mut(WORDS).enumerate() {
        fill_mixed_page(p, i as u64, 1);
    }
    let fill_s = t0.elapsed().as_secs_f64();
    let (mj1, mn1, cpu1) = rusage_self();
    println!("FILL_S {fill_s:.4}");
    println!(
        "FILL_FAULTS major={} minor={} cpu_s={:.3}",
        mj1 - mj0,
        mn1 - mn0,
        cpu1 - cpu0
    );
    idle(idle_ms);
    println!("RSS idle anon={}", rss_anon());
    let mut vers = vec![1u32; if pattern == "zipf" { npages } else { 0 }];
    let mut lat: Vec<u64> = Vec::with_capacity(touches.min(1 << 20));
    let mut t = Tally::default();
    let base = m.ptr;
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut zipf = (pattern == "zipf").then(|| Zipf::new(npages as u64, theta, 0x9E37));
    let mut writes = 0u64;
    let (mj2, mn2, cpu2) = rusage_self();
    let t_phase = now_ns();
    for k in 0..touches {
        let (i, write) = match pattern.as_str() {
            "seq" => (k % npages, false),
            "rev" => (npages - 1 - k % npages, false),
            // Every 4th page, in 4 passes (offsets 0..3), so all pages are read.
            "stride" => {
                let per_pass = npages.div_ceil(STRIDE_PAGES);
                let (pass, j) = ((k / per_pass) % STRIDE_PAGES, k % per_pass);
                ((j * STRIDE_PAGES + pass).min(npages - 1), false)
            }
            "random" => {
                rng = mix(rng);
                ((rng % npages as u64) as usize, false)
            }
            _ => {
                let key = zipf.as_mut().map_or(0, Zipf::key) as usize;
                rng = mix(rng);
                (key, rng % 100 < write_pct)
            }
        };
        let t1 = now_ns();
        // SAFETY: i < npages, so the word lies in the mapping; a volatile read of plain data
        // nothing else writes. This first access is what faults (and what is timed).
        let w0 = unsafe { std::ptr::read_volatile(base.add(i * PAGE).cast::<u64>()) };
        let dt = now_ns() - t1;
        if dt >= threshold_ns {
            lat.push(dt);
        }
        let ver = vers.get(i).copied().unwrap_or(1);
        let words = &mut m.words_mut()[i * WORDS..(i + 1) * WORDS];
        t.pages += 1;
        if w0 != i as u64 || !verify_mixed_page(words, i as u64, ver) {
            t.bad += 1;
            diag(format!(
                "MISMATCH bench page {i}: expected header idx={i} ver={ver}, found {}",
                describe_header(words)
            ));
        }
        if write {
            writes += 1;
            vers[i] = ver + 1;
            fill_mixed_page(words, i as u64, ver + 1);
        }
    }
    let phase_s = (now_ns() - t_phase) as f64 / 1e9;
    let (mj3, mn3, cpu3) = rusage_self();
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((p * lat.len() as f64).ceil() as usize)
            .saturating_sub(1)
            .min(lat.len() - 1);
        lat[i] as f64 / 1000.0
    };
    println!("PHASE_S {phase_s:.4}");
    println!(
        "PHASE_FAULTS major={} minor={} cpu_s={:.3} touches={touches} writes={writes}",
        mj3 - mj2,
        mn3 - mn2,
        cpu3 - cpu2
    );
    println!(
        "LAT_US p50={:.2} p99={:.2} p999={:.2} max={:.2} n={} threshold_ns={threshold_ns}",
        pct(0.50),
        pct(0.99),
        pct(0.999),
        lat.last().map_or(0.0, |&x| x as f64 / 1000.0),
        lat.len()
    );
    println!(
        "RSS_END anon_kib={} shmem_kib={} hwm_kib={}",
        status_kib("RssAnon:"),
        status_kib("RssShmem:"),
        status_kib("VmHWM:")
    );
    t.print(&format!("bench {pattern}"));
    // Keep the memory (and what a monitor or zram holds for it) while bench/run samples the
    // pool's size: it reads the figures when it sees this line.
    let linger_ms = o.num("linger-ms", 0)?;
    if linger_ms > 0 {
        println!("LINGER {linger_ms}");
        flush();
        std::thread::sleep(Duration::from_millis(linger_ms));
    }
    ok_if(t, &format!("bench pattern={pattern} touches={touches}"))
}

fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

fn cmd_output_echo(args: &[String]) -> Result<String, String> {
    println!("output-echo: deterministic output of uswap-workload");
    let rest = &args[2..];
    let mut h = 0xCBF2_9CE4_8422_2325u64;
    for a in rest {
        h = fnv(h, a.as_bytes());
        h = fnv(h, &[0]);
    }
    println!(
        "args {} (after the subcommand) checksum {h:#018x}",
        rest.len()
    );
    let mut buf = vec![0u64; MIB / 8];
    fill_range(&mut buf, 0, 1);
    let d = buf
        .chunks_exact(WORDS)
        .fold(0u64, |acc, p| mix(acc ^ checksum(p)));
    println!("data 1 MiB ({} pages) checksum {d:#018x}", MIB / PAGE);
    for i in 0..3u64 {
        println!("line {i}: {}", mix(i));
    }
    Ok(format!("output-echo data={d:#018x}"))
}

const USAGE: &str = "\
usage: uswap-workload <subcommand> [options]     (sizes in MiB; --idle-ms defaults to 1500)
  fill-verify      --mib N [--idle-ms M] [--rounds R] [--rss-report]
  read-syscall     --mib N [--idle-ms M]
  write-after-evict --mib N [--idle-ms M]
  threads          --mib N [--threads T] [--idle-ms M]
  munmap           --mib N [--idle-ms M]
  mremap           --mib N [--idle-ms M]
  dontneed         --mib N [--idle-ms M] [--rest-ms R (after the discard, before reading)]
  event-reuse      --mib N [--idle-ms M]   (mremap, DONTNEED, munmap over evicted memory, then fresh maps there)
  fork-remap       --mib N [--idle-ms M]   (a forked child keeps its copy while the parent moves the region)
  fork-cold-stack  --mib N [--stack-mib S] [--idle-ms M]   (a thread forks with the stack below it evicted)
  realloc          --mib N [--idle-ms M]
  fork-cow         --mib N [--idle-ms M]
  bgsave           --mib N [--idle-ms M]
  fork-then-hot    --mib N [--idle-ms M] [--hot-mib H] [--secs S] [--child-ms C]
                   (a child that exits at once, or lives C ms; then a read-only hot set)
  fork-chain       --mib N [--idle-ms M] [--depth D]
  spawn            --mib N [--idle-ms M]
  pin              --mib N [--idle-ms M] [--pin-pages P]
  fill-rate        --mib N [--repeat K]
  fault-latency    --mib N [--idle-ms M] [--pattern seq|random] [--touches K] [--only-evicted]
  garbage-to-monitor --mib N [--idle-ms M]
  close-all-fds    --mib N [--idle-ms M] [--fork] [--close-below FD]
  chaos            --mib N [--secs S] [--threads T] [--fork-ms MS (a thread forks every MS)]
  bench            --mib N [--idle-ms M] [--pattern seq|rev|stride|random|zipf] [--touches K]
                   [--threshold-ns T] [--theta X] [--write-pct P] [--linger-ms L]
  output-echo      [any args]
defaults: --mib 64, --rounds 1, --threads 4, --pin-pages 16, --repeat 3,
          --touches all pages (seq) / 20000 (random)
every subcommand ends with `RESULT ok ...` (exit 0) or `RESULT FAIL <reason>` (exit 1)";

fn run(args: &[String]) -> Result<String, String> {
    let sub = args.get(1).map(String::as_str).unwrap_or("");
    let rest = args.get(2..).unwrap_or(&[]);
    let idle = ["mib", "idle-ms"];
    let parse = |extra_vals: &[&str], flags: &[&str]| {
        let mut v: Vec<&str> = idle.to_vec();
        v.extend_from_slice(extra_vals);
        Opts::parse(rest, &v, flags).map_err(|e| format!("usage: {sub}: {e}"))
    };
    match sub {
        "fill-verify" => cmd_fill_verify(&parse(&["rounds"], &["rss-report"])?),
        "read-syscall" => cmd_read_syscall(&parse(&[], &[])?),
        "write-after-evict" => cmd_write_after_evict(&parse(&[], &[])?),
        "threads" => cmd_threads(&parse(&["threads"], &[])?),
        "munmap" => cmd_munmap(&parse(&[], &[])?),
        "mremap" => cmd_mremap(&parse(&[], &[])?),
        "dontneed" => cmd_dontneed(&parse(&["rest-ms"], &[])?),
        "event-reuse" => cmd_event_reuse(&parse(&[], &[])?),
        "fork-remap" => cmd_fork_remap(&parse(&[], &[])?),
        "fork-cold-stack" => cmd_fork_cold_stack(&parse(&[], &[])?),
        "realloc" => cmd_realloc(&parse(&[], &[])?),
        "fork-cow" => cmd_fork_cow(&parse(&[], &[])?),
        "bgsave" => cmd_bgsave(&parse(&[], &[])?),
        "fork-then-hot" => cmd_fork_then_hot(&parse(&["hot-mib", "secs", "child-ms"], &[])?),
        "fork-chain" => cmd_fork_chain(&parse(&["depth"], &[])?),
        "spawn" => cmd_spawn(&parse(&[], &[])?),
        "pin" => cmd_pin(&parse(&["pin-pages"], &[])?),
        "fill-rate" => cmd_fill_rate(
            &Opts::parse(rest, &["mib", "repeat"], &[])
                .map_err(|e| format!("usage: {sub}: {e}"))?,
        ),
        "fault-latency" => cmd_fault_latency(&parse(&["pattern", "touches"], &["only-evicted"])?),
        "bench" => cmd_bench(&parse(
            &[
                "pattern",
                "touches",
                "threshold-ns",
                "theta",
                "write-pct",
                "linger-ms",
            ],
            &[],
        )?),
        "output-echo" => cmd_output_echo(args),
        "garbage-to-monitor" => cmd_garbage_to_monitor(&parse(&[], &[])?),
        "close-all-fds" => cmd_close_all_fds(&parse(&["close-below"], &["fork"])?),
        "chaos" => cmd_chaos(&parse(&["secs", "threads", "fork-ms"], &[])?),
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok("help".into())
        }
        _ => {
            eprintln!("{USAGE}");
            Err(format!("usage: unknown subcommand {sub:?}"))
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let res = run(&args);
    let code = match res {
        Ok(s) => {
            println!("RESULT ok {s}");
            0
        }
        Err(e) => {
            println!("RESULT FAIL {e}");
            1
        }
    };
    flush();
    std::process::exit(code);
}
