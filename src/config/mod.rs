//! Per-program configuration: layered TOML files and their validation.
//!
//! Owns the keys a program (one client of the monitor) can be configured with, their defaults,
//! their ranges, and the error messages for bad files. Must not touch uffd, processes, sockets
//! or page state: the only I/O here is reading config files.
//!
//! # Layering
//!
//! Later layers win, key by key:
//! 1. the defaults built into [`ProgramConfig::default`];
//! 2. `default.toml` in the config directory, if present;
//! 3. `<name>.toml` in the config directory, if present, where `<name>` is the program name
//!    (basename of argv\[0\] / comm, or the `USWAP_APP` value the client sends) — or instead an
//!    explicit file (`uswap run --config FILE`), which must exist;
//! 4. command-line / client [`Overrides`].
//!
//! # File layout
//!
//! Flat: every key is a top-level `key = value` pair; there are no sections. Sizes are strings
//! with an optional binary suffix (`"512M"`, `"1.5G"`, `"4096"`) or integers (bytes);
//! durations are strings with a unit (`"500ms"`, `"2s"`, `"100us"`). The shipped
//! `config/default.toml` documents every key.
//!
//! # Errors
//!
//! Every [`ConfigError`] names the file, the key (when there is one) and the reason, e.g.
//! `config/foo.toml:3: key "budget": invalid size "12Q" (expected a number with optional
//! K/M/G/T suffix, e.g. 512M)`.

mod daemon;
mod units;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::{Spanned, Value};

pub use crate::store::Recompress;

pub use daemon::{parse_daemon, DaemonConfig, DAEMON_FILE, DAEMON_KEYS};
pub use units::{format_duration, format_size, parse_duration, parse_optional_size, parse_size};

/// Bytes in one page, as u64 for size arithmetic.
const PAGE_BYTES: u64 = crate::PAGE_SIZE as u64;

/// Every key a config file may contain, in documentation order.
pub const KEYS: &[&str] = &[
    "budget",
    "cooling",
    "tick",
    "max_evict_rate",
    "batch_pages",
    "run_pages",
    "window",
    "fill_ahead_pages",
    "prefetch_pages",
    "fault_spin",
    "throttle",
    "min_region",
    "max_store",
    "disk_dir",
    "max_disk",
    "recompress",
    "hot_ttl",
    "rescue_after",
    "backend",
    "move_in_decompressed",
    "stall_target",
    "proactive_rate",
    "promotion_slo",
    "max_cold_age",
];

/// Keys of earlier versions and what replaced them, so an old config file gets a precise
/// error instead of "unknown key".
pub const RENAMED_KEYS: &[(&str, &str)] = &[(
    "recompress_level",
    "recompress = \"lz4hc:LEVEL\" (the same encoder; \"none\" for level 0; or \"zstd:LEVEL\")",
)];

/// The error for `key` if it is one of [`RENAMED_KEYS`].
fn renamed_key_error(path: &Path, line: Option<usize>, key: &str) -> Option<ConfigError> {
    let (_, now) = RENAMED_KEYS.iter().find(|(k, _)| *k == key)?;
    Some(ConfigError::RenamedKey {
        path: path.to_path_buf(),
        line,
        key: key.to_string(),
        now,
    })
}

/// How pages leave and re-enter the program. Key `backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// `cross-mm` when the program's descriptor has `UFFD_FEATURE_MOVE_CROSS_MM` (the kernel
    /// patch in `src/kmod-patch/`), `stock` otherwise.
    Auto,
    /// The program's agent moves pages out into the shared window (any kernel with
    /// UFFDIO_MOVE); faults are served with UFFDIO_COPY.
    Stock,
    /// The monitor moves pages straight into its own memory and back (needs the kernel patch;
    /// a client without the feature falls back to `stock`, with a warning).
    CrossMm,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Stock => "stock",
            Backend::CrossMm => "cross-mm",
        }
    }
}

