//! Translation of one region of decoded DISA instructions into Cranelift IR (safe code: it only
//! builds IR; `emit` turns it into machine code and calls it).
//!
//! A region starts at a loop header and covers the instructions after it up to the first one
//! this translation does not handle (or `MAX_REGION` instructions). Each instruction does
//! exactly what the interpreter's fast path does, on the same values: raw bits of its type in
//! an `i64`, integers zero-extended, floats as IEEE bits. Every access goes through an inlined
//! probe of the runner's TLB; anything the fast path would leave to the slow path (a miss, a
//! page crossing, a read-only page, a mask word crossing) and anything that would fault
//! (division by zero, `MIN / -1`) jumps to the instruction's hand-back, which returns its index
//! before any of its effects: the interpreter then runs it, faults included.
//!
//! What makes the hot loops cheaper than one probe per operand, all valid for a whole call
//! because the TLB cannot change while native code runs:
//! - Loops hold words: each private scratch word the region uses whole (8 bytes, direct
//!   operands and pointer words) is given to one of the region's loops (`placed_words`) and
//!   lives in a variable while that loop runs: loaded on every way in, stored back on every
//!   way out, so the interpreter and fault reports see memory exactly as if every store had
//!   been made. Accesses that could reach their memory any other way hand back (a pointer into
//!   their page) or refuse entry (a constant page sharing their frame).
//! - A pointer access in an innermost loop keeps the last page it used (`site`, `SiteCache`):
//!   while a pointer walks through one page an access is a compare and an addressing mode.
//! - A counted loop (`counted_sites`: one straight run whose pointers move by constants) works
//!   out at the top of an iteration how many iterations keep every access on its page, and runs
//!   those with no check per access (`counted_top`). One that counts a word down to zero
//!   (`trip_word`) takes the rest of its trip at once when its pages hold it, and its branch
//!   back is one compare of the word with a limit (`Trip`).
//! - A conditional branch that only decides whether a few moves are made becomes selects
//!   (`branch_over_moves`): no misprediction when its outcome is data-dependent.
//!
//! Nothing else is live through a whole call: the context, the TLB's base and tag and the
//! constant pages' pointers are in a stack frame (`FRAME_*`), the count in the pinned register.
//!
//! Counting: the interpreter counts a straight-line run when it enters it. Native code does
//! the same: a jump inside the region to a run start subtracts that run's length from the
//! instructions left before `check_at`, unless fewer are left, in which case it hands back
//! "uncounted" and the interpreter enters the run itself (progress report, profile,
//! `--max-instructions`). A counted loop's branch back skips the comparison while iterations
//! are known to fit.

mod counted;
mod selects;

use crate::loops::{counted_sites, placed_words, region_loops, trip_word};
use counted::{Counted, Trip};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{
    types, AbiParam, Block, InstBuilder, MemFlagsData, Signature, StackSlot, StackSlotData,
    StackSlotKind, Value,
};
use cranelift_frontend::{FunctionBuilder, Variable};
use dvm_engine::codec::Operand;
use dvm_engine::interp::{Decoded, Program};
use dvm_engine::isa::{Cond, Op, Ty};
use dvm_engine::page::{PAGE_BYTES, PAGE_SHIFT};
use dvm_engine::tlb::{SET_HASH, SET_SHIFT};
use std::collections::{BTreeMap, HashMap};

/// Most instructions in one region (bounds compile time; a longer loop body hands back and
/// re-enters through its own headers).
pub const MAX_REGION: usize = 512;

/// Most pages of constant addresses (direct operands, pointer words) probed once per call.
const MAX_CACHED_PAGES: usize = 16;

/// A constant page's TLB entry fields, probed once when native code is entered: the entries
/// cannot change while it runs (it never calls out and the view is borrowed for the call), so
/// a hit stays a hit and a miss (all zero) stays a miss for the whole call.
#[derive(Clone, Copy)]
struct CachedPage {
    read: Value,
    write: Value,
    mask: Value,
}

/// The call's frame (one stack slot): the context, the TLB's entries and generation tag, the
/// caller's value of the pinned register, and the fields of each cached page (`FRAME_PAGES + PAGE_FIELDS * k`: read, write, mask).
/// Code loads what it needs from here where it needs it, so no value lives in a register
/// through the whole call: the registers go to the loop that runs.
const FRAME_CTX: i32 = 0;
const FRAME_ENTRIES: i32 = 8;
const FRAME_GEN_TAG: i32 = 16;
const FRAME_PINNED: i32 = 24;
const FRAME_PAGES: i32 = 32;
const PAGE_FIELDS: i32 = 24;
const FIELD_READ: i32 = 0;
const FIELD_WRITE: i32 = 8;
const FIELD_MASK: i32 = 16;

/// Field offsets of `emit::Ctx`.
pub const CTX_ENTRIES: i32 = 0;
pub const CTX_GEN_TAG: i32 = 8;
pub const CTX_INSTRUCTIONS: i32 = 16;
pub const CTX_CHECK_AT: i32 = 24;

/// Field offsets and size of `dvm_engine::tlb::TlbEntry` (`#[repr(C)]`).
const ENTRY_TAG: i32 = 0;
const ENTRY_READ: i32 = 8;
const ENTRY_WRITE: i32 = 16;
const ENTRY_MASK: i32 = 24;
const ENTRY_BYTES: i64 = 32;

/// Why native code handed back (`--stats` counts each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandBack {
    /// A branch or the end of the region left it.
    Left = 0,
    /// Entering a run would pass `check_at` (a progress report, a profile sample, the limit).
    Check = 1,
    /// An instruction the fast path cannot do: a TLB miss, a page crossing, a store to a
    /// read-only or unwritten page, a mask word crossing, a fault.
    Miss = 2,
    /// Entry refused: a page of the words held in variables missed or may alias.
    Refused = 3,
}

pub const HAND_BACK_REASONS: usize = 4;

impl HandBack {
    pub fn from_code(code: u64) -> HandBack {
        match code & 3 {
            0 => HandBack::Left,
            1 => HandBack::Check,
            2 => HandBack::Miss,
            _ => HandBack::Refused,
        }
    }
}

/// The return value of native code: `index << 3 | reason << 1 | counted`.
pub fn encode_exit(index: usize, counted: bool, reason: HandBack) -> i64 {
    ((index as i64) << 3) | ((reason as i64) << 1) | i64::from(counted)
}

pub fn signature(call_conv: cranelift_codegen::isa::CallConv) -> Signature {
    let mut sig = Signature::new(call_conv);
    sig.params.push(AbiParam::new(types::I64));
    sig.returns.push(AbiParam::new(types::I64));
    sig
}

fn ty_size(ty: Ty) -> u32 {
    ty.size_bytes()
}

fn mask_of(ty: Ty) -> i64 {
    match ty.size_bytes() {
        1 => 0xff,
        4 => 0xffff_ffff,
        _ => -1,
    }
}

fn signed_min(ty: Ty) -> i64 {
    match ty.size_bytes() {
        1 => i64::from(i8::MIN),
        4 => i64::from(i32::MIN),
        _ => i64::MIN,
    }
}

fn through_pointer(operand: Operand) -> bool {
    matches!(operand, Operand::Indirect(_) | Operand::BaseDisp { .. })
}

fn is_destination(operand: Operand) -> bool {
    !matches!(operand, Operand::Imm(_))
}

/// Whether this translation handles `d` exactly (anything else ends the region, and the
/// interpreter runs it).
pub fn supported(d: &Decoded) -> bool {
    let instr = &d.instr;
    let ty = instr.tys[0];
    match instr.op {
        Op::Nop => true,
        Op::Add | Op::Sub | Op::Mul | Op::Div => is_destination(instr.operand(2)),
        Op::And | Op::Or | Op::Xor | Op::Rem | Op::Shl | Op::Shr => {
            !ty.is_float() && is_destination(instr.operand(2))
        }
        Op::Conv => {
            let (from, to) = (instr.tys[0], instr.tys[1]);
            let ok = match (from.is_float(), to.is_float()) {
                (false, false) | (true, true) => true,
                // `u64 -> float` rounds in a way only the interpreter's conversion defines here.
                (false, true) => from != Ty::U64,
                (true, false) => matches!(to, Ty::S64 | Ty::S32),
            };
            ok && is_destination(instr.operand(1))
        }
        Op::Br => match instr.cond {
            Cond::Ji => false,
            _ => d.target().is_some(),
        },
        _ => false,
    }
}

