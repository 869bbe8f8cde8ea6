//! Token text: payload parsing and signature verification (against an empty keyring) never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stepgate::token::signed::{verify, Keyring};
use stepgate::token::Payload;

fuzz_target!(|data: &[u8]| {
    let _ = Payload::parse(data);
    let keyring = Keyring { certs: Vec::new() };
    let _ = verify(data, &keyring, std::time::SystemTime::UNIX_EPOCH);
});
