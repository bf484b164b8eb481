//! Slots of a fixed-size area handed out and taken back: runner ids (exit-record pages) and
//! runtime stacks of one space. `LocalControl` (in `vm`) owns one pool per area.
//!
//! Policy (`docs/MEMORY-MODEL.md` §2 and §6): fresh slots are handed out first, in ascending
//! order, up to the pool's `reuse_after` (for ids: the whole area, so ids come in creation order
//! until it is used up; for stacks: `STACK_REUSE_AFTER` per space, so that a long chain of
//! runners keeps a bounded set of stack pages rather than one per runner it ever made). From
//! then on freed slots are handed out again, round-robin from the lowest address after the last
//! one reused — the slot freed longest ago in the common case where runners end roughly in the
//! order they were created, without keeping a queue of every ending — and fresh ones only when
//! no freed slot is ready.
//!
//! Invariants:
//! - a slot is in at most one of: in use, ready, waiting; `ready_count` counts the ready ones;
//! - a slot is freed only if it is in use (a second free, or a free of a slot the pool never
//!   handed out, is ignored), so a stack a program names itself is never put in the pool;
//! - a slot freed at timestamp `ts` is handed out only once `ts <= horizon` (the oldest live
//!   snapshot), so no runner that could still write to it under an older snapshot, and no
//!   requester whose snapshot predates its last owner's writes, exists when it is reused.
//!
//! Memory: two bits per slot handed out so far, plus the waiting slots (bounded by the endings
//! since the oldest live snapshot, drained every `DRAIN_EVERY` frees).

use std::collections::VecDeque;

/// Waiting slots are moved to `ready` at least this often (counted in frees).
const DRAIN_EVERY: usize = 1024;

#[derive(Debug)]
pub struct SlotPool {
    /// Slots `0..fresh_next` have been handed out at least once.
    fresh_next: u64,
    fresh_end: u64,
    /// Below this many slots handed out, fresh ones come first; above, freed ones.
    reuse_after: u64,
    in_use: Vec<u64>,
    ready: Vec<u64>,
    ready_count: u64,
    /// Freed, not yet visible to every live snapshot: `(slot, freed at ts)`, ts ascending.
    waiting: VecDeque<(u64, u64)>,
    /// Where the search for a ready slot starts (round-robin).
    cursor: u64,
    /// The newest horizon seen (it never moves back): slots freed at or below it are ready.
    horizon: u64,
}

fn bit(bits: &[u64], slot: u64) -> bool {
    bits.get((slot / 64) as usize)
        .is_some_and(|word| word & (1 << (slot % 64)) != 0)
}

fn set(bits: &mut Vec<u64>, slot: u64, on: bool) {
    let index = (slot / 64) as usize;
    if index >= bits.len() {
        bits.resize(index + 1, 0);
    }
    if on {
        bits[index] |= 1 << (slot % 64);
    } else {
        bits[index] &= !(1 << (slot % 64));
    }
}

impl SlotPool {
    /// A pool of `slots` slots, `0..slots`, reused only once all were handed out.
    pub fn new(slots: u64) -> SlotPool {
        SlotPool::reusing_after(slots, slots)
    }

    /// A pool of `slots` slots that prefers freed slots to fresh ones once `reuse_after` were
    /// handed out.
    pub fn reusing_after(slots: u64, reuse_after: u64) -> SlotPool {
        SlotPool {
            fresh_next: 0,
            fresh_end: slots,
            reuse_after: reuse_after.min(slots),
            in_use: Vec::new(),
            ready: Vec::new(),
            ready_count: 0,
            waiting: VecDeque::new(),
            cursor: 0,
            horizon: 0,
        }
    }

    /// A slot, fresh if any is left, else a freed one whose last use every live snapshot sees;
    /// `horizon` is asked only when freed slots are waiting. `(slot, reused)`.
    pub fn take(&mut self, horizon: impl FnOnce() -> u64) -> Option<(u64, bool)> {
        if self.fresh_next < self.reuse_after {
            return Some((self.take_fresh(), false));
        }
        if self.ready_count == 0 && !self.waiting.is_empty() {
            self.drain(horizon());
        }
        if self.ready_count == 0 {
            return (self.fresh_next < self.fresh_end).then(|| (self.take_fresh(), false));
        }
        let slot = self.next_ready()?;
        set(&mut self.ready, slot, false);
        self.ready_count -= 1;
        set(&mut self.in_use, slot, true);
        self.cursor = slot + 1;
        Some((slot, true))
    }

    fn take_fresh(&mut self) -> u64 {
        let slot = self.fresh_next;
        self.fresh_next += 1;
        set(&mut self.in_use, slot, true);
        slot
    }

    /// Gives `slot` back; its last owner's writes are installed at or below `freed_ts`.
    pub fn free(&mut self, slot: u64, freed_ts: u64, horizon: impl FnOnce() -> u64) {
        if !bit(&self.in_use, slot) {
            return;
        }
        set(&mut self.in_use, slot, false);
        if freed_ts <= self.horizon {
            self.make_ready(slot);
            return;
        }
        self.waiting.push_back((slot, freed_ts));
        if self.waiting.len() >= DRAIN_EVERY {
            self.drain(horizon());
        }
    }