/// The end of the region starting at `start` (exclusive); `start` when it has none: the
/// instructions it can compile from there (at most `MAX_REGION`), up to the first loop header
/// after `start`'s own loop and the innermost loop around it. What follows runs once per exit
/// from those loops, and a later loop gets its own region when it gets hot; compiling it into
/// this one too only made the regions larger and slower to compile (sort: 18 regions of 566
/// instructions in all took 41 ms to compile).
pub fn region_end(program: &Program, start: usize) -> usize {
    let code = program.code();
    let mut limit = start;
    while limit < code.len() && limit - start < MAX_REGION && supported(&code[limit]) {
        limit += 1;
    }
    // `start`'s loop (up to the last branch back to it) and, if `start` is inside another
    // loop, the rest of the innermost one around it: the way back to its header.
    let back_to = |header: usize| {
        (start..limit)
            .rev()
            .find(|&at| code[at].target() == Some(header))
    };
    let around = (start..limit)
        .filter_map(|at| code[at].target().filter(|&t| t < start))
        .max();
    let last = [Some(start), back_to(start), around.and_then(back_to)]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(start);
    let mut header = vec![false; limit - start];
    for (index, d) in code.iter().enumerate() {
        if let Some(target) = d
            .target()
            .filter(|&t| t <= index && (last + 1..limit).contains(&t))
        {
            header[target - start] = true;
        }
    }
    (last + 1..limit)
        .find(|&at| header[at - start])
        .unwrap_or(limit)
}

/// Builds the function for instructions `start..end` of `program`.
pub struct Translator<'b, 'f> {
    b: &'b mut FunctionBuilder<'f>,
    code: &'b [Decoded],
    start: usize,
    end: usize,
    blocks: Vec<Block>,
    exit: Block,
    /// Blocks that count the run starting at an index, then go there, by the innermost loop
    /// the jump comes from (leaving loops, or entering others, is part of the way).
    entered: HashMap<(Option<usize>, usize), Block>,
    // Instructions left before `check_at` (the context's count is `check_at - left`): one
    // compare and one subtraction per run entered, in Cranelift's pinned register (r15 on
    // x86-64), so that no loop has to compete with the others for the register that holds
    // it (`emit` enables it; the caller's value is saved in the frame and put back).
    /// The frame slot, and where each cached page's fields are in it.
    frame: StackSlot,
    pages: HashMap<u64, i32>,
    /// Pages the entry checked (or refused): present, and if `true` writable without a
    /// store mask. Constant accesses to them need no check of their own.
    checked: HashMap<u64, bool>,
    /// The `f64` each `i64` made by `f64_bits` holds: the bits of a float result or variable
    /// go straight back into float operations without a move through an integer register.
    float_of: HashMap<Value, Value>,
    /// The region's loops (`region_loops`), and the innermost loop of each instruction
    /// (region index).
    loops: Vec<Loop>,
    loop_of: Vec<Option<usize>>,
    /// The instruction being translated, and the operand whose access is being made.
    current: usize,
    operand: Option<(Operand, bool)>,
    /// Set while the counted loops being left have given their charge back already (a run
    /// entered after them refunds before its count check), so leaving does not again.
    refunded: bool,
}

/// A loop of the region: the private scratch words placed in it (`placed_words`) live in
/// variables while it runs, and if it is an innermost loop its pointer accesses have site
/// caches. What a loop holds in variables is live in that loop only, so the host's
/// registers go to the loops that run.
struct Loop {
    /// The loop around it.
    parent: Option<usize>,
    innermost: bool,
    /// `(address, written in the loop, float, variable)`.
    words: Vec<(u64, bool, bool, Variable)>,
    /// The pages of its words, as probed on entry.
    pages: Vec<RegPage>,
    /// Its site caches; their state is kept in stack slots outside the loop.
    sites: Vec<SiteCache>,
    /// A counted loop's accesses, each with its page's host offset (and store mask), and the
    /// iterations left in which all of them stay on their pages (`counted_sites`).
    counted: Option<Counted>,
    /// The blocks that enter the loop at an instruction from outside it, by that instruction:
    /// they load the words and site caches of this loop and of the loops inside it that hold
    /// the instruction.
    stubs: Vec<(usize, Block)>,
}

/// One access site's cache of the last page it used: an address `addr` is on it, with its
/// `size` bytes inside the page, exactly when `addr - lo < len` (unsigned), and is then at
/// `addr + delta` in host memory. Empty: `len` 0, which nothing is below. One compare covers
/// the page and the crossing check, and the host address is one addressing mode away.
/// The layout of a site cache's stack slot.
const SITE_LO: i32 = 0;
const SITE_DELTA: i32 = 8;
const SITE_LEN: i32 = 16;
const SITE_MASK: i32 = 24;
const SITE_BYTES: u32 = 32;

#[derive(Clone, Copy)]
struct SiteCache {
    /// Where the cache is kept while the loop does not run: `lo`, `delta`, `len`, `mask`.
    slot: StackSlot,
    lo: Variable,
    delta: Variable,
    /// Stores: the page's store mask (null for a page without one).
    mask: Option<Variable>,
}

/// A page of register-held words: no access of the region may reach its memory except through
/// those words' variables (checked on entry for constant pages, and whenever a pointer
/// access fills its site cache).
#[derive(Clone, Copy)]
struct RegPage {
    page: u64,
    /// Some word on it is written in the region (its variable is written back on every exit).
    written: bool,
}

/// The pages of the constant addresses of `code`, most used first.
fn constant_pages(code: &[Decoded]) -> Vec<u64> {
    let mut uses: HashMap<u64, usize> = HashMap::new();
    for d in code {
        for k in 0..3 {
            let at = match d.instr.operand(k) {
                Operand::Direct(addr) => addr,
                Operand::Indirect(at) => at,
                Operand::BaseDisp { base, .. } => base,
                Operand::Imm(_) => continue,
            };
            *uses.entry(at >> PAGE_SHIFT).or_default() += 1;
        }
    }
    let mut pages: Vec<(u64, usize)> = uses.into_iter().collect();
    pages.sort_by_key(|(page, count)| (std::cmp::Reverse(*count), *page));
    pages.into_iter().map(|(page, _)| page).collect()
}

/// Probes the TLB entry of constant `page` without branching: its read, write and mask
/// pointers on a hit, zeros on a miss (both ways are always valid memory to read).
fn probe_constant(
    b: &mut FunctionBuilder<'_>,
    entries: Value,
    gen_tag: Value,
    page: u64,
) -> CachedPage {
    let set = page.wrapping_mul(SET_HASH) >> SET_SHIFT;
    let page_value = b.ins().iconst(types::I64, page as i64);
    let key = b.ins().bor(page_value, gen_tag);
    let way0 = b.ins().iadd_imm_s(entries, (set as i64) * 2 * ENTRY_BYTES);
    let way1 = b.ins().iadd_imm_s(way0, ENTRY_BYTES);
    let tag0 = b.ins().load(types::I64, trusted(), way0, ENTRY_TAG);
    let tag1 = b.ins().load(types::I64, trusted(), way1, ENTRY_TAG);
    let hit0 = b.ins().icmp(IntCC::Equal, tag0, key);
    let hit1 = b.ins().icmp(IntCC::Equal, tag1, key);
    let entry = b.ins().select(hit0, way0, way1);
    let hit = b.ins().bor(hit0, hit1);
    let zero = b.ins().iconst(types::I64, 0);
    let mut field = |offset: i32| {
        let value = b.ins().load(types::I64, trusted(), entry, offset);
        b.ins().select(hit, value, zero)
    };
    CachedPage {
        read: field(ENTRY_READ),
        write: field(ENTRY_WRITE),
        mask: field(ENTRY_MASK),
    }
}

