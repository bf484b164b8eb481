//! Node 0's roles: the sequencer, which decides commits and drives their installs, and the
//! membership service, which declares silent nodes dead.
//!
//! A commit is decided when the sequencer grants its timestamps (asked only once every holder
//! of its pages has its deltas: `node.rs`, `home.rs`). From then on the
//! sequencer, not the coordinator, sends `Commit` to every live holder of its pages (retried
//! every tick) and counts it complete when all of them installed it; a coordinator that dies
//! after the grant changes nothing. A transaction never granted whose coordinator died is
//! refused for good: the view that names its coordinator dead lists the dead coordinators'
//! transactions still being installed, and holders release every other one.
//!
//! Re-replication (`seeding.rs`): while a view has ring members without their copies,
//! nothing new is granted; node 0 starts the copies once every earlier grant is installed and
//! settles the view when every live node reports its copies made. A request for a transaction
//! prepared before its pages' rings last grew is answered with `Reprepare`.
//!
//! Majority: node 0 grants only while it reaches at least half of the nodes, itself included
//! (`has_majority`). A node cut off from node 0 cannot commit at all (only node 0 grants), so
//! two sides of a partition never both commit; node 0 on the smaller side stops too
//! (`Done::CutOff`) rather than declare the larger side dead and go on alone. A tie goes to
//! node 0's side: the other side has no sequencer.
//!
//! Failure detection: every node sends a heartbeat each tick; a node silent for
//! `failure_timeout_us` is declared dead in a new epoch (`crate::view`). The timeout is
//! measured on node 0's ticks, so a node busy computing is never declared dead as long as
//! whatever calls its `tick` keeps running (a thread of its own in a runtime).

use super::{Done, Node, NodeId};
use crate::msg::{Msg, PageDelta, TsItem};
use dvm_engine::store::TxnId;
use std::collections::{BTreeMap, BTreeSet};

/// A granted transaction being installed at its holders.
struct Installing {
    coordinator: NodeId,
    first: u64,
    count: u64,
    effects: Vec<u8>,
    /// Sent to each holder, the part it holds.
    forced: Vec<PageDelta>,
    /// The live holders that have not acknowledged their install.
    waiting: BTreeSet<NodeId>,
    /// Broken on purpose (`broken_ack_before_backup`): backups sent the commit only after it
    /// counted as complete.
    trailing: BTreeSet<NodeId>,
}

pub(super) struct Sequencer {
    next_ts: u64,
    /// Every grant, so that a retried request gets the same timestamps.
    grants: BTreeMap<TxnId, (u64, u64)>,
    installing: BTreeMap<TxnId, Installing>,
    /// Broken on purpose: completed transactions still being sent to their backups.
    trailing: BTreeMap<TxnId, Installing>,
    /// Completed ranges above the watermark: first -> (count, transaction, effects,
    /// coordinator).
    parked: BTreeMap<u64, (u64, TxnId, Vec<u8>, NodeId)>,
    completed: BTreeSet<TxnId>,
    watermark: u64,
    /// Transactions in the order their ranges passed the watermark (commit order).
    pub(super) applied: Vec<(TxnId, u64)>,
    /// When each node was last heard from (node 0's clock), for failure detection.
    last_heard_us: Vec<Option<u64>>,
    data_lost_reported: bool,
    /// The copy round of the newest view, while one is needed.
    seeding: Option<Round>,
    /// Node 0 lost its majority: nothing is granted any more.
    cut_off: bool,
    /// The last view in which a ring gained a member: transactions prepared in an older one
    /// must send their deltas to the new members before they are granted.
    ring_epoch: u64,
}

/// A copy round: the view, the live nodes that have not reported their copies made, and
/// whether `Seed` went out (only once every earlier grant was installed).
struct Round {
    epoch: u64,
    waiting: BTreeSet<NodeId>,
    started: bool,
}

impl Sequencer {
    pub(super) fn new(world: usize) -> Sequencer {
        Sequencer {
            next_ts: 0,
            grants: BTreeMap::new(),
            installing: BTreeMap::new(),
            trailing: BTreeMap::new(),
            parked: BTreeMap::new(),
            completed: BTreeSet::new(),
            watermark: 0,
            applied: Vec::new(),
            last_heard_us: vec![None; world],
            data_lost_reported: false,
            seeding: None,
            ring_epoch: 0,
            cut_off: false,
        }
    }

    pub(super) fn copying(&self) -> bool {
        self.seeding.is_some()
    }

    pub(super) fn granted(&self, txn: TxnId) -> Option<u64> {
        self.grants.get(&txn).map(|(first, _)| *first)
    }

