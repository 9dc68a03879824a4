//! Tests of the config module: shipped files, layering, overrides, unit parsing and the
//! error messages (each must name the file, the key and the reason).

use super::*;
use std::fs;

/// The shipped config directory of this crate.
fn shipped_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/config"))
}

/// A temporary config directory holding the given files.
fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

/// The error message for a single file with `text`, named `foo.toml`.
fn error_for(text: &str) -> String {
    let dir = dir_with(&[("foo.toml", text)]);
    let err = validate_file(&dir.path().join("foo.toml")).unwrap_err();
    err.to_string()
}

#[test]
fn shipped_files_all_parse() {
    let mut count = 0;
    for entry in fs::read_dir(shipped_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            validate_file(&path).unwrap_or_else(|e| panic!("{e}"));
            count += 1;
        }
    }
    assert!(count >= 2, "expected default.toml and at least one example");
}

#[test]
fn shipped_default_toml_documents_every_key_and_matches_builtin_defaults() {
    let text = fs::read_to_string(shipped_dir().join("default.toml")).unwrap();
    for key in KEYS {
        let line = text
            .lines()
            .position(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("default.toml lacks key {key}"));
        let prev = text.lines().nth(line - 1).unwrap();
        assert!(prev.starts_with('#'), "key {key} has no comment above it");
    }
    let (cfg, used) = load_program_config(
        Some(&shipped_dir()),
        "nosuchprogram",
        None,
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(used, vec![shipped_dir().join("default.toml")]);
    assert_eq!(cfg, ProgramConfig::default());
}

#[test]
fn shipped_redis_example_is_picked_by_program_name() {
    let (cfg, used) = load_program_config(
        Some(&shipped_dir()),
        "redis-server",
        None,
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(used.len(), 2);
    assert_eq!(cfg.budget_bytes, Some(2 << 30));
    assert_eq!(cfg.batch_pages, 512);
}

#[test]
fn raw_struct_fields_match_keys() {
    let text: String = KEYS.iter().map(|k| format!("{k} = 1\n")).collect();
    let raw: RawConfig = toml::from_str(&text).unwrap();
    let names: Vec<_> = raw
        .into_fields()
        .iter()
        .filter(|(_, f)| f.is_some())
        .map(|(k, _)| *k)
        .collect();
    assert_eq!(names, KEYS);
}

#[test]
fn load_layers_in_order_default_then_program_then_overrides() {
    let dir = dir_with(&[
        (
            "default.toml",
            "budget = \"1G\"\ncooling = \"3s\"\ntick = \"50ms\"\n",
        ),
        ("app.toml", "budget = \"512M\"\ncooling = \"1s\"\n"),
    ]);
    let over = Overrides {
        cooling: Some(Duration::from_millis(700)),
        ..Default::default()
    };
    let (cfg, used) = load_program_config(Some(dir.path()), "app", None, &over).unwrap();
    assert_eq!(
        used,
        vec![dir.path().join("default.toml"), dir.path().join("app.toml")]
    );
    assert_eq!(cfg.budget_bytes, Some(512 << 20)); // app.toml over default.toml
    assert_eq!(cfg.tick, Duration::from_millis(50)); // only default.toml sets it
    assert_eq!(cfg.cooling, Duration::from_millis(700)); // override wins
    assert_eq!(cfg.batch_pages, 512); // built-in default
}

#[test]
fn load_overrides_win_and_none_clears_budget() {
    let dir = dir_with(&[("app.toml", "budget = \"1G\"\n")]);
    let mut over = Overrides::default();
    over.set_str("budget", "none").unwrap();
    over.set_str("batch_pages", "128").unwrap();
    let (cfg, _) = load_program_config(Some(dir.path()), "app", None, &over).unwrap();
    assert_eq!(cfg.budget_bytes, None);
    assert_eq!(cfg.batch_pages, 128);
}

#[test]
fn load_no_dir_gives_builtin_defaults() {
    let (cfg, used) = load_program_config(None, "app", None, &Overrides::default()).unwrap();
    assert!(used.is_empty());
    assert_eq!(cfg, ProgramConfig::default());
}

#[test]
fn load_explicit_file_replaces_program_lookup() {
    let dir = dir_with(&[
        ("default.toml", "tick = \"50ms\"\n"),
        ("app.toml", "budget = \"1G\"\n"),
        ("other.toml", "budget = \"2G\"\n"),
    ]);
    let other = dir.path().join("other.toml");
    let (cfg, used) =
        load_program_config(Some(dir.path()), "app", Some(&other), &Overrides::default()).unwrap();
    assert_eq!(used, vec![dir.path().join("default.toml"), other]);
    assert_eq!(cfg.budget_bytes, Some(2 << 30));
    assert_eq!(cfg.tick, Duration::from_millis(50));
}

#[test]
fn load_explicit_file_missing_is_error() {
    let dir = dir_with(&[]);
    let missing = dir.path().join("missing.toml");
    let err = load_program_config(
        Some(dir.path()),
        "app",
        Some(&missing),
        &Overrides::default(),
    )
    .unwrap_err();
    assert!(matches!(err, ConfigError::NotFound { .. }));
    assert!(err.to_string().contains("missing.toml"), "{err}");
}

#[test]
fn load_unsafe_program_names_not_looked_up() {
    let dir = dir_with(&[("default.toml", "tick = \"50ms\"\n")]);
    fs::create_dir(dir.path().join("sub")).unwrap();
    fs::write(dir.path().join("sub/x.toml"), "budget = \"1G\"\n").unwrap();
    fs::write(dir.path().join(".hidden.toml"), "budget = \"1G\"\n").unwrap();
    for name in [
        "sub/x",
        "../x",
        "..",
        ".hidden",
        "",
        "a b",
        "x\0y",
        "/etc/passwd",
    ] {
        let (cfg, used) =
            load_program_config(Some(dir.path()), name, None, &Overrides::default()).unwrap();
        assert_eq!(used.len(), 1, "{name:?}");
        assert_eq!(cfg.budget_bytes, None, "{name:?}");
    }
    assert_eq!(
        program_file_name("redis-server").as_deref(),
        Some("redis-server.toml")
    );
    assert_eq!(
        program_file_name("python3.12").as_deref(),
        Some("python3.12.toml")
    );
    assert_eq!(program_file_name("a..b"), None);
}

#[test]
fn load_program_named_default_applies_default_once() {
    let dir = dir_with(&[("default.toml", "tick = \"50ms\"\n")]);
    let (_, used) =
        load_program_config(Some(dir.path()), "default", None, &Overrides::default()).unwrap();
    assert_eq!(used.len(), 1);
}

#[test]
fn load_bad_program_file_error_names_it() {
    let dir = dir_with(&[("app.toml", "budget = \"12Q\"\n")]);
    let err =
        load_program_config(Some(dir.path()), "app", None, &Overrides::default()).unwrap_err();
    assert!(err.to_string().contains("app.toml"), "{err}");
}

#[test]
fn load_override_out_of_range_is_error() {
    let over = Overrides {
        batch_pages: Some(0),
        ..Default::default()
    };
    let err = load_program_config(None, "app", None, &over).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("\"batch_pages\"") && msg.contains("out of range"),
        "{msg}"
    );
}

#[test]
fn error_bad_size_names_file_key_reason() {
    let msg = error_for("tick = \"20ms\"\nbudget = \"12Q\"\n");
    assert!(
        msg.contains("foo.toml:2: key \"budget\": invalid size \"12Q\""),
        "{msg}"
    );
    assert!(
        msg.contains("expected a number with optional K/M/G/T suffix, e.g. 512M"),
        "{msg}"
    );
}

#[test]
fn error_bad_duration_names_file_key_reason() {
    let msg = error_for("cooling = \"2 fortnights\"\n");
    assert!(
        msg.contains("foo.toml:1: key \"cooling\": invalid duration"),
        "{msg}"
    );
    let msg = error_for("cooling = \"2\"\n");
    assert!(
        msg.contains("key \"cooling\"") && msg.contains("missing unit"),
        "{msg}"
    );
}

#[test]
fn error_out_of_range_integer_names_file_key_reason() {
    let msg = error_for("batch_pages = 5000\n");
    assert!(
        msg.contains("foo.toml:1: key \"batch_pages\": 5000 is out of range (allowed 1..=1024)"),
        "{msg}"
    );
    let msg = error_for("recompress = \"lz4hc:13\"\n");
    assert!(
        msg.contains("key \"recompress\": lz4hc level 13 is out of range (allowed 1..=12)"),
        "{msg}"
    );
    let msg = error_for("recompress = \"zstd:20\"\n");
    assert!(
        msg.contains("key \"recompress\": zstd level 20 is out of range (allowed 1..=19)"),
        "{msg}"
    );
    let msg = error_for("run_pages = -1\n");
    assert!(
        msg.contains("key \"run_pages\"") && msg.contains("out of range"),
        "{msg}"
    );
    let msg = error_for("window = \"512K\"\n");
    assert!(
        msg.contains("key \"window\"") && msg.contains("minimum 1M"),
        "{msg}"
    );
    let msg = error_for("tick = \"1m\"\n");
    assert!(
        msg.contains("key \"tick\"") && msg.contains("out of range"),
        "{msg}"
    );
}

#[test]
fn error_unknown_key_lists_known_keys() {
    let msg = error_for("budget = \"1G\"\nbugdet = \"1G\"\n");
    assert!(msg.contains("foo.toml:2: unknown key \"bugdet\""), "{msg}");
    assert!(msg.contains("known keys: budget, cooling, tick"), "{msg}");
    let msg = error_for("[policy]\nbudget = \"1G\"\n");
    assert!(msg.contains("unknown key \"policy\""), "{msg}");
}

#[test]
fn error_wrong_type_names_file_key_reason() {
    let msg = error_for("budget = true\n");
    assert!(
        msg.contains("key \"budget\": expected a size") && msg.contains("found boolean true"),
        "{msg}"
    );
    let msg = error_for("batch_pages = \"512\"\n");
    assert!(
        msg.contains("key \"batch_pages\": expected an integer, found string \"512\""),
        "{msg}"
    );
    let msg = error_for("cooling = 2\n");
    assert!(
        msg.contains("key \"cooling\": expected a duration string with a unit"),
        "{msg}"
    );
}

#[test]
fn error_syntax_names_file_and_line() {
    let msg = error_for("budget = \"1G\"\ntick = \n");
    assert!(
        msg.contains("foo.toml:2:") && msg.contains("TOML syntax error"),
        "{msg}"
    );
    let msg = error_for("budget = \"1G\"\nbudget = \"2G\"\n");
    assert!(
        msg.contains("foo.toml:2:") && msg.contains("TOML syntax error"),
        "{msg}"
    );
}

#[test]
fn parse_size_accepts_suffixes_fractions_and_bytes() {
    assert_eq!(parse_size("4096"), Ok(4096));
    assert_eq!(parse_size("64K"), Ok(64 << 10));
    assert_eq!(parse_size("512M"), Ok(512 << 20));
    assert_eq!(parse_size("512m"), Ok(512 << 20));
    assert_eq!(parse_size("1.5G"), Ok(3 << 29));
    assert_eq!(parse_size("2GiB"), Ok(2 << 30));
    assert_eq!(parse_size(" 1 T "), Ok(1 << 40));
    assert_eq!(parse_size(".5K"), Ok(512));
    for bad in [
        "",
        "12Q",
        "M",
        "1.2.3M",
        "-1",
        "0.1K",
        "99999999999999999999T",
        "1e3",
    ] {
        assert!(parse_size(bad).is_err(), "{bad:?}");
    }
    assert_eq!(parse_optional_size("none"), Ok(None));
    assert_eq!(parse_optional_size("1K"), Ok(Some(1024)));
}

#[test]
fn parse_duration_accepts_units_and_fractions() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
    assert_eq!(parse_duration("100us"), Ok(Duration::from_micros(100)));
    assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    assert_eq!(parse_duration("7ns"), Ok(Duration::from_nanos(7)));
    for bad in ["", "2", "s", "2 weeks", "1..2s", "-1s"] {
        assert!(parse_duration(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn format_round_trips_through_parse() {
    for b in [0u64, 1, 1536, 4096, 64 << 10, 512 << 20, 3 << 29, 5 << 40] {
        assert_eq!(parse_size(&format_size(b)), Ok(b), "{b}");
    }
    for d in [
        Duration::ZERO,
        Duration::from_nanos(7),
        Duration::from_micros(100),
        Duration::from_millis(1500),
        Duration::from_secs(7200),
    ] {
        assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{d:?}");
    }
}

#[test]
fn to_toml_loads_back_to_same_config() {
    let disk = tempfile::tempdir().unwrap();
    let cfg = ProgramConfig {
        budget_bytes: Some(3 << 29),
        max_store_bytes: Some(8 << 30),
        disk_dir: Some(disk.path().to_path_buf()),
        max_disk_bytes: Some(64 << 30),
        cooling: Duration::from_millis(1500),
        ..ProgramConfig::default()
    };
    let dir = dir_with(&[("x.toml", &cfg.to_toml())]);
    let (back, _) =
        load_program_config(Some(dir.path()), "x", None, &Overrides::default()).unwrap();
    assert_eq!(back, cfg);
}

#[test]
fn disk_dir_and_max_disk_parse_and_layer() {
    let disk = tempfile::tempdir().unwrap();
    let path = disk.path().display().to_string();
    let dir = dir_with(&[
        (
            "default.toml",
            &format!("disk_dir = \"{path}\"\nmax_disk = \"1G\"\nmax_store = \"64M\"\n"),
        ),
        ("nodisk.toml", "disk_dir = \"none\"\n"),
    ]);
    let (cfg, _) =
        load_program_config(Some(dir.path()), "app", None, &Overrides::default()).unwrap();
    assert_eq!(cfg.disk_dir.as_deref(), Some(disk.path()));
    assert_eq!(cfg.max_disk_bytes, Some(1 << 30));
    let (cfg, _) =
        load_program_config(Some(dir.path()), "nodisk", None, &Overrides::default()).unwrap();
    assert_eq!(cfg.disk_dir, None, "a program's file turns the tier off");
    let mut over = Overrides::default();
    over.set_str("disk_dir", "none").unwrap();
    over.set_str("max_disk", "none").unwrap();
    let (cfg, _) = load_program_config(Some(dir.path()), "app", None, &over).unwrap();
    assert_eq!((cfg.disk_dir, cfg.max_disk_bytes), (None, None));
    assert_eq!(ProgramConfig::default().disk_dir, None, "off by default");
}

#[test]
fn disk_dir_bad_values_name_the_key_and_the_reason() {
    let scratch = tempfile::tempdir().unwrap();
    let file = scratch.path().join("a-file");
    fs::write(&file, b"x").unwrap();
    let missing = scratch.path().join("no-such-dir");
    for (text, want) in [
        (
            format!("disk_dir = \"{}\"", missing.display()),
            "does not exist".to_string(),
        ),
        (
            format!("disk_dir = \"{}\"", file.display()),
            "is not a directory".to_string(),
        ),
        (
            "disk_dir = \"relative/dir\"".to_string(),
            "is not an absolute path".to_string(),
        ),
        (
            "disk_dir = 7".to_string(),
            "expected a directory path".to_string(),
        ),
        (
            "max_disk = \"64K\"".to_string(),
            "less than one disk chunk".to_string(),
        ),
        ("max_disk = \"12Q\"".to_string(), "12Q".to_string()),
    ] {
        let err = error_for(&text);
        let key = text.split(' ').next().unwrap();
        assert!(
            err.contains("foo.toml:1") && err.contains(&format!("key \"{key}\"")),
            "{err}"
        );
        assert!(err.contains(&want), "{text}: {err}");
    }
    // Overrides are checked the same way.
    let mut over = Overrides::default();
    let err = over
        .set_str("disk_dir", &missing.display().to_string())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("key \"disk_dir\"") && err.contains("does not exist"),
        "{err}"
    );
}

/// A directory the monitor cannot write to is refused (root writes anywhere: checked only
/// when the tests run as another user).
#[test]
fn disk_dir_not_writable_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let scratch = tempfile::tempdir().unwrap();
    let ro = scratch.path().join("ro");
    fs::create_dir(&ro).unwrap();
    fs::set_permissions(&ro, fs::Permissions::from_mode(0o500)).unwrap();
    let text = format!("disk_dir = \"{}\"", ro.display());
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let dir = dir_with(&[("foo.toml", &text)]);
        validate_file(&dir.path().join("foo.toml")).unwrap();
    } else {
        let err = error_for(&text);
        assert!(
            err.contains("key \"disk_dir\"") && err.contains("is not writable by the monitor"),
            "{err}"
        );
    }
    fs::set_permissions(&ro, fs::Permissions::from_mode(0o700)).unwrap();
}

#[test]
fn overrides_set_str_unknown_key_is_error() {
    let mut over = Overrides::default();
    let err = over.set_str("bugdet", "1G").unwrap_err();
    assert!(err.to_string().contains("unknown key \"bugdet\""), "{err}");
    let err = over.set_str("cooling", "fast").unwrap_err();
    assert!(err.to_string().contains("key \"cooling\""), "{err}");
}

// ---- daemon.toml ----

fn daemon_error_for(text: &str) -> String {
    parse_daemon(Path::new("/etc/uswap/daemon.toml"), text)
        .unwrap_err()
        .to_string()
}

#[test]
fn daemon_shipped_file_documents_every_key_and_matches_builtin_defaults() {
    let path = shipped_dir().join(DAEMON_FILE);
    let text = fs::read_to_string(&path).unwrap();
    for key in DAEMON_KEYS {
        let line = text
            .lines()
            .position(|l| {
                l.starts_with(&format!("{key} = ")) || l.starts_with(&format!("# {key} = "))
            })
            .unwrap_or_else(|| panic!("daemon.toml lacks key {key}"));
        let prev = text.lines().nth(line - 1).unwrap();
        assert!(prev.starts_with('#'), "key {key} has no comment above it");
    }
    assert_eq!(DaemonConfig::load(&path).unwrap(), DaemonConfig::default());
    // validate_file checks it as a daemon file (its keys are unknown to program configs).
    validate_file(&path).unwrap();
}

#[test]
fn daemon_keys_parse_to_their_values() {
    let cfg = parse_daemon(
        Path::new("d.toml"),
        "allow_uids = [1000, 0]\nallow_gids = [65534]\nsocket_mode = \"0660\"\nuser = \"nobody\"\n\
         max_store_per_uid = \"64M\"\nmax_clients_per_uid = 3\nagent_timeout = \"1s\"\n\
         compress_threads = 2\nrecompress_threads = 0\n",
    )
    .unwrap();
    assert_eq!(cfg.compress_threads, Some(2));
    assert_eq!(cfg.recompress_threads, 0);
    assert_eq!(cfg.allow_uids, vec![1000, 0]);
    assert_eq!(cfg.allow_gids, vec![65534]);
    assert_eq!(cfg.socket_mode, 0o660);
    assert_eq!(cfg.user.as_deref(), Some("nobody"));
    assert_eq!(cfg.max_store_per_uid_bytes, Some(64 << 20));
    assert_eq!(cfg.max_clients_per_uid, 3);
    assert_eq!(cfg.agent_timeout, Duration::from_secs(1));
}

#[test]
fn daemon_allow_list_by_uid_or_gid_and_empty_allows_all() {
    let open = DaemonConfig::default();
    assert!(open.allows(1234, 1234));
    let cfg = DaemonConfig {
        allow_uids: vec![1000],
        allow_gids: vec![50],
        ..DaemonConfig::default()
    };
    assert!(cfg.allows(1000, 1));
    assert!(cfg.allows(7, 50));
    assert!(!cfg.allows(0, 0));
    assert!(!cfg.allows(1001, 1001));
}

#[test]
fn daemon_unknown_key_is_named_with_the_daemon_keys() {
    let e = daemon_error_for("allow_uids = []\nallow_users = [\"bob\"]\n");
    assert!(e.contains("daemon.toml:2"), "{e}");
    assert!(e.contains("unknown key \"allow_users\""), "{e}");
    assert!(e.contains("max_clients_per_uid"), "{e}");
    // A program key is not a daemon key.
    let e = daemon_error_for("budget = \"1G\"\n");
    assert!(e.contains("unknown key \"budget\""), "{e}");
}

#[test]
fn daemon_bad_values_name_key_and_reason() {
    for (text, key, reason) in [
        ("socket_mode = \"0666\"", "socket_mode", "0600"),
        ("socket_mode = 600", "socket_mode", "integer"),
        ("allow_uids = 1000", "allow_uids", "array"),
        ("allow_uids = [-1]", "allow_uids", "out of range"),
        ("allow_gids = [\"wheel\"]", "allow_gids", "numeric"),
        ("user = \"../etc\"", "user", "not a user name"),
        ("user = 0", "user", "non-zero"),
        ("max_store_per_uid = \"12Q\"", "max_store_per_uid", "12Q"),
        ("max_store_per_uid = \"4K\"", "max_store_per_uid", "256K"),
        ("max_clients_per_uid = 0", "max_clients_per_uid", "1..=4096"),
        ("agent_timeout = \"1ms\"", "agent_timeout", "out of range"),
        ("compress_threads = 65", "compress_threads", "0..=64"),
        ("recompress_threads = 17", "recompress_threads", "0..=16"),
        (
            "recompress_threads = \"one\"",
            "recompress_threads",
            "expected an integer",
        ),
        ("compress_threads = \"many\"", "compress_threads", "auto"),
    ] {
        let e = daemon_error_for(text);
        assert!(
            e.contains(&format!("key \"{key}\"")) && e.contains(reason),
            "{text}: {e}"
        );
        assert!(e.contains("daemon.toml:1"), "{text}: {e}");
    }
}

#[test]
fn daemon_file_in_dir_is_not_a_program_config() {
    let dir = dir_with(&[("daemon.toml", "max_clients_per_uid = 2\n")]);
    // A program called "daemon" does not pick up the daemon's file.
    let (cfg, used) =
        load_program_config(Some(dir.path()), "daemon", None, &Overrides::default()).unwrap();
    assert!(used.is_empty(), "{used:?}");
    assert_eq!(cfg, ProgramConfig::default());
    let d = DaemonConfig::load_from_dir(Some(dir.path())).unwrap();
    assert_eq!(d.max_clients_per_uid, 2);
    let none = tempfile::tempdir().unwrap();
    assert_eq!(
        DaemonConfig::load_from_dir(Some(none.path())).unwrap(),
        DaemonConfig::default()
    );
}

// ---- policy keys (stall target, proactive reclaim, promotion SLO, cold age) ----

#[test]
fn policy_keys_parse_to_their_values() {
    let dir = dir_with(&[(
        "app.toml",
        "stall_target = \"25ms/s\"\nproactive_rate = \"16M/s\"\npromotion_slo = \"2.5%\"\nmax_cold_age = \"1m\"\n",
    )]);
    let (cfg, _) =
        load_program_config(Some(dir.path()), "app", None, &Overrides::default()).unwrap();
    assert_eq!(cfg.stall_target_per_sec, Duration::from_millis(25));
    assert_eq!(cfg.proactive_bytes_per_sec, 16 << 20);
    assert!((cfg.promotion_slo_per_min - 0.025).abs() < 1e-12);
    assert_eq!(cfg.max_cold_age, Duration::from_secs(60));
    // Plain forms: a duration without "/s", a float fraction, an integer.
    let dir = dir_with(&[(
        "app.toml",
        "stall_target = \"0s\"\npromotion_slo = 0.05\nproactive_rate = 4096\n",
    )]);
    let (cfg, _) =
        load_program_config(Some(dir.path()), "app", None, &Overrides::default()).unwrap();
    assert_eq!(cfg.stall_target_per_sec, Duration::ZERO);
    assert!((cfg.promotion_slo_per_min - 0.05).abs() < 1e-12);
    assert_eq!(cfg.proactive_bytes_per_sec, 4096);
    // Overrides as on a command line.
    let mut over = Overrides::default();
    over.set_str("promotion_slo", "0.2").unwrap();
    over.set_str("stall_target", "5ms").unwrap();
    let (cfg, _) = load_program_config(None, "app", None, &over).unwrap();
    assert!((cfg.promotion_slo_per_min - 0.2).abs() < 1e-12);
    assert_eq!(cfg.stall_target_per_sec, Duration::from_millis(5));
}

#[test]
fn policy_keys_bad_values_name_file_key_reason() {
    let msg = error_for("stall_target = \"11s\"\n");
    assert!(
        msg.contains("foo.toml:1: key \"stall_target\": 11s is out of range (allowed 0ns..=10s)"),
        "{msg}"
    );
    let msg = error_for("stall_target = 10\n");
    assert!(
        msg.contains("key \"stall_target\": expected a duration string with a unit"),
        "{msg}"
    );
    let msg = error_for("budget = \"1G\"\npromotion_slo = -0.1\n");
    assert!(
        msg.contains("foo.toml:2: key \"promotion_slo\": -0.1 is out of range (allowed 0..=100"),
        "{msg}"
    );
    let msg = error_for("promotion_slo = \"lots\"\n");
    assert!(
        msg.contains("key \"promotion_slo\": invalid fraction \"lots\""),
        "{msg}"
    );
    let msg = error_for("promotion_slo = \"20000%\"\n");
    assert!(
        msg.contains("key \"promotion_slo\"") && msg.contains("out of range"),
        "{msg}"
    );
    let msg = error_for("promotion_slo = true\n");
    assert!(
        msg.contains("key \"promotion_slo\": expected a fraction") && msg.contains("boolean true"),
        "{msg}"
    );
    let msg = error_for("promotion_slo = nan\n");
    assert!(
        msg.contains("key \"promotion_slo\"") && msg.contains("not a finite number"),
        "{msg}"
    );
    let msg = error_for("proactive_rate = \"fast\"\n");
    assert!(
        msg.contains("key \"proactive_rate\": invalid size \"fast\""),
        "{msg}"
    );
    let msg = error_for("max_cold_age = \"2d\"\n");
    assert!(
        msg.contains("key \"max_cold_age\": invalid duration"),
        "{msg}"
    );
    let msg = error_for("max_cold_age = \"25h\"\n");
    assert!(
        msg.contains("key \"max_cold_age\"") && msg.contains("out of range"),
        "{msg}"
    );
}

#[test]
fn policy_keys_bad_overrides_are_refused() {
    let over = Overrides {
        promotion_slo_per_min: Some(f64::INFINITY),
        ..Default::default()
    };
    let err = load_program_config(None, "app", None, &over).unwrap_err();
    assert!(err.to_string().contains("\"promotion_slo\""), "{err}");
    let over = Overrides {
        stall_target_per_sec: Some(Duration::from_secs(60)),
        ..Default::default()
    };
    let err = load_program_config(None, "app", None, &over).unwrap_err();
    assert!(
        err.to_string().contains("\"stall_target\"") && err.to_string().contains("out of range"),
        "{err}"
    );
    let mut over = Overrides::default();
    let err = over.set_str("promotion_slo", "-1").unwrap_err();
    assert!(err.to_string().contains("key \"promotion_slo\""), "{err}");
}

/// `throttle`: a duration up to 100 ms, "0s" turns it off; the default is 2 ms.
#[test]
fn throttle_parses_layers_and_refuses_out_of_range() {
    let (cfg, _) = load_program_config(None, "app", None, &Overrides::default()).unwrap();
    assert_eq!(cfg.throttle, Duration::from_millis(2));
    let dir = dir_with(&[("app.toml", "throttle = \"0s\"\n")]);
    let (cfg, _) =
        load_program_config(Some(dir.path()), "app", None, &Overrides::default()).unwrap();
    assert_eq!(cfg.throttle, Duration::ZERO);
    let mut over = Overrides::default();
    over.set_str("throttle", "20ms").unwrap();
    let (cfg, _) = load_program_config(Some(dir.path()), "app", None, &over).unwrap();
    assert_eq!(cfg.throttle, Duration::from_millis(20), "the override wins");
    let msg = error_for("throttle = \"1s\"\n");
    assert!(
        msg.contains("foo.toml:1: key \"throttle\": 1s is out of range (allowed 0ns..=100ms)"),
        "{msg}"
    );
    let msg = error_for("throttle = 2\n");
    assert!(
        msg.contains("key \"throttle\": expected a duration string with a unit"),
        "{msg}"
    );
    let err = over.set_str("throttle", "soon").unwrap_err();
    assert!(err.to_string().contains("key \"throttle\""), "{err}");
}

/// `recompress` takes a codec and an optional level; each bad form is named in the error.
#[test]
fn recompress_forms_and_refusals() {
    let mut over = Overrides::default();
    for (text, want) in [
        ("zstd", Recompress::Zstd(3)),
        ("zstd:19", Recompress::Zstd(19)),
        ("lz4hc", Recompress::Lz4hc(3)),
        ("lz4hc:12", Recompress::Lz4hc(12)),
        ("none", Recompress::Off),
        ("off", Recompress::Off),
    ] {
        over.set_str("recompress", text).unwrap();
        assert_eq!(over.recompress, Some(want), "{text}");
        // What the config renders loads back to the same value.
        assert_eq!(recompress_value(&Value::String(want.name())).unwrap(), want);
    }
    for (bad, says) in [
        ("zstd:0", "zstd level 0 is out of range (allowed 1..=19)"),
        ("gzip", "found \"gzip\""),
        ("zstd:", "found \"zstd:\""),
        ("none:3", "found \"none:3\""),
        ("3", "found integer"),
    ] {
        let msg = over.set_str("recompress", bad).unwrap_err().to_string();
        assert!(
            msg.contains("recompress") && msg.contains(says),
            "{bad}: {msg}"
        );
    }
    assert_eq!(ProgramConfig::default().recompress, Recompress::Zstd(3));
    // The key it replaced is named with its replacement, in a file and as an override.
    let msg = error_for("recompress_level = 9\n");
    assert!(
        msg.contains(
            "foo.toml:1: key \"recompress_level\" was replaced: write recompress = \"lz4hc:LEVEL\""
        ),
        "{msg}"
    );
    let msg = over
        .set_str("recompress_level", "9")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("was replaced: write recompress"), "{msg}");
}
