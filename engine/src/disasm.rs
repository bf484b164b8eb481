//! The disassembler: instructions and whole images -> canonical assembly text.
//!
//! The promise kept here (and tested over the whole ISA): assembling the output of
//! `disassemble` gives the same bytes. Immediates are printed in a form that re-encodes to the
//! same bits (a float only when its shortest decimal form round-trips, else the hex bit pattern),
//! branch targets inside the code get labels, and ELF sections keep their addresses.

use crate::abi;
use crate::codec::{Instr, Operand};
use crate::image::{LoadedImage, SectionKind};
use crate::isa::{Cond, ImmWidth, Op, Role, Ty};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Formats one instruction at address `at`. `name` gives a label for an address when the
/// listing defines one there; branch targets, addresses and 64-bit immediates use it.
pub fn format_instr(instr: &Instr, at: u64, name: &dyn Fn(u64) -> Option<String>) -> String {
    let def = instr.def();
    let layout = instr.layout();
    let mut out = String::from(def.mnemonic);
    match instr.op {
        Op::Br => {
            let cond = instr.cond.def();
            let rel = if instr.rel { "r" } else { "a" };
            match instr.cond {
                Cond::J => {
                    let _ = write!(out, ":{},{rel}", cond.spelling);
                }
                Cond::Ji => {
                    let _ = write!(out, ":{}", cond.spelling);
                }
                _ => {
                    let _ = write!(out, ":{},{},{rel}", cond.spelling, instr.tys[0]);
                }
            }
        }
        Op::Exit => {
            let _ = write!(out, ":{}", instr.exit.spelling());
        }
        Op::Exp => {
            let _ = write!(out, ":{},{}", instr.base.spelling(), instr.tys[0]);
        }
        op if op.is_arith() => {
            let _ = write!(out, ":{}", instr.tys[0]);
        }
        _ => {}
    }
    if instr.op == Op::Int {
        let _ = write!(out, " {:#x}", instr.imm8);
        return out;
    }
    let address = |addr: u64| name(addr).unwrap_or_else(|| format!("{addr:#x}"));
    for (index, (operand, role)) in instr.operands().iter().zip(layout.operands).enumerate() {
        out.push_str(if index == 0 { " " } else { ", " });
        match (operand, role) {
            (Operand::Imm(raw), Role::Target) => {
                // The operand always names the target address; for `r` the assembler turns it
                // back into the offset from this instruction.
                let target = if instr.rel {
                    at.wrapping_add(*raw)
                } else {
                    *raw
                };
                let text = name(target).unwrap_or_else(|| format_word(target));
                let _ = write!(out, "${text}");
            }
            (Operand::Imm(raw), Role::Read(slot) | Role::Write(slot)) => {
                let ty = instr.tys[usize::from(*slot & 1)];
                let wide_integer = !ty.is_float()
                    && (ty.size_bytes() == 8 || layout.imm_width == ImmWidth::Always8);
                let text = wide_integer
                    .then(|| name(*raw))
                    .flatten()
                    .unwrap_or_else(|| format_typed_imm(*raw, ty, layout.imm_width));
                let _ = write!(out, "${text}");
            }
            (Operand::Imm(raw), Role::Word) => {
                let text = name(*raw).unwrap_or_else(|| format_word(*raw));
                let _ = write!(out, "${text}");
            }
            (Operand::Direct(addr), _) => out.push_str(&address(*addr)),
            (Operand::Indirect(addr), _) => {
                let _ = write!(out, "({})", address(*addr));
            }
            (Operand::BaseDisp { disp, base }, _) => {
                let _ = write!(out, "{disp}({})", address(*base));
            }
        }
        if instr.op == Op::Conv {
            let _ = write!(out, ":{}", instr.tys[index & 1]);
        }
    }
    out
}

/// A 64-bit word: small values in signed decimal, others in hex.
fn format_word(raw: u64) -> String {
    let signed = raw as i64;
    if (-0x10000..0x10000).contains(&signed) {
        signed.to_string()
    } else {
        format!("{raw:#x}")
    }
}

