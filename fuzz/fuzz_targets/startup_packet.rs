//! Startup packets: parsing, stepgate-setting extraction and re-encoding never panic, and what is
//! forwarded parses again to the same parameters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stepgate::wire::startup::{parse, StartupPacket};

fuzz_target!(|data: &[u8]| {
    let Ok(Some((StartupPacket::Startup(mut m), _))) = parse(data) else {
        return;
    };
    let _ = (m.user(), m.database());
    if m.take_stepgate_settings().is_err() {
        return;
    }
    let bytes = m.encode();
    if bytes.len() <= stepgate::wire::startup::MAX_STARTUP_LEN {
        match parse(&bytes) {
            Ok(Some((StartupPacket::Startup(again), n))) => {
                assert_eq!(n, bytes.len());
                assert_eq!(again.params, m.params);
            }
            other => panic!("re-encoded packet does not parse: {other:?}"),
        }
    }
});
