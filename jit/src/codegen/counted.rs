//! Counted loops (`loops::counted_sites`): the check at the top of an iteration that finds how
//! many iterations keep every access on its page and charges them to the count up front, the
//! branch back that takes them without a check, and what a way out gives back. A loop that
//! counts a word down to zero (`loops::trip_word`) keeps its safe iterations as a limit on that
//! word (`Trip`), so its branch back is one compare.
//!
//! Invariant: at any instruction of a counted loop, the iterations charged but not yet
//! started are `safe` (or, with a trip word, the word's value after the current iteration
//! minus the limit); `refund` gives exactly those back and leaves none charged.

use super::{Loop, Translator, PAGE_BYTES, SITE_DELTA, SITE_LEN, SITE_LO, SITE_MASK};
use crate::loops::CountedSite;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, Block, InstBuilder, StackSlot, Value};
use cranelift_frontend::Variable;

fn counted_header(l: &Loop) -> usize {
    l.counted.as_ref().map_or(0, |c| c.header)
}

/// The variables of a counted loop: per access the host offset of its page and its store
/// mask, and the iterations known safe after the current one (every access stays on its
/// page and the count covers them). Those iterations are charged to the count in advance, at
/// the check that finds them, so their branch back does no arithmetic on the count; every way
/// out of the loop gives back what was charged for iterations not run (`write_back`).
pub(super) struct Counted {
    pub(super) header: usize,
    /// Each access, its variables, and the slot that keeps its last page between entries
    /// into the loop (`SITE_*` layout).
    pub(super) sites: Vec<(CountedSite, Variable, Option<Variable>, StackSlot)>,
    pub(super) safe: Variable,
    /// Where an iteration known safe starts (after the check), once translated: the loop's
    /// branch back goes there directly while iterations are left.
    pub(super) go: Option<Block>,
    /// A loop that counts a word down to zero (`trip_word`) keeps its safe iterations as a
    /// limit on that word instead of in `safe`.
    pub(super) trip: Option<Trip>,
}

/// The safe iterations of a counted loop with a trip word (its variable `word`), decremented by
/// instruction `decrement`: those after the current one are the ones that end with the word
/// still above `limit` (unsigned, wrapping; `safe` is unused). The branch back then needs
/// one compare, `word > limit`, which also implies the branch is taken; a loop that runs to
/// its end was charged exactly its iterations (the limit is at most the word's value after
/// the last one, zero), so its exit gives nothing back.
#[derive(Clone, Copy)]
pub(super) struct Trip {
    pub(super) word: Variable,
    pub(super) decrement: usize,
    pub(super) limit: Variable,
}

impl<'b, 'f> Translator<'b, 'f> {
    /// Gives the count back what counted loop `l` charged for iterations it will not run
    /// (leaving it); none are left charged after this.
    pub(super) fn refund(&mut self, l: usize) {
        let Some(counted) = self.loops[l].counted.as_ref().filter(|_| !self.refunded) else {
            return;
        };
        let run = i64::from(self.code[counted.header].run_len());
        let (safe_var, trip) = (counted.safe, counted.trip);
        let safe = match trip {
            // The iterations that would end with the word still above the limit.
            Some(trip) => {
                let after = self.word_after(trip);
                let limit = self.b.use_var(trip.limit);
                self.b.def_var(trip.limit, after);
                self.b.ins().isub(after, limit)
            }
            None => self.b.use_var(safe_var),
        };
        let unused = self.b.ins().imul_imm_s(safe, run);
        let count = self.b.ins().get_pinned_reg(types::I64);
        let count = self.b.ins().iadd(count, unused);
        self.b.ins().set_pinned_reg(count);
        let zero = self.b.ins().iconst(types::I64, 0);
        self.b.def_var(safe_var, zero);
    }

    /// Counted loop `l`'s trip word, if it has one.
    pub(super) fn trip_of(&self, l: usize) -> Option<Trip> {
        self.loops[l].counted.as_ref().and_then(|c| c.trip)
    }

    /// The trip word's value after the current iteration's decrement, at instruction
    /// `self.current` of its counted loop (before or after the decrement).
    fn word_after(&mut self, trip: Trip) -> Value {
        let word = self.b.use_var(trip.word);
        if self.current <= trip.decrement {
            self.b.ins().iadd_imm_s(word, -1)
        } else {
            word
        }
    }

