//! Branches over moves as selects: a conditional branch that only decides whether a few
//! moves are made (k-means' nearest centroid) writes every moved word as `taken ? source :
//! old value` and charges the count the way taken, so a data-dependent outcome costs no
//! misprediction. Only moves that cannot hand back qualify, and only when the count covers
//! the longer way; otherwise the branch stays a branch.

use super::{HandBack, Translator};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, Block, InstBuilder, Value};
use dvm_engine::codec::Operand;
use dvm_engine::isa::{Cond, Op};

impl<'b, 'f> Translator<'b, 'f> {
    /// Most moves a branch may skip and still be done as selects (`branch_over_moves`).
    const MAX_SELECTED_MOVES: usize = 4;

    /// Whether conditional branch `index` only chooses whether a few moves are made, as
    /// `br:l,fd D, B, $take; br:j $join; take: mov D, B; mov K, BK; join:` does (k-means'
    /// nearest centroid): the moves copy 8 bytes between words held in variables, constant
    /// words on pages checked on entry, and constants, so none can hand back. Returns
    /// `join`. Done as selects, such a branch costs no misprediction when its outcome is
    /// random (it is taken for about one centroid in four).
    pub(super) fn branch_over_moves(&self, index: usize) -> Option<usize> {
        let take = index + 2;
        let skip = self.code.get(index + 1)?;
        let join = skip.target()?;
        let region = self.start..self.end;
        if self.code[index].target() != Some(take)
            || skip.instr.op != Op::Br
            || skip.instr.cond != Cond::J
            || !(take + 1..=take + Self::MAX_SELECTED_MOVES).contains(&join)
            || !region.contains(&join)
        {
            return None;
        }
        let l = self.loop_at(index);
        if (index..=join).any(|k| self.loop_at(k) != l) {
            return None;
        }
        let safe = |operand: Operand, written: bool| match operand {
            Operand::Imm(_) => !written,
            Operand::Direct(at) => {
                let held = self
                    .chain(l)
                    .into_iter()
                    .any(|k| self.loops[k].words.iter().any(|w| w.0 == at));
                let checked = self
                    .cached(Some(at), 8)
                    .and_then(|page| self.checked.get(&page))
                    .is_some_and(|&writable| writable || !written);
                held || checked
            }
            _ => false,
        };
        self.code[take..join]
            .iter()
            .all(|d| {
                let instr = &d.instr;
                instr.op == Op::Conv
                    && instr.tys[0] == instr.tys[1]
                    && instr.tys[0].size_bytes() == 8
                    && safe(instr.operand(0), false)
                    && safe(instr.operand(1), true)
            })
            .then_some(join)
    }

    /// Branch `index` over the moves up to `join` (`branch_over_moves`) as selects: when the
    /// count covers the longer way, every move writes `taken ? its source : the old value`
    /// and the count is charged the runs of the way taken, as the interpreter counts them;
    /// else the branch, to `yes` (taken) and `no`.
    pub(super) fn select_moves(
        &mut self,
        index: usize,
        taken: Value,
        join: usize,
        yes: Block,
        no: Block,
    ) {
        let take = index + 2;
        let taken_run = i64::from(self.code[take].run_len());
        let skipped_run = i64::from(self.code[index + 1].run_len() + self.code[join].run_len());
        let left = self.b.ins().get_pinned_reg(types::I64);
        let enough = self.b.ins().icmp_imm_s(
            IntCC::UnsignedGreaterThanOrEqual,
            left,
            taken_run.max(skipped_run),
        );
        let select = self.b.create_block();
        let branch = self.b.create_block();
        self.b.ins().brif(enough, select, &[], branch, &[]);
        self.b.switch_to_block(branch);
        self.b.ins().brif(taken, yes, &[], no, &[]);
        self.b.switch_to_block(select);
        // (None of these reads or writes can hand back: `branch_over_moves`.)
        let unused = self.b.create_block();
        let mut chosen = Vec::new();
        for k in take..join {
            let instr = self.code[k].instr;
            let ty = instr.tys[0];
            let source = self.read(instr.operand(0), ty, unused);
            let moved = self.convert(source, ty, ty);
            let old = self.read(instr.operand(1), ty, unused);
            chosen.push((instr.operand(1), self.b.ins().select(taken, moved, old)));
        }
        let taken_run = self.b.ins().iconst(types::I64, taken_run);
        let skipped_run = self.b.ins().iconst(types::I64, skipped_run);
        let charge = self.b.ins().select(taken, taken_run, skipped_run);
        let left = self.b.ins().isub(left, charge);
        self.b.ins().set_pinned_reg(left);
        for (operand, value) in chosen {
            self.write(operand, 8, value, unused);
        }
        self.jump_to(self.loop_at(index), join);
        self.b.switch_to_block(unused);
        self.exit_to(index, true, HandBack::Miss);
    }
}
