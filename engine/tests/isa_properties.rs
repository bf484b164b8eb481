//! Properties of the whole toolchain over the whole ISA:
//! - every instruction × addressing mode × type attribute encodes, decodes to itself, and its
//!   disassembly reassembles to the same bytes;
//! - random bytes never make the decoder or the loader panic, and whatever decodes re-encodes
//!   to the same bytes;
//! - random text and random token streams never make the assembler panic.

use dvm_engine::abi::CODE_BASE;
use dvm_engine::asm::assemble;
use dvm_engine::codec::{decode, encode_to_vec, Instr, Operand};
use dvm_engine::disasm::format_instr;
use dvm_engine::image;
use dvm_engine::isa::{
    self, AddrMode, Cond, ExitMode, ExpBase, Field, Layout, Role, Status, Ty, CONDS, ISA,
};
use proptest::prelude::*;

/// Every valid (instruction, modifiers) combination with operands of every addressing mode.
fn all_shapes() -> Vec<Instr> {
    let mut shapes = Vec::new();
    for def in ISA {
        let variants: Vec<(Instr, &Layout)> = match def.layout {
            Some(layout) => vec![(Instr::new(def.op), layout)],
            None => CONDS
                .iter()
                .map(|cond| {
                    let mut instr = Instr::new(def.op);
                    instr.cond = cond.cond;
                    (instr, cond.layout)
                })
                .collect(),
        };
        for (base, layout) in variants {
            let attr_slots = layout
                .fields
                .iter()
                .filter(|f| matches!(f, Field::Attr(_)))
                .count();
            let tys: Vec<[Ty; 2]> = match attr_slots {
                0 => vec![[Ty::S64, Ty::S64]],
                1 => Ty::ALL
                    .iter()
                    .filter(|ty| def.attrs.allows(**ty))
                    .map(|ty| [*ty, Ty::S64])
                    .collect(),
                _ => Ty::ALL
                    .iter()
                    .flat_map(|a| Ty::ALL.iter().map(move |b| [*a, *b]))
                    .collect(),
            };
            let rels: &[bool] = if layout.fields.contains(&Field::Rel) {
                &[false, true]
            } else {
                &[false]
            };
            let exits: &[ExitMode] = if layout.fields.contains(&Field::Exit) {
                &ExitMode::ALL
            } else {
                &[ExitMode::Commit]
            };
            let bases: &[ExpBase] = if layout.fields.contains(&Field::Base) {
                &ExpBase::ALL
            } else {
                &[ExpBase::E]
            };
            let mode_lists = mode_combinations(layout.operands);
            for ty in &tys {
                for rel in rels {
                    for exit in exits {
                        for exp_base in bases {
                            for modes in &mode_lists {
                                let mut instr = base;
                                instr.tys = *ty;
                                instr.rel = *rel;
                                instr.exit = *exit;
                                instr.base = *exp_base;
                                if def.op == isa::Op::Int {
                                    instr.imm8 = 0x80;
                                }
                                for mode in modes {
                                    instr.push_operand(match mode {
                                        AddrMode::Immediate => Operand::Imm(0),
                                        AddrMode::Direct => Operand::Direct(0),
                                        AddrMode::Indirect => Operand::Indirect(0),
                                        AddrMode::BaseDisp => {
                                            Operand::BaseDisp { disp: 0, base: 0 }
                                        }
                                    });
                                }
                                shapes.push(instr);
                            }
                        }
                    }
                }
            }
        }
    }
    shapes
}

fn mode_combinations(roles: &[Role]) -> Vec<Vec<AddrMode>> {
    let mut lists = vec![Vec::new()];
    for role in roles {
        let modes: &[AddrMode] = match role {
            Role::Target => &[AddrMode::Immediate],
            Role::Write(_) => &[AddrMode::Direct, AddrMode::Indirect, AddrMode::BaseDisp],
            _ => &AddrMode::ALL,
        };
        lists = lists
            .into_iter()
            .flat_map(|list| {
                modes.iter().map(move |mode| {
                    let mut next = list.clone();
                    next.push(*mode);
                    next
                })
            })
            .collect();
    }
    lists
}

/// Fills a shape's operands with values derived from `seed` that fit their encoded widths.
fn with_values(mut instr: Instr, seed: u64) -> Instr {
    let layout = instr.layout();
    let tys = instr.tys;
    for (index, operand) in instr.operands_mut().iter_mut().enumerate() {
        let value = seed.rotate_left(index as u32 * 13)
            ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        *operand = match operand {
            Operand::Imm(_) => {
                let role = layout.operands[index];
                let width = dvm_engine::codec::imm_len_bytes(layout, role, tys);
                Operand::Imm(if width == 8 {
                    value
                } else {
                    value & ((1u64 << (width * 8)) - 1)
                })
            }
            Operand::Direct(_) => Operand::Direct(value),
            Operand::Indirect(_) => Operand::Indirect(value),
            Operand::BaseDisp { .. } => Operand::BaseDisp {
                disp: value as i32,
                base: value.rotate_left(7),
            },
        };
    }
    instr
}