    /// The top of an iteration of counted loop `l`: when no iteration is left that is known
    /// to keep every access on its page, the pages are worked out again for this iteration
    /// (a miss, a page crossing or a page of held words hands back before the iteration), and
    /// how many iterations, this one first, stay on all of them.
    pub(super) fn counted_top(&mut self, l: usize, miss: Block) {
        let Some(counted) = &self.loops[l].counted else {
            return;
        };
        let (sites, safe, trip) = (counted.sites.clone(), counted.safe, counted.trip);
        let go = self.b.create_block();
        // No iteration is left charged here: the branch back takes those itself, to `go`.
        // With a trip word, the limit says so too, before anything here can hand back.
        let last = trip.map(|trip| {
            let last = self.word_after(trip);
            self.b.def_var(trip.limit, last);
            (trip, last)
        });
        // The count bounds the iterations too (this one is counted already): while any are
        // left, the branch back needs no count check.
        let run = i64::from(self.code[counted_header(&self.loops[l])].run_len());
        // No page holds more iterations of a striding access than this, so a count that
        // covers this many needs no division (the usual case: one compare).
        let most = sites
            .iter()
            .filter(|s| s.0.stride != 0)
            .map(|s| {
                let step = s.0.stride.unsigned_abs().min(PAGE_BYTES as u64);
                (PAGE_BYTES as u64 / step) as i64 + 1
            })
            .min();
        let mut fewest = match most {
            Some(most) => self.b.ins().iconst(types::I64, most),
            None => {
                let count = self.b.ins().get_pinned_reg(types::I64);
                let more = self.b.ins().udiv_imm_s(count, run);
                self.b.ins().iadd_imm_s(more, 1)
            }
        };
        for (site, delta_var, mask_var, slot) in sites {
            let Some((pointer, _)) = self.reg(site.word) else {
                // (`counted_sites` took only held words.)
                self.b.ins().jump(miss, &[]);
                return;
            };
            let pointer = self.b.use_var(pointer);
            let addr = self.b.ins().iadd_imm_s(pointer, site.offset);
            // The page it used last time, kept in its slot (`SiteCache`'s test), else a probe.
            let b = &mut *self.b;
            let lo = b.ins().stack_load(types::I64, types::I64, slot, SITE_LO);
            let len = b.ins().stack_load(types::I64, types::I64, slot, SITE_LEN);
            let from_lo = b.ins().isub(addr, lo);
            let off_page = b
                .ins()
                .icmp(IntCC::UnsignedGreaterThanOrEqual, from_lo, len);
            let probe = b.create_block();
            // (A pointer that moves on to the next page probes once per page.)
            b.set_cold_block(probe);
            let kept = b.create_block();
            let join = b.create_block();
            b.append_block_param(join, types::I64);
            if site.store {
                b.append_block_param(join, types::I64);
            }
            b.ins().brif(off_page, probe, &[], kept, &[]);
            b.switch_to_block(kept);
            let delta = b.ins().stack_load(types::I64, types::I64, slot, SITE_DELTA);
            if site.store {
                let mask = b.ins().stack_load(types::I64, types::I64, slot, SITE_MASK);
                b.ins().jump(join, &[delta.into(), mask.into()]);
            } else {
                b.ins().jump(join, &[delta.into()]);
            }
            b.switch_to_block(probe);
            let (page, _) = self.page_inside(addr, site.size, miss);
            let entry = self.probe_page(page, miss);
            let (base, mask) = self.entry_pointers(entry, site.store, miss);
            let b = &mut *self.b;
            let page_start = b.ins().band_imm_s(addr, !(PAGE_BYTES as i64 - 1));
            let delta = b.ins().isub(base, page_start);
            let len = b
                .ins()
                .iconst(types::I64, PAGE_BYTES as i64 + 1 - i64::from(site.size));
            for (value, at) in [
                (page_start, SITE_LO),
                (delta, SITE_DELTA),
                (len, SITE_LEN),
                (mask, SITE_MASK),
            ] {
                b.ins().stack_store(types::I64, value, slot, at);
            }
            if site.store {
                b.ins().jump(join, &[delta.into(), mask.into()]);
            } else {
                b.ins().jump(join, &[delta.into()]);
            }
            b.switch_to_block(join);
            let delta = b.block_params(join)[0];
            b.def_var(delta_var, delta);
            if let Some(var) = mask_var {
                let mask = b.block_params(join)[1];
                b.def_var(var, mask);
            }
            // Iterations from this one on with the access still on the page.
            let step = site.stride.unsigned_abs();
            let room = if site.stride == 0 {
                None
            } else if step >= PAGE_BYTES as u64 {
                Some(b.ins().iconst(types::I64, 1))
            } else {
                let offset = b.ins().band_imm_s(addr, PAGE_BYTES as i64 - 1);
                let ahead = if site.stride > 0 {
                    let end = b
                        .ins()
                        .iconst(types::I64, PAGE_BYTES as i64 - i64::from(site.size));
                    b.ins().isub(end, offset)
                } else {
                    offset
                };
                let steps = b.ins().udiv_imm_s(ahead, step as i64);
                Some(b.ins().iadd_imm_s(steps, 1))
            };
            if let Some(room) = room {
                fewest = b.ins().umin(fewest, room);
            }
        }
        if let Some(most) = most {
            fewest = self.count_bound(fewest, most, run);
        }
        // This iteration is charged already; the ones after it are charged now (with a trip
        // word, no more than the loop has left).
        let mut after = self.b.ins().iadd_imm_s(fewest, -1);
        if let Some((trip, last)) = last {
            after = self.b.ins().umin(after, last);
            let limit = self.b.ins().isub(last, after);
            self.b.def_var(trip.limit, limit);
        }
        let b = &mut *self.b;
        let charge = b.ins().imul_imm_s(after, run);
        let count = b.ins().get_pinned_reg(types::I64);
        let count = b.ins().isub(count, charge);
        b.ins().set_pinned_reg(count);
        b.def_var(safe, after);
        b.ins().jump(go, &[]);
        b.switch_to_block(go);
        if let Some(counted) = &mut self.loops[l].counted {
            counted.go = Some(go);
        }
    }

