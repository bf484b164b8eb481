//! One cluster node's side of the commit protocol (`docs/CLUSTER.md`), as a sans-IO state
//! machine: messages and timer ticks in, messages and completed operations out. The same code
//! runs over the real transport and inside the deterministic simulation, which is why it owns
//! no thread, socket or clock.
//!
//! A node plays three roles:
//! - **home** of the pages `home_of` gives it: serves reads at a snapshot, prepares (intents,
//!   conflict check — `dvm_engine::store::PageStore::prepare`), commits at a timestamp, aborts;
//! - **coordinator** of the commits of runners that ended on it: prepare at every home, a
//!   timestamp from the sequencer, commit at every home, completion to the sequencer;
//! - **sequencer**, on node 0 only: allocates timestamps (batched requests), tracks completed
//!   timestamp ranges and advances the global watermark over their contiguous prefix.
//!
//! Messages may be lost with their connection and so are retried on every `tick`; every
//! handler is idempotent, which is what makes retries safe:
//! - a home remembers each transaction it decided (`decided`), so a repeated `Prepare` never
//!   prepares twice and a `Prepare` that arrives after its `Abort` is refused;
//! - the sequencer remembers each grant, so a repeated `TsRequest` gets the same timestamps;
//! - completions are keyed by transaction, so a repeated `Complete` counts once.
//!
//! Invariants (checked by the simulation against a serial execution):
//! - a timestamp is granted to exactly one transaction; granted timestamps are dense;
//! - the watermark passes `T` only after the transaction holding `T` installed at every home;
//! - of two transactions in flight storing a common byte, the later-prepared is refused.
//!
//! Not yet bounded (noted in `docs/CLUSTER.md`): `decided` and the sequencer's grants grow
//! with the number of transactions; they need a low-water mark from each coordinator.

use crate::msg::{Msg, PageDelta};
use dvm_engine::page::{PageSource, PAGE_BYTES};
use dvm_engine::store::{Conflict, PageStore, PageWrite, TxnId};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

pub type NodeId = usize;

/// The node that homes `page`: a hash of its 2 MiB chunk, so a chunk's pages live together.
pub fn home_of(page: u64, world: usize) -> NodeId {
    let chunk = page >> 9;
    let hash = chunk.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
    (hash % world.max(1) as u64) as NodeId
}

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: NodeId,
    pub world: usize,
    /// A deliberately broken protocol, for showing that the simulation catches it: this home
    /// installs whatever it is asked to, without checking conflicts or holding intents.
    pub broken_skip_conflict_check: bool,
}

/// What a node tells its runners (or the simulation driving it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Done {
    Read {
        req: u64,
        page: u64,
        data: Option<Box<[u8; PAGE_BYTES]>>,
    },
    Commit {
        txn: TxnId,
        result: Result<u64, Conflict>,
    },
}

/// What a home decided about a transaction; kept so that retried messages get the same answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decided {
    Committed,
    Refused(Conflict),
    Aborted,
}

struct Prepared {
    writes: Vec<PageWrite>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum TxnState {
    Preparing {
        waiting: BTreeSet<NodeId>,
    },
    AwaitTs,
    Committing {
        ts: u64,
        waiting: BTreeSet<NodeId>,
    },
    Completing {
        ts: u64,
    },
    Aborting {
        conflict: Conflict,
        waiting: BTreeSet<NodeId>,
    },
}

struct Txn {
    snapshot_ts: u64,
    by_home: BTreeMap<NodeId, Vec<PageDelta>>,
    state: TxnState,
}

#[derive(Default)]
struct Sequencer {
    next_ts: u64,
    /// Every grant, so that a retried request gets the same timestamps.
    grants: BTreeMap<TxnId, (u64, u64)>,
    /// Completed ranges above the watermark: first -> (count, transaction).
    parked: BTreeMap<u64, (u64, TxnId)>,
    completed: BTreeSet<TxnId>,
    watermark: u64,
    /// Transactions in the order their ranges passed the watermark (commit order).
    applied: Vec<(TxnId, u64)>,
}

impl Sequencer {
    fn grant(&mut self, txn: TxnId, count: u64) -> u64 {
        let next_ts = &mut self.next_ts;
        self.grants
            .entry(txn)
            .or_insert_with(|| {
                let first = *next_ts + 1;
                *next_ts += count;
                (first, count)
            })
            .0
    }

