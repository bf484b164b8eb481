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
//! Two caches make the hot loops cheaper than one probe per operand, both valid for a whole
//! call because the TLB cannot change while native code runs:
//! - A pointer access in an innermost loop of the region keeps the last page it used (tag and
//!   pointers) in variables: while a pointer walks through one page, an access is a compare
//!   and a load (`site`).
//! - Private scratch words that the loop uses whole (8 bytes, direct operands and pointer
//!   words) are held in variables (`register_words`): loaded when native code is entered,
//!   written back on every exit, so the interpreter and fault reports see memory exactly as
//!   if every store had been made. Accesses that could reach their memory any other way hand
//!   back (a pointer into their page) or refuse entry (a constant page sharing their frame).
//!
//! Counting: the interpreter counts a straight-line run when it enters it. Native code does
//! the same: a jump inside the region to a run start adds that run's length to the count in the
//! context, unless that would pass `check_at`, in which case it hands back "uncounted" and the
//! interpreter enters the run itself (progress report, profile, `--max-instructions`).

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, AbiParam, Block, InstBuilder, MemFlagsData, Signature, Value};
use cranelift_frontend::{FunctionBuilder, Variable};
use dvm_engine::codec::Operand;
use dvm_engine::interp::{Decoded, Program};
use dvm_engine::isa::{Cond, Op, Ty};
use dvm_engine::page::{PAGE_BYTES, PAGE_SHIFT};
use dvm_engine::tlb::{SET_HASH, SET_SHIFT};
use std::collections::HashMap;

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

/// The end of the region starting at `start` (exclusive); `start` when it has none.
pub fn region_end(program: &Program, start: usize) -> usize {
    let code = program.code();
    let mut end = start;
    while end < code.len() && end - start < MAX_REGION && supported(&code[end]) {
        end += 1;
    }
    end
}

/// Builds the function for instructions `start..end` of `program`.
pub struct Translator<'b, 'f> {
    b: &'b mut FunctionBuilder<'f>,
    code: &'b [Decoded],
    start: usize,
    end: usize,
    /// The context (`emit::Ctx`): the TLB's entries and generation tag are loaded from it
    /// where a probe needs them, rather than held in registers the whole call.
    ctx: Value,
    blocks: Vec<Block>,
    exit: Block,
    /// Blocks that count the run starting at an index, then go there.
    entered: HashMap<usize, Block>,
    /// Instructions left before `check_at` (the context's count is `check_at - left`): one
    /// register, one compare and one subtraction per run entered.
    left: Variable,
    pages: HashMap<u64, CachedPage>,
    /// Private scratch words held in variables for the whole call (`register_words`), and
    /// whether the variable is an `f64`.
    regs: HashMap<u64, (Variable, bool)>,
    /// The `f64` each `i64` made by `f64_bits` holds: the bits of a float result or variable
    /// go straight back into float operations without a move through an integer register.
    float_of: HashMap<Value, Value>,
    /// The pages holding them, as probed on entry.
    reg_pages: Vec<RegPage>,
    /// Loop depth of each instruction of the region, and whether the current instruction is
    /// in an innermost loop (its pointer accesses get a site cache; elsewhere the variables of
    /// a cache would only compete for registers with the inner loop's).
    depth: Vec<u32>,
    cache_sites: bool,
    /// The variables of every site cache (defined as "empty" on entry).
    sites: Vec<SiteCache>,
}

/// One access site's cache of the last page it used: an address `addr` is on it, with its
/// `size` bytes inside the page, exactly when `addr - lo < len` (unsigned), and is then at
/// `addr + delta` in host memory. Empty: `len` 0, which nothing is below. One compare covers
/// the page and the crossing check, and the host address is one addressing mode away.
#[derive(Clone, Copy)]
struct SiteCache {
    lo: Variable,
    delta: Variable,
    len: Variable,
    /// Stores: the page's store mask (null for a page without one).
    mask: Option<Variable>,
}

