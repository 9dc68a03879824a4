//! The kernel's userfaultfd interface: creating a descriptor, negotiating features, registering
//! ranges, resolving faults (COPY, ZEROPAGE, MOVE, WAKE, WRITEPROTECT) and decoding events.
//!
//! Owns: syscalls on a userfaultfd and the errno → [`UffdError`] mapping. Must not: keep page
//! state, talk to sockets, allocate on the heap (the shim calls this code from its constructor
//! and from the agent thread, which must not touch the program's allocator).
//!
//! Why our own bindings: the `userfaultfd` crate has no UFFDIO_MOVE (nor its DONTWAKE and
//! ALLOW_SRC_HOLES modes), and its builder asks for `UFFD_USER_MODE_ONLY` by default, which
//! turns a kernel-mode fault (a `read(2)` into an evicted buffer) into EFAULT. uswap needs
//! both MOVE and kernel-mode faults, so this module wraps the ioctls directly.

mod create;
mod error;
mod msg;
mod ops;
pub mod sys;

pub use create::{probe_features, Uffd};
pub use error::{Op, UffdError};
pub use msg::{Event, FaultKind};
pub use ops::{Probe, Registered};

/// The features the shim asks for on the descriptor it forwards: events that tell the monitor
/// when evicted memory is discarded, unmapped or moved, and the faulting thread's id.
pub const FORWARDED_FEATURES: u64 = sys::UFFD_FEATURE_EVENT_REMAP
    | sys::UFFD_FEATURE_EVENT_REMOVE
    | sys::UFFD_FEATURE_EVENT_UNMAP
    | sys::UFFD_FEATURE_THREAD_ID
    | sys::UFFD_FEATURE_MOVE
    // Only where the kernel patch of `src/kmod-patch/` offers it; it lets the monitor move
    // pages in and out itself (the cross-mm backend).
    | sys::UFFD_FEATURE_MOVE_CROSS_MM;