fn format_typed_imm(raw: u64, ty: Ty, width: ImmWidth) -> String {
    match (ty, width) {
        (Ty::F64, _) => {
            let value = f64::from_bits(raw);
            if value.is_finite() {
                format!("{value:?}")
            } else {
                format!("{raw:#x}")
            }
        }
        (Ty::F32, _) => {
            let value = f32::from_bits(raw as u32);
            if value.is_finite() && raw >> 32 == 0 {
                format!("{value:?}")
            } else {
                format!("{raw:#x}")
            }
        }
        (_, ImmWidth::Always8) => format_word(raw),
        (Ty::S8, _) => (raw as u8 as i8).to_string(),
        (Ty::S32, _) => (raw as u32 as i32).to_string(),
        (Ty::S64, _) => format_word(raw),
        (Ty::U8 | Ty::U32 | Ty::U64, _) => {
            if raw < 0x10000 {
                raw.to_string()
            } else {
                format!("{raw:#x}")
            }
        }
    }
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '.')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// Disassembles a whole image into text that reassembles to the same image.
pub fn disassemble(loaded: &LoadedImage) -> String {
    let image = &loaded.image;
    let text_end = abi::CODE_BASE + loaded.code_len_bytes();
    // Where a label line can stand: an instruction boundary or the end of .text, or anywhere
    // from the start to the end of another section.
    let can_define = |addr: u64| -> bool {
        (addr == text_end || loaded.instr_at(addr).is_some())
            || image.sections.iter().any(|section| {
                section.kind != SectionKind::Text && section.addr <= addr && addr <= section.end()
            })
    };
    // Names the listing defines: the image's symbols, then local labels for branch targets.
    let mut defined: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut undefinable = Vec::new();
    let mut used = std::collections::HashSet::new();
    for symbol in &image.symbols {
        if !is_identifier(&symbol.name)
            || symbol.name.starts_with(".L")
            || !used.insert(symbol.name.clone())
        {
            undefinable.push(symbol);
        } else if can_define(symbol.addr) {
            defined
                .entry(symbol.addr)
                .or_default()
                .push(symbol.name.clone());
        } else {
            undefinable.push(symbol);
        }
    }
    for (offset, instr) in &loaded.code {
        let at = abi::CODE_BASE + u64::from(*offset);
        if let Some(target) = instr.branch_target(at) {
            if loaded.instr_at(target).is_some() && !defined.contains_key(&target) {
                defined.insert(target, vec![format!(".L{target:x}")]);
            }
        }
    }
    // Of the labels at an address, the one the source wrote in this instruction, else the one
    // defined last (`LoadedImage::label_for`'s rule, restricted to labels the listing defines).
    let mut uses_at: std::collections::HashMap<u64, Vec<&str>> = std::collections::HashMap::new();
    for used in &image.uses {
        uses_at.entry(used.at).or_default().push(&used.name);
    }
    // `nth`: the operands of this instruction naming `addr` before this one (the assembler
    // recorded the uses in operand order). Uses are kept only for addresses several labels
    // share; an operand there beyond the uses recorded (the source wrote a number, or a `.L`
    // label the image drops) stays a number: any of the names would add a use the image does
    // not have, and the listing would not assemble to the same image.
    let name_in = |at: Option<u64>, addr: u64, nth: usize| -> Option<String> {
        let list = defined.get(&addr)?;
        let used = at.and_then(|at| uses_at.get(&at)).and_then(|names| {
            names
                .iter()
                .filter(|name| list.iter().any(|label| label == **name))
                .nth(nth)
        });
        match used {
            Some(name) => Some(name.to_string()),
            None if at.is_some() && list.len() > 1 => None,
            None => list.last().cloned(),
        }
    };
    let mut printed = std::collections::HashSet::new();
    let mut emit_labels = |out: &mut String, addr: u64| {
        if printed.insert(addr) {
            for label in defined.get(&addr).into_iter().flatten() {
                let _ = writeln!(out, "{label}:");
            }
        }
    };

    let mut out = String::new();
    let _ = writeln!(
        out,
        "# DISA {} image: {} bytes of code at {:#x}, entry {:#x}",
        loaded.format.name(),
        loaded.code_len_bytes(),
        abi::CODE_BASE,
        image.entry
    );
    for symbol in &undefinable {
        let _ = writeln!(
            out,
            "# symbol `{}` at {:#x} cannot be a label here and is left out",
            symbol.name, symbol.addr
        );
    }
    out.push_str(".text\n");
    if image.entry != abi::CODE_BASE {
        let entry = name_in(None, image.entry, 0).unwrap_or_else(|| format!("{:#x}", image.entry));
        let _ = writeln!(out, ".entry {entry}");
    }
    for (offset, instr) in &loaded.code {
        let at = abi::CODE_BASE + u64::from(*offset);
        emit_labels(&mut out, at);
        let seen = std::cell::RefCell::new(Vec::<u64>::new());
        let text = format_instr(instr, at, &|addr| {
            let mut seen = seen.borrow_mut();
            let nth = seen.iter().filter(|earlier| **earlier == addr).count();
            seen.push(addr);
            name_in(Some(at), addr, nth)
        });
        let _ = writeln!(out, "    {text:<56} # {at:#x}");
    }
    emit_labels(&mut out, text_end);
    for section in &image.sections {
        if section.kind == SectionKind::Text {
            continue;
        }
        let _ = writeln!(
            out,
            "\n.section {}, {:#x}",
            section.kind.name(),
            section.addr
        );
        let mut label_offsets: Vec<u64> = defined
            .range(section.addr..=section.end())
            .map(|(addr, _)| addr - section.addr)
            .collect();
        label_offsets.push(section.len_bytes);
        let mut offset = 0u64;
        for stop in label_offsets {
            while offset < stop {
                let row_end = stop.min(offset + 16);
                if section.kind == SectionKind::Bss {
                    let _ = writeln!(out, "    .zero {}", stop - offset);
                    offset = stop;
                    continue;
                }
                let row: Vec<String> = section.bytes[offset as usize..row_end as usize]
                    .iter()
                    .map(|byte| format!("{byte:#04x}"))
                    .collect();
                let _ = writeln!(out, "    .byte {}", row.join(", "));
                offset = row_end;
            }
            emit_labels(&mut out, section.addr + stop);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::asm::assemble;
    use crate::image::{validate, write, Format};

    fn round_trip(source: &str, format: Format) {
        let image = assemble("t.dasm", source).unwrap_or_else(|err| panic!("{err}"));
        let bytes = write(&image, format).expect("writes");
        let loaded = crate::image::load(&bytes).expect("loads");
        let text = disassemble(&loaded);
        let again = assemble("dis.dasm", &text).unwrap_or_else(|err| panic!("{err}\n{text}"));
        let again_bytes = write(&again, format).expect("writes");
        assert_eq!(bytes, again_bytes, "listing:\n{text}");
        let _ = validate(format, again).expect("valid");
    }

    #[test]
    fn flat_programs_round_trip() {
        round_trip(
            "start: mov $72:ub, 0x100000208:ue\n loop: sub:se 0x10, $1, 0x10\n br:nz,se,a 0x10, $loop\n br:l,fd,r -8(0x200000000), $2.5, $start\n br:ji (0x18)\n exit:c\n",
            Format::Flat,
        );
    }

    #[test]
    fn elf_programs_round_trip() {
        round_trip(
            "main: mov table:se, 0x10:se\n br:j,a $done\n mov $msg:ue, 8(buf):ue\ndone: exit:a\nafter_code:\n.data\ntable: .quad 7, -1\nmsg: .ascii \"hello\"\ndata_end:\n.rodata\npi: .double 3.25\n.bss\nbuf: .zero 100\nend: .zero 4\nbss_end:\n",
            Format::Elf,
        );
    }

    #[test]
    fn an_address_two_labels_share_keeps_the_name_each_operand_was_written_with() {
        // `stop` and `spinner` share an address. The branch names it through the `.L` label
        // (which the image drops), the others through `spinner` or an expression (no name):
        // only the operands that wrote `spinner` may name it in the listing, or the listing
        // assembles to an image with more uses (found by the `assemble` fuzz target).
        let source = concat!(
            "main:\n",
            " br:z,ue,a 0x4000000000, $.Lhere\n",
            " mov $spinner:ue, 0x200000000:ue\n",
            " mov $spinner+0:ue, 0x200000008:ue\n",
            " add:ue $spinner+0, $spinner, 0x200000010\n",
            ".Lhere:\nstop:\nspinner:\n exit:c\n",
        );
        round_trip(source, Format::Elf);
    }

    #[test]
    fn immediates_print_in_reencodable_forms() {
        assert_eq!(format_typed_imm(0xff, Ty::S8, ImmWidth::TypeSize), "-1");
        assert_eq!(format_typed_imm(0xff, Ty::U8, ImmWidth::TypeSize), "255");
        assert_eq!(
            format_typed_imm(f64::NAN.to_bits(), Ty::F64, ImmWidth::TypeSize),
            "0x7ff8000000000000"
        );
        assert_eq!(
            format_typed_imm((-0.0f64).to_bits(), Ty::F64, ImmWidth::TypeSize),
            "-0.0"
        );
        assert_eq!(format_typed_imm(u64::MAX, Ty::S8, ImmWidth::Always8), "-1");
        assert_eq!(format_word(0x8_0000_0000), "0x800000000");
    }
}