    pub(super) fn heard(&mut self, node: NodeId, now_us: u64) {
        if let Some(at) = self.last_heard_us.get_mut(node) {
            *at = Some(now_us);
        }
    }

    fn grant(&mut self, txn: TxnId, count: u64) -> u64 {
        let first = self.next_ts + 1;
        self.next_ts += count;
        self.grants.insert(txn, (first, count));
        first
    }

    /// Records a completion; returns the ranges that passed the watermark, in order.
    fn complete(&mut self, done: Installing, txn: TxnId) -> Vec<Done> {
        let (first, count) = (done.first, done.count);
        if self.grants.get(&txn) != Some(&(first, count)) || !self.completed.insert(txn) {
            return Vec::new();
        }
        self.parked
            .insert(first, (count, txn, done.effects, done.coordinator));
        let mut applied = Vec::new();
        while let Some((count, txn, effects, _)) = self.parked.remove(&(self.watermark + 1)) {
            let first = self.watermark + 1;
            self.applied.push((txn, first));
            self.watermark += count;
            applied.push(Done::Applied {
                txn,
                first,
                last: self.watermark,
                effects,
            });
        }
        applied
    }
}

impl Node {
    pub(super) fn sequencer_request(&mut self, from: NodeId, items: Vec<TsItem>) {
        let Some(seq) = self.sequencer.as_mut().filter(|seq| !seq.cut_off) else {
            return;
        };
        let mut grants = Vec::with_capacity(items.len());
        let mut acks = Vec::new();
        let mut started = Vec::new();
        let mut reprepare = Vec::new();
        for item in items {
            let txn = item.txn;
            let first = match seq.granted(txn) {
                Some(first) => first,
                // Its deltas never reached the holders its rings gained since.
                None if item.epoch < seq.ring_epoch && !item.pages.is_empty() => {
                    reprepare.push(txn);
                    continue;
                }
                // Copies are being made: asked again every tick, granted once settled.
                None if seq.seeding.is_some() => continue,
                None => {
                    let count = item.count.max(1);
                    let first = seq.grant(txn, count);
                    started.push((txn, first, count, item));
                    first
                }
            };
            grants.push((txn, first));
            if seq.completed.contains(&txn) {
                acks.push(txn);
            }
        }
        if !grants.is_empty() {
            self.send(from, Msg::TsGrant { grants });
        }
        if !reprepare.is_empty() {
            self.send(from, Msg::Reprepare { txns: reprepare });
        }
        for txn in acks {
            self.send(from, Msg::CompleteAck { txn });
        }
        for (txn, first, count, item) in started {
            self.start_installing(from, txn, first, count, item);
        }
    }

    fn start_installing(
        &mut self,
        coordinator: NodeId,
        txn: TxnId,
        first: u64,
        count: u64,
        item: TsItem,
    ) {
        let mut holders = BTreeSet::new();
        let mut homes = BTreeSet::new();
        let forced_pages = item.forced.iter().map(|delta| delta.page);
        for page in item.pages.iter().copied().chain(forced_pages) {
            let page_holders = self.view.holders(page);
            match page_holders.first() {
                Some(home) => homes.insert(*home),
                None => {
                    self.report_data_lost();
                    continue;
                }
            };
            holders.extend(page_holders);
        }
        // Broken on purpose: counted complete once the homes have it; the backups get it
        // after that (`trailing`).
        let (waiting, trailing) = match self.config.broken_ack_before_backup {
            true => {
                let backups = holders.difference(&homes).copied().collect();
                (homes, backups)
            }
            false => (holders, BTreeSet::new()),
        };
        let installing = Installing {
            coordinator,
            first,
            count,
            effects: item.effects,
            forced: item.forced,
            waiting,
            trailing,
        };
        if let Some(seq) = &mut self.sequencer {
            seq.installing.insert(txn, installing);
        }
        self.send_commits(txn);
        self.complete_if_installed(txn);
    }

    /// `Commit` to every holder `txn` still waits for, each with the forced deltas it holds.
    fn send_commits(&mut self, txn: TxnId) {
        let Some(installing) = self
            .sequencer
            .as_ref()
            .and_then(|s| s.installing.get(&txn).or_else(|| s.trailing.get(&txn)))
        else {
            return;
        };
        let last = installing.first + installing.count - 1;
        let mut out = Vec::new();
        for holder in &installing.waiting {
            let forced = installing
                .forced
                .iter()
                .filter(|delta| self.view.holders(delta.page).contains(holder))
                .cloned()
                .collect();
            out.push((
                *holder,
                Msg::Commit {
                    txn,
                    first: installing.first,
                    last,
                    forced,
                },
            ));
        }
        for (to, msg) in out {
            self.send(to, msg);
        }
    }

