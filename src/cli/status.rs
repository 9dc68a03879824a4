//! `uswap status`: a table (or JSON) of the daemon's clients. The JSON is every client's full
//! report (`monitor::ClientReport`); `uswap top` and the Prometheus endpoint show the same figures.

use std::path::PathBuf;

use anyhow::Context;

use crate::monitor::query_status;

fn mib(v: &serde_json::Value) -> String {
    v.as_u64().map_or("-".into(), |b| {
        format!("{:.1}", b as f64 / (1 << 20) as f64)
    })
}

pub fn status(socket: Option<PathBuf>, json: bool, daemon: bool) -> anyhow::Result<()> {
    let path = socket.unwrap_or_else(crate::protocol::default_socket_path);
    if daemon {
        let v = crate::monitor::query_daemon_status(&path).with_context(|| {
            format!(
                "no daemon answers on {} (start one with `uswap daemon`)",
                path.display()
            )
        })?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let reports = query_status(&path).with_context(|| {
        format!(
            "no daemon answers on {} (start one with `uswap daemon`)",
            path.display()
        )
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
        return Ok(());
    }
    println!(
        "{:>5} {:>7} {:<16} {:>5} {:<8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>9} {:>9} {:>9}",
        "ID",
        "PID",
        "NAME",
        "LIVE",
        "BACKEND",
        "RSS MiB",
        "BUDGET",
        "STORE MiB",
        "DISK MiB",
        "WINDOW pg",
        "RATIO",
        "FAULTS",
        "FAULTS/s",
        "P99 us"
    );
    for r in &reports {
        let store_out = r["store"]["bytes_out"].clone();
        let n = |v: &serde_json::Value| v.as_u64().map_or("-".to_string(), |x| x.to_string());
        println!(
            "{:>5} {:>7} {:<16} {:>5} {:<8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6.2} {:>9} {:>9.0} {:>9.1}",
            n(&r["id"]),
            r["pid"].as_i64().unwrap_or(0),
            r["name"]
                .as_str()
                .unwrap_or("?")
                .chars()
                .take(16)
                .collect::<String>(),
            if r["alive"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            r["backend"]
                .as_str()
                .unwrap_or("?")
                .split(' ')
                .next()
                .unwrap_or("?"),
            mib(&r["rss_anon_bytes"]),
            mib(&r["budget_bytes"]),
            mib(&store_out),
            if r["disk"]["enabled"].as_bool() == Some(true) {
                mib(&r["disk"]["bytes_used"])
            } else {
                "-".to_string()
            },
            n(&r["pages_in_window"]),
            r["compression_ratio"].as_f64().unwrap_or(0.0),
            n(&r["faults"]),
            r["fault_rate_per_s"].as_f64().unwrap_or(0.0),
            r["fault_latency"]["p99_us"].as_f64().unwrap_or(0.0),
        );
    }
    if reports.is_empty() {
        println!("(no programs attached)");
    }
    Ok(())
}
