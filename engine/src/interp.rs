//! The interpreter: runs one runner from its entry point to its end (an `exit`, or a fault).
//!
//! Code is decoded once at load (`Program`): the hot loop indexes an array of decoded
//! instructions whose immediate branch targets are already resolved to indexes, so it never
//! parses bytes. Every value is carried as the raw bits of its type in a `u64` (integers
//! zero-extended from their width, floats as IEEE bits) and interpreted per instruction type.
//!
//! Everything a program can do wrong ends in a `Fault` naming the reason, the PC and the
//! address; nothing here panics on program input. Side effects on the VM (ids, stacks, heap,
//! console input) go through `Services`, so the interpreter knows nothing of scheduling.

use crate::abi;
use crate::codec::{Instr, Operand};
use crate::image::LoadedImage;
use crate::isa::{Cond, ExitMode, ExpBase, Op, Ty};
use crate::view::{region_of, AccessError, Range, Region, View};
use std::fmt;

/// Longest `usleep` one call may ask for.
pub const MAX_SLEEP_US: u64 = 60_000_000;
/// Largest single `write` system call.
pub const MAX_WRITE_BYTES: u64 = 1 << 20;
/// Output a runner may buffer before it ends.
pub const MAX_OUTPUT_BYTES: usize = 64 << 20;
/// Ranges in one spawn descriptor.
pub const MAX_DESCRIPTOR_RANGES: u64 = 64;

const NO_TARGET: u32 = u32::MAX;

/// Executes one decoded instruction at `index`; chosen per instruction at load time.
type Handler = fn(&mut Exec<'_>, &Decoded, usize) -> Step<Next>;

/// One decoded instruction, with its immediate branch target resolved and its handler chosen.
#[derive(Clone)]
pub struct Decoded {
    pub instr: Instr,
    pub addr: u64,
    /// Index of the immediate branch target, or `NO_TARGET`.
    target: u32,
    handler: Handler,
}

impl fmt::Debug for Decoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoded")
            .field("instr", &self.instr)
            .field("addr", &self.addr)
            .field("target", &self.target)
            .finish()
    }
}

/// The program, decoded once and shared by every runner.
#[derive(Debug)]
pub struct Program {
    pub image: LoadedImage,
    pub decoded: Vec<Decoded>,
}

impl Program {
    pub fn new(image: LoadedImage) -> Program {
        let mut decoded: Vec<Decoded> = image
            .code
            .iter()
            .map(|(offset, instr)| Decoded {
                instr: *instr,
                addr: abi::CODE_BASE + u64::from(*offset),
                target: NO_TARGET,
                handler: handlers::select(instr),
            })
            .collect();
        let addrs: Vec<u64> = decoded.iter().map(|d| d.addr).collect();
        for d in &mut decoded {
            if let Some(target) = d.instr.branch_target(d.addr) {
                if let Ok(index) = addrs.binary_search(&target) {
                    d.target = index as u32;
                }
            }
        }
        Program { image, decoded }
    }

    pub fn index_of(&self, addr: u64) -> Option<usize> {
        self.decoded.binary_search_by_key(&addr, |d| d.addr).ok()
    }

    /// `addr (symbol+off)` for reports.
    pub fn describe_pc(&self, pc: u64) -> String {
        match self.image.symbolize(pc) {
            Some(symbol) => format!("{pc:#x} ({symbol})"),
            None => format!("{pc:#x}"),
        }
    }

    pub fn disassemble_at(&self, pc: u64) -> Option<String> {
        let index = self.index_of(pc)?;
        let d = &self.decoded[index];
        let symbols = &self.image.image.symbols;
        let name = |addr: u64| {
            symbols
                .iter()
                .find(|symbol| symbol.addr == addr)
                .map(|symbol| symbol.name.clone())
        };
        Some(crate::disasm::format_instr(&d.instr, d.addr, &name))
    }
}

/// Why a runner faulted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultKind {
    DivisionByZero,
    DivisionOverflow,
    NotAllowed {
        addr: u64,
        len: u64,
    },
    Unmapped {
        addr: u64,
    },
    ReadOnly {
        addr: u64,
    },
    InvalidInstruction {
        reason: String,
    },
    InstructionLimit {
        limit: u64,
    },
    MemoryLimit {
        limit_bytes: u64,
    },
    RunnerLimit {
        reason: String,
    },
    SystemCall {
        reason: String,
    },
    BadSpawnDescriptor {
        reason: String,
    },
    OutputLimit,
    /// A bug in DVM caught while running this runner.
    Internal {
        reason: String,
    },
}

