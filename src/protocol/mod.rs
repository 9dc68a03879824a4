//! The shim⇄monitor protocol: one definition used by both sides.
//!
//! Two channels:
//! - a `SOCK_SEQPACKET` Unix socket carrying the control messages below (one message per
//!   packet, descriptors attached with SCM_RIGHTS), see [`wire`];
//! - a shared memory window (a memfd the monitor creates and sends in [`wire::HelloAck`]) with
//!   the eviction request ring, the agent's results and the page slots, plus two eventfds,
//!   see [`shm`].
//!
//! Owns: byte layouts, versioning and validation of everything that crosses between the two
//! processes. Must not: allocate on the heap in anything the shim's agent calls (encoders write
//! into caller buffers), issue syscalls other than the socket I/O helpers in [`io`], or trust
//! the peer: every decoder checks lengths, counts, alignment and ranges and returns a
//! [`ProtoError`] naming what was wrong.

pub mod io;
pub mod shm;
pub mod store_layout;
pub mod wire;

pub use wire::{Msg, ProtoError};

/// Protocol version; a peer speaking another version is refused with a clear error.
/// Version 3: `HelloAck` has flags, and may carry the disk tier's file as a fifth descriptor.
/// Version 4: the store file it sends is of layout version 4 (payloads may be zstd frames), so
/// a shim that could not read it is refused at `Hello` instead of failing at a rescue.
pub const PROTOCOL_VERSION: u16 = 4;

/// Environment variable naming the monitor's socket.
pub const ENV_SOCKET: &str = "USWAP_SOCKET";
/// Environment variable with per-run overrides, as TOML text (e.g. `budget = "64M"`).
pub const ENV_OVERRIDES: &str = "USWAP_OVERRIDES";
/// Environment variable naming the config to use instead of the program's name.
pub const ENV_APP: &str = "USWAP_APP";
/// Set to `0` to make the shim silent when no monitor answers.
pub const ENV_QUIET: &str = "USWAP_QUIET";

/// The default socket path: `$XDG_RUNTIME_DIR/uswap.sock` when set, else `/run/uswap/uswap.sock`.
pub fn default_socket_path() -> std::path::PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => std::path::Path::new(&dir).join("uswap.sock"),
        _ => std::path::PathBuf::from("/run/uswap/uswap.sock"),
    }
}