/// The context's instruction count, and the instructions left before its check point (none
/// when the count is already past it: every run entry then hands back).
fn instructions_left(b: &mut FunctionBuilder<'_>, ctx: Value) -> (Value, Value) {
    let instructions = b.ins().load(types::I64, trusted(), ctx, CTX_INSTRUCTIONS);
    let check_at = b.ins().load(types::I64, trusted(), ctx, CTX_CHECK_AT);
    let ahead = b.ins().isub(check_at, instructions);
    let behind = b
        .ins()
        .icmp(IntCC::UnsignedGreaterThan, instructions, check_at);
    let nothing = b.ins().iconst(types::I64, 0);
    (instructions, b.ins().select(behind, nothing, ahead))
}

/// Flags for the context and the TLB entries (aligned fields that are always there).
fn trusted() -> MemFlagsData {
    MemFlagsData::trusted()
}

/// Flags for program memory through a TLB pointer (valid, but possibly unaligned).
fn heap() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

impl<'b, 'f> Translator<'b, 'f> {
    pub fn translate(
        b: &'b mut FunctionBuilder<'f>,
        program: &'b Program,
        start: usize,
        end: usize,
    ) {
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let ctx = b.block_params(entry)[0];
        let entries = b.ins().load(types::I64, trusted(), ctx, CTX_ENTRIES);
        let gen_tag = b.ins().load(types::I64, trusted(), ctx, CTX_GEN_TAG);
        let (_, left_on_entry) = instructions_left(b, ctx);
        // Ordered, so that the same program compiles to the same code every time.
        let mut pages = BTreeMap::new();
        let code = program.code();
        for page in constant_pages(&code[start..end])
            .into_iter()
            .take(MAX_CACHED_PAGES)
        {
            pages.insert(page, probe_constant(b, entries, gen_tag, page));
        }
        let frame_bytes = FRAME_PAGES + PAGE_FIELDS * pages.len() as i32;
        let frame = b.create_sized_stack_slot(StackSlotData::new(
            StackSlotKind::ExplicitSlot,
            frame_bytes as u32,
            3,
        ));
        let mut page_offsets: HashMap<u64, i32> = HashMap::new();
        for (k, (&page, cached)) in pages.iter().enumerate() {
            let at = FRAME_PAGES + PAGE_FIELDS * k as i32;
            page_offsets.insert(page, at);
            for (value, field) in [
                (cached.read, FIELD_READ),
                (cached.write, FIELD_WRITE),
                (cached.mask, FIELD_MASK),
            ] {
                b.ins().stack_store(types::I64, value, frame, at + field);
            }
        }
        let callers = b.ins().get_pinned_reg(types::I64);
        for (value, at) in [
            (ctx, FRAME_CTX),
            (entries, FRAME_ENTRIES),
            (gen_tag, FRAME_GEN_TAG),
            (callers, FRAME_PINNED),
        ] {
            b.ins().stack_store(types::I64, value, frame, at);
        }
        // The loops, their words whose pages were probed, and the pages of all of them.
        let spans = region_loops(&code[start..end], start);
        let placed: Vec<Vec<(u64, bool, bool)>> = placed_words(&code[start..end], &spans)
            .into_iter()
            .map(|words| {
                words
                    .into_iter()
                    .filter(|(addr, ..)| pages.contains_key(&(addr >> PAGE_SHIFT)))
                    .collect()
            })
            .collect();
        let mut reg_pages: HashMap<u64, bool> = HashMap::new();
        for &(addr, written, _) in placed.iter().flatten() {
            *reg_pages.entry(addr >> PAGE_SHIFT).or_default() |= written;
        }
        let mut refuse = Vec::new();
        let mut reg_page_numbers: Vec<(u64, bool)> = reg_pages.into_iter().collect();
        reg_page_numbers.sort_unstable();
        for &(page, written) in &reg_page_numbers {
            let cached = pages[&page];
            // Present for reads; writable, without a store mask, if a word on it is written
            // (the write-back must not fail, and a private page has no mask).
            refuse.push(b.ins().icmp_imm_s(IntCC::Equal, cached.read, 0));
            if written {
                refuse.push(b.ins().icmp_imm_s(IntCC::Equal, cached.write, 0));
                refuse.push(b.ins().icmp_imm_s(IntCC::NotEqual, cached.mask, 0));
            }
            // Any other constant page of the region sharing its memory: an alias the
            // variables would not see.
            for (&other, other_cached) in &pages {
                if other == page {
                    continue;
                }
                refuse.push(b.ins().icmp(IntCC::Equal, other_cached.write, cached.read));
                if written {
                    refuse.push(b.ins().icmp(IntCC::Equal, other_cached.read, cached.read));
                }
            }
        }
        if let Some(any) = refuse
            .into_iter()
            .reduce(|acc, flag| b.ins().bor(acc, flag))
        {
            let refused = b.create_block();
            b.set_cold_block(refused);
            let go = b.create_block();
            b.ins().brif(any, refused, &[], go, &[]);
            // Handing back at the entry runs it in the interpreter (which fills the TLB);
            // nothing has changed yet, so the count goes back as it came.
            b.switch_to_block(refused);
            let value = b
                .ins()
                .iconst(types::I64, encode_exit(start, true, HandBack::Refused));
            b.ins().return_(&[value]);
            b.switch_to_block(go);
        }
        let mut loops = Vec::new();
        let mut loop_of = vec![None; end - start];
        // Outer loops come first: an instruction ends up with its innermost loop.
        for (k, &((first, last), _)) in spans.iter().enumerate() {
            for at in &mut loop_of[first..=last] {
                *at = Some(k);
            }
        }
        for (k, (&(_, parent), words)) in spans.iter().zip(placed).enumerate() {
            let mut page_numbers: Vec<(u64, bool)> = Vec::new();
            for &(addr, written, _) in &words {
                let page = addr >> PAGE_SHIFT;
                match page_numbers.iter_mut().find(|(p, _)| *p == page) {
                    Some((_, w)) => *w |= written,
                    None => page_numbers.push((page, written)),
                }
            }
            loops.push(Loop {
                parent,
                innermost: !spans.iter().any(|(_, up)| *up == Some(k)),
                words: words
                    .into_iter()
                    .map(|(addr, written, float)| {
                        let ty = if float { types::F64 } else { types::I64 };
                        (addr, written, float, b.declare_var(ty))
                    })
                    .collect(),
                pages: page_numbers
                    .into_iter()
                    .map(|(page, written)| RegPage { page, written })
                    .collect(),
                sites: Vec::new(),
                counted: None,
                stubs: Vec::new(),
            });
        }
        // Counted innermost loops, entered only at their first instruction.
        for (k, &((first, last), _)) in spans.iter().enumerate() {
            if !loops[k].innermost {
                continue;
            }
            let (first, last) = (start + first, start + last);
            let entered_inside = (first + 1..=last).contains(&start)
                || code[start..end].iter().any(|d| {
                    d.target()
                        .is_some_and(|target| (first + 1..=last).contains(&target))
                });
            if entered_inside {
                continue;
            }
            let mut held: Vec<u64> = Vec::new();
            // Integer words held here, with their variables (a trip word is one of them).
            let mut held_ints: Vec<(u64, Variable)> = Vec::new();
            let mut l = Some(k);
            while let Some(at) = l {
                held.extend(loops[at].words.iter().map(|w| w.0));
                held_ints.extend(loops[at].words.iter().filter(|w| !w.2).map(|w| (w.0, w.3)));
                l = loops[at].parent;
            }
            let Some(sites) = counted_sites(code, first, last, |w| held.contains(&w)) else {
                continue;
            };
            let held_int = |w: u64| held_ints.iter().find(|h| h.0 == w).map(|h| h.1);
            let trip = trip_word(code, first, last, |w| held_int(w).is_some()).and_then(
                |(word, decrement)| {
                    Some(Trip {
                        word: held_int(word)?,
                        decrement,
                        limit: b.declare_var(types::I64),
                    })
                },
            );
            loops[k].counted = Some(Counted {
                header: first,
                sites: sites
                    .into_iter()
                    .map(|site| {
                        let mask = site.store.then(|| b.declare_var(types::I64));
                        let slot = b.create_sized_stack_slot(StackSlotData::new(
                            StackSlotKind::ExplicitSlot,
                            SITE_BYTES,
                            3,
                        ));
                        (site, b.declare_var(types::I64), mask, slot)
                    })
                    .collect(),
                safe: b.declare_var(types::I64),
                go: None,
                trip,
            });
        }
        let blocks: Vec<Block> = (start..end).map(|_| b.create_block()).collect();
        let exit = b.create_block();
        b.append_block_param(exit, types::I64);
        // The site caches start empty: their slots are cleared here once every site is known
        // (after the translation below; blocks are sealed only at the end).
        let prologue = b.create_block();
        b.ins().jump(prologue, &[]);
        let mut t = Translator {
            b,
            code: program.code(),
            start,
            end,
            blocks,
            exit,
            entered: HashMap::new(),
            frame,
            pages: page_offsets,
            checked: reg_page_numbers.iter().copied().collect(),
            float_of: HashMap::new(),
            loops,
            loop_of,
            current: start,
            operand: None,
            refunded: false,
        };
        for index in start..end {
            t.current = index;
            let block = t.blocks[index - start];
            t.b.switch_to_block(block);
            t.instruction(index);
        }
        t.b.switch_to_block(prologue);
        t.b.ins().set_pinned_reg(left_on_entry);
        let zero = t.b.ins().iconst(types::I64, 0);
        let slots: Vec<StackSlot> = t
            .loops
            .iter()
            .flat_map(|l| {
                let counted = l.counted.iter().flat_map(|c| c.sites.iter().map(|s| s.3));
                l.sites.iter().map(|site| site.slot).chain(counted)
            })
            .collect();
        for slot in slots {
            for offset in [SITE_LO, SITE_DELTA, SITE_LEN, SITE_MASK] {
                t.b.ins().stack_store(types::I64, zero, slot, offset);
            }
        }
        t.jump_to(None, start);
        t.fill_stubs();
        t.b.switch_to_block(exit);
        let value = t.b.block_params(exit)[0];
        let left = t.b.ins().get_pinned_reg(types::I64);
        let callers =
            t.b.ins()
                .stack_load(types::I64, types::I64, frame, FRAME_PINNED);
        t.b.ins().set_pinned_reg(callers);
        // The count on entry and what was left then, loaded again (nothing else stores them)
        // rather than kept live through the whole call.
        let ctx =
            t.b.ins()
                .stack_load(types::I64, types::I64, frame, FRAME_CTX);
        let (instructions, left_on_entry) = instructions_left(t.b, ctx);
        let used = t.b.ins().isub(left_on_entry, left);
        let instructions = t.b.ins().iadd(instructions, used);
        t.b.ins()
            .store(trusted(), instructions, ctx, CTX_INSTRUCTIONS);
        t.b.ins().return_(&[value]);
        t.b.seal_all_blocks();
    }