    pub(super) fn sequencer_installed(&mut self, from: NodeId, txn: TxnId) {
        if let Some(seq) = self.sequencer.as_mut() {
            if let Some(installing) = seq.installing.get_mut(&txn) {
                installing.waiting.remove(&from);
            }
            if let Some(trailing) = seq.trailing.get_mut(&txn) {
                trailing.waiting.remove(&from);
                if trailing.waiting.is_empty() {
                    seq.trailing.remove(&txn);
                }
            }
        }
        self.complete_if_installed(txn);
    }

    fn complete_if_installed(&mut self, txn: TxnId) {
        let Some(seq) = &mut self.sequencer else {
            return;
        };
        if !seq
            .installing
            .get(&txn)
            .is_some_and(|installing| installing.waiting.is_empty())
        {
            return;
        }
        let Some(mut done) = seq.installing.remove(&txn) else {
            return;
        };
        let effects = std::mem::take(&mut done.effects);
        let coordinator = done.coordinator;
        let parked = Installing {
            coordinator,
            first: done.first,
            count: done.count,
            effects,
            forced: Vec::new(),
            waiting: BTreeSet::new(),
            trailing: BTreeSet::new(),
        };
        let applied = seq.complete(parked, txn);
        let ts = seq.watermark;
        if !done.trailing.is_empty() {
            done.waiting = std::mem::take(&mut done.trailing);
            seq.trailing.insert(txn, done);
            self.send_commits(txn);
        }
        self.send(coordinator, Msg::CompleteAck { txn });
        if !applied.is_empty() {
            self.done.extend(applied);
            if self.config.broadcast_watermark {
                let epoch = self.view.epoch();
                let live: Vec<NodeId> = self.view.live().collect();
                for node in live {
                    self.send(node, Msg::Watermark { ts, epoch });
                }
            } else {
                self.watermark = self.watermark.max(ts);
            }
        }
    }

    /// The transactions of dead coordinators that are granted and still being installed.
    pub(super) fn granted_of_dead(&self) -> Vec<TxnId> {
        let Some(seq) = &self.sequencer else {
            return Vec::new();
        };
        seq.installing
            .iter()
            .filter(|(_, installing)| !self.view.is_live(installing.coordinator))
            .map(|(txn, _)| *txn)
            .collect()
    }

    /// Node 0's part of `tick`: installs retried, silent nodes declared dead, the watermark
    /// repeated.
    pub(super) fn sequencer_tick(&mut self) {
        let Some(seq) = &mut self.sequencer else {
            return;
        };
        let installing: Vec<TxnId> = seq
            .installing
            .keys()
            .chain(seq.trailing.keys())
            .copied()
            .collect();
        let mut silent = Vec::new();
        if let Some(timeout_us) = self.config.failure_timeout_us {
            for node in self.view.live().filter(|node| *node != 0) {
                if let Some(at) = seq.last_heard_us.get_mut(node) {
                    let last = *at.get_or_insert(self.now_us);
                    if self.now_us.saturating_sub(last) > timeout_us {
                        silent.push(node);
                    }
                }
            }
        }
        let ts = seq.watermark;
        let mut seed = Vec::new();
        if let Some(round) = &mut seq.seeding {
            round.started |= seq.installing.is_empty();
            if round.started {
                seed.extend(round.waiting.iter().map(|node| (*node, round.epoch)));
            }
        }
        for (node, epoch) in seed {
            self.send(node, Msg::Seed { epoch });
        }
        for txn in installing {
            self.send_commits(txn);
        }
        for node in silent {
            self.declare_dead(node);
        }
        if self.config.broadcast_watermark {
            let epoch = self.view.epoch();
            let live: Vec<NodeId> = self.view.live().collect();
            for node in live {
                self.send(node, Msg::Watermark { ts, epoch });
            }
        }
    }

