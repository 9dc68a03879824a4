//! Errors of userfaultfd operations, mapped from errno in exactly one place ([`UffdError::from_errno`]).
//!
//! Owns: the classification callers act on. Must not: log or retry; callers decide.

use std::fmt;

/// Which userfaultfd operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Api,
    Register,
    Unregister,
    Wake,
    Copy,
    Zeropage,
    Move,
    Writeprotect,
    Read,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Op::Create => "userfaultfd",
            Op::Api => "UFFDIO_API",
            Op::Register => "UFFDIO_REGISTER",
            Op::Unregister => "UFFDIO_UNREGISTER",
            Op::Wake => "UFFDIO_WAKE",
            Op::Copy => "UFFDIO_COPY",
            Op::Zeropage => "UFFDIO_ZEROPAGE",
            Op::Move => "UFFDIO_MOVE",
            Op::Writeprotect => "UFFDIO_WRITEPROTECT",
            Op::Read => "read(userfaultfd)",
        };
        f.write_str(name)
    }
}

/// A failed userfaultfd operation. Each variant is something a caller acts on differently;
/// `done_bytes` is how much of a range operation had completed before it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UffdError {
    /// ESRCH: the process that owns the descriptor's mm is gone (exit or exec).
    #[error("{op}: the target process is gone (ESRCH)")]
    TargetGone { op: Op },
    /// EEXIST: a page is already mapped at the destination.
    #[error(
        "{op}: a page is already present at the destination (EEXIST) after {done_bytes} bytes"
    )]
    Exists { op: Op, done_bytes: u64 },
    /// EAGAIN: the address space is changing (an unread REMOVE/UNMAP/REMAP event) or the
    /// operation stopped part way; drain events and retry the rest.
    #[error("{op}: address space changing, retry (EAGAIN) after {done_bytes} bytes")]
    Retry { op: Op, done_bytes: u64 },
    /// EBUSY: the page is pinned or shared (e.g. copy-on-write after fork); it cannot move.
    #[error("{op}: page is pinned or shared (EBUSY) after {done_bytes} bytes")]
    Busy { op: Op, done_bytes: u64 },
    /// ENOENT: no page at the source (UFFDIO_MOVE without ALLOW_SRC_HOLES) or no VMA.
    #[error("{op}: nothing mapped at the source (ENOENT) after {done_bytes} bytes")]
    NoSource { op: Op, done_bytes: u64 },
    /// Any other errno (EINVAL for ranges outside registered VMAs, ENOMEM, EFAULT...).
    #[error("{op} failed after {done_bytes} bytes: {}", std::io::Error::from_raw_os_error(*errno))]
    Os { op: Op, errno: i32, done_bytes: u64 },
}

impl UffdError {
    /// The single errno → variant mapping.
    pub fn from_errno(op: Op, errno: i32, done_bytes: u64) -> Self {
        match errno {
            libc::ESRCH => UffdError::TargetGone { op },
            libc::EEXIST => UffdError::Exists { op, done_bytes },
            libc::EAGAIN => UffdError::Retry { op, done_bytes },
            libc::EBUSY => UffdError::Busy { op, done_bytes },
            libc::ENOENT => UffdError::NoSource { op, done_bytes },
            _ => UffdError::Os {
                op,
                errno,
                done_bytes,
            },
        }
    }

    /// The raw errno, for logs and wire messages.
    pub fn errno(&self) -> i32 {
        match self {
            UffdError::TargetGone { .. } => libc::ESRCH,
            UffdError::Exists { .. } => libc::EEXIST,
            UffdError::Retry { .. } => libc::EAGAIN,
            UffdError::Busy { .. } => libc::EBUSY,
            UffdError::NoSource { .. } => libc::ENOENT,
            UffdError::Os { errno, .. } => *errno,
        }
    }

    /// Bytes completed before the failure (0 where the operation is not a range operation).
    pub fn done_bytes(&self) -> u64 {
        match self {
            UffdError::TargetGone { .. } => 0,
            UffdError::Exists { done_bytes, .. }
            | UffdError::Retry { done_bytes, .. }
            | UffdError::Busy { done_bytes, .. }
            | UffdError::NoSource { done_bytes, .. }
            | UffdError::Os { done_bytes, .. } => *done_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_errno_maps_actionable_errnos() {
        assert_eq!(
            UffdError::from_errno(Op::Copy, libc::ESRCH, 0),
            UffdError::TargetGone { op: Op::Copy }
        );
        assert!(matches!(
            UffdError::from_errno(Op::Copy, libc::EEXIST, 4096),
            UffdError::Exists {
                done_bytes: 4096,
                ..
            }
        ));
        assert!(matches!(
            UffdError::from_errno(Op::Move, libc::EAGAIN, 0),
            UffdError::Retry { .. }
        ));
        assert!(matches!(
            UffdError::from_errno(Op::Move, libc::EBUSY, 0),
            UffdError::Busy { .. }
        ));
        let e = UffdError::from_errno(Op::Register, libc::EINVAL, 0);
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(e.to_string().contains("UFFDIO_REGISTER"), "{e}");
    }
}
