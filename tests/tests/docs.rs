//! `docs/DISA.md` is generated from the ISA table where it lists instructions: this test fails
//! when the two drift apart, and `DVM_BLESS=1` rewrites the generated part.

use dvm_engine::isa;
use std::path::PathBuf;

const BEGIN: &str = "<!-- BEGIN GENERATED: ISA TABLES (dvm isa) -->\n";
const END: &str = "<!-- END GENERATED -->\n";

#[test]
fn disa_md_matches_the_isa_table() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/DISA.md");
    let text = std::fs::read_to_string(&path).expect("docs/DISA.md exists");
    let begin = text.find(BEGIN).expect("generated section start marker");
    let end = text.find(END).expect("generated section end marker");
    let generated = isa::markdown_tables();
    let current = &text[begin + BEGIN.len()..end];
    if current != generated {
        if std::env::var_os("DVM_BLESS").is_some() {
            let updated = format!("{}{BEGIN}{generated}{}", &text[..begin], &text[end..]);
            std::fs::write(&path, updated).expect("rewrite docs/DISA.md");
            return;
        }
        panic!("docs/DISA.md is out of date with engine/src/isa.rs; rerun with DVM_BLESS=1");
    }
    for def in isa::ISA {
        assert!(
            current.contains(&format!("`{}`", def.mnemonic)),
            "{} missing",
            def.mnemonic
        );
    }
}