/// A page of register-held words: no access of the region may reach its memory except through
/// those words' variables (checked on entry for constant pages, and whenever a pointer
/// access fills its site cache).
#[derive(Clone, Copy)]
struct RegPage {
    read: Value,
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

/// Most words held in variables in one region, and most pages they may lie on: with more,
/// the variables of an inner loop no longer fit the host's registers, and spilled ones cost
/// what memory did (every one is live in the whole region, for the write-back on exit).
const MAX_REG_WORDS: usize = 6;
const MAX_REG_PAGES: usize = 2;

/// Every constant address `d` accesses: `(address, bytes, written)`, the pointer words of
/// indirect operands included (read as 8 bytes).
fn direct_accesses(d: &Decoded) -> Vec<(u64, u32, bool, bool)> {
    let instr = &d.instr;
    let ty = instr.tys[0];
    let (tys, dest): ([Ty; 3], Option<usize>) = match instr.op {
        Op::Conv => ([ty, instr.tys[1], ty], Some(1)),
        Op::Br => ([ty; 3], None),
        Op::Nop => ([Ty::U64; 3], None),
        _ => ([ty; 3], Some(2)),
    };
    // Every operand counts, even one this translation never reads (a branch target): an
    // access too many only keeps a word in memory.
    let mut out = Vec::new();
    for (k, ty) in tys.into_iter().enumerate() {
        match instr.operand(k) {
            Operand::Direct(addr) => {
                out.push((addr, ty_size(ty), dest == Some(k), ty == Ty::F64));
            }
            Operand::Indirect(at) | Operand::BaseDisp { base: at, .. } => {
                out.push((at, 8, false, false));
            }
            Operand::Imm(_) => {}
        }
    }
    out
}

/// How many loops of the region (back edges inside it) enclose each of its instructions.
fn loop_depths(code: &[Decoded], start: usize) -> Vec<u32> {
    let mut depth = vec![0u32; code.len()];
    for (at, d) in code.iter().enumerate() {
        if let Some(target) = d.target() {
            if (start..=start + at).contains(&target) {
                for level in &mut depth[target - start..=at] {
                    *level += 1;
                }
            }
        }
    }
    depth
}

/// The private scratch words a region may keep in variables: 8-byte aligned words in the
/// private region (not on the page of the ABI and console words, which are device registers
/// the TLB never caches), that every constant access of the region reads or writes whole, as
/// 8 bytes, on at most `MAX_REG_PAGES` pages. Returns `(address, written, float)`, `float`:
/// every access is an `f64` (the variable is one, so it lives in a float register).
///
/// Why this is exact: the runner's private pages are its own (no other runner sees them) and
/// carry no store mask, so a word's value lives in a variable while native code runs and is
/// stored back on every exit, before the interpreter or anyone else can look. What remains is
/// aliasing inside the region, which the translation rules out at run time: an access through
/// a pointer that reaches a register page's memory hands back before its effects (after the
/// write-back), and entry is refused when a constant page of the region shares memory with a
/// register page.
///
/// Only words the loop itself uses are candidates (the region's instructions up to its last
/// branch back into it, `start` being region index 0): their pages were all touched by the
/// interpreted iterations before the region was entered, so entry is not refused for a page
/// only the code after the loop touches.
fn register_words(code: &[Decoded], start: usize) -> Vec<(u64, bool, bool)> {
    let depth = loop_depths(code, start);
    const SPACE_OFFSET_MASK: u64 = (1 << dvm_engine::abi::SPACE_SHIFT) - 1;
    let abi_page = (dvm_engine::abi::PR_STACK_BASE & SPACE_OFFSET_MASK) >> PAGE_SHIFT;
    let back_edge = code.iter().enumerate().rev().find(|(at, d)| {
        d.target()
            .is_some_and(|target| (start..=start + at).contains(&target))
    });
    let Some((loop_end, _)) = back_edge else {
        return Vec::new();
    };
    let accesses: Vec<(u64, u32, bool, bool)> = code.iter().flat_map(direct_accesses).collect();
    // Each use weighs 16 per loop level around it: the innermost loop's words come first.
    let in_loop: Vec<(u64, u32, bool, u64)> = code[..=loop_end]
        .iter()
        .zip(&depth)
        .flat_map(|(d, &level)| {
            direct_accesses(d)
                .into_iter()
                .map(move |(addr, size, written, _)| {
                    (addr, size, written, 1u64 << (4 * level.min(15)))
                })
        })
        .collect();
    let mut words: Vec<(u64, bool, bool, u64)> = Vec::new();
    for &(addr, size, _, _) in &in_loop {
        let offset = addr & SPACE_OFFSET_MASK;
        let private =
            (dvm_engine::abi::PRIVATE_BASE..dvm_engine::abi::PRIVATE_END).contains(&offset);
        if size != 8 || addr % 8 != 0 || !private || offset >> PAGE_SHIFT == abi_page {
            continue;
        }
        if addr >> dvm_engine::abi::SPACE_SHIFT >= dvm_engine::abi::SPACE_COUNT {
            continue;
        }
        if words.iter().any(|w| w.0 == addr) {
            continue;
        }
        let overlapped = accesses.iter().any(|&(other, other_size, ..)| {
            let disjoint = other.saturating_add(u64::from(other_size)) <= addr || other >= addr + 8;
            !disjoint && (other, other_size) != (addr, 8)
        });
        if overlapped {
            continue;
        }
        let written = accesses.iter().any(|&(a, _, w, _)| w && a == addr);
        let float = accesses.iter().all(|&(a, _, _, f)| f || a != addr);
        let weight = in_loop
            .iter()
            .filter(|&&(a, ..)| a == addr)
            .map(|&(.., weight)| weight)
            .sum();
        words.push((addr, written, float, weight));
    }
    // The most used words first, on the pages most of them share.
    words.sort_by_key(|&(addr, .., weight)| (std::cmp::Reverse(weight), addr));
    let mut pages: Vec<u64> = Vec::new();
    let mut out = Vec::new();
    for (addr, written, float, _) in words {
        let page = addr >> PAGE_SHIFT;
        if !pages.contains(&page) {
            if pages.len() == MAX_REG_PAGES {
                continue;
            }
            pages.push(page);
        }
        out.push((addr, written, float));
        if out.len() == MAX_REG_WORDS {
            break;
        }
    }
    out
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
        let left = b.declare_var(types::I64);
        b.def_var(left, left_on_entry);
        let mut pages = HashMap::new();
        let code = program.code();
        for page in constant_pages(&code[start..end])
            .into_iter()
            .take(MAX_CACHED_PAGES)
        {
            pages.insert(page, probe_constant(b, entries, gen_tag, page));
        }
        let words: Vec<(u64, bool, bool)> = register_words(&code[start..end], start)
            .into_iter()
            .filter(|(addr, ..)| pages.contains_key(&(addr >> PAGE_SHIFT)))
            .collect();
        let mut reg_page_numbers: Vec<u64> = Vec::new();
        for (addr, ..) in &words {
            if !reg_page_numbers.contains(&(addr >> PAGE_SHIFT)) {
                reg_page_numbers.push(addr >> PAGE_SHIFT);
            }
        }
        let mut reg_pages = Vec::new();
        let mut refuse = Vec::new();
        for &page in &reg_page_numbers {
            let cached = pages[&page];
            let written = words
                .iter()
                .any(|&(addr, w, _)| w && addr >> PAGE_SHIFT == page);
            // Present for reads; writable, without a store mask, if a word on it is written
            // (the write-back on exit must not fail, and a private page has no mask).
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
            reg_pages.push(RegPage {
                read: cached.read,
                written,
            });
        }
        let mut regs = HashMap::new();
        if !refuse.is_empty() {
            let any = refuse
                .into_iter()
                .reduce(|acc, flag| b.ins().bor(acc, flag))
                .unwrap_or_else(|| b.ins().iconst(types::I8, 0));
            let refused = b.create_block();
            let load = b.create_block();
            b.ins().brif(any, refused, &[], load, &[]);
            // Handing back at the entry runs it in the interpreter (which fills the TLB);
            // nothing has changed yet, so the count goes back as it came.
            b.switch_to_block(refused);
            let value = b
                .ins()
                .iconst(types::I64, encode_exit(start, true, HandBack::Refused));
            b.ins().return_(&[value]);
            b.switch_to_block(load);
            for &(addr, _, float) in &words {
                let page = pages[&(addr >> PAGE_SHIFT)];
                let offset = (addr & (PAGE_BYTES as u64 - 1)) as i32;
                let ty = if float { types::F64 } else { types::I64 };
                let value = b.ins().load(ty, heap(), page.read, offset);
                let var = b.declare_var(ty);
                b.def_var(var, value);
                regs.insert(addr, (var, float));
            }
        }
        let blocks: Vec<Block> = (start..end).map(|_| b.create_block()).collect();
        let exit = b.create_block();
        b.append_block_param(exit, types::I64);
        b.append_block_param(exit, types::I64);
        // The site caches start empty: their variables are defined here once every site is
        // known (after the translation below; blocks are sealed only at the end).
        let prologue = b.create_block();
        b.ins().jump(prologue, &[]);
        let mut t = Translator {
            b,
            code: program.code(),
            start,
            end,
            ctx,
            blocks,
            exit,
            entered: HashMap::new(),
            left,
            pages,
            regs,
            float_of: HashMap::new(),
            reg_pages,
            depth: loop_depths(&code[start..end], start),
            cache_sites: false,
            sites: Vec::new(),
        };
        let innermost = t.depth.iter().copied().max().unwrap_or(0);
        for index in start..end {
            t.cache_sites = innermost > 0 && t.depth[index - start] == innermost;
            let block = t.blocks[index - start];
            t.b.switch_to_block(block);
            t.instruction(index);
        }
        t.b.switch_to_block(prologue);
        let zero = t.b.ins().iconst(types::I64, 0);
        for site in std::mem::take(&mut t.sites) {
            for var in [site.lo, site.delta, site.len].into_iter().chain(site.mask) {
                t.b.def_var(var, zero);
            }
        }
        let first = t.blocks[0];
        t.b.ins().jump(first, &[]);
        t.b.switch_to_block(exit);
        let value = t.b.block_params(exit)[0];
        let left = t.b.block_params(exit)[1];
        // The count on entry and what was left then, loaded again (nothing else stores them)
        // rather than kept live through the whole call.
        let (instructions, left_on_entry) = instructions_left(t.b, ctx);
        let used = t.b.ins().isub(left_on_entry, left);
        let instructions = t.b.ins().iadd(instructions, used);
        // Every exit stores the written register words back (the entry checked their pages
        // writable and maskless); a word not written since entry gets its own value back.
        for &(addr, written, _) in &words {
            if !written {
                continue;
            }
            let page = t.pages[&(addr >> PAGE_SHIFT)];
            let value = t.b.use_var(t.regs[&addr].0);
            let offset = (addr & (PAGE_BYTES as u64 - 1)) as i32;
            t.b.ins().store(heap(), value, page.write, offset);
        }
        t.b.ins()
            .store(trusted(), instructions, ctx, CTX_INSTRUCTIONS);
        t.b.ins().return_(&[value]);
        t.b.seal_all_blocks();
    }

