//! uswap: a transparent userspace swap monitor.
//!
//! An unmodified program is started with the `libuswap_shim.so` preload. The shim creates the
//! program's own userfaultfd and forwards it to the monitor over a Unix socket; the monitor
//! evicts the program's cold anonymous pages into a compressed store and brings them back on
//! the next access, through that descriptor.
//!
//! Layering (imports only go downward; `grep -rn "use crate::" src/<module>` checks it):
//!
//! | module      | owns                                              | must not touch            |
//! |-------------|---------------------------------------------------|---------------------------|
//! | `uffd`      | the kernel's userfaultfd interface                 | page state, sockets       |
//! | `protocol`  | the shim⇄monitor wire format                       | syscalls other than I/O   |
//! | `store`     | compressed pages in size-class slabs               | uffd, processes, syscalls |
//! | `policy`    | which pages are cold, how much to evict            | any syscall               |
//! | `config`    | TOML files and their validation                    | uffd, processes           |
//! | `monitor`   | clients, page state machine, fault service          | —                         |
//! | `ops`       | Prometheus text, trace files and plots, systemd sockets | page state, client fds |
//! | `cli`       | the `uswap` command line                            | page state                |
//!
//! The shim crate (`shim/`) uses only `uffd` and `protocol`; everything else is behind the
//! default `monitor` feature.

pub mod protocol;
pub mod uffd;

#[cfg(feature = "monitor")]
pub mod cli;
#[cfg(feature = "monitor")]
pub mod config;
#[cfg(feature = "monitor")]
pub mod monitor;
#[cfg(feature = "monitor")]
pub mod ops;
#[cfg(feature = "monitor")]
pub mod policy;
#[cfg(feature = "monitor")]
pub mod store;

/// The page size uswap works in. x86_64 and aarch64-4k only; checked at startup.
pub const PAGE_SIZE: usize = 4096;
