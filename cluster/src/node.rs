//! One cluster node's side of the commit protocol (`docs/CLUSTER.md`), as a sans-IO state
//! machine: messages and timer ticks in, messages and completed operations out. The same code
//! runs over the real transport and inside the deterministic simulation, which is why it owns
//! no thread, socket or clock.
//!
//! A node plays three roles:
//! - **home** of the pages `home_of` gives it: serves reads at a snapshot, prepares (intents,
//!   conflict check — `dvm_engine::store::PageStore::prepare`), commits at a timestamp, aborts;
//! - **coordinator** of the endings of runners that ran on it, in two calls: `prepare` (at
//!   every home of a page the runner stored to; refused on a conflict, and then aborted at
//!   every home), then `finish` (timestamps from the sequencer, commit at every home — prepared
//!   deltas at the first timestamp, the exit record at the last — and completion, with the
//!   ending's effects, to the sequencer);
//! - **sequencer**, on node 0 only: allocates timestamps (batched requests), tracks completed
//!   timestamp ranges, advances the global watermark over their contiguous prefix, and hands
//!   the effects of each range out in timestamp order (`Done::Applied`).
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
use dvm_engine::store::{
    Conflict, ConflictWith, PageBytes, PageStore, PageWrite, Publication, TxnId,
};
use dvm_transport::verbs::published::PublishedTable;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

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
    /// The sequencer sends `Watermark` to every node each time it moves. A runtime that tells
    /// the nodes itself (with each batch of applied endings' changes) turns this off.
    pub broadcast_watermark: bool,
}

/// What a node tells its runners (or the simulation driving it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Done {
    Read {
        req: u64,
        page: u64,
        version_ts: u64,
        valid_to: u64,
        data: Option<Box<[u8; PAGE_BYTES]>>,
    },
    /// `prepare` answered: intents held at every home, or refused (and every intent removed).
    Prepare {
        txn: TxnId,
        result: Result<(), Conflict>,
    },
    /// `finish` is done: installed at every home at `first..=last`, completion acknowledged.
    Finished { txn: TxnId, first: u64 },
    /// On node 0: the effects of the range `first..=last`, in timestamp order.
    Applied {
        txn: TxnId,
        first: u64,
        last: u64,
        effects: Vec<u8>,
    },
}

/// What a home decided about a transaction; kept so that retried messages get the same answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decided {
    Committed,
    Refused(Conflict),
    Aborted,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum TxnState {
    Preparing {
        waiting: BTreeSet<NodeId>,
    },
    /// Prepared everywhere; waiting for `finish`.
    Prepared,
    AwaitTs,
    Committing {
        first: u64,
        waiting: BTreeSet<NodeId>,
    },
    Completing {
        first: u64,
    },
    Aborting {
        conflict: Conflict,
        waiting: BTreeSet<NodeId>,
    },
}

struct Txn {
    snapshot_ts: u64,
    /// Conflict-checked deltas, by home.
    checked: BTreeMap<NodeId, Vec<PageDelta>>,
    /// Exit-record deltas, installed at the last timestamp without a check, by home.
    forced: BTreeMap<NodeId, Vec<PageDelta>>,
    count: u64,
    effects: Vec<u8>,
    state: TxnState,
}

impl Txn {
    fn homes(&self) -> BTreeSet<NodeId> {
        self.checked
            .keys()
            .chain(self.forced.keys())
            .copied()
            .collect()
    }
}

#[derive(Default)]
struct Sequencer {
    next_ts: u64,
    /// Every grant, so that a retried request gets the same timestamps.
    grants: BTreeMap<TxnId, (u64, u64)>,
    /// Completed ranges above the watermark: first -> (count, transaction, effects).
    parked: BTreeMap<u64, (u64, TxnId, Vec<u8>)>,
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

