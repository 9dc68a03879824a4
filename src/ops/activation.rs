//! systemd socket activation: the `sd_listen_fds(3)` protocol, for `uswap daemon` started by
//! `uswap.socket`.
//!
//! systemd passes listening sockets as descriptors 3, 4, … and says so in the environment:
//! `LISTEN_PID` (the pid they are meant for: a child that inherited the environment must not
//! take them) and `LISTEN_FDS` (how many). [`take_listen_fds`] checks both, marks the
//! descriptors close-on-exec (programs the daemon might start must not inherit them) and
//! removes the variables, as `sd_listen_fds(1)` does. [`check_seqpacket_listener`] then checks
//! that a descriptor is what the daemon serves on: a listening AF_UNIX SOCK_SEQPACKET socket.
//!
//! Owns: reading that protocol. Must not: accept connections (the monitor does).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

/// The first descriptor systemd passes.
pub const SD_LISTEN_FDS_START: RawFd = 3;

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("{var}={value:?} is not a number")]
    BadEnv { var: &'static str, value: String },
    #[error("LISTEN_FDS={0}: descriptor {1} is not open")]
    NotOpen(usize, RawFd),
    #[error("descriptor {fd} passed by systemd: {what}")]
    WrongSocket { fd: RawFd, what: String },
    #[error("descriptor {fd}: {op}: {source}")]
    Os {
        fd: RawFd,
        op: &'static str,
        source: std::io::Error,
    },
}

fn env_number(var: &'static str) -> Result<Option<u64>, ActivationError> {
    match std::env::var(var) {
        Err(_) => Ok(None),
        Ok(value) => value
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| ActivationError::BadEnv { var, value }),
    }
}

/// The descriptors systemd passed to this process, or `None` when it was not socket-activated
/// (no `LISTEN_PID`, or one naming another process). Call it once, early, before threads that
/// read the environment start: it removes `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`.
pub fn take_listen_fds() -> Result<Option<Vec<OwnedFd>>, ActivationError> {
    let Some(pid) = env_number("LISTEN_PID")? else {
        return Ok(None);
    };
    if pid != u64::from(std::process::id()) {
        return Ok(None);
    }
    let count = env_number("LISTEN_FDS")?.unwrap_or(0) as usize;
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let mut fds = Vec::with_capacity(count);
    for i in 0..count {
        let fd = SD_LISTEN_FDS_START + i as RawFd;
        // SAFETY: F_GETFD only reads the descriptor's flags; it fails with EBADF if not open.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            return Err(ActivationError::NotOpen(count, fd));
        }
        // SAFETY: as above, setting the close-on-exec flag of a descriptor that is open.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
            return Err(ActivationError::Os {
                fd,
                op: "F_SETFD",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: the descriptor is open (checked above) and, by the protocol, handed to this
        // process alone; nothing else in it owns descriptors 3.. at this point.
        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    Ok(Some(fds))
}

fn sockopt_int(fd: RawFd, opt: libc::c_int, op: &'static str) -> Result<i32, ActivationError> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        let source = std::io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::ENOTSOCK) {
            return Err(ActivationError::WrongSocket {
                fd,
                what: "not a socket".into(),
            });
        }
        return Err(ActivationError::Os { fd, op, source });
    }
    Ok(v)
}

/// Checks that `fd` is a listening AF_UNIX SOCK_SEQPACKET socket and returns the path it is
/// bound to (empty for an abstract or unnamed socket).
pub fn check_seqpacket_listener(fd: &OwnedFd) -> Result<PathBuf, ActivationError> {
    let raw = fd.as_raw_fd();
    let wrong = |what: String| ActivationError::WrongSocket { fd: raw, what };
    if sockopt_int(raw, libc::SO_DOMAIN, "SO_DOMAIN")? != libc::AF_UNIX {
        return Err(wrong(
            "not an AF_UNIX socket (use ListenSequentialPacket=/path in the .socket unit)".into(),
        ));
    }
    if sockopt_int(raw, libc::SO_TYPE, "SO_TYPE")? != libc::SOCK_SEQPACKET {
        return Err(wrong(
            "not a SOCK_SEQPACKET socket (use ListenSequentialPacket=, not ListenStream=)".into(),
        ));
    }
    if sockopt_int(raw, libc::SO_ACCEPTCONN, "SO_ACCEPTCONN")? != 1 {
        return Err(wrong(
            "not listening (Accept=no in the .socket unit passes the listening socket)".into(),
        ));
    }
    // SAFETY: sockaddr_un is plain old data; getsockname writes at most `len` bytes into it.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: as above.
    let rc =
        unsafe { libc::getsockname(raw, (&mut addr as *mut libc::sockaddr_un).cast(), &mut len) };
    if rc < 0 {
        return Err(ActivationError::Os {
            fd: raw,
            op: "getsockname",
            source: std::io::Error::last_os_error(),
        });
    }
    let path_len = (len as usize).saturating_sub(std::mem::size_of::<libc::sa_family_t>());
    let bytes: Vec<u8> = addr.sun_path[..path_len.min(addr.sun_path.len())]
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    use std::os::unix::ffi::OsStringExt;
    Ok(PathBuf::from(std::ffi::OsString::from_vec(bytes)))
}
