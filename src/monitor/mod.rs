//! The monitor: accepts clients, keeps each one's page state, serves its faults and evicts its
//! cold pages.
//!
//! Owns: clients and everything about them. Must not: touch any process except through the
//! descriptors a client forwarded (no ptrace, no process_vm_readv, no /proc/PID/mem).

pub mod arrivals;
pub mod client;
pub mod compact;
pub mod compress;
pub mod die;
pub mod diskio;
pub mod disktier;
pub mod fault;
pub mod forks;
pub mod keeper;
pub mod pages;
pub mod pagetrace;
pub mod prefetch;
pub mod recompress;
pub mod regions;
pub mod rss;
pub mod server;
pub mod spin;
pub mod stats;

pub use server::{connect, query_daemon_status, query_status, Listener, Monitor, MonitorOptions};
pub use stats::ClientReport;
