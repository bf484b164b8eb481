//! The DISA instruction set, described once, as data.
//!
//! Everything that knows about instructions — the i0 encoder and decoder (`codec`), the assembler
//! (`asm`), the disassembler (`disasm`), the interpreter and `docs/DISA.md` — reads the tables in
//! this module instead of carrying its own copy, so they cannot drift apart.
//!
//! An i0 instruction starts with a header: a big-endian bit string whose bit 0 (byte 0's most
//! significant bit) is the address-size prefix and whose bits 1..=10 are the 10-bit opcode. Every
//! instruction form then packs its fields back to back from bit 11 on; that regularity is what lets
//! one table row per form (a list of fields and a header length) describe the whole encoding.
//! Operand data (immediates, addresses, displacements) follow the header in operand order.
//!
//! Invariants kept by the tables (checked by tests in this module):
//! - opcodes and mnemonics are unique;
//! - every layout's fields fit inside its header, and the header is a whole number of bytes;
//! - every operand that has an addressing mode has exactly one `Field::Mode` naming it.

use std::fmt;

/// Bits 1..=10 of the header hold the opcode; fields start right after it.
pub const FIRST_FIELD_BIT: u32 = 11;

/// The type attribute of an operation: the compiler's 4-bit codes (normative, `disa-reference.md` §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ty {
    S8,
    U8,
    S32,
    U32,
    S64,
    U64,
    F32,
    F64,
}

impl Ty {
    pub const ALL: [Ty; 8] = [
        Ty::S8,
        Ty::U8,
        Ty::S32,
        Ty::U32,
        Ty::S64,
        Ty::U64,
        Ty::F32,
        Ty::F64,
    ];
    pub const INTEGERS: [Ty; 6] = [Ty::S8, Ty::U8, Ty::S32, Ty::U32, Ty::S64, Ty::U64];
    pub const FLOATS: [Ty; 2] = [Ty::F32, Ty::F64];

    /// The 4-bit attribute code in the encoding.
    pub const fn code(self) -> u8 {
        match self {
            Ty::S8 => 0x0,
            Ty::S64 => 0x1,
            Ty::S32 => 0x3,
            Ty::U8 => 0x4,
            Ty::U64 => 0x5,
            Ty::U32 => 0x7,
            Ty::F32 => 0x8,
            Ty::F64 => 0x9,
        }
    }

    pub fn from_code(code: u8) -> Result<Ty, AttrError> {
        match code {
            0x0 => Ok(Ty::S8),
            0x1 => Ok(Ty::S64),
            0x3 => Ok(Ty::S32),
            0x4 => Ok(Ty::U8),
            0x5 => Ok(Ty::U64),
            0x7 => Ok(Ty::U32),
            0x8 => Ok(Ty::F32),
            0x9 => Ok(Ty::F64),
            0x2 | 0x6 => Err(AttrError::Reserved128(code)),
            _ => Err(AttrError::Undefined(code)),
        }
    }

    /// Canonical assembler suffix (`add:se`).
    pub const fn suffix(self) -> &'static str {
        match self {
            Ty::S8 => "sb",
            Ty::U8 => "ub",
            Ty::S32 => "sd",
            Ty::U32 => "ud",
            Ty::S64 => "se",
            Ty::U64 => "ue",
            Ty::F32 => "fs",
            Ty::F64 => "fd",
        }
    }

    /// Every spelling the assembler accepts: the canonical one, the older `sq`/`uq`, and the
    /// C-like `s64` names that people type anyway.
    pub const fn spellings(self) -> &'static [&'static str] {
        match self {
            Ty::S8 => &["sb", "s8"],
            Ty::U8 => &["ub", "u8"],
            Ty::S32 => &["sd", "s32"],
            Ty::U32 => &["ud", "u32"],
            Ty::S64 => &["se", "sq", "s64"],
            Ty::U64 => &["ue", "uq", "u64"],
            Ty::F32 => &["fs", "f32"],
            Ty::F64 => &["fd", "f64"],
        }
    }

    pub fn from_spelling(text: &str) -> Option<Ty> {
        Ty::ALL
            .into_iter()
            .find(|ty| ty.spellings().contains(&text))
    }

    pub const fn size_bytes(self) -> u32 {
        match self {
            Ty::S8 | Ty::U8 => 1,
            Ty::S32 | Ty::U32 | Ty::F32 => 4,
            Ty::S64 | Ty::U64 | Ty::F64 => 8,
        }
    }

    pub const fn is_float(self) -> bool {
        matches!(self, Ty::F32 | Ty::F64)
    }

    pub const fn is_signed(self) -> bool {
        matches!(self, Ty::S8 | Ty::S32 | Ty::S64)
    }
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.suffix())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttrError {
    /// s128 (0x2) and u128 (0x6) are named by the compiler but have no defined semantics.
    Reserved128(u8),
    Undefined(u8),
}