/// The settings of one program (one client of the monitor), fully resolved.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProgramConfig {
    /// Target for the program's managed resident anonymous memory (RssAnon); `None` = no
    /// limit, nothing is evicted. Key `budget`.
    pub budget_bytes: Option<u64>,
    /// A trial-evicted page not refaulted within this is compressed; one refaulted within it
    /// is hot. Key `cooling`.
    pub cooling: Duration,
    /// Policy period. Key `tick`.
    pub tick: Duration,
    /// Cap on eviction bandwidth. Key `max_evict_rate`.
    pub max_evict_bytes_per_sec: u64,
    /// How cold blobs are recompressed at idle time (a CPU nobody else wants): codec and
    /// level, or not at all. Key `recompress` (`"zstd:3"`, `"lz4hc:9"`, `"none"`).
    pub recompress: Recompress,
    /// Pages per agent batch. Key `batch_pages`.
    pub batch_pages: u32,
    /// Maximum pages per contiguous run (one ioctl). Key `run_pages`.
    pub run_pages: u32,
    /// Size of the staging window between agent and monitor. Key `window`.
    pub window_bytes: u64,
    /// Fresh (never evicted) faults are served with a zero-page run of up to this many pages.
    /// Key `fill_ahead_pages`.
    pub fill_ahead_pages: u32,
    /// Largest prefetch window: on a fault in evicted memory, up to this many evicted pages
    /// along the fault's detected stream (sequential, reverse or strided) come back with it;
    /// 0 = only the faulting page. Key `prefetch_pages`.
    pub prefetch_pages: u32,
    /// Longest spin of the fault thread for the next fault after serving one (adaptive
    /// below it); zero = never spin. Key `fault_spin`.
    pub fault_spin: Duration,
    /// Longest time a fault is held back while resident memory is well over the budget (an
    /// eighth of it and 32 MiB), so the program stops outrunning eviction; zero = never hold
    /// a fault back. Key `throttle`.
    pub throttle: Duration,
    /// Anonymous regions smaller than this are not managed. Key `min_region`.
    pub min_region_bytes: u64,
    /// Per-program store quota; `None` = no quota. Key `max_store`.
    pub max_store_bytes: Option<u64>,
    /// Directory of the disk tier: past a high-water mark of `max_store`, the coldest
    /// compressed pages go to an (unlinked) file there; `None` = no disk tier, `max_store` is
    /// a hard quota. Key `disk_dir`.
    pub disk_dir: Option<PathBuf>,
    /// Upper bound on the disk tier's file; `None` = none. Key `max_disk`.
    pub max_disk_bytes: Option<u64>,
    /// How long a refaulted page is skipped by the clock hand. Key `hot_ttl`.
    pub hot_ttl: Duration,
    /// How long a program whose monitor died waits for one to come back before its shim
    /// brings every page home itself. Key `rescue_after`.
    pub rescue_after: Duration,
    /// Key `backend`.
    pub backend: Backend,
    /// Cross-mm backend: move decompressed pages into the program instead of copying them.
    /// Key `move_in_decompressed`.
    pub move_in_decompressed: bool,
    /// Stall of the program's threads on uswap faults allowed per second of wall time, for
    /// proactive reclaim; zero = no stall feedback. Key `stall_target`.
    pub stall_target_per_sec: Duration,
    /// Proactive reclaim below the budget (or without one) at zero stall, bytes per second;
    /// 0 = off. Key `proactive_rate`.
    pub proactive_bytes_per_sec: u64,
    /// Promotion SLO: refaults per minute as a fraction of the evicted pages; 0 = off.
    /// Key `promotion_slo`.
    pub promotion_slo_per_min: f64,
    /// Ceiling of the cold age, which starts at `cooling` and rises while the promotion SLO
    /// is breached. Key `max_cold_age`.
    pub max_cold_age: Duration,
}

impl Default for ProgramConfig {
    fn default() -> Self {
        ProgramConfig {
            budget_bytes: None,
            cooling: Duration::from_secs(2),
            tick: Duration::from_millis(20),
            max_evict_bytes_per_sec: 1 << 30,
            batch_pages: 512,
            recompress: DEFAULT_RECOMPRESS,
            run_pages: 64,
            window_bytes: 16 << 20,
            fill_ahead_pages: 256,
            prefetch_pages: 16,
            fault_spin: DEFAULT_FAULT_SPIN,
            throttle: DEFAULT_THROTTLE,
            min_region_bytes: 256 << 10,
            max_store_bytes: None,
            disk_dir: None,
            max_disk_bytes: None,
            hot_ttl: Duration::from_secs(1),
            rescue_after: Duration::from_secs(5),
            backend: Backend::Auto,
            move_in_decompressed: false,
            stall_target_per_sec: Duration::from_millis(10),
            proactive_bytes_per_sec: 0,
            promotion_slo_per_min: 0.0,
            max_cold_age: Duration::from_secs(30),
        }
    }
}

impl ProgramConfig {
    /// Renders the configuration as a config file (every key, human units) that loads back to
    /// the same value. For `uswap doctor` / debugging output.
    pub fn to_toml(&self) -> String {
        let opt_size = |v: Option<u64>| match v {
            None => "none".to_string(),
            Some(b) => format_size(b),
        };
        let mut out = String::new();
        let mut line = |key: &str, value: String| {
            out.push_str(key);
            out.push_str(" = ");
            out.push_str(&value);
            out.push('\n');
        };
        line("budget", format!("\"{}\"", opt_size(self.budget_bytes)));
        line("cooling", format!("\"{}\"", format_duration(self.cooling)));
        line("tick", format!("\"{}\"", format_duration(self.tick)));
        line(
            "max_evict_rate",
            format!("\"{}\"", format_size(self.max_evict_bytes_per_sec)),
        );
        line("batch_pages", self.batch_pages.to_string());
        line("run_pages", self.run_pages.to_string());
        line("window", format!("\"{}\"", format_size(self.window_bytes)));
        line("fill_ahead_pages", self.fill_ahead_pages.to_string());
        line("prefetch_pages", self.prefetch_pages.to_string());
        line(
            "fault_spin",
            format!("\"{}\"", format_duration(self.fault_spin)),
        );
        line(
            "throttle",
            format!("\"{}\"", format_duration(self.throttle)),
        );
        line(
            "min_region",
            format!("\"{}\"", format_size(self.min_region_bytes)),
        );
        line(
            "max_store",
            format!("\"{}\"", opt_size(self.max_store_bytes)),
        );
        line(
            "disk_dir",
            match &self.disk_dir {
                None => "\"none\"".to_string(),
                Some(d) => Value::String(d.display().to_string()).to_string(),
            },
        );
        line("max_disk", format!("\"{}\"", opt_size(self.max_disk_bytes)));
        line("recompress", format!("\"{}\"", self.recompress.name()));
        line("hot_ttl", format!("\"{}\"", format_duration(self.hot_ttl)));
        line(
            "rescue_after",
            format!("\"{}\"", format_duration(self.rescue_after)),
        );
        line("backend", format!("\"{}\"", self.backend.name()));
        line(
            "move_in_decompressed",
            self.move_in_decompressed.to_string(),
        );
        line(
            "stall_target",
            format!("\"{}/s\"", format_duration(self.stall_target_per_sec)),
        );
        line(
            "proactive_rate",
            format!("\"{}\"", format_size(self.proactive_bytes_per_sec)),
        );
        line("promotion_slo", format!("{:?}", self.promotion_slo_per_min));
        line(
            "max_cold_age",
            format!("\"{}\"", format_duration(self.max_cold_age)),
        );
        out
    }
}

