//! Operations: what a deployment needs around the monitor, apart from the monitor itself —
//! the Prometheus text rendering and its HTTP endpoint, the trace file of periodic samples and
//! its PNG plot, and systemd socket activation.
//!
//! Owns: rendering [`ClientReport`](crate::monitor::ClientReport)s for machines and files, and
//! receiving sockets from systemd. Must not: touch page state or any client's descriptors (it
//! sees clients only through their reports).

pub mod activation;
pub mod metrics;
pub mod plot;
pub mod prometheus;
pub mod trace;
