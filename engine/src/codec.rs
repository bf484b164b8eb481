//! The i0 binary encoding: `Instr` <-> bytes, driven entirely by the layouts in `isa`.
//!
//! Decoding never panics and never trusts a length it has not checked: every read goes through
//! `Reader`, which fails with the byte offset and the bytes seen. Decoding is strict enough that
//! `encode(decode(bytes)) == bytes` for every byte string `decode` accepts (padding bits must be
//! zero, immediates keep their stored bits), which is what makes disassembly round-trip exactly.

use crate::isa::{
    self, AddrMode, Cond, ExitMode, ExpBase, Field, ImmWidth, InstrDef, Layout, Op, Role, Ty,
    FIRST_FIELD_BIT,
};
use std::fmt;

/// Most operands an instruction has (`spawnx`, `strcmp`, `grep`).
pub const MAX_OPERANDS: usize = 5;
/// Longest encoding: a 4-byte header and five 12-byte base+displacement operands.
pub const MAX_INSTR_LEN_BYTES: usize = 4 + MAX_OPERANDS * 12;

/// An operand as encoded. Immediates keep the bits exactly as stored (zero-extended from their
/// stored width); what they mean depends on the operand's type and is decided when executing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operand {
    Imm(u64),
    Direct(u64),
    Indirect(u64),
    BaseDisp { disp: i32, base: u64 },
}

impl Operand {
    pub fn mode(self) -> AddrMode {
        match self {
            Operand::Imm(_) => AddrMode::Immediate,
            Operand::Direct(_) => AddrMode::Direct,
            Operand::Indirect(_) => AddrMode::Indirect,
            Operand::BaseDisp { .. } => AddrMode::BaseDisp,
        }
    }
}

/// One decoded instruction. Fields an instruction does not use hold their defaults (see `new`),
/// so two encodings of the same instruction compare equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Instr {
    pub op: Op,
    /// Type attributes: `[0]` for most instructions, `[0]` source and `[1]` destination for `mov`.
    pub tys: [Ty; 2],
    pub cond: Cond,
    /// Branch target relative to this instruction's address.
    pub rel: bool,
    pub exit: ExitMode,
    pub base: ExpBase,
    pub imm8: u8,
    operands: [Operand; MAX_OPERANDS],
    operand_count: u8,
}

impl Instr {
    pub fn new(op: Op) -> Instr {
        Instr {
            op,
            tys: [Ty::S64, Ty::S64],
            cond: Cond::J,
            rel: false,
            exit: ExitMode::Commit,
            base: ExpBase::E,
            imm8: 0,
            operands: [Operand::Imm(0); MAX_OPERANDS],
            operand_count: 0,
        }
    }

    /// Appends an operand; `false` if the instruction already has the most any instruction has.
    pub fn push_operand(&mut self, operand: Operand) -> bool {
        let index = usize::from(self.operand_count);
        if index >= MAX_OPERANDS {
            return false;
        }
        self.operands[index] = operand;
        self.operand_count += 1;
        true
    }

    pub fn operands(&self) -> &[Operand] {
        &self.operands[..usize::from(self.operand_count)]
    }

    /// Operand `index` without slicing (for the interpreter's hot path; a constant index into
    /// the fixed array needs no bounds check). Past the operand count it is `Imm(0)`.
    #[inline(always)]
    pub fn operand(&self, index: usize) -> Operand {
        self.operands[index]
    }

    pub fn operands_mut(&mut self) -> &mut [Operand] {
        &mut self.operands[..usize::from(self.operand_count)]
    }

    pub fn def(&self) -> &'static InstrDef {
        self.op.def()
    }

    /// The layout this instruction encodes with (branches: by condition).
    pub fn layout(&self) -> &'static Layout {
        match self.def().layout {
            Some(layout) => layout,
            None => self.cond.def().layout,
        }
    }

    /// Encoded length in bytes.
    pub fn len_bytes(&self) -> usize {
        let layout = self.layout();
        let mut len = layout.header_len_bytes as usize;
        for (index, role) in layout.operands.iter().enumerate() {
            let mode = self
                .operands()
                .get(index)
                .map_or(AddrMode::Immediate, |operand| operand.mode());
            len += operand_len_bytes(layout, *role, mode, self.tys);
        }
        len
    }

    /// The absolute branch target of a `br` with an immediate target, given this instruction's address.
    pub fn branch_target(&self, at: u64) -> Option<u64> {
        if self.op != Op::Br || self.cond == Cond::Ji {
            return None;
        }
        let Some(Operand::Imm(raw)) = self.operands().last().copied() else {
            return None;
        };
        Some(if self.rel { at.wrapping_add(raw) } else { raw })
    }
}