impl fmt::Display for AttrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrError::Reserved128(code) => {
                write!(
                    f,
                    "type attribute {code:#x} (128-bit) is reserved and has no semantics"
                )
            }
            AttrError::Undefined(code) => write!(f, "type attribute {code:#x} is undefined"),
        }
    }
}

/// Which attributes an instruction accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttrSet {
    All,
    Integers,
    Floats,
}

impl AttrSet {
    pub fn allows(self, ty: Ty) -> bool {
        match self {
            AttrSet::All => true,
            AttrSet::Integers => !ty.is_float(),
            AttrSet::Floats => ty.is_float(),
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            AttrSet::All => "sb ub sd ud se ue fs fd",
            AttrSet::Integers => "sb ub sd ud se ue",
            AttrSet::Floats => "fs fd",
        }
    }
}

/// Operand addressing mode (2 significant bits in a 3-bit field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddrMode {
    Immediate,
    Direct,
    Indirect,
    BaseDisp,
}

impl AddrMode {
    pub const ALL: [AddrMode; 4] = [
        AddrMode::Immediate,
        AddrMode::Direct,
        AddrMode::Indirect,
        AddrMode::BaseDisp,
    ];

    pub const fn code(self) -> u8 {
        match self {
            AddrMode::Immediate => 0,
            AddrMode::Direct => 1,
            AddrMode::Indirect => 2,
            AddrMode::BaseDisp => 3,
        }
    }

    pub fn from_code(code: u8) -> Option<AddrMode> {
        AddrMode::ALL.get(usize::from(code)).copied()
    }
}

/// Branch condition (the 4-bit mode field of `b`), i0 numbering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cond {
    /// Unconditional jump to an immediate target.
    J,
    L,
    Le,
    E,
    Ne,
    Z,
    Nz,
    /// Jump to the value of an operand.
    Ji,
}

/// One row of the branch-condition table.
pub struct CondDef {
    pub cond: Cond,
    pub code: u8,
    /// The older DISA numbering (only its order differs).
    pub disa_code: u8,
    pub spelling: &'static str,
    pub layout: &'static Layout,
    pub meaning: &'static str,
}

/// i0 codes of branch modes that exist in the original but that DVM does not define.
/// `sl` (8) has no documented meaning or layout; the decoder and assembler reject it.
pub const UNSUPPORTED_BRANCH_MODES: &[(u8, &str)] = &[(8, "sl")];

pub const CONDS: &[CondDef] = &[
    CondDef {
        cond: Cond::J,
        code: 0,
        disa_code: 0,
        spelling: "j",
        layout: &LAYOUT_BR_J,
        meaning: "jump to target",
    },
    CondDef {
        cond: Cond::L,
        code: 2,
        disa_code: 3,
        spelling: "l",
        layout: &LAYOUT_BR_CMP,
        meaning: "jump when a < b",
    },
    CondDef {
        cond: Cond::Le,
        code: 3,
        disa_code: 2,
        spelling: "le",
        layout: &LAYOUT_BR_CMP,
        meaning: "jump when a <= b",
    },
    CondDef {
        cond: Cond::E,
        code: 4,
        disa_code: 4,
        spelling: "e",
        layout: &LAYOUT_BR_CMP,
        meaning: "jump when a == b",
    },
    CondDef {
        cond: Cond::Ne,
        code: 5,
        disa_code: 5,
        spelling: "ne",
        layout: &LAYOUT_BR_CMP,
        meaning: "jump when a != b",
    },
    CondDef {
        cond: Cond::Z,
        code: 6,
        disa_code: 6,
        spelling: "z",
        layout: &LAYOUT_BR_TEST,
        meaning: "jump when a == 0",
    },
    CondDef {
        cond: Cond::Nz,
        code: 7,
        disa_code: 7,
        spelling: "nz",
        layout: &LAYOUT_BR_TEST,
        meaning: "jump when a != 0",
    },
    CondDef {
        cond: Cond::Ji,
        code: 0xC,
        disa_code: 1,
        spelling: "ji",
        layout: &LAYOUT_BR_JI,
        meaning: "jump to the value of a",
    },
];

