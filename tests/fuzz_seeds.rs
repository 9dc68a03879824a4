//! Writes the named seeds of the `cargo fuzz` corpora (FUZZING.md) with the crate's own
//! encoder, so that they always speak the current protocol version. Ignored by default; after a
//! protocol change run
//!
//! ```sh
//! cargo test --test fuzz_seeds -- --ignored
//! ```
//!
//! `fuzz/corpus/decode/seed_*`: one packet of each message kind (and of each new field's
//! interesting values). `fuzz/corpus/regions/seed_*`: client packet streams (2-byte
//! little-endian length, then the packet) for the `regions` target.

use std::path::PathBuf;

use uswap::protocol::wire::{
    Hello, HelloAck, Msg, ProtoError, RegionEntry, RegionsBuilder, FORK_FAILED, HELLO_ACK_DISK,
    HELLO_ADOPT, KIND_FORK_READY, MAX_MSG_LEN, NO_MEMBER, REGIONS_FIRST, REGIONS_LAST,
    REGION_EXCLUDED, REGION_MANAGED, REGION_REGISTERED, STATUS_DAEMON,
};

fn corpus(target: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn encode(m: &Msg<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_MSG_LEN];
    let n = m.encode(&mut buf).unwrap();
    buf.truncate(n);
    // A seed the decoder refuses would only teach the fuzzer an error path.
    assert_eq!(&Msg::decode(&buf).unwrap(), m);
    buf
}

fn regions(snapshot: u32, flags: u32, epoch: u64, entries: &[(u64, u64, u64)]) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_MSG_LEN];
    let mut b = RegionsBuilder::new(&mut buf);
    for &(start, len_bytes, flags) in entries {
        b.push(RegionEntry {
            start,
            len_bytes,
            flags,
        });
    }
    let pkt = b.finish(snapshot, flags, epoch).to_vec();
    assert!(matches!(Msg::decode(&pkt), Ok(Msg::Regions(_))));
    pkt
}

fn hello(fork_token: u64, forked_from: u32, flags: u32, store_member: u32) -> Vec<u8> {
    encode(&Msg::Hello(Hello {
        pid: 4242,
        page_size: 4096,
        uffd_features: 0x1ffff,
        fork_token,
        forked_from,
        flags,
        store_member,
        name: b"redis-server",
        app: b"redis",
        overrides: b"budget = \"64M\"",
    }))
}