impl FaultKind {
    pub fn address(&self) -> Option<u64> {
        match self {
            FaultKind::NotAllowed { addr, .. }
            | FaultKind::Unmapped { addr }
            | FaultKind::ReadOnly { addr } => Some(*addr),
            _ => None,
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultKind::DivisionByZero => f.write_str("division by zero"),
            FaultKind::DivisionOverflow => f.write_str("division overflow (MIN / -1)"),
            FaultKind::NotAllowed { addr, len } => write!(
                f,
                "access to {addr:#x} (+{len}) is not allowed: it is outside the runner's ranges"
            ),
            FaultKind::Unmapped { addr } => write!(f, "unmapped address {addr:#x}"),
            FaultKind::ReadOnly { addr } => {
                write!(f, "write to read-only image memory at {addr:#x}")
            }
            FaultKind::InvalidInstruction { reason } => write!(f, "invalid instruction: {reason}"),
            FaultKind::InstructionLimit { limit } => write!(
                f,
                "instruction limit of {limit} reached (--max-instructions)"
            ),
            FaultKind::MemoryLimit { limit_bytes } => write!(
                f,
                "memory limit of {limit_bytes} bytes reached (--max-memory)"
            ),
            FaultKind::RunnerLimit { reason } => write!(f, "runner limit: {reason}"),
            FaultKind::SystemCall { reason } => write!(f, "system call: {reason}"),
            FaultKind::BadSpawnDescriptor { reason } => write!(f, "bad spawn descriptor: {reason}"),
            FaultKind::OutputLimit => write!(
                f,
                "output limit: more than {MAX_OUTPUT_BYTES} bytes buffered"
            ),
            FaultKind::Internal { reason } => write!(f, "internal error in DVM: {reason}"),
        }
    }
}

/// A fault at a PC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    pub pc: u64,
}

impl From<AccessError> for FaultKind {
    fn from(err: AccessError) -> Self {
        match err {
            AccessError::Unmapped { addr } => FaultKind::Unmapped { addr },
            AccessError::NotAllowed { addr, len } => FaultKind::NotAllowed { addr, len },
            AccessError::ReadOnly { addr } => FaultKind::ReadOnly { addr },
            AccessError::Memory(limit) => FaultKind::MemoryLimit {
                limit_bytes: limit.limit_bytes,
            },
        }
    }
}

/// How a runner ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    Exit(ExitMode),
    Fault(Fault),
}

/// A runner created by `newr`/`spawnx`, waiting for its parent's commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildSpec {
    pub id: u64,
    pub entry: u64,
    pub space: u64,
    pub stack: Range,
    pub using: Vec<Range>,
    pub watched: Vec<Range>,
}

/// What the interpreter needs from the VM.
pub trait Services {
    /// A new runner id, counted against the runner limit; `Err` says which limit.
    fn new_runner_id(&self) -> Result<u64, String>;
    /// Gives back an id taken by `new_runner_id` whose runner will never exist.
    fn forget_runner(&self);
    /// A runtime stack in `space`.
    fn allocate_stack(&self, space: u64) -> Option<Range>;
    /// `malloc`: heap memory in `space`, or `None`.
    fn allocate_heap(&self, space: u64, len_bytes: u64) -> Option<Range>;
    /// One byte of console input, or `None` at end of input.
    fn console_input(&self) -> Option<u8>;
    /// Instructions executed since the last report (for live progress of long runners).
    fn count_instructions(&self, instructions: u64);
    /// The run is being torn down (a cluster lost a node): runners stop at their next report.
    fn stopping(&self) -> bool {
        false
    }
    /// The time programs see (real, or virtual in a simulation).
    fn clock(&self) -> &dyn crate::clock::Clock;
}

/// A running runner reports its instruction count this often.
const REPORT_EVERY_INSTRUCTIONS: u64 = 1 << 24;

/// The state of one executing runner.
pub struct Exec<'a> {
    pub view: View,
    program: &'a Program,
    services: &'a dyn Services,
    pub space: u64,
    pub instructions: u64,
    /// Instructions already passed to `Services::count_instructions`.
    pub instructions_reported: u64,
    max_instructions: u64,
    /// The next instruction count at which the loop leaves its fast path (limit or report).
    check_at: u64,
    pub output: Vec<u8>,
    pub children: Vec<ChildSpec>,
}

type Step<T> = Result<T, FaultKind>;