/// One layer of settings: every key optional. Used for command-line / client overrides, and
/// internally for each parsed file. `None` = this layer does not set the key.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Overrides {
    /// `Some(None)` = `"none"` (no limit).
    pub budget_bytes: Option<Option<u64>>,
    pub cooling: Option<Duration>,
    pub tick: Option<Duration>,
    pub max_evict_bytes_per_sec: Option<u64>,
    pub batch_pages: Option<u32>,
    pub run_pages: Option<u32>,
    pub window_bytes: Option<u64>,
    pub fill_ahead_pages: Option<u32>,
    pub prefetch_pages: Option<u32>,
    pub fault_spin: Option<Duration>,
    pub throttle: Option<Duration>,
    pub min_region_bytes: Option<u64>,
    /// `Some(None)` = `"none"` (no quota).
    pub max_store_bytes: Option<Option<u64>>,
    /// `Some(None)` = `"none"` (no disk tier).
    pub disk_dir: Option<Option<PathBuf>>,
    /// `Some(None)` = `"none"` (no bound).
    pub max_disk_bytes: Option<Option<u64>>,
    pub recompress: Option<Recompress>,
    pub hot_ttl: Option<Duration>,
    pub rescue_after: Option<Duration>,
    pub backend: Option<Backend>,
    pub move_in_decompressed: Option<bool>,
    pub stall_target_per_sec: Option<Duration>,
    pub proactive_bytes_per_sec: Option<u64>,
    pub promotion_slo_per_min: Option<f64>,
    pub max_cold_age: Option<Duration>,
}

impl Overrides {
    /// Sets `key` (a config-file key name, e.g. `"budget"`) from a string as it would be
    /// written on a command line (`--set budget=512M`) or sent by a client. A string that is a
    /// plain integer counts as a TOML integer, anything else as a TOML string.
    pub fn set_str(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let v = match value.trim().parse::<i64>() {
            Ok(n) => Value::Integer(n),
            Err(_) => Value::String(value.to_string()),
        };
        if let Some(e) = renamed_key_error(Path::new("<override>"), None, key) {
            return Err(e);
        }
        self.set_value(key, &v).map_err(|e| match e {
            KeyError::Unknown => ConfigError::UnknownKey {
                path: PathBuf::from("<override>"),
                line: None,
                key: key.to_string(),
                known: KEYS,
            },
            KeyError::Invalid(reason) => ConfigError::Override {
                key: key.to_string(),
                reason,
            },
        })
    }

    /// Sets one key from a TOML value, validating type and range. The single place where a
    /// key name meets its parser and its range.
    fn set_value(&mut self, key: &str, v: &Value) -> Result<(), KeyError> {
        match key {
            "budget" => self.budget_bytes = Some(check_budget(opt_size_value(v)?)?),
            "cooling" => self.cooling = Some(check_cooling(duration_value(v)?)?),
            "tick" => self.tick = Some(check_tick(duration_value(v)?)?),
            "max_evict_rate" => {
                self.max_evict_bytes_per_sec = Some(check_evict_rate(rate_value(v)?)?)
            }
            "batch_pages" => self.batch_pages = Some(check_batch_pages(u32_value(v)?)?),
            "run_pages" => self.run_pages = Some(check_run_pages(u32_value(v)?)?),
            "window" => self.window_bytes = Some(check_window(size_value(v)?)?),
            "fill_ahead_pages" => self.fill_ahead_pages = Some(check_fill_ahead(u32_value(v)?)?),
            "prefetch_pages" => self.prefetch_pages = Some(check_prefetch(u32_value(v)?)?),
            "fault_spin" => self.fault_spin = Some(check_fault_spin(duration_value(v)?)?),
            "throttle" => self.throttle = Some(check_throttle(duration_value(v)?)?),
            "min_region" => self.min_region_bytes = Some(size_value(v)?),
            "max_store" => self.max_store_bytes = Some(check_max_store(opt_size_value(v)?)?),
            "disk_dir" => self.disk_dir = Some(check_disk_dir(opt_path_value(v)?)?),
            "max_disk" => self.max_disk_bytes = Some(check_max_disk(opt_size_value(v)?)?),
            "recompress" => self.recompress = Some(recompress_value(v)?),
            "hot_ttl" => self.hot_ttl = Some(check_hot_ttl(duration_value(v)?)?),
            "rescue_after" => self.rescue_after = Some(check_rescue_after(duration_value(v)?)?),
            "backend" => self.backend = Some(backend_value(v)?),
            "move_in_decompressed" => self.move_in_decompressed = Some(bool_value(v)?),
            "stall_target" => {
                self.stall_target_per_sec = Some(check_stall_target(per_sec_duration_value(v)?)?)
            }
            "proactive_rate" => self.proactive_bytes_per_sec = Some(rate_value(v)?),
            "promotion_slo" => {
                self.promotion_slo_per_min = Some(check_promotion_slo(fraction_value(v)?)?)
            }
            "max_cold_age" => self.max_cold_age = Some(check_max_cold_age(duration_value(v)?)?),
            _ => return Err(KeyError::Unknown),
        }
        Ok(())
    }