#[test]
fn every_shape_round_trips_through_bytes_and_text() {
    let shapes = all_shapes();
    assert!(
        shapes.len() > 3000,
        "only {} shapes enumerated",
        shapes.len()
    );
    let mut checked_text = 0;
    for (index, shape) in shapes.iter().enumerate() {
        let instr = with_values(*shape, 0x0123_4567_89ab_cdef ^ index as u64);
        let bytes = encode_to_vec(&instr).unwrap_or_else(|err| panic!("{instr:?}: {err}"));
        assert_eq!(bytes.len(), instr.len_bytes());
        let (decoded, len) = decode(&bytes, 0).unwrap_or_else(|err| panic!("{instr:?}: {err}"));
        assert_eq!(len, bytes.len());
        assert_eq!(decoded, instr);
        if instr.def().status == Status::Unsupported {
            continue; // decoded and disassembled, but the assembler refuses them by design
        }
        let text = format_instr(&instr, CODE_BASE, &|_| None);
        let image = assemble("shape.dasm", &format!("{text}\n"))
            .unwrap_or_else(|err| panic!("{text}\n{err}"));
        assert_eq!(image.text(), bytes.as_slice(), "{text}");
        checked_text += 1;
    }
    assert!(checked_text > 3000);
}

#[test]
fn every_branch_condition_and_type_is_covered() {
    let shapes = all_shapes();
    for cond in CONDS {
        assert!(shapes
            .iter()
            .any(|s| s.op == isa::Op::Br && s.cond == cond.cond));
    }
    for ty in Ty::ALL {
        assert!(shapes
            .iter()
            .any(|s| s.op == isa::Op::Add && s.tys[0] == ty));
        assert!(shapes
            .iter()
            .any(|s| s.op == isa::Op::Conv && s.tys == [ty, Ty::F32]));
        assert!(shapes
            .iter()
            .any(|s| s.op == isa::Op::Br && s.cond == Cond::L && s.tys[0] == ty));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, .. ProptestConfig::default() })]

    #[test]
    fn decoding_random_bytes_never_panics_and_is_exact(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        if let Ok((instr, len)) = decode(&bytes, 0) {
            let again = encode_to_vec(&instr).expect("decoded instructions encode");
            prop_assert_eq!(&again[..], &bytes[..len]);
        }
        let _ = image::load(&bytes);
    }

    #[test]
    fn decoding_plausible_headers_never_panics(opcode in 0u16..0x400, tail in proptest::collection::vec(any::<u8>(), 0..70)) {
        let mut bytes = vec![(opcode >> 3) as u8, ((opcode & 7) << 5) as u8];
        bytes.extend(tail);
        if let Ok((instr, len)) = decode(&bytes, 0) {
            prop_assert_eq!(encode_to_vec(&instr).expect("encodes"), bytes[..len].to_vec());
        }
    }

    #[test]
    fn assembling_random_text_never_panics(text in "\\PC{0,200}") {
        let _ = assemble("random.dasm", &text);
    }

    #[test]
    fn assembling_random_token_streams_never_panics(tokens in proptest::collection::vec(
        prop_oneof![
            Just("add:se".to_string()), Just("mov".to_string()), Just("br:l,sd,a".to_string()),
            Just("br:j".to_string()), Just("exit:c".to_string()), Just("newr".to_string()), Just("int".to_string()),
            Just(".data".to_string()), Just(".quad".to_string()), Just(".equ".to_string()), Just(".zero".to_string()),
            Just(".align".to_string()), Just(".ascii".to_string()), Just(".section".to_string()), Just(".entry".to_string()),
            Just("$".to_string()), Just(",".to_string()), Just("(".to_string()), Just(")".to_string()),
            Just(":".to_string()), Just("\n".to_string()), Just("+".to_string()), Just("-".to_string()),
            Just("label:".to_string()), Just("label".to_string()), Just("'a'".to_string()), Just("\"s\\x4".to_string()),
            Just(":fd".to_string()), Just(":se".to_string()), Just("1.5e".to_string()), Just("#".to_string()),
            any::<u64>().prop_map(|v| format!("{v:#x}")), any::<i64>().prop_map(|v| v.to_string()),
            "[a-z_.]{1,6}",
        ],
        0..40,
    )) {
        let text = tokens.join(" ");
        let _ = assemble("tokens.dasm", &text);
    }
}
