//! Control messages on the Unix socket: fixed little-endian layouts, no heap allocation.
//!
//! Every packet is a 16-byte header followed by the payload:
//!
//! | bytes | field                                   |
//! |-------|-----------------------------------------|
//! | 0..4  | magic `USWP` (0x5057_5355 LE)           |
//! | 4..6  | protocol version                        |
//! | 6..8  | message kind                            |
//! | 8..12 | payload length in bytes                 |
//! | 12..16| reserved, must be zero                  |
//!
//! Order on a connection: the client sends `Hello` (with the uffd attached) and waits for
//! `HelloAck` (with the window memfd, two eventfds, the store file and, with
//! [`HELLO_ACK_DISK`], the disk tier's file attached). After that the client sends
//! `Regions` snapshots at any time, and `ForkPrepare`/`ForkDone` around a fork; the monitor
//! answers `ForkPrepare` with `ForkReady`. A `StatusRequest` may be sent as the first message
//! of a connection instead of `Hello` (the `uswap status` client). Anything else is a protocol
//! error and the monitor disconnects the client with an `Error` naming it.

use super::PROTOCOL_VERSION;

pub const MAGIC: u32 = 0x5057_5355;
pub const HEADER_LEN: usize = 16;
/// Largest packet either side sends or accepts.
pub const MAX_MSG_LEN: usize = 64 * 1024;
/// Region entries per `Regions` packet.
pub const MAX_REGIONS_PER_MSG: usize = 1024;
const REGION_ENTRY_LEN: usize = 24;
const MAX_NAME_LEN: usize = 256;
const MAX_OVERRIDES_LEN: usize = 4096;

pub const KIND_HELLO: u16 = 1;
pub const KIND_REGIONS: u16 = 2;
pub const KIND_FORK_PREPARE: u16 = 3;
pub const KIND_FORK_DONE: u16 = 4;
pub const KIND_BYE: u16 = 5;
pub const KIND_STATUS_REQUEST: u16 = 6;
pub const KIND_HELLO_ACK: u16 = 101;
pub const KIND_FORK_READY: u16 = 103;
pub const KIND_STATUS_REPLY: u16 = 106;
pub const KIND_ERROR: u16 = 199;

/// `StatusRequest` flag: answer with the daemon's own figures (a JSON object) instead of the
/// clients' reports.
pub const STATUS_DAEMON: u32 = 1;

/// `Hello` flag: adopt this program (its monitor died); a second descriptor, the store file,
/// follows the userfaultfd.
pub const HELLO_ADOPT: u32 = 1;

/// `HelloAck` flag: a fifth descriptor, the store's disk tier file, follows the store file
/// (its pages are named by the store file's disk chunks; the shim reads them with `pread` if
/// the monitor dies).
pub const HELLO_ACK_DISK: u32 = 1;

/// `ForkReady::child_member` when the child shares no store with its parent.
pub const NO_MEMBER: u32 = 255;

/// `ForkDone::child_pid` when the fork itself failed.
pub const FORK_FAILED: u32 = u32::MAX;

/// `Regions` flags.
pub const REGIONS_FIRST: u32 = 1;
pub const REGIONS_LAST: u32 = 2;

/// Region entry flags.
/// Anonymous private writable memory the monitor may evict.
pub const REGION_MANAGED: u64 = 1;
/// Memory the monitor must never evict (the shim's own memory, the agent's stack, staging).
pub const REGION_EXCLUDED: u64 = 2;
/// With `REGION_MANAGED`: the agent registered this whole VMA with the forwarded descriptor
/// (exact bounds, read from /proc/self/maps just before), so it may be evicted.
pub const REGION_REGISTERED: u64 = 4;

/// What was wrong with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("packet of {len} bytes is shorter than its {need}-byte header or payload")]
    Truncated { len: usize, need: usize },
    #[error("packet of {len} bytes exceeds the {MAX_MSG_LEN}-byte limit")]
    Oversized { len: usize },
    #[error("bad magic {found:#x} (not a uswap peer)")]
    BadMagic { found: u32 },
    #[error("peer speaks protocol version {found}, this side speaks {PROTOCOL_VERSION}")]
    Version { found: u16 },
    #[error("unknown message kind {kind}")]
    UnknownKind { kind: u16 },
    #[error("message kind {kind}: payload length {len} does not match its layout")]
    BadLength { kind: u16, len: usize },
    #[error("message kind {kind}: field `{field}` is invalid")]
    BadField { kind: u16, field: &'static str },
    #[error("message kind {kind} is not allowed here")]
    Unexpected { kind: u16 },
    #[error("buffer of {have} bytes too small for a {need}-byte message")]
    BufferTooSmall { have: usize, need: usize },
}