    /// Records a completion; returns the ranges that passed the watermark, in order.
    fn complete(&mut self, txn: TxnId, first: u64, count: u64, effects: Vec<u8>) -> Vec<Done> {
        if self.grants.get(&txn) != Some(&(first, count)) || !self.completed.insert(txn) {
            return Vec::new();
        }
        self.parked.insert(first, (count, txn, effects));
        let mut applied = Vec::new();
        while let Some((count, txn, effects)) = self.parked.remove(&(self.watermark + 1)) {
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

pub struct Node {
    config: NodeConfig,
    store: Arc<PageStore>,
    pages: PageSource,
    /// Home: transactions holding intents here, and what was decided.
    prepared: BTreeMap<TxnId, Vec<PageWrite>>,
    decided: BTreeMap<TxnId, Decided>,
    /// Coordinator: this node's endings in flight, and remote reads in flight.
    txns: BTreeMap<TxnId, Txn>,
    reads: BTreeMap<u64, (NodeId, u64, u64)>,
    ts_batch: Vec<(TxnId, u64)>,
    sequencer: Option<Sequencer>,
    watermark: u64,
    local: VecDeque<Msg>,
    outbox: Vec<(NodeId, Msg)>,
    done: Vec<Done>,
    /// Home, over RDMA: the table peers READ page versions from (`docs/CLUSTER.md`, "One-sided
    /// page reads"). Every install of a page republishes its newest version before the
    /// install is acknowledged.
    published: Option<Arc<PublishedTable>>,
}

impl Node {
    /// `store` holds the pages this node homes; `pages` is where their page memory comes from.
    pub fn new(config: NodeConfig, store: Arc<PageStore>, pages: PageSource) -> Node {
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
            published: None,
        }
    }

    /// Publishes the newest version of every page this node installs (or serves) in `table`.
    pub fn set_published(&mut self, table: Option<Arc<PublishedTable>>) {
        self.published = table;
    }

    /// Writes `page`'s newest installed version into the published table (or that it has
    /// none: zeros, at timestamp 0). The store is read under the table's lock, so of two
    /// publications of a page the later one read the store later: the slot never goes back to
    /// a version older than one already installed and published.
    fn publish_newest(&self, page: u64) {
        if let Some(table) = &self.published {
            table.publish_with(page, || {
                Some(match self.store.read_version(page, u64::MAX).version {
                    Some((ts, data)) => (ts, Some(data)),
                    None => (0, None),
                })
            });
        }
    }

    pub fn id(&self) -> NodeId {
        self.config.id
    }

    pub fn world(&self) -> usize {
        self.config.world
    }

    /// The global watermark as this node last heard it: snapshots are taken here.
    pub fn watermark(&self) -> u64 {
        self.watermark
    }

    /// The home's store.
    pub fn store(&self) -> &Arc<PageStore> {
        &self.store
    }

    /// On the sequencer: committed transactions in commit order, with their first timestamps.
    pub fn commit_order(&self) -> Option<&[(TxnId, u64)]> {
        self.sequencer.as_ref().map(|seq| seq.applied.as_slice())
    }

    /// Endings this node coordinates that have not finished (for progress reports and tests).
    pub fn in_flight(&self) -> usize {
        self.txns.len()
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

    /// Prepares the deltas of `txn`, made at `snapshot_ts`, at their homes; the answer comes as
    /// `Done::Prepare`. After an `Ok`, call `finish`; after an `Err`, nothing is held anywhere.
    pub fn prepare(&mut self, txn: TxnId, snapshot_ts: u64, deltas: Vec<PageDelta>) {
        let checked = self.by_home(deltas);
        let waiting: BTreeSet<NodeId> = checked.keys().copied().collect();
        let state = if waiting.is_empty() {
            self.done.push(Done::Prepare {
                txn,
                result: Ok(()),
            });
            TxnState::Prepared
        } else {
            TxnState::Preparing { waiting }
        };
        let t = Txn {
            snapshot_ts,
            checked,
            forced: BTreeMap::new(),
            count: 1,
            effects: Vec::new(),
            state,
        };
        self.txns.insert(txn, t);
        self.resend(txn);
        self.drain_local();
    }

    /// Finishes `txn` — prepared, or never prepared (an ending that only publishes its exit
    /// record): `count` timestamps; prepared deltas installed at the first, `forced` at the
    /// last; `effects` handed out at node 0 in timestamp order. Answered by `Done::Finished`.
    pub fn finish(&mut self, txn: TxnId, forced: Vec<PageDelta>, count: u64, effects: Vec<u8>) {
        let forced = self.by_home(forced);
        let t = self.txns.entry(txn).or_insert_with(|| Txn {
            snapshot_ts: 0,
            checked: BTreeMap::new(),
            forced: BTreeMap::new(),
            count: 1,
            effects: Vec::new(),
            state: TxnState::Prepared,
        });
        if t.state != TxnState::Prepared {
            debug_assert!(false, "finish of txn {txn} in state {:?}", t.state);
            return;
        }
        t.forced = forced;
        t.count = count.max(1);
        t.effects = effects;
        t.state = TxnState::AwaitTs;
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
        if let Some(seq) = self
            .sequencer
            .as_ref()
            .filter(|_| self.config.broadcast_watermark)
        {
            let ts = seq.watermark;
            for node in 0..self.config.world {
                self.send(node, Msg::Watermark { ts });
            }
        }
        self.drain_local();
    }

    /// Handles a protocol message; `false` if `msg` is not one (the runtime's own messages).
    pub fn on_message(&mut self, from: NodeId, msg: Msg) -> bool {
        let handled = self.handle(from, msg);
        self.drain_local();
        handled
    }

    fn by_home(&self, deltas: Vec<PageDelta>) -> BTreeMap<NodeId, Vec<PageDelta>> {
        let mut by_home: BTreeMap<NodeId, Vec<PageDelta>> = BTreeMap::new();
        for delta in deltas {
            by_home
                .entry(home_of(delta.page, self.config.world))
                .or_default()
                .push(delta);
        }
        by_home
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
                    let deltas = t.checked.get(home).cloned().unwrap_or_default();
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
            TxnState::Prepared => {}
            TxnState::AwaitTs => self.ts_batch.push((txn, t.count)),
            TxnState::Committing { first, waiting } => {
                let last = first + t.count - 1;
                for home in waiting {
                    let forced = t.forced.get(home).cloned().unwrap_or_default();
                    out.push((
                        *home,
                        Msg::Commit {
                            txn,
                            first: *first,
                            last,
                            forced,
                        },
                    ));
                }
            }
            TxnState::Completing { first } => {
                let (first, count, effects) = (*first, t.count, t.effects.clone());
                out.push((
                    0,
                    Msg::Complete {
                        txn,
                        first,
                        count,
                        effects,
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

    fn handle(&mut self, from: NodeId, msg: Msg) -> bool {
        match msg {
            Msg::Read {
                req,
                page,
                snapshot_ts,
            } => self.home_read(from, req, page, snapshot_ts),
            Msg::ReadReply {
                req,
                page,
                version_ts,
                valid_to,
                data,
            } => {
                if self.reads.remove(&req).is_some() {
                    self.done.push(Done::Read {
                        req,
                        page,
                        version_ts,
                        valid_to,
                        data,
                    });
                }
            }
            Msg::Prepare {
                txn,
                snapshot_ts,
                deltas,
            } => self.home_prepare(from, txn, snapshot_ts, deltas),
            Msg::Commit {
                txn,
                first,
                last,
                forced,
            } => self.home_commit(from, txn, first, last, forced),
            Msg::Abort { txn } => self.home_abort(from, txn),
            Msg::Prepared { txn } => self.on_prepared(from, txn),
            Msg::Refused { txn, conflict } => self.on_refused(txn, conflict),
            Msg::Installed { txn } => self.on_installed(from, txn),
            Msg::Aborted { txn } => self.on_aborted(from, txn),
            Msg::TsRequest { txns } => self.sequencer_grant(from, txns),
            Msg::TsGrant { grants } => self.on_grants(grants),
            Msg::Complete {
                txn,
                first,
                count,
                effects,
            } => self.sequencer_complete(from, txn, first, count, effects),
            Msg::CompleteAck { txn } => self.on_complete_ack(txn),
            Msg::Watermark { ts } => self.watermark = self.watermark.max(ts),
            Msg::RunTask { .. }
            | Msg::Control { .. }
            | Msg::ControlReply { .. }
            | Msg::Shutdown
            | Msg::NodeReport { .. }
            | Msg::ProfileSamples { .. }
            | Msg::Changes { .. } => return false,
        }
        true
    }

    // ---- home ----

    fn home_read(&mut self, from: NodeId, req: u64, page: u64, snapshot_ts: u64) {
        // Pages loaded at timestamp 0 are published when first asked for, so the next reader
        // of this page (on any node) READs it.
        self.publish_newest(page);
        let found = self.store.read_version(page, snapshot_ts);
        // Every timestamp at or below the watermark is installed here, so with no newer
        // version installed, none can appear at or below it.
        let valid_to = match found.next_ts {
            Some(next) => next - 1,
            None => snapshot_ts.max(self.watermark),
        };
        let (version_ts, data) = match found.version {
            Some((ts, data)) => (ts, Some(data)),
            None => (0, None),
        };
        let msg = Msg::ReadReply {
            req,
            page,
            version_ts,
            valid_to,
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
                    self.prepared.insert(txn, writes);
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

    /// Page writes of deltas: zeros with the stored bytes in place (only those are installed).
    fn writes_of(&self, txn: TxnId, deltas: &[PageDelta]) -> Result<Vec<PageWrite>, Conflict> {
        let mut writes = Vec::with_capacity(deltas.len());
        for delta in deltas {
            // Out of page memory at a home: the commit cannot be held, so it is refused as if
            // it conflicted with itself at the page's first byte.
            let mut data = self.pages.zeroed().map_err(|_| Conflict {
                key: delta.page,
                offset: 0,
                with: ConflictWith::Prepared { txn },
            })?;
            delta.to_page(&mut data);
            writes.push(PageWrite {
                key: delta.page,
                data,
                stored: delta.mask.clone(),
            });
        }
        Ok(writes)
    }

    fn prepare_here(
        &self,
        txn: TxnId,
        snapshot_ts: u64,
        deltas: &[PageDelta],
    ) -> Result<Vec<PageWrite>, Conflict> {
        let writes = self.writes_of(txn, deltas)?;
        if !self.config.broken_skip_conflict_check {
            self.store.prepare(txn, snapshot_ts, &writes)?;
        }
        Ok(writes)
    }

    fn home_commit(
        &mut self,
        from: NodeId,
        txn: TxnId,
        first: u64,
        last: u64,
        forced: Vec<PageDelta>,
    ) {
        match self.decided.get(&txn) {
            Some(Decided::Committed) => {}
            Some(_) => {
                debug_assert!(false, "commit of txn {txn}, refused or aborted here");
                return;
            }
            None => {
                let mut installed: Vec<u64> = forced.iter().map(|delta| delta.page).collect();
                if let Some(writes) = self.prepared.remove(&txn) {
                    installed.extend(writes.iter().map(|write| write.key));
                    if self.config.broken_skip_conflict_check {
                        for write in writes {
                            self.store.publish(
                                first,
                                Publication::Page {
                                    write,
                                    base_ts: None,
                                },
                                &self.pages,
                            );
                        }
                    } else {
                        self.store.commit(txn, None, first, writes, &self.pages);
                    }
                }
                // An exit record: a few bytes go without a page; if the page memory a larger
                // one needs cannot be had, the record is lost but the run goes on (as on one
                // node).
                for delta in &forced {
                    let publication =
                        match PageBytes::from_mask(delta.page, &delta.mask, &delta.bytes) {
                            Some(bytes) => Publication::Bytes(bytes),
                            None => match self.writes_of(txn, std::slice::from_ref(delta)) {
                                Ok(mut writes) if writes.len() == 1 => Publication::Page {
                                    write: writes.remove(0),
                                    base_ts: None,
                                },
                                _ => continue,
                            },
                        };
                    self.store.publish(last, publication, &self.pages);
                }
                // Before `Installed` leaves: a snapshot that includes this commit is taken
                // only after every home acknowledged it, so its readers find it published.
                installed.sort_unstable();
                installed.dedup();
                for page in installed {
                    self.publish_newest(page);
                }
                self.decided.insert(txn, Decided::Committed);
            }
        }
        self.send(from, Msg::Installed { txn });
    }

    fn home_abort(&mut self, from: NodeId, txn: TxnId) {
        if let Some(writes) = self.prepared.remove(&txn) {
            if !self.config.broken_skip_conflict_check {
                self.store.abort(txn, writes.iter().map(|w| w.key));
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
                t.state = TxnState::Prepared;
                self.done.push(Done::Prepare {
                    txn,
                    result: Ok(()),
                });
            }
        }
    }

    fn on_refused(&mut self, txn: TxnId, conflict: Conflict) {
        let Some(t) = self.txns.get_mut(&txn) else {
            return;
        };
        if matches!(t.state, TxnState::Preparing { .. }) {
            let waiting = t.checked.keys().copied().collect();
            t.state = TxnState::Aborting { conflict, waiting };
            self.resend(txn);
        }
    }

    fn on_grants(&mut self, grants: Vec<(TxnId, u64)>) {
        for (txn, first) in grants {
            let Some(t) = self.txns.get_mut(&txn) else {
                continue;
            };
            if t.state == TxnState::AwaitTs {
                let waiting = t.homes();
                t.state = if waiting.is_empty() {
                    TxnState::Completing { first }
                } else {
                    TxnState::Committing { first, waiting }
                };
                self.resend(txn);
            }
        }
    }

    fn on_installed(&mut self, from: NodeId, txn: TxnId) {
        let Some(t) = self.txns.get_mut(&txn) else {
            return;
        };
        if let TxnState::Committing { first, waiting } = &mut t.state {
            waiting.remove(&from);
            if waiting.is_empty() {
                t.state = TxnState::Completing { first: *first };
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
                self.done.push(Done::Prepare {
                    txn,
                    result: Err(conflict),
                });
            }
        }
    }

    fn on_complete_ack(&mut self, txn: TxnId) {
        if let Some(Txn {
            state: TxnState::Completing { first },
            ..
        }) = self.txns.get(&txn)
        {
            let first = *first;
            self.txns.remove(&txn);
            self.done.push(Done::Finished { txn, first });
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

    fn sequencer_complete(
        &mut self,
        from: NodeId,
        txn: TxnId,
        first: u64,
        count: u64,
        effects: Vec<u8>,
    ) {
        let Some(seq) = &mut self.sequencer else {
            return;
        };
        let applied = seq.complete(txn, first, count, effects);
        let ts = seq.watermark;
        let acknowledged = seq.completed.contains(&txn);
        if acknowledged {
            self.send(from, Msg::CompleteAck { txn });
        }
        if !applied.is_empty() {
            self.done.extend(applied);
            if self.config.broadcast_watermark {
                for node in 0..self.config.world {
                    self.send(node, Msg::Watermark { ts });
                }
            } else {
                self.watermark = self.watermark.max(ts);
            }
        }
    }
}
