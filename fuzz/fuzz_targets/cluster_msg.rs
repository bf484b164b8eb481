//! The cluster protocol's message decoder, and the engine's decoders of tasks and endings that
//! those messages carry, on arbitrary bytes: never panics, and every message it accepts
//! re-encodes to exactly the same bytes.
#![no_main]

use dvm_cluster::msg::Msg;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(msg) = Msg::decode(bytes) {
        assert!(msg.encode() == bytes, "decode/encode is not exact for {msg:?}");
    }
    let _ = dvm_engine::report::decode_task(bytes);
    let _ = dvm_engine::report::decode_ended(bytes);
});