    /// The innermost loop of instruction `index` (if it is in the region and in one).
    fn loop_at(&self, index: usize) -> Option<usize> {
        if (self.start..self.end).contains(&index) {
            self.loop_of[index - self.start]
        } else {
            None
        }
    }

    /// Loop `l` and the loops around it, innermost first.
    fn chain(&self, mut l: Option<usize>) -> Vec<usize> {
        let mut out = Vec::new();
        while let Some(k) = l {
            out.push(k);
            l = self.loops[k].parent;
        }
        out
    }

    /// The variable of a word held at the current instruction.
    fn reg(&self, addr: u64) -> Option<(Variable, bool)> {
        self.chain(self.loop_at(self.current))
            .into_iter()
            .find_map(|l| self.loops[l].words.iter().find(|w| w.0 == addr))
            .map(|&(_, _, float, var)| (var, float))
    }

    /// Field `field` of cached page `page`, from the frame.
    fn page_field(&mut self, page: u64, field: i32) -> Value {
        let at = self.pages[&page] + field;
        self.b
            .ins()
            .stack_load(types::I64, types::I64, self.frame, at)
    }

    /// Stores the words loop `l` writes back to memory (a way out of the loop), and gives
    /// the count back the safe iterations a counted loop charged but will not run.
    fn write_back(&mut self, l: usize) {
        self.refund(l);
        for k in 0..self.loops[l].words.len() {
            let (addr, written, _, var) = self.loops[l].words[k];
            if !written {
                continue;
            }
            let write = self.page_field(addr >> PAGE_SHIFT, FIELD_WRITE);
            let value = self.b.use_var(var);
            let offset = (addr & (PAGE_BYTES as u64 - 1)) as i32;
            self.b.ins().store(heap(), value, write, offset);
        }
    }

    /// Ends the current block with a jump to instruction `to` of the region, from code whose
    /// innermost loop is `from`: the loops left store their words back, and the loops entered
    /// are entered through a stub that loads their words and site caches.
    fn jump_to(&mut self, from: Option<usize>, to: usize) {
        let left_loops = self.chain(from);
        let into = self.chain(self.loop_at(to));
        for &l in left_loops.iter().filter(|l| !into.contains(l)) {
            self.write_back(l);
        }
        // The outermost loop entered, if any: the stubs of a loop are by target.
        let target = match into.iter().rev().find(|l| !left_loops.contains(l)) {
            Some(&outer) => {
                let known = self.loops[outer].stubs.iter().find(|(at, _)| *at == to);
                match known {
                    Some(&(_, stub)) => stub,
                    None => {
                        let stub = self.b.create_block();
                        self.loops[outer].stubs.push((to, stub));
                        stub
                    }
                }
            }
            None => self.blocks[to - self.start],
        };
        self.b.ins().jump(target, &[]);
    }

    /// The stubs into each loop: the words of the loops entered from memory, their site
    /// caches from their slots.
    fn fill_stubs(&mut self) {
        for outer in 0..self.loops.len() {
            for k in 0..self.loops[outer].stubs.len() {
                let (to, stub) = self.loops[outer].stubs[k];
                self.b.switch_to_block(stub);
                let chain = self.chain(self.loop_at(to));
                let upto = chain
                    .iter()
                    .position(|&l| l == outer)
                    .map_or(0, |at| at + 1);
                // Outermost first: a counted loop's trip word may be an outer loop's.
                for &l in chain[..upto].iter().rev() {
                    self.enter_loop(l);
                }
                let target = self.blocks[to - self.start];
                self.b.ins().jump(target, &[]);
            }
        }
    }

    /// Loads loop `l`'s words and site caches into their variables.
    fn enter_loop(&mut self, l: usize) {
        if let Some(counted) = &self.loops[l].counted {
            // No iteration is known safe yet: the first one works the pages out.
            let vars: Vec<Variable> = counted
                .sites
                .iter()
                .flat_map(|&(_, delta, mask, _)| std::iter::once(delta).chain(mask))
                .chain(std::iter::once(counted.safe))
                .collect();
            let zero = self.b.ins().iconst(types::I64, 0);
            for var in vars {
                self.b.def_var(var, zero);
            }
        }
        for w in 0..self.loops[l].words.len() {
            let (addr, _, float, var) = self.loops[l].words[w];
            let read = self.page_field(addr >> PAGE_SHIFT, FIELD_READ);
            let offset = (addr & (PAGE_BYTES as u64 - 1)) as i32;
            let ty = if float { types::F64 } else { types::I64 };
            let value = self.b.ins().load(ty, heap(), read, offset);
            self.b.def_var(var, value);
        }
        for site in self.loops[l].sites.clone() {
            for (offset, var) in [
                (SITE_LO, Some(site.lo)),
                (SITE_DELTA, Some(site.delta)),
                (SITE_MASK, site.mask),
            ] {
                if let Some(var) = var {
                    let value = self
                        .b
                        .ins()
                        .stack_load(types::I64, types::I64, site.slot, offset);
                    self.b.def_var(var, value);
                }
            }
        }
        // No iteration charged ahead: the limit is what the word will be after this one.
        if let Some(trip) = self.trip_of(l) {
            let word = self.b.use_var(trip.word);
            let after = self.b.ins().iadd_imm_s(word, -1);
            self.b.def_var(trip.limit, after);
        }
    }

