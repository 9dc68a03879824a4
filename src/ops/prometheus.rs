//! The Prometheus text exposition format (version 0.0.4) of the monitor's client reports.
//!
//! One place turns [`ClientReport`]s into metrics: every per-program series carries the labels
//! `id` (the monitor's client id, unique for the daemon's life), `pid` and `name`. Counters end
//! in `_total`, sizes in `_bytes`, times in `_seconds`; fault service time is a summary (the
//! monitor keeps an HDR histogram, whose quantiles are exported, with `_sum` and `_count`).
//!
//! Recently finished programs stay in the output (with `uswap_client_alive 0`) for as long as
//! the daemon keeps their report for `uswap status` (its last 256), so their final figures can
//! be scraped; their series end when the report is dropped.
//!
//! Owns: metric names, help texts and label escaping. Must not: compute any figure itself.

use std::fmt::Write as _;

use crate::monitor::ClientReport;

/// The content type of this format, for the HTTP reply.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

/// One per-client series: name, kind, help, and how to read it from a report.
struct Series {
    name: &'static str,
    kind: Kind,
    help: &'static str,
    get: fn(&ClientReport) -> f64,
}

const fn counter(name: &'static str, help: &'static str, get: fn(&ClientReport) -> f64) -> Series {
    Series {
        name,
        kind: Kind::Counter,
        help,
        get,
    }
}

const fn gauge(name: &'static str, help: &'static str, get: fn(&ClientReport) -> f64) -> Series {
    Series {
        name,
        kind: Kind::Gauge,
        help,
        get,
    }
}

const PAGE_BYTES: f64 = crate::PAGE_SIZE as f64;

