//! The persistent store's parser on arbitrary bytes: never panics, and a store it accepts has
//! no page twice (a duplicate page record is a damaged store, not a last-one-wins).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(pages) = dvm_engine::persist::parse(Path::new("fuzz.store"), bytes) {
        let mut keys: Vec<_> = pages.iter().map(|(key, _)| *key).collect();
        keys.sort_unstable();
        let count = keys.len();
        keys.dedup();
        assert_eq!(keys.len(), count, "a page accepted twice");
    }
});