    /// Leaves native code at `index` (from the current instruction, whose loops store their
    /// words back first).
    fn exit_to(&mut self, index: usize, counted: bool, reason: HandBack) {
        for l in self.chain(self.loop_at(self.current)) {
            self.write_back(l);
        }
        let value = self
            .b
            .ins()
            .iconst(types::I64, encode_exit(index, counted, reason));
        self.b.ins().jump(self.exit, &[value.into()]);
    }

    /// A block that hands back at `index` with its run counted (none of its effects done).
    fn hand_back(&mut self, index: usize) -> Block {
        let block = self.b.create_block();
        self.b.set_cold_block(block);
        let current = self.b.current_block();
        self.b.switch_to_block(block);
        self.exit_to(index, true, HandBack::Miss);
        if let Some(current) = current {
            self.b.switch_to_block(current);
        }
        block
    }

    /// Continues at run start `index` (after a branch): counted inside the region, else
    /// handed back uncounted.
    fn enter_run(&mut self, index: usize) {
        if !(self.start..self.end).contains(&index) {
            self.exit_to(index, false, HandBack::Left);
            return;
        }
        let from = self.loop_at(self.current);
        // A counted loop's branch back: while iterations are known safe (pages and count,
        // charged already), the next iteration starts past its test.
        if let Some(l) = from {
            let fast = self.loops[l].counted.as_ref().and_then(|c| {
                // (A trip word's loop took its safe iterations before the branch's test.)
                (c.header == index && c.trip.is_none())
                    .then_some(c.go)
                    .flatten()
                    .map(|go| (go, c.safe))
            });
            if let Some((go, safe)) = fast {
                self.next_safe(safe, go);
            }
        }
        if let Some(block) = self.entered.get(&(from, index)) {
            let block = *block;
            self.b.ins().jump(block, &[]);
            return;
        }
        // The current block ends with this jump, so the new block can be filled right away.
        let block = self.b.create_block();
        self.entered.insert((from, index), block);
        self.b.ins().jump(block, &[]);
        self.b.switch_to_block(block);
        // Counted loops left give back their charged iterations before the check.
        let into = self.chain(self.loop_at(index));
        for l in self.chain(from) {
            if !into.contains(&l) {
                self.refund(l);
            }
        }
        let left = self.b.ins().get_pinned_reg(types::I64);
        let len = i64::from(self.code[index].run_len());
        let over = self.b.ins().icmp_imm_s(IntCC::UnsignedLessThan, left, len);
        let give_up = self.b.create_block();
        self.b.set_cold_block(give_up);
        let go = self.b.create_block();
        self.b.ins().brif(over, give_up, &[], go, &[]);
        self.refunded = true;
        self.b.switch_to_block(give_up);
        self.exit_to(index, false, HandBack::Check);
        self.b.switch_to_block(go);
        let next = self.b.ins().iadd_imm_s(left, -len);
        self.b.ins().set_pinned_reg(next);
        self.jump_to(from, index);
        self.refunded = false;
    }

    /// Continues with the next instruction of the same run (already counted).
    fn fall_through(&mut self, index: usize) {
        let next = index + 1;
        if next < self.end {
            self.jump_to(self.loop_at(index), next);
        } else {
            self.exit_to(next, true, HandBack::Left);
        }
    }

    /// The host address of a computed address's `size` bytes, and the page's mask pointer
    /// (stores; null on a page without a mask), through a cache of one page per access site:
    /// the TLB cannot change during a call, so the page a site last used stays valid and a
    /// pointer walking through a page skips the hash and the probe (`SiteCache`). Only in
    /// innermost loops; elsewhere every access probes. `miss` if the access
    /// crosses the page, misses the TLB, is a store to a page without a write pointer, or
    /// reaches the memory of a page whose words are held in variables.
    fn site(&mut self, addr: Value, size: u32, store: bool, miss: Block) -> (Value, Value) {
        // A counted loop's access: its page is known good for this iteration.
        if let Some(l) = self.loop_at(self.current) {
            let key = self.operand;
            let found = self.loops[l].counted.as_ref().and_then(|counted| {
                counted.sites.iter().find(|(site, ..)| {
                    site.index == self.current
                        && Some((site.operand, site.store)) == key
                        && site.store == store
                })
            });
            if let Some(&(_, delta, mask, _)) = found {
                let delta = self.b.use_var(delta);
                let host = self.b.ins().iadd(addr, delta);
                let mask = match mask {
                    Some(var) => self.b.use_var(var),
                    None => self.b.ins().iconst(types::I64, 0),
                };
                return (host, mask);
            }
        }
        let innermost = self
            .loop_at(self.current)
            .filter(|&l| self.loops[l].innermost);
        let Some(l) = innermost else {
            let (page, offset) = self.page_inside(addr, size, miss);
            let entry = self.probe_page(page, miss);
            let (base, mask) = self.entry_pointers(entry, store, miss);
            return (self.b.ins().iadd(base, offset), mask);
        };
        let b = &mut *self.b;
        let site = SiteCache {
            slot: b.create_sized_stack_slot(StackSlotData::new(
                StackSlotKind::ExplicitSlot,
                SITE_BYTES,
                3,
            )),
            lo: b.declare_var(types::I64),
            delta: b.declare_var(types::I64),
            mask: store.then(|| b.declare_var(types::I64)),
        };
        self.loops[l].sites.push(site);
        let lo = b.use_var(site.lo);
        // Loaded at every access, and folded into the compare: a register less per site.
        let len = b
            .ins()
            .stack_load(types::I64, types::I64, site.slot, SITE_LEN);
        let from_lo = b.ins().isub(addr, lo);
        let off_page = b
            .ins()
            .icmp(IntCC::UnsignedGreaterThanOrEqual, from_lo, len);
        let found = b.create_block();
        let fill = b.create_block();
        // The hit second: the code lowering lays it out right after the test.
        b.ins().brif(off_page, fill, &[], found, &[]);
        b.switch_to_block(fill);
        let (page, _) = self.page_inside(addr, size, miss);
        let entry = self.probe_page(page, miss);
        let (base, mask) = self.entry_pointers(entry, store, miss);
        let b = &mut *self.b;
        let page_start = b.ins().band_imm_s(addr, !(PAGE_BYTES as i64 - 1));
        let delta = b.ins().isub(base, page_start);
        let len = b
            .ins()
            .iconst(types::I64, PAGE_BYTES as i64 + 1 - i64::from(size));
        b.def_var(site.lo, page_start);
        b.def_var(site.delta, delta);
        if let Some(var) = site.mask {
            b.def_var(var, mask);
        }
        // Kept for the next time the loop is entered (in this call).
        for (value, offset) in [(page_start, SITE_LO), (delta, SITE_DELTA), (len, SITE_LEN)] {
            b.ins().stack_store(types::I64, value, site.slot, offset);
        }
        if store {
            b.ins().stack_store(types::I64, mask, site.slot, SITE_MASK);
        }
        b.ins().jump(found, &[]);
        b.switch_to_block(found);
        let delta = b.use_var(site.delta);
        let host = b.ins().iadd(addr, delta);
        // A load's mask is never used: a constant, not a variable that would take a register.
        let mask = match site.mask {
            Some(var) => b.use_var(var),
            None => b.ins().iconst(types::I64, 0),
        };
        (host, mask)
    }

    /// The page number and page offset of `addr`; `miss` if its `size` bytes cross the page.
    fn page_inside(&mut self, addr: Value, size: u32, miss: Block) -> (Value, Value) {
        let b = &mut *self.b;
        let offset = b.ins().band_imm_s(addr, (PAGE_BYTES - 1) as i64);
        let last = b.ins().iadd_imm_s(offset, i64::from(size));
        let crosses = b
            .ins()
            .icmp_imm_s(IntCC::UnsignedGreaterThan, last, PAGE_BYTES as i64);
        let inside = b.create_block();
        b.ins().brif(crosses, miss, &[], inside, &[]);
        b.switch_to_block(inside);
        (b.ins().ushr_imm_s(addr, i64::from(PAGE_SHIFT)), offset)
    }

