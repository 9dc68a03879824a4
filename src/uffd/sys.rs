//! Kernel ABI of userfaultfd: `#[repr(C)]` structs, ioctl numbers and flag bits, as in
//! `include/uapi/linux/userfaultfd.h` of Linux 6.18.
//!
//! Owns: the raw layout only. Must not: issue syscalls or interpret results (see the sibling
//! modules). Debian 12's headers are 6.1 and lack UFFDIO_MOVE, and the `libc` crate does not
//! carry these definitions, so they are written out here and checked by size assertions.

/// `UFFD_API`: the only API version there is.
pub const UFFD_API: u64 = 0xAA;
/// Flag to `userfaultfd(2)` that we must never pass: it makes kernel-mode faults (a `read(2)`
/// into an evicted buffer) fail with EFAULT instead of reaching the monitor.
pub const UFFD_USER_MODE_ONLY: i32 = 1;

const UFFDIO: u64 = 0xAA;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}

pub const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, 0x3F, std::mem::size_of::<UffdioApi>());
pub const UFFDIO_REGISTER: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x00,
    std::mem::size_of::<UffdioRegister>(),
);
pub const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, 0x01, std::mem::size_of::<UffdioRange>());
pub const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, std::mem::size_of::<UffdioRange>());
pub const UFFDIO_COPY: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x03,
    std::mem::size_of::<UffdioCopy>(),
);
pub const UFFDIO_ZEROPAGE: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x04,
    std::mem::size_of::<UffdioZeropage>(),
);
pub const UFFDIO_MOVE: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x05,
    std::mem::size_of::<UffdioMove>(),
);
pub const UFFDIO_WRITEPROTECT: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x06,
    std::mem::size_of::<UffdioWriteprotect>(),
);
/// `/dev/userfaultfd` ioctl that creates a new descriptor: `_IO(0xAA, 0x00)`.
pub const USERFAULTFD_IOC_NEW: u64 = UFFDIO << 8;

// Features negotiated with UFFDIO_API.
pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const UFFD_FEATURE_SIGBUS: u64 = 1 << 7;
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
pub const UFFD_FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
pub const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
pub const UFFD_FEATURE_EXACT_ADDRESS: u64 = 1 << 11;
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_POISON: u64 = 1 << 14;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
pub const UFFD_FEATURE_MOVE: u64 = 1 << 16;
/// Our kernel patch (`src/kmod-patch/`): UFFDIO_MOVE across the descriptor's mm and the
/// caller's. Absent on stock kernels.
pub const UFFD_FEATURE_MOVE_CROSS_MM: u64 = 1 << 17;

// UFFDIO_REGISTER modes.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;

// Per-operation modes.
pub const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_MOVE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES: u64 = 1 << 1;
/// Cross-mm modes of the kernel patch in `src/kmod-patch/` (with `UFFD_FEATURE_MOVE_CROSS_MM`):
/// src in the caller's mm, dst in the descriptor's registered range.
pub const UFFDIO_MOVE_MODE_CROSS_MM_IN: u64 = 1 << 2;
/// src in the descriptor's registered range, dst in the caller's mm.
pub const UFFDIO_MOVE_MODE_CROSS_MM_OUT: u64 = 1 << 3;
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
pub const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;

// Events in `uffd_msg.event`.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

// Flags of a PAGEFAULT message.
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
pub const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    /// Out: bytes copied, or a negated errno.
    pub copy: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioZeropage {
    pub range: UffdioRange,
    pub mode: u64,
    /// Out: bytes zeroed, or a negated errno.
    pub zeropage: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioMove {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    /// Out: bytes moved, or a negated errno.
    pub moved: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}

/// `struct uffd_msg`: 32 bytes, an event byte and a 24-byte union read as three words.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdMsg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    pub arg: [u64; 3],
}

impl UffdMsg {
    /// The message whose 32 bytes are these four little-endian words (as the kernel wrote them
    /// into memory, read back word by word from shared memory).
    pub fn from_words(w: [u64; 4]) -> UffdMsg {
        UffdMsg {
            event: w[0] as u8,
            reserved1: (w[0] >> 8) as u8,
            reserved2: (w[0] >> 16) as u16,
            reserved3: (w[0] >> 32) as u32,
            arg: [w[1], w[2], w[3]],
        }
    }
}

const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);
const _: () = assert!(std::mem::size_of::<UffdioZeropage>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioMove>() == 40);
const _: () = assert!(std::mem::size_of::<UffdioWriteprotect>() == 24);
const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);
const _: () = assert!(UFFDIO_API == 0xc018_aa3f);
const _: () = assert!(UFFDIO_REGISTER == 0xc020_aa00);
const _: () = assert!(UFFDIO_COPY == 0xc028_aa03);
const _: () = assert!(UFFDIO_MOVE == 0xc028_aa05);
const _: () = assert!(UFFDIO_WAKE == 0x8010_aa02);