/// Bytes an operand occupies in the operand data.
pub fn operand_len_bytes(layout: &Layout, role: Role, mode: AddrMode, tys: [Ty; 2]) -> usize {
    match mode {
        AddrMode::Direct | AddrMode::Indirect => 8,
        AddrMode::BaseDisp => 12,
        AddrMode::Immediate => imm_len_bytes(layout, role, tys),
    }
}

pub fn imm_len_bytes(layout: &Layout, role: Role, tys: [Ty; 2]) -> usize {
    match (layout.imm_width, role) {
        (_, Role::Word | Role::Target) | (ImmWidth::Always8, _) => 8,
        (ImmWidth::TypeSize, Role::Read(index) | Role::Write(index)) => {
            tys[usize::from(index & 1)].size_bytes() as usize
        }
    }
}

/// Why an instruction could not be encoded (the assembler reports these at the source line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EncodeError {
    WrongOperandCount {
        mnemonic: &'static str,
        expected: usize,
        found: usize,
    },
    TypeNotAllowed {
        mnemonic: &'static str,
        ty: Ty,
        allowed: &'static str,
    },
    ImmediateDestination {
        operand: usize,
    },
    ImmediateTooWide {
        operand: usize,
        value: u64,
        width_bytes: usize,
    },
    UnsupportedInstruction {
        mnemonic: &'static str,
    },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::WrongOperandCount {
                mnemonic,
                expected,
                found,
            } => {
                write!(f, "`{mnemonic}` takes {expected} operand(s), found {found}")
            }
            EncodeError::TypeNotAllowed {
                mnemonic,
                ty,
                allowed,
            } => {
                write!(
                    f,
                    "`{mnemonic}` does not take type `{ty}` (it takes: {allowed})"
                )
            }
            EncodeError::ImmediateDestination { operand } => {
                write!(
                    f,
                    "operand {} is written, so it cannot be an immediate",
                    operand + 1
                )
            }
            EncodeError::ImmediateTooWide {
                operand,
                value,
                width_bytes,
            } => write!(
                f,
                "immediate {value:#x} of operand {} does not fit in {width_bytes} byte(s)",
                operand + 1
            ),
            EncodeError::UnsupportedInstruction { mnemonic } => write!(
                f,
                "`{mnemonic}` has no defined semantics in DISA and cannot be assembled"
            ),
        }
    }
}

impl std::error::Error for EncodeError {}