    /// A TLB entry's read pointer (loads) or write and mask pointers (stores); `miss` for a
    /// store to a page without a write pointer, or an access that reaches the memory of a
    /// register page: a store would not be seen by its variables, and a load from one whose
    /// words are written would miss their newer values.
    fn entry_pointers(&mut self, entry: Value, store: bool, miss: Block) -> (Value, Value) {
        let b = &mut *self.b;
        let (base, mask) = if store {
            let base = b.ins().load(types::I64, trusted(), entry, ENTRY_WRITE);
            let writable = b.create_block();
            b.ins().brif(base, writable, &[], miss, &[]);
            b.switch_to_block(writable);
            let mask = b.ins().load(types::I64, trusted(), entry, ENTRY_MASK);
            (base, mask)
        } else {
            let base = b.ins().load(types::I64, trusted(), entry, ENTRY_READ);
            (base, b.ins().iconst(types::I64, 0))
        };
        // Only the loops around the current instruction hold words in variables: memory
        // is current for every other word.
        let mut held: Vec<RegPage> = Vec::new();
        for l in self.chain(self.loop_at(self.current)) {
            for page in &self.loops[l].pages {
                match held.iter_mut().find(|p| p.page == page.page) {
                    Some(known) => known.written |= page.written,
                    None => held.push(*page),
                }
            }
        }
        for reg_page in held {
            if store || reg_page.written {
                let read = self.page_field(reg_page.page, FIELD_READ);
                let alias = self.b.ins().icmp(IntCC::Equal, base, read);
                self.miss_if(alias, miss);
            }
        }
        (base, mask)
    }

    /// The TLB entry of `page`, or `miss`.
    fn probe_page(&mut self, page: Value, miss: Block) -> Value {
        let b = &mut *self.b;
        let entries = b
            .ins()
            .stack_load(types::I64, types::I64, self.frame, FRAME_ENTRIES);
        let gen_tag = b
            .ins()
            .stack_load(types::I64, types::I64, self.frame, FRAME_GEN_TAG);
        let key = b.ins().bor(page, gen_tag);
        let hash = b.ins().imul_imm_s(page, SET_HASH as i64);
        let set = b.ins().ushr_imm_s(hash, i64::from(SET_SHIFT));
        let set_offset = b.ins().imul_imm_s(set, 2 * ENTRY_BYTES);
        let way0 = b.ins().iadd(entries, set_offset);
        let tag0 = b.ins().load(types::I64, trusted(), way0, ENTRY_TAG);
        let hit0 = b.ins().icmp(IntCC::Equal, tag0, key);
        let found = b.create_block();
        b.append_block_param(found, types::I64);
        let second = b.create_block();
        b.ins().brif(hit0, found, &[way0.into()], second, &[]);
        b.switch_to_block(second);
        let way1 = b.ins().iadd_imm_s(way0, ENTRY_BYTES);
        let tag1 = b.ins().load(types::I64, trusted(), way1, ENTRY_TAG);
        let hit1 = b.ins().icmp(IntCC::Equal, tag1, key);
        b.ins().brif(hit1, found, &[way1.into()], miss, &[]);
        b.switch_to_block(found);
        b.block_params(found)[0]
    }

    /// The cached entry of a constant address's page, if the access stays inside the page.
    fn cached(&self, addr: Option<u64>, size: u32) -> Option<u64> {
        let addr = addr?;
        let offset = addr & (PAGE_BYTES as u64 - 1);
        if offset + u64::from(size) > PAGE_BYTES as u64 {
            return None;
        }
        let page = addr >> PAGE_SHIFT;
        self.pages.contains_key(&page).then_some(page)
    }

    /// Loads `size` bytes at `addr` (`constant`: its value, when known here), zero-extended
    /// (a TLB hit; else `miss`). `float`: the bits of an `f64`, loaded into a float register
    /// (`float_of` hands the float on, so arithmetic needs no move from an integer register).
    fn load(
        &mut self,
        addr: Value,
        constant: Option<u64>,
        size: u32,
        float: bool,
        miss: Block,
    ) -> Value {
        let at = match (self.cached(constant, size), constant) {
            (Some(page), Some(known)) => {
                let read = self.page_field(page, FIELD_READ);
                let b = &mut *self.b;
                if !self.checked.contains_key(&page) {
                    let hit = b.create_block();
                    b.ins().brif(read, hit, &[], miss, &[]);
                    b.switch_to_block(hit);
                }
                b.ins()
                    .iadd_imm_s(read, (known & (PAGE_BYTES as u64 - 1)) as i64)
            }
            _ => self.site(addr, size, false, miss).0,
        };
        let b = &mut *self.b;
        match size {
            1 => b.ins().uload8(types::I64, heap(), at, 0),
            4 => b.ins().uload32(heap(), at, 0),
            _ if float => {
                let x = b.ins().load(types::F64, heap(), at, 0);
                self.f64_bits(x)
            }
            _ => b.ins().load(types::I64, heap(), at, 0),
        }
    }

