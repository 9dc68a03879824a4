//! `uswap run` and `uswap daemon`.
//!
//! `run` validates its flags and config file first (no syscalls), then either uses a daemon that
//! answers on the socket or starts an embedded monitor on a private socket, starts the program
//! with the shim preloaded, waits for it, and prints a summary. It exits with the program's
//! status (128 + signal number if it was killed).

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use super::UsageError;
use crate::config::{self, Overrides};
use crate::monitor::{ClientReport, Listener, Monitor, MonitorOptions};
use crate::protocol::{ENV_OVERRIDES, ENV_SOCKET};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Managed resident memory target, e.g. 256M, 2G, or "none".
    #[arg(long)]
    pub budget: Option<String>,
    /// A config file for this run (its keys override config/<program>.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Any config key, e.g. --set cooling=500ms (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Write the run's figures as JSON to this file.
    #[arg(long)]
    pub stats_json: Option<PathBuf>,
    /// Use the daemon on this socket (default: the standard socket if a daemon answers there).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Directory of per-program config files for the embedded monitor.
    #[arg(long)]
    pub config_dir: Option<PathBuf>,
    /// Do not print the summary.
    #[arg(long, short)]
    pub quiet: bool,
    /// Do not show the live progress line (shown only when stderr is a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// Write periodic samples (RSS, store size, faults) as JSON lines to FILE, for `uswap plot`.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Interval between trace samples, in milliseconds.
    #[arg(long, default_value_t = 250)]
    pub trace_interval_ms: u64,
    /// The program and its arguments.
    #[arg(last = true, required = true)]
    pub cmd: Vec<String>,
}

/// An in-process monitor: the monitor, its socket, its thread, its private directory.
type Embedded = (
    Arc<Monitor>,
    Arc<Listener>,
    std::thread::JoinHandle<()>,
    PathBuf,
);

static CHILD_PID: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: i32) {
    let pid = CHILD_PID.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// The shim library: `$USWAP_SHIM`, else next to this executable, else in ../lib/uswap/.
pub fn find_shim() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("USWAP_SHIM") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating the uswap executable")?;
    let dir = exe.parent().context("executable has no directory")?;
    for cand in [
        dir.join("libuswap_shim.so"),
        dir.join("../libuswap_shim.so"),
        dir.join("../lib/uswap/libuswap_shim.so"),
    ] {
        if cand.exists() {
            return Ok(cand);
        }
    }
    bail!("libuswap_shim.so not found next to {} (build it with `cargo build --workspace`, or set USWAP_SHIM)", exe.display())
}

/// Builds the overrides text sent to the monitor: the --config file's keys, then --set and
/// --budget. Validated here, so a typo fails before the program starts.
fn overrides_text(args: &RunArgs) -> anyhow::Result<String> {
    let mut table = toml::Table::new();
    if let Some(file) = &args.config {
        config::validate_file(file).map_err(|e| UsageError(e.to_string()))?;
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        table = text
            .parse()
            .map_err(|e| UsageError(format!("{}: {e}", file.display())))?;
    }
    let mut check = Overrides::default();
    let mut set = |k: &str, v: &str| -> anyhow::Result<()> {
        check.set_str(k, v).map_err(|e| UsageError(e.to_string()))?;
        table.insert(k.to_string(), toml::Value::String(v.to_string()));
        Ok(())
    };
    for kv in &args.set {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| UsageError(format!("--set {kv}: expected KEY=VALUE")))?;
        set(k.trim(), v.trim())?;
    }
    if let Some(b) = &args.budget {
        set("budget", b).map_err(|e| UsageError(format!("--budget: {e}")))?;
    }
    Ok(toml::to_string(&table)?)
}