/// One anonymous region the shim reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionEntry {
    pub start: u64,
    pub len_bytes: u64,
    pub flags: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello<'a> {
    /// The pid the client claims; informational only (peers are identified by SO_PEERCRED).
    pub pid: u32,
    pub page_size: u32,
    pub uffd_features: u64,
    /// Nonzero when this program was just forked from a managed program: the token the
    /// monitor gave the parent in `ForkReady`, naming the parent's pages the child inherits.
    pub fork_token: u64,
    /// With `fork_token`: the parent's pid (informational, as `pid`).
    pub forked_from: u32,
    /// [`HELLO_ADOPT`]: a program whose monitor died asks to be adopted: the store file comes
    /// with the userfaultfd, and `store_member` is its member index in it.
    pub flags: u32,
    pub store_member: u32,
    /// Program name (basename of the executable).
    pub name: &'a [u8],
    /// `USWAP_APP`, if set: selects `config/<app>.toml` instead of the name.
    pub app: &'a [u8],
    /// `USWAP_OVERRIDES`: TOML text overriding config keys for this run.
    pub overrides: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloAck<'a> {
    /// 0 when accepted; otherwise an errno-like code and `text` says why.
    pub status: i32,
    /// The program's member index in its store's fork family (its owner bit in the store
    /// file's records, see `store_layout`); below `store_layout::MAX_OWNERS`.
    pub store_member: u32,
    pub window_len_bytes: u64,
    /// [`HELLO_ACK_DISK`].
    pub flags: u32,
    pub text: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Regions<'a> {
    /// Snapshot number: entries of one snapshot share it.
    pub snapshot: u32,
    pub flags: u32,
    /// The window's event epoch the agent read before it began reading /proc/self/maps: any
    /// UNMAP/REMAP the monitor logged after it may be missing from (or stale in) this snapshot.
    pub epoch: u64,
    entries: &'a [u8],
}

/// Bytes of the `Regions` payload before the entries: snapshot, flags, epoch.
const REGIONS_HEAD: usize = 16;

impl<'a> Regions<'a> {
    pub fn len(&self) -> usize {
        self.entries.len() / REGION_ENTRY_LEN
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = RegionEntry> + 'a {
        self.entries
            .chunks_exact(REGION_ENTRY_LEN)
            .map(|c| RegionEntry {
                start: u64_at(c, 0),
                len_bytes: u64_at(c, 8),
                flags: u64_at(c, 16),
            })
    }
}

/// A decoded message borrowing from the packet buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg<'a> {
    Hello(Hello<'a>),
    HelloAck(HelloAck<'a>),
    Regions(Regions<'a>),
    /// The client is about to fork: pause eviction, finish what is in flight, and keep a
    /// copy-on-write snapshot of its evicted pages for the child.
    ForkPrepare,
    /// The monitor's answer to `ForkPrepare`. `token` names the snapshot (the child sends it
    /// in its `Hello`); 0 = no snapshot: every page was brought home instead
    /// (`pages_restored`) and the child runs unmanaged.
    ForkReady {
        status: i32,
        pages_restored: u64,
        token: u64,
        /// The child's member index in the family store ([`NO_MEMBER`]: the child starts a
        /// store of its own). A child that cannot attach (the monitor died) brings its pages
        /// home itself from the records carrying this bit.
        child_member: u32,
    },
    /// The fork is over (in the parent); eviction may resume. `child_pid` is the child's pid
    /// (0 = unknown, [`FORK_FAILED`] = the fork failed and the snapshot `token` is dropped).
    ForkDone {
        child_pid: u32,
        token: u64,
    },
    /// The client is exiting or exec'ing.
    Bye {
        status: i32,
    },
    StatusRequest {
        flags: u32,
    },
    StatusReply {
        json: &'a [u8],
    },
    Error {
        code: u32,
        text: &'a [u8],
    },
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}
fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

/// Little-endian writer into a caller buffer.
struct Writer<'b> {
    buf: &'b mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), ProtoError> {
        let end = self.pos + bytes.len();
        if end > self.buf.len() || end > MAX_MSG_LEN {
            return Err(ProtoError::BufferTooSmall {
                have: self.buf.len().min(MAX_MSG_LEN),
                need: end,
            });
        }
        self.buf[self.pos..end].copy_from_slice(bytes);
        self.pos = end;
        Ok(())
    }
    fn u32(&mut self, v: u32) -> Result<(), ProtoError> {
        self.put(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) -> Result<(), ProtoError> {
        self.put(&v.to_le_bytes())
    }
    fn bytes(&mut self, v: &[u8]) -> Result<(), ProtoError> {
        self.u32(v.len() as u32)?;
        self.put(v)
    }
}

/// Length-prefixed byte string reader with a bound.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    kind: u16,
}

