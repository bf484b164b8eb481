//! The interpreter: runs one runner from its entry point to its end (an `exit`, or a fault).
//!
//! Code is decoded once at load (`Program`): the hot loop indexes an array of decoded
//! instructions whose immediate branch targets are already resolved to indexes, so it never
//! parses bytes. Every value is carried as the raw bits of its type in a `u64` (integers
//! zero-extended from their width, floats as IEEE bits) and interpreted per instruction type.
//!
//! The hot loop only calls the instruction's handler, which returns the next index (`STOP`
//! once it has recorded an ending in `Exec`); handlers are chosen at load time per operation,
//! type and addressing modes, some covering two instructions (superinstructions, each with a
//! plain handler for exact stepping). Invariant: `Exec::instructions` after `run` is exactly
//! the number of instructions executed, the faulting one included (counted per straight-line
//! run; see `run`).
//!
//! Everything a program can do wrong ends in a `Fault` naming the reason, the PC and the
//! address; nothing here panics on program input. Side effects on the VM (ids, stacks, heap,
//! console input) go through `Services`, so the interpreter knows nothing of scheduling.
//!
//! Profiling (`--profile`) costs nothing when off: the program is decoded with call-tracking
//! handlers only when a profile is asked for (`Program::track_calls`), and a runner looks at
//! the clock for a due sample only where it already leaves the fast path (`enter_cold`), which
//! a profiled runner does every `PROFILE_CHECK_EVERY` instructions.

use crate::abi;
use crate::codec::{Instr, Operand};
use crate::image::LoadedImage;
use crate::isa::{Cond, ExitMode, ExpBase, Op, Ty};
use crate::native::{NativeExit, NativeState};
use crate::view::{region_of, AccessError, Range, Region, View};
use dvm_perf::meter::WorkerMeter;
use dvm_perf::profile::{Attempt, Sample, Symbols, What, MAX_STACK_DEPTH};
use std::fmt;
use std::sync::Arc;

/// Longest `usleep` one call may ask for.
pub const MAX_SLEEP_US: u64 = 60_000_000;
/// Largest single `write` system call.
pub const MAX_WRITE_BYTES: u64 = 1 << 20;
/// Output a runner may buffer before it ends.
pub const MAX_OUTPUT_BYTES: usize = 64 << 20;
/// Ranges in one spawn descriptor.
pub const MAX_DESCRIPTOR_RANGES: u64 = 64;

const NO_TARGET: u32 = u32::MAX;

/// Executes one decoded instruction at `index` and returns the index of the next one, or
/// `STOP` after recording the runner's ending (a fault or an exit) in `Exec`: the result stays
/// in a register and the ending is built only on the cold path. Chosen per instruction at load
/// time.
type Handler = fn(&mut Exec<'_>, &Decoded, usize) -> usize;

/// The index a handler returns when the runner stops (its ending is in `Exec::stop`).
const STOP: usize = usize::MAX;

/// One operand, decoded so a handler specialised for its addressing mode needs no `match`:
/// `x` is the immediate (masked to its access width), the direct address, or the address of
/// the pointer (indirect and base+displacement are one shape: `disp` is 0 for indirect).
#[derive(Clone, Copy, Debug, Default)]
struct Opnd {
    x: u64,
    disp: u64,
    mode: u8,
}

/// Addressing-mode codes of `Opnd::mode` and of the handlers' mode parameters.
const IMM: u8 = 0;
const DIR: u8 = 1;
const PTR: u8 = 2;
/// A handler parameter only: the mode is read from the operand at run time.
const ANY: u8 = 3;

/// One decoded instruction, with its immediate branch target resolved and its handler chosen.
#[derive(Clone)]
pub struct Decoded {
    pub instr: Instr,
    pub addr: u64,
    /// Index of the immediate branch target, or `NO_TARGET`.
    target: u32,
    /// This instruction's index (a fault records where the run stopped).
    index: u32,
    /// Instructions from here to the end of this straight-line run (the next branch)
    /// inclusive: entering a run at this instruction counts them all at once.
    run_len: u32,
    /// `run_len` of the branch target and of the next instruction.
    target_len: u32,
    next_len: u32,
    ops: [Opnd; 3],
    /// The handler, possibly a superinstruction covering the next instruction too.
    handler: Handler,
    /// A handler for this instruction alone (exact per-instruction counting).
    single: Handler,
    /// The handler `handler` replaced where native code may take over (`Program::attach_jit`).
    unhooked: Handler,
}

impl Decoded {
    /// The index of the immediate branch target, if it is an instruction.
    pub fn target(&self) -> Option<usize> {
        (self.target != NO_TARGET).then_some(self.target as usize)
    }

    /// Instructions from here to the end of this straight-line run (the next branch), this one
    /// included: what entering a run here counts.
    pub fn run_len(&self) -> u32 {
        self.run_len
    }
}

impl fmt::Debug for Decoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoded")
            .field("instr", &self.instr)
            .field("addr", &self.addr)
            .field("target", &self.target)
            .field("run_len", &self.run_len)
            .finish()
    }
}

/// The program, decoded once and shared by every runner.
#[derive(Debug)]
pub struct Program {
    pub image: LoadedImage,
    /// The instructions, then one sentinel past the end (execution that falls off `.text`).
    pub decoded: Vec<Decoded>,
    /// With call tracking (profiling): the plain handler of each instruction, which the
    /// tracking handlers call. Empty otherwise.
    original: Vec<Handler>,
    /// Native code that may run the program's loops (`attach_jit`).
    jit: Option<Arc<dyn Jit>>,
}

/// Access width of operand `k` of `instr` (the immediates are masked to it at decode time).
fn operand_size(instr: &Instr, k: usize) -> usize {
    let ty = if instr.op == Op::Conv && k == 1 {
        instr.tys[1]
    } else {
        instr.tys[0]
    };
    ty.size_bytes() as usize
}

fn decode_operand(instr: &Instr, k: usize) -> Opnd {
    match instr.operand(k) {
        Operand::Imm(raw) => {
            let size = operand_size(instr, k);
            Opnd {
                x: if size >= 8 {
                    raw
                } else {
                    raw & ((1u64 << (size * 8)) - 1)
                },
                disp: 0,
                mode: IMM,
            }
        }
        Operand::Direct(addr) => Opnd {
            x: addr,
            disp: 0,
            mode: DIR,
        },
        Operand::Indirect(addr) => Opnd {
            x: addr,
            disp: 0,
            mode: PTR,
        },
        Operand::BaseDisp { disp, base } => Opnd {
            x: base,
            disp: i64::from(disp) as u64,
            mode: PTR,
        },
    }
}