impl Cond {
    pub fn def(self) -> &'static CondDef {
        // CONDS lists every Cond exactly once (checked by a test), so the search always succeeds.
        CONDS
            .iter()
            .find(|def| def.cond == self)
            .unwrap_or(&CONDS[0])
    }

    pub fn from_code(code: u8) -> Option<&'static CondDef> {
        CONDS.iter().find(|def| def.code == code)
    }

    pub fn from_spelling(text: &str) -> Option<&'static CondDef> {
        CONDS.iter().find(|def| def.spelling == text)
    }

    /// Compare conditions take two operands and a type; test conditions one.
    pub fn is_compare(self) -> bool {
        matches!(self, Cond::L | Cond::Le | Cond::E | Cond::Ne)
    }
}

/// `exit` modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitMode {
    /// Commit the runner's writes.
    Commit,
    /// Discard the runner's writes.
    Abort,
    /// Commit and delete the watcher template this instance came from.
    CommitDelete,
    /// Abort and delete the watcher template.
    AbortDelete,
}

impl ExitMode {
    pub const ALL: [ExitMode; 4] = [
        ExitMode::Commit,
        ExitMode::Abort,
        ExitMode::CommitDelete,
        ExitMode::AbortDelete,
    ];

    pub const fn code(self) -> u8 {
        match self {
            ExitMode::Commit => 0,
            ExitMode::Abort => 1,
            ExitMode::CommitDelete => 2,
            ExitMode::AbortDelete => 3,
        }
    }

    pub fn from_code(code: u8) -> Option<ExitMode> {
        ExitMode::ALL.get(usize::from(code)).copied()
    }

    pub const fn spelling(self) -> &'static str {
        match self {
            ExitMode::Commit => "c",
            ExitMode::Abort => "a",
            ExitMode::CommitDelete => "cd",
            ExitMode::AbortDelete => "ad",
        }
    }

    pub fn from_spelling(text: &str) -> Option<ExitMode> {
        ExitMode::ALL
            .into_iter()
            .find(|mode| mode.spelling() == text)
    }

    pub fn commits(self) -> bool {
        matches!(self, ExitMode::Commit | ExitMode::CommitDelete)
    }

    pub fn deletes_template(self) -> bool {
        matches!(self, ExitMode::CommitDelete | ExitMode::AbortDelete)
    }
}

/// Base of `exp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExpBase {
    E,
    Two,
    Ten,
}

impl ExpBase {
    pub const ALL: [ExpBase; 3] = [ExpBase::E, ExpBase::Two, ExpBase::Ten];

    pub const fn code(self) -> u8 {
        match self {
            ExpBase::E => 0,
            ExpBase::Two => 1,
            ExpBase::Ten => 2,
        }
    }

    pub fn from_code(code: u8) -> Option<ExpBase> {
        ExpBase::ALL.get(usize::from(code)).copied()
    }

    pub const fn spelling(self) -> &'static str {
        match self {
            ExpBase::E => "e",
            ExpBase::Two => "2",
            ExpBase::Ten => "10",
        }
    }

    pub fn from_spelling(text: &str) -> Option<ExpBase> {
        ExpBase::ALL
            .into_iter()
            .find(|base| base.spelling() == text)
    }
}

/// A header field, in the order it is packed after the opcode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// Type attribute number `n` (4 bits).
    Attr(u8),
    /// Addressing mode of operand `n` (3 bits, 2 significant).
    Mode(u8),
    /// Branch condition (4 bits).
    Cond,
    /// 1 = branch target is relative to the branch instruction's address.
    Rel,
    /// `exit` mode (2 bits).
    Exit,
    /// `exp` base (2 bits).
    Base,
    /// An 8-bit immediate inside the header (`int`).
    Imm8,
    /// Bits that must be zero.
    Pad(u8),
}