#[inline]
fn width_mask(ty: Ty) -> u64 {
    match ty.size_bytes() {
        1 => 0xff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

#[inline]
fn sign_extend(value: u64, ty: Ty) -> i64 {
    match ty.size_bytes() {
        1 => value as u8 as i8 as i64,
        4 => value as u32 as i32 as i64,
        _ => value as i64,
    }
}

#[inline]
fn as_f64(value: u64, ty: Ty) -> f64 {
    match ty {
        Ty::F32 => f64::from(f32::from_bits(value as u32)),
        _ => f64::from_bits(value),
    }
}

fn signed_min(ty: Ty) -> i64 {
    match ty.size_bytes() {
        1 => i64::from(i8::MIN),
        4 => i64::from(i32::MIN),
        _ => i64::MIN,
    }
}

/// `a op b` at type `ty` (raw bits in, raw bits out).
#[inline(always)]
pub fn arith(op: Op, ty: Ty, a: u64, b: u64) -> Step<u64> {
    match ty {
        Ty::F64 => {
            let (x, y) = (f64::from_bits(a), f64::from_bits(b));
            let r = match op {
                Op::Add => x + y,
                Op::Sub => x - y,
                Op::Mul => x * y,
                Op::Div => x / y,
                _ => return Err(invalid_type(op, ty)),
            };
            Ok(r.to_bits())
        }
        Ty::F32 => {
            let (x, y) = (f32::from_bits(a as u32), f32::from_bits(b as u32));
            let r = match op {
                Op::Add => x + y,
                Op::Sub => x - y,
                Op::Mul => x * y,
                Op::Div => x / y,
                _ => return Err(invalid_type(op, ty)),
            };
            Ok(u64::from(r.to_bits()))
        }
        _ => {
            let mask = width_mask(ty);
            let bits = ty.size_bytes() * 8;
            let result = match op {
                Op::Add => a.wrapping_add(b),
                Op::Sub => a.wrapping_sub(b),
                Op::Mul => a.wrapping_mul(b),
                Op::And => a & b,
                Op::Or => a | b,
                Op::Xor => a ^ b,
                Op::Shl => (a & mask) << (b % u64::from(bits)),
                Op::Shr => {
                    let count = (b % u64::from(bits)) as u32;
                    if ty.is_signed() {
                        (sign_extend(a, ty) >> count) as u64
                    } else {
                        (a & mask) >> count
                    }
                }
                Op::Div | Op::Rem => {
                    if ty.is_signed() {
                        let (x, y) = (sign_extend(a, ty), sign_extend(b, ty));
                        if y == 0 {
                            return Err(FaultKind::DivisionByZero);
                        }
                        if x == signed_min(ty) && y == -1 {
                            return Err(FaultKind::DivisionOverflow);
                        }
                        (if op == Op::Div { x / y } else { x % y }) as u64
                    } else {
                        let (x, y) = (a & mask, b & mask);
                        if y == 0 {
                            return Err(FaultKind::DivisionByZero);
                        }
                        if op == Op::Div {
                            x / y
                        } else {
                            x % y
                        }
                    }
                }
                _ => return Err(invalid_type(op, ty)),
            };
            Ok(result & mask)
        }
    }
}

fn invalid_type(op: Op, ty: Ty) -> FaultKind {
    FaultKind::InvalidInstruction {
        reason: format!("`{}` with type `{ty}`", op.def().mnemonic),
    }
}

/// `mov`: converts raw bits of type `from` to raw bits of type `to`.
#[inline(always)]
pub fn convert(value: u64, from: Ty, to: Ty) -> u64 {
    match (from.is_float(), to.is_float()) {
        (false, false) => {
            let wide = if from.is_signed() {
                sign_extend(value, from) as u64
            } else {
                value & width_mask(from)
            };
            wide & width_mask(to)
        }
        (false, true) => {
            // Convert straight from the 64-bit integer so rounding happens once.
            if from.is_signed() {
                let x = sign_extend(value, from);
                match to {
                    Ty::F32 => u64::from((x as f32).to_bits()),
                    _ => (x as f64).to_bits(),
                }
            } else {
                let x = value & width_mask(from);
                match to {
                    Ty::F32 => u64::from((x as f32).to_bits()),
                    _ => (x as f64).to_bits(),
                }
            }
        }
        (true, false) => {
            // Rust `as` saturates and maps NaN to 0 (the DVM decision).
            let x = as_f64(value, from);
            match to {
                Ty::S8 => x as i8 as u8 as u64,
                Ty::U8 => u64::from(x as u8),
                Ty::S32 => x as i32 as u32 as u64,
                Ty::U32 => u64::from(x as u32),
                Ty::S64 => x as i64 as u64,
                _ => x as u64,
            }
        }
        (true, true) => match (from, to) {
            (Ty::F32, Ty::F64) => f64::from(f32::from_bits(value as u32)).to_bits(),
            (Ty::F64, Ty::F32) => u64::from((f64::from_bits(value) as f32).to_bits()),
            _ => value,
        },
    }
}

/// Branch compare at type `ty`. Float comparisons are IEEE (NaN compares false but for `ne`).
#[inline(always)]
pub fn compare(cond: Cond, ty: Ty, a: u64, b: u64) -> bool {
    if ty.is_float() {
        let (x, y) = (as_f64(a, ty), as_f64(b, ty));
        return match cond {
            Cond::L => x < y,
            Cond::Le => x <= y,
            Cond::E => x == y,
            _ => x != y,
        };
    }
    let ordering = if ty.is_signed() {
        sign_extend(a, ty).cmp(&sign_extend(b, ty))
    } else {
        (a & width_mask(ty)).cmp(&(b & width_mask(ty)))
    };
    match cond {
        Cond::L => ordering.is_lt(),
        Cond::Le => ordering.is_le(),
        Cond::E => ordering.is_eq(),
        _ => ordering.is_ne(),
    }
}

#[inline(always)]
pub fn is_zero(ty: Ty, a: u64) -> bool {
    if ty.is_float() {
        as_f64(a, ty) == 0.0
    } else {
        a & width_mask(ty) == 0
    }
}

pub fn exp(base: ExpBase, ty: Ty, a: u64) -> u64 {
    match ty {
        Ty::F32 => {
            let x = f32::from_bits(a as u32);
            let r = match base {
                ExpBase::E => x.exp(),
                ExpBase::Two => x.exp2(),
                ExpBase::Ten => 10f32.powf(x),
            };
            u64::from(r.to_bits())
        }
        _ => {
            let x = f64::from_bits(a);
            let r = match base {
                ExpBase::E => x.exp(),
                ExpBase::Two => x.exp2(),
                ExpBase::Ten => 10f64.powf(x),
            };
            r.to_bits()
        }
    }
}

fn syscall_name(id: u64) -> &'static str {
    match id {
        3 => "sread",
        4 => "swrite",
        5 => "slisten",
        8 => "pc_get",
        9 => "pc_write",
        10 => "pc_delete",
        11 => "pc_sync",
        12 => "systemEx",
        13 => "sclose",
        _ => "unknown",
    }
}

impl<'a> Exec<'a> {
    pub fn new(
        view: View,
        program: &'a Program,
        services: &'a dyn Services,
        space: u64,
        max_instructions: u64,
    ) -> Exec<'a> {
        Exec {
            view,
            program,
            services,
            space,
            instructions: 0,
            instructions_reported: 0,
            max_instructions,
            check_at: max_instructions.min(REPORT_EVERY_INSTRUCTIONS),
            output: Vec::new(),
            children: Vec::new(),
        }
    }

    /// Runs from `entry` until the runner ends.
    pub fn run(&mut self, entry: u64) -> Ending {
        let Some(mut index) = self.program.index_of(entry) else {
            return Ending::Fault(Fault {
                kind: FaultKind::InvalidInstruction {
                    reason: format!("entry point {entry:#x} is not an instruction"),
                },
                pc: entry,
            });
        };
        let program = self.program;
        let code = &program.decoded;
        let mut last_pc = entry;
        loop {
            let Some(d) = code.get(index) else {
                return Ending::Fault(Fault {
                    kind: FaultKind::InvalidInstruction {
                        reason: "execution ran past the end of .text".into(),
                    },
                    pc: last_pc,
                });
            };
            last_pc = d.addr;
            self.instructions += 1;
            // One compare per instruction covers both the limit and progress reports.
            if self.instructions > self.check_at {
                if self.instructions > self.max_instructions {
                    return Ending::Fault(Fault {
                        kind: FaultKind::InstructionLimit {
                            limit: self.max_instructions,
                        },
                        pc: d.addr,
                    });
                }
                self.services
                    .count_instructions(self.instructions - self.instructions_reported);
                self.instructions_reported = self.instructions;
                if self.services.stopping() {
                    return Ending::Fault(Fault {
                        kind: FaultKind::Internal {
                            reason: "the run was stopped".into(),
                        },
                        pc: d.addr,
                    });
                }
                self.check_at = self
                    .max_instructions
                    .min(self.instructions.saturating_add(REPORT_EVERY_INSTRUCTIONS));
            }
            match (d.handler)(self, d, index) {
                Ok(Next::Index(next)) => index = next,
                Ok(Next::End(mode)) => return Ending::Exit(mode),
                Err(kind) => return Ending::Fault(Fault { kind, pc: d.addr }),
            }
        }
    }

    /// The general path: instructions that `handlers::select` gives no specialised handler.
    /// (Arithmetic, `mov` and immediate-target branches always have one.)
    fn step(&mut self, d: &Decoded, index: usize) -> Step<Next> {
        let instr = &d.instr;
        let ops = instr.operands();
        match instr.op {
            Op::Br => {
                // Only `br:ji` comes here: its target is a value known at run time.
                let target = self.read(ops[0], 8)?;
                self.program
                    .index_of(target)
                    .map(Next::Index)
                    .ok_or_else(|| FaultKind::InvalidInstruction {
                        reason: format!("jump to {target:#x}, which is not an instruction"),
                    })
            }
            Op::Exit => Ok(Next::End(instr.exit)),
            Op::Nop => Ok(Next::Index(index + 1)),
            Op::Int => {
                self.interrupt(instr.imm8)?;
                Ok(Next::Index(index + 1))
            }
            Op::Spawn | Op::SpawnX => {
                self.spawn(ops)?;
                Ok(Next::Index(index + 1))
            }
            Op::Exp => {
                let ty = instr.tys[0];
                let size = ty.size_bytes() as usize;
                let a = self.read(ops[0], size)?;
                self.write(ops[1], size, exp(instr.base, ty, a))?;
                Ok(Next::Index(index + 1))
            }
            Op::Scmp | Op::Grep => Err(FaultKind::InvalidInstruction {
                reason: format!(
                    "`{}` has no defined semantics in DISA",
                    instr.def().mnemonic
                ),
            }),
            op => Err(FaultKind::Internal {
                reason: format!("no handler for `{}`", op.def().mnemonic),
            }),
        }
    }

    /// The address an operand names (not for immediates).
    #[inline(always)]
    fn address(&mut self, operand: Operand) -> Step<u64> {
        let (pointer, disp) = match operand {
            Operand::Direct(addr) => return Ok(addr),
            Operand::Indirect(addr) => (addr, 0),
            Operand::BaseDisp { disp, base } => (base, i64::from(disp) as u64),
            Operand::Imm(_) => {
                return Err(FaultKind::InvalidInstruction {
                    reason: "an immediate has no address".into(),
                })
            }
        };
        let base = match self.view.try_load(pointer, 8) {
            Some(value) => value,
            None => self.view.load_slow(pointer, 8)?,
        };
        Ok(base.wrapping_add(disp))
    }

    #[inline(always)]
    fn read(&mut self, operand: Operand, size: usize) -> Step<u64> {
        if let Operand::Imm(raw) = operand {
            return Ok(if size == 8 {
                raw
            } else {
                raw & ((1u64 << (size * 8)) - 1)
            });
        }
        let addr = self.address(operand)?;
        // The console words' page is never in the TLB, so a hit is never a console word.
        if let Some(value) = self.view.try_load(addr, size) {
            return Ok(value);
        }
        self.read_slow(addr, size)
    }

    #[inline(never)]
    fn read_slow(&mut self, addr: u64, size: usize) -> Step<u64> {
        if addr == abi::PR_CONSOLE_IN {
            return Ok(match self.services.console_input() {
                Some(byte) => u64::from(byte),
                None => u64::MAX >> (64 - size * 8),
            });
        }
        Ok(self.view.load_slow(addr, size)?)
    }

    #[inline(always)]
    fn write(&mut self, operand: Operand, size: usize, value: u64) -> Step<()> {
        let addr = self.address(operand)?;
        if self.view.try_store(addr, size, value) {
            return Ok(());
        }
        self.write_slow(addr, size, value)
    }

    #[inline(never)]
    fn write_slow(&mut self, addr: u64, size: usize, value: u64) -> Step<()> {
        if addr == abi::PR_CONSOLE_OUT {
            return self.emit(&[value as u8]);
        }
        Ok(self.view.store_slow(addr, size, value)?)
    }

    fn emit(&mut self, bytes: &[u8]) -> Step<()> {
        if self.output.len() + bytes.len() > MAX_OUTPUT_BYTES {
            return Err(FaultKind::OutputLimit);
        }
        self.output.extend_from_slice(bytes);
        Ok(())
    }

    fn word(&mut self, addr: u64) -> Step<u64> {
        Ok(self.view.load(addr, 8)?)
    }

    fn interrupt(&mut self, number: u8) -> Step<()> {
        if number != 0x80 {
            return Err(FaultKind::SystemCall {
                reason: format!("interrupt {number:#x} is not supported (only int 0x80)"),
            });
        }
        let id = self.word(abi::PR_SYSCALL_ID)?;
        let arg = |exec: &mut Self, k: u64| exec.word(abi::PR_SYSCALL_ARGS + 8 * k);
        let result = |exec: &mut Self, k: u64, value: u64| -> Step<()> {
            Ok(exec.view.store(abi::PR_SYSCALL_ARGS + 8 * k, 8, value)?)
        };
        match id {
            1 | 6 => {
                let size = arg(self, 0)?;
                let addr = match self.services.allocate_heap(self.space, size) {
                    Some(range) => {
                        self.view.allow(range);
                        range.start
                    }
                    None => 0,
                };
                result(self, 0, addr)
            }
            2 => {
                let micros = arg(self, 0)?.min(MAX_SLEEP_US);
                self.services
                    .clock()
                    .sleep(std::time::Duration::from_micros(micros));
                result(self, 0, 0)
            }
            7 => {
                let now_ns = self.services.clock().unix_time_ns();
                result(self, 0, 0)?;
                result(self, 1, now_ns / 1_000_000_000)?;
                result(self, 2, now_ns % 1_000_000_000)
            }
            100 => {
                let (addr, len) = (arg(self, 0)?, arg(self, 1)?);
                if len > MAX_WRITE_BYTES {
                    return Err(FaultKind::SystemCall {
                        reason: format!("write of {len} bytes; at most {MAX_WRITE_BYTES} per call"),
                    });
                }
                let mut bytes = vec![0u8; len as usize];
                self.view.read_bytes(addr, &mut bytes)?;
                self.emit(&bytes)?;
                result(self, 0, len)
            }
            101 => {
                let text = (arg(self, 0)? as i64).to_string();
                self.emit(text.as_bytes())
            }
            102 => {
                let text = arg(self, 0)?.to_string();
                self.emit(text.as_bytes())
            }
            103 => {
                let (bits, digits) = (arg(self, 0)?, arg(self, 1)?);
                if digits > 17 {
                    return Err(FaultKind::SystemCall {
                        reason: format!("print_f64 with {digits} digits; at most 17"),
                    });
                }
                let text = format!("{:.*}", digits as usize, f64::from_bits(bits));
                self.emit(text.as_bytes())
            }
            _ => Err(FaultKind::SystemCall {
                reason: format!(
                    "system call {id} ({}) is not supported by DVM",
                    syscall_name(id)
                ),
            }),
        }
    }

    /// The ranges of a using or watched descriptor `{n, (base, len) × n}`, less its empty ones.
    fn read_ranges(&mut self, descriptor: u64, what: &str) -> Step<Vec<Range>> {
        let count = self.word(descriptor)?;
        if count > MAX_DESCRIPTOR_RANGES {
            return Err(FaultKind::BadSpawnDescriptor {
                reason: format!("{what} descriptor at {descriptor:#x} has {count} ranges; at most {MAX_DESCRIPTOR_RANGES}"),
            });
        }
        let mut ranges = Vec::with_capacity(count as usize);
        for index in 0..count {
            let at = descriptor.wrapping_add(8 + 16 * index);
            let base = self.word(at)?;
            let len = self.word(at.wrapping_add(8))?;
            // A length of zero, or one whose end `base + len` lies below `base` (it wraps: a
            // negative length, as computed by code that spawns with `end - start` of an empty
            // interval), is an empty range: nothing may be accessed through it, so it is
            // skipped, whatever its base. The original toolchain's quicksort example spawns
            // its children that way.
            if len == 0 || base.checked_add(len).is_none() {
                continue;
            }
            let range = Range::new(base, len).filter(shared_range).ok_or_else(|| {
                FaultKind::BadSpawnDescriptor {
                    reason: format!(
                        "{what} range {index} ({base:#x}, length {len:#x}) is not inside the shared region"
                    ),
                }
            })?;
            ranges.push(range);
        }
        Ok(ranges)
    }

    fn spawn(&mut self, ops: &[Operand]) -> Step<()> {
        let stack_desc = self.read(ops[0], 8)?;
        let using_desc = self.read(ops[1], 8)?;
        let watch_desc = self.read(ops[2], 8)?;
        let entry_word = self.read(ops[3], 8)?;
        let space = match ops.get(4) {
            Some(operand) => {
                let space_word = self.read(*operand, 8)?;
                let base = self.word(space_word)?;
                let space = base >> abi::SPACE_SHIFT;
                if base & ((1u64 << abi::SPACE_SHIFT) - 1) != 0 || space >= abi::SPACE_COUNT {
                    return Err(FaultKind::BadSpawnDescriptor {
                        reason: format!("space base {base:#x} is not i * 2^46 with i < 64"),
                    });
                }
                space
            }
            None => self.space,
        };
        let stack_base = self.word(stack_desc)?;
        let stack_size = self.word(stack_desc.wrapping_add(8))?;
        let using = self.read_ranges(using_desc, "using")?;
        let watched = self.read_ranges(watch_desc, "watched")?;
        let entry = self.word(entry_word)?;
        if self.program.index_of(entry).is_none() {
            return Err(FaultKind::BadSpawnDescriptor {
                reason: format!("code address {entry:#x} is not an instruction in .text"),
            });
        }
        let stack = if (stack_base, stack_size) == (0, 0) {
            self.services
                .allocate_stack(space)
                .ok_or_else(|| FaultKind::RunnerLimit {
                    reason: format!("the stack area of space {space} is exhausted"),
                })?
        } else {
            Range::new(stack_base, stack_size)
                .filter(shared_range)
                .ok_or_else(|| FaultKind::BadSpawnDescriptor {
                    reason: format!("stack ({stack_base:#x}, size {stack_size:#x}) is empty or not inside the shared region"),
                })?
        };
        let id = self
            .services
            .new_runner_id()
            .map_err(|reason| FaultKind::RunnerLimit { reason })?;
        // The parent writes the child's initial frame, so the stack joins its ranges.
        self.view.allow(stack);
        let written = self
            .view
            .store(abi::PR_SPAWN_STACK_BASE, 8, stack.start)
            .and_then(|()| {
                self.view
                    .store(abi::PR_SPAWN_STACK_SIZE, 8, stack.end - stack.start)
            })
            .and_then(|()| self.view.store(abi::PR_SPAWN_ID, 8, id));
        if let Err(err) = written {
            self.services.forget_runner();
            return Err(err.into());
        }
        self.children.push(ChildSpec {
            id,
            entry,
            space,
            stack,
            using,
            watched,
        });
        Ok(())
    }
}