    /// Records a completion; returns whether the watermark moved.
    fn complete(&mut self, txn: TxnId, first: u64, count: u64) -> bool {
        if self.grants.get(&txn) != Some(&(first, count)) || !self.completed.insert(txn) {
            return false;
        }
        self.parked.insert(first, (count, txn));
        let before = self.watermark;
        while let Some((count, txn)) = self.parked.remove(&(self.watermark + 1)) {
            self.applied.push((txn, self.watermark + 1));
            self.watermark += count;
        }
        self.watermark != before
    }
}

pub struct Node {
    config: NodeConfig,
    store: PageStore,
    pages: PageSource,
    /// Home: transactions holding intents here.
    prepared: BTreeMap<TxnId, Prepared>,
    decided: BTreeMap<TxnId, Decided>,
    /// Coordinator: this node's commits in flight, and remote reads in flight.
    txns: BTreeMap<TxnId, Txn>,
    reads: BTreeMap<u64, (NodeId, u64, u64)>,
    ts_batch: Vec<(TxnId, u64)>,
    sequencer: Option<Sequencer>,
    watermark: u64,
    local: VecDeque<Msg>,
    outbox: Vec<(NodeId, Msg)>,
    done: Vec<Done>,
}

impl Node {
    pub fn new(config: NodeConfig, pages: PageSource) -> Node {
        let store = PageStore::new();
        let sequencer = (config.id == 0).then(Sequencer::default);
        Node {
            config,
            store,
            pages,
            prepared: BTreeMap::new(),
            decided: BTreeMap::new(),
            txns: BTreeMap::new(),
            reads: BTreeMap::new(),
            ts_batch: Vec::new(),
            sequencer,
            watermark: 0,
            local: VecDeque::new(),
            outbox: Vec::new(),
            done: Vec::new(),
        }
    }

    pub fn id(&self) -> NodeId {
        self.config.id
    }

    /// The global watermark as this node last heard it: snapshots are taken here.
    pub fn watermark(&self) -> u64 {
        self.watermark
    }

    /// The home's store (for checks after a run).
    pub fn store(&self) -> &PageStore {
        &self.store
    }

    /// On the sequencer: committed transactions in commit order, with their timestamps.
    pub fn commit_order(&self) -> Option<&[(TxnId, u64)]> {
        self.sequencer.as_ref().map(|seq| seq.applied.as_slice())
    }

    pub fn take_outbox(&mut self) -> Vec<(NodeId, Msg)> {
        std::mem::take(&mut self.outbox)
    }

    pub fn take_done(&mut self) -> Vec<Done> {
        std::mem::take(&mut self.done)
    }

    /// Reads `page` at `snapshot_ts` from its home; the answer comes as `Done::Read`.
    pub fn read(&mut self, req: u64, page: u64, snapshot_ts: u64) {
        let home = home_of(page, self.config.world);
        self.reads.insert(req, (home, page, snapshot_ts));
        self.send(
            home,
            Msg::Read {
                req,
                page,
                snapshot_ts,
            },
        );
        self.drain_local();
    }

    /// Commits the deltas of `txn`, made at `snapshot_ts`; the answer comes as `Done::Commit`.
    pub fn commit(&mut self, txn: TxnId, snapshot_ts: u64, deltas: Vec<PageDelta>) {
        let mut by_home: BTreeMap<NodeId, Vec<PageDelta>> = BTreeMap::new();
        for delta in deltas {
            by_home
                .entry(home_of(delta.page, self.config.world))
                .or_default()
                .push(delta);
        }
        let waiting: BTreeSet<NodeId> = by_home.keys().copied().collect();
        let txn_state = Txn {
            snapshot_ts,
            by_home,
            state: TxnState::Preparing { waiting },
        };
        self.txns.insert(txn, txn_state);
        self.resend(txn);
        self.drain_local();
    }

    /// Retries everything in flight (lost messages are lost with their connection).
    pub fn tick(&mut self) {
        let reads: Vec<(u64, (NodeId, u64, u64))> =
            self.reads.iter().map(|(req, read)| (*req, *read)).collect();
        for (req, (home, page, snapshot_ts)) in reads {
            self.send(
                home,
                Msg::Read {
                    req,
                    page,
                    snapshot_ts,
                },
            );
        }
        let txns: Vec<TxnId> = self.txns.keys().copied().collect();
        for txn in txns {
            self.resend(txn);
        }
        if let Some(seq) = &self.sequencer {
            let ts = seq.watermark;
            for node in 0..self.config.world {
                self.send(node, Msg::Watermark { ts });
            }
        }
        self.drain_local();
    }

    pub fn on_message(&mut self, from: NodeId, msg: Msg) {
        self.handle(from, msg);
        self.drain_local();
    }

    fn send(&mut self, to: NodeId, msg: Msg) {
        if to == self.config.id {
            self.local.push_back(msg);
        } else {
            self.outbox.push((to, msg));
        }
    }

    fn drain_local(&mut self) {
        loop {
            while let Some(msg) = self.local.pop_front() {
                self.handle(self.config.id, msg);
            }
            if self.ts_batch.is_empty() {
                return;
            }
            let txns = std::mem::take(&mut self.ts_batch);
            self.send(0, Msg::TsRequest { txns });
        }
    }