impl Field {
    pub const fn width_bits(self) -> u32 {
        match self {
            Field::Attr(_) | Field::Cond => 4,
            Field::Mode(_) => 3,
            Field::Rel => 1,
            Field::Exit | Field::Base => 2,
            Field::Imm8 => 8,
            Field::Pad(bits) => bits as u32,
        }
    }
}

/// How an operand is used; decides its immediate width and whether it may be an immediate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Read as a value of attribute `n`.
    Read(u8),
    /// Written as a value of attribute `n`; an immediate here is an encoding error.
    Write(u8),
    /// Read as a 64-bit word (spawn descriptors, `br:ji` target).
    Word,
    /// An 8-byte immediate with no mode field: a branch target.
    Target,
}

/// Width of immediates in an instruction's operand data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImmWidth {
    /// As wide as the operand's type (1, 4 or 8 bytes).
    TypeSize,
    /// Always 8 bytes; a narrower value sits in the low bytes.
    Always8,
}

/// The encoding of one instruction form.
#[derive(Debug)]
pub struct Layout {
    pub header_len_bytes: u32,
    pub fields: &'static [Field],
    pub operands: &'static [Role],
    pub imm_width: ImmWidth,
}

pub const LAYOUT_NONE: Layout = Layout {
    header_len_bytes: 2,
    fields: &[],
    operands: &[],
    imm_width: ImmWidth::TypeSize,
};
pub const LAYOUT_CONV: Layout = Layout {
    header_len_bytes: 4,
    fields: &[
        Field::Attr(0),
        Field::Attr(1),
        Field::Mode(0),
        Field::Mode(1),
    ],
    operands: &[Role::Read(0), Role::Write(1)],
    imm_width: ImmWidth::TypeSize,
};
pub const LAYOUT_ARITH: Layout = Layout {
    header_len_bytes: 3,
    fields: &[
        Field::Attr(0),
        Field::Mode(0),
        Field::Mode(1),
        Field::Mode(2),
    ],
    operands: &[Role::Read(0), Role::Read(0), Role::Write(0)],
    imm_width: ImmWidth::TypeSize,
};
pub const LAYOUT_BR_J: Layout = Layout {
    header_len_bytes: 2,
    fields: &[Field::Cond, Field::Rel],
    operands: &[Role::Target],
    imm_width: ImmWidth::Always8,
};
pub const LAYOUT_BR_JI: Layout = Layout {
    header_len_bytes: 3,
    fields: &[Field::Cond, Field::Mode(0)],
    operands: &[Role::Word],
    imm_width: ImmWidth::Always8,
};
pub const LAYOUT_BR_CMP: Layout = Layout {
    header_len_bytes: 4,
    fields: &[
        Field::Cond,
        Field::Attr(0),
        Field::Mode(0),
        Field::Mode(1),
        Field::Rel,
    ],
    operands: &[Role::Read(0), Role::Read(0), Role::Target],
    imm_width: ImmWidth::Always8,
};
pub const LAYOUT_BR_TEST: Layout = Layout {
    header_len_bytes: 3,
    fields: &[Field::Cond, Field::Attr(0), Field::Mode(0), Field::Rel],
    operands: &[Role::Read(0), Role::Target],
    imm_width: ImmWidth::Always8,
};
pub const LAYOUT_SPAWN: Layout = Layout {
    header_len_bytes: 3,
    fields: &[
        Field::Mode(0),
        Field::Mode(1),
        Field::Mode(2),
        Field::Mode(3),
    ],
    operands: &[Role::Word, Role::Word, Role::Word, Role::Word],
    imm_width: ImmWidth::Always8,
};
pub const LAYOUT_SPAWNX: Layout = Layout {
    header_len_bytes: 4,
    fields: &[
        Field::Mode(0),
        Field::Mode(1),
        Field::Mode(2),
        Field::Mode(3),
        Field::Mode(4),
    ],
    operands: &[Role::Word, Role::Word, Role::Word, Role::Word, Role::Word],
    imm_width: ImmWidth::Always8,
};
pub const LAYOUT_EXIT: Layout = Layout {
    header_len_bytes: 2,
    fields: &[Field::Exit],
    operands: &[],
    imm_width: ImmWidth::TypeSize,
};
pub const LAYOUT_INT: Layout = Layout {
    header_len_bytes: 3,
    fields: &[Field::Pad(5), Field::Imm8],
    operands: &[],
    imm_width: ImmWidth::TypeSize,
};
pub const LAYOUT_EXP: Layout = Layout {
    header_len_bytes: 3,
    fields: &[Field::Base, Field::Attr(0), Field::Mode(0), Field::Mode(1)],
    operands: &[Role::Read(0), Role::Write(0)],
    imm_width: ImmWidth::TypeSize,
};

