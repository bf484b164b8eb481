//! The cluster protocol's message decoder, and the engine's decoders of tasks and endings that
//! those messages carry, on arbitrary bytes: never panics, and every message it accepts
//! re-encodes to bytes that decode to the same message (a page may be sent whole or as its
//! non-zero runs, so equal messages need not be equal bytes).
#![no_main]

use dvm_cluster::msg::Msg;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(msg) = Msg::decode(bytes) {
        let again = msg.encode();
        assert!(Msg::decode(&again).as_ref() == Ok(&msg), "encode/decode changes {msg:?}");
    }
    let _ = dvm_engine::report::decode_task(bytes);
    let _ = dvm_engine::report::decode_ended(bytes);
});
