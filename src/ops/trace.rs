//! The trace file of `uswap run --trace FILE` / `uswap daemon --trace FILE`: one JSON object
//! per line, written every interval (default 250 ms), with each client's memory and fault
//! figures at that moment. `uswap plot` reads it back.
//!
//! ```text
//! {"t_s":0.25,"unix_ms":1764100000250,"clients":[{"id":1,"pid":4242,"name":"uswap-demo","alive":true,"rss_anon_bytes":...,"store_bytes":...,"faults":...,"fault_rate_per_s":...}]}
//! ```
//!
//! `t_s` is seconds since tracing began (monotonic clock), `unix_ms` the wall clock. Every line
//! is flushed as written, so a trace of a process that was killed is readable up to its end.
//!
//! Owns: the file format, its writer thread and its reader. Must not: compute figures.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::metrics::ReportSource;
use crate::monitor::ClientReport;

/// One client at one sample.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TraceClient {
    pub id: u64,
    pub pid: i32,
    pub name: String,
    pub alive: bool,
    pub rss_anon_bytes: u64,
    pub budget_bytes: Option<u64>,
    /// Compressed bytes in the store now.
    pub store_bytes: u64,
    /// Uncompressed size of the pages in the store now.
    pub store_uncompressed_bytes: u64,
    pub pages_in_window: u64,
    pub pages_evicted: u64,
    pub pages_restored: u64,
    pub faults: u64,
    pub fault_rate_per_s: f64,
    pub fault_p99_us: f64,
}

impl From<&ClientReport> for TraceClient {
    fn from(r: &ClientReport) -> Self {
        TraceClient {
            id: r.id,
            pid: r.pid,
            name: r.name.clone(),
            alive: r.alive,
            rss_anon_bytes: r.rss_anon_bytes,
            budget_bytes: r.budget_bytes,
            store_bytes: r.store.bytes_out,
            store_uncompressed_bytes: r.store.bytes_in,
            pages_in_window: r.pages_in_window,
            pages_evicted: r.pages_evicted,
            pages_restored: r.pages_restored,
            faults: r.faults,
            fault_rate_per_s: r.fault_rate_per_s,
            fault_p99_us: r.fault_latency.p99_us,
        }
    }
}

/// One line of the trace.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TraceSample {
    pub t_s: f64,
    pub unix_ms: u64,
    pub clients: Vec<TraceClient>,
}

/// Samples `source` every `interval` into a file until dropped (which writes a last sample).
pub struct TraceWriter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for TraceWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A trace file, created (truncated) but not yet written to: created first, so a bad path
/// fails before anything starts.
pub struct TraceFile {
    file: std::fs::File,
    path: PathBuf,
}

pub fn create(path: &Path) -> anyhow::Result<TraceFile> {
    let file = std::fs::File::create(path)
        .with_context(|| format!("creating trace file {}", path.display()))?;
    Ok(TraceFile {
        file,
        path: path.to_path_buf(),
    })
}

/// Starts sampling into `file`. Finished clients are written only while `alive` or in the
/// first sample after they ended, so a long daemon trace does not repeat every finished
/// client forever.
pub fn start(
    file: TraceFile,
    interval: Duration,
    source: ReportSource,
) -> anyhow::Result<TraceWriter> {
    let TraceFile { file, path } = file;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("uswap-trace".into())
        .spawn(move || {
            let mut out = std::io::BufWriter::new(file);
            let t0 = Instant::now();
            let mut written_dead: std::collections::HashSet<u64> = Default::default();
            loop {
                let last = stop2.load(Ordering::Acquire);
                let reports = source();
                let clients = reports
                    .iter()
                    .filter(|r| r.alive || written_dead.insert(r.id))
                    .map(TraceClient::from)
                    .collect();
                // Forget finished clients the monitor no longer reports (bounded memory).
                written_dead.retain(|id| reports.iter().any(|r| r.id == *id));
                let sample = TraceSample {
                    t_s: t0.elapsed().as_secs_f64(),
                    unix_ms: SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64),
                    clients,
                };
                let line = serde_json::to_string(&sample).expect("a sample serialises");
                if let Err(e) = writeln!(out, "{line}").and_then(|_| out.flush()) {
                    tracing::warn!("writing trace {}: {e}; tracing stops", path.display());
                    return;
                }
                if last {
                    return;
                }
                // Sleep in short steps so a stop is seen quickly.
                let wake = Instant::now() + interval;
                while Instant::now() < wake && !stop2.load(Ordering::Acquire) {
                    std::thread::sleep(interval.min(Duration::from_millis(50)));
                }
            }
        })
        .context("spawning the trace thread")?;
    Ok(TraceWriter {
        stop,
        thread: Some(thread),
    })
}

/// Reads a trace; a line that does not parse is an error naming its number (a torn last line,
/// from a writer killed mid-write, is skipped).
pub fn read(path: &Path) -> anyhow::Result<Vec<TraceSample>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("opening trace {}", path.display()))?;
    let lines: Vec<String> = std::io::BufReader::new(file)
        .lines()
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading trace {}", path.display()))?;
    let mut samples = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(s) => samples.push(s),
            Err(_) if i + 1 == lines.len() => break,
            Err(e) => {
                anyhow::bail!("{} line {}: not a trace sample: {e}", path.display(), i + 1)
            }
        }
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_samples_are_read_back_in_order_with_a_final_sample() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let n = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let n2 = Arc::clone(&n);
        let source: ReportSource = Arc::new(move || {
            let faults = n2.fetch_add(1, Ordering::Relaxed);
            vec![ClientReport {
                id: 1,
                pid: 99,
                name: "p".into(),
                alive: true,
                faults,
                ..Default::default()
            }]
        });
        let w = start(create(&path).unwrap(), Duration::from_millis(20), source).unwrap();
        std::thread::sleep(Duration::from_millis(150));
        drop(w);
        let samples = read(&path).unwrap();
        assert!(samples.len() >= 3, "{samples:?}");
        assert_eq!(samples.len() as u64, n.load(Ordering::Relaxed));
        for w in samples.windows(2) {
            assert!(w[1].t_s > w[0].t_s);
            assert!(w[1].clients[0].faults > w[0].clients[0].faults);
        }
    }

    #[test]
    fn read_names_the_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        std::fs::write(&path, "{\"t_s\":0,\"unix_ms\":0,\"clients\":[]}\nnope\n{\"t_s\":1,\"unix_ms\":0,\"clients\":[]}\n").unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
