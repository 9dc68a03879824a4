//! The daemon's own configuration (`daemon.toml`): who may connect, how the socket is created,
//! which user the daemon drops to, and the limits it puts on each user.
//!
//! Not a program config: these keys concern the monitor process and every client together,
//! so they are never layered with `default.toml` or overridden by a client. The file is
//! `<config dir>/daemon.toml` (or `uswap daemon --daemon-config FILE`); without one, the
//! built-in defaults of [`DaemonConfig::default`] apply. Same rules as program files: flat
//! `key = value`, unknown keys are errors, and every error names the file, the key and the
//! reason. Must not: touch sockets, users or processes (the daemon applies the values).

use std::path::Path;
use std::time::Duration;

use toml::Value;

use super::{
    duration_in_range, duration_value, find_key_line, line_col, opt_size_value, read_if_present,
    type_name, ConfigError, KeyError, PAGE_BYTES,
};

/// The file name of the daemon config inside a config directory.
pub const DAEMON_FILE: &str = "daemon.toml";

/// Every key `daemon.toml` may contain, in documentation order.
pub const DAEMON_KEYS: &[&str] = &[
    "allow_uids",
    "allow_gids",
    "socket_mode",
    "user",
    "max_store_per_uid",
    "max_clients_per_uid",
    "agent_timeout",
    "compress_threads",
    "recompress_threads",
];

/// The daemon's settings, fully resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// Peers (by SO_PEERCRED uid) allowed to attach. Key `allow_uids`. When both this and
    /// `allow_gids` are empty, any peer that can open the socket is allowed (the socket's mode
    /// is then the only gate).
    pub allow_uids: Vec<u32>,
    /// Peers whose SO_PEERCRED (primary) gid is listed are allowed too. Key `allow_gids`.
    pub allow_gids: Vec<u32>,
    /// Mode of the socket file: 0o600 (only the daemon's user) or 0o660 (also its group).
    /// Key `socket_mode`.
    pub socket_mode: u32,
    /// When started as root, the user (name or numeric uid) the daemon becomes after binding
    /// its socket: supplementary groups dropped, gid and uid set, no capability left.
    /// Key `user`; `None` = stay as started.
    pub user: Option<String>,
    /// Store quota shared by all clients of one uid; `None` = none. Key `max_store_per_uid`.
    pub max_store_per_uid_bytes: Option<u64>,
    /// Clients attached at once per uid; one more is refused. Key `max_clients_per_uid`.
    pub max_clients_per_uid: u32,
    /// How long a posted eviction batch may stay unanswered by the client's agent before the
    /// monitor stops evicting from that client (it resumes once the agent answers).
    /// Key `agent_timeout`.
    pub agent_timeout: Duration,
    /// Compression workers shared by every program (0: each program's control thread
    /// compresses alone). Key `compress_threads`; `None` ("auto") = none on one or two CPUs,
    /// else one per CPU beyond the first, at most 4.
    pub compress_threads: Option<usize>,
    /// Idle-priority threads that recompress cold blobs for every program (programs choose
    /// the codec and level, `recompress`); 0 = none. Key `recompress_threads`.
    pub recompress_threads: usize,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
            socket_mode: 0o600,
            user: None,
            max_store_per_uid_bytes: None,
            max_clients_per_uid: 64,
            agent_timeout: Duration::from_secs(5),
            compress_threads: None,
            recompress_threads: 1,
        }
    }
}

impl DaemonConfig {
    /// Whether a peer with these (kernel-reported) credentials may attach.
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        (self.allow_uids.is_empty() && self.allow_gids.is_empty())
            || self.allow_uids.contains(&uid)
            || self.allow_gids.contains(&gid)
    }

    /// Loads `path`, which must exist.
    pub fn load(path: &Path) -> Result<DaemonConfig, ConfigError> {
        let text = read_if_present(path)?.ok_or_else(|| ConfigError::NotFound {
            path: path.to_path_buf(),
        })?;
        parse_daemon(path, &text)
    }

    /// `<dir>/daemon.toml` if it exists, else the built-in defaults.
    pub fn load_from_dir(dir: Option<&Path>) -> Result<DaemonConfig, ConfigError> {
        let Some(dir) = dir else {
            return Ok(DaemonConfig::default());
        };
        let path = dir.join(DAEMON_FILE);
        match read_if_present(&path)? {
            Some(text) => parse_daemon(&path, &text),
            None => Ok(DaemonConfig::default()),
        }
    }
}

/// Parses and validates the text of a daemon config file.
pub fn parse_daemon(path: &Path, text: &str) -> Result<DaemonConfig, ConfigError> {
    let table: toml::Table = toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        ConfigError::Syntax {
            path: path.to_path_buf(),
            line,
            column,
            reason: e.message().trim().to_string(),
        }
    })?;
    let mut cfg = DaemonConfig::default();
    // Keys in file order, so the first bad one is reported.
    let mut keys: Vec<(&String, &Value)> = table.iter().collect();
    keys.sort_by_key(|(k, _)| find_key_line(text, k).unwrap_or(usize::MAX));
    for (key, value) in keys {
        let line = find_key_line(text, key);
        if !DAEMON_KEYS.contains(&key.as_str()) {
            return Err(ConfigError::UnknownKey {
                path: path.to_path_buf(),
                line,
                key: key.clone(),
                known: DAEMON_KEYS,
            });
        }
        set_daemon_key(&mut cfg, key, value).map_err(|e| ConfigError::InvalidValue {
            path: path.to_path_buf(),
            line,
            key: key.clone(),
            reason: e.reason(),
        })?;
    }
    Ok(cfg)
}