impl Program {
    pub fn new(image: LoadedImage) -> Program {
        let mut decoded: Vec<Decoded> = image
            .code
            .iter()
            .enumerate()
            .map(|(index, (offset, instr))| {
                let ops = [
                    decode_operand(instr, 0),
                    decode_operand(instr, 1),
                    decode_operand(instr, 2),
                ];
                let single = handlers::select(instr, &ops);
                Decoded {
                    instr: *instr,
                    addr: abi::CODE_BASE + u64::from(*offset),
                    target: NO_TARGET,
                    index: index as u32,
                    run_len: 0,
                    target_len: 0,
                    next_len: 0,
                    ops,
                    handler: single,
                    single,
                    unhooked: single,
                }
            })
            .collect();
        let count = decoded.len();
        let addrs: Vec<u64> = decoded.iter().map(|d| d.addr).collect();
        for d in &mut decoded {
            if let Some(target) = d.instr.branch_target(d.addr) {
                if let Ok(index) = addrs.binary_search(&target) {
                    d.target = index as u32;
                }
            }
        }
        // Runs end at branches (the only instructions that can go anywhere but the next one).
        let mut next_run = 0u32;
        for d in decoded.iter_mut().rev() {
            d.next_len = next_run;
            d.run_len = if d.instr.op == Op::Br {
                1
            } else {
                next_run + 1
            };
            next_run = d.run_len;
        }
        for index in 0..count {
            let target = decoded[index].target;
            if target != NO_TARGET {
                decoded[index].target_len = decoded[target as usize].run_len;
            }
            if let Some(fused) = handlers::fuse(&decoded[index], decoded.get(index + 1)) {
                decoded[index].handler = fused;
            }
        }
        let mut past_end = Decoded {
            instr: Instr::new(Op::Nop),
            addr: u64::MAX,
            target: NO_TARGET,
            index: count as u32,
            run_len: 0,
            target_len: 0,
            next_len: 0,
            ops: [Opnd::default(); 3],
            handler: handlers::past_end_h,
            single: handlers::past_end_h,
            unhooked: handlers::past_end_h,
        };
        past_end.addr = decoded.last().map_or(abi::CODE_BASE, |d| d.addr);
        decoded.push(past_end);
        Program {
            image,
            decoded,
            original: Vec::new(),
            jit: None,
        }
    }

    /// Lets `jit` run the program's loops: the handler of every loop header (the target of a
    /// branch at or after it) first asks `jit` for native code, which runs from there until it
    /// hands back. Not with call tracking: native code keeps no shadow call stack.
    pub fn attach_jit(&mut self, jit: Arc<dyn Jit>) {
        if !self.original.is_empty() {
            return;
        }
        let count = self.decoded.len().saturating_sub(1);
        for index in 0..count {
            let target = self.decoded[index].target;
            if target == NO_TARGET || target as usize > index {
                continue;
            }
            let header = &mut self.decoded[target as usize];
            if header.handler as usize != header_h as Handler as usize {
                header.unhooked = header.handler;
                header.handler = header_h;
            }
        }
        self.jit = Some(jit);
    }

    /// The decoded instructions, without the sentinel past the end.
    pub fn code(&self) -> &[Decoded] {
        self.instructions()
    }

    /// The program's code symbols, for naming profile frames.
    pub fn symbols(&self, dso: &str) -> Symbols {
        Symbols::new(
            dso,
            self.image
                .image
                .symbols
                .iter()
                .map(|symbol| (symbol.name.clone(), symbol.addr)),
        )
    }

    /// Makes runners keep a shadow call stack for the profiler. DISA has no call instruction:
    /// by the compilers' convention a call stores its return address and jumps to a function,
    /// and a return jumps through the stored address. So a `br:j` to a function's first
    /// instruction (a symbol that is not a local `.L` label, other than the branch's own
    /// function) counts as a call returning to the next instruction, and a `br:ji` that lands
    /// on the return address of a tracked call returns from it (and from any call above it
    /// that never returned). Only the handlers of those branches change, so a program without
    /// profiling runs exactly the handlers it always did.
    pub fn track_calls(&mut self) {
        let symbols = self.symbols("");
        let count = self.decoded.len().saturating_sub(1);
        self.original = self.decoded.iter().map(|d| d.single).collect();
        for index in 0..count {
            let d = &self.decoded[index];
            if d.instr.op != Op::Br || d.handler as usize != d.single as usize {
                continue;
            }
            let tracked: Handler = match d.instr.cond {
                Cond::Ji => tracked_return_h,
                Cond::J if d.target != NO_TARGET => {
                    let target = self.decoded[d.target as usize].addr;
                    let own = symbols.function(d.addr).map(|(_, off)| d.addr - off);
                    match symbols.function(target) {
                        Some((_, 0)) if own != Some(target) => tracked_call_h,
                        _ => continue,
                    }
                }
                _ => continue,
            };
            self.decoded[index].handler = tracked;
            self.decoded[index].single = tracked;
            // A superinstruction ending in this branch would run it without its handler.
            if let Some(before) = index.checked_sub(1).map(|i| &mut self.decoded[i]) {
                before.handler = before.single;
            }
        }
    }

    /// The instructions, without the sentinel.
    fn instructions(&self) -> &[Decoded] {
        &self.decoded[..self.decoded.len().saturating_sub(1)]
    }