/// `uswap daemon`'s flags.
#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Socket to listen on [default: $XDG_RUNTIME_DIR/uswap.sock or /run/uswap/uswap.sock].
    /// Ignored when systemd passes a listening socket (LISTEN_FDS).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Directory of per-program config files [default: /etc/uswap if it exists, else ./config].
    #[arg(long)]
    pub config_dir: Option<PathBuf>,
    /// Socket file mode, octal (0600: only this user's programs; 0660: also the group's)
    /// [default: daemon config `socket_mode`, 600].
    #[arg(long)]
    pub mode: Option<String>,
    /// The daemon's own config [default: daemon.toml in the config directory, if any].
    #[arg(long)]
    pub daemon_config: Option<PathBuf>,
    /// Serve Prometheus metrics at GET /metrics on HOST:PORT (loopback only, unless
    /// --metrics-allow-remote) or unix:/path. Off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Allow --metrics on a non-loopback address (the endpoint has no authentication).
    #[arg(long)]
    pub metrics_allow_remote: bool,
    /// Write periodic samples of every program (RSS, store size, faults) as JSON lines to FILE.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Interval between trace samples, in milliseconds.
    #[arg(long, default_value_t = 250)]
    pub trace_interval_ms: u64,
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

/// The live line of `uswap run`: the program's figures from `reports`.
fn progress_line(reports: &[ClientReport], pid: i32, elapsed: Duration) -> String {
    match reports.iter().rev().find(|r| r.pid == pid && r.alive) {
        Some(r) => {
            let m = |b: u64| format!("{:.1}", b as f64 / (1u64 << 20) as f64);
            format!(
                "uswap: {} {:.0}s  RSS {}/{} MiB  {:.0} faults/s  store {} MiB x{:.1}",
                r.name.chars().take(16).collect::<String>(),
                elapsed.as_secs_f64(),
                m(r.rss_anon_bytes),
                r.budget_bytes.map_or("-".into(), m),
                r.fault_rate_per_s,
                m(r.store.bytes_out),
                r.compression_ratio,
            )
        }
        None => format!("uswap: {:.0}s  (not attached yet)", elapsed.as_secs_f64()),
    }
}