/// Packets as the `regions` target reads them: each behind its 2-byte little-endian length.
fn stream(packets: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in packets {
        out.extend_from_slice(&u16::try_from(p.len()).unwrap().to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

#[test]
#[ignore = "writes the fuzz seed corpus; run after a protocol change"]
fn write_fuzz_seeds() {
    const M: u64 = REGION_MANAGED;
    const MR: u64 = REGION_MANAGED | REGION_REGISTERED;
    const X: u64 = REGION_EXCLUDED;

    let decode: Vec<(&str, Vec<u8>)> = vec![
        ("seed_hello", hello(0, 0, 0, 0)),
        ("seed_hello_forked", hello(0x5eed_0001, 4241, 0, 0)),
        ("seed_hello_adopt", hello(0, 0, HELLO_ADOPT, 3)),
        (
            "seed_hello_ack",
            encode(&Msg::HelloAck(HelloAck {
                status: 0,
                store_member: 2,
                flags: 0,
                window_len_bytes: 1 << 25,
                text: b"",
            })),
        ),
        (
            "seed_hello_ack_disk",
            encode(&Msg::HelloAck(HelloAck {
                status: 0,
                store_member: 0,
                flags: HELLO_ACK_DISK,
                window_len_bytes: 1 << 25,
                text: b"",
            })),
        ),
        (
            "seed_hello_ack_refused",
            encode(&Msg::HelloAck(HelloAck {
                status: 22,
                store_member: 0,
                flags: 0,
                window_len_bytes: 0,
                text: b"config: unknown key `bugdet`",
            })),
        ),
        (
            "seed_regions",
            regions(
                1,
                REGIONS_FIRST | REGIONS_LAST,
                7,
                &[
                    (0x10000, 0x100000, MR),
                    (0x20000, 0x1000, X),
                    (0x500000, 0x1000, M),
                ],
            ),
        ),
        ("seed_fork_prepare", encode(&Msg::ForkPrepare)),
        (
            "seed_fork_ready",
            encode(&Msg::ForkReady {
                status: 0,
                pages_restored: 0,
                token: 0x5eed_0001,
                child_member: 1,
            }),
        ),
        (
            "seed_fork_ready_no_member",
            encode(&Msg::ForkReady {
                status: 0,
                pages_restored: 312,
                token: 0,
                child_member: NO_MEMBER,
            }),
        ),
        (
            "seed_fork_done",
            encode(&Msg::ForkDone {
                child_pid: 4243,
                token: 0x5eed_0001,
            }),
        ),
        (
            "seed_fork_done_failed",
            encode(&Msg::ForkDone {
                child_pid: FORK_FAILED,
                token: 0x5eed_0001,
            }),
        ),
        ("seed_bye", encode(&Msg::Bye { status: 0 })),
        (
            "seed_status_request",
            encode(&Msg::StatusRequest {
                flags: STATUS_DAEMON,
            }),
        ),
        (
            "seed_status_reply",
            encode(&Msg::StatusReply {
                json: b"{\"clients\":[]}",
            }),
        ),
        (
            "seed_error",
            encode(&Msg::Error {
                code: 75,
                text: b"peer speaks protocol version 1",
            }),
        ),
    ];

    // The crash `cargo fuzz` found under protocol 1 (a ForkReady with a non-zero word in what was
    // then a reserved slot, `child_member` since protocol 2), in today's version: the same bytes
    // the unit test `protocol::wire::tests::decode_rejects_nonzero_reserved_payload_words` pins.
    let mut crash: Vec<u8> = vec![
        85, 83, 87, 80, 0, 0, 103, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 0, 0, 4, 0, 0, 0, 0, 0,
        0, 0, 0, 0,
    ];
    crash[4..6].copy_from_slice(&uswap::protocol::PROTOCOL_VERSION.to_le_bytes());
    assert_eq!(
        Msg::decode(&crash).unwrap_err(),
        ProtoError::BadField {
            kind: KIND_FORK_READY,
            field: "child_member"
        }
    );

    let dir = corpus("decode");
    for (name, bytes) in &decode {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    std::fs::write(dir.join("regression_fork_ready_reserved"), &crash).unwrap();

    let streams: Vec<(&str, Vec<u8>)> = vec![
        (
            "seed_one_snapshot",
            stream(&[regions(
                1,
                REGIONS_FIRST | REGIONS_LAST,
                0,
                &[
                    (0x10000, 0x100000, MR),
                    (0x20000, 0x1000, X),
                    (0x500000, 0x1000, M),
                ],
            )]),
        ),
        (
            "seed_two_chunks",
            stream(&[
                regions(2, REGIONS_FIRST, 0, &[(0x1000, 0x10000, M)]),
                regions(2, REGIONS_LAST, 0, &[(0x100000, 0x10000, MR)]),
            ]),
        ),
        (
            "seed_overlap",
            stream(&[regions(
                3,
                REGIONS_FIRST | REGIONS_LAST,
                0,
                &[(0x100000, 0x10000, M), (0x108000, 0x10000, MR)],
            )]),
        ),
        (
            "seed_stray_then_new",
            stream(&[
                regions(4, REGIONS_LAST, 0, &[(0x1000, 0x1000, M)]),
                regions(
                    5,
                    REGIONS_FIRST | REGIONS_LAST,
                    1,
                    &[
                        (0x2000, 0x3000, MR),
                        (0x2000, 0x1000, X),
                        (0x3000, 0x2000, X),
                    ],
                ),
            ]),
        ),
        // A whole protocol-2 conversation of a forked child: its Hello, snapshots around a
        // fork of its own, and its Bye (the target skips what is not `Regions`).
        (
            "seed_forked_child_session",
            stream(&[
                hello(0x5eed_0001, 4241, 0, 0),
                regions(
                    1,
                    REGIONS_FIRST | REGIONS_LAST,
                    0,
                    &[(0x10000, 0x40000, MR), (0x30000, 0x1000, X)],
                ),
                encode(&Msg::ForkPrepare),
                encode(&Msg::ForkDone {
                    child_pid: 4244,
                    token: 0x5eed_0002,
                }),
                regions(
                    2,
                    REGIONS_FIRST | REGIONS_LAST,
                    3,
                    &[(0x10000, 0x40000, MR), (0x80000, 0x2000, M)],
                ),
                encode(&Msg::Bye { status: 0 }),
            ]),
        ),
    ];
    let dir = corpus("regions");
    for (name, bytes) in &streams {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