impl<'a> Reader<'a> {
    fn need(&self, n: usize) -> Result<(), ProtoError> {
        if self.pos + n > self.b.len() {
            Err(ProtoError::BadLength {
                kind: self.kind,
                len: self.b.len(),
            })
        } else {
            Ok(())
        }
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        self.need(4)?;
        let v = u32_at(self.b, self.pos);
        self.pos += 4;
        Ok(v)
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        self.need(8)?;
        let v = u64_at(self.b, self.pos);
        self.pos += 8;
        Ok(v)
    }
    fn bytes(&mut self, max: usize, field: &'static str) -> Result<&'a [u8], ProtoError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(ProtoError::BadField {
                kind: self.kind,
                field,
            });
        }
        self.need(n)?;
        let v = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(v)
    }
    /// A reserved u32: must be zero (so that every accepted packet has one meaning, and a
    /// later version can give it one).
    fn reserved(&mut self) -> Result<(), ProtoError> {
        if self.u32()? != 0 {
            return Err(ProtoError::BadField {
                kind: self.kind,
                field: "reserved",
            });
        }
        Ok(())
    }
    fn end(&self) -> Result<(), ProtoError> {
        if self.pos != self.b.len() {
            return Err(ProtoError::BadLength {
                kind: self.kind,
                len: self.b.len(),
            });
        }
        Ok(())
    }
}

impl<'a> Msg<'a> {
    pub fn kind(&self) -> u16 {
        match self {
            Msg::Hello(_) => KIND_HELLO,
            Msg::HelloAck(_) => KIND_HELLO_ACK,
            Msg::Regions(_) => KIND_REGIONS,
            Msg::ForkPrepare => KIND_FORK_PREPARE,
            Msg::ForkReady { .. } => KIND_FORK_READY,
            Msg::ForkDone { .. } => KIND_FORK_DONE,
            Msg::Bye { .. } => KIND_BYE,
            Msg::StatusRequest { .. } => KIND_STATUS_REQUEST,
            Msg::StatusReply { .. } => KIND_STATUS_REPLY,
            Msg::Error { .. } => KIND_ERROR,
        }
    }

    /// Encodes into `buf`, returning the packet length.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, ProtoError> {
        let mut w = Writer {
            buf,
            pos: HEADER_LEN,
        };
        if w.buf.len() < HEADER_LEN {
            return Err(ProtoError::BufferTooSmall {
                have: w.buf.len(),
                need: HEADER_LEN,
            });
        }
        match *self {
            Msg::Hello(h) => {
                w.u32(h.pid)?;
                w.u32(h.page_size)?;
                w.u64(h.uffd_features)?;
                w.u64(h.fork_token)?;
                w.u32(h.forked_from)?;
                w.u32(h.flags)?;
                w.u32(h.store_member)?;
                w.u32(0)?;
                w.bytes(&h.name[..h.name.len().min(MAX_NAME_LEN)])?;
                w.bytes(&h.app[..h.app.len().min(MAX_NAME_LEN)])?;
                w.bytes(h.overrides)?;
            }
            Msg::HelloAck(a) => {
                w.u32(a.status as u32)?;
                w.u32(a.store_member)?;
                w.u64(a.window_len_bytes)?;
                w.u32(a.flags)?;
                w.u32(0)?;
                w.bytes(a.text)?;
            }
            Msg::Regions(r) => {
                w.u32(r.snapshot)?;
                w.u32(r.flags)?;
                w.u64(r.epoch)?;
                w.put(r.entries)?;
            }
            Msg::ForkPrepare => {}
            Msg::ForkReady {
                status,
                pages_restored,
                token,
                child_member,
            } => {
                w.u32(status as u32)?;
                w.u32(child_member)?;
                w.u64(pages_restored)?;
                w.u64(token)?;
            }
            Msg::ForkDone { child_pid, token } => {
                w.u32(child_pid)?;
                w.u32(0)?;
                w.u64(token)?;
            }
            Msg::Bye { status } => w.u32(status as u32)?,
            Msg::StatusRequest { flags } => w.u32(flags)?,
            Msg::StatusReply { json } => w.put(json)?,
            Msg::Error { code, text } => {
                w.u32(code)?;
                w.bytes(text)?;
            }
        }
        let len = w.pos;
        let payload = (len - HEADER_LEN) as u32;
        w.buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        w.buf[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        w.buf[6..8].copy_from_slice(&self.kind().to_le_bytes());
        w.buf[8..12].copy_from_slice(&payload.to_le_bytes());
        w.buf[12..16].copy_from_slice(&0u32.to_le_bytes());
        Ok(len)
    }