fn set_daemon_key(cfg: &mut DaemonConfig, key: &str, v: &Value) -> Result<(), KeyError> {
    match key {
        "allow_uids" => cfg.allow_uids = id_list(v)?,
        "allow_gids" => cfg.allow_gids = id_list(v)?,
        "socket_mode" => cfg.socket_mode = socket_mode(v)?,
        "user" => cfg.user = user_value(v)?,
        "max_store_per_uid" => {
            cfg.max_store_per_uid_bytes = match opt_size_value(v)? {
                Some(b) if b < 64 * PAGE_BYTES => {
                    return Err(KeyError::Invalid(format!(
                        "{b} bytes is less than 256K; use \"none\" for no quota"
                    )))
                }
                other => other,
            }
        }
        "max_clients_per_uid" => {
            cfg.max_clients_per_uid = match v {
                Value::Integer(i) if (1..=4096).contains(i) => *i as u32,
                Value::Integer(i) => {
                    return Err(KeyError::Invalid(format!(
                        "{i} is out of range (allowed 1..=4096)"
                    )))
                }
                other => {
                    return Err(KeyError::Invalid(format!(
                        "expected an integer, found {}",
                        type_name(other)
                    )))
                }
            }
        }
        "compress_threads" => {
            cfg.compress_threads = match v {
                Value::String(s) if s == "auto" => None,
                Value::Integer(i) if (0..=64).contains(i) => Some(*i as usize),
                Value::Integer(i) => {
                    return Err(KeyError::Invalid(format!(
                        "{i} is out of range (allowed 0..=64, or \"auto\")"
                    )))
                }
                other => {
                    return Err(KeyError::Invalid(format!(
                        "expected an integer 0..=64 or \"auto\", found {}",
                        type_name(other)
                    )))
                }
            }
        }
        "recompress_threads" => {
            cfg.recompress_threads = match v {
                Value::Integer(i) if (0..=16).contains(i) => *i as usize,
                Value::Integer(i) => {
                    return Err(KeyError::Invalid(format!(
                        "{i} is out of range (allowed 0..=16)"
                    )))
                }
                other => {
                    return Err(KeyError::Invalid(format!(
                        "expected an integer, found {}",
                        type_name(other)
                    )))
                }
            }
        }
        "agent_timeout" => {
            cfg.agent_timeout = duration_in_range(
                duration_value(v)?,
                Duration::from_millis(100),
                Duration::from_secs(600),
            )?
        }
        _ => return Err(KeyError::Unknown),
    }
    Ok(())
}

fn id_list(v: &Value) -> Result<Vec<u32>, KeyError> {
    let Value::Array(items) = v else {
        return Err(KeyError::Invalid(format!(
            "expected an array of numeric ids, e.g. [1000, 1001], found {}",
            type_name(v)
        )));
    };
    items
        .iter()
        .map(|item| match item {
            // u32::MAX is (uid_t)-1, "no id" to the kernel.
            Value::Integer(i) if (0..u32::MAX as i64).contains(i) => Ok(*i as u32),
            Value::Integer(i) => Err(KeyError::Invalid(format!(
                "id {i} is out of range (allowed 0..=4294967294)"
            ))),
            other => Err(KeyError::Invalid(format!(
                "expected numeric ids, found {}",
                type_name(other)
            ))),
        })
        .collect()
}

fn socket_mode(v: &Value) -> Result<u32, KeyError> {
    match v {
        Value::String(s) => match s.trim_start_matches("0o") {
            "0600" | "600" => Ok(0o600),
            "0660" | "660" => Ok(0o660),
            other => Err(KeyError::Invalid(format!(
                "expected \"0600\" (the daemon's user only) or \"0660\" (also its group), found \"{other}\""
            ))),
        },
        other => Err(KeyError::Invalid(format!(
            "expected the string \"0600\" or \"0660\", found {}",
            type_name(other)
        ))),
    }
}

fn user_value(v: &Value) -> Result<Option<String>, KeyError> {
    match v {
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s)
            if s.len() <= 32
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')) =>
        {
            Ok(Some(s.clone()))
        }
        Value::String(s) => Err(KeyError::Invalid(format!(
            "\"{s}\" is not a user name or numeric uid"
        ))),
        Value::Integer(i) if (1..u32::MAX as i64).contains(i) => Ok(Some(i.to_string())),
        other => Err(KeyError::Invalid(format!(
            "expected a user name or a non-zero numeric uid, found {}",
            type_name(other)
        ))),
    }
}
