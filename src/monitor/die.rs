//! Fault injection for the kill tests: `USWAP_TEST_DIE=<point>` in the monitor's environment
//! makes it SIGKILL itself the first time it reaches `<point>`, so a test can kill it at one
//! exact instant instead of a random one. Points (in the fault thread unless said):
//!
//! - `read:remap`, `read:remove`, `read:unmap`: an event of that kind of the program was read
//!   from its userfaultfd (the program's call has returned) and is about to be applied;
//! - `apply:remap`: a REMAP's page words (and window slot records) have moved, its store
//!   records not yet;
//! - `compact:copied` (control thread): store compaction has published a blob's new copy and
//!   record, and not yet zeroed the old record; the length is the payload bytes compaction
//!   moved for this client so far;
//! - `recompress:published` (control thread): idle-time recompression has published a
//!   blob's shorter copy and its record, and not yet zeroed the old record (layout write
//!   order, step 8); the length is the payload bytes recompression saved for this client so
//!   far, this blob's included (`recompress:published>65536`: about a hundred zstd frames
//!   are in the store by then);
//! - `fork:hello` (server thread): a forked child's `Hello` has arrived, its snapshot not yet
//!   claimed; the child has registered its memory with its own userfaultfd and finds no monitor
//!   (a restarted one would not know its token), so it brings its pages home itself.
//!
//! Only events over at least 256 KiB count; `<point>=<bytes>` picks events of exactly that
//! length (a thread's exit unmaps its 8 MiB stack, for one), `<point>><bytes>` any of at
//! least that length.
//!
//! Unset (the normal case), [`point`] is one load of an initialised `OnceLock`.
//!
//! Owns: the parsed point. Must not: change any decision when unset.

use std::sync::OnceLock;

fn configured() -> Option<&'static str> {
    static P: OnceLock<Option<String>> = OnceLock::new();
    P.get_or_init(|| std::env::var("USWAP_TEST_DIE").ok())
        .as_deref()
}

/// Events over fewer bytes than this do not count (the program's C library makes small ones
/// of its own; the tests' changes are larger).
const MIN_LEN_BYTES: u64 = 256 << 10;

/// Kills this process with SIGKILL if `USWAP_TEST_DIE` names `point` (a point without a
/// length).
pub fn point(point: &str) {
    if configured() == Some(point) {
        die(point, 0);
    }
}

/// Kills this process with SIGKILL (no unwinding, no cleanup: as `kill -9` would) if
/// `USWAP_TEST_DIE` names `point` and the event spans at least 256 KiB (or, with
/// `point=N`, exactly N bytes; with `point>N`, at least N bytes).
pub fn point_over(point: &str, len_bytes: u64) {
    let Some(want) = configured() else { return };
    let hit = if let Some((name, n)) = want.split_once('=') {
        name == point && n.parse() == Ok(len_bytes)
    } else if let Some((name, n)) = want.split_once('>') {
        name == point && n.parse().is_ok_and(|n: u64| len_bytes >= n)
    } else {
        want == point && len_bytes >= MIN_LEN_BYTES
    };
    if hit {
        die(point, len_bytes);
    }
}

fn die(point: &str, len_bytes: u64) {
    tracing::warn!(
        point,
        len_bytes,
        "USWAP_TEST_DIE: the monitor kills itself here"
    );
    // SAFETY: signalling our own process; SIGKILL cannot be caught, so this never returns
    // to code that could observe a half-done state.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
}
