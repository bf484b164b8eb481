//! Commit order: timestamps for runner endings, and their effects applied in timestamp order.
//!
//! Every ending takes one or more consecutive timestamps (`allocate`): its commit, if it has
//! one, and its exit-record publication. The page installs happen in parallel, in any order, on
//! the workers that ended the runners. What an ending makes observable beyond its pages —
//! the watermark that snapshots are taken at, children, watcher activations, exit records'
//! joins, console output — must follow one total order, the timestamp order. `complete` parks
//! an ending's effects until every earlier timestamp has completed, then applies them in order.
//!
//! Flat combining, not a lock around the effects: one thread at a time applies (the `applying`
//! flag); a thread that completes while another applies parks its effects and returns to work
//! at once, and the applying thread picks them up before it stops. The mutex guards only the
//! parking map, never the application.
//!
//! Invariants:
//! - timestamps are allocated exactly once each, consecutively from 1;
//! - effects of timestamp range `[a, b]` are applied after those of every range below `a`,
//!   exactly once, by one thread at a time;
//! - a caller that allocated a range must complete it, or every later ending waits forever:
//!   nothing between `allocate` and `complete` may fail.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

struct State<E> {
    /// Completed endings waiting for an earlier one: first timestamp -> (count, effects).
    parked: BTreeMap<u64, (u64, E)>,
    /// The first timestamp whose effects are not applied yet.
    next_to_apply: u64,
    /// Some thread is applying effects (and will look for more before it stops).
    applying: bool,
}

pub struct CommitOrder<E> {
    next_ts: AtomicU64,
    state: Mutex<State<E>>,
}

impl<E> CommitOrder<E> {
    /// Timestamps start after `initial_ts` (the initial contents are at timestamp 0).
    pub fn new(initial_ts: u64) -> CommitOrder<E> {
        CommitOrder {
            next_ts: AtomicU64::new(initial_ts + 1),
            state: Mutex::new(State {
                parked: BTreeMap::new(),
                next_to_apply: initial_ts + 1,
                applying: false,
            }),
        }
    }

    /// Reserves `count` (at least 1) consecutive timestamps; returns the first.
    pub fn allocate(&self, count: u64) -> u64 {
        debug_assert!(count >= 1);
        self.next_ts.fetch_add(count, Ordering::AcqRel)
    }

    /// Timestamps applied so far are all below this.
    pub fn next_to_apply(&self) -> u64 {
        self.lock().next_to_apply
    }

    /// Completes the range `[first, first + count)`: `apply(last_ts, effects)` runs for it, and
    /// for every range that was waiting on it, in timestamp order — on this thread, or on the
    /// thread already applying.
    pub fn complete(&self, first: u64, count: u64, effects: E, mut apply: impl FnMut(u64, E)) {
        let mut state = self.lock();
        debug_assert!(
            first >= state.next_to_apply,
            "timestamp {first} completed twice"
        );
        if state.applying || first != state.next_to_apply {
            // Applied later by the thread applying now, or by whoever completes the range
            // before it. (Not applying means the parked ranges were drained up to
            // `next_to_apply`, so none of them can go before this one.)
            state.parked.insert(first, (count, effects));
            return;
        }
        // The common case, the next range: applied straight away, without parking it (the
        // effects are a few hundred bytes, and a `BTreeMap` moves them on insert and remove).
        state.applying = true;
        state.next_to_apply += count;
        let mut next = Some((first + count - 1, effects));
        let mut ready = Vec::new();
        loop {
            drop(state);
            // If `apply` panics the flag stays set and endings stop taking effect; the run
            // then ends through the worker's panic handling rather than continuing out of order.
            if let Some((last_ts, effects)) = next.take() {
                apply(last_ts, effects);
            }
            for (last_ts, effects) in ready.drain(..) {
                apply(last_ts, effects);
            }
            state = self.lock();
            let state_ref = &mut *state;
            while let Some(entry) = state_ref.parked.first_entry() {
                if *entry.key() != state_ref.next_to_apply {
                    break;
                }
                let (count, effects) = entry.remove();
                state_ref.next_to_apply += count;
                ready.push((state_ref.next_to_apply - 1, effects));
            }
            if ready.is_empty() {
                state.applying = false;
                return;
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<E>> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn effects_apply_in_timestamp_order_whatever_the_completion_order() {
        let order = CommitOrder::<&'static str>::new(0);
        let a = order.allocate(2);
        let b = order.allocate(1);
        let c = order.allocate(1);
        assert_eq!((a, b, c), (1, 3, 4));
        let mut applied = Vec::new();
        order.complete(c, 1, "c", |ts, e| applied.push((ts, e)));
        order.complete(b, 1, "b", |ts, e| applied.push((ts, e)));
        assert!(applied.is_empty(), "b and c wait for a");
        order.complete(a, 2, "a", |ts, e| applied.push((ts, e)));
        assert_eq!(applied, vec![(2, "a"), (3, "b"), (4, "c")]);
        assert_eq!(order.next_to_apply(), 5);
    }

    #[test]
    fn concurrent_completions_apply_each_exactly_once_in_order() {
        let order = Arc::new(CommitOrder::<u64>::new(0));
        let applied = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let order = Arc::clone(&order);
                let applied = Arc::clone(&applied);
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        let ts = order.allocate(1);
                        order.complete(ts, 1, ts, |last, e| {
                            assert_eq!(last, e);
                            applied.lock().expect("applied").push(e);
                        });
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("thread");
        }
        let applied = applied.lock().expect("applied");
        assert_eq!(applied.len(), 8000);
        assert!(
            applied.windows(2).all(|w| w[0] + 1 == w[1]),
            "in order, no gap, no repeat"
        );
    }
}
