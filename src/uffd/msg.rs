//! Decoding of `struct uffd_msg` into [`Event`].
//!
//! Owns: the message union's interpretation. Must not: act on events.

use super::sys;

/// Why a thread faulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FaultKind {
    #[default]
    Read,
    Write,
    WriteProtect,
    Minor,
}

/// One message read from a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Event {
    /// A thread touched a missing page at `addr` (page-aligned here) and waits.
    Pagefault {
        addr: u64,
        kind: FaultKind,
        tid: u32,
    },
    /// A forked child's new descriptor (EVENT_FORK; not used: it needs CAP_SYS_PTRACE).
    Fork { ufd: i32 },
    /// `mremap` moved `[from, from+len)` to `to`.
    Remap { from: u64, to: u64, len: u64 },
    /// `madvise(MADV_DONTNEED/REMOVE)` discarded `[start, end)`.
    Remove { start: u64, end: u64 },
    /// `munmap` (or an overlapping mmap/mremap) unmapped `[start, end)`.
    Unmap { start: u64, end: u64 },
    /// A message this code does not know.
    #[default]
    Unknown,
}

impl Event {
    pub fn decode(msg: &sys::UffdMsg) -> Event {
        let [a0, a1, a2] = msg.arg;
        match msg.event {
            sys::UFFD_EVENT_PAGEFAULT => {
                let flags = a0;
                let kind = if flags & sys::UFFD_PAGEFAULT_FLAG_WP != 0 {
                    FaultKind::WriteProtect
                } else if flags & sys::UFFD_PAGEFAULT_FLAG_MINOR != 0 {
                    FaultKind::Minor
                } else if flags & sys::UFFD_PAGEFAULT_FLAG_WRITE != 0 {
                    FaultKind::Write
                } else {
                    FaultKind::Read
                };
                Event::Pagefault {
                    addr: a1 & !(crate::PAGE_SIZE as u64 - 1),
                    kind,
                    tid: a2 as u32,
                }
            }
            sys::UFFD_EVENT_FORK => Event::Fork {
                ufd: a0 as u32 as i32,
            },
            sys::UFFD_EVENT_REMAP => Event::Remap {
                from: a0,
                to: a1,
                len: a2,
            },
            sys::UFFD_EVENT_REMOVE => Event::Remove { start: a0, end: a1 },
            sys::UFFD_EVENT_UNMAP => Event::Unmap { start: a0, end: a1 },
            _ => Event::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(event: u8, arg: [u64; 3]) -> sys::UffdMsg {
        sys::UffdMsg {
            event,
            arg,
            ..Default::default()
        }
    }

    #[test]
    fn decode_pagefault_aligns_and_classifies() {
        let e = Event::decode(&msg(
            sys::UFFD_EVENT_PAGEFAULT,
            [sys::UFFD_PAGEFAULT_FLAG_WRITE, 0x7000_1234, 42],
        ));
        assert_eq!(
            e,
            Event::Pagefault {
                addr: 0x7000_1000,
                kind: FaultKind::Write,
                tid: 42
            }
        );
        let e = Event::decode(&msg(sys::UFFD_EVENT_PAGEFAULT, [0, 0x5000, 0]));
        assert!(matches!(
            e,
            Event::Pagefault {
                kind: FaultKind::Read,
                ..
            }
        ));
    }

    #[test]
    fn decode_events() {
        assert_eq!(
            Event::decode(&msg(sys::UFFD_EVENT_REMAP, [1, 2, 3])),
            Event::Remap {
                from: 1,
                to: 2,
                len: 3
            }
        );
        assert_eq!(
            Event::decode(&msg(sys::UFFD_EVENT_REMOVE, [0x1000, 0x3000, 0])),
            Event::Remove {
                start: 0x1000,
                end: 0x3000
            }
        );
        assert_eq!(
            Event::decode(&msg(sys::UFFD_EVENT_UNMAP, [0x1000, 0x3000, 0])),
            Event::Unmap {
                start: 0x1000,
                end: 0x3000
            }
        );
        assert_eq!(Event::decode(&msg(0x99, [0, 0, 0])), Event::Unknown);
    }
}