    /// Checks the ranges of values set directly in the struct (not through [`Self::set_str`]).
    fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, reason: String| ConfigError::Override {
            key: key.to_string(),
            reason,
        };
        if let Some(v) = self.budget_bytes {
            check_budget(v).map_err(|r| err("budget", r.reason()))?;
        }
        if let Some(v) = self.cooling {
            check_cooling(v).map_err(|r| err("cooling", r.reason()))?;
        }
        if let Some(v) = self.tick {
            check_tick(v).map_err(|r| err("tick", r.reason()))?;
        }
        if let Some(v) = self.max_evict_bytes_per_sec {
            check_evict_rate(v).map_err(|r| err("max_evict_rate", r.reason()))?;
        }
        if let Some(v) = self.batch_pages {
            check_batch_pages(v).map_err(|r| err("batch_pages", r.reason()))?;
        }
        if let Some(v) = self.recompress {
            check_recompress(v).map_err(|r| err("recompress", r.reason()))?;
        }
        if let Some(v) = self.run_pages {
            check_run_pages(v).map_err(|r| err("run_pages", r.reason()))?;
        }
        if let Some(v) = self.window_bytes {
            check_window(v).map_err(|r| err("window", r.reason()))?;
        }
        if let Some(v) = self.fill_ahead_pages {
            check_fill_ahead(v).map_err(|r| err("fill_ahead_pages", r.reason()))?;
        }
        if let Some(v) = self.prefetch_pages {
            check_prefetch(v).map_err(|r| err("prefetch_pages", r.reason()))?;
        }
        if let Some(v) = self.fault_spin {
            check_fault_spin(v).map_err(|r| err("fault_spin", r.reason()))?;
        }
        if let Some(v) = self.throttle {
            check_throttle(v).map_err(|r| err("throttle", r.reason()))?;
        }
        if let Some(v) = self.max_store_bytes {
            check_max_store(v).map_err(|r| err("max_store", r.reason()))?;
        }
        if let Some(v) = &self.disk_dir {
            check_disk_dir(v.clone()).map_err(|r| err("disk_dir", r.reason()))?;
        }
        if let Some(v) = self.max_disk_bytes {
            check_max_disk(v).map_err(|r| err("max_disk", r.reason()))?;
        }
        if let Some(v) = self.hot_ttl {
            check_hot_ttl(v).map_err(|r| err("hot_ttl", r.reason()))?;
        }
        if let Some(v) = self.rescue_after {
            check_rescue_after(v).map_err(|r| err("rescue_after", r.reason()))?;
        }
        if let Some(v) = self.stall_target_per_sec {
            check_stall_target(v).map_err(|r| err("stall_target", r.reason()))?;
        }
        if let Some(v) = self.promotion_slo_per_min {
            check_promotion_slo(v).map_err(|r| err("promotion_slo", r.reason()))?;
        }
        if let Some(v) = self.max_cold_age {
            check_max_cold_age(v).map_err(|r| err("max_cold_age", r.reason()))?;
        }
        Ok(())
    }

    /// Overlays this layer on `cfg`: every key this layer sets replaces the value in `cfg`.
    pub fn apply_to(&self, cfg: &mut ProgramConfig) {
        fn put<T: Clone>(dst: &mut T, src: &Option<T>) {
            if let Some(v) = src {
                *dst = v.clone();
            }
        }
        put(&mut cfg.budget_bytes, &self.budget_bytes);
        put(&mut cfg.cooling, &self.cooling);
        put(&mut cfg.tick, &self.tick);
        put(
            &mut cfg.max_evict_bytes_per_sec,
            &self.max_evict_bytes_per_sec,
        );
        put(&mut cfg.batch_pages, &self.batch_pages);
        put(&mut cfg.run_pages, &self.run_pages);
        put(&mut cfg.window_bytes, &self.window_bytes);
        put(&mut cfg.fill_ahead_pages, &self.fill_ahead_pages);
        put(&mut cfg.prefetch_pages, &self.prefetch_pages);
        put(&mut cfg.fault_spin, &self.fault_spin);
        put(&mut cfg.throttle, &self.throttle);
        put(&mut cfg.min_region_bytes, &self.min_region_bytes);
        put(&mut cfg.max_store_bytes, &self.max_store_bytes);
        put(&mut cfg.disk_dir, &self.disk_dir);
        put(&mut cfg.max_disk_bytes, &self.max_disk_bytes);
        put(&mut cfg.recompress, &self.recompress);
        put(&mut cfg.hot_ttl, &self.hot_ttl);
        put(&mut cfg.rescue_after, &self.rescue_after);
        put(&mut cfg.backend, &self.backend);
        put(&mut cfg.move_in_decompressed, &self.move_in_decompressed);
        put(&mut cfg.stall_target_per_sec, &self.stall_target_per_sec);
        put(
            &mut cfg.proactive_bytes_per_sec,
            &self.proactive_bytes_per_sec,
        );
        put(&mut cfg.promotion_slo_per_min, &self.promotion_slo_per_min);
        put(&mut cfg.max_cold_age, &self.max_cold_age);
    }
}

/// A bad config file, a missing explicit file, or a bad override. `Display` always names the
/// file (or the override), the key when there is one, and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read.
    #[error("{}: cannot read config file: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// An explicitly named file (`--config FILE`) does not exist.
    #[error("{}: config file not found", path.display())]
    NotFound { path: PathBuf },
    /// The file is not valid TOML.
    #[error("{}:{line}:{column}: TOML syntax error: {reason}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        reason: String,
    },
    /// A key of an earlier version, replaced by another ([`RENAMED_KEYS`]).
    #[error("{}{}: key \"{key}\" was replaced: write {now}", path.display(), LineSuffix(*line))]
    RenamedKey {
        path: PathBuf,
        line: Option<usize>,
        key: String,
        now: &'static str,
    },
    /// A key that uswap does not know (a typo, or a section header).
    #[error(
        "{}{}: unknown key \"{key}\" (known keys: {})",
        path.display(),
        LineSuffix(*line),
        known.join(", ")
    )]
    UnknownKey {
        path: PathBuf,
        line: Option<usize>,
        key: String,
        /// The keys this kind of file knows ([`KEYS`] or [`DAEMON_KEYS`]).
        known: &'static [&'static str],
    },
    /// A known key with a value of the wrong type or out of range.
    #[error("{}{}: key \"{key}\": {reason}", path.display(), LineSuffix(*line))]
    InvalidValue {
        path: PathBuf,
        line: Option<usize>,
        key: String,
        reason: String,
    },
    /// A command-line / client override out of range.
    #[error("override of key \"{key}\": {reason}")]
    Override { key: String, reason: String },
}

