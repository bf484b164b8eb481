//! The image loader (flat and ELF) on arbitrary bytes: never panics; an accepted image
//! disassembles.
#![no_main]

use dvm_engine::{disasm, image};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(loaded) = image::load(bytes) {
        let _ = disasm::disassemble(&loaded);
    }
});