/// Checks what `encode` needs that the types do not guarantee.
pub fn validate(instr: &Instr) -> Result<(), EncodeError> {
    let def = instr.def();
    let layout = instr.layout();
    if instr.operands().len() != layout.operands.len() {
        return Err(EncodeError::WrongOperandCount {
            mnemonic: def.mnemonic,
            expected: layout.operands.len(),
            found: instr.operands().len(),
        });
    }
    for field in layout.fields {
        if let Field::Attr(index) = field {
            let ty = instr.tys[usize::from(*index & 1)];
            if !def.attrs.allows(ty) {
                return Err(EncodeError::TypeNotAllowed {
                    mnemonic: def.mnemonic,
                    ty,
                    allowed: def.attrs.describe(),
                });
            }
        }
    }
    for (index, (role, operand)) in layout.operands.iter().zip(instr.operands()).enumerate() {
        match (role, operand) {
            (Role::Write(_), Operand::Imm(_)) => {
                return Err(EncodeError::ImmediateDestination { operand: index })
            }
            (_, Operand::Imm(value)) => {
                let width_bytes = imm_len_bytes(layout, *role, instr.tys);
                if width_bytes < 8 && value >> (width_bytes * 8) != 0 {
                    return Err(EncodeError::ImmediateTooWide {
                        operand: index,
                        value: *value,
                        width_bytes,
                    });
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Appends the encoding of `instr` to `out`.
pub fn encode(instr: &Instr, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    validate(instr)?;
    let def = instr.def();
    let layout = instr.layout();
    let header_bits = layout.header_len_bytes * 8;
    let mut header: u32 = 0;
    // Bit 0 (the address-size prefix) stays 0: 8-byte address mode, the only one.
    let mut put = |position: u32, width: u32, value: u32| {
        let shift = header_bits - position - width;
        header |= (value & ((1 << width) - 1)) << shift;
    };
    put(1, 10, u32::from(def.i0_opcode));
    let mut position = FIRST_FIELD_BIT;
    for field in layout.fields {
        let width = field.width_bits();
        let value = match *field {
            Field::Attr(index) => u32::from(instr.tys[usize::from(index & 1)].code()),
            Field::Mode(index) => u32::from(instr.operands()[usize::from(index)].mode().code()),
            Field::Cond => u32::from(instr.cond.def().code),
            Field::Rel => u32::from(instr.rel),
            Field::Exit => u32::from(instr.exit.code()),
            Field::Base => u32::from(instr.base.code()),
            Field::Imm8 => u32::from(instr.imm8),
            Field::Pad(_) => 0,
        };
        put(position, width, value);
        position += width;
    }
    out.extend_from_slice(&header.to_be_bytes()[4 - layout.header_len_bytes as usize..]);
    for (role, operand) in layout.operands.iter().zip(instr.operands()) {
        match *operand {
            Operand::Imm(value) => {
                let width = imm_len_bytes(layout, *role, instr.tys);
                out.extend_from_slice(&value.to_le_bytes()[..width]);
            }
            Operand::Direct(addr) | Operand::Indirect(addr) => {
                out.extend_from_slice(&addr.to_le_bytes())
            }
            Operand::BaseDisp { disp, base } => {
                out.extend_from_slice(&disp.to_le_bytes());
                out.extend_from_slice(&base.to_le_bytes());
            }
        }
    }
    Ok(())
}

/// Encodes into a fresh vector.
pub fn encode_to_vec(instr: &Instr) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(instr.len_bytes());
    encode(instr, &mut out)?;
    Ok(out)
}

/// What is wrong with the bytes at an offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeErrorKind {
    Truncated {
        needed_bytes: usize,
        available_bytes: usize,
    },
    AddressSizePrefix,
    UnknownOpcode(u16),
    ReservedOpcode {
        opcode: u16,
        name: &'static str,
    },
    BadType {
        mnemonic: &'static str,
        reason: String,
    },
    BadMode {
        operand: usize,
        code: u8,
    },
    ImmediateDestination {
        mnemonic: &'static str,
        operand: usize,
    },
    BadCond(u8),
    UnsupportedCond {
        code: u8,
        name: &'static str,
    },
    BadExpBase(u8),
    PaddingSet,
}

/// A decoding failure: where (byte offset from the start of the decoded region) and the bytes there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    pub offset: u64,
    pub bytes: Vec<u8>,
    pub kind: DecodeErrorKind,
}

impl fmt::Display for DecodeErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeErrorKind::Truncated {
                needed_bytes,
                available_bytes,
            } => write!(
                f,
                "truncated instruction: needs {needed_bytes} bytes, only {available_bytes} left"
            ),
            DecodeErrorKind::AddressSizePrefix => {
                f.write_str("address-size prefix bit is set (only the 8-byte address mode exists)")
            }
            DecodeErrorKind::UnknownOpcode(opcode) => write!(f, "unknown opcode {opcode:#05x}"),
            DecodeErrorKind::ReservedOpcode { opcode, name } => write!(
                f,
                "opcode {opcode:#05x} (`{name}`) is reserved and was never defined"
            ),
            DecodeErrorKind::BadType { mnemonic, reason } => write!(f, "`{mnemonic}`: {reason}"),
            DecodeErrorKind::BadMode { operand, code } => write!(
                f,
                "operand {} has undefined addressing mode {code}",
                operand + 1
            ),
            DecodeErrorKind::ImmediateDestination { mnemonic, operand } => write!(
                f,
                "`{mnemonic}` operand {} is written but encoded as an immediate",
                operand + 1
            ),
            DecodeErrorKind::BadCond(code) => write!(f, "undefined branch condition {code:#x}"),
            DecodeErrorKind::UnsupportedCond { code, name } => write!(
                f,
                "branch condition `{name}` ({code:#x}) is undocumented and not supported"
            ),
            DecodeErrorKind::BadExpBase(code) => write!(f, "undefined `exp` base {code}"),
            DecodeErrorKind::PaddingSet => f.write_str("reserved header bits are not zero"),
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "at byte offset {:#x}: {} (bytes:",
            self.offset, self.kind
        )?;
        for byte in &self.bytes {
            write!(f, " {byte:02x}")?;
        }
        f.write_str(")")
    }
}

