//! Re-replication: after a node dies, each page's ring gains the next live node of its walk
//! (`crate::view`), and this module copies the page to that **new holder**.
//!
//! The round, driven by node 0 (`sequencer.rs`):
//! 1. declaring a death whose view gives some ring a new member, node 0 stops granting;
//! 2. once every commit granted before is installed, it sends `Seed{epoch}` to every live
//!    node (again every tick until answered);
//! 3. each node sends, for every page it is home of that has new holders, the page's whole
//!    history (`PageStore::history`) to them, in batches of about `SEED_BATCH_BYTES`, a few in
//!    flight at once, each acknowledged, and answers `Seeded` when all are;
//! 4. with every live node's `Seeded`, node 0 settles the view (a new epoch in which the new
//!    members count as full holders) and grants again. A death during the round starts it
//!    again in the newer view; copies already made are kept (`install_history` takes a
//!    history only if it is newer than what is there).
//!
//! Why a new holder misses no commit: a history is read while nothing of its page is being
//! installed (no grant since step 1, every earlier one installed before step 2), and every
//! commit granted after the round is sent to the new holder, which by then has the history.
//! A transaction prepared in a view before its ring grew did not send its deltas to the new
//! holder; node 0 answers its request with `Reprepare`, and its coordinator sends them
//! (`node.rs`, `TxnState::Restaging`) before asking again.

use super::{Node, NodeId};
use crate::msg::Msg;
use dvm_engine::store::PageHistory;
use std::collections::{BTreeMap, VecDeque};

/// A batch of copies is closed once its pages' versions reach this size.
const SEED_BATCH_BYTES: usize = 1 << 20;
/// Batches a home has in flight at once: bounds the memory a round holds.
const SEED_WINDOW: usize = 4;
/// A batch not acknowledged after this long is sent again (its connection may have dropped it).
const SEED_RESEND_US: u64 = 200_000;
/// What a version costs in a batch at most (its contents and stored mask), and a stripped one
/// (its mask), for closing batches.
const VERSION_BYTES: usize = dvm_engine::page::PAGE_BYTES + STRIPPED_BYTES;
const STRIPPED_BYTES: usize = 8 + 8 * 64;

/// One round's copies from this node.
pub(super) struct SeedOut {
    epoch: u64,
    /// Pages still to copy, per new holder.
    pending: BTreeMap<NodeId, VecDeque<u64>>,
    /// Sent, not acknowledged: batch -> (new holder, message, when last sent).
    in_flight: BTreeMap<u64, (NodeId, Msg, u64)>,
    next_batch: u64,
    /// Pages and bytes copied (for the log).
    pages: u64,
    bytes: u64,
}

impl SeedOut {
    fn done(&self) -> bool {
        self.in_flight.is_empty() && self.pending.values().all(VecDeque::is_empty)
    }
}

impl Node {
    /// `Seed{epoch}` from node 0: starts this node's copies for view `epoch` (once; a
    /// repeated `Seed` of a finished round is answered again).
    pub(super) fn on_seed(&mut self, epoch: u64) {
        if epoch != self.view.epoch() {
            // Behind: the view comes with node 0's next heartbeat answer, and `Seed` again.
            return;
        }
        if let Some(out) = &self.seeding {
            if out.epoch == epoch {
                if out.done() {
                    self.send(0, Msg::Seeded { epoch });
                }
                return;
            }
        }
        let me = self.config.id;
        let mut pending: BTreeMap<NodeId, VecDeque<u64>> = BTreeMap::new();
        for page in self.store.keys() {
            if self.view.home(page) != Some(me) {
                continue;
            }
            for holder in self.view.new_holders(page) {
                pending.entry(holder).or_default().push_back(page);
            }
        }
        let pages: usize = pending.values().map(VecDeque::len).sum();
        tracing::info!(
            "view {epoch}: copying {pages} pages to their new holders {:?}",
            pending.keys().collect::<Vec<_>>()
        );
        self.seeding = Some(SeedOut {
            epoch,
            pending,
            in_flight: BTreeMap::new(),
            next_batch: 0,
            pages: 0,
            bytes: 0,
        });
        self.seed_progress();
    }

    /// Fills the window of batches in flight; `Seeded` to node 0 once every batch is
    /// acknowledged.
    fn seed_progress(&mut self) {
        let Some(mut out) = self.seeding.take() else {
            return;
        };
        while out.in_flight.len() < SEED_WINDOW {
            let Some((&to, queue)) = out.pending.iter_mut().find(|(_, q)| !q.is_empty()) else {
                break;
            };
            let mut pages: Vec<(u64, PageHistory)> = Vec::new();
            let mut bytes = 0;
            while bytes < SEED_BATCH_BYTES && pages.len() < crate::msg::MAX_SEED_PAGES {
                let Some(page) = queue.pop_front() else { break };
                if let Some(history) = self.store.history(page) {
                    bytes += 8 + history.versions.len() * VERSION_BYTES;
                    bytes += history.stripped.len() * STRIPPED_BYTES;
                    pages.push((page, history));
                }
            }
            out.pages += pages.len() as u64;
            out.bytes += bytes as u64;
            let batch = out.next_batch;
            out.next_batch += 1;
            let msg = Msg::SeedPages {
                epoch: out.epoch,
                batch,
                pages,
            };
            out.in_flight.insert(batch, (to, msg.clone(), self.now_us));
            self.send(to, msg);
        }
        let finished = out.done().then_some(out.epoch);
        if let Some(epoch) = finished {
            tracing::info!(
                "view {epoch}: {} pages ({} KiB) copied to their new holders",
                out.pages,
                out.bytes >> 10
            );
        }
        self.seeding = Some(out);
        if let Some(epoch) = finished {
            self.send(0, Msg::Seeded { epoch });
        }
    }

    /// A new holder: keeps the copies (unless it has them already) and acknowledges.
    pub(super) fn on_seed_pages(
        &mut self,
        from: NodeId,
        epoch: u64,
        batch: u64,
        pages: Vec<(u64, PageHistory)>,
    ) {
        for (page, history) in &pages {
            match self.store.install_history(*page, history, &self.pages) {
                // Readers READ a page from whichever holder is its home (`publish_newest`).
                Ok(true) => self.publish_newest(*page),
                Ok(false) => {}
                Err(limit) => {
                    // Acknowledged all the same: a round that never ended would stop every commit.
                    tracing::error!(
                        "no page memory for the copy of page {page:#x} from node {from} (limit \
                         {} bytes): this node holds no copy of it",
                        limit.limit_bytes
                    );
                }
            }
        }
        self.send(from, Msg::SeedAck { epoch, batch });
    }

    pub(super) fn on_seed_ack(&mut self, epoch: u64, batch: u64) {
        match &mut self.seeding {
            Some(out) if out.epoch == epoch => {
                out.in_flight.remove(&batch);
            }
            _ => return,
        }
        self.seed_progress();
    }

    /// Every tick: batches unacknowledged for too long are sent again, to live nodes.
    pub(super) fn seed_tick(&mut self) {
        let now_us = self.now_us;
        let Some(out) = &mut self.seeding else { return };
        let mut again = Vec::new();
        for (to, msg, sent_us) in out.in_flight.values_mut() {
            if now_us.saturating_sub(*sent_us) >= SEED_RESEND_US {
                *sent_us = now_us;
                again.push((*to, msg.clone()));
            }
        }
        for (to, msg) in again {
            self.send(to, msg);
        }
    }
}
