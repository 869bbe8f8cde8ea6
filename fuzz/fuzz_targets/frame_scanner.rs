//! The frame scanner never panics and never steps past the bytes it was given, whatever the bytes and
//! however they are chunked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stepgate::wire::frame::{FrameScanner, Step};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, data)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut scanner = FrameScanner::new(1 << 20);
    let mut pending: Vec<u8> = Vec::new();
    for piece in data.chunks(chunk) {
        pending.extend_from_slice(piece);
        loop {
            let step = match scanner.step(&pending, |t| t % 2 == 0) {
                Ok(s) => s,
                Err(_) => return,
            };
            let used = match step {
                Step::NeedMore => break,
                Step::Message { len, .. } => len,
                Step::Stream { now, .. } => now,
                Step::Pass(n) => n,
            };
            assert!(used > 0 && used <= pending.len());
            pending.drain(..used);
        }
    }
});
