//! Fuzz target: `Msg::decode` on arbitrary packets. It must never panic, and whatever it
//! accepts must encode back to the same bytes (no field is silently dropped or normalised),
//! every `Regions` entry it yields must satisfy the checks the monitor relies on, and so must
//! the protocol-2 fields (`Hello` flags, the store member indices).
#![no_main]

use libfuzzer_sys::fuzz_target;
use uswap::protocol::store_layout::MAX_OWNERS;
use uswap::protocol::wire::{
    Msg, HELLO_ADOPT, NO_MEMBER, REGION_EXCLUDED, REGION_MANAGED, REGION_REGISTERED,
};

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = Msg::decode(data) else { return };
    match msg {
        Msg::Regions(r) => {
            for e in r.iter() {
                assert_eq!(e.start % 4096, 0);
                assert!(e.len_bytes > 0 && e.len_bytes % 4096 == 0);
                assert!(e
                    .start
                    .checked_add(e.len_bytes)
                    .is_some_and(|end| end <= 1 << 57));
                assert_eq!(
                    e.flags & !(REGION_MANAGED | REGION_EXCLUDED | REGION_REGISTERED),
                    0
                );
            }
        }
        // The monitor indexes the store's owner bits with these (`as u8`) unchecked.
        Msg::Hello(h) => {
            assert_eq!(h.flags & !HELLO_ADOPT, 0);
            assert!((h.store_member as usize) < MAX_OWNERS);
            assert!(h.page_size.is_power_of_two());
        }
        Msg::HelloAck(a) => assert!((a.store_member as usize) < MAX_OWNERS),
        Msg::ForkReady { child_member, .. } => {
            assert!((child_member as usize) < MAX_OWNERS || child_member == NO_MEMBER);
        }
        _ => {}
    }
    let mut out = vec![0u8; data.len() + 64];
    let n = msg
        .encode(&mut out)
        .expect("an accepted message re-encodes");
    assert_eq!(
        &out[..n],
        data,
        "decode/encode roundtrip differs for {msg:?}"
    );
});
