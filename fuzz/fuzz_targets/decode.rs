//! Fuzz target: `Msg::decode` on arbitrary packets. It must never panic, and whatever it
//! accepts must encode back to the same bytes (no field is silently dropped or normalised)
//! and every `Regions` entry it yields must satisfy the checks the monitor relies on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use uswap::protocol::wire::{Msg, REGION_EXCLUDED, REGION_MANAGED, REGION_REGISTERED};

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = Msg::decode(data) else { return };
    if let Msg::Regions(r) = msg {
        for e in r.iter() {
            assert_eq!(e.start % 4096, 0);
            assert!(e.len_bytes > 0 && e.len_bytes % 4096 == 0);
            assert!(e.start.checked_add(e.len_bytes).is_some_and(|end| end <= 1 << 57));
            assert_eq!(e.flags & !(REGION_MANAGED | REGION_EXCLUDED | REGION_REGISTERED), 0);
        }
    }
    let mut out = vec![0u8; data.len() + 64];
    let n = msg.encode(&mut out).expect("an accepted message re-encodes");
    assert_eq!(&out[..n], data, "decode/encode roundtrip differs for {msg:?}");
});