    fn exit_to(&mut self, index: usize, counted: bool, reason: HandBack) {
        let value = self
            .b
            .ins()
            .iconst(types::I64, encode_exit(index, counted, reason));
        let left = self.b.use_var(self.left);
        self.b.ins().jump(self.exit, &[value.into(), left.into()]);
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
        if let Some(block) = self.entered.get(&index) {
            let block = *block;
            self.b.ins().jump(block, &[]);
            return;
        }
        // The current block ends with this jump, so the new block can be filled right away.
        let block = self.b.create_block();
        self.entered.insert(index, block);
        self.b.ins().jump(block, &[]);
        self.b.switch_to_block(block);
        let left = self.b.use_var(self.left);
        let len = i64::from(self.code[index].run_len());
        let over = self.b.ins().icmp_imm_s(IntCC::UnsignedLessThan, left, len);
        let give_up = self.b.create_block();
        self.b.set_cold_block(give_up);
        let go = self.b.create_block();
        self.b.ins().brif(over, give_up, &[], go, &[]);
        self.b.switch_to_block(give_up);
        self.exit_to(index, false, HandBack::Check);
        self.b.switch_to_block(go);
        let next = self.b.ins().iadd_imm_s(left, -len);
        self.b.def_var(self.left, next);
        let target = self.blocks[index - self.start];
        self.b.ins().jump(target, &[]);
    }