/// Renders `:<line>` after a path when the line is known.
struct LineSuffix(Option<usize>);

impl fmt::Display for LineSuffix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(line) => write!(f, ":{line}"),
            None => Ok(()),
        }
    }
}

/// Why one key's value was refused.
#[derive(Debug)]
enum KeyError {
    Unknown,
    Invalid(String),
}

impl KeyError {
    fn reason(self) -> String {
        match self {
            KeyError::Unknown => "unknown key".to_string(),
            KeyError::Invalid(r) => r,
        }
    }
}

impl From<String> for KeyError {
    fn from(reason: String) -> Self {
        KeyError::Invalid(reason)
    }
}

/// The file as serde sees it: every key optional, unknown keys refused, values kept as raw
/// TOML with their position so each can be validated under its own key name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    budget: Option<Spanned<Value>>,
    cooling: Option<Spanned<Value>>,
    tick: Option<Spanned<Value>>,
    max_evict_rate: Option<Spanned<Value>>,
    batch_pages: Option<Spanned<Value>>,
    run_pages: Option<Spanned<Value>>,
    window: Option<Spanned<Value>>,
    fill_ahead_pages: Option<Spanned<Value>>,
    prefetch_pages: Option<Spanned<Value>>,
    fault_spin: Option<Spanned<Value>>,
    throttle: Option<Spanned<Value>>,
    min_region: Option<Spanned<Value>>,
    max_store: Option<Spanned<Value>>,
    disk_dir: Option<Spanned<Value>>,
    max_disk: Option<Spanned<Value>>,
    recompress: Option<Spanned<Value>>,
    hot_ttl: Option<Spanned<Value>>,
    rescue_after: Option<Spanned<Value>>,
    backend: Option<Spanned<Value>>,
    move_in_decompressed: Option<Spanned<Value>>,
    stall_target: Option<Spanned<Value>>,
    proactive_rate: Option<Spanned<Value>>,
    promotion_slo: Option<Spanned<Value>>,
    max_cold_age: Option<Spanned<Value>>,
}

impl RawConfig {
    /// The fields paired with their key names, in [`KEYS`] order.
    fn into_fields(self) -> [(&'static str, Option<Spanned<Value>>); 24] {
        [
            ("budget", self.budget),
            ("cooling", self.cooling),
            ("tick", self.tick),
            ("max_evict_rate", self.max_evict_rate),
            ("batch_pages", self.batch_pages),
            ("run_pages", self.run_pages),
            ("window", self.window),
            ("fill_ahead_pages", self.fill_ahead_pages),
            ("prefetch_pages", self.prefetch_pages),
            ("fault_spin", self.fault_spin),
            ("throttle", self.throttle),
            ("min_region", self.min_region),
            ("max_store", self.max_store),
            ("disk_dir", self.disk_dir),
            ("max_disk", self.max_disk),
            ("recompress", self.recompress),
            ("hot_ttl", self.hot_ttl),
            ("rescue_after", self.rescue_after),
            ("backend", self.backend),
            ("move_in_decompressed", self.move_in_decompressed),
            ("stall_target", self.stall_target),
            ("proactive_rate", self.proactive_rate),
            ("promotion_slo", self.promotion_slo),
            ("max_cold_age", self.max_cold_age),
        ]
    }
}

/// Loads the configuration of `program` (see the module doc for the layering).
///
/// `config_dir` is where `default.toml` and `<program>.toml` are looked up (none = built-in
/// defaults only, plus `explicit_file`). `explicit_file` replaces the `<program>.toml` lookup
/// and must exist. A program name that is not a safe file name (see [`program_file_name`]) is
/// simply not looked up. Returns the configuration and the files that were used, in order.
pub fn load_program_config(
    config_dir: Option<&Path>,
    program: &str,
    explicit_file: Option<&Path>,
    overrides: &Overrides,
) -> Result<(ProgramConfig, Vec<PathBuf>), ConfigError> {
    let mut cfg = ProgramConfig::default();
    let mut used = Vec::new();
    if let Some(dir) = config_dir {
        let path = dir.join("default.toml");
        if let Some(text) = read_if_present(&path)? {
            parse_layer(&path, &text)?.apply_to(&mut cfg);
            used.push(path);
        }
    }
    match (explicit_file, config_dir) {
        (Some(path), _) => {
            let text = read_if_present(path)?.ok_or_else(|| ConfigError::NotFound {
                path: path.to_path_buf(),
            })?;
            parse_layer(path, &text)?.apply_to(&mut cfg);
            used.push(path.to_path_buf());
        }
        (None, Some(dir)) => {
            // `default` is already layer 2; do not apply it twice. `daemon.toml` is the
            // daemon's own file, never a program's.
            if let Some(name) =
                program_file_name(program).filter(|n| n != "default.toml" && n != DAEMON_FILE)
            {
                let path = dir.join(name);
                if let Some(text) = read_if_present(&path)? {
                    parse_layer(&path, &text)?.apply_to(&mut cfg);
                    used.push(path);
                }
            }
        }
        (None, None) => {}
    }
    overrides.validate()?;
    overrides.apply_to(&mut cfg);
    Ok((cfg, used))
}

/// Parses and validates one file on its own (for tests and `uswap doctor`). A file named
/// `daemon.toml` is checked as the daemon's config ([`DaemonConfig`]), any other as a
/// program's.
pub fn validate_file(path: &Path) -> Result<(), ConfigError> {
    let text = read_if_present(path)?.ok_or_else(|| ConfigError::NotFound {
        path: path.to_path_buf(),
    })?;
    if path.file_name().is_some_and(|n| n == DAEMON_FILE) {
        return parse_daemon(path, &text).map(|_| ());
    }
    parse_layer(path, &text).map(|_| ())
}

/// The file name (`<name>.toml`) for a program name, or `None` if the name is not safe to
/// use as one: empty, longer than 200 bytes, containing `/` or `..`, starting with `.`, or
/// containing anything but `[A-Za-z0-9._-]`.
pub fn program_file_name(program: &str) -> Option<String> {
    let ok = !program.is_empty()
        && program.len() <= 200
        && !program.starts_with('.')
        && !program.contains("..")
        && program
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    ok.then(|| format!("{program}.toml"))
}

/// Reads a file; `Ok(None)` if it does not exist, an error if it exists but cannot be read.
fn read_if_present(path: &Path) -> Result<Option<String>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ConfigError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Parses one file's text into a layer, validating every key.
fn parse_layer(path: &Path, text: &str) -> Result<Overrides, ConfigError> {
    let syntax = |e: toml::de::Error| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        ConfigError::Syntax {
            path: path.to_path_buf(),
            line,
            column,
            reason: e.message().trim().to_string(),
        }
    };
    // First pass: syntax, and unknown keys with a message that lists the known ones.
    let table: toml::Table = toml::from_str(text).map_err(syntax)?;
    if let Some(key) = table.keys().find(|k| !KEYS.contains(&k.as_str())) {
        if let Some(e) = renamed_key_error(path, find_key_line(text, key), key) {
            return Err(e);
        }
        return Err(ConfigError::UnknownKey {
            path: path.to_path_buf(),
            line: find_key_line(text, key),
            key: key.clone(),
            known: KEYS,
        });
    }
    // Second pass: each known key under its own name, with its position.
    let raw: RawConfig = toml::from_str(text).map_err(syntax)?;
    let mut layer = Overrides::default();
    for (key, field) in raw.into_fields() {
        let Some(spanned) = field else { continue };
        let line = Some(line_col(text, spanned.span().start).0);
        layer
            .set_value(key, spanned.get_ref())
            .map_err(|e| ConfigError::InvalidValue {
                path: path.to_path_buf(),
                line,
                key: key.to_string(),
                reason: e.reason(),
            })?;
    }
    Ok(layer)
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// Best-effort line of `key = ...` (bare keys only); `None` if not found.
fn find_key_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            let l = l.strip_prefix('[').unwrap_or(l);
            l.strip_prefix(key)
                .is_some_and(|rest| rest.starts_with([' ', '\t', '=', ']']))
        })
        .map(|i| i + 1)
}