const SERIES: &[Series] = &[
    gauge(
        "uswap_client_alive",
        "1 while the program is attached, 0 once it has gone.",
        |r| f64::from(u8::from(r.alive)),
    ),
    gauge(
        "uswap_client_budget_bytes",
        "Managed resident memory target (absent: no budget).",
        |r| r.budget_bytes.map_or(f64::NAN, |b| b as f64),
    ),
    gauge(
        "uswap_client_rss_anon_bytes",
        "The program's anonymous resident memory, as its agent last read it.",
        |r| r.rss_anon_bytes as f64,
    ),
    gauge(
        "uswap_client_peak_rss_anon_bytes",
        "Largest anonymous resident memory seen.",
        |r| r.peak_rss_anon_bytes as f64,
    ),
    gauge(
        "uswap_client_managed_bytes",
        "Bytes of the program's memory under management.",
        |r| r.managed_bytes as f64,
    ),
    gauge(
        "uswap_client_window_pages",
        "Evicted pages cooling in the shared window.",
        |r| r.pages_in_window as f64,
    ),
    gauge(
        "uswap_client_stored_pages",
        "Evicted pages held in the compressed store (those in its disk tier included).",
        |r| r.pages_stored as f64,
    ),
    gauge(
        "uswap_client_store_uncompressed_bytes",
        "Uncompressed size of the pages in the store now.",
        |r| r.store.bytes_in as f64,
    ),
    gauge(
        "uswap_client_store_bytes",
        "Compressed payload bytes in the store now.",
        |r| r.store.bytes_out as f64,
    ),
    gauge(
        "uswap_client_store_mapped_bytes",
        "Bytes of slab memory the store has mapped for the program.",
        |r| r.store.slab_bytes_mapped as f64,
    ),
    gauge(
        "uswap_client_store_resident_bytes",
        "Memory the program's store file holds (its allocated pages).",
        |r| r.store.resident_bytes as f64,
    ),
    gauge(
        "uswap_client_store_slack_bytes",
        "Pages inside the store's chunks that hold nothing live, not given back yet.",
        |r| r.store.slack_bytes as f64,
    ),
    counter(
        "uswap_client_store_punched_bytes_total",
        "Bytes of free pages inside chunks the store gave back.",
        |r| r.store.punched_bytes as f64,
    ),
    counter(
        "uswap_client_store_compaction_moves_total",
        "Blobs store compaction moved out of sparse chunks.",
        |r| r.store.compact_moves as f64,
    ),
    counter(
        "uswap_client_store_compaction_chunks_freed_total",
        "Store chunks compaction emptied and gave back.",
        |r| r.store.compact_chunks_freed as f64,
    ),
    counter(
        "uswap_client_store_recompressed_total",
        "Blobs idle-time recompression replaced by a shorter lz4hc block of the same page.",
        |r| r.store.recompressed as f64,
    ),
    counter(
        "uswap_client_store_recompress_saved_bytes_total",
        "Payload bytes idle-time recompression saved.",
        |r| r.store.recompress_bytes_saved as f64,
    ),
    counter(
        "uswap_client_recompress_cpu_seconds_total",
        "CPU time the idle-priority recompression threads spent on the program's blobs.",
        |r| r.recompress_cpu_s,
    ),
    gauge(
        "uswap_client_window_resident_bytes",
        "Memory the window (stock) or arena (cross-mm) holds now (its resident pages).",
        |r| r.window_resident_bytes as f64,
    ),
    counter(
        "uswap_client_over_budget_spells_total",
        "Times resident memory went over the budget by more than an eighth (prefetch held back).",
        |r| r.over_budget_spells as f64,
    ),
    counter(
        "uswap_client_faults_throttled_total",
        "Faults held back (config throttle) while resident memory was well over the budget.",
        |r| r.faults_throttled as f64,
    ),
    counter(
        "uswap_client_throttle_seconds_total",
        "Time those faults were held back.",
        |r| r.throttle_s,
    ),
    gauge(
        "uswap_client_compression_ratio",
        "Bytes compressed over bytes kept, over the program's life.",
        |r| r.compression_ratio,
    ),
    gauge(
        "uswap_client_fault_rate_per_second",
        "Faults served per second over the last full second.",
        |r| r.fault_rate_per_s,
    ),
    gauge(
        "uswap_client_peak_saved_bytes",
        "Largest saving seen: program memory out of RAM minus what uswap held for it.",
        |r| r.peak_saved_bytes as f64,
    ),
    counter("uswap_client_faults_total", "Faults served.", |r| {
        r.faults as f64
    }),
    counter(
        "uswap_client_faults_store_total",
        "Faults served from the compressed store.",
        |r| r.faults_store as f64,
    ),
    counter(
        "uswap_client_faults_window_total",
        "Faults served from the cooling window.",
        |r| r.faults_window as f64,
    ),
    counter(
        "uswap_client_faults_zero_total",
        "Faults on fresh memory, served with zero pages.",
        |r| r.faults_zero as f64,
    ),
    counter(
        "uswap_client_pages_evicted_total",
        "Pages moved out of the program.",
        |r| r.pages_evicted as f64,
    ),
    counter(
        "uswap_client_evicted_bytes_total",
        "Bytes moved out of the program.",
        |r| r.pages_evicted as f64 * PAGE_BYTES,
    ),
    counter(
        "uswap_client_pages_restored_total",
        "Pages brought back into the program.",
        |r| r.pages_restored as f64,
    ),
    counter(
        "uswap_client_pages_prefetched_total",
        "Pages brought back with a fault on another page (adaptive prefetch).",
        |r| r.pages_prefetched as f64,
    ),
    counter(
        "uswap_client_prefetch_used_pages_total",
        "Prefetched pages the program's fault stream went on past (used).",
        |r| r.fault_path.prefetch_hit_pages as f64,
    ),
    counter(
        "uswap_client_prefetch_wasted_pages_total",
        "Prefetched pages evicted again before use, or left by an abandoned stream.",
        |r| r.fault_path.prefetch_waste_pages as f64,
    ),
    counter(
        "uswap_client_fault_spin_seconds_total",
        "Wall time the fault thread spun for the next fault (upper bound of its CPU).",
        |r| r.fault_path.spin_s,
    ),
    counter(
        "uswap_client_pages_unevictable_total",
        "Pages the kernel refused to move (shared, pinned).",
        |r| r.pages_unevictable as f64,
    ),
    counter(
        "uswap_client_compressed_bytes_in_total",
        "Bytes given to the compressor.",
        |r| r.compressed_bytes_in as f64,
    ),
    counter(
        "uswap_client_compressed_bytes_out_total",
        "Bytes the compressor kept.",
        |r| r.compressed_bytes_out as f64,
    ),
    counter(
        "uswap_client_compress_cpu_seconds_total",
        "Monitor time spent compressing.",
        |r| r.monitor_compress_cpu_s,
    ),
    counter(
        "uswap_client_stall_seconds_total",
        "Time the program's threads were blocked on faults in evicted memory.",
        |r| r.policy.stall_s,
    ),
    gauge(
        "uswap_client_stall_ms_per_second",
        "Stall on faults in evicted memory, ms per second of wall time (about 1 s average).",
        |r| r.policy.stall_ms_per_s,
    ),
    gauge(
        "uswap_client_promotion_rate_per_minute",
        "Refaults in the last minute as a fraction of the pages evicted now.",
        |r| r.policy.promotion_rate_per_min,
    ),
    gauge(
        "uswap_client_cold_age_seconds",
        "Trial-evicted pages untouched this long are compressed.",
        |r| r.policy.cold_age_ms as f64 / 1e3,
    ),
    counter(
        "uswap_client_pages_evicted_hot_total",
        "Pages taken from recently refaulted (hot) pages to hold the budget.",
        |r| r.policy.pages_evicted_hot as f64,
    ),
    counter(
        "uswap_client_pages_proactive_total",
        "Pages chosen by proactive reclaim under the budget.",
        |r| r.policy.pages_proactive as f64,
    ),
    gauge(
        "uswap_client_disk_pages",
        "Evicted pages whose compressed copy is in the disk tier's file.",
        |r| r.disk.pages_on_disk as f64,
    ),
    gauge(
        "uswap_client_disk_bytes",
        "Compressed payload bytes in the disk tier's file.",
        |r| r.disk.bytes_used as f64,
    ),
    gauge(
        "uswap_client_disk_file_bytes",
        "Bytes the file system has allocated to the disk tier's file.",
        |r| r.disk.file_bytes as f64,
    ),
    counter(
        "uswap_client_pages_demoted_total",
        "Pages moved from the compressed store to the disk tier.",
        |r| r.disk.pages_demoted as f64,
    ),
    counter(
        "uswap_client_disk_writes_total",
        "Writes to the disk tier's file (one per run of consecutive slots).",
        |r| r.disk.writes as f64,
    ),
    counter(
        "uswap_client_disk_write_bytes_total",
        "Bytes written to the disk tier's file.",
        |r| r.disk.write_bytes as f64,
    ),
    counter(
        "uswap_client_disk_reads_total",
        "Reads of the disk tier's file for faults (one per run of consecutive slots).",
        |r| r.disk.reads as f64,
    ),
    counter(
        "uswap_client_disk_read_bytes_total",
        "Bytes read from the disk tier's file for faults.",
        |r| r.disk.read_bytes as f64,
    ),
    counter(
        "uswap_client_faults_disk_total",
        "Faults on pages that were in the disk tier.",
        |r| r.disk.faults as f64,
    ),
    counter(
        "uswap_client_disk_errors_total",
        "Failed disk tier batches (no page is lost: a failed write is never used).",
        |r| r.disk.errors as f64,
    ),
];

