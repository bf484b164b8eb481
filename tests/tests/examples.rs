//! Every bundled example assembles, loads, and survives asm -> disasm -> asm with identical
//! bytes in every format it fits (ELF always; flat when it holds only code).

use dvm_engine::{asm, disasm, image};
use std::path::PathBuf;

fn examples() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("examples/ exists")
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "dasm"))
        .collect();
    paths.sort();
    paths
}

#[test]
fn examples_round_trip_through_the_disassembler() {
    let paths = examples();
    assert!(
        paths.len() >= 3,
        "expected hello, loop and spawn at least: {paths:?}"
    );
    let mut flat_count = 0;
    for path in paths {
        let name = path.display().to_string();
        let source = std::fs::read_to_string(&path).expect("readable");
        let image = asm::assemble(&name, &source).unwrap_or_else(|err| panic!("{err}"));
        for format in [image::Format::Elf, image::Format::Flat] {
            let Ok(bytes) = image::write(&image, format) else {
                assert_eq!(format, image::Format::Flat, "{name}: ELF always writes");
                continue;
            };
            let loaded = image::load(&bytes).unwrap_or_else(|err| panic!("{name}: {err}"));
            assert_eq!(loaded.format, format);
            let listing = disasm::disassemble(&loaded);
            let again = asm::assemble("listing.dasm", &listing).unwrap_or_else(|err| {
                panic!("{name} listing does not assemble:\n{err}\n{listing}")
            });
            let again_bytes = image::write(&again, format).expect("writes");
            assert_eq!(
                bytes,
                again_bytes,
                "{name} ({}) changed through the disassembler:\n{listing}",
                format.name()
            );
            if format == image::Format::Flat {
                flat_count += 1;
            }
        }
    }
    assert!(
        flat_count >= 1,
        "at least one example is pure code and round-trips as flat"
    );
}