impl std::error::Error for DecodeError {}

/// Bytes shown in an error: enough to recognise the instruction, short enough to read.
const SHOWN_BYTES: usize = 8;

/// Decodes the instruction at the start of `bytes`. `offset` is where `bytes` starts in the
/// caller's region and is only used in errors. Returns the instruction and its length.
pub fn decode(bytes: &[u8], offset: u64) -> Result<(Instr, usize), DecodeError> {
    let fail = |kind: DecodeErrorKind| DecodeError {
        offset,
        bytes: bytes[..bytes.len().min(SHOWN_BYTES)].to_vec(),
        kind,
    };
    let need = |needed_bytes: usize| -> Result<(), DecodeError> {
        if bytes.len() < needed_bytes {
            Err(fail(DecodeErrorKind::Truncated {
                needed_bytes,
                available_bytes: bytes.len(),
            }))
        } else {
            Ok(())
        }
    };
    need(2)?;
    if bytes[0] & 0x80 != 0 {
        return Err(fail(DecodeErrorKind::AddressSizePrefix));
    }
    let opcode = (u16::from(bytes[0] & 0x7f) << 3) | u16::from(bytes[1] >> 5);
    let Some(def) = isa::by_opcode(opcode) else {
        if let Some((_, name)) = isa::RESERVED_OPCODES.iter().find(|(op, _)| *op == opcode) {
            return Err(fail(DecodeErrorKind::ReservedOpcode { opcode, name }));
        }
        return Err(fail(DecodeErrorKind::UnknownOpcode(opcode)));
    };
    let mut instr = Instr::new(def.op);
    let layout = match def.layout {
        Some(layout) => layout,
        None => {
            // Branch: the condition sits in the first field and selects the layout.
            let code = (bytes[1] >> 1) & 0xf;
            if let Some((_, name)) = isa::UNSUPPORTED_BRANCH_MODES
                .iter()
                .find(|(mode, _)| *mode == code)
            {
                return Err(fail(DecodeErrorKind::UnsupportedCond { code, name }));
            }
            let Some(cond) = Cond::from_code(code) else {
                return Err(fail(DecodeErrorKind::BadCond(code)));
            };
            instr.cond = cond.cond;
            cond.layout
        }
    };
    let header_len = layout.header_len_bytes as usize;
    need(header_len)?;
    let mut header_be = [0u8; 4];
    header_be[4 - header_len..].copy_from_slice(&bytes[..header_len]);
    let header = u32::from_be_bytes(header_be);
    let header_bits = layout.header_len_bytes * 8;
    let get = |position: u32, width: u32| -> u32 {
        (header >> (header_bits - position - width)) & ((1 << width) - 1)
    };
    let mut modes = [AddrMode::Immediate; MAX_OPERANDS];
    let mut position = FIRST_FIELD_BIT;
    for field in layout.fields {
        let width = field.width_bits();
        // Every field is at most 8 bits wide, so the value fits a u8.
        let value = get(position, width) as u8;
        position += width;
        match *field {
            Field::Attr(index) => {
                let ty = isa::Ty::from_code(value).map_err(|err| {
                    fail(DecodeErrorKind::BadType {
                        mnemonic: def.mnemonic,
                        reason: err.to_string(),
                    })
                })?;
                if !def.attrs.allows(ty) {
                    return Err(fail(DecodeErrorKind::BadType {
                        mnemonic: def.mnemonic,
                        reason: format!(
                            "type `{ty}` is not allowed (it takes: {})",
                            def.attrs.describe()
                        ),
                    }));
                }
                instr.tys[usize::from(index & 1)] = ty;
            }
            Field::Mode(index) => {
                let operand = usize::from(index);
                modes[operand] = AddrMode::from_code(value).ok_or_else(|| {
                    fail(DecodeErrorKind::BadMode {
                        operand,
                        code: value,
                    })
                })?;
            }
            Field::Cond => {}
            Field::Rel => instr.rel = value == 1,
            Field::Exit => {
                // Two bits, four modes: always defined.
                instr.exit = ExitMode::from_code(value).unwrap_or(ExitMode::Commit);
            }
            Field::Base => {
                instr.base = ExpBase::from_code(value)
                    .ok_or_else(|| fail(DecodeErrorKind::BadExpBase(value)))?;
            }
            Field::Imm8 => instr.imm8 = value,
            Field::Pad(_) => {
                if value != 0 {
                    return Err(fail(DecodeErrorKind::PaddingSet));
                }
            }
        }
    }
    // Bits after the last field must be zero too, or re-encoding would not give the same bytes.
    let trailing_bits = header_bits - position;
    if trailing_bits > 0 && get(position, trailing_bits) != 0 {
        return Err(fail(DecodeErrorKind::PaddingSet));
    }
    for (index, role) in layout.operands.iter().enumerate() {
        if modes[index] == AddrMode::Immediate && matches!(role, Role::Write(_)) {
            return Err(fail(DecodeErrorKind::ImmediateDestination {
                mnemonic: def.mnemonic,
                operand: index,
            }));
        }
    }
    let mut cursor = header_len;
    for (index, role) in layout.operands.iter().enumerate() {
        // A target has no mode field: it is always an 8-byte immediate.
        let mode = if *role == Role::Target {
            AddrMode::Immediate
        } else {
            modes[index]
        };
        let len = operand_len_bytes(layout, *role, mode, instr.tys);
        need(cursor + len)?;
        let data = &bytes[cursor..cursor + len];
        let operand = match mode {
            AddrMode::Immediate => {
                let mut raw = [0u8; 8];
                raw[..len].copy_from_slice(data);
                Operand::Imm(u64::from_le_bytes(raw))
            }
            AddrMode::Direct => Operand::Direct(le_u64(data)),
            AddrMode::Indirect => Operand::Indirect(le_u64(data)),
            AddrMode::BaseDisp => Operand::BaseDisp {
                disp: i32::from_le_bytes([data[0], data[1], data[2], data[3]]),
                base: le_u64(&data[4..]),
            },
        };
        instr.push_operand(operand);
        cursor += len;
    }
    Ok((instr, cursor))
}