    /// Declares `node` dead in a new epoch (node 0 only; never itself): its installs are no
    /// longer waited for, everyone is sent the view, and this node applies it too.
    pub fn declare_dead(&mut self, node: NodeId) {
        if self.sequencer.is_none() || node == 0 || !self.view.is_live(node) {
            return;
        }
        let reachable: Vec<NodeId> = self.view.live().filter(|n| *n != node).collect();
        if !has_majority(reachable.len(), self.config.world) {
            self.stop_cut_off(reachable);
            return;
        }
        if !self.view.declare_dead(node) {
            return;
        }
        let epoch = self.view.epoch();
        tracing::warn!(
            "node {node} declared dead in view {epoch}: the run goes on without it, its pages \
             served by their backups"
        );
        let granted = self.sequencer.as_ref().map_or_else(Vec::new, |seq| {
            // Not applied yet, in the order they will be: installing ones complete after the
            // parked ones (whose timestamps are lower or whose turn comes first).
            let parked = seq
                .parked
                .values()
                .filter(|(_, _, _, coordinator)| *coordinator == node)
                .map(|(_, _, effects, _)| effects.clone());
            let mut installing: Vec<&Installing> = seq
                .installing
                .values()
                .filter(|installing| installing.coordinator == node)
                .collect();
            installing.sort_by_key(|installing| installing.first);
            parked
                .chain(installing.into_iter().map(|i| i.effects.clone()))
                .collect()
        });
        self.done.push(Done::NodeLost {
            node,
            epoch,
            granted,
        });
        self.report_data_lost();
        self.start_round();
        let mut txns = Vec::new();
        if let Some(seq) = &mut self.sequencer {
            for (txn, installing) in seq.installing.iter_mut() {
                installing.waiting.remove(&node);
                installing.trailing.remove(&node);
                txns.push(*txn);
            }
            for trailing in seq.trailing.values_mut() {
                trailing.waiting.remove(&node);
            }
            seq.trailing
                .retain(|_, trailing| !trailing.waiting.is_empty());
        }
        // Refused for good: every transaction of the dead node not granted yet.
        let granted = self.granted_of_dead();
        let everyone: Vec<NodeId> = (1..self.config.world).collect();
        for to in everyone {
            self.send_view(to);
        }
        self.on_view(&granted);
        for txn in txns {
            self.complete_if_installed(txn);
        }
    }

    /// Node 0 without a majority: stops granting, for good, and says so once.
    fn stop_cut_off(&mut self, reachable: Vec<NodeId>) {
        let world = self.config.world;
        let Some(seq) = &mut self.sequencer else {
            return;
        };
        if !std::mem::replace(&mut seq.cut_off, true) {
            tracing::error!(
                "node 0 reaches only nodes {reachable:?} of {world}: no majority, it stops \
                 committing"
            );
            self.done.push(Done::CutOff { reachable, world });
        }
    }

    /// Reports (once) a ring whose every member with a copy is dead: its pages are gone.
    fn report_data_lost(&mut self) {
        let Some(nodes) = self.view.lost_ring() else {
            return;
        };
        let epoch = self.view.epoch();
        let Some(seq) = &mut self.sequencer else {
            return;
        };
        if !std::mem::replace(&mut seq.data_lost_reported, true) {
            self.done.push(Done::DataLost { nodes, epoch });
        }
    }

    /// A new view: a copy round for it if a ring gained a member (one of an older view is
    /// dropped: the new round copies what that one did not get to).
    fn start_round(&mut self) {
        let epoch = self.view.epoch();
        let needs_copies = self.view.needs_copies();
        let live: BTreeSet<NodeId> = self.view.live().collect();
        let broken = self.config.broken_skip_copies;
        let Some(seq) = &mut self.sequencer else {
            return;
        };
        if !needs_copies {
            // Rings only lost members: nothing to copy; a round under way is not needed.
            seq.seeding = None;
            return;
        }
        seq.ring_epoch = epoch;
        if broken {
            // Broken on purpose: the new members count as full holders at once.
            self.view.settle();
            return;
        }
        seq.seeding = Some(Round {
            epoch,
            waiting: live,
            started: false,
        });
    }

    /// `Seeded{epoch}` from `from`: with every live node's, the view is settled.
    pub(super) fn sequencer_seeded(&mut self, from: NodeId, epoch: u64) {
        let Some(seq) = &mut self.sequencer else {
            return;
        };
        let Some(round) = seq.seeding.as_mut().filter(|round| round.epoch == epoch) else {
            return;
        };
        round.waiting.remove(&from);
        if !round.waiting.is_empty() {
            return;
        }
        seq.seeding = None;
        self.view.settle();
        let epoch = self.view.epoch();
        tracing::info!(
            "view {epoch}: every page has its {} holders again",
            self.view.replicas()
        );
        self.done.push(Done::Settled { epoch });
        let everyone: Vec<NodeId> = (1..self.config.world).collect();
        for to in everyone {
            self.send_view(to);
        }
        let granted = self.granted_of_dead();
        self.on_view(&granted);
    }
}

/// Whether `reachable` nodes of `world`, node 0 among them, may go on committing: at least
/// half of them (a tie goes to node 0's side, the only side that can commit).
pub(super) fn has_majority(reachable: usize, world: usize) -> bool {
    2 * reachable >= world
}
