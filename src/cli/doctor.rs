//! `uswap doctor`: checks what uswap needs on this machine and says what to change.

use std::path::PathBuf;

use crate::uffd::{probe_features, sys};

struct Check {
    ok: bool,
    what: String,
    fix: Option<String>,
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Returns the exit code: 0 when everything needed is there, 1 otherwise.
pub fn doctor(socket: Option<PathBuf>) -> anyhow::Result<i32> {
    let mut checks = Vec::new();
    // Kernel version: UFFDIO_MOVE arrived in 6.8.
    let release = read("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse::<u32>().ok());
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    checks.push(Check {
        ok: (major, minor) >= (6, 8),
        what: format!("kernel {release}"),
        fix: Some("UFFDIO_MOVE needs Linux 6.8 or later: upgrade the kernel".into()),
    });
    // The device and the sysctl.
    let dev = std::path::Path::new("/dev/userfaultfd");
    let dev_rw = {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dev.as_os_str().as_bytes()).expect("no NUL");
        // SAFETY: access(2) on a NUL-terminated path.
        unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::W_OK) == 0 }
    };
    let unpriv = read("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_else(|| "?".into());
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    checks.push(Check {
        ok: dev.exists() && (dev_rw || root),
        what: format!("/dev/userfaultfd {}", if !dev.exists() { "missing" } else if dev_rw { "read-write for this user" } else { "not accessible to this user" }),
        fix: Some(
            "programs run by non-root users need /dev/userfaultfd: e.g. `groupadd -r userfaultfd; chgrp userfaultfd /dev/userfaultfd; chmod 660 /dev/userfaultfd` (or a udev rule: KERNEL==\"userfaultfd\", GROUP=\"userfaultfd\", MODE=\"0660\") and add the users to that group".into(),
        ),
    });
    checks.push(Check {
        ok: true,
        what: format!("vm.unprivileged_userfaultfd = {unpriv} (uswap never relies on it: with 0 the device above is used)"),
        fix: None,
    });
    // Features.
    match probe_features() {
        Ok(f) => {
            let need = sys::UFFD_FEATURE_MOVE
                | sys::UFFD_FEATURE_EVENT_REMOVE
                | sys::UFFD_FEATURE_EVENT_UNMAP
                | sys::UFFD_FEATURE_EVENT_REMAP;
            checks.push(Check {
                ok: f & need == need,
                what: format!("userfaultfd features {f:#x} (MOVE {}, events {})", f & sys::UFFD_FEATURE_MOVE != 0, f & need == need),
                fix: Some("the kernel lacks UFFDIO_MOVE or the REMOVE/UNMAP/REMAP events: Linux 6.8 or later".into()),
            });
            checks.push(Check {
                ok: true,
                what: format!(
                    "backend: {}",
                    if f & sys::UFFD_FEATURE_MOVE_CROSS_MM != 0 {
                        "cross-mm (UFFD_FEATURE_MOVE_CROSS_MM present: the monitor moves pages itself; `backend = \"stock\"` selects the agent path)"
                    } else {
                        "stock (the shim's agent moves pages; no cross-mm patch)"
                    }
                ),
                fix: None,
            });
        }
        Err(e) => checks.push(Check {
            ok: false,
            what: format!("cannot create a userfaultfd: {e}"),
            fix: Some(
                "run as root, or give this user access to /dev/userfaultfd (see above)".into(),
            ),
        }),
    }
    // kcmp: the shim checks that the program has not closed and reused its descriptors.
    {
        // SAFETY: getpid has no preconditions; kcmp compares two of our own descriptors
        // (stdin with itself; any open descriptor would do).
        let rc = unsafe {
            let pid = libc::getpid();
            libc::syscall(libc::SYS_kcmp, pid, pid, 0 /* KCMP_FILE */, 0, 0)
        };
        let errno = std::io::Error::last_os_error().raw_os_error();
        let ok = rc == 0 || errno != Some(libc::ENOSYS);
        // Not fatal: uswap runs, with the weaker check.
        checks.push(Check {
            ok: true,
            what: if ok {
                "kcmp(2) available (the shim detects descriptors the program closed and reused)".into()
            } else {
                "kcmp(2) missing (kernel without CONFIG_KCMP): the shim checks its descriptors by inode only".into()
            },
            fix: None,
        });
    }
    // Shim.
    match super::run::find_shim() {
        Ok(p) => checks.push(Check {
            ok: true,
            what: format!("shim {}", p.display()),
            fix: None,
        }),
        Err(e) => checks.push(Check {
            ok: false,
            what: format!("{e:#}"),
            fix: Some("cargo build --release --workspace".into()),
        }),
    }
    // Socket.
    let path = socket.unwrap_or_else(crate::protocol::default_socket_path);
    let daemon = crate::monitor::connect(&path).is_ok();
    checks.push(Check {
        ok: true,
        what: format!(
            "daemon socket {}: {}",
            path.display(),
            if daemon {
                "a daemon answers"
            } else {
                "no daemon (uswap run starts its own monitor)"
            }
        ),
        fix: None,
    });
    // Config files.
    match super::default_config_dir() {
        Some(dir) => {
            let mut files = 0;
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for p in rd
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                {
                    files += 1;
                    if let Err(e) = crate::config::validate_file(&p) {
                        checks.push(Check {
                            ok: false,
                            what: format!("{e}"),
                            fix: Some(format!("edit {}", p.display())),
                        });
                    }
                }
            }
            checks.push(Check {
                ok: true,
                what: format!("config directory {} ({files} files checked)", dir.display()),
                fix: None,
            });
        }
        None => checks.push(Check {
            ok: true,
            what: "no config directory (/etc/uswap or ./config): built-in defaults".into(),
            fix: None,
        }),
    }
    // The disk tier writes and reads through io_uring (it falls back to pread/pwrite).
    {
        let disabled = read("/proc/sys/kernel/io_uring_disabled").unwrap_or_else(|| "?".into());
        let ring = io_uring::IoUring::new(2);
        checks.push(Check {
            ok: true,
            what: match ring {
                Ok(_) => format!(
                    "io_uring available (kernel.io_uring_disabled = {disabled}): the disk tier (disk_dir) batches its I/O"
                ),
                Err(e) => format!(
                    "io_uring unavailable ({e}; kernel.io_uring_disabled = {disabled}): a disk tier (disk_dir) would use pread/pwrite"
                ),
            },
            fix: None,
        });
    }
    let thp = read("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    checks.push(Check {
        ok: true,
        what: format!("transparent hugepages: {thp} (evicted ranges are managed in 4 KiB pages)"),
        fix: None,
    });

    let mut bad = 0;
    for c in &checks {
        println!("[{}] {}", if c.ok { " ok " } else { "FAIL" }, c.what);
        if !c.ok {
            bad += 1;
            if let Some(f) = &c.fix {
                println!("       fix: {f}");
            }
        }
    }
    println!(
        "{}",
        if bad == 0 {
            "uswap can run here.".to_string()
        } else {
            format!("{bad} problem(s) found.")
        }
    );
    Ok(if bad == 0 { 0 } else { 1 })
}