/// Every instruction the engine knows, by meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Nop,
    Conv,
    Add,
    Sub,
    Mul,
    Div,
    And,
    Or,
    Xor,
    Br,
    Spawn,
    SpawnX,
    Exit,
    Int,
    Scmp,
    Grep,
    Exp,
    Rem,
    Shl,
    Shr,
}

/// Where an instruction comes from and whether it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Defined by the original toolchain and implemented.
    Original,
    /// A DVM extension in opcode space the original never uses.
    Extension,
    /// Present in the original encoding, semantics undocumented: decoded and disassembled,
    /// rejected by the assembler, faults when executed.
    Unsupported,
}

/// One row of the ISA table.
pub struct InstrDef {
    pub op: Op,
    /// Canonical assembler mnemonic.
    pub mnemonic: &'static str,
    /// Other accepted spellings (the i0 name where the assembler's differs).
    pub aliases: &'static [&'static str],
    pub i0_opcode: u16,
    pub disa_opcode: Option<u8>,
    /// `None` for `br`, whose layout depends on its condition (see `CONDS`).
    pub layout: Option<&'static Layout>,
    pub attrs: AttrSet,
    pub status: Status,
    pub syntax: &'static str,
    pub semantics: &'static str,
}

impl InstrDef {
    pub fn is_branch(&self) -> bool {
        self.op == Op::Br
    }
}