    /// Slots in use now.
    pub fn in_use(&self) -> u64 {
        self.fresh_next - self.ready_count - self.waiting.len() as u64
    }

    fn drain(&mut self, horizon: u64) {
        self.horizon = self.horizon.max(horizon);
        // Waiting slots come from endings applied in timestamp order (slots of runners that
        // never started are ready at once): stop at the first one still too new.
        while let Some(&(slot, freed_ts)) = self.waiting.front() {
            if freed_ts > self.horizon {
                break;
            }
            self.waiting.pop_front();
            self.make_ready(slot);
        }
    }

    fn make_ready(&mut self, slot: u64) {
        set(&mut self.ready, slot, true);
        self.ready_count += 1;
    }

    /// The first ready slot at or after the cursor, wrapping around.
    fn next_ready(&self) -> Option<u64> {
        let words = self.ready.len() as u64;
        if words == 0 {
            return None;
        }
        let start_word = (self.cursor / 64) % words;
        // Step `words` visits the first word again, whole: its bits below the cursor come last.
        for step in 0..=words {
            let index = (start_word + step) % words;
            let mut word = self.ready[index as usize];
            if step == 0 && index * 64 < self.cursor {
                // The first word: only bits at or after the cursor (the ones below come last).
                word &= u64::MAX.checked_shl((self.cursor % 64) as u32).unwrap_or(0);
            }
            if word != 0 {
                return Some(index * 64 + u64::from(word.trailing_zeros()));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_slots_come_first_in_order_then_freed_ones_round_robin() {
        let mut pool = SlotPool::new(4);
        let taken: Vec<_> = (0..4)
            .map(|_| pool.take(|| 0).expect("a fresh slot"))
            .collect();
        assert_eq!(taken, [(0, false), (1, false), (2, false), (3, false)]);
        assert_eq!(pool.take(|| 0), None, "nothing freed yet");
        pool.free(2, 5, || 0);
        pool.free(0, 6, || 0);
        assert_eq!(pool.take(|| 4), None, "freed after the horizon: not yet");
        assert_eq!(
            pool.take(|| 5),
            Some((2, true)),
            "only slot 2 is visible at 5"
        );
        assert_eq!(pool.take(|| 5), None);
        pool.free(3, 7, || 0);
        // The cursor is past 2: 3 comes before 0 although 0 was freed first.
        assert_eq!(pool.take(|| 9), Some((3, true)));
        assert_eq!(pool.take(|| 9), Some((0, true)));
        assert_eq!(pool.in_use(), 4);
    }

    #[test]
    fn past_reuse_after_freed_slots_come_before_fresh_ones() {
        let mut pool = SlotPool::reusing_after(8, 2);
        assert_eq!(pool.take(|| 0), Some((0, false)));
        assert_eq!(pool.take(|| 0), Some((1, false)));
        assert_eq!(pool.take(|| 0), Some((2, false)), "nothing freed: fresh");
        pool.free(0, 3, || 0);
        assert_eq!(
            pool.take(|| 2),
            Some((3, false)),
            "freed after the horizon: fresh"
        );
        assert_eq!(pool.take(|| 3), Some((0, true)), "visible at 3: reused");
        for slot in 4..8 {
            assert_eq!(pool.take(|| 3), Some((slot, false)));
        }
        assert_eq!(pool.take(|| 3), None, "all eight in use");
    }

    #[test]
    fn a_slot_not_in_use_is_never_freed() {
        let mut pool = SlotPool::new(2);
        assert_eq!(pool.take(|| 0), Some((0, false)));
        pool.free(1, 0, || 0); // never handed out
        pool.free(0, 0, || 0);
        pool.free(0, 0, || 0); // twice
        assert_eq!(pool.take(|| 0), Some((1, false)));
        assert_eq!(pool.take(|| 0), Some((0, true)));
        assert_eq!(pool.take(|| 0), None, "slot 0 was put back once only");
    }

    #[test]
    fn many_frees_drain_waiting_slots_and_reuse_never_repeats_a_live_slot() {
        let slots = 300;
        let mut pool = SlotPool::new(slots);
        let mut live = std::collections::BTreeSet::new();
        let mut order = VecDeque::new();
        for ts in 1..20_000u64 {
            if live.len() as u64 == slots || (ts % 3 == 0 && !order.is_empty()) {
                let slot = order.pop_front().expect("a live slot");
                live.remove(&slot);
                pool.free(slot, ts, || ts);
            } else {
                let (slot, _) = pool.take(|| ts).expect("a slot: fewer than 300 are live");
                assert!(live.insert(slot), "slot {slot} handed out twice");
                order.push_back(slot);
            }
        }
        assert_eq!(pool.in_use(), live.len() as u64);
        assert!(pool.waiting.len() < DRAIN_EVERY);
    }
}
