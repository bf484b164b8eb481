//! The instruction decoder on arbitrary bytes: never panics, and whatever it accepts re-encodes
//! to exactly the bytes it consumed.
#![no_main]

use dvm_engine::codec::{decode, encode_to_vec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok((instr, len)) = decode(bytes, 0) {
        let again = encode_to_vec(&instr).expect("a decoded instruction encodes");
        assert!(again[..] == bytes[..len], "decode/encode is not exact: {instr:?}");
    }
});