pub const ISA: &[InstrDef] = &[
    InstrDef {
        op: Op::Nop,
        mnemonic: "nop",
        aliases: &[],
        i0_opcode: 0x00,
        disa_opcode: Some(0x00),
        layout: Some(&LAYOUT_NONE),
        attrs: AttrSet::All,
        status: Status::Original,
        syntax: "nop",
        semantics: "do nothing",
    },
    InstrDef {
        op: Op::Conv,
        mnemonic: "mov",
        aliases: &["conv"],
        i0_opcode: 0x21,
        disa_opcode: Some(0x0B),
        layout: Some(&LAYOUT_CONV),
        attrs: AttrSet::All,
        status: Status::Original,
        syntax: "mov src:T, dst:T",
        semantics: "dst = convert(src): extend by the source type, truncate, int<->float",
    },
    InstrDef {
        op: Op::Add,
        mnemonic: "add",
        aliases: &[],
        i0_opcode: 0x03,
        disa_opcode: Some(0x01),
        layout: Some(&LAYOUT_ARITH),
        attrs: AttrSet::All,
        status: Status::Original,
        syntax: "add:T a, b, c",
        semantics: "c = a + b (integers wrap)",
    },
    InstrDef {
        op: Op::Sub,
        mnemonic: "sub",
        aliases: &[],
        i0_opcode: 0x06,
        disa_opcode: Some(0x02),
        layout: Some(&LAYOUT_ARITH),
        attrs: AttrSet::All,
        status: Status::Original,
        syntax: "sub:T a, b, c",
        semantics: "c = a - b (integers wrap)",
    },
    InstrDef {
        op: Op::Mul,
        mnemonic: "mul",
        aliases: &[],
        i0_opcode: 0x09,
        disa_opcode: Some(0x03),
        layout: Some(&LAYOUT_ARITH),
        attrs: AttrSet::All,
        status: Status::Original,
        syntax: "mul:T a, b, c",
        semantics: "c = a * b (integers wrap)",
    },
    InstrDef {
        op: Op::Div,
        mnemonic: "div",
        aliases: &[],
        i0_opcode: 0x0C,
        disa_opcode: Some(0x04),
        layout: Some(&LAYOUT_ARITH),
        attrs: AttrSet::All,
        status: Status::Original,
        syntax: "div:T a, b, c",
        semantics: "c = a / b; integers truncate toward zero, /0 and MIN/-1 fault; floats IEEE",
    },
    InstrDef {
        op: Op::And,
        mnemonic: "and",
        aliases: &[],
        i0_opcode: 0x18,
        disa_opcode: Some(0x08),
        layout: Some(&LAYOUT_ARITH),
        attrs: AttrSet::Integers,
        status: Status::Original,
        syntax: "and:T a, b, c",
        semantics: "c = a & b",
    },
    InstrDef {
        op: Op::Or,
        mnemonic: "or",
        aliases: &[],
        i0_opcode: 0x1B,
        disa_opcode: Some(0x09),
        layout: Some(&LAYOUT_ARITH),
        attrs: AttrSet::Integers,
        status: Status::Original,
        syntax: "or:T a, b, c",
        semantics: "c = a | b",
    },
    InstrDef {
        op: Op::Xor,
        mnemonic: "xor",
        aliases: &[],
        i0_opcode: 0x1E,
        disa_opcode: Some(0x0A),
        layout: Some(&LAYOUT_ARITH),
        attrs: AttrSet::Integers,
        status: Status::Original,
        syntax: "xor:T a, b, c",
        semantics: "c = a ^ b",
    },
    InstrDef {
        op: Op::Br,
        mnemonic: "br",
        aliases: &["b"],
        i0_opcode: 0x15,
        disa_opcode: Some(0x07),
        layout: None,
        attrs: AttrSet::All,
        status: Status::Original,
        syntax: "br:j,a $t | br:ji a | br:C,T,a a, b, $t | br:z|nz,T,a a, $t",
        semantics:
            "branch (conditions below); `a` absolute target, `r` relative to this instruction",
    },
    InstrDef {
        op: Op::Spawn,
        mnemonic: "newr",
        aliases: &["spawn"],
        i0_opcode: 0x25,
        disa_opcode: Some(0x05),
        layout: Some(&LAYOUT_SPAWN),
        attrs: AttrSet::All,
        status: Status::Original,
        syntax: "newr s, u, w, f",
        semantics: "create a runner: stack, using ranges, watched ranges, code word (ABI §6)",
    },
    InstrDef {
        op: Op::SpawnX,
        mnemonic: "spawnx",
        aliases: &[],
        i0_opcode: 0x29,
        disa_opcode: None,
        layout: Some(&LAYOUT_SPAWNX),
        attrs: AttrSet::All,
        status: Status::Original,
        syntax: "spawnx s, u, w, f, x",
        semantics: "create a runner in the space whose base address is x",
    },
    InstrDef {
        op: Op::Exit,
        mnemonic: "exit",
        aliases: &[],
        i0_opcode: 0x86,
        disa_opcode: Some(0x06),
        layout: Some(&LAYOUT_EXIT),
        attrs: AttrSet::All,
        status: Status::Original,
        syntax: "exit:c|a|cd|ad",
        semantics: "end the runner: commit, abort, commit+delete template, abort+delete template",
    },
    InstrDef {
        op: Op::Int,
        mnemonic: "int",
        aliases: &[],
        i0_opcode: 0x24,
        disa_opcode: Some(0x0C),
        layout: Some(&LAYOUT_INT),
        attrs: AttrSet::All,
        status: Status::Original,
        syntax: "int imm8",
        semantics: "software interrupt; 0x80 = system call (ABI §7)",
    },
    InstrDef {
        op: Op::Scmp,
        mnemonic: "strcmp",
        aliases: &["scmp"],
        i0_opcode: 0x2A,
        disa_opcode: Some(0x0E),
        layout: Some(&LAYOUT_SPAWNX),
        attrs: AttrSet::All,
        status: Status::Unsupported,
        syntax: "strcmp a, b, c, d, e",
        semantics: "undocumented in the original; faults when executed",
    },
    InstrDef {
        op: Op::Grep,
        mnemonic: "grep",
        aliases: &[],
        i0_opcode: 0x30,
        disa_opcode: None,
        layout: Some(&LAYOUT_SPAWNX),
        attrs: AttrSet::All,
        status: Status::Unsupported,
        syntax: "grep a, b, c, d, e",
        semantics: "undocumented in the original; faults when executed",
    },
    InstrDef {
        op: Op::Exp,
        mnemonic: "exp",
        aliases: &[],
        i0_opcode: 0x40,
        disa_opcode: None,
        layout: Some(&LAYOUT_EXP),
        attrs: AttrSet::Floats,
        status: Status::Original,
        syntax: "exp:B,T a, b",
        semantics: "b = B^a for base B in e, 2, 10 (floats only)",
    },
    InstrDef {
        op: Op::Rem,
        mnemonic: "rem",
        aliases: &[],
        i0_opcode: 0x201,
        disa_opcode: None,
        layout: Some(&LAYOUT_ARITH),
        attrs: AttrSet::Integers,
        status: Status::Extension,
        syntax: "rem:T a, b, c",
        semantics: "c = a % b, sign of a; /0 and MIN%-1 fault",
    },
    InstrDef {
        op: Op::Shl,
        mnemonic: "shl",
        aliases: &[],
        i0_opcode: 0x204,
        disa_opcode: None,
        layout: Some(&LAYOUT_ARITH),
        attrs: AttrSet::Integers,
        status: Status::Extension,
        syntax: "shl:T a, b, c",
        semantics: "c = a << (b mod type width)",
    },
    InstrDef {
        op: Op::Shr,
        mnemonic: "shr",
        aliases: &[],
        i0_opcode: 0x207,
        disa_opcode: None,
        layout: Some(&LAYOUT_ARITH),
        attrs: AttrSet::Integers,
        status: Status::Extension,
        syntax: "shr:T a, b, c",
        semantics: "c = a >> (b mod type width); arithmetic for signed types, logical for unsigned",
    },
];

