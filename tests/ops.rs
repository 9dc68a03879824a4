//! Operations tests: `uswap top`, the Prometheus endpoint, `--trace` + `uswap plot`, systemd
//! socket activation and the live progress line — each against a real daemon (or `uswap run`)
//! managing a real program under the shim, over real sockets.
//!
//! A custom harness (libtest-mimic), like `e2e.rs`: a test that cannot run here says why.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::Value;

type R = Result<(), Failed>;

fn uswap() -> &'static str {
    env!("CARGO_BIN_EXE_uswap")
}
fn workload() -> &'static str {
    env!("CARGO_BIN_EXE_uswap-workload")
}

/// Builds the shim with this test binary's profile (`USWAP_E2E_SHIM` names a prebuilt one).
fn shim() -> &'static Path {
    static SHIM: OnceLock<PathBuf> = OnceLock::new();
    SHIM.get_or_init(|| {
        if let Ok(p) = std::env::var("USWAP_E2E_SHIM") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("test exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>")
            .to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "uswap-shim", "--quiet"]).env(
            "CARGO_TARGET_DIR",
            profile_dir.parent().expect("target dir"),
        );
        if release {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().expect("cargo build").success(),
            "building the shim failed"
        );
        profile_dir.join("libuswap_shim.so")
    })
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("uswap-ops-{}-{}", tag, std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Daemon {
    child: Child,
    socket: PathBuf,
    dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signalling our own child, which has not been reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> R {
    let end = Instant::now() + timeout;
    while !ok() {
        if Instant::now() > end {
            return Err(format!("timed out waiting for {what}").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// `uswap daemon` on a private socket, with `extra` flags.
fn start_daemon(tag: &str, extra: &[&str]) -> Result<Daemon, Failed> {
    let dir = tmpdir(tag);
    let socket = dir.join("uswap.sock");
    let child = Command::new(uswap())
        .arg("daemon")
        .arg("--socket")
        .arg(&socket)
        .arg("--config-dir")
        .arg(&dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let d = Daemon { child, socket, dir };
    wait_for("the daemon's socket", Duration::from_secs(10), || {
        d.socket.exists()
    })?;
    Ok(d)
}

/// A managed program: `uswap-workload fill-verify` under the shim, attached to `socket`.
fn managed_workload(socket: &Path, mib: u32, idle_ms: u32) -> std::io::Result<Child> {
    managed_workload_args(
        socket,
        &[
            "fill-verify",
            "--mib",
            &mib.to_string(),
            "--idle-ms",
            &idle_ms.to_string(),
        ],
    )
}

fn managed_workload_args(socket: &Path, args: &[&str]) -> std::io::Result<Child> {
    Command::new(workload())
        .args(args)
        .env("LD_PRELOAD", shim())
        .env("USWAP_SOCKET", socket)
        .env(
            "USWAP_OVERRIDES",
            "budget = \"8M\"\ncooling = \"100ms\"\ntick = \"10ms\"",
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
}

fn finish(child: Child) -> R {
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.contains("RESULT ok") {
        return Err(format!(
            "the managed program failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(())
}

fn status_json(socket: &Path) -> Result<Vec<Value>, Failed> {
    let out = Command::new(uswap())
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .output()?;
    if !out.status.success() {
        return Err(format!("uswap status: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn client_of(socket: &Path, pid: u32) -> Result<Option<Value>, Failed> {
    Ok(status_json(socket)?
        .into_iter()
        .find(|c| c["pid"].as_u64() == Some(u64::from(pid))))
}

/// One HTTP/1.1 GET over `stream`: (status code, body).
fn http_get(mut stream: impl Read + Write, path: &str) -> Result<(u32, String), Failed> {
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end in {reply:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok((code, body.to_string()))
}

/// Parsed exposition: (metric name, labels, value) per sample; also checks that every
/// sample's family has HELP and TYPE lines before it.
type Sample = (String, Vec<(String, String)>, f64);

fn parse_exposition(text: &str) -> Result<Vec<Sample>, Failed> {
    let mut typed = std::collections::HashMap::new();
    let mut helped = std::collections::HashSet::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split(' ').next().unwrap_or("").to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (name, kind) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
            typed.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("bad sample line {line:?}"))?;
        let value: f64 = value
            .parse()
            .map_err(|_| format!("bad value in {line:?}"))?;
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels: Vec<(String, String)> = labels
            .split(',')
            .filter(|kv| !kv.is_empty())
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect();
        let family = ["_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| typed.get(*f).is_some_and(|k| k == "summary"))
            })
            .unwrap_or(name);
        if !typed.contains_key(family) || !helped.contains(family) {
            return Err(format!("{name} has no HELP/TYPE lines").into());
        }
        if typed[family] == "counter" && !family.ends_with("_total") {
            return Err(format!("counter {family} does not end in _total").into());
        }
        if !name.starts_with("uswap_") {
            return Err(format!("{name} lacks the uswap_ prefix").into());
        }
        out.push((name.to_string(), labels, value));
    }
    Ok(out)
}

/// The value of `name` for client `id` (and `extra` label, if given).
fn value_of(samples: &[Sample], name: &str, id: u64, extra: Option<(&str, &str)>) -> Option<f64> {
    samples
        .iter()
        .find(|(n, labels, _)| {
            n == name
                && labels
                    .iter()
                    .any(|(k, v)| k == "id" && *v == id.to_string())
                && extra.is_none_or(|(ek, ev)| labels.iter().any(|(k, v)| k == ek && v == ev))
        })
        .map(|s| s.2)
}

/// A metric, the value status --json implies, and an extra label to match.
type Check<'a> = (&'a str, f64, Option<(&'a str, &'a str)>);

fn free_port() -> Result<u16, Failed> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn metrics_endpoint_matches_status_json_for_a_managed_program() -> R {
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let d = start_daemon("metrics", &["--metrics", &addr])?;
    let scrape = |path: &str| -> Result<(u32, String), Failed> {
        http_get(std::net::TcpStream::connect(&addr)?, path)
    };
    wait_for("the metrics endpoint", Duration::from_secs(10), || {
        std::net::TcpStream::connect(&addr).is_ok()
    })?;
    let prog = managed_workload(&d.socket, 32, 2500)?;
    let pid = prog.id();
    // While it runs: the program is there, alive, with a resident size and a budget.
    let mut live = None;
    wait_for("the program to attach", Duration::from_secs(10), || {
        live = client_of(&d.socket, pid).ok().flatten();
        live.is_some()
    })?;
    let id = live
        .as_ref()
        .and_then(|c| c["id"].as_u64())
        .ok_or("no id")?;
    std::thread::sleep(Duration::from_millis(800));
    let (code, body) = scrape("/metrics")?;
    if code != 200 {
        return Err(format!("GET /metrics answered {code}: {body}").into());
    }
    let samples = parse_exposition(&body)?;
    let alive = value_of(&samples, "uswap_client_alive", id, None);
    let budget = value_of(&samples, "uswap_client_budget_bytes", id, None);
    let rss = value_of(&samples, "uswap_client_rss_anon_bytes", id, None).unwrap_or(0.0);
    if alive != Some(1.0) || budget != Some((8u64 << 20) as f64) || rss <= 0.0 {
        return Err(format!(
            "live figures wrong (alive {alive:?}, budget {budget:?}, rss {rss}):\n{body}"
        )
        .into());
    }
    let labels_ok = samples.iter().any(|(n, l, _)| {
        n == "uswap_client_faults_total"
            && l.iter().any(|(k, v)| k == "pid" && *v == pid.to_string())
            && l.iter().any(|(k, v)| k == "name" && v == "uswap-workload")
    });
    if !labels_ok {
        return Err(format!(
            "no faults_total sample labelled pid {pid} name uswap-workload:\n{body}"
        )
        .into());
    }
    finish(prog)?;
    // Once it has gone its figures are final: the scrape and status --json must agree exactly.
    let mut c = Value::Null;
    wait_for(
        "the daemon to see the exit",
        Duration::from_secs(10),
        || {
            c = client_of(&d.socket, pid)
                .ok()
                .flatten()
                .unwrap_or(Value::Null);
            c["alive"] == Value::Bool(false)
        },
    )?;
    let (_, body) = scrape("/metrics")?;
    let samples = parse_exposition(&body)?;
    let u = |k: &str| c[k].as_f64().unwrap_or(-1.0);
    let checks: Vec<Check> = vec![
        ("uswap_client_alive", 0.0, None),
        ("uswap_client_faults_total", u("faults"), None),
        ("uswap_client_faults_store_total", u("faults_store"), None),
        ("uswap_client_pages_evicted_total", u("pages_evicted"), None),
        (
            "uswap_client_evicted_bytes_total",
            u("pages_evicted") * 4096.0,
            None,
        ),
        (
            "uswap_client_pages_restored_total",
            u("pages_restored"),
            None,
        ),
        (
            "uswap_client_compressed_bytes_in_total",
            u("compressed_bytes_in"),
            None,
        ),
        (
            "uswap_client_compressed_bytes_out_total",
            u("compressed_bytes_out"),
            None,
        ),
        ("uswap_client_rss_anon_bytes", u("rss_anon_bytes"), None),
        (
            "uswap_client_peak_rss_anon_bytes",
            u("peak_rss_anon_bytes"),
            None,
        ),
        (
            "uswap_client_store_bytes",
            c["store"]["bytes_out"].as_f64().unwrap_or(-1.0),
            None,
        ),
        (
            "uswap_client_compression_ratio",
            u("compression_ratio"),
            None,
        ),
        (
            "uswap_client_fault_service_seconds_count",
            c["fault_latency"]["count"].as_f64().unwrap_or(-1.0),
            None,
        ),
        (
            "uswap_client_fault_service_seconds",
            c["fault_latency"]["p99_us"].as_f64().unwrap_or(-1.0) / 1e6,
            Some(("quantile", "0.99")),
        ),
    ];
    for (name, want, extra) in checks {
        let got = value_of(&samples, name, id, extra);
        let close = got.is_some_and(|g| (g - want).abs() <= 1e-9 * want.abs().max(1.0));
        if !close {
            return Err(format!("{name}: scraped {got:?}, status --json says {want}\n{c}").into());
        }
    }
    // Real work happened, so the equalities above mean something.
    if u("pages_evicted") < 2000.0 || u("faults") < 1.0 {
        return Err(format!("nothing was evicted, the comparison proves little: {c}").into());
    }
    if scrape("/nope")?.0 != 404 {
        return Err("GET /nope did not answer 404".into());
    }
    Ok(())
}

fn metrics_over_a_unix_socket_answer() -> R {
    let dir = tmpdir("metrics-unix");
    let msock = dir.join("metrics.sock");
    let d = start_daemon(
        "metrics-unix-d",
        &["--metrics", &format!("unix:{}", msock.display())],
    )?;
    wait_for("the metrics socket", Duration::from_secs(10), || {
        msock.exists()
    })?;
    let (code, body) = http_get(std::os::unix::net::UnixStream::connect(&msock)?, "/metrics")?;
    let samples = parse_exposition(&body)?;
    let attached = samples
        .iter()
        .find(|s| s.0 == "uswap_clients_attached")
        .map(|s| s.2);
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
    if code != 200 || attached != Some(0.0) {
        return Err(format!("unix metrics: {code} {attached:?}\n{body}").into());
    }
    Ok(())
}

fn metrics_on_a_public_address_is_refused_without_opt_in() -> R {
    let dir = tmpdir("metrics-public");
    let out = Command::new(uswap())
        .args(["daemon", "--metrics", "0.0.0.0:9464", "--socket"])
        .arg(dir.join("s.sock"))
        .output()?;
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(2) || !err.contains("--metrics-allow-remote") {
        return Err(format!("exit {:?}: {err}", out.status.code()).into());
    }
    Ok(())
}

fn top_once_shows_the_program_with_status_figures_and_a_fault_rate() -> R {
    let d = start_daemon("top", &[])?;
    // Random touches fault for a few seconds (a verify pass of a fill is over within one
    // second, which a rate over the last full second can miss).
    let prog = managed_workload_args(
        &d.socket,
        &[
            "bench",
            "--mib",
            "32",
            "--pattern",
            "random",
            "--touches",
            "200000",
            "--idle-ms",
            "1000",
        ],
    )?;
    let pid = prog.id();
    // Sample while it runs: the fault rate must show up (the verify pass faults pages back).
    let mut max_rate: f64 = 0.0;
    let mut frame = String::new();
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end {
        let out = Command::new(uswap())
            .args(["top", "--once", "--socket"])
            .arg(&d.socket)
            .output()?;
        if !out.status.success() {
            return Err(format!("top --once: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(row) = text
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(&pid.to_string()))
        {
            // ID PID NAME RSS BUDGET STORE RATIO FAULTS/s P99 FAULTS STATE
            let cols: Vec<&str> = row.split_whitespace().collect();
            if cols.len() != 11 || cols[2] != "uswap-workload" || cols[4] != "8.0" {
                return Err(format!("unexpected row {row:?} in\n{text}").into());
            }
            max_rate = max_rate.max(cols[7].parse().unwrap_or(0.0));
            frame = text;
        } else if !frame.is_empty() {
            break; // it has exited (top shows live programs only)
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    finish(prog)?;
    if frame.is_empty() || !frame.contains("FAULTS/s") {
        return Err(format!("top --once never showed the program:\n{frame}").into());
    }
    if max_rate <= 0.0 {
        return Err(format!("the fault rate never rose above 0:\n{frame}").into());
    }
    // status --json carries the same figures top shows, with the rate.
    let c = client_of(&d.socket, pid)?.ok_or("program missing from status --json")?;
    for k in [
        "rss_anon_bytes",
        "budget_bytes",
        "compression_ratio",
        "fault_rate_per_s",
        "faults",
    ] {
        if c.get(k).is_none() {
            return Err(format!("status --json lacks {k}: {c}").into());
        }
    }
    if c["store"]["bytes_out"].as_u64().is_none() || c["fault_latency"]["p99_us"].as_f64().is_none()
    {
        return Err(format!("status --json lacks the store size or p99: {c}").into());
    }
    // --all includes it once it has exited.
    let out = Command::new(uswap())
        .args(["top", "--once", "--all", "--socket"])
        .arg(&d.socket)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !text
        .lines()
        .any(|l| l.contains(&pid.to_string()) && l.ends_with("exited"))
    {
        return Err(format!("top --once --all does not show the exited program:\n{text}").into());
    }
    Ok(())
}

fn run_trace_is_monotone_and_plots_to_a_png() -> R {
    let dir = tmpdir("trace");
    let trace = dir.join("run.jsonl");
    let stats = dir.join("stats.json");
    let out = Command::new(uswap())
        .arg("run")
        .args([
            "--budget",
            "8M",
            "--set",
            "cooling=100ms",
            "--set",
            "tick=10ms",
            "--quiet",
        ])
        .arg("--trace")
        .arg(&trace)
        .args(["--trace-interval-ms", "100", "--stats-json"])
        .arg(&stats)
        .args([
            "--",
            workload(),
            "fill-verify",
            "--mib",
            "32",
            "--idle-ms",
            "1500",
        ])
        .env("USWAP_SHIM", shim())
        .env_remove("USWAP_SOCKET")
        .env("XDG_RUNTIME_DIR", &dir)
        .output()?;
    if !out.status.success() {
        return Err(format!("uswap run failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let final_faults = serde_json::from_slice::<Value>(&std::fs::read(&stats)?)?["clients"][0]
        ["faults"]
        .as_u64()
        .ok_or("no faults in --stats-json")?;
    let samples: Vec<Value> = std::fs::read_to_string(&trace)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    if samples.len() < 10 {
        return Err(format!(
            "only {} samples in a run of over 1.5 s at 100 ms",
            samples.len()
        )
        .into());
    }
    let mut last_t = -1.0;
    let mut last_faults = 0;
    let (mut max_rss, mut max_store) = (0, 0);
    for s in &samples {
        let t = s["t_s"].as_f64().ok_or("sample without t_s")?;
        if t <= last_t {
            return Err(format!("timestamps not increasing: {last_t} then {t}").into());
        }
        last_t = t;
        for c in s["clients"].as_array().ok_or("no clients array")? {
            let f = c["faults"].as_u64().ok_or("no faults")?;
            if f < last_faults {
                return Err(format!("fault count went down: {last_faults} then {f}").into());
            }
            last_faults = f;
            max_rss = max_rss.max(c["rss_anon_bytes"].as_u64().unwrap_or(0));
            max_store = max_store.max(c["store_bytes"].as_u64().unwrap_or(0));
        }
    }
    // 32 MiB of data through an 8 MiB budget: RSS between a few MiB and the data's size plus
    // slack; the store held a good part of it compressed, and less than the data.
    if !(2 << 20..=64 << 20).contains(&max_rss) || !(1 << 20..32 << 20).contains(&max_store) {
        return Err(
            format!("implausible figures: max RSS {max_rss}, max store {max_store}").into(),
        );
    }
    if last_faults != final_faults {
        return Err(format!(
            "the trace's last fault count {last_faults} is not the run's {final_faults}"
        )
        .into());
    }
    let png = dir.join("run.png");
    let out = Command::new(uswap())
        .arg("plot")
        .arg(&trace)
        .arg("-o")
        .arg(&png)
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "uswap plot failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let reader = png::Decoder::new(std::fs::File::open(&png)?).read_info()?;
    let (w, h) = (reader.info().width, reader.info().height);
    let _ = std::fs::remove_dir_all(&dir);
    if (w, h) != (1200, 900) {
        return Err(format!("PNG is {w}x{h}").into());
    }
    Ok(())
}

/// A listening AF_UNIX socket of `ty` bound at `path`.
fn listening_socket(path: &Path, ty: libc::c_int) -> Result<OwnedFd, Failed> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_UNIX, ty, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain old data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: a valid sockaddr_un of `len` bytes.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    } < 0
    {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: listen on our bound socket.
    if unsafe { libc::listen(fd.as_raw_fd(), 16) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(fd)
}

/// Starts `uswap daemon` the way systemd does: `fd` as descriptor 3, LISTEN_FDS=1 and
/// LISTEN_PID naming the daemon itself (a shell sets it to its own pid, then execs).
fn socket_activated_daemon(fd: &OwnedFd, dir: &Path) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    let raw = fd.as_raw_fd();
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" daemon --config-dir \"$1\"")
        .arg(uswap())
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: dup2 is async-signal-safe; it runs in the child between fork and exec, and makes
    // descriptor 3 the listening socket (dup2 clears close-on-exec on the copy).
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

fn socket_activated_daemon_serves_a_client_and_leaves_the_socket_file() -> R {
    let dir = tmpdir("activation");
    let sock = dir.join("activated.sock");
    let fd = listening_socket(&sock, libc::SOCK_SEQPACKET)?;
    let daemon = socket_activated_daemon(&fd, &dir)?;
    drop(fd); // the daemon holds the only copy now, as with systemd
              // The status query reaches it on the socket it never bound itself.
    let mut ok = false;
    wait_for(
        "the activated daemon to answer",
        Duration::from_secs(10),
        || {
            ok = status_json(&sock).is_ok();
            ok
        },
    )?;
    let prog = managed_workload(&sock, 32, 1500)?;
    let pid = prog.id();
    let result = finish(prog).and_then(|_| {
        let c = client_of(&sock, pid)?.ok_or("the program did not attach")?;
        if c["pages_evicted"].as_u64().unwrap_or(0) < 2000 {
            return Err(format!("the activated daemon did not manage the program: {c}").into());
        }
        Ok(())
    });
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let out = daemon.wait_with_output()?;
    result?;
    if !out.status.success() {
        return Err(format!(
            "daemon exit {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    // systemd owns the file: the daemon must not remove it.
    if !sock.exists() {
        return Err("the daemon removed the socket file systemd owns".into());
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn socket_activation_with_a_stream_socket_is_refused_naming_the_fix() -> R {
    let dir = tmpdir("activation-stream");
    let fd = listening_socket(&dir.join("s.sock"), libc::SOCK_STREAM)?;
    let daemon = socket_activated_daemon(&fd, &dir)?;
    drop(fd);
    let out = daemon.wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    if out.status.success() || !err.contains("ListenSequentialPacket") {
        return Err(format!("exit {:?}: {err}", out.status).into());
    }
    Ok(())
}

fn run_progress_line_only_on_a_terminal() -> R {
    let dir = tmpdir("progress");
    let args = [
        "run",
        "--budget",
        "8M",
        "--set",
        "cooling=100ms",
        "--set",
        "tick=10ms",
        "--",
    ];
    let prog = [
        workload(),
        "fill-verify",
        "--mib",
        "24",
        "--idle-ms",
        "1500",
    ];
    // Not a terminal: the summary, and no progress line.
    let out = Command::new(uswap())
        .args(args)
        .args(prog)
        .env("USWAP_SHIM", shim())
        .env_remove("USWAP_SOCKET")
        .env("XDG_RUNTIME_DIR", &dir)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success()
        || !err.contains("managed RSS")
        || err.contains("faults/s")
        || err.contains('\r')
    {
        return Err(
            format!("without a terminal stderr must hold only the summary:\n{err:?}").into(),
        );
    }
    // A terminal (script(1) gives the command a pseudo-terminal): the live line appears.
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped the terminal half: script(1) (util-linux) is not installed");
        return Ok(());
    }
    let line = std::iter::once(uswap())
        .chain(args)
        .chain(prog)
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new("script")
        .args(["-qefc", &line, "/dev/null"])
        .env("USWAP_SHIM", shim())
        .env_remove("USWAP_SOCKET")
        .env("XDG_RUNTIME_DIR", &dir)
        .stdin(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success()
        || !text.contains("uswap: uswap-workload")
        || !text.contains("faults/s")
    {
        return Err(format!("no progress line on a terminal:\n{text:?}").into());
    }
    Ok(())
}

fn listen_fds_meant_for_another_process_are_ignored() -> R {
    // LISTEN_PID names another process (the variables leaked into a child): the daemon must not
    // take descriptor 3, and binds its own socket instead.
    let dir = tmpdir("activation-other");
    let socket = dir.join("own.sock");
    let mut daemon = Command::new(uswap())
        .arg("daemon")
        .arg("--socket")
        .arg(&socket)
        .arg("--config-dir")
        .arg(&dir)
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let up = wait_for("the daemon's own socket", Duration::from_secs(10), || {
        status_json(&socket).is_ok()
    });
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let _ = daemon.wait();
    let _ = std::fs::remove_dir_all(&dir);
    up
}

fn top_interactive_draws_the_program_and_quits_on_q() -> R {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: script(1) (util-linux) is not installed to give top a terminal");
        return Ok(());
    }
    let d = start_daemon("top-tui", &[])?;
    let prog = managed_workload(&d.socket, 16, 4000)?;
    let pid = prog.id();
    wait_for("the program to attach", Duration::from_secs(10), || {
        client_of(&d.socket, pid).ok().flatten().is_some()
    })?;
    let line = format!(
        "stty cols 120 rows 12; '{}' top --interval-ms 200 --socket '{}'",
        uswap(),
        d.socket.display()
    );
    let mut script = Command::new("script")
        .args(["-qefc", &line, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(1500));
    let mut stdin = script.stdin.take().ok_or("no stdin")?;
    stdin.write_all(b"q")?;
    let quit = wait_for("top to quit on q", Duration::from_secs(5), || {
        matches!(script.try_wait(), Ok(Some(_)))
    });
    if quit.is_err() {
        let _ = script.kill();
    }
    drop(stdin);
    let out = script.wait_with_output()?;
    finish(prog)?;
    let text = String::from_utf8_lossy(&out.stdout);
    if quit.is_err() || !out.status.success() {
        return Err(format!("top did not quit on q: {:?}\n{text:?}", out.status).into());
    }
    // The table's header and the program's row were drawn, and the screen was restored.
    if !text.contains("FAULTS/s")
        || !text.contains(&pid.to_string())
        || !text.contains("\x1b[?1049l")
    {
        return Err(format!("top did not draw the program:\n{text:?}").into());
    }
    Ok(())
}

fn deploy_sample_config_and_systemd_units_are_valid() -> R {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The daemon validates every *.toml of its config directory before it listens.
    let dir = tmpdir("deploy");
    let socket = dir.join("s.sock");
    let mut daemon = Command::new(uswap())
        .arg("daemon")
        .arg("--socket")
        .arg(&socket)
        .arg("--config-dir")
        .arg(root.join("contrib/deploy/etc/uswap"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let up = wait_for(
        "the daemon to accept the sample config",
        Duration::from_secs(10),
        || socket.exists() || matches!(daemon.try_wait(), Ok(Some(_))),
    );
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let out = daemon.wait_with_output()?;
    let _ = std::fs::remove_dir_all(&dir);
    up?;
    if !out.status.success() {
        return Err(format!(
            "the daemon refused contrib/deploy/etc/uswap: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped the unit check: systemd-analyze is not installed");
        return Ok(());
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(root.join("contrib/systemd/uswap.socket"))
        .arg(root.join("contrib/systemd/uswap.service"))
        .output()?;
    // The units name the installed binary (/usr/local/bin/uswap), absent in a checkout.
    let complaints: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.contains("/usr/local/bin/uswap is not executable"))
        .map(String::from)
        .collect();
    if !complaints.is_empty() {
        return Err(format!("systemd-analyze verify:\n{}", complaints.join("\n")).into());
    }
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let tests = vec![
        Trial::test(
            "metrics_endpoint_matches_status_json_for_a_managed_program",
            metrics_endpoint_matches_status_json_for_a_managed_program,
        ),
        Trial::test(
            "metrics_over_a_unix_socket_answer",
            metrics_over_a_unix_socket_answer,
        ),
        Trial::test(
            "metrics_on_a_public_address_is_refused_without_opt_in",
            metrics_on_a_public_address_is_refused_without_opt_in,
        ),
        Trial::test(
            "top_once_shows_the_program_with_status_figures_and_a_fault_rate",
            top_once_shows_the_program_with_status_figures_and_a_fault_rate,
        ),
        Trial::test(
            "run_trace_is_monotone_and_plots_to_a_png",
            run_trace_is_monotone_and_plots_to_a_png,
        ),
        Trial::test(
            "socket_activated_daemon_serves_a_client_and_leaves_the_socket_file",
            socket_activated_daemon_serves_a_client_and_leaves_the_socket_file,
        ),
        Trial::test(
            "socket_activation_with_a_stream_socket_is_refused_naming_the_fix",
            socket_activation_with_a_stream_socket_is_refused_naming_the_fix,
        ),
        Trial::test(
            "listen_fds_meant_for_another_process_are_ignored",
            listen_fds_meant_for_another_process_are_ignored,
        ),
        Trial::test(
            "top_interactive_draws_the_program_and_quits_on_q",
            top_interactive_draws_the_program_and_quits_on_q,
        ),
        Trial::test(
            "deploy_sample_config_and_systemd_units_are_valid",
            deploy_sample_config_and_systemd_units_are_valid,
        ),
        Trial::test(
            "run_progress_line_only_on_a_terminal",
            run_progress_line_only_on_a_terminal,
        ),
    ];
    libtest_mimic::run(&args, tests).exit();
}