fn le_u64(data: &[u8]) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&data[..8]);
    u64::from_le_bytes(raw)
}

/// Decodes a whole code region by linear sweep: every byte must belong to an instruction.
/// Returns `(offset, instr)` pairs in address order.
pub fn decode_all(code: &[u8]) -> Result<Vec<(u32, Instr)>, DecodeError> {
    let mut out = Vec::new();
    let mut offset = 0usize;
    while offset < code.len() {
        let (instr, len) = decode(&code[offset..], offset as u64)?;
        out.push((offset as u32, instr));
        offset += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `disa-reference.md` §5: the first instruction of every compiled image.
    const WORKED_EXAMPLE: [u8; 27] = [
        0x00, 0x62, 0x49, 0x00, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x08, 0x01, 0x00, 0x00,
        0x01, 0x00, 0x00, 0x00, 0x08, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00,
    ];

    #[test]
    fn worked_example_decodes_and_reencodes() {
        let (instr, len) = decode(&WORKED_EXAMPLE, 0).expect("worked example decodes");
        assert_eq!(len, WORKED_EXAMPLE.len());
        assert_eq!(instr.op, Op::Add);
        assert_eq!(instr.tys[0], Ty::S64);
        assert_eq!(
            instr.operands(),
            &[
                Operand::Direct(0x1_0000_0100),
                Operand::Direct(0x1_0000_0108),
                Operand::Direct(0x2_0000_0008)
            ]
        );
        assert_eq!(encode_to_vec(&instr).expect("encodes"), WORKED_EXAMPLE);
    }

    #[test]
    fn golden_headers_from_the_reference() {
        let mut spawn = Instr::new(Op::Spawn);
        for addr in [
            0x2_0000_1000u64,
            0x2_0000_1008,
            0x2_0000_1010,
            0x2_0000_1018,
        ] {
            spawn.push_operand(Operand::Direct(addr));
        }
        assert_eq!(
            &encode_to_vec(&spawn).expect("encodes")[..3],
            &[0x04, 0xa4, 0x92]
        );

        let commit = Instr::new(Op::Exit);
        assert_eq!(encode_to_vec(&commit).expect("encodes"), [0x10, 0xc0]);

        let mut int = Instr::new(Op::Int);
        int.imm8 = 0x80;
        assert_eq!(encode_to_vec(&int).expect("encodes"), [0x04, 0x80, 0x80]);

        assert_eq!(
            encode_to_vec(&Instr::new(Op::Nop)).expect("encodes"),
            [0x00, 0x00]
        );
    }

    /// Hand-computed from §5: `mov $1:sb, 0x10:fd` — conv header b1 = 0x20 | 0<<1 | 9>>3,
    /// b2 = (9&7)<<5 | 0<<2 | 1>>1, b3 = 1<<7.
    #[test]
    fn golden_conv_header() {
        let mut conv = Instr::new(Op::Conv);
        conv.tys = [Ty::S8, Ty::F64];
        conv.push_operand(Operand::Imm(1));
        conv.push_operand(Operand::Direct(0x10));
        let bytes = encode_to_vec(&conv).expect("encodes");
        assert_eq!(&bytes[..4], &[0x04, 0x21, 0x20, 0x80]);
        assert_eq!(bytes[4], 1, "s8 immediate is one byte");
        assert_eq!(bytes.len(), 4 + 1 + 8);
    }

    /// `br:l,se,a 0x10, $5, $0x800000000`: b1 = 0xa0 | 2<<1 | 1>>3, b2 = 1<<5 | 1<<2 | 0>>1,
    /// b3 = 0<<7 | 0<<6; immediates in a branch are always 8 bytes.
    #[test]
    fn golden_compare_branch() {
        let mut br = Instr::new(Op::Br);
        br.cond = Cond::L;
        br.tys[0] = Ty::S64;
        br.push_operand(Operand::Direct(0x10));
        br.push_operand(Operand::Imm(5));
        br.push_operand(Operand::Imm(0x8_0000_0000));
        let bytes = encode_to_vec(&br).expect("encodes");
        assert_eq!(&bytes[..4], &[0x02, 0xa4, 0x24, 0x00]);
        assert_eq!(bytes.len(), 4 + 8 + 8 + 8);
        let (back, _) = decode(&bytes, 0).expect("decodes");
        assert_eq!(back, br);
    }

    #[test]
    fn decode_errors_name_the_problem() {
        let err = decode(&[0x00], 7).expect_err("one byte is truncated");
        assert_eq!(err.offset, 7);
        assert!(matches!(
            err.kind,
            DecodeErrorKind::Truncated {
                needed_bytes: 2,
                ..
            }
        ));

        let err = decode(&[0x80, 0x00], 0).expect_err("prefix");
        assert_eq!(err.kind, DecodeErrorKind::AddressSizePrefix);

        // opcode 0x27 = shift: 0x27 >> 3 = 4, (0x27 & 7) << 5 = 0xe0.
        let err = decode(&[0x04, 0xe0, 0, 0], 0).expect_err("reserved");
        assert!(matches!(
            err.kind,
            DecodeErrorKind::ReservedOpcode { opcode: 0x27, .. }
        ));

        // add with attribute 0x2 (s128).
        let err = decode(&[0x00, 0x64, 0x49], 0).expect_err("s128");
        assert!(matches!(err.kind, DecodeErrorKind::BadType { .. }));

        // br with condition sl (8): b1 = 0xa0 | 8 << 1.
        let err = decode(&[0x02, 0xb0, 0, 0], 0).expect_err("sl");
        assert!(matches!(
            err.kind,
            DecodeErrorKind::UnsupportedCond { code: 8, .. }
        ));

        // int with a padding bit set.
        let err = decode(&[0x04, 0x81, 0x80], 0).expect_err("padding");
        assert_eq!(err.kind, DecodeErrorKind::PaddingSet);

        // add whose destination is an immediate: modes 1,1,0.
        let err = decode(&[0x00, 0x62, 0x48], 0).expect_err("immediate destination");
        assert!(matches!(
            err.kind,
            DecodeErrorKind::ImmediateDestination { operand: 2, .. }
        ));
    }
}