    /// Decodes one packet, checking every length and field.
    pub fn decode(packet: &'a [u8]) -> Result<Msg<'a>, ProtoError> {
        if packet.len() > MAX_MSG_LEN {
            return Err(ProtoError::Oversized { len: packet.len() });
        }
        if packet.len() < HEADER_LEN {
            return Err(ProtoError::Truncated {
                len: packet.len(),
                need: HEADER_LEN,
            });
        }
        let magic = u32_at(packet, 0);
        if magic != MAGIC {
            return Err(ProtoError::BadMagic { found: magic });
        }
        let version = u16_at(packet, 4);
        if version != PROTOCOL_VERSION {
            return Err(ProtoError::Version { found: version });
        }
        let kind = u16_at(packet, 6);
        let payload_len = u32_at(packet, 8) as usize;
        if u32_at(packet, 12) != 0 {
            return Err(ProtoError::BadField {
                kind,
                field: "reserved",
            });
        }
        if HEADER_LEN + payload_len != packet.len() {
            return Err(ProtoError::Truncated {
                len: packet.len(),
                need: HEADER_LEN + payload_len,
            });
        }
        let p = &packet[HEADER_LEN..];
        let mut r = Reader { b: p, pos: 0, kind };
        let msg = match kind {
            KIND_HELLO => {
                let pid = r.u32()?;
                let page_size = r.u32()?;
                let uffd_features = r.u64()?;
                let fork_token = r.u64()?;
                let forked_from = r.u32()?;
                let flags = r.u32()?;
                let store_member = r.u32()?;
                r.reserved()?;
                if flags & !HELLO_ADOPT != 0 {
                    return Err(ProtoError::BadField {
                        kind,
                        field: "flags",
                    });
                }
                if store_member as usize >= super::store_layout::MAX_OWNERS {
                    return Err(ProtoError::BadField {
                        kind,
                        field: "store_member",
                    });
                }
                let name = r.bytes(MAX_NAME_LEN, "name")?;
                let app = r.bytes(MAX_NAME_LEN, "app")?;
                let overrides = r.bytes(MAX_OVERRIDES_LEN, "overrides")?;
                if page_size == 0 || !page_size.is_power_of_two() {
                    return Err(ProtoError::BadField {
                        kind,
                        field: "page_size",
                    });
                }
                Msg::Hello(Hello {
                    pid,
                    page_size,
                    uffd_features,
                    fork_token,
                    forked_from,
                    flags,
                    store_member,
                    name,
                    app,
                    overrides,
                })
            }
            KIND_HELLO_ACK => {
                let status = r.u32()? as i32;
                let store_member = r.u32()?;
                if store_member as usize >= super::store_layout::MAX_OWNERS {
                    return Err(ProtoError::BadField {
                        kind,
                        field: "store_member",
                    });
                }
                let window_len_bytes = r.u64()?;
                let flags = r.u32()?;
                if flags & !HELLO_ACK_DISK != 0 {
                    return Err(ProtoError::BadField {
                        kind,
                        field: "flags",
                    });
                }
                if r.u32()? != 0 {
                    return Err(ProtoError::BadField {
                        kind,
                        field: "reserved",
                    });
                }
                let text = r.bytes(MAX_MSG_LEN, "text")?;
                Msg::HelloAck(HelloAck {
                    status,
                    store_member,
                    window_len_bytes,
                    flags,
                    text,
                })
            }
            KIND_REGIONS => {
                let snapshot = r.u32()?;
                let flags = r.u32()?;
                if flags & !(REGIONS_FIRST | REGIONS_LAST) != 0 {
                    return Err(ProtoError::BadField {
                        kind,
                        field: "flags",
                    });
                }
                let epoch = r.u64()?;
                let entries = &p[REGIONS_HEAD..];
                if entries.len() % REGION_ENTRY_LEN != 0
                    || entries.len() / REGION_ENTRY_LEN > MAX_REGIONS_PER_MSG
                {
                    return Err(ProtoError::BadLength { kind, len: p.len() });
                }
                let regions = Regions {
                    snapshot,
                    flags,
                    epoch,
                    entries,
                };
                for e in regions.iter() {
                    if e.start % 4096 != 0 || e.len_bytes == 0 || e.len_bytes % 4096 != 0 {
                        return Err(ProtoError::BadField {
                            kind,
                            field: "region alignment",
                        });
                    }
                    if e.start
                        .checked_add(e.len_bytes)
                        .is_none_or(|end| end > (1u64 << 57))
                    {
                        return Err(ProtoError::BadField {
                            kind,
                            field: "region range",
                        });
                    }
                    if e.flags & !(REGION_MANAGED | REGION_EXCLUDED | REGION_REGISTERED) != 0
                        || e.flags & (REGION_MANAGED | REGION_EXCLUDED) == 0
                    {
                        return Err(ProtoError::BadField {
                            kind,
                            field: "region flags",
                        });
                    }
                }
                return Ok(Msg::Regions(regions));
            }
            KIND_FORK_PREPARE => Msg::ForkPrepare,
            KIND_FORK_READY => {
                let status = r.u32()? as i32;
                let child_member = r.u32()?;
                if child_member as usize >= super::store_layout::MAX_OWNERS
                    && child_member != NO_MEMBER
                {
                    return Err(ProtoError::BadField {
                        kind,
                        field: "child_member",
                    });
                }
                Msg::ForkReady {
                    status,
                    pages_restored: r.u64()?,
                    token: r.u64()?,
                    child_member,
                }
            }
            KIND_FORK_DONE => {
                let child_pid = r.u32()?;
                r.reserved()?;
                Msg::ForkDone {
                    child_pid,
                    token: r.u64()?,
                }
            }
            KIND_BYE => Msg::Bye {
                status: r.u32()? as i32,
            },
            KIND_STATUS_REQUEST => Msg::StatusRequest { flags: r.u32()? },
            KIND_STATUS_REPLY => return Ok(Msg::StatusReply { json: p }),
            KIND_ERROR => {
                let code = r.u32()?;
                Msg::Error {
                    code,
                    text: r.bytes(MAX_MSG_LEN, "text")?,
                }
            }
            _ => return Err(ProtoError::UnknownKind { kind }),
        };
        r.end()?;
        Ok(msg)
    }
}

/// Builds `Regions` packets without allocating: push entries, then `finish` into a buffer.
pub struct RegionsBuilder<'b> {
    buf: &'b mut [u8],
    count: usize,
}