// ---- value parsers: TOML value -> typed value, reason on failure ----

fn type_name(v: &Value) -> String {
    match v {
        Value::String(s) => format!("string \"{s}\""),
        Value::Integer(i) => format!("integer {i}"),
        Value::Float(f) => format!("float {f}"),
        Value::Boolean(b) => format!("boolean {b}"),
        Value::Datetime(d) => format!("datetime {d}"),
        Value::Array(_) => "array".to_string(),
        Value::Table(_) => "table".to_string(),
    }
}

fn size_value(v: &Value) -> Result<u64, KeyError> {
    match v {
        Value::String(s) => Ok(parse_size(s)?),
        Value::Integer(i) => u64::try_from(*i)
            .map_err(|_| KeyError::Invalid(format!("size must not be negative, found {i}"))),
        other => Err(KeyError::Invalid(format!(
            "expected a size (a string like \"512M\" or an integer number of bytes), found {}",
            type_name(other)
        ))),
    }
}

fn opt_size_value(v: &Value) -> Result<Option<u64>, KeyError> {
    match v {
        Value::String(s) => Ok(parse_optional_size(s)?),
        Value::Integer(_) => size_value(v).map(Some),
        other => Err(KeyError::Invalid(format!(
            "expected a size (a string like \"512M\", an integer number of bytes, or \"none\"), found {}",
            type_name(other)
        ))),
    }
}

/// A size per second: a size, optionally followed by `/s`.
fn rate_value(v: &Value) -> Result<u64, KeyError> {
    match v {
        Value::String(s) => {
            let s = s.trim();
            Ok(parse_size(s.strip_suffix("/s").unwrap_or(s))?)
        }
        _ => size_value(v),
    }
}

fn duration_value(v: &Value) -> Result<Duration, KeyError> {
    match v {
        Value::String(s) => Ok(parse_duration(s)?),
        Value::Integer(i) => Err(KeyError::Invalid(format!(
            "expected a duration string with a unit, e.g. \"{i}ms\" or \"{i}s\", found integer {i}"
        ))),
        other => Err(KeyError::Invalid(format!(
            "expected a duration string with a unit, e.g. \"500ms\", found {}",
            type_name(other)
        ))),
    }
}

/// A duration per second of wall time: a duration, optionally followed by `/s`.
fn per_sec_duration_value(v: &Value) -> Result<Duration, KeyError> {
    match v {
        Value::String(s) => {
            let s = s.trim();
            Ok(parse_duration(s.strip_suffix("/s").unwrap_or(s))?)
        }
        _ => duration_value(v),
    }
}