    pub fn index_of(&self, addr: u64) -> Option<usize> {
        self.instructions()
            .binary_search_by_key(&addr, |d| d.addr)
            .ok()
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
        // Of labels sharing an address, the one the source used here (`label_for`'s rule);
        // operands are named in order, each counting those before it that name its address.
        let seen = std::cell::RefCell::new(Vec::<u64>::new());
        let name = |addr: u64| {
            let mut seen = seen.borrow_mut();
            let nth = seen.iter().filter(|earlier| **earlier == addr).count();
            seen.push(addr);
            self.image
                .label_for(Some(d.addr), addr, nth)
                .map(str::to_string)
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
    /// No page memory was left for the page of `addr`.
    MemoryLimit {
        addr: u64,
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
            | FaultKind::ReadOnly { addr }
            | FaultKind::MemoryLimit { addr, .. } => Some(*addr),
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
            FaultKind::MemoryLimit { addr, limit_bytes } => write!(
                f,
                "memory limit of {limit_bytes} bytes reached (--max-memory): no page memory left \
                 for the page of {addr:#x}"
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
            AccessError::Memory { addr, limit } => FaultKind::MemoryLimit {
                addr,
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
    /// The count above which entering a run leaves the fast path (limit or report).
    check_at: u64,
    pub output: Vec<u8>,
    pub children: Vec<ChildSpec>,
    /// How the runner ended, recorded by the handler that returned `STOP`.
    stop: Option<Ending>,
    /// The index of the instruction that stopped the runner.
    stop_index: usize,
    /// A fault found on a slow path, waiting for its handler to record it with its PC.
    pending: Option<FaultKind>,
    /// Counting one instruction at a time: the limit falls inside the current run.
    stepping: bool,
    /// Where to continue when the fast loop hands over to the stepping loop.
    resume: usize,
    /// The profiler's state, when the run is profiled.
    pub profile: Option<Box<ExecProfile>>,
}

/// A profiled runner checks for a sample request at least this often (instructions): ~15 µs
/// of interpretation, so a 1 kHz sample lands within a few percent of its tick.
const PROFILE_CHECK_EVERY: u64 = 1 << 13;

/// A late sample stands for at most this many ticks.
const MAX_TICKS_PER_SAMPLE: u64 = 1000;

/// Calls deeper than this drop their outermost frames from the shadow stack.
const MAX_SHADOW_DEPTH: usize = 1024;

/// A profiled runner's shadow call stack and the samples taken while it ran.
pub struct ExecProfile {
    meter: Arc<WorkerMeter>,
    /// `(call site, return address)`, outermost first.
    shadow: Vec<(u64, u64)>,
    samples: Vec<Sample>,
}

impl ExecProfile {
    pub fn new(meter: Arc<WorkerMeter>) -> ExecProfile {
        ExecProfile {
            meter,
            shadow: Vec::new(),
            samples: Vec::new(),
        }
    }

    fn push_call(&mut self, site: u64, returns_to: u64) {
        if self.shadow.len() >= MAX_SHADOW_DEPTH {
            self.shadow.remove(0);
        }
        self.shadow.push((site, returns_to));
    }

    fn returned_to(&mut self, addr: u64) {
        if let Some(depth) = self.shadow.iter().rposition(|(_, ret)| *ret == addr) {
            self.shadow.truncate(depth);
        }
    }

    /// A sample of `pc` standing for `ticks` sampling periods (more than one only when the
    /// runner could not check the clock for a while, e.g. inside a long page wait).
    fn sample(&mut self, pc: u64, ticks: u64) {
        let mut stack = Vec::with_capacity((self.shadow.len() + 1).min(MAX_STACK_DEPTH));
        stack.push(pc);
        stack.extend(
            self.shadow
                .iter()
                .rev()
                .take(MAX_STACK_DEPTH - 1)
                .map(|(site, _)| *site),
        );
        let sample = Sample {
            time_ns: self.meter.now_ns(),
            place: self.meter.place,
            what: What::Program(Attempt::Unfinished),
            stack,
        };
        for _ in 1..ticks.min(MAX_TICKS_PER_SAMPLE) {
            self.samples.push(sample.clone());
        }
        self.samples.push(sample);
    }

    /// Hands the samples to the worker's meter, marked with how the attempt ended.
    pub fn finish(self, attempt: Attempt) {
        if self.samples.is_empty() {
            return;
        }
        let ExecProfile { meter, samples, .. } = self;
        meter.record(samples.into_iter().map(|mut sample| {
            sample.what = What::Program(attempt);
            sample
        }));
    }
}

/// Native code for a program, shared by every runner and worker of a run: the hook through
/// which the `dvm-jit` crate runs loops (`crate::native` holds what it is lent and gives back).
pub trait Jit: Send + Sync + fmt::Debug {
    /// Runs native code for the region starting at instruction `index` of `program`, if there
    /// is (or, this entry being hot enough, now is) some; `None`: the interpreter runs `index`.
    ///
    /// On entry the instructions of the run containing `index` are already counted in
    /// `state.instructions` (the interpreter counts a straight-line run when it enters it);
    /// native code counts every run it enters itself, and only while the count stays at or
    /// below `state.check_at`.
    fn run(
        &self,
        program: &Program,
        index: usize,
        state: &mut NativeState<'_>,
    ) -> Option<NativeExit>;
}

/// A loop header with a JIT attached: runs native code from here if there is some. Native code
/// that hands back at its own entry (its first access missed the TLB) leaves the instruction
/// to the handler it replaced, so every call makes progress.
fn header_h(e: &mut Exec<'_>, d: &Decoded, index: usize) -> usize {
    let program = e.program;
    if let (Some(jit), false) = (program.jit.as_deref(), e.stepping) {
        let mut state = NativeState {
            tlb: e.view.tlb_access(),
            instructions: e.instructions,
            check_at: e.check_at,
        };
        let exit = jit.run(program, index, &mut state);
        e.instructions = state.instructions;
        if let Some(exit) = exit {
            if !exit.counted {
                let len = program.decoded.get(exit.index).map_or(0, |n| n.run_len);
                return e.enter(exit.index, len);
            }
            if exit.index != index {
                return exit.index;
            }
        }
    }
    (d.unhooked)(e, d, index)
}

/// Profiling: a tracked call (see `Program::track_calls`).
fn tracked_call_h(e: &mut Exec<'_>, d: &Decoded, index: usize) -> usize {
    let program = e.program;
    if let Some(profile) = e.profile.as_deref_mut() {
        let returns_to = program.decoded.get(index + 1).map_or(u64::MAX, |n| n.addr);
        profile.push_call(d.addr, returns_to);
    }
    (program.original[index])(e, d, index)
}

/// Profiling: a computed jump, which returns from a tracked call when it lands after one.
fn tracked_return_h(e: &mut Exec<'_>, d: &Decoded, index: usize) -> usize {
    let program = e.program;
    let next = (program.original[index])(e, d, index);
    if let (Some(profile), Some(to)) = (e.profile.as_deref_mut(), program.decoded.get(next)) {
        profile.returned_to(to.addr);
    }
    next
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

/// A float operation whose first operand is a NaN gives that NaN, quieted (DVM decision,
/// `docs/DISA.md`). With one NaN operand IEEE hardware gives that NaN quieted whatever the
/// order, but with two it picks one by operand position, and a compiler may swap the
/// operands of `+` and `*`: this rule fixes the result for every build, interpreter and JIT.
#[cold]
fn first_nan(op: Op, ty: Ty, a: u64) -> Step<u64> {
    if !matches!(op, Op::Add | Op::Sub | Op::Mul | Op::Div) {
        return Err(invalid_type(op, ty));
    }
    Ok(match ty {
        Ty::F32 => (a & 0xffff_ffff) | QUIET_F32,
        _ => a | QUIET_F64,
    })
}

/// The quiet bit of an `f32` and of an `f64` NaN.
pub const QUIET_F32: u64 = 1 << 22;
pub const QUIET_F64: u64 = 1 << 51;

/// `a op b` at type `ty` (raw bits in, raw bits out).
#[inline(always)]
pub fn arith(op: Op, ty: Ty, a: u64, b: u64) -> Step<u64> {
    match ty {
        Ty::F64 => {
            let (x, y) = (f64::from_bits(a), f64::from_bits(b));
            if x.is_nan() {
                return first_nan(op, ty, a);
            }
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
            if x.is_nan() {
                return first_nan(op, ty, a);
            }
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
            stop: None,
            stop_index: 0,
            pending: None,
            stepping: false,
            resume: 0,
            profile: None,
        }
    }

    /// Profiles this runner: samples when `meter` asks for one.
    pub fn profile_with(&mut self, meter: Arc<WorkerMeter>) {
        self.profile = Some(Box::new(ExecProfile::new(meter)));
        self.check_at = self
            .check_at
            .min(self.instructions.saturating_add(PROFILE_CHECK_EVERY));
    }

    /// Runs from `entry` until the runner ends.
    ///
    /// Instructions are counted per run (a straight line up to the next branch): entering a
    /// run adds its length, a runner that stops inside a run gives back the instructions after
    /// the one that stopped it, and when `--max-instructions` falls inside a run, that run is
    /// executed one instruction at a time, so the count and the faulting PC are exact.
    pub fn run(&mut self, entry: u64) -> Ending {
        let Some(first) = self.program.index_of(entry) else {
            return Ending::Fault(Fault {
                kind: FaultKind::InvalidInstruction {
                    reason: format!("entry point {entry:#x} is not an instruction"),
                },
                pc: entry,
            });
        };
        let program = self.program;
        let code = &program.decoded;
        let mut index = self.enter(first, code[first].run_len);
        while index != STOP {
            let d = &code[index];
            index = (d.handler)(self, d, index);
        }
        if self.stop.is_none() && self.stepping {
            return self.run_stepping(self.resume);
        }
        if !self.stepping {
            let stopped = code.get(self.stop_index).map_or(0, |d| d.run_len);
            self.instructions -= u64::from(stopped.saturating_sub(1));
        }
        self.take_ending()
    }

    /// The loop near the instruction limit: counts and checks every instruction, and runs
    /// no superinstruction (so the count is exact at every step).
    #[cold]
    #[inline(never)]
    fn run_stepping(&mut self, mut index: usize) -> Ending {
        let program = self.program;
        let code = &program.decoded;
        while index != STOP {
            let d = &code[index];
            if d.run_len > 0 {
                self.instructions += 1;
                if self.instructions > self.max_instructions {
                    return Ending::Fault(Fault {
                        kind: FaultKind::InstructionLimit {
                            limit: self.max_instructions,
                        },
                        pc: d.addr,
                    });
                }
            }
            index = (d.single)(self, d, index);
        }
        self.take_ending()
    }

    fn take_ending(&mut self) -> Ending {
        self.stop.take().unwrap_or_else(|| {
            Ending::Fault(Fault {
                kind: FaultKind::Internal {
                    reason: "the interpreter stopped without an ending".into(),
                },
                pc: 0,
            })
        })
    }

    /// Enters the run starting at `index` (`len` instructions): counts them, or leaves the
    /// fast path for a progress report or the instruction limit.
    #[inline(always)]
    fn enter(&mut self, index: usize, len: u32) -> usize {
        let count = self.instructions + u64::from(len);
        if count > self.check_at {
            return self.enter_cold(index, len);
        }
        self.instructions = count;
        index
    }

    #[cold]
    #[inline(never)]
    fn enter_cold(&mut self, index: usize, len: u32) -> usize {
        if self.stepping {
            // The stepping loop counts each instruction itself.
            return index;
        }
        let program = self.program;
        let count = self.instructions + u64::from(len);
        if let Some(profile) = self.profile.as_deref_mut() {
            if let Some(ticks) = profile.meter.tick_due() {
                profile.sample(program.decoded.get(index).map_or(0, |d| d.addr), ticks);
            }
            // Between progress reports a profile check is only this.
            let report_at = self.instructions_reported + REPORT_EVERY_INSTRUCTIONS;
            if count <= self.max_instructions && count < report_at {
                self.instructions = count;
                self.check_at = self
                    .max_instructions
                    .min(report_at)
                    .min(count.saturating_add(PROFILE_CHECK_EVERY));
                return index;
            }
        }
        if count > self.max_instructions {
            self.stepping = true;
            self.check_at = 0;
            self.resume = index;
            return STOP;
        }
        self.services
            .count_instructions(self.instructions - self.instructions_reported);
        self.instructions_reported = self.instructions;
        if self.services.stopping() {
            let pc = self.program.decoded.get(index).map_or(0, |d| d.addr);
            self.stop = Some(Ending::Fault(Fault {
                kind: FaultKind::Internal {
                    reason: "the run was stopped".into(),
                },
                pc,
            }));
            // Nothing of the entered run was counted.
            self.stop_index = index;
            // Nothing to give back: `stepping` makes `run` skip the adjustment.
            self.stepping = true;
            return STOP;
        }
        self.instructions = count;
        let every = if self.profile.is_some() {
            PROFILE_CHECK_EVERY
        } else {
            REPORT_EVERY_INSTRUCTIONS
        };
        self.check_at = self.max_instructions.min(count.saturating_add(every));
        index
    }

    /// Records a fault of the instruction `d` and stops the runner.
    #[cold]
    #[inline(never)]
    fn fault(&mut self, d: &Decoded, kind: FaultKind) -> usize {
        self.stop = Some(Ending::Fault(Fault { kind, pc: d.addr }));
        self.stop_index = d.index as usize;
        STOP
    }

    /// Records the fault a slow path left in `pending`.
    #[cold]
    #[inline(never)]
    fn fault_pending(&mut self, d: &Decoded) -> usize {
        let kind = self.pending.take().unwrap_or_else(|| FaultKind::Internal {
            reason: "an access failed without a reason".into(),
        });
        self.fault(d, kind)
    }

    #[cold]
    #[inline(never)]
    fn exit(&mut self, d: &Decoded, mode: ExitMode) -> usize {
        self.stop = Some(Ending::Exit(mode));
        self.stop_index = d.index as usize;
        STOP
    }

    /// A load for a handler: `None` means a fault is pending.
    #[inline(always)]
    fn load(&mut self, addr: u64, size: usize) -> Option<u64> {
        match self.view.try_load(addr, size) {
            Some(value) => Some(value),
            None => self.load_cold(addr, size),
        }
    }

    #[inline(never)]
    fn load_cold(&mut self, addr: u64, size: usize) -> Option<u64> {
        match self.read_slow(addr, size) {
            Ok(value) => Some(value),
            Err(kind) => {
                self.pending = Some(kind);
                None
            }
        }
    }

    /// The pointer word of an indirect operand (memory even at a console address).
    #[inline(always)]
    fn pointer(&mut self, at: u64) -> Option<u64> {
        match self.view.try_load(at, 8) {
            Some(value) => Some(value),
            None => self.pointer_cold(at),
        }
    }

    #[inline(never)]
    fn pointer_cold(&mut self, at: u64) -> Option<u64> {
        match self.view.load_slow(at, 8) {
            Ok(value) => Some(value),
            Err(err) => {
                self.pending = Some(err.into());
                None
            }
        }
    }

    /// A store for a handler: `false` means a fault is pending.
    #[inline(always)]
    fn store(&mut self, addr: u64, size: usize, value: u64) -> bool {
        self.view.try_store(addr, size, value) || self.store_cold(addr, size, value)
    }

    #[inline(never)]
    fn store_cold(&mut self, addr: u64, size: usize, value: u64) -> bool {
        match self.write_slow(addr, size, value) {
            Ok(()) => true,
            Err(kind) => {
                self.pending = Some(kind);
                false
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

/// Specialised handlers. Each is monomorphised over the operation, the type(s) and, for the
/// common types (`se`, `ue`, `fd`), the addressing mode of each operand (immediate, direct, or
/// through a pointer) with const generics, so `arith`/`convert`/`compare` (marked
/// `#[inline(always)]`) and the operand fetches fold their `match`es away and the handler does
/// only the accesses and the operation itself. Other types read the mode at run time (`ANY`).
/// `select` is the one place that maps a decoded instruction to its handler, `fuse` the one
/// place that picks superinstructions.
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
    const S64: u8 = 4;
    const U64: u8 = 5;
    const F64: u8 = 7;

    #[inline(always)]
    const fn ty(code: u8) -> Ty {
        Ty::ALL[code as usize]
    }

    fn ty_code(ty: Ty) -> u8 {
        Ty::ALL.iter().position(|t| *t == ty).unwrap_or(0) as u8
    }

    /// The value of a source operand; `None`: a fault is pending.
    #[inline(always)]
    fn src<const M: u8>(e: &mut Exec<'_>, o: &Opnd, size: usize) -> Option<u64> {
        let mode = if M == ANY { o.mode } else { M };
        match mode {
            IMM => Some(o.x),
            DIR => e.load(o.x, size),
            _ => {
                let base = e.pointer(o.x)?;
                e.load(base.wrapping_add(o.disp), size)
            }
        }
    }

    /// Stores to a destination operand; `false`: a fault is pending.
    #[inline(always)]
    fn dst<const M: u8>(e: &mut Exec<'_>, o: &Opnd, size: usize, value: u64) -> bool {
        let mode = if M == ANY { o.mode } else { M };
        match mode {
            IMM => {
                e.pending = Some(FaultKind::InvalidInstruction {
                    reason: "an immediate has no address".into(),
                });
                false
            }
            DIR => e.store(o.x, size, value),
            _ => match e.pointer(o.x) {
                Some(base) => e.store(base.wrapping_add(o.disp), size, value),
                None => false,
            },
        }
    }

    /// `let x = get!(e, d, option)`: the value, or stop with the pending fault.
    macro_rules! get {
        ($e:ident, $d:ident, $value:expr) => {
            match $value {
                Some(value) => value,
                None => return $e.fault_pending($d),
            }
        };
    }

    fn arith_h<const OP: u8, const TY: u8, const A: u8, const B: u8, const C: u8>(
        e: &mut Exec<'_>,
        d: &Decoded,
        index: usize,
    ) -> usize {
        let (op, ty) = (ARITH_OPS[OP as usize], ty(TY));
        let size = ty.size_bytes() as usize;
        let a = get!(e, d, src::<A>(e, &d.ops[0], size));
        let b = get!(e, d, src::<B>(e, &d.ops[1], size));
        let c = match arith(op, ty, a, b) {
            Ok(c) => c,
            Err(kind) => return e.fault(d, kind),
        };
        if !dst::<C>(e, &d.ops[2], size, c) {
            return e.fault_pending(d);
        }
        index + 1
    }

    fn conv_h<const FROM: u8, const TO: u8, const A: u8, const C: u8>(
        e: &mut Exec<'_>,
        d: &Decoded,
        index: usize,
    ) -> usize {
        let (from, to) = (ty(FROM), ty(TO));
        let value = get!(e, d, src::<A>(e, &d.ops[0], from.size_bytes() as usize));
        if !dst::<C>(
            e,
            &d.ops[1],
            to.size_bytes() as usize,
            convert(value, from, to),
        ) {
            return e.fault_pending(d);
        }
        index + 1
    }

    /// Continues after branch `d` at `index`: enters the next run (taken or not).
    #[inline(always)]
    fn jump(e: &mut Exec<'_>, d: &Decoded, index: usize, taken: bool) -> usize {
        if !taken {
            e.enter(index + 1, d.next_len)
        } else if d.target != NO_TARGET {
            e.enter(d.target as usize, d.target_len)
        } else {
            let target = d.instr.branch_target(d.addr).unwrap_or(0);
            e.fault(
                d,
                FaultKind::InvalidInstruction {
                    reason: format!("branch to {target:#x}, which is not an instruction"),
                },
            )
        }
    }

    fn compare_h<const COND: u8, const TY: u8, const A: u8, const B: u8>(
        e: &mut Exec<'_>,
        d: &Decoded,
        index: usize,
    ) -> usize {
        let ty = ty(TY);
        let size = ty.size_bytes() as usize;
        let a = get!(e, d, src::<A>(e, &d.ops[0], size));
        let b = get!(e, d, src::<B>(e, &d.ops[1], size));
        jump(e, d, index, compare(COMPARES[COND as usize], ty, a, b))
    }

    fn test_h<const ZERO: bool, const TY: u8, const A: u8>(
        e: &mut Exec<'_>,
        d: &Decoded,
        index: usize,
    ) -> usize {
        let ty = ty(TY);
        let a = get!(e, d, src::<A>(e, &d.ops[0], ty.size_bytes() as usize));
        jump(e, d, index, is_zero(ty, a) == ZERO)
    }

    fn jump_h(e: &mut Exec<'_>, d: &Decoded, index: usize) -> usize {
        jump(e, d, index, true)
    }

    fn exit_h(e: &mut Exec<'_>, d: &Decoded, _: usize) -> usize {
        e.exit(d, d.instr.exit)
    }

    fn general_h(e: &mut Exec<'_>, d: &Decoded, index: usize) -> usize {
        match e.step(d, index) {
            Ok(Next::Index(next)) if d.instr.op == Op::Br => {
                let len = e.program.decoded.get(next).map_or(0, |n| n.run_len);
                e.enter(next, len)
            }
            Ok(Next::Index(next)) => next,
            Ok(Next::End(mode)) => e.exit(d, mode),
            Err(kind) => e.fault(d, kind),
        }
    }

    /// Execution fell off the end of `.text` (the sentinel after the last instruction).
    pub(super) fn past_end_h(e: &mut Exec<'_>, d: &Decoded, _: usize) -> usize {
        e.fault(
            d,
            FaultKind::InvalidInstruction {
                reason: "execution ran past the end of .text".into(),
            },
        )
    }

    /// Superinstruction `add|sub:ue|se X, $imm, X` (a pointer bump or counter step): one TLB
    /// probe for the read-modify-write.
    fn bump_h<const SUB: bool>(e: &mut Exec<'_>, d: &Decoded, index: usize) -> usize {
        let imm = d.ops[1].x;
        let step = |v: u64| {
            if SUB {
                v.wrapping_sub(imm)
            } else {
                v.wrapping_add(imm)
            }
        };
        match e.view.try_update_u64(d.ops[0].x, step) {
            Some(_) => index + 1,
            None => (d.single)(e, d, index),
        }
    }

    /// Branch kinds of the fused step-and-branch superinstructions.
    const BR_Z: u8 = 0;
    const BR_NZ: u8 = 1;
    const BR_J: u8 = 2;

    /// Superinstruction: a bump (as `bump_h`) followed by `br:z|nz X, $target` on the same
    /// word, or by `br:j $target`. If the fast path misses, only the bump runs here and the
    /// branch runs as its own instruction.
    fn bump_br_h<const SUB: bool, const BR: u8>(
        e: &mut Exec<'_>,
        d: &Decoded,
        index: usize,
    ) -> usize {
        let imm = d.ops[1].x;
        let step = |v: u64| {
            if SUB {
                v.wrapping_sub(imm)
            } else {
                v.wrapping_add(imm)
            }
        };
        let program = e.program;
        let (Some(value), Some(branch)) = (
            e.view.try_update_u64(d.ops[0].x, step),
            program.decoded.get(index + 1),
        ) else {
            return (d.single)(e, d, index);
        };
        let taken = match BR {
            BR_Z => value == 0,
            BR_NZ => value != 0,
            _ => true,
        };
        jump(e, branch, index + 1, taken)
    }

    /// `handler::<FIRST, code, ...>` for a type code known only at run time: const generic
    /// arguments must be literals, so the eight types are spelled out once, here.
    macro_rules! per_type {
        ($code:expr, $handler:ident, $first:expr $(, $rest:expr)*) => {
            match $code {
                0 => $handler::<{ $first }, 0 $(, $rest)*> as Handler,
                1 => $handler::<{ $first }, 1 $(, $rest)*>,
                2 => $handler::<{ $first }, 2 $(, $rest)*>,
                3 => $handler::<{ $first }, 3 $(, $rest)*>,
                4 => $handler::<{ $first }, 4 $(, $rest)*>,
                5 => $handler::<{ $first }, 5 $(, $rest)*>,
                6 => $handler::<{ $first }, 6 $(, $rest)*>,
                _ => $handler::<{ $first }, 7 $(, $rest)*>,
            }
        };
    }

    /// `arith_h` with its modes for one of the specialised types.
    macro_rules! arith_modes {
        ($op:expr, $ty:expr, $a:expr, $b:expr, $c:expr) => {
            match ($a, $b, $c) {
                (IMM, IMM, DIR) => arith_h::<{ $op }, { $ty }, IMM, IMM, DIR> as Handler,
                (IMM, DIR, DIR) => arith_h::<{ $op }, { $ty }, IMM, DIR, DIR>,
                (IMM, PTR, DIR) => arith_h::<{ $op }, { $ty }, IMM, PTR, DIR>,
                (DIR, IMM, DIR) => arith_h::<{ $op }, { $ty }, DIR, IMM, DIR>,
                (DIR, DIR, DIR) => arith_h::<{ $op }, { $ty }, DIR, DIR, DIR>,
                (DIR, PTR, DIR) => arith_h::<{ $op }, { $ty }, DIR, PTR, DIR>,
                (PTR, IMM, DIR) => arith_h::<{ $op }, { $ty }, PTR, IMM, DIR>,
                (PTR, DIR, DIR) => arith_h::<{ $op }, { $ty }, PTR, DIR, DIR>,
                (PTR, PTR, DIR) => arith_h::<{ $op }, { $ty }, PTR, PTR, DIR>,
                (IMM, IMM, PTR) => arith_h::<{ $op }, { $ty }, IMM, IMM, PTR>,
                (IMM, DIR, PTR) => arith_h::<{ $op }, { $ty }, IMM, DIR, PTR>,
                (IMM, PTR, PTR) => arith_h::<{ $op }, { $ty }, IMM, PTR, PTR>,
                (DIR, IMM, PTR) => arith_h::<{ $op }, { $ty }, DIR, IMM, PTR>,
                (DIR, DIR, PTR) => arith_h::<{ $op }, { $ty }, DIR, DIR, PTR>,
                (DIR, PTR, PTR) => arith_h::<{ $op }, { $ty }, DIR, PTR, PTR>,
                (PTR, IMM, PTR) => arith_h::<{ $op }, { $ty }, PTR, IMM, PTR>,
                (PTR, DIR, PTR) => arith_h::<{ $op }, { $ty }, PTR, DIR, PTR>,
                (PTR, PTR, PTR) => arith_h::<{ $op }, { $ty }, PTR, PTR, PTR>,
                _ => arith_h::<{ $op }, { $ty }, ANY, ANY, ANY>,
            }
        };
    }

    macro_rules! compare_modes {
        ($cond:expr, $ty:expr, $a:expr, $b:expr) => {
            match ($a, $b) {
                (IMM, IMM) => compare_h::<{ $cond }, { $ty }, IMM, IMM> as Handler,
                (IMM, DIR) => compare_h::<{ $cond }, { $ty }, IMM, DIR>,
                (IMM, PTR) => compare_h::<{ $cond }, { $ty }, IMM, PTR>,
                (DIR, IMM) => compare_h::<{ $cond }, { $ty }, DIR, IMM>,
                (DIR, DIR) => compare_h::<{ $cond }, { $ty }, DIR, DIR>,
                (DIR, PTR) => compare_h::<{ $cond }, { $ty }, DIR, PTR>,
                (PTR, IMM) => compare_h::<{ $cond }, { $ty }, PTR, IMM>,
                (PTR, DIR) => compare_h::<{ $cond }, { $ty }, PTR, DIR>,
                (PTR, PTR) => compare_h::<{ $cond }, { $ty }, PTR, PTR>,
                _ => compare_h::<{ $cond }, { $ty }, ANY, ANY>,
            }
        };
    }

    macro_rules! test_modes {
        ($zero:expr, $ty:expr, $a:expr) => {
            match $a {
                IMM => test_h::<{ $zero }, { $ty }, IMM> as Handler,
                DIR => test_h::<{ $zero }, { $ty }, DIR>,
                _ => test_h::<{ $zero }, { $ty }, PTR>,
            }
        };
    }

    macro_rules! mov_modes {
        ($ty:expr, $a:expr, $c:expr) => {
            match ($a, $c) {
                (IMM, DIR) => conv_h::<{ $ty }, { $ty }, IMM, DIR> as Handler,
                (DIR, DIR) => conv_h::<{ $ty }, { $ty }, DIR, DIR>,
                (PTR, DIR) => conv_h::<{ $ty }, { $ty }, PTR, DIR>,
                (IMM, PTR) => conv_h::<{ $ty }, { $ty }, IMM, PTR>,
                (DIR, PTR) => conv_h::<{ $ty }, { $ty }, DIR, PTR>,
                (PTR, PTR) => conv_h::<{ $ty }, { $ty }, PTR, PTR>,
                _ => conv_h::<{ $ty }, { $ty }, ANY, ANY>,
            }
        };
    }

    /// The specialised types: a handler for each, or `general` for the others.
    macro_rules! per_common_type {
        ($code:expr, $general:expr, |$t:ident| $make:expr) => {
            match $code {
                S64 => {
                    const $t: u8 = S64;
                    $make
                }
                U64 => {
                    const $t: u8 = U64;
                    $make
                }
                F64 => {
                    const $t: u8 = F64;
                    $make
                }
                _ => $general,
            }
        };
    }

    /// `inplace_h`'s mode for a second operand that is the destination word itself.
    const SAME: u8 = 4;

    /// Superinstruction `op:ue|se|fd X, Y, X` (`add`, `sub`, `mul`; X direct): Y's loads,
    /// then one TLB probe for the read-modify-write of X. Anything off the fast path (a miss,
    /// a fault) runs the plain handler instead, which has nothing to undo: nothing was stored.
    fn inplace_h<const OP: u8, const TY: u8, const B: u8>(
        e: &mut Exec<'_>,
        d: &Decoded,
        index: usize,
    ) -> usize {
        let (op, ty) = (ARITH_OPS[OP as usize], ty(TY));
        let y = &d.ops[1];
        let b = match B {
            SAME | IMM => y.x,
            DIR => match e.view.try_load(y.x, 8) {
                Some(value) => value,
                None => return (d.single)(e, d, index),
            },
            _ => match e
                .view
                .try_load(y.x, 8)
                .and_then(|base| e.view.try_load(base.wrapping_add(y.disp), 8))
            {
                Some(value) => value,
                None => return (d.single)(e, d, index),
            },
        };
        let update = |a: u64| {
            let b = if B == SAME { a } else { b };
            // Add, sub and mul never fault.
            arith(op, ty, a, b).unwrap_or(a)
        };
        match e.view.try_update_u64(d.ops[0].x, update) {
            Some(_) => index + 1,
            None => (d.single)(e, d, index),
        }
    }

    macro_rules! inplace_modes {
        ($op:expr, $ty:expr, $b:expr) => {
            match $b {
                SAME => inplace_h::<{ $op }, { $ty }, SAME> as Handler,
                IMM => inplace_h::<{ $op }, { $ty }, IMM>,
                DIR => inplace_h::<{ $op }, { $ty }, DIR>,
                _ => inplace_h::<{ $op }, { $ty }, PTR>,
            }
        };
    }

    fn inplace_for<const OP: u8>(code: u8, b: u8) -> Option<Handler> {
        per_common_type!(code, None, |T| Some(inplace_modes!(OP, T, b)))
    }

    /// The in-place superinstruction for `d`, if it is one (`op X, Y, X`, X direct).
    fn inplace_of(d: &Decoded) -> Option<Handler> {
        let [x, y, out] = d.ops;
        if x.mode != DIR || out.mode != DIR || x.x != out.x {
            return None;
        }
        let b = if y.mode == DIR && y.x == x.x {
            SAME
        } else {
            y.mode
        };
        let code = ty_code(d.instr.tys[0]);
        match d.instr.op {
            Op::Add => inplace_for::<0>(code, b),
            Op::Sub => inplace_for::<1>(code, b),
            Op::Mul => inplace_for::<2>(code, b),
            _ => None,
        }
    }

    fn conv_to<const FROM: u8>(to: Ty) -> Handler {
        per_type!(ty_code(to), conv_h, FROM, ANY, ANY)
    }

    fn arith_for<const OP: u8>(code: u8, ops: &[Opnd; 3]) -> Handler {
        let (a, b, c) = (ops[0].mode, ops[1].mode, ops[2].mode);
        per_common_type!(code, per_type!(code, arith_h, OP, ANY, ANY, ANY), |T| {
            arith_modes!(OP, T, a, b, c)
        })
    }

    fn compare_for<const COND: u8>(code: u8, ops: &[Opnd; 3]) -> Handler {
        let (a, b) = (ops[0].mode, ops[1].mode);
        per_common_type!(code, per_type!(code, compare_h, COND, ANY, ANY), |T| {
            compare_modes!(COND, T, a, b)
        })
    }

    fn test_for<const ZERO: bool>(code: u8, ops: &[Opnd; 3]) -> Handler {
        let a = ops[0].mode;
        per_common_type!(code, per_type!(code, test_h, ZERO, ANY), |T| {
            test_modes!(ZERO, T, a)
        })
    }

    pub(super) fn select(instr: &Instr, ops: &[Opnd; 3]) -> Handler {
        let ty = instr.tys[0];
        // Operations that are invalid for a type (floats in `and`) never reach here: the
        // decoder rejects them, and `arith` faults if one ever did.
        let code = ty_code(ty);
        match instr.op {
            Op::Add => arith_for::<0>(code, ops),
            Op::Sub => arith_for::<1>(code, ops),
            Op::Mul => arith_for::<2>(code, ops),
            Op::Div => arith_for::<3>(code, ops),
            Op::And => arith_for::<4>(code, ops),
            Op::Or => per_type!(code, arith_h, 5, ANY, ANY, ANY),
            Op::Xor => per_type!(code, arith_h, 6, ANY, ANY, ANY),
            Op::Rem => arith_for::<7>(code, ops),
            Op::Shl => arith_for::<8>(code, ops),
            Op::Shr => per_type!(code, arith_h, 9, ANY, ANY, ANY),
            Op::Conv if instr.tys[0] == instr.tys[1] => {
                let (a, c) = (ops[0].mode, ops[1].mode);
                per_common_type!(code, conv_to_code(code, instr.tys[1]), |T| {
                    mov_modes!(T, a, c)
                })
            }
            Op::Conv => conv_to_code(code, instr.tys[1]),
            Op::Br => match instr.cond {
                Cond::J => jump_h,
                Cond::L => compare_for::<0>(code, ops),
                Cond::Le => compare_for::<1>(code, ops),
                Cond::E => compare_for::<2>(code, ops),
                Cond::Ne => compare_for::<3>(code, ops),
                Cond::Z => test_for::<true>(code, ops),
                Cond::Nz => test_for::<false>(code, ops),
                Cond::Ji => general_h,
            },
            Op::Exit => exit_h,
            _ => general_h,
        }
    }

    fn conv_to_code(code: u8, to: Ty) -> Handler {
        match code {
            0 => conv_to::<0>(to),
            1 => conv_to::<1>(to),
            2 => conv_to::<2>(to),
            3 => conv_to::<3>(to),
            4 => conv_to::<4>(to),
            5 => conv_to::<5>(to),
            6 => conv_to::<6>(to),
            _ => conv_to::<7>(to),
        }
    }

    /// `Some(sub)` if `instr` is `add|sub:ue|se X, $imm, X` with X a direct address.
    fn bump_of(d: &Decoded) -> Option<bool> {
        let instr = &d.instr;
        let sub = match instr.op {
            Op::Add => false,
            Op::Sub => true,
            _ => return None,
        };
        let word = matches!(instr.tys[0], Ty::U64 | Ty::S64);
        let [x, imm, out] = d.ops;
        (word && x.mode == DIR && imm.mode == IMM && out.mode == DIR && x.x == out.x).then_some(sub)
    }

    /// The superinstruction starting at `d` (its handler replaces `d`'s; `d.single` stays the
    /// plain one). The idioms, by how often the workloads' inner loops run them: k-means'
    /// coordinate loop bumps two pointers and steps a counter into `br:nz` (4 of its 7
    /// instructions) and squares and accumulates in place (`mul:fd X,X,X`, `add:fd S,X,S`);
    /// primes' trial loop bumps the divisor into `br:j`; sort's loops bump indexes into `br:j`.
    pub(super) fn fuse(d: &Decoded, next: Option<&Decoded>) -> Option<Handler> {
        let Some(sub) = bump_of(d) else {
            return inplace_of(d);
        };
        let word = d.ops[0].x;
        let fused = next.and_then(|n| {
            let i = &n.instr;
            if i.op != Op::Br {
                return None;
            }
            match i.cond {
                Cond::J => Some(BR_J),
                Cond::Z | Cond::Nz
                    if matches!(i.tys[0], Ty::U64 | Ty::S64)
                        && n.ops[0].mode == DIR
                        && n.ops[0].x == word =>
                {
                    Some(if i.cond == Cond::Z { BR_Z } else { BR_NZ })
                }
                _ => None,
            }
        });
        Some(match (sub, fused) {
            (false, None) => bump_h::<false>,
            (true, None) => bump_h::<true>,
            (false, Some(BR_Z)) => bump_br_h::<false, BR_Z>,
            (false, Some(BR_NZ)) => bump_br_h::<false, BR_NZ>,
            (false, Some(_)) => bump_br_h::<false, BR_J>,
            (true, Some(BR_Z)) => bump_br_h::<true, BR_Z>,
            (true, Some(BR_NZ)) => bump_br_h::<true, BR_NZ>,
            (true, Some(_)) => bump_br_h::<true, BR_J>,
        })
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
    use crate::page::{MemoryAccount, PageSource};
    use crate::store::PageStore;
    use crate::view::{Access, RangeSet};
    use std::sync::Arc;

    struct NoServices(crate::clock::ManualClock);

    impl Services for NoServices {
        fn new_runner_id(&self) -> Result<u64, String> {
            Err("no runners in this test".into())
        }
        fn forget_runner(&self) {}
        fn allocate_stack(&self, _: u64) -> Option<Range> {
            None
        }
        fn allocate_heap(&self, _: u64, _: u64) -> Option<Range> {
            None
        }
        fn console_input(&self) -> Option<u8> {
            None
        }
        fn count_instructions(&self, _: u64) {}
        fn clock(&self) -> &dyn crate::clock::Clock {
            &self.0
        }
    }

    fn program(source: &str) -> Program {
        let image = crate::asm::assemble("test", source).expect("assembles");
        Program::new(crate::image::validate(crate::image::Format::Elf, image).expect("valid"))
    }

    /// Runs `program` with an instruction limit: (ending, instructions counted).
    fn run_limited(program: &Program, limit: u64) -> (Ending, u64) {
        let store = Arc::new(PageStore::new());
        let topology = dvm_numa::Topology::detect();
        let pool = dvm_numa::PagePool::new(&topology, 0, 1 << 20).expect("pool");
        let pages = PageSource::new(pool, MemoryAccount::new(1 << 30));
        let snapshot = store.begin_snapshot(0, crate::store::Scope::Everything);
        let view = View::new(
            store,
            snapshot,
            pages,
            Access::everything(),
            Arc::new(RangeSet::default()),
        );
        let services = NoServices(crate::clock::ManualClock::new(0));
        let mut exec = Exec::new(view, program, &services, 0, limit);
        let entry = program.decoded[0].addr;
        let ending = exec.run(entry);
        (ending, exec.instructions)
    }

    /// Every limit, every way a run can stop inside a straight line (a superinstruction, a
    /// fault, an exit): the count and the faulting PC are those of counting one by one.
    #[test]
    fn instruction_counts_are_exact_inside_runs_and_superinstructions() {
        let source = "
.equ I, 0x200000000
.equ J, 0x200000008
main:
    mov $0:ue, I:ue
loop:
    add:ue I, $1, I
    sub:ue J, $1, J
    add:ue J, $0, J
    br:l,ue,a I, $3, $loop
    mov $5:ue, J:ue
    sub:ue J, $1, J
    br:nz,ue,a J, $.Ldown
.Ldown:
    sub:ue J, $1, J
    br:nz,ue,a J, $.Ldown
    exit:c
    mov $1:ue, I:ue
";
        let program = program(source);
        let pc = |index: usize| program.decoded[index].addr;
        // The trace, by instruction index.
        let mut trace = vec![0usize];
        for _ in 0..3 {
            trace.extend([1, 2, 3, 4]);
        }
        trace.extend([5, 6, 7]);
        for _ in 0..4 {
            trace.extend([8, 9]);
        }
        trace.push(10);
        assert!(
            program.decoded[1].handler as usize != program.decoded[1].single as usize,
            "the bump is a superinstruction"
        );
        let (ending, count) = run_limited(&program, u64::MAX);
        assert_eq!(ending, Ending::Exit(ExitMode::Commit));
        assert_eq!(
            count,
            trace.len() as u64,
            "exit mid-run gives back the rest"
        );
        for limit in 0..trace.len() as u64 {
            let (ending, count) = run_limited(&program, limit);
            assert_eq!(
                ending,
                Ending::Fault(Fault {
                    kind: FaultKind::InstructionLimit { limit },
                    pc: pc(trace[limit as usize]),
                }),
                "limit {limit}"
            );
            assert_eq!(count, limit + 1, "limit {limit}");
        }
        let (ending, count) = run_limited(&program, trace.len() as u64);
        assert_eq!(ending, Ending::Exit(ExitMode::Commit));
        assert_eq!(count, trace.len() as u64);
    }

    #[test]
    fn a_fault_inside_a_run_counts_up_to_the_faulting_instruction() {
        let program = program(
            "
main:
    mov $1:ue, 0x200000000:ue
    mov 0x10:ue, 0x200000008:ue
    mov $2:ue, 0x200000000:ue
    br:j,a $main
",
        );
        let (ending, count) = run_limited(&program, u64::MAX);
        assert_eq!(
            ending,
            Ending::Fault(Fault {
                kind: FaultKind::Unmapped { addr: 0x10 },
                pc: program.decoded[1].addr,
            })
        );
        assert_eq!(count, 2);
        let falls_off = self::program("main:\n    mov $1:ue, 0x200000000:ue\n");
        let (ending, count) = run_limited(&falls_off, u64::MAX);
        assert!(
            matches!(ending, Ending::Fault(Fault { kind: FaultKind::InvalidInstruction { .. }, pc }) if pc == falls_off.decoded[0].addr)
        );
        assert_eq!(count, 1);
    }

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