/// Opcodes the original reserves but never defines. Their operand layout is unknown, so an image
/// containing one cannot be decoded past it; the decoder names them precisely.
pub const RESERVED_OPCODES: &[(u16, &str)] = &[(0x27, "shift"), (0x44, "log")];

impl Op {
    /// The three-operand arithmetic and logic operations (`c = a op b` at one type).
    pub fn is_arith(self) -> bool {
        matches!(
            self,
            Op::Add
                | Op::Sub
                | Op::Mul
                | Op::Div
                | Op::And
                | Op::Or
                | Op::Xor
                | Op::Rem
                | Op::Shl
                | Op::Shr
        )
    }

    pub fn def(self) -> &'static InstrDef {
        // ISA lists every Op exactly once (checked by a test), so the search always succeeds.
        ISA.iter().find(|def| def.op == self).unwrap_or(&ISA[0])
    }
}

pub fn by_opcode(opcode: u16) -> Option<&'static InstrDef> {
    ISA.iter().find(|def| def.i0_opcode == opcode)
}

pub fn by_mnemonic(text: &str) -> Option<&'static InstrDef> {
    ISA.iter()
        .find(|def| def.mnemonic == text || def.aliases.contains(&text))
}

/// The ISA table as Markdown, for `docs/DISA.md` (a test keeps the file in step).
pub fn markdown_tables() -> String {
    let mut out = String::new();
    out.push_str("| mnemonic | aliases | i0 opcode | DISA opcode | header bytes | types | status | syntax | meaning |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for def in ISA {
        let header = match def.layout {
            Some(layout) => layout.header_len_bytes.to_string(),
            None => "2–4 (by condition)".to_string(),
        };
        let types = if def.layout.is_some_and(|layout| {
            layout
                .fields
                .iter()
                .any(|field| matches!(field, Field::Attr(_)))
        }) || def.is_branch()
        {
            def.attrs.describe()
        } else {
            "–"
        };
        let status = match def.status {
            Status::Original => "original",
            Status::Extension => "DVM extension",
            Status::Unsupported => "decoded, faults",
        };
        out.push_str(&format!(
            "| `{}` | {} | {:#05x} | {} | {} | {} | {} | `{}` | {} |\n",
            def.mnemonic,
            if def.aliases.is_empty() {
                "–".to_string()
            } else {
                def.aliases
                    .iter()
                    .map(|alias| format!("`{alias}`"))
                    .collect::<Vec<_>>()
                    .join(" ")
            },
            def.i0_opcode,
            def.disa_opcode
                .map_or("–".to_string(), |code| format!("{code:#04x}")),
            header,
            types,
            status,
            def.syntax.replace('|', "\\|"),
            def.semantics.replace('|', "\\|"),
        ));
    }
    for (opcode, name) in RESERVED_OPCODES {
        out.push_str(&format!(
            "| – | `{name}` | {opcode:#05x} | – | – | – | reserved, rejected | – | never defined by the original |\n"
        ));
    }
    out.push_str("\nBranch conditions (`br:C,...`):\n\n");
    out.push_str("| condition | i0 code | DISA code | header bytes | operands | meaning |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    for cond in CONDS {
        out.push_str(&format!(
            "| `{}` | {:#x} | {:#x} | {} | {} | {} |\n",
            cond.spelling,
            cond.code,
            cond.disa_code,
            cond.layout.header_len_bytes,
            cond.layout.operands.len(),
            cond.meaning
        ));
    }
    for (code, name) in UNSUPPORTED_BRANCH_MODES {
        out.push_str(&format!(
            "| `{name}` | {code:#x} | {code:#x} | – | – | undocumented; rejected |\n"
        ));
    }
    out.push_str(
        "\nType attributes:\n\n| suffix | spellings | code | size (bytes) |\n|---|---|---|---|\n",
    );
    for ty in Ty::ALL {
        out.push_str(&format!(
            "| `{}` | {} | {:#x} | {} |\n",
            ty.suffix(),
            ty.spellings()
                .iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(" "),
            ty.code(),
            ty.size_bytes()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn all_layouts() -> Vec<&'static Layout> {
        ISA.iter()
            .filter_map(|def| def.layout)
            .chain(CONDS.iter().map(|cond| cond.layout))
            .collect()
    }

    #[test]
    fn opcodes_and_mnemonics_are_unique() {
        let mut opcodes = HashSet::new();
        let mut names = HashSet::new();
        for def in ISA {
            assert!(
                opcodes.insert(def.i0_opcode),
                "duplicate opcode {:#x}",
                def.i0_opcode
            );
            assert!(
                def.i0_opcode < 0x400,
                "opcode {:#x} exceeds 10 bits",
                def.i0_opcode
            );
            for name in std::iter::once(&def.mnemonic).chain(def.aliases) {
                assert!(names.insert(*name), "duplicate mnemonic {name}");
            }
        }
        for (opcode, _) in RESERVED_OPCODES {
            assert!(by_opcode(*opcode).is_none());
        }
    }

    #[test]
    fn every_op_and_cond_has_one_row() {
        for def in ISA {
            assert_eq!(ISA.iter().filter(|other| other.op == def.op).count(), 1);
            assert_eq!(def.op.def().mnemonic, def.mnemonic);
        }
        for cond in CONDS {
            assert_eq!(cond.cond.def().code, cond.code);
        }
    }

    #[test]
    fn layouts_fit_their_headers_and_name_every_mode() {
        for layout in all_layouts() {
            let bits: u32 = layout.fields.iter().map(|f| f.width_bits()).sum();
            assert!(
                FIRST_FIELD_BIT + bits <= layout.header_len_bytes * 8,
                "{layout:?}"
            );
            for (index, role) in layout.operands.iter().enumerate() {
                let modes = layout
                    .fields
                    .iter()
                    .filter(|field| **field == Field::Mode(index as u8))
                    .count();
                let expected = usize::from(*role != Role::Target);
                assert_eq!(modes, expected, "operand {index} of {layout:?}");
            }
        }
    }

    #[test]
    fn type_codes_round_trip() {
        for ty in Ty::ALL {
            assert_eq!(Ty::from_code(ty.code()), Ok(ty));
            for spelling in ty.spellings() {
                assert_eq!(Ty::from_spelling(spelling), Some(ty));
            }
        }
        assert_eq!(Ty::from_code(0x2), Err(AttrError::Reserved128(0x2)));
        assert_eq!(Ty::from_code(0xF), Err(AttrError::Undefined(0xF)));
    }
}