/// A non-negative fraction: a float or integer (`0.05`), or a percentage string (`"5%"`).
fn fraction_value(v: &Value) -> Result<f64, KeyError> {
    let f = match v {
        Value::Float(f) => *f,
        Value::Integer(i) => *i as f64,
        Value::String(s) => {
            let t = s.trim();
            let (num, scale) = match t.strip_suffix('%') {
                Some(pct) => (pct.trim(), 100.0),
                None => (t, 1.0),
            };
            num.parse::<f64>().map_err(|_| {
                KeyError::Invalid(format!(
                    "invalid fraction \"{s}\" (expected e.g. 0.05 or \"5%\")"
                ))
            })? / scale
        }
        other => {
            return Err(KeyError::Invalid(format!(
                "expected a fraction (e.g. 0.05) or a percentage (e.g. \"5%\"), found {}",
                type_name(other)
            )))
        }
    };
    if f.is_finite() {
        Ok(f)
    } else {
        Err(KeyError::Invalid(format!("{f} is not a finite number")))
    }
}

/// A path, or `"none"` (or an empty string) for none.
fn opt_path_value(v: &Value) -> Result<Option<PathBuf>, KeyError> {
    match v {
        Value::String(s) if s.trim().is_empty() || s.trim() == "none" => Ok(None),
        Value::String(s) => Ok(Some(PathBuf::from(s))),
        other => Err(KeyError::Invalid(format!(
            "expected a directory path (a string like \"/var/lib/uswap\") or \"none\", found {}",
            type_name(other)
        ))),
    }
}

fn bool_value(v: &Value) -> Result<bool, KeyError> {
    match v {
        Value::Boolean(b) => Ok(*b),
        Value::String(s) if s == "true" || s == "false" => Ok(s == "true"),
        other => Err(KeyError::Invalid(format!(
            "expected true or false, found {}",
            type_name(other)
        ))),
    }
}

fn backend_value(v: &Value) -> Result<Backend, KeyError> {
    match v {
        Value::String(s) => match s.as_str() {
            "auto" => Ok(Backend::Auto),
            "stock" => Ok(Backend::Stock),
            "cross-mm" => Ok(Backend::CrossMm),
            other => Err(KeyError::Invalid(format!(
                "expected \"auto\", \"stock\" or \"cross-mm\", found \"{other}\""
            ))),
        },
        other => Err(KeyError::Invalid(format!(
            "expected \"auto\", \"stock\" or \"cross-mm\", found {}",
            type_name(other)
        ))),
    }
}

fn u32_value(v: &Value) -> Result<u32, KeyError> {
    match v {
        Value::Integer(i) => u32::try_from(*i)
            .map_err(|_| KeyError::Invalid(format!("{i} is out of range for a page count"))),
        other => Err(KeyError::Invalid(format!(
            "expected an integer, found {}",
            type_name(other)
        ))),
    }
}

// ---- ranges: one function per key, shared by files and overrides ----

fn in_range<T: PartialOrd + fmt::Display>(v: T, lo: T, hi: T) -> Result<T, KeyError> {
    if v < lo || v > hi {
        Err(KeyError::Invalid(format!(
            "{v} is out of range (allowed {lo}..={hi})"
        )))
    } else {
        Ok(v)
    }
}

fn duration_in_range(d: Duration, lo: Duration, hi: Duration) -> Result<Duration, KeyError> {
    if d < lo || d > hi {
        Err(KeyError::Invalid(format!(
            "{} is out of range (allowed {}..={})",
            format_duration(d),
            format_duration(lo),
            format_duration(hi)
        )))
    } else {
        Ok(d)
    }
}

fn check_budget(v: Option<u64>) -> Result<Option<u64>, KeyError> {
    match v {
        Some(b) if b < PAGE_BYTES => Err(KeyError::Invalid(format!(
            "budget {b} is less than one page ({PAGE_BYTES} bytes); use \"none\" for no limit"
        ))),
        _ => Ok(v),
    }
}

fn check_cooling(d: Duration) -> Result<Duration, KeyError> {
    duration_in_range(d, Duration::from_millis(1), Duration::from_secs(3600))
}

fn check_tick(d: Duration) -> Result<Duration, KeyError> {
    duration_in_range(d, Duration::from_millis(1), Duration::from_secs(10))
}

fn check_rescue_after(d: Duration) -> Result<Duration, KeyError> {
    duration_in_range(d, Duration::ZERO, Duration::from_secs(3600))
}

fn check_hot_ttl(d: Duration) -> Result<Duration, KeyError> {
    duration_in_range(d, Duration::ZERO, Duration::from_secs(24 * 3600))
}

fn check_stall_target(d: Duration) -> Result<Duration, KeyError> {
    duration_in_range(d, Duration::ZERO, Duration::from_secs(10))
}

/// Refaults per minute as a fraction of evicted pages: 0 (off) up to 100 (each evicted page
/// refaulted a hundred times a minute).
fn check_promotion_slo(v: f64) -> Result<f64, KeyError> {
    if !(0.0..=100.0).contains(&v) {
        Err(KeyError::Invalid(format!(
            "{v} is out of range (allowed 0..=100, a fraction of the evicted pages per minute; 0 = off)"
        )))
    } else {
        Ok(v)
    }
}

fn check_max_cold_age(d: Duration) -> Result<Duration, KeyError> {
    duration_in_range(d, Duration::ZERO, Duration::from_secs(24 * 3600))
}

fn check_evict_rate(v: u64) -> Result<u64, KeyError> {
    if v < PAGE_BYTES {
        Err(KeyError::Invalid(format!(
            "{v} bytes/s is less than one page per second ({PAGE_BYTES})"
        )))
    } else {
        Ok(v)
    }
}

/// At most one request descriptor of the shared window (`protocol::shm::MAX_BATCH_PAGES`).
fn check_batch_pages(v: u32) -> Result<u32, KeyError> {
    in_range(v, 1, crate::protocol::shm::MAX_BATCH_PAGES as u32)
}