/// Escapes a label value (backslash, double quote, newline).
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A float in the format's notation (`NaN`, `+Inf`, `-Inf`, else Rust's shortest form).
fn num(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// Renders every report (live and recently finished clients) as one exposition.
pub fn render(reports: &[ClientReport]) -> String {
    let mut out = String::new();
    let live = reports.iter().filter(|r| r.alive).count();
    let _ = writeln!(
        out,
        "# HELP uswap_clients_attached Programs attached to the monitor now.\n# TYPE uswap_clients_attached gauge\nuswap_clients_attached {live}"
    );
    let labels: Vec<String> = reports
        .iter()
        .map(|r| {
            format!(
                "id=\"{}\",pid=\"{}\",name=\"{}\"",
                r.id,
                r.pid,
                escape(&r.name)
            )
        })
        .collect();
    for s in SERIES {
        let kind = match s.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(
            out,
            "# HELP {} {}\n# TYPE {} {kind}",
            s.name, s.help, s.name
        );
        for (r, l) in reports.iter().zip(&labels) {
            let v = (s.get)(r);
            // No budget: no sample (a NaN gauge would read as a figure).
            if v.is_nan() {
                continue;
            }
            let _ = writeln!(out, "{}{{{l}}} {}", s.name, num(v));
        }
    }
    let name = "uswap_client_fault_service_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Fault service time, from reading the fault to the page in place.\n# TYPE {name} summary"
    );
    for (r, l) in reports.iter().zip(&labels) {
        let p = &r.fault_latency;
        for (q, us) in [("0.5", p.p50_us), ("0.99", p.p99_us), ("0.999", p.p999_us)] {
            let _ = writeln!(out, "{name}{{{l},quantile=\"{q}\"}} {}", num(us / 1e6));
        }
        let _ = writeln!(out, "{name}_sum{{{l}}} {}", num(r.monitor_fault_service_s));
        let _ = writeln!(out, "{name}_count{{{l}}} {}", p.count);
    }
    let name = "uswap_client_disk_fault_service_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Service time of faults on pages in the disk tier.\n# TYPE {name} summary"
    );
    for (r, l) in reports.iter().zip(&labels) {
        if !r.disk.enabled {
            continue;
        }
        let p = &r.disk.fault_latency;
        for (q, us) in [("0.5", p.p50_us), ("0.99", p.p99_us), ("0.999", p.p999_us)] {
            let _ = writeln!(out, "{name}{{{l},quantile=\"{q}\"}} {}", num(us / 1e6));
        }
        let _ = writeln!(out, "{name}_sum{{{l}}} {}", num(r.disk.fault_service_s));
        let _ = writeln!(out, "{name}_count{{{l}}} {}", p.count);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> ClientReport {
        let mut r = ClientReport {
            id: 7,
            pid: 1234,
            name: "a \"quoted\\\" name\n".into(),
            alive: true,
            budget_bytes: Some(8 << 20),
            rss_anon_bytes: 5 << 20,
            faults: 42,
            ..Default::default()
        };
        r.fault_latency.count = 42;
        r.fault_latency.p99_us = 250.0;
        r
    }

    #[test]
    fn render_labels_are_escaped_and_every_series_is_typed_once() {
        let text = render(&[report()]);
        assert!(text.contains(
            "uswap_client_faults_total{id=\"7\",pid=\"1234\",name=\"a \\\"quoted\\\\\\\" name\\n\"} 42\n"
        ), "{text}");
        assert!(text.contains("quantile=\"0.99\"} 0.00025\n"), "{text}");
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split_whitespace().nth(2).unwrap();
            assert_eq!(
                text.matches(&format!("# TYPE {name} ")).count(),
                1,
                "{name} typed twice"
            );
        }
        // Every sample line is `name{labels} value` with a parseable value.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let v = line.rsplit(' ').next().unwrap();
            assert!(v.parse::<f64>().is_ok(), "bad value in {line:?}");
        }
    }

    #[test]
    fn render_disk_tier_series_and_summary_only_with_a_disk_tier() {
        let text = render(&[report()]);
        assert!(text.contains("uswap_client_disk_pages{"), "{text}");
        assert!(
            !text.contains("uswap_client_disk_fault_service_seconds{"),
            "{text}"
        );
        let mut r = report();
        r.disk.enabled = true;
        r.disk.pages_on_disk = 9;
        r.disk.fault_latency.count = 3;
        r.disk.fault_latency.p99_us = 900.0;
        let text = render(&[r]);
        assert!(text.contains("uswap_client_disk_pages{id=\"7\""), "{text}");
        assert!(text.contains("} 9\n"), "{text}");
        assert!(
            text.contains("uswap_client_disk_fault_service_seconds_count{id=\"7\""),
            "{text}"
        );
        assert!(text.contains("quantile=\"0.99\"} 0.0009\n"), "{text}");
    }

    #[test]
    fn render_without_budget_has_no_budget_sample() {
        let mut r = report();
        r.budget_bytes = None;
        let text = render(&[r]);
        assert!(text.contains("# TYPE uswap_client_budget_bytes gauge"));
        assert!(!text.contains("uswap_client_budget_bytes{"), "{text}");
    }
}