    /// Sends what `txn`'s state waits for.
    fn resend(&mut self, txn: TxnId) {
        let Some(t) = self.txns.get(&txn) else { return };
        let mut out = Vec::new();
        match &t.state {
            TxnState::Preparing { waiting } => {
                for home in waiting {
                    let deltas = t.by_home.get(home).cloned().unwrap_or_default();
                    let snapshot_ts = t.snapshot_ts;
                    out.push((
                        *home,
                        Msg::Prepare {
                            txn,
                            snapshot_ts,
                            deltas,
                        },
                    ));
                }
            }
            TxnState::AwaitTs => self.ts_batch.push((txn, 1)),
            TxnState::Committing { ts, waiting } => {
                out.extend(
                    waiting
                        .iter()
                        .map(|home| (*home, Msg::Commit { txn, ts: *ts })),
                );
            }
            TxnState::Completing { ts } => {
                out.push((
                    0,
                    Msg::Complete {
                        txn,
                        first: *ts,
                        count: 1,
                    },
                ));
            }
            TxnState::Aborting { waiting, .. } => {
                out.extend(waiting.iter().map(|home| (*home, Msg::Abort { txn })));
            }
        }
        for (to, msg) in out {
            self.send(to, msg);
        }
    }

    fn handle(&mut self, from: NodeId, msg: Msg) {
        match msg {
            Msg::Read {
                req,
                page,
                snapshot_ts,
            } => self.home_read(from, req, page, snapshot_ts),
            Msg::ReadReply {
                req, page, data, ..
            } => {
                if self.reads.remove(&req).is_some() {
                    self.done.push(Done::Read { req, page, data });
                }
            }
            Msg::Prepare {
                txn,
                snapshot_ts,
                deltas,
            } => self.home_prepare(from, txn, snapshot_ts, deltas),
            Msg::Commit { txn, ts } => self.home_commit(from, txn, ts),
            Msg::Abort { txn } => self.home_abort(from, txn),
            Msg::Prepared { txn } => self.on_prepared(from, txn),
            Msg::Refused { txn, conflict } => self.on_refused(txn, conflict),
            Msg::Installed { txn } => self.on_installed(from, txn),
            Msg::Aborted { txn } => self.on_aborted(from, txn),
            Msg::TsRequest { txns } => self.sequencer_grant(from, txns),
            Msg::TsGrant { grants } => self.on_grants(grants),
            Msg::Complete { txn, first, count } => self.sequencer_complete(from, txn, first, count),
            Msg::CompleteAck { txn } => self.on_complete_ack(txn),
            Msg::Watermark { ts } => self.watermark = self.watermark.max(ts),
        }
    }

    // ---- home ----

    fn home_read(&mut self, from: NodeId, req: u64, page: u64, snapshot_ts: u64) {
        let (version_ts, data) = match self.store.read_version(page, snapshot_ts) {
            Some((ts, data)) => (ts, Some(Box::new(**data))),
            None => (0, None),
        };
        let msg = Msg::ReadReply {
            req,
            page,
            version_ts,
            data,
        };
        self.send(from, msg);
    }

    fn home_prepare(&mut self, from: NodeId, txn: TxnId, snapshot_ts: u64, deltas: Vec<PageDelta>) {
        let answer = match self.decided.get(&txn) {
            Some(Decided::Refused(conflict)) => Msg::Refused {
                txn,
                conflict: *conflict,
            },
            Some(Decided::Aborted) => Msg::Aborted { txn },
            Some(Decided::Committed) => Msg::Prepared { txn },
            None if self.prepared.contains_key(&txn) => Msg::Prepared { txn },
            None => match self.prepare_here(txn, snapshot_ts, &deltas) {
                Ok(writes) => {
                    self.prepared.insert(txn, Prepared { writes });
                    Msg::Prepared { txn }
                }
                Err(conflict) => {
                    self.decided.insert(txn, Decided::Refused(conflict));
                    Msg::Refused { txn, conflict }
                }
            },
        };
        self.send(from, answer);
    }

    fn prepare_here(
        &self,
        txn: TxnId,
        snapshot_ts: u64,
        deltas: &[PageDelta],
    ) -> Result<Vec<PageWrite>, Conflict> {
        let mut writes = Vec::with_capacity(deltas.len());
        for delta in deltas {
            // Out of page memory at a home: the commit cannot be held, so it is refused as if
            // it conflicted with itself at the page's first stored byte.
            let mut data = self.pages.zeroed().map_err(|_| Conflict {
                key: delta.page,
                offset: 0,
                with: dvm_engine::store::ConflictWith::Prepared { txn },
            })?;
            delta.to_page(&mut data);
            writes.push(PageWrite {
                key: delta.page,
                data,
                stored: delta.mask.clone(),
            });
        }
        if !self.config.broken_skip_conflict_check {
            self.store.prepare(txn, snapshot_ts, &writes)?;
        }
        Ok(writes)
    }