fn shared_range(range: &Range) -> bool {
    region_of(range.start) == Region::Shared
        && region_of(range.end - 1) == Region::Shared
        && range.start >> abi::SPACE_SHIFT == (range.end - 1) >> abi::SPACE_SHIFT
}

enum Next {
    Index(usize),
    End(ExitMode),
}

/// Specialised handlers. Each is monomorphised over the operation and the type(s) with const
/// generics, so `arith`/`convert`/`compare` (marked `#[inline(always)]`) fold their `match`es
/// on those away and the handler does only the operand accesses and the operation itself.
/// `select` is the one place that maps a decoded instruction to its handler.
mod handlers {
    use super::*;

    const ARITH_OPS: [Op; 10] = [
        Op::Add,
        Op::Sub,
        Op::Mul,
        Op::Div,
        Op::And,
        Op::Or,
        Op::Xor,
        Op::Rem,
        Op::Shl,
        Op::Shr,
    ];
    const COMPARES: [Cond; 4] = [Cond::L, Cond::Le, Cond::E, Cond::Ne];

    #[inline(always)]
    const fn ty(code: u8) -> Ty {
        Ty::ALL[code as usize]
    }

    fn ty_code(ty: Ty) -> u8 {
        Ty::ALL.iter().position(|t| *t == ty).unwrap_or(0) as u8
    }

