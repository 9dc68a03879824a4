//! Packet I/O on the SOCK_SEQPACKET socket with SCM_RIGHTS, without heap allocation.
//!
//! Owns: sendmsg/recvmsg and control-message handling. Must not: interpret payloads.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// A `sockaddr_un` for `path` (bytes, no NUL) and its length, or `None` if the path does not
/// fit. Shared by the shim's connect and the monitor's bind/connect.
pub fn unix_sockaddr(path: &[u8]) -> Option<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if path.is_empty() || path.len() >= addr.sun_path.len() || path.contains(&0) {
        return None;
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(path) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + path.len() + 1;
    Some((addr, len as libc::socklen_t))
}

/// Sets (or with 0 clears) the receive timeout of a socket, in whole seconds.
pub fn set_recv_timeout(sock: RawFd, secs: i64) {
    let tv = libc::timeval {
        tv_sec: secs,
        tv_usec: 0,
    };
    // SAFETY: setting a timeval option on a socket; the kernel reads `tv` only.
    unsafe {
        libc::setsockopt(
            sock,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
}

/// Most descriptors one packet carries.
pub const MAX_FDS: usize = 5;

const CMSG_SPACE_FDS: usize = 64; // >= CMSG_SPACE(5 * sizeof(int)) on every 64-bit ABI

#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_SPACE_FDS]);

/// Sends one packet, attaching `fds` (at most [`MAX_FDS`]).
pub fn send_packet(sock: RawFd, packet: &[u8], fds: &[RawFd]) -> io::Result<()> {
    assert!(fds.len() <= MAX_FDS);
    let mut iov = libc::iovec {
        iov_base: packet.as_ptr() as *mut _,
        iov_len: packet.len(),
    };
    let mut cbuf = CmsgBuf([0; CMSG_SPACE_FDS]);
    // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let fd_bytes = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE is a pure computation on its argument.
        let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` bytes of aligned storage we own, so the first
        // header fits; CMSG_DATA points inside it with room for `fds`.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                fd_bytes as usize,
            );
        }
    }
    loop {
        // SAFETY: `msg` describes buffers that live across the call.
        let rc = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if rc >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A received packet: its length in the caller's buffer and the descriptors that came with it.
pub struct Received {
    pub len: usize,
    pub fds: [Option<OwnedFd>; MAX_FDS],
}

impl Received {
    pub fn take_fd(&mut self, idx: usize) -> Option<OwnedFd> {
        self.fds.get_mut(idx).and_then(Option::take)
    }

    pub fn fd_count(&self) -> usize {
        self.fds.iter().filter(|f| f.is_some()).count()
    }
}

/// Receives one packet into `buf`. Returns `Ok(None)` at end of stream. A packet larger than
/// `buf`, or with more descriptors than [`MAX_FDS`], is an `InvalidData` error (the excess
/// descriptors are closed by the kernel or by us).
pub fn recv_packet(sock: RawFd, buf: &mut [u8], flags: i32) -> io::Result<Option<Received>> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = CmsgBuf([0; CMSG_SPACE_FDS]);
    // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_SPACE_FDS as _;
    let n = loop {
        // SAFETY: `msg` describes buffers we own for the duration of the call.
        let rc = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC | flags) };
        if rc >= 0 {
            break rc as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut out = Received {
        len: n,
        fds: std::array::from_fn(|_| None),
    };
    let mut count = 0;
    let mut too_many = false;
    // SAFETY: the kernel filled msg_control with well-formed cmsgs of msg_controllen bytes;
    // CMSG_FIRSTHDR/NXTHDR walk within it, and SCM_RIGHTS data is an array of ints.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let nfds = ((*cmsg).cmsg_len as usize - (data as usize - cmsg as usize)) / 4;
                for i in 0..nfds {
                    let fd: RawFd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    let owned = OwnedFd::from_raw_fd(fd);
                    if count < MAX_FDS {
                        out.fds[count] = Some(owned);
                        count += 1;
                    } else {
                        too_many = true; // dropped: closed
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if n == 0 && count == 0 {
        return Ok(None);
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 || too_many {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "packet or descriptor list truncated (oversized message)",
        ));
    }
    Ok(Some(out))
}
