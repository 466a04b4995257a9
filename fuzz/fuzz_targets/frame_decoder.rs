//! Any bytes a peer sends: decoding must return frames or an error, never panic, and every
//! frame it returns must encode back to the bytes it came from.
#![no_main]

use bytes::BytesMut;
use kt_common::wire::{MAX_FRAME, decode_stream};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    if let Ok(frames) = decode_stream(&mut buf, MAX_FRAME) {
        let consumed = data.len() - buf.len();
        let mut again = BytesMut::new();
        for f in &frames {
            again.extend_from_slice(&f.encode());
        }
        // Strings longer than the wire allows cannot come off the wire, so re-encoding is exact.
        assert_eq!(&again[..], &data[..consumed], "re-encoding differs");
    }
});