    fn arith_h<const OP: u8, const TY: u8>(
        e: &mut Exec<'_>,
        d: &Decoded,
        index: usize,
    ) -> Step<Next> {
        let (op, ty) = (ARITH_OPS[OP as usize], ty(TY));
        let size = ty.size_bytes() as usize;
        let a = e.read(d.instr.operand(0), size)?;
        let b = e.read(d.instr.operand(1), size)?;
        let c = arith(op, ty, a, b)?;
        e.write(d.instr.operand(2), size, c)?;
        Ok(Next::Index(index + 1))
    }

    fn conv_h<const FROM: u8, const TO: u8>(
        e: &mut Exec<'_>,
        d: &Decoded,
        index: usize,
    ) -> Step<Next> {
        let (from, to) = (ty(FROM), ty(TO));
        let value = e.read(d.instr.operand(0), from.size_bytes() as usize)?;
        e.write(
            d.instr.operand(1),
            to.size_bytes() as usize,
            convert(value, from, to),
        )?;
        Ok(Next::Index(index + 1))
    }

    #[inline(always)]
    fn jump(d: &Decoded, index: usize, taken: bool) -> Step<Next> {
        if !taken {
            Ok(Next::Index(index + 1))
        } else if d.target != NO_TARGET {
            Ok(Next::Index(d.target as usize))
        } else {
            let target = d.instr.branch_target(d.addr).unwrap_or(0);
            Err(FaultKind::InvalidInstruction {
                reason: format!("branch to {target:#x}, which is not an instruction"),
            })
        }
    }

