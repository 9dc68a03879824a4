//! Debug aid: an in-memory history of every page-state decision, enabled by the environment
//! variable `USWAP_PAGE_TRACE=<file prefix>` and written to `<prefix>.<client pid>` when a
//! client ends. Off (one relaxed load per call) otherwise.
//!
//! Owns: the history buffer. Must not: influence any decision.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Instant;

use parking_lot::Mutex;

#[derive(Clone, Copy)]
pub struct Rec {
    pub t_ns: u64,
    pub kind: &'static str,
    pub a: u64,
    pub b: u64,
    pub c: u64,
}

struct Trace {
    t0: Instant,
    prefix: String,
    recs: Mutex<Vec<(u64, Rec)>>,
}

fn trace() -> Option<&'static Trace> {
    static T: OnceLock<Option<Trace>> = OnceLock::new();
    T.get_or_init(|| {
        std::env::var("USWAP_PAGE_TRACE").ok().map(|prefix| Trace {
            t0: Instant::now(),
            prefix,
            recs: Mutex::new(Vec::with_capacity(1 << 22)),
        })
    })
    .as_ref()
}

pub fn enabled() -> bool {
    trace().is_some()
}

/// Records one decision of client `client_id`.
pub fn rec(client_id: u64, kind: &'static str, a: u64, b: u64, c: u64) {
    if let Some(t) = trace() {
        let r = Rec {
            t_ns: t.t0.elapsed().as_nanos() as u64,
            kind,
            a,
            b,
            c,
        };
        t.recs.lock().push((client_id, r));
    }
}

/// Writes the history of `client_id` to `<prefix>.<pid>`.
pub fn dump(client_id: u64, pid: i32) {
    let Some(t) = trace() else { return };
    let recs: Vec<Rec> = {
        let mut g = t.recs.lock();
        let (mine, rest): (Vec<_>, Vec<_>) = g.drain(..).partition(|(c, _)| *c == client_id);
        *g = rest;
        mine.into_iter().map(|(_, r)| r).collect()
    };
    let Ok(f) = std::fs::File::create(format!("{}.{pid}", t.prefix)) else {
        return;
    };
    let mut w = std::io::BufWriter::new(f);
    for r in recs {
        let _ = writeln!(w, "{} {} {:#x} {:#x} {:#x}", r.t_ns, r.kind, r.a, r.b, r.c);
    }
}
