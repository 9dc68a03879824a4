//! Dropping root: the daemon, started as root to bind a socket under `/run`, becomes the
//! configured unprivileged user (daemon config `user`) before it accepts anyone.
//!
//! Order: supplementary groups, then gid, then uid (after `setuid` nothing else could be
//! changed), then `no_new_privs`; then it checks that no capability is left and that root
//! cannot be regained. Owns: the credential syscalls. Must not: touch sockets or clients.

use nix::unistd::{Gid, Uid, User};

/// A user to become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum PrivError {
    #[error("user \"{0}\" does not exist")]
    NoSuchUser(String),
    #[error("looking up user \"{name}\": {source}")]
    Lookup { name: String, source: nix::Error },
    #[error("user \"{0}\" is root: dropping privileges to it would drop nothing")]
    Root(String),
    #[error("{call}: {source}")]
    Call {
        call: &'static str,
        source: nix::Error,
    },
    #[error("after dropping to uid {uid}: {what}")]
    Residual { uid: u32, what: String },
}

/// Resolves a user name or a numeric uid (which must exist in the user database, for its gid).
pub fn resolve_user(name: &str) -> Result<Target, PrivError> {
    let lookup = |r: nix::Result<Option<User>>| {
        r.map_err(|source| PrivError::Lookup {
            name: name.to_string(),
            source,
        })
    };
    let user = match name.parse::<u32>() {
        Ok(uid) => lookup(User::from_uid(Uid::from_raw(uid)))?,
        Err(_) => lookup(User::from_name(name))?,
    }
    .ok_or_else(|| PrivError::NoSuchUser(name.to_string()))?;
    if user.uid.is_root() {
        return Err(PrivError::Root(name.to_string()));
    }
    Ok(Target {
        name: user.name,
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    })
}

/// Capability sets of this process from `/proc/self/status` (permitted, effective, inheritable,
/// ambient, as hex masks), or `None` if unreadable.
pub fn capability_masks() -> Option<[u64; 4]> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let get = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    };
    Some([
        get("CapPrm:")?,
        get("CapEff:")?,
        get("CapInh:")?,
        get("CapAmb:")?,
    ])
}

/// Becomes `t` for good. Must run before the process starts threads that might hold
/// credentials of their own (glibc applies set*id to every thread in any case).
pub fn drop_to(t: &Target) -> Result<(), PrivError> {
    let call = |call: &'static str| move |source| PrivError::Call { call, source };
    let gid = Gid::from_raw(t.gid);
    nix::unistd::setgroups(&[gid]).map_err(call("setgroups"))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(call("setresgid"))?;
    let uid = Uid::from_raw(t.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(call("setresuid"))?;
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1) takes no pointers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(PrivError::Call {
            call: "prctl(PR_SET_NO_NEW_PRIVS)",
            source: nix::Error::last(),
        });
    }
    let residual = |what: String| PrivError::Residual { uid: t.uid, what };
    // Leaving uid 0 for a non-zero uid clears the permitted, effective and ambient sets
    // (no SECBIT_KEEP_CAPS); the inheritable set is harmless without them, but clear it too.
    match capability_masks() {
        Some([0, 0, _, 0]) => {}
        Some(m) => return Err(residual(format!("capabilities left: {m:x?}"))),
        None => return Err(residual("cannot read /proc/self/status".into())),
    }
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(residual("setuid(0) succeeded".into()));
    }
    if nix::unistd::getgroups().map_err(call("getgroups"))? != vec![gid] {
        return Err(residual("supplementary groups left".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_user_by_name_and_uid_refuses_root_and_unknown() {
        let by_name = resolve_user("nobody").expect("Debian has user nobody");
        assert_ne!(by_name.uid, 0);
        assert_eq!(resolve_user(&by_name.uid.to_string()).unwrap(), by_name);
        assert!(matches!(resolve_user("root"), Err(PrivError::Root(_))));
        assert!(matches!(resolve_user("0"), Err(PrivError::Root(_))));
        let e = resolve_user("no-such-user-uswap").unwrap_err();
        assert!(e.to_string().contains("no-such-user-uswap"), "{e}");
    }

    #[test]
    fn capability_masks_are_readable() {
        let m = capability_masks().expect("/proc/self/status has the Cap lines");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert_ne!(m[0], 0, "root without permitted capabilities: {m:x?}");
        }
    }
}