impl<'b> RegionsBuilder<'b> {
    /// `buf` must hold at least `HEADER_LEN + 16 + MAX_REGIONS_PER_MSG * 24` bytes.
    pub fn new(buf: &'b mut [u8]) -> Self {
        assert!(buf.len() >= HEADER_LEN + REGIONS_HEAD + MAX_REGIONS_PER_MSG * REGION_ENTRY_LEN);
        RegionsBuilder { buf, count: 0 }
    }

    pub fn is_full(&self) -> bool {
        self.count == MAX_REGIONS_PER_MSG
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn push(&mut self, e: RegionEntry) {
        assert!(!self.is_full());
        let off = HEADER_LEN + REGIONS_HEAD + self.count * REGION_ENTRY_LEN;
        self.buf[off..off + 8].copy_from_slice(&e.start.to_le_bytes());
        self.buf[off + 8..off + 16].copy_from_slice(&e.len_bytes.to_le_bytes());
        self.buf[off + 16..off + 24].copy_from_slice(&e.flags.to_le_bytes());
        self.count += 1;
    }

    /// Writes the header and returns the packet; resets the builder for the next packet.
    pub fn finish(&mut self, snapshot: u32, flags: u32, epoch: u64) -> &[u8] {
        let len = HEADER_LEN + REGIONS_HEAD + self.count * REGION_ENTRY_LEN;
        self.buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        self.buf[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        self.buf[6..8].copy_from_slice(&KIND_REGIONS.to_le_bytes());
        self.buf[8..12].copy_from_slice(&((len - HEADER_LEN) as u32).to_le_bytes());
        self.buf[12..16].copy_from_slice(&0u32.to_le_bytes());
        self.buf[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&snapshot.to_le_bytes());
        self.buf[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&flags.to_le_bytes());
        self.buf[HEADER_LEN + 8..HEADER_LEN + 16].copy_from_slice(&epoch.to_le_bytes());
        self.count = 0;
        &self.buf[..len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(m: Msg<'_>) {
        let mut buf = [0u8; 4096];
        let n = m.encode(&mut buf).unwrap();
        assert_eq!(Msg::decode(&buf[..n]).unwrap(), m);
    }

    #[test]
    fn roundtrip_every_kind() {
        roundtrip(Msg::Hello(Hello {
            pid: 7,
            fork_token: 0,
            forked_from: 0,
            flags: 0,
            store_member: 0,
            page_size: 4096,
            uffd_features: 0x1ffff,
            name: b"redis",
            app: b"",
            overrides: b"budget = \"64M\"",
        }));
        roundtrip(Msg::HelloAck(HelloAck {
            status: 0,
            store_member: 3,
            window_len_bytes: 1 << 25,
            flags: 0,
            text: b"ok",
        }));
        roundtrip(Msg::HelloAck(HelloAck {
            status: 0,
            store_member: 0,
            window_len_bytes: 1 << 25,
            flags: HELLO_ACK_DISK,
            text: b"",
        }));
        roundtrip(Msg::ForkPrepare);
        roundtrip(Msg::ForkReady {
            status: 0,
            pages_restored: 12,
            token: 0x1234,
            child_member: NO_MEMBER,
        });
        roundtrip(Msg::ForkDone {
            child_pid: 99,
            token: 7,
        });
        roundtrip(Msg::Bye { status: 3 });
        roundtrip(Msg::StatusRequest { flags: 1 });
        roundtrip(Msg::StatusReply { json: b"{}" });
        roundtrip(Msg::Error {
            code: 22,
            text: b"bad",
        });
    }

    #[test]
    fn regions_builder_roundtrip() {
        let mut buf = vec![0u8; MAX_MSG_LEN];
        let mut b = RegionsBuilder::new(&mut buf);
        b.push(RegionEntry {
            start: 0x1000,
            len_bytes: 0x2000,
            flags: REGION_MANAGED,
        });
        b.push(RegionEntry {
            start: 0x10000,
            len_bytes: 0x1000,
            flags: REGION_EXCLUDED,
        });
        let pkt = b.finish(5, REGIONS_FIRST | REGIONS_LAST, 77).to_vec();
        match Msg::decode(&pkt).unwrap() {
            Msg::Regions(r) => {
                assert_eq!(r.snapshot, 5);
                assert_eq!(r.epoch, 77);
                assert_eq!(r.len(), 2);
                let v: Vec<_> = r.iter().collect();
                assert_eq!(
                    v[1],
                    RegionEntry {
                        start: 0x10000,
                        len_bytes: 0x1000,
                        flags: REGION_EXCLUDED
                    }
                );
            }
            m => panic!("decoded {m:?}"),
        }
    }

    #[test]
    fn decode_rejects_bad_packets_with_named_reason() {
        let mut buf = [0u8; 256];
        let n = Msg::Bye { status: 0 }.encode(&mut buf).unwrap();
        assert!(matches!(
            Msg::decode(&buf[..n - 1]),
            Err(ProtoError::Truncated { .. })
        ));
        assert!(matches!(
            Msg::decode(&buf[..3]),
            Err(ProtoError::Truncated { .. })
        ));
        let mut bad = buf;
        bad[0] = b'X';
        assert!(matches!(
            Msg::decode(&bad[..n]),
            Err(ProtoError::BadMagic { .. })
        ));
        let mut bad = buf;
        bad[4] = 9;
        assert!(matches!(
            Msg::decode(&bad[..n]),
            Err(ProtoError::Version { found: 9 })
        ));
        let mut bad = buf;
        bad[6] = 77;
        assert!(matches!(
            Msg::decode(&bad[..n]),
            Err(ProtoError::UnknownKind { kind: 77 })
        ));
        assert!(matches!(
            Msg::decode(&vec![0u8; MAX_MSG_LEN + 1]),
            Err(ProtoError::Oversized { .. })
        ));
        // A region that is not page aligned.
        let mut big = vec![0u8; MAX_MSG_LEN];
        let mut b = RegionsBuilder::new(&mut big);
        b.push(RegionEntry {
            start: 0x1001,
            len_bytes: 0x1000,
            flags: REGION_MANAGED,
        });
        let pkt = b.finish(1, REGIONS_LAST, 0).to_vec();
        let e = Msg::decode(&pkt).unwrap_err();
        assert!(e.to_string().contains("region alignment"), "{e}");
        // A length-prefixed string that claims more than the packet holds.
        let n = Msg::Error {
            code: 1,
            text: b"abc",
        }
        .encode(&mut buf)
        .unwrap();
        buf[HEADER_LEN + 4] = 200;
        assert!(Msg::decode(&buf[..n]).is_err());
    }

    /// Found by `cargo fuzz` (FUZZING.md): a ForkReady with a non-zero reserved word decoded,
    /// and re-encoded differently. Every accepted packet must encode back to itself. (That
    /// word is `child_member` since protocol 2, checked against the member range.)
    #[test]
    fn decode_rejects_nonzero_reserved_payload_words() {
        let mut crash: [u8; 32] = [
            85, 83, 87, 80, 3, 0, 103, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 0, 0, 4, 0, 0, 0,
            0, 0, 0, 0, 0, 0,
        ];
        // Found at protocol 3; the same packet at the current version.
        crash[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        let e = Msg::decode(&crash).unwrap_err();
        assert_eq!(
            e,
            ProtoError::BadField {
                kind: KIND_FORK_READY,
                field: "child_member"
            }
        );
        let mut buf = [0u8; 256];
        let n = Msg::HelloAck(HelloAck {
            status: 0,
            store_member: 0,
            window_len_bytes: 4096,
            flags: 0,
            text: b"",
        })
        .encode(&mut buf)
        .unwrap();
        let mut bad = buf;
        bad[HEADER_LEN + 4] = 16;
        assert!(Msg::decode(&bad[..n])
            .unwrap_err()
            .to_string()
            .contains("store_member"));
        // Unknown flags and a nonzero reserved word are refused.
        let mut bad = buf;
        bad[HEADER_LEN + 16] = 2;
        assert!(Msg::decode(&bad[..n])
            .unwrap_err()
            .to_string()
            .contains("flags"));
        let mut bad = buf;
        bad[HEADER_LEN + 20] = 1;
        assert!(Msg::decode(&bad[..n])
            .unwrap_err()
            .to_string()
            .contains("reserved"));
    }

    /// Every packet the decoder accepts encodes back to the same bytes (the property the fuzz
    /// target checks), here over single-byte corruptions of one packet of each kind.
    #[test]
    fn accepted_corruptions_roundtrip_exactly() {
        let msgs = [
            Msg::Hello(Hello {
                pid: 1,
                fork_token: 0,
                forked_from: 0,
                flags: 0,
                store_member: 0,
                page_size: 4096,
                uffd_features: 3,
                name: b"n",
                app: b"a",
                overrides: b"o",
            }),
            Msg::HelloAck(HelloAck {
                status: 0,
                store_member: 3,
                window_len_bytes: 1 << 20,
                flags: HELLO_ACK_DISK,
                text: b"t",
            }),
            Msg::ForkReady {
                status: 0,
                pages_restored: 1,
                token: 0x1234,
                child_member: 2,
            },
            Msg::ForkDone {
                child_pid: 2,
                token: 1,
            },
            Msg::Bye { status: 0 },
            Msg::StatusRequest { flags: 0 },
            Msg::Error {
                code: 1,
                text: b"e",
            },
        ];
        let mut accepted = 0;
        for m in msgs {
            let mut buf = [0u8; 512];
            let n = m.encode(&mut buf).unwrap();
            for i in 0..n {
                for v in [0u8, 1, 0x80, 0xff] {
                    let mut p = buf;
                    p[i] = v;
                    if let Ok(d) = Msg::decode(&p[..n]) {
                        accepted += 1;
                        let mut out = [0u8; 512];
                        let k = d.encode(&mut out).unwrap();
                        assert_eq!(&out[..k], &p[..n], "{d:?}");
                    }
                }
            }
        }
        assert!(accepted > 100, "only {accepted} corruptions decoded");
    }
}