fn print_summary(r: &ClientReport, wall: Duration) {
    let budget = r.budget_bytes.map_or("none".to_string(), mib);
    let st = &r.store;
    // What `bench/run` counts as held: the store file's allocated pages (older monitors: the
    // slab chunks mapped) and the window's resident pages.
    let store_bytes = if st.resident_bytes > 0 {
        st.resident_bytes
    } else {
        st.slab_bytes_mapped
    };
    let held = store_bytes + r.window_resident_bytes;
    eprintln!(
        "uswap: {} (pid {}) ran {:.1} s",
        r.name,
        r.pid,
        wall.as_secs_f64()
    );
    eprintln!(
        "  managed RSS   peak {}, final {} (budget {})",
        mib(r.peak_rss_anon_bytes),
        mib(r.rss_anon_bytes),
        budget
    );
    eprintln!("  backend       {}", r.backend);
    if r.shadow_runs > 0 {
        eprintln!(
            "  shadows       {} runs given durable copies, {:.0} us each on average, {:.0} us at most (a page lives only in the monitor meanwhile)",
            r.shadow_runs,
            r.monitor_shadow_s * 1e6 / r.shadow_runs as f64,
            r.shadow_max_us
        );
    }
    eprintln!(
        "  pages         evicted {} ({}), restored {} (moved back {}), unevictable {}",
        r.pages_evicted,
        mib(r.pages_evicted * 4096),
        r.pages_restored,
        r.pages_moved_in,
        r.pages_unevictable
    );
    eprintln!(
        "  store         {} compressed to {} (ratio {:.2}); at exit {} pages held in {}",
        mib(r.compressed_bytes_in),
        mib(r.compressed_bytes_out),
        r.compression_ratio,
        st.pages_same_filled + st.pages_lz4 + st.pages_raw,
        mib(held)
    );
    if st.compact_moves > 0 {
        eprintln!(
            "  compaction    {} blobs moved, {} chunks ({}) given back, {:.3} s",
            st.compact_moves,
            st.compact_chunks_freed,
            mib(st.compact_chunks_freed * crate::store::CHUNK_BYTES as u64),
            r.compact_s
        );
    }
    if st.recompressed > 0 {
        eprintln!(
            "  recompression {} of {} blobs offered made smaller, {} saved, {:.2} s of idle CPU",
            st.recompressed,
            r.recompress_offered,
            mib(st.recompress_bytes_saved),
            r.recompress_cpu_s
        );
    }
    eprintln!(
        "  faults        {} (fresh {}, window {}, store {}), service p50 {:.1} us, p99 {:.1} us",
        r.faults,
        r.faults_zero,
        r.faults_window,
        r.faults_store,
        r.fault_latency.p50_us,
        r.fault_latency.p99_us
    );
    let d = &r.disk;
    if d.enabled {
        eprintln!(
            "  disk          {} pages demoted in {} writes ({}), {} read back in {} reads ({}); at exit {} pages on disk in {}; disk faults {}, p50 {:.1} us, p99 {:.1} us{}",
            d.pages_demoted,
            d.writes,
            mib(d.write_bytes),
            d.pages_read_back,
            d.reads,
            mib(d.read_bytes),
            d.pages_on_disk,
            mib(d.bytes_used),
            d.faults,
            d.fault_latency.p50_us,
            d.fault_latency.p99_us,
            if d.errors > 0 {
                format!(", {} failed batches", d.errors)
            } else {
                String::new()
            }
        );
    }
    let pol = &r.policy;
    eprintln!(
        "  policy        stall {:.2} s in all, promotion {:.1}%/min, cold age {:.1} s, hot pages evicted for the budget {}, proactive {} ({})",
        pol.stall_s,
        pol.promotion_rate_per_min * 100.0,
        pol.cold_age_ms as f64 / 1e3,
        pol.pages_evicted_hot,
        pol.pages_proactive,
        if pol.controller_state.is_empty() { "idle" } else { &pol.controller_state }
    );
    let fp = &r.fault_path;
    if r.pages_prefetched > 0 || fp.spin_s > 0.0 {
        eprintln!(
            "  fault path    prefetched {} pages (used {}, wasted {}); spun {:.2} s waiting for faults, fault thread CPU {:.2} s",
            r.pages_prefetched,
            fp.prefetch_hit_pages,
            fp.prefetch_waste_pages,
            fp.spin_s,
            fp.fault_thread_cpu_s
        );
    }
    if r.over_budget_spells > 0 {
        eprintln!(
            "  over budget   {} spells over the budget by more than an eighth (prefetch held back during them); {} faults held back for {:.2} s in all",
            r.over_budget_spells, r.faults_throttled, r.throttle_s
        );
    }
    if let Some(saved) = r.saved_at_peak_bytes() {
        eprintln!("  memory saved  {} at the deepest point (program memory out of RAM minus what uswap held for it)", mib(saved));
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    let overrides = overrides_text(&args)?;
    let trace_file = args
        .trace
        .as_deref()
        .map(crate::ops::trace::create)
        .transpose()?;
    let shim = find_shim()?;
    // A daemon, or an embedded monitor on a private socket.
    let daemon_socket = args.socket.clone().or_else(|| {
        let p = crate::protocol::default_socket_path();
        crate::monitor::connect(&p).is_ok().then_some(p)
    });
    let mut embedded: Option<Embedded> = None;
    let socket = match &daemon_socket {
        Some(p) => p.clone(),
        None => {
            let dir = std::env::temp_dir().join(format!("uswap-run-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let path = dir.join("uswap.sock");
            let listener = Arc::new(Listener::bind(&path, 0o600)?);
            let monitor = Monitor::new(MonitorOptions {
                config_dir: args.config_dir.clone().or_else(super::default_config_dir),
                overrides: Overrides::default(),
                keep_finished: 64,
                daemon: config::DaemonConfig::default(),
            });
            let m = Arc::clone(&monitor);
            let lfd_path = listener.path().to_path_buf();
            let l = Arc::clone(&listener);
            let handle = std::thread::Builder::new()
                .name("uswap-monitor".into())
                .spawn(move || {
                    if let Err(e) = m.serve(&l) {
                        tracing::error!("embedded monitor: {e:#}");
                    }
                })?;
            embedded = Some((monitor, listener, handle, dir));
            lfd_path
        }
    };

    let mut preload = shim.display().to_string();
    if let Some(old) = std::env::var_os("LD_PRELOAD") {
        if !old.is_empty() {
            preload = format!("{preload} {}", old.to_string_lossy());
        }
    }
    // The figures the trace and the progress line read: the embedded monitor's clients, or the
    // daemon's clients of this program. The trace starts before the program does, so a trace
    // file that cannot be created stops uswap before there is a program to leave behind.
    let source: crate::ops::metrics::ReportSource = match (&embedded, &daemon_socket) {
        (Some((monitor, ..)), _) => {
            let m = Arc::clone(monitor);
            Arc::new(move || m.reports())
        }
        (None, Some(sock)) => {
            let sock = sock.clone();
            Arc::new(move || {
                crate::monitor::query_status(&sock)
                    .map(|v| {
                        v.into_iter()
                            .filter_map(|r| serde_json::from_value::<ClientReport>(r).ok())
                            .filter(|r| r.pid == CHILD_PID.load(Ordering::Relaxed))
                            .collect()
                    })
                    .unwrap_or_default()
            })
        }
        (None, None) => Arc::new(Vec::new),
    };
    let trace = match trace_file {
        Some(file) => Some(crate::ops::trace::start(
            file,
            Duration::from_millis(args.trace_interval_ms.max(10)),
            Arc::clone(&source),
        )?),
        None => None,
    };
    let started = Instant::now();
    let mut child = std::process::Command::new(&args.cmd[0])
        .args(&args.cmd[1..])
        .env("LD_PRELOAD", preload)
        .env(ENV_SOCKET, &socket)
        .env(ENV_OVERRIDES, &overrides)
        .spawn()
        .with_context(|| format!("starting {}", args.cmd[0]))?;
    let pid = child.id() as i32;
    CHILD_PID.store(pid, Ordering::Relaxed);
    let progress = (!args.quiet && !args.no_progress).then(|| {
        let source = Arc::clone(&source);
        super::progress::Progress::start(Duration::from_millis(500), move |t| {
            progress_line(&source(), pid, t)
        })
    });
    // SAFETY: installing a handler that only calls kill(2); ignoring SIGINT/SIGQUIT, which the
    // terminal delivers to the program too.
    unsafe {
        libc::signal(libc::SIGTERM, forward_signal as *const () as usize);
        libc::signal(libc::SIGHUP, forward_signal as *const () as usize);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
    let status = child.wait().context("waiting for the program")?;
    let wall = started.elapsed();
    drop(progress);
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));

    let reports: Vec<ClientReport> = match (&embedded, &daemon_socket) {
        (Some((monitor, _, _, _)), _) => {
            if !monitor.wait_idle(Duration::from_secs(2)) {
                // Processes the program left behind (exec'd children still running) must not
                // depend on a monitor that is about to exit.
                let (n, pages) = {
                    let _p = (!args.quiet).then(|| {
                        super::progress::Progress::start(Duration::from_millis(200), |t| {
                            format!(
                                "uswap: handing memory back to processes the program left behind ({:.1} s)",
                                t.as_secs_f64()
                            )
                        })
                    });
                    monitor.release_all()
                };
                eprintln!("uswap: {n} process(es) left behind by the program got their memory back ({pages} pages) and run on unmanaged");
                monitor.wait_idle(Duration::from_secs(2));
            }
            monitor.reports()
        }
        (None, Some(sock)) => daemon_reports(sock, pid),
        (None, None) => Vec::new(),
    };
    // The program's own report: the last image that ran under its pid (a wrapper that exec'd
    // the real program attached first).
    // Last trace sample, with the program's final figures.
    drop(trace);
    let mine: Vec<&ClientReport> = reports.iter().filter(|r| r.pid == pid).collect();
    if !args.quiet {
        match (mine.last(), &daemon_socket) {
            (Some(r), _) => print_summary(r, wall),
            (None, Some(p)) => eprintln!(
                "uswap: managed by the daemon on {}; see `uswap status`",
                p.display()
            ),
            (None, None) => {
                eprintln!("uswap: the program did not attach to the monitor (see the line above)")
            }
        }
    }
    if let Some(path) = &args.stats_json {
        let json = serde_json::json!({ "exit_code": code, "wall_s": wall.as_secs_f64(), "clients": reports });
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some((monitor, listener, handle, dir)) = embedded {
        monitor.stop();
        let _ = handle.join();
        drop(listener);
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(code)
}

/// The daemon's reports for `pid`, once it has noticed the program is gone (up to 5 s).
fn daemon_reports(sock: &std::path::Path, pid: i32) -> Vec<ClientReport> {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let all: Vec<ClientReport> = crate::monitor::query_status(sock)
            .map(|v| {
                v.into_iter()
                    .filter_map(|r| serde_json::from_value(r).ok())
                    .collect()
            })
            .unwrap_or_default();
        let mine: Vec<ClientReport> = all.into_iter().filter(|r| r.pid == pid).collect();
        if (!mine.is_empty() && mine.iter().all(|r| !r.alive)) || Instant::now() > end {
            return mine;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

static STOP: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop(_: i32) {
    STOP.store(1, Ordering::Relaxed);
}

pub fn daemon(args: DaemonArgs) -> anyhow::Result<()> {
    let DaemonArgs {
        socket,
        config_dir,
        mode,
        daemon_config,
        ..
    } = &args;
    let config_dir = config_dir.clone().or_else(super::default_config_dir);
    let dcfg = match daemon_config {
        Some(f) => config::DaemonConfig::load(f),
        None => config::DaemonConfig::load_from_dir(config_dir.as_deref()),
    }
    .map_err(|e| UsageError(e.to_string()))?;
    let mode = match mode {
        Some(m) => u32::from_str_radix(m, 8).map_err(|_| {
            UsageError(format!(
                "--mode {m}: expected an octal mode like 600 or 660"
            ))
        })?,
        None => dcfg.socket_mode,
    };
    let target = dcfg
        .user
        .as_deref()
        .map(super::privilege::resolve_user)
        .transpose()
        .map_err(|e| UsageError(format!("daemon config key \"user\": {e}")))?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if let Some(t) = &target {
        if euid != 0 && euid != t.uid {
            return Err(UsageError(format!(
                "daemon config key \"user\" = \"{}\": the daemon runs as uid {euid} and can only become uid {} when started as root",
                t.name, t.uid
            ))
            .into());
        }
    }
    let trace_file = args
        .trace
        .as_deref()
        .map(crate::ops::trace::create)
        .transpose()?;
    let metrics_addr = args
        .metrics
        .as_deref()
        .map(|a| crate::ops::metrics::MetricsAddr::parse(a, args.metrics_allow_remote))
        .transpose()
        .map_err(|e| UsageError(format!("--metrics: {e}")))?;
    if let Some(d) = &config_dir {
        for entry in
            std::fs::read_dir(d).with_context(|| format!("reading config dir {}", d.display()))?
        {
            let p = entry?.path();
            if p.extension().is_some_and(|e| e == "toml") {
                config::validate_file(&p).map_err(|e| UsageError(e.to_string()))?;
            }
        }
    }
    // systemd socket activation (uswap.socket), else our own socket.
    let (listener, bound_here) = match crate::ops::activation::take_listen_fds()
        .context("reading the sockets systemd passed (LISTEN_FDS)")?
    {
        Some(mut fds) => {
            if fds.len() != 1 {
                bail!(
                    "systemd passed {} sockets (LISTEN_FDS); uswap daemon serves exactly one",
                    fds.len()
                );
            }
            let fd = fds.pop().expect("one descriptor");
            let path = crate::ops::activation::check_seqpacket_listener(&fd)?;
            if socket.as_ref().is_some_and(|s| *s != path) {
                tracing::warn!(passed = %path.display(), "--socket is ignored: systemd passed a listening socket");
            }
            tracing::info!(socket = %path.display(), "using the socket systemd passed");
            (Listener::from_listening_fd(fd, path), false)
        }
        None => {
            let path = socket
                .clone()
                .unwrap_or_else(crate::protocol::default_socket_path);
            if mode & 0o007 != 0 {
                tracing::warn!(
                    mode = format!("{mode:o}"),
                    "the socket is open to every user: only the allow list (daemon config allow_uids/allow_gids) keeps others out"
                );
            }
            (Listener::bind(&path, mode)?, true)
        }
    };
    let path = listener.path().to_path_buf();
    match &target {
        Some(t) if euid == 0 => {
            // A socket we bound belongs to the user the daemon becomes (and its group, for
            // 0660); one systemd passed keeps the owner its .socket unit gave it.
            if bound_here {
                std::os::unix::fs::chown(&path, Some(t.uid), Some(t.gid))
                    .with_context(|| format!("chown {} to {}", path.display(), t.name))?;
            }
            super::privilege::drop_to(t)
                .with_context(|| format!("dropping privileges to user {}", t.name))?;
            tracing::info!(user = %t.name, uid = t.uid, gid = t.gid, "dropped root: no capabilities left, no_new_privs set");
        }
        Some(_) => {} // already that user
        None if euid == 0 => tracing::warn!(
            "running as root: set `user` in the daemon config to drop privileges after binding the socket"
        ),
        None => {}
    }
    let monitor = Monitor::new(MonitorOptions {
        config_dir: config_dir.clone(),
        overrides: Overrides::default(),
        keep_finished: 256,
        daemon: dcfg.clone(),
    });
    tracing::info!(
        socket = %path.display(),
        mode = format!("{mode:o}"),
        config_dir = ?config_dir,
        allow_uids = ?dcfg.allow_uids,
        allow_gids = ?dcfg.allow_gids,
        max_clients_per_uid = dcfg.max_clients_per_uid,
        max_store_per_uid = ?dcfg.max_store_per_uid_bytes,
        "uswap daemon listening"
    );
    let source: crate::ops::metrics::ReportSource = {
        let m = Arc::clone(&monitor);
        Arc::new(move || m.reports())
    };
    let _metrics = match &metrics_addr {
        Some(addr) => {
            let server = crate::ops::metrics::serve(addr, Arc::clone(&source))?;
            tracing::info!(%addr, "serving Prometheus metrics");
            Some(server)
        }
        None => None,
    };
    let _trace = match trace_file {
        Some(file) => Some(crate::ops::trace::start(
            file,
            Duration::from_millis(args.trace_interval_ms.max(10)),
            source,
        )?),
        None => None,
    };
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_stop as *const () as usize);
        libc::signal(libc::SIGINT, on_stop as *const () as usize);
    }
    let m = Arc::clone(&monitor);
    std::thread::spawn(move || {
        while STOP.load(Ordering::Relaxed) == 0 {
            std::thread::sleep(Duration::from_millis(100));
        }
        m.stop();
    });
    monitor.serve(&listener)?;
    if monitor.live_clients() > 0 {
        tracing::info!(
            clients = monitor.live_clients(),
            "stopping: handing every attached program its memory back"
        );
        let t0 = Instant::now();
        let (n, pages) = monitor.release_all();
        tracing::info!(
            clients = n,
            pages,
            secs = t0.elapsed().as_secs_f64(),
            "stopping: every attached program got its memory back and runs on unmanaged"
        );
        monitor.wait_idle(Duration::from_secs(5));
    }
    Ok(())
}