    fn home_commit(&mut self, from: NodeId, txn: TxnId, ts: u64) {
        if let Some(prepared) = self.prepared.remove(&txn) {
            if self.config.broken_skip_conflict_check {
                for write in prepared.writes {
                    self.store.publish(ts, None, write, &self.pages);
                }
            } else {
                self.store
                    .commit(txn, None, ts, prepared.writes, &self.pages);
            }
            self.decided.insert(txn, Decided::Committed);
        }
        if self.decided.get(&txn) == Some(&Decided::Committed) {
            self.send(from, Msg::Installed { txn });
        }
    }

    fn home_abort(&mut self, from: NodeId, txn: TxnId) {
        if let Some(prepared) = self.prepared.remove(&txn) {
            if !self.config.broken_skip_conflict_check {
                self.store.abort(txn, prepared.writes.iter().map(|w| w.key));
            }
        }
        debug_assert_ne!(self.decided.get(&txn), Some(&Decided::Committed));
        self.decided.entry(txn).or_insert(Decided::Aborted);
        self.send(from, Msg::Aborted { txn });
    }

    // ---- coordinator ----

    fn on_prepared(&mut self, from: NodeId, txn: TxnId) {
        let Some(t) = self.txns.get_mut(&txn) else {
            return;
        };
        if let TxnState::Preparing { waiting } = &mut t.state {
            waiting.remove(&from);
            if waiting.is_empty() {
                t.state = TxnState::AwaitTs;
                self.resend(txn);
            }
        }
    }

    fn on_refused(&mut self, txn: TxnId, conflict: Conflict) {
        let Some(t) = self.txns.get_mut(&txn) else {
            return;
        };
        if matches!(t.state, TxnState::Preparing { .. }) {
            let waiting = t.by_home.keys().copied().collect();
            t.state = TxnState::Aborting { conflict, waiting };
            self.resend(txn);
        }
    }

    fn on_grants(&mut self, grants: Vec<(TxnId, u64)>) {
        for (txn, ts) in grants {
            let Some(t) = self.txns.get_mut(&txn) else {
                continue;
            };
            if t.state == TxnState::AwaitTs {
                let waiting = t.by_home.keys().copied().collect();
                t.state = TxnState::Committing { ts, waiting };
                self.resend(txn);
            }
        }
    }

    fn on_installed(&mut self, from: NodeId, txn: TxnId) {
        let Some(t) = self.txns.get_mut(&txn) else {
            return;
        };
        if let TxnState::Committing { ts, waiting } = &mut t.state {
            waiting.remove(&from);
            if waiting.is_empty() {
                t.state = TxnState::Completing { ts: *ts };
                self.resend(txn);
            }
        }
    }

    fn on_aborted(&mut self, from: NodeId, txn: TxnId) {
        let Some(t) = self.txns.get_mut(&txn) else {
            return;
        };
        if let TxnState::Aborting { conflict, waiting } = &mut t.state {
            waiting.remove(&from);
            if waiting.is_empty() {
                let conflict = *conflict;
                self.txns.remove(&txn);
                self.done.push(Done::Commit {
                    txn,
                    result: Err(conflict),
                });
            }
        }
    }

    fn on_complete_ack(&mut self, txn: TxnId) {
        if let Some(Txn {
            state: TxnState::Completing { ts },
            ..
        }) = self.txns.get(&txn)
        {
            let ts = *ts;
            self.txns.remove(&txn);
            self.done.push(Done::Commit {
                txn,
                result: Ok(ts),
            });
        }
    }

    // ---- sequencer ----

    fn sequencer_grant(&mut self, from: NodeId, txns: Vec<(TxnId, u64)>) {
        let Some(seq) = &mut self.sequencer else {
            return;
        };
        let grants = txns
            .into_iter()
            .map(|(txn, count)| (txn, seq.grant(txn, count.max(1))))
            .collect();
        self.send(from, Msg::TsGrant { grants });
    }

    fn sequencer_complete(&mut self, from: NodeId, txn: TxnId, first: u64, count: u64) {
        let Some(seq) = &mut self.sequencer else {
            return;
        };
        let moved = seq.complete(txn, first, count);
        let ts = seq.watermark;
        if seq.completed.contains(&txn) {
            self.send(from, Msg::CompleteAck { txn });
        }
        if moved {
            for node in 0..self.config.world {
                self.send(node, Msg::Watermark { ts });
            }
        }
    }
}