    /// Continues with the next instruction of the same run (already counted).
    fn fall_through(&mut self, index: usize) {
        let next = index + 1;
        if next < self.end {
            let block = self.blocks[next - self.start];
            self.b.ins().jump(block, &[]);
        } else {
            self.exit_to(next, true, HandBack::Left);
        }
    }

    /// The host address of a computed address's `size` bytes, and the page's mask pointer
    /// (stores; null on a page without a mask), through a cache of one page per access site:
    /// the TLB cannot change during a call, so the page a site last used stays valid and a
    /// pointer walking through a page skips the hash and the probe (`SiteCache`). Only in
    /// innermost loops (`cache_sites`); elsewhere every access probes. `miss` if the access
    /// crosses the page, misses the TLB, is a store to a page without a write pointer, or
    /// reaches the memory of a page whose words are held in variables.
    fn site(&mut self, addr: Value, size: u32, store: bool, miss: Block) -> (Value, Value) {
        if !self.cache_sites {
            let (page, offset) = self.page_inside(addr, size, miss);
            let entry = self.probe_page(page, miss);
            let (base, mask) = self.entry_pointers(entry, store, miss);
            return (self.b.ins().iadd(base, offset), mask);
        }
        let b = &mut *self.b;
        let site = SiteCache {
            lo: b.declare_var(types::I64),
            delta: b.declare_var(types::I64),
            len: b.declare_var(types::I64),
            mask: store.then(|| b.declare_var(types::I64)),
        };
        self.sites.push(site);
        let lo = b.use_var(site.lo);
        let len = b.use_var(site.len);
        let from_lo = b.ins().isub(addr, lo);
        let hit = b.ins().icmp(IntCC::UnsignedLessThan, from_lo, len);
        let found = b.create_block();
        let fill = b.create_block();
        b.ins().brif(hit, found, &[], fill, &[]);
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
        b.def_var(site.len, len);
        if let Some(var) = site.mask {
            b.def_var(var, mask);
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
        for reg_page in self.reg_pages.clone() {
            if store || reg_page.written {
                let alias = self.b.ins().icmp(IntCC::Equal, base, reg_page.read);
                self.miss_if(alias, miss);
            }
        }
        (base, mask)
    }

    /// The TLB entry of `page`, or `miss`.
    fn probe_page(&mut self, page: Value, miss: Block) -> Value {
        let b = &mut *self.b;
        let entries = b.ins().load(types::I64, trusted(), self.ctx, CTX_ENTRIES);
        let gen_tag = b.ins().load(types::I64, trusted(), self.ctx, CTX_GEN_TAG);
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
    fn cached(&self, addr: Option<u64>, size: u32) -> Option<CachedPage> {
        let addr = addr?;
        let offset = addr & (PAGE_BYTES as u64 - 1);
        if offset + u64::from(size) > PAGE_BYTES as u64 {
            return None;
        }
        self.pages.get(&(addr >> PAGE_SHIFT)).copied()
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
                let b = &mut *self.b;
                let hit = b.create_block();
                b.ins().brif(page.read, hit, &[], miss, &[]);
                b.switch_to_block(hit);
                b.ins()
                    .iadd_imm_s(page.read, (known & (PAGE_BYTES as u64 - 1)) as i64)
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
                let b = &mut *self.b;
                let writable = b.create_block();
                b.ins().brif(page.write, writable, &[], miss, &[]);
                b.switch_to_block(writable);
                let offset = (known & (PAGE_BYTES as u64 - 1)) as i64;
                let at = b.ins().iadd_imm_s(page.write, offset);
                (at, b.ins().iconst(types::I64, offset), page.mask)
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
        if let Some(&(var, float)) = self.regs.get(&at) {
            let value = self.b.use_var(var);
            return if float { self.f64_bits(value) } else { value };
        }
        let at_value = self.b.ins().iconst(types::I64, at as i64);
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
            if let Some(&(var, float)) = self.regs.get(&at) {
                let value = self.b.use_var(var);
                return if float { self.f64_bits(value) } else { value };
            }
        }
        let (addr, constant) = self.address(operand, miss);
        self.load(addr, constant, size, float_load, miss)
    }

    fn write(&mut self, operand: Operand, size: u32, value: Value, miss: Block) {
        if let (Operand::Direct(at), 8) = (operand, size) {
            if let Some(&(var, float)) = self.regs.get(&at) {
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
                let target = d.target().unwrap_or(self.code.len());
                match taken {
                    None => self.enter_run(target),
                    Some(taken) => {
                        let yes = self.b.create_block();
                        let no = self.b.create_block();
                        self.b.ins().brif(taken, yes, &[], no, &[]);
                        self.b.switch_to_block(yes);
                        self.enter_run(target);
                        self.b.switch_to_block(no);
                        self.enter_run(index + 1);
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
