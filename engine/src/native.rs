//! What native code compiled from a program (the `dvm-jit` crate) is lent and gives back when
//! the interpreter lets it run part of the program (the hook itself is `interp::Jit`, next to
//! the `Program` it is given).
//!
//! The engine stays free of `unsafe` and of any code generator: it only says where native code
//! may take over (loop headers, see `Program::attach_jit`) and hands the compiled code what it
//! needs to run exactly like the interpreter's fast path: the runner's TLB (`TlbAccess`), its
//! instruction count and the count at which the interpreter must take over again
//! (`check_at`: a progress report, a profile sample or `--max-instructions`). Native code never
//! ends a runner: whatever it cannot do exactly as the interpreter's fast path does (a TLB miss,
//! a fault, an instruction it does not compile) hands control back at that instruction, before
//! any of its effects, and the interpreter runs it.

use crate::tlb::TlbEntry;
use std::marker::PhantomData;

/// Where native code handed control back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NativeExit {
    /// The next instruction to run (none of its effects has happened).
    pub index: usize,
    /// The run `index` belongs to is already counted (native code stopped inside it); `false`:
    /// `index` starts a run that the interpreter must enter (count, or check the limit).
    pub counted: bool,
}

/// A runner's TLB, lent to native code for one call: the entries and the current generation's
/// tag, as `Tlb::probe` uses them (`tlb.rs` describes the entry layout and the invariants).
/// Only the engine makes one, from a view it holds exclusively for the lifetime `'a`, so the
/// pointer stays valid, and no entry changes, for as long as the value lives.
pub struct TlbAccess<'a> {
    entries: *const TlbEntry,
    gen_tag: u64,
    _view: PhantomData<&'a mut ()>,
}

impl<'a> TlbAccess<'a> {
    pub(crate) fn new(entries: *const TlbEntry, gen_tag: u64) -> TlbAccess<'a> {
        TlbAccess {
            entries,
            gen_tag,
            _view: PhantomData,
        }
    }

    /// `TLB_SETS` sets of two entries each, set `s` way `w` at `entries + 2 * s + w`.
    pub fn entries(&self) -> *const TlbEntry {
        self.entries
    }

    /// `page | gen_tag` is the tag of a valid entry for `page` (`addr >> PAGE_SHIFT`).
    pub fn gen_tag(&self) -> u64 {
        self.gen_tag
    }
}

/// What native code reads and updates while it runs.
pub struct NativeState<'a> {
    pub tlb: TlbAccess<'a>,
    /// The runner's instruction count (as `Exec::instructions`).
    pub instructions: u64,
    /// Entering a run that would take the count above this hands back to the interpreter.
    pub check_at: u64,
}