    fn compare_h<const COND: u8, const TY: u8>(
        e: &mut Exec<'_>,
        d: &Decoded,
        index: usize,
    ) -> Step<Next> {
        let ty = ty(TY);
        let size = ty.size_bytes() as usize;
        let a = e.read(d.instr.operand(0), size)?;
        let b = e.read(d.instr.operand(1), size)?;
        jump(d, index, compare(COMPARES[COND as usize], ty, a, b))
    }

    fn test_h<const ZERO: bool, const TY: u8>(
        e: &mut Exec<'_>,
        d: &Decoded,
        index: usize,
    ) -> Step<Next> {
        let ty = ty(TY);
        let a = e.read(d.instr.operand(0), ty.size_bytes() as usize)?;
        jump(d, index, is_zero(ty, a) == ZERO)
    }

    fn jump_h(_: &mut Exec<'_>, d: &Decoded, index: usize) -> Step<Next> {
        jump(d, index, true)
    }

    fn general_h(e: &mut Exec<'_>, d: &Decoded, index: usize) -> Step<Next> {
        e.step(d, index)
    }

    /// `handler::<FIRST, code>` for a type code known only at run time: const generic
    /// arguments must be literals, so the eight types are spelled out once, here.
    macro_rules! per_type {
        ($code:expr, $handler:ident, $first:expr) => {
            match $code {
                0 => $handler::<{ $first }, 0> as Handler,
                1 => $handler::<{ $first }, 1>,
                2 => $handler::<{ $first }, 2>,
                3 => $handler::<{ $first }, 3>,
                4 => $handler::<{ $first }, 4>,
                5 => $handler::<{ $first }, 5>,
                6 => $handler::<{ $first }, 6>,
                _ => $handler::<{ $first }, 7>,
            }
        };
    }