    /// At the branch back of a counted loop with a trip word: while the word (decremented
    /// already) is above the limit, the next iteration is charged and safe, and the branch
    /// is taken; goes there, else on in a new current block. Whether it was one.
    pub(super) fn trip_back_edge(&mut self, index: usize) -> bool {
        let Some(l) = self.loop_at(index) else {
            return false;
        };
        let Some(counted) = self.loops[l].counted.as_ref() else {
            return false;
        };
        let (Some(trip), Some(go)) = (counted.trip, counted.go) else {
            return false;
        };
        if self.code[index].target() != Some(counted.header) {
            return false;
        }
        let word = self.b.use_var(trip.word);
        let limit = self.b.use_var(trip.limit);
        let more = self.b.ins().icmp(IntCC::UnsignedGreaterThan, word, limit);
        let general = self.b.create_block();
        self.b.ins().brif(more, go, &[], general, &[]);
        // (The word is at the limit: none is charged ahead. The next iteration's top sets
        // the limit for itself before anything can hand back.)
        self.b.switch_to_block(general);
        true
    }

    /// While a counted loop has safe iterations left (`safe`), takes one and goes to its `go`;
    /// otherwise goes on in a new current block.
    pub(super) fn next_safe(&mut self, safe: Variable, go: Block) {
        let left = self.b.use_var(safe);
        let take = self.b.create_block();
        let none = self.b.create_block();
        self.b.ins().brif(left, take, &[], none, &[]);
        self.b.switch_to_block(take);
        let fewer = self.b.ins().iadd_imm_s(left, -1);
        self.b.def_var(safe, fewer);
        self.b.ins().jump(go, &[]);
        self.b.switch_to_block(none);
    }

    /// `fewest` (at most `most`) bounded by the iterations of `run` instructions the count
    /// covers (this one, charged already, and `count / run` more). The division only when
    /// the count is below `most` iterations, which is rare (cold).
    fn count_bound(&mut self, fewest: Value, most: i64, run: i64) -> Value {
        let b = &mut *self.b;
        let count = b.ins().get_pinned_reg(types::I64);
        let plenty = b
            .ins()
            .icmp_imm_s(IntCC::UnsignedGreaterThanOrEqual, count, (most - 1) * run);
        let short = b.create_block();
        b.set_cold_block(short);
        let join = b.create_block();
        b.append_block_param(join, types::I64);
        b.ins().brif(plenty, join, &[fewest.into()], short, &[]);
        b.switch_to_block(short);
        let more = b.ins().udiv_imm_s(count, run);
        let covered = b.ins().iadd_imm_s(more, 1);
        let bounded = b.ins().umin(fewest, covered);
        b.ins().jump(join, &[bounded.into()]);
        b.switch_to_block(join);
        b.block_params(join)[0]
    }
}
