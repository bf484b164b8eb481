//! The assembler on arbitrary text: never panics; whatever it accepts validates, writes as ELF,
//! loads back, and survives disassembly and reassembly unchanged.
#![no_main]

use dvm_engine::{asm, disasm, image};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    let Ok(assembled) = asm::assemble("fuzz.dasm", text) else { return };
    let Ok(loaded) = image::validate(image::Format::Elf, assembled) else { return };
    let elf = image::write(&loaded.image, image::Format::Elf).expect("ELF always writes");
    let reloaded = image::load(&elf).expect("a written image loads");
    let listing = disasm::disassemble(&reloaded);
    let again = asm::assemble("listing.dasm", &listing).expect("a listing assembles");
    let again = image::write(&again, image::Format::Elf).expect("writes");
    assert!(again == elf, "the image changed through disassembly:\n{listing}");
});