/// Default idle-time recompression: zstd level 3 makes heap-like pages about 28 % smaller than
/// lz4 for ~17 µs of idle CPU per page; a recompressed page that faults back costs ~4 µs more
/// to decode. In `bench/run` it met every "bytes held at the end ≤ zram" target where lz4hc
/// level 3 (10 % smaller, decodes faster) missed redis's, for a slower random-touch phase
/// (BENCHMARKS.md, "zstd for cold blobs").
pub const DEFAULT_RECOMPRESS: Recompress = Recompress::Zstd(3);

const RECOMPRESS_FORMS: &str =
    "\"none\", \"zstd\", \"zstd:LEVEL\" (1..=19), \"lz4hc\" or \"lz4hc:LEVEL\" (1..=12)";

/// `"none"`, `"zstd[:LEVEL]"` or `"lz4hc[:LEVEL]"` (the level defaults to 3 for either).
fn recompress_value(v: &Value) -> Result<Recompress, KeyError> {
    let Value::String(s) = v else {
        return Err(KeyError::Invalid(format!(
            "expected {RECOMPRESS_FORMS}, found {}",
            type_name(v)
        )));
    };
    let bad = || KeyError::Invalid(format!("expected {RECOMPRESS_FORMS}, found \"{s}\""));
    let (codec, level) = match s.split_once(':') {
        Some((c, l)) => (c, Some(l.trim().parse::<u32>().map_err(|_| bad())?)),
        None => (s.as_str(), None),
    };
    let r = match codec.trim() {
        "none" | "off" if level.is_none() => Recompress::Off,
        "zstd" => Recompress::Zstd(level.unwrap_or(3)),
        "lz4hc" => Recompress::Lz4hc(level.unwrap_or(3)),
        _ => return Err(bad()),
    };
    check_recompress(r)
}

/// A level within its codec's range.
fn check_recompress(r: Recompress) -> Result<Recompress, KeyError> {
    let (codec, level, max) = match r {
        Recompress::Off => return Ok(r),
        Recompress::Zstd(l) => ("zstd", l, crate::store::ZSTD_LEVEL_MAX),
        Recompress::Lz4hc(l) => ("lz4hc", l, crate::store::LZ4HC_LEVEL_MAX),
    };
    in_range(level, 1, max)
        .map(|_| r)
        .map_err(|e| KeyError::Invalid(format!("{codec} level {}", e.reason())))
}

fn check_run_pages(v: u32) -> Result<u32, KeyError> {
    in_range(v, 1, 512)
}

fn check_fill_ahead(v: u32) -> Result<u32, KeyError> {
    in_range(v, 1, 16384)
}

fn check_prefetch(v: u32) -> Result<u32, KeyError> {
    in_range(v, 0, 4096)
}

/// Default of key `fault_spin`.
pub const DEFAULT_FAULT_SPIN: Duration = Duration::from_micros(200);

fn check_fault_spin(d: Duration) -> Result<Duration, KeyError> {
    duration_in_range(d, Duration::ZERO, Duration::from_millis(1))
}

/// Default of key `throttle`.
pub const DEFAULT_THROTTLE: Duration = Duration::from_millis(2);

fn check_throttle(d: Duration) -> Result<Duration, KeyError> {
    duration_in_range(d, Duration::ZERO, Duration::from_millis(100))
}

fn check_window(v: u64) -> Result<u64, KeyError> {
    if v < (1 << 20) {
        Err(KeyError::Invalid(format!(
            "window {} is smaller than the minimum 1M",
            format_size(v)
        )))
    } else if v % PAGE_BYTES != 0 {
        Err(KeyError::Invalid(format!(
            "window {v} is not a multiple of the page size ({PAGE_BYTES})"
        )))
    } else {
        Ok(v)
    }
}

fn check_max_store(v: Option<u64>) -> Result<Option<u64>, KeyError> {
    match v {
        Some(b) if b < PAGE_BYTES => Err(KeyError::Invalid(format!(
            "max_store {b} is less than one page ({PAGE_BYTES} bytes); use \"none\" for no quota"
        ))),
        _ => Ok(v),
    }
}

/// The disk tier's directory: an absolute path to an existing directory the monitor can
/// create files in (checked with `access(W_OK | X_OK)` as the process that parses the config:
/// the monitor).
fn check_disk_dir(v: Option<PathBuf>) -> Result<Option<PathBuf>, KeyError> {
    let Some(dir) = v else {
        return Ok(None);
    };
    let shown = dir.display();
    if !dir.is_absolute() {
        return Err(KeyError::Invalid(format!(
            "\"{shown}\" is not an absolute path"
        )));
    }
    match std::fs::metadata(&dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(KeyError::Invalid(format!(
                "directory \"{shown}\" does not exist"
            )))
        }
        Err(e) => {
            return Err(KeyError::Invalid(format!(
                "cannot look at \"{shown}\": {e}"
            )))
        }
        Ok(m) if !m.is_dir() => {
            return Err(KeyError::Invalid(format!("\"{shown}\" is not a directory")))
        }
        Ok(_) => {}
    }
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str()))
        .map_err(|_| KeyError::Invalid(format!("\"{shown}\" contains a NUL byte")))?;
    // SAFETY: access(2) with a NUL-terminated path; it only checks permissions.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        let e = io::Error::last_os_error();
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        return Err(KeyError::Invalid(format!(
            "directory \"{shown}\" is not writable by the monitor (uid {uid}): {e}"
        )));
    }
    Ok(Some(dir))
}

fn check_max_disk(v: Option<u64>) -> Result<Option<u64>, KeyError> {
    let chunk = crate::protocol::store_layout::CHUNK_BYTES as u64;
    match v {
        Some(b) if b < chunk => Err(KeyError::Invalid(format!(
            "max_disk {b} is less than one disk chunk ({}); use \"none\" for no bound",
            format_size(chunk)
        ))),
        _ => Ok(v),
    }
}