    fn conv_to<const FROM: u8>(to: Ty) -> Handler {
        per_type!(ty_code(to), conv_h, FROM)
    }

    pub(super) fn select(instr: &Instr) -> Handler {
        let ty = instr.tys[0];
        // Operations that are invalid for a type (floats in `and`) never reach here: the
        // decoder rejects them, and `arith` faults if one ever did.
        let code = ty_code(ty);
        match instr.op {
            Op::Add => per_type!(code, arith_h, 0),
            Op::Sub => per_type!(code, arith_h, 1),
            Op::Mul => per_type!(code, arith_h, 2),
            Op::Div => per_type!(code, arith_h, 3),
            Op::And => per_type!(code, arith_h, 4),
            Op::Or => per_type!(code, arith_h, 5),
            Op::Xor => per_type!(code, arith_h, 6),
            Op::Rem => per_type!(code, arith_h, 7),
            Op::Shl => per_type!(code, arith_h, 8),
            Op::Shr => per_type!(code, arith_h, 9),
            Op::Conv => match code {
                0 => conv_to::<0>(instr.tys[1]),
                1 => conv_to::<1>(instr.tys[1]),
                2 => conv_to::<2>(instr.tys[1]),
                3 => conv_to::<3>(instr.tys[1]),
                4 => conv_to::<4>(instr.tys[1]),
                5 => conv_to::<5>(instr.tys[1]),
                6 => conv_to::<6>(instr.tys[1]),
                _ => conv_to::<7>(instr.tys[1]),
            },
            Op::Br => match instr.cond {
                Cond::J => jump_h,
                Cond::L => per_type!(code, compare_h, 0),
                Cond::Le => per_type!(code, compare_h, 1),
                Cond::E => per_type!(code, compare_h, 2),
                Cond::Ne => per_type!(code, compare_h, 3),
                Cond::Z => per_type!(code, test_h, true),
                Cond::Nz => per_type!(code, test_h, false),
                Cond::Ji => general_h,
            },
            _ => general_h,
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn tables_line_up_with_the_isa() {
            assert_eq!(ty(ty_code(Ty::F32)), Ty::F32);
            for (code, ty_value) in Ty::ALL.iter().enumerate() {
                assert_eq!(ty(code as u8), *ty_value);
            }
            assert_eq!(ARITH_OPS[9], Op::Shr);
            assert_eq!(COMPARES[3], Cond::Ne);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_arithmetic_wraps_and_faults() {
        assert_eq!(arith(Op::Add, Ty::U8, 0xff, 1), Ok(0));
        assert_eq!(arith(Op::Sub, Ty::S32, 0, 1), Ok(0xffff_ffff));
        assert_eq!(arith(Op::Mul, Ty::S64, u64::MAX, 2), Ok(u64::MAX - 1));
        assert_eq!(arith(Op::Div, Ty::S8, 0xf9 /* -7 */, 2), Ok(0xfd /* -3 */));
        assert_eq!(arith(Op::Rem, Ty::S8, 0xf9, 2), Ok(0xff /* -1 */));
        assert_eq!(arith(Op::Div, Ty::U8, 0xf9, 2), Ok(0x7c));
        assert_eq!(
            arith(Op::Div, Ty::S64, 1, 0),
            Err(FaultKind::DivisionByZero)
        );
        assert_eq!(
            arith(Op::Div, Ty::S64, i64::MIN as u64, u64::MAX),
            Err(FaultKind::DivisionOverflow)
        );
        assert_eq!(
            arith(Op::Div, Ty::S8, 0x80, 0xff),
            Err(FaultKind::DivisionOverflow)
        );
        assert_eq!(arith(Op::Shr, Ty::S8, 0x80, 1), Ok(0xc0));
        assert_eq!(
            arith(Op::Shr, Ty::U8, 0x80, 9),
            Ok(0x40),
            "count modulo width"
        );
        assert_eq!(arith(Op::Shl, Ty::U32, 1, 31), Ok(0x8000_0000));
    }

    #[test]
    fn float_arithmetic_is_ieee() {
        let r = arith(Op::Div, Ty::F64, 1f64.to_bits(), 0f64.to_bits()).expect("no fault");
        assert_eq!(f64::from_bits(r), f64::INFINITY);
        let r = arith(
            Op::Add,
            Ty::F32,
            u64::from(0.1f32.to_bits()),
            u64::from(0.2f32.to_bits()),
        )
        .expect("ok");
        assert_eq!(f32::from_bits(r as u32), 0.1f32 + 0.2f32);
        assert!(arith(Op::And, Ty::F64, 0, 0).is_err());
    }

    #[test]
    fn conversions_follow_the_decisions() {
        assert_eq!(
            convert(0xff, Ty::S8, Ty::S64),
            u64::MAX,
            "sign-extends by source"
        );
        assert_eq!(
            convert(0xff, Ty::U8, Ty::S64),
            0xff,
            "zero-extends by source"
        );
        assert_eq!(convert(0x1234_5678, Ty::U32, Ty::U8), 0x78, "truncates");
        assert_eq!(convert((-1i64) as u64, Ty::S64, Ty::F64), (-1f64).to_bits());
        assert_eq!(
            convert((-2.9f64).to_bits(), Ty::F64, Ty::S64),
            (-2i64) as u64,
            "toward zero"
        );
        assert_eq!(
            convert(1e300f64.to_bits(), Ty::F64, Ty::S32),
            i32::MAX as u32 as u64,
            "saturates"
        );
        assert_eq!(
            convert(f64::NAN.to_bits(), Ty::F64, Ty::U64),
            0,
            "NaN gives 0"
        );
        assert_eq!(
            convert((-5f64).to_bits(), Ty::F64, Ty::U8),
            0,
            "saturates at 0"
        );
        assert_eq!(
            convert(u64::from(1.5f32.to_bits()), Ty::F32, Ty::F64),
            1.5f64.to_bits()
        );
    }

    #[test]
    fn comparisons_by_type() {
        assert!(compare(Cond::L, Ty::S8, 0xff, 0), "-1 < 0 signed");
        assert!(!compare(Cond::L, Ty::U8, 0xff, 0), "255 > 0 unsigned");
        assert!(compare(Cond::L, Ty::S64, u64::MAX, 0));
        assert!(compare(
            Cond::Ne,
            Ty::F64,
            f64::NAN.to_bits(),
            f64::NAN.to_bits()
        ));
        assert!(!compare(
            Cond::E,
            Ty::F64,
            f64::NAN.to_bits(),
            f64::NAN.to_bits()
        ));
        assert!(compare(
            Cond::Le,
            Ty::F32,
            u64::from(1f32.to_bits()),
            u64::from(1f32.to_bits())
        ));
        assert!(is_zero(Ty::F64, (-0.0f64).to_bits()));
        assert!(is_zero(Ty::U8, 0x100), "only the type's bytes count");
    }
}
