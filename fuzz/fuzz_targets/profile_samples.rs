//! Profile samples as a peer sends them to node 0, on arbitrary bytes: never panics, never
//! allocates beyond what the bytes can hold, and what it accepts re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(samples) = dvm_perf::profile::decode(bytes) {
        assert_eq!(dvm_perf::profile::encode(&samples), bytes);
    }
});