    /// Stores the low `size` bytes of `value` at `addr` and marks them in the page's store
    /// mask, as `Tlb::store` does; `miss` (before any effect) for anything else.
    fn store(&mut self, addr: Value, constant: Option<u64>, size: u32, value: Value, miss: Block) {
        let (at, offset, mask) = match (self.cached(constant, size), constant) {
            (Some(page), Some(known)) => {
                let write = self.page_field(page, FIELD_WRITE);
                let offset = (known & (PAGE_BYTES as u64 - 1)) as i64;
                if self.checked.get(&page) == Some(&true) {
                    // Writable and without a mask: a plain store.
                    let value = match (size, self.float_of.get(&value)) {
                        (8, Some(&x)) => x,
                        _ => value,
                    };
                    let at = self.b.ins().iadd_imm_s(write, offset);
                    let b = &mut *self.b;
                    match size {
                        1 => b.ins().istore8(heap(), value, at, 0),
                        4 => b.ins().istore32(heap(), value, at, 0),
                        _ => b.ins().store(heap(), value, at, 0),
                    };
                    return;
                }
                let mask = self.page_field(page, FIELD_MASK);
                let b = &mut *self.b;
                let writable = b.create_block();
                b.ins().brif(write, writable, &[], miss, &[]);
                b.switch_to_block(writable);
                let at = b.ins().iadd_imm_s(write, offset);
                (at, b.ins().iconst(types::I64, offset), mask)
            }
            _ => {
                let (at, mask) = self.site(addr, size, true, miss);
                let offset = self.b.ins().band_imm_s(addr, (PAGE_BYTES - 1) as i64);
                (at, offset, mask)
            }
        };
        // An `f64` result is stored from its float register.
        let value = match (size, self.float_of.get(&value)) {
            (8, Some(&x)) => x,
            _ => value,
        };
        let b = &mut *self.b;
        let put = |b: &mut FunctionBuilder<'_>| match size {
            1 => b.ins().istore8(heap(), value, at, 0),
            4 => b.ins().istore32(heap(), value, at, 0),
            _ => b.ins().store(heap(), value, at, 0),
        };
        let masked = b.create_block();
        let plain = b.create_block();
        let done = b.create_block();
        b.ins().brif(mask, masked, &[], plain, &[]);
        b.switch_to_block(plain);
        put(b);
        b.ins().jump(done, &[]);
        b.switch_to_block(masked);
        let bit = b.ins().band_imm_s(offset, 63);
        let bit_end = b.ins().iadd_imm_s(bit, i64::from(size));
        // A store whose bits cross two mask words is left to the interpreter (rare: unaligned).
        let crosses = b.ins().icmp_imm_s(IntCC::UnsignedGreaterThan, bit_end, 64);
        let fits = b.create_block();
        b.ins().brif(crosses, miss, &[], fits, &[]);
        b.switch_to_block(fits);
        put(b);
        let word = b.ins().ushr_imm_s(offset, 6);
        let word_offset = b.ins().ishl_imm_s(word, 3);
        let word_at = b.ins().iadd(mask, word_offset);
        let old = b.ins().load(types::I64, trusted(), word_at, 0);
        let bits = b
            .ins()
            .iconst(types::I64, if size >= 64 { -1 } else { (1i64 << size) - 1 });
        let shifted = b.ins().ishl(bits, bit);
        let new = b.ins().bor(old, shifted);
        b.ins().store(trusted(), new, word_at, 0);
        b.ins().jump(done, &[]);
        b.switch_to_block(done);
    }

    /// The address an operand names (direct, or through its pointer word), and the address
    /// itself when it is a constant.
    fn address(&mut self, operand: Operand, miss: Block) -> (Value, Option<u64>) {
        match operand {
            Operand::Direct(addr) | Operand::Imm(addr) => {
                (self.b.ins().iconst(types::I64, addr as i64), Some(addr))
            }
            Operand::Indirect(at) => (self.word(at, miss), None),
            Operand::BaseDisp { disp, base } => {
                let pointer = self.word(base, miss);
                (self.b.ins().iadd_imm_s(pointer, i64::from(disp)), None)
            }
        }
    }

    /// The 8-byte word at constant `at` (a pointer): its variable, or memory.
    fn word(&mut self, at: u64, miss: Block) -> Value {
        if let Some((var, float)) = self.reg(at) {
            let value = self.b.use_var(var);
            return if float { self.f64_bits(value) } else { value };
        }
        let at_value = self.b.ins().iconst(types::I64, at as i64);
        self.operand = None;
        self.load(at_value, Some(at), 8, false, miss)
    }

    fn read(&mut self, operand: Operand, ty: Ty, miss: Block) -> Value {
        self.read_as(operand, ty, ty == Ty::F64, miss)
    }

    /// `read`, with an `f64` from memory loaded into a float register only if `float_load`.
    fn read_as(&mut self, operand: Operand, ty: Ty, float_load: bool, miss: Block) -> Value {
        let size = ty_size(ty);
        if let Operand::Imm(raw) = operand {
            let value = if size >= 8 {
                raw
            } else {
                raw & ((1u64 << (size * 8)) - 1)
            };
            return self.b.ins().iconst(types::I64, value as i64);
        }
        if let (Operand::Direct(at), 8) = (operand, size) {
            if let Some((var, float)) = self.reg(at) {
                let value = self.b.use_var(var);
                return if float { self.f64_bits(value) } else { value };
            }
        }
        let (addr, constant) = self.address(operand, miss);
        self.operand = through_pointer(operand).then_some((operand, false));
        self.load(addr, constant, size, float_load, miss)
    }

    fn write(&mut self, operand: Operand, size: u32, value: Value, miss: Block) {
        if let (Operand::Direct(at), 8) = (operand, size) {
            if let Some((var, float)) = self.reg(at) {
                let value = if float {
                    self.float_value(value)
                } else {
                    value
                };
                self.b.def_var(var, value);
                return;
            }
        }
        let (addr, constant) = self.address(operand, miss);
        self.operand = through_pointer(operand).then_some((operand, true));
        self.store(addr, constant, size, value, miss);
    }

    fn mask(&mut self, value: Value, ty: Ty) -> Value {
        match ty.size_bytes() {
            1 | 4 => self.b.ins().band_imm_s(value, mask_of(ty)),
            _ => value,
        }
    }

    fn sign_extend(&mut self, value: Value, ty: Ty) -> Value {
        match ty.size_bytes() {
            1 => {
                let narrow = self.b.ins().ireduce(types::I8, value);
                self.b.ins().sextend(types::I64, narrow)
            }
            4 => {
                let narrow = self.b.ins().ireduce(types::I32, value);
                self.b.ins().sextend(types::I64, narrow)
            }
            _ => value,
        }
    }

    /// Integer bits of `ty` widened as the interpreter widens them (sign or zero).
    fn widen(&mut self, value: Value, ty: Ty) -> Value {
        if ty.is_signed() {
            self.sign_extend(value, ty)
        } else {
            self.mask(value, ty)
        }
    }

    /// Raw float bits of `ty` as an `f64` (an `f32` is widened exactly, as `as_f64` does).
    fn as_f64(&mut self, value: Value, ty: Ty) -> Value {
        if ty == Ty::F32 {
            let x = self.as_f32(value);
            self.b.ins().fpromote(types::F64, x)
        } else {
            self.float_value(value)
        }
    }

    fn as_f32(&mut self, value: Value) -> Value {
        let bits = self.b.ins().ireduce(types::I32, value);
        self.b.ins().bitcast(types::F32, MemFlagsData::new(), bits)
    }

    fn f64_bits(&mut self, x: Value) -> Value {
        let bits = self.b.ins().bitcast(types::I64, MemFlagsData::new(), x);
        self.float_of.insert(bits, x);
        bits
    }

    /// `f64` bits as an `f64`.
    fn float_value(&mut self, bits: Value) -> Value {
        match self.float_of.get(&bits) {
            Some(x) => *x,
            None => self.b.ins().bitcast(types::F64, MemFlagsData::new(), bits),
        }
    }

    fn f32_bits(&mut self, x: Value) -> Value {
        let bits = self.b.ins().bitcast(types::I32, MemFlagsData::new(), x);
        self.b.ins().uextend(types::I64, bits)
    }

    /// Jumps to `miss` when `condition` holds, else continues in a new block.
    fn miss_if(&mut self, condition: Value, miss: Block) {
        let cont = self.b.create_block();
        self.b.ins().brif(condition, miss, &[], cont, &[]);
        self.b.switch_to_block(cont);
    }

    fn arith(&mut self, op: Op, ty: Ty, a: Value, b: Value, miss: Block) -> Value {
        if ty.is_float() {
            let (x, y) = if ty == Ty::F32 {
                (self.as_f32(a), self.as_f32(b))
            } else {
                (self.float_value(a), self.float_value(b))
            };
            // A first operand that is a NaN gives that NaN, quieted (`interp::arith`). x86
            // does so as long as the operands keep their order (with one NaN, any order
            // gives it); elsewhere a signalling second NaN may win, so the interpreter
            // computes that case.
            if !cfg!(target_arch = "x86_64") {
                let nan = self.b.ins().fcmp(FloatCC::Unordered, x, x);
                self.miss_if(nan, miss);
            }
            let r = match op {
                Op::Add => self.b.ins().fadd(x, y),
                Op::Sub => self.b.ins().fsub(x, y),
                Op::Mul => self.b.ins().fmul(x, y),
                _ => self.b.ins().fdiv(x, y),
            };
            return if ty == Ty::F32 {
                self.f32_bits(r)
            } else {
                self.f64_bits(r)
            };
        }
        let bits = i64::from(ty.size_bytes() * 8);
        let result = match op {
            Op::Add => self.b.ins().iadd(a, b),
            Op::Sub => self.b.ins().isub(a, b),
            Op::Mul => self.b.ins().imul(a, b),
            Op::And => self.b.ins().band(a, b),
            Op::Or => self.b.ins().bor(a, b),
            Op::Xor => self.b.ins().bxor(a, b),
            Op::Shl => {
                let count = self.b.ins().urem_imm_s(b, bits);
                let x = self.mask(a, ty);
                self.b.ins().ishl(x, count)
            }
            Op::Shr => {
                let count = self.b.ins().urem_imm_s(b, bits);
                if ty.is_signed() {
                    let x = self.sign_extend(a, ty);
                    self.b.ins().sshr(x, count)
                } else {
                    let x = self.mask(a, ty);
                    self.b.ins().ushr(x, count)
                }
            }
            _ => {
                // Div, Rem: the cases that fault are the interpreter's to report.
                if ty.is_signed() {
                    let x = self.sign_extend(a, ty);
                    let y = self.sign_extend(b, ty);
                    let zero = self.b.ins().icmp_imm_s(IntCC::Equal, y, 0);
                    self.miss_if(zero, miss);
                    let is_min = self.b.ins().icmp_imm_s(IntCC::Equal, x, signed_min(ty));
                    let minus_one = self.b.ins().icmp_imm_s(IntCC::Equal, y, -1);
                    let overflow = self.b.ins().band(is_min, minus_one);
                    self.miss_if(overflow, miss);
                    if op == Op::Div {
                        self.b.ins().sdiv(x, y)
                    } else {
                        self.b.ins().srem(x, y)
                    }
                } else {
                    let x = self.mask(a, ty);
                    let y = self.mask(b, ty);
                    let zero = self.b.ins().icmp_imm_s(IntCC::Equal, y, 0);
                    self.miss_if(zero, miss);
                    if op == Op::Div {
                        self.b.ins().udiv(x, y)
                    } else {
                        self.b.ins().urem(x, y)
                    }
                }
            }
        };
        self.mask(result, ty)
    }

    fn convert(&mut self, value: Value, from: Ty, to: Ty) -> Value {
        match (from.is_float(), to.is_float()) {
            (false, false) => {
                let wide = self.widen(value, from);
                self.mask(wide, to)
            }
            (false, true) => {
                // Unsigned sources here are at most 32 bits wide: as signed 64-bit integers
                // they convert to the same value, rounded once.
                let x = self.widen(value, from);
                if to == Ty::F32 {
                    let r = self.b.ins().fcvt_from_sint(types::F32, x);
                    self.f32_bits(r)
                } else {
                    let r = self.b.ins().fcvt_from_sint(types::F64, x);
                    self.f64_bits(r)
                }
            }
            (true, false) => {
                // Saturating, NaN to 0: Rust's `as`, which the interpreter uses.
                let x = self.as_f64(value, from);
                if to == Ty::S32 {
                    let r = self.b.ins().fcvt_to_sint_sat(types::I32, x);
                    self.b.ins().uextend(types::I64, r)
                } else {
                    self.b.ins().fcvt_to_sint_sat(types::I64, x)
                }
            }
            (true, true) => match (from, to) {
                (Ty::F32, Ty::F64) => {
                    let x = self.as_f32(value);
                    let r = self.b.ins().fpromote(types::F64, x);
                    self.f64_bits(r)
                }
                (Ty::F64, Ty::F32) => {
                    let x = self.float_value(value);
                    let r = self.b.ins().fdemote(types::F32, x);
                    self.f32_bits(r)
                }
                _ => value,
            },
        }
    }

    fn compare(&mut self, cond: Cond, ty: Ty, a: Value, b: Value) -> Value {
        if ty.is_float() {
            let x = self.as_f64(a, ty);
            let y = self.as_f64(b, ty);
            let cc = match cond {
                Cond::L => FloatCC::LessThan,
                Cond::Le => FloatCC::LessThanOrEqual,
                Cond::E => FloatCC::Equal,
                _ => FloatCC::NotEqual,
            };
            return self.b.ins().fcmp(cc, x, y);
        }
        let x = self.widen(a, ty);
        let y = self.widen(b, ty);
        let signed = ty.is_signed();
        let cc = match cond {
            Cond::L if signed => IntCC::SignedLessThan,
            Cond::L => IntCC::UnsignedLessThan,
            Cond::Le if signed => IntCC::SignedLessThanOrEqual,
            Cond::Le => IntCC::UnsignedLessThanOrEqual,
            Cond::E => IntCC::Equal,
            _ => IntCC::NotEqual,
        };
        self.b.ins().icmp(cc, x, y)
    }

    /// Whether `a` is zero (`zero`) or not (a NaN is not zero, as in the interpreter).
    fn is_zero(&mut self, ty: Ty, a: Value, zero: bool) -> Value {
        if ty.is_float() {
            let x = self.as_f64(a, ty);
            let z = self.b.ins().f64const(0.0);
            let cc = if zero {
                FloatCC::Equal
            } else {
                FloatCC::NotEqual
            };
            self.b.ins().fcmp(cc, x, z)
        } else {
            let x = self.mask(a, ty);
            let cc = if zero { IntCC::Equal } else { IntCC::NotEqual };
            self.b.ins().icmp_imm_s(cc, x, 0)
        }
    }

    fn instruction(&mut self, index: usize) {
        let d = &self.code[index];
        let instr = d.instr;
        let miss = self.hand_back(index);
        if let Some(l) = self.loop_at(index) {
            if self.loops[l].counted.as_ref().map(|c| c.header) == Some(index) {
                self.counted_top(l, miss);
            }
        }
        match instr.op {
            Op::Nop => self.fall_through(index),
            Op::Conv => {
                let (from, to) = (instr.tys[0], instr.tys[1]);
                let value = self.read(instr.operand(0), from, miss);
                let converted = self.convert(value, from, to);
                self.write(instr.operand(1), ty_size(to), converted, miss);
                self.fall_through(index);
            }
            Op::Br => {
                let ty = instr.tys[0];
                let target = d.target().unwrap_or(self.code.len());
                // (Laying a loop's back edge out as the fall-through, by testing whether the
                // branch stays, made k-means 1.36x slower: the register allocator estimates
                // loop depth from the block order.)
                let trip_back = self.trip_back_edge(index);
                let taken = match instr.cond {
                    Cond::J => None,
                    Cond::Z | Cond::Nz => {
                        let a = self.read(instr.operand(0), ty, miss);
                        Some(self.is_zero(ty, a, instr.cond == Cond::Z))
                    }
                    cond => {
                        let a = self.read(instr.operand(0), ty, miss);
                        let b = self.read(instr.operand(1), ty, miss);
                        Some(self.compare(cond, ty, a, b))
                    }
                };
                match taken {
                    None => self.enter_run(target),
                    Some(taken) => {
                        let yes = self.b.create_block();
                        let no = self.b.create_block();
                        let moves = if trip_back {
                            None
                        } else {
                            self.branch_over_moves(index)
                        };
                        match moves {
                            Some(join) => self.select_moves(index, taken, join, yes, no),
                            None => {
                                self.b.ins().brif(taken, yes, &[], no, &[]);
                            }
                        }
                        self.b.switch_to_block(yes);
                        self.enter_run(target);
                        self.b.switch_to_block(no);
                        // A trip word's loop that ends was charged exactly its iterations.
                        self.refunded |= trip_back;
                        self.enter_run(index + 1);
                        self.refunded = false;
                    }
                }
            }
            op => {
                let ty = instr.tys[0];
                let size = ty_size(ty);
                // The first operand of a float `+` or `*` is never a float load: Cranelift
                // would fold that load into the instruction as its second operand, and with
                // two NaNs x86 gives the first one (`arith`).
                let commutes = ty == Ty::F64 && matches!(op, Op::Add | Op::Mul);
                let a = self.read_as(instr.operand(0), ty, !commutes, miss);
                let b = self.read(instr.operand(1), ty, miss);
                let c = self.arith(op, ty, a, b, miss);
                self.write(instr.operand(2), size, c, miss);
                self.fall_through(index);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loops::tests::program;

    #[test]
    fn a_region_ends_at_the_next_loop_after_its_own_and_the_one_around_it() {
        // Loops a (1..=3) and b (5..=6) inside the outer loop (0..=8), then loop c (10..=11).
        let program = program(
            "main:
.Louter:
    mov $4:ue, 0x200000110:ue
.La:
    add:ue 0x200000118, $1, 0x200000118
    sub:ue 0x200000110, $1, 0x200000110
    br:nz,ue,a 0x200000110, $.La
    mov $4:ue, 0x200000110:ue
.Lb:
    sub:ue 0x200000110, $1, 0x200000110
    br:nz,ue,a 0x200000110, $.Lb
    add:ue 0x200000100, $1, 0x200000100
    br:l,ue,a 0x200000100, $3, $.Louter
    mov $4:ue, 0x200000110:ue
.Lc:
    sub:ue 0x200000110, $1, 0x200000110
    br:nz,ue,a 0x200000110, $.Lc
    exit:c
",
        );
        // From the outer loop's header: its whole nest, up to loop c.
        assert_eq!(region_end(&program, 0), 10);
        // From loop a's or b's header: on to the outer loop's branch back (the way back to
        // its header), loop b included, up to loop c.
        assert_eq!(region_end(&program, 1), 10);
        assert_eq!(region_end(&program, 5), 10);
        // From loop c's header: to the end (`exit` is not compiled).
        assert_eq!(region_end(&program, 10), 12);
    }
}
