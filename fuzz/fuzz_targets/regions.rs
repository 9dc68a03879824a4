//! Fuzz target: a client's stream of packets, as the monitor consumes it. The input is split
//! into packets (2-byte little-endian length, then that many bytes); each is decoded, and every
//! `Regions` message is fed to the monitor's `Regions` (snapshot assembly, overlap and size
//! checks, excluded-range subtraction). It must never panic, and after every completed
//! snapshot the managed ranges must be page aligned, ascending, disjoint and outside every
//! excluded range.
#![no_main]

use libfuzzer_sys::fuzz_target;
use uswap::monitor::regions::Regions;
use uswap::protocol::wire::{Msg, REGIONS_FIRST, REGIONS_LAST};

fuzz_target!(|data: &[u8]| {
    let mut regions = Regions::default();
    let mut rest = data;
    while rest.len() >= 2 {
        let n = (u16::from_le_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        let (pkt, tail) = rest[2..].split_at(n);
        rest = tail;
        let Ok(Msg::Regions(r)) = Msg::decode(pkt) else {
            continue;
        };
        let done = regions.feed(
            r.snapshot,
            r.flags & REGIONS_FIRST != 0,
            r.flags & REGIONS_LAST != 0,
            r.epoch,
            r.iter(),
            (r.snapshot as u64 % 4) * 4096,
        );
        if let Ok(true) = done {
            let managed = regions.managed();
            for w in managed.windows(2) {
                assert!(w[0].end <= w[1].start, "{managed:x?}");
            }
            for m in &managed {
                assert!(m.start < m.end && m.start % 4096 == 0 && m.end % 4096 == 0);
                assert!(!regions.is_excluded(m.start, m.start + 4096), "{m:x?}");
            }
        }
    }
});
