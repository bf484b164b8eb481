//! Where a VM's committed memory lives, how endings are committed and ordered, and where the
//! runtime's services come from: the seams between the engine and a cluster.
//!
//! - `Backend`: views read committed pages through it; an ending prepares through it, then
//!   hands it its pages and its effects (`Finishing`). The effects come back, to the node that
//!   applies endings (node 0), through `apply`, in timestamp order. `LocalBackend` is one node:
//!   the store and a `CommitOrder`. A cluster backend prepares and commits at the pages' homes
//!   and applies effects at node 0 (`dvm-cluster`).
//! - `Control`: runner ids, stacks, heap and console input, which one node (node 0) hands out
//!   for the whole machine. A VM without one serves them itself.

use crate::order::CommitOrder;
use crate::page::PageSource;
use crate::runner::Ended;
use crate::store::{Change, Conflict, PageRead, PageStore, PageWrite, Publication, TxnId};
use crate::view::Range;
use std::sync::Arc;

/// An ending's pages and effects, after a successful or failed prepare.
pub struct Finishing {
    pub txn: TxnId,
    pub snapshot_ts: u64,
    /// The prepared writes (intents held), when the ending commits; installed at the first
    /// timestamp.
    pub prepared: Option<Vec<PageWrite>>,
    /// The exit-record publication, installed at the last timestamp without a conflict check.
    pub exit: Option<Publication>,
    pub ended: Ended,
}

impl Finishing {
    /// Timestamps this ending takes: its commit's, if any, and its exit record's.
    pub fn timestamps(&self) -> u64 {
        1 + u64::from(self.prepared.is_some())
    }
}

/// What `apply` receives: the ending's first and last timestamps and its effects.
pub type Apply<'a> = dyn FnMut(u64, u64, Ended) + 'a;

pub trait Backend: Send + Sync {
    /// Where views read committed pages.
    fn reader(&self) -> Arc<dyn PageRead>;
    /// A runner is about to start at `snapshot_ts` and may use `ranges`: a backend whose
    /// pages are remote fetches them now, in one batch, rather than one at a time later.
    fn prefetch(&self, _ranges: &[Range], _snapshot_ts: u64) {}
    /// A worker found nothing to run and is about to sleep (for at most `sched::IDLE_WAIT`):
    /// a backend whose transport has completions to poll does so here, on the idle worker,
    /// rather than waiting for its I/O thread to wake. `true` if that did anything (the worker
    /// then looks for tasks again at once).
    fn idle(&self) -> bool {
        false
    }
    /// Checks `writes` against commits after `snapshot_ts` and commits in flight, and holds
    /// intents on their pages; blocks until every home answered.
    fn prepare(&self, txn: TxnId, snapshot_ts: u64, writes: &[PageWrite]) -> Result<(), Conflict>;
    /// Installs the ending's pages at consecutive timestamps and arranges for its effects to
    /// be applied in timestamp order: here through `apply`, now or when earlier endings
    /// complete, or on another node. Never fails: its timestamps are taken.
    fn finish(&self, finishing: Finishing, pages: &PageSource, apply: &mut Apply<'_>);
    /// Can `reset_exit_record` install writes? Runner ids are reused only where it can: a
    /// reused id's exit record must read as "not ended" after its new runner is created.
    fn resets_exit_records(&self) -> bool {
        false
    }
    /// Installs `reset` at `ts` without a conflict check: the reset of a reused runner id's
    /// exit record, at its creator's commit timestamp, while that ending is being applied (so
    /// no snapshot at `ts` exists yet). Called only where `resets_exit_records` says so.
    fn reset_exit_record(
        &self,
        _ts: u64,
        _reset: Publication,
        _pages: &PageSource,
    ) -> Option<Change> {
        None
    }
}

/// One node: the page store and the commit order of this process.
pub struct LocalBackend {
    store: Arc<PageStore>,
    order: CommitOrder<(u64, Ended)>,
}

impl LocalBackend {
    pub fn new(store: Arc<PageStore>) -> LocalBackend {
        let order = CommitOrder::new(store.watermark());
        LocalBackend { store, order }
    }
}

impl Backend for LocalBackend {
    fn reader(&self) -> Arc<dyn PageRead> {
        Arc::clone(&self.store) as Arc<dyn PageRead>
    }

    fn prepare(&self, txn: TxnId, snapshot_ts: u64, writes: &[PageWrite]) -> Result<(), Conflict> {
        self.store.prepare(txn, snapshot_ts, writes)
    }

    fn resets_exit_records(&self) -> bool {
        true
    }

    fn reset_exit_record(&self, ts: u64, reset: Publication, pages: &PageSource) -> Option<Change> {
        let change = reset.change();
        self.store.publish(ts, reset, pages);
        Some(change)
    }

    fn finish(&self, finishing: Finishing, pages: &PageSource, apply: &mut Apply<'_>) {
        let count = finishing.timestamps();
        let Finishing {
            txn,
            snapshot_ts,
            prepared,
            exit,
            ended,
        } = finishing;
        // Nothing between `allocate` and `complete` may fail (see `order`).
        let first = self.order.allocate(count);
        let last = first + count - 1;
        if let Some(writes) = prepared {
            self.store
                .commit(txn, Some(snapshot_ts), first, writes, pages);
        }
        if let Some(publication) = exit {
            self.store.publish(last, publication, pages);
        }
        self.order
            .complete(first, count, (first, ended), |last, (first, ended)| {
                apply(first, last, ended)
            });
    }
}

/// The runtime services one node hands out for the whole machine.
///
/// `runner` is the id of the runner asking (its task's id): a cluster hands a runner that
/// runs again after its node's loss what it handed the lost attempt, in the same order, so
/// that the rerun spawns the same ids and reads the same input (`dvm-cluster`'s
/// `handouts.rs`). One node ignores it.
pub trait Control: Send + Sync {
    /// A new runner id, counted against the runner limit; `Err` says which limit.
    fn new_runner_id(&self, runner: u64) -> Result<u64, String>;
    /// Gives back an id whose runner will never exist.
    fn forget_runner(&self, runner: u64);
    fn allocate_stack(&self, runner: u64, space: u64) -> Option<Range>;
    fn allocate_heap(&self, runner: u64, space: u64, len_bytes: u64) -> Option<Range>;
    /// One byte of console input (node 0's stdin), or `None` at its end.
    fn console_input(&self, runner: u64) -> Option<u8>;
}
