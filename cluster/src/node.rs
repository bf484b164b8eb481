//! One cluster node's side of the commit protocol (`docs/CLUSTER.md`), as a sans-IO state
//! machine: messages and timer ticks in, messages and completed operations out. The same code
//! runs over the real transport and inside the deterministic simulation, which is why it owns
//! no thread, socket or clock (time comes in with `tick`).
//!
//! A node plays up to four roles:
//! - **holder** (`home.rs`) of the pages whose ring (`crate::view`) it is in: the first live
//!   holder of a page is its **home**, which serves reads and checks conflicts (intents,
//!   `dvm_engine::store::PageStore::prepare`); the others are **backups**, which keep the
//!   prepared deltas without a check. Every holder installs a commit's versions;
//! - **coordinator** of the endings of runners that ran on it (this file): `prepare` at every
//!   holder of the pages the runner stored to (refused on a conflict, and then aborted at every
//!   holder), then `finish`, which hands the transaction — its pages, exit record and effects —
//!   to node 0;
//! - **sequencer**, on node 0 only (`sequencer.rs`): decides each commit by granting its
//!   timestamps, then drives the installs at every live holder itself, so a commit's fate never
//!   depends on its coordinator surviving; advances the global watermark over the contiguous
//!   prefix of installed ranges and hands out their effects in timestamp order
//!   (`Done::Applied`);
//! - **membership**, on node 0 only (`sequencer.rs`): heartbeats, declaring a silent node dead
//!   in a new epoch, and sending the view to everyone; then, on every node, copying pages to
//!   the holders their rings gained (`seeding.rs`) until node 0 settles the view.
//!
//! Messages may be lost with their connection and so are retried on every `tick`; every
//! handler is idempotent, which is what makes retries safe:
//! - a holder remembers each transaction it decided (`decided`), so a repeated `Prepare`
//!   never prepares twice and a `Prepare` that arrives after its `Abort` is refused;
//! - the sequencer remembers each grant and refusal, so a repeated `TsRequest` gets the same
//!   answer;
//! - installs are keyed by transaction, so a repeated `Commit` installs once.
//!
//! Invariants (checked by the simulation against a serial execution):
//! - a timestamp is granted to exactly one transaction; granted timestamps are dense;
//! - the watermark passes `T` only after the transaction holding `T` installed at every holder
//!   live when it completed;
//! - of two transactions in flight storing a common byte, the later-prepared is refused;
//! - a transaction is granted only once every holder of its pages answered its prepare, so
//!   each holder has its deltas: if its home dies, the backup that becomes home checks new
//!   prepares against them as the intents were checked (`home.rs`);
//! - a node declared dead is fenced: every live node drops its messages once it has the view,
//!   node 0 (the only one that grants) at once.
//!
//! Not yet bounded (noted in `docs/CLUSTER.md`): `decided` and the sequencer's grants grow
//! with the number of transactions; they need a low-water mark from each coordinator.

mod home;
mod seeding;
mod sequencer;

use crate::msg::{Msg, PageDelta, TsItem};
pub use crate::view::{home_of, NodeId, View};
use dvm_engine::page::{PageSource, PAGE_BYTES};
use dvm_engine::store::{Conflict, ConflictWith, PageStore, TxnId};
use dvm_transport::verbs::published::PublishedTable;
use home::Held;
use seeding::SeedOut;
use sequencer::Sequencer;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: NodeId,
    pub world: usize,
    /// Nodes holding each page (1: no backup).
    pub replicas: usize,
    /// Node 0 declares a node dead after this long without a message from it (`None`: never;
    /// a runtime that treats any lost connection as the end of the run).
    pub failure_timeout_us: Option<u64>,
    /// A deliberately broken protocol, for showing that the simulation catches it: this home
    /// installs whatever it is asked to, without checking conflicts or holding intents.
    pub broken_skip_conflict_check: bool,
    /// Another: node 0 counts a commit as installed once its homes have it, and sends it to
    /// the backups once, never again (a commit acknowledged before its backup has it).
    pub broken_ack_before_backup: bool,
    /// Another: when a ring gains a member, node 0 counts it as a full holder at once, and no
    /// page is copied to it.
    pub broken_skip_copies: bool,
    /// The sequencer sends `Watermark` to every node each time it moves. A runtime that tells
    /// the nodes itself (with each batch of applied endings' changes) turns this off.
    pub broadcast_watermark: bool,
}

impl NodeConfig {
    /// A correct node of a `world`-node cluster, one holder per page, no failure detection.
    pub fn new(id: NodeId, world: usize) -> NodeConfig {
        NodeConfig {
            id,
            world,
            replicas: 1,
            failure_timeout_us: None,
            broken_skip_conflict_check: false,
            broken_ack_before_backup: false,
            broken_skip_copies: false,
            broadcast_watermark: true,
        }
    }
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
    /// `finish` is done: installed at every holder at `first..=last`, counted by node 0.
    Finished { txn: TxnId, first: u64 },
    /// On node 0: the effects of the range `first..=last`, in timestamp order.
    Applied {
        txn: TxnId,
        first: u64,
        last: u64,
        effects: Vec<u8>,
    },
    /// On node 0: `node` was declared dead; from `epoch` on its pages are served by their
    /// backups, and the runners it was running must run again elsewhere, except those whose
    /// commit node 0 had granted: node 0 finishes those, and `granted` holds their effects
    /// (in the order they will be handed out as `Applied`, after this).
    NodeLost {
        node: NodeId,
        epoch: u64,
        granted: Vec<Vec<u8>>,
    },
    /// On node 0: every node of a ring is dead (more nodes lost than `replicas - 1` of one
    /// ring): the pages they held are gone and the run cannot go on.
    DataLost { nodes: Vec<NodeId>, epoch: u64 },
    /// On node 0: declaring one more node dead would leave node 0 with fewer than half of
    /// the `world` nodes (`reachable`, itself included): it might be the one cut off, so it
    /// stops committing (no grant from now on) and the run cannot go on.
    CutOff {
        reachable: Vec<NodeId>,
        world: usize,
    },
    /// On node 0: every page's ring has its holders again, the new ones with their copies
    /// (`seeding.rs`): view `epoch` is settled and commits are granted again.
    Settled { epoch: u64 },
    /// This node learned that node 0 declared it dead: it has stopped and drops every message.
    Fenced { epoch: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum TxnState {
    Preparing {
        waiting: BTreeSet<NodeId>,
    },
    /// Prepared everywhere; waiting for `finish`.
    Prepared,
    /// Handed to node 0; waiting for its grant.
    AwaitTs,
    /// Node 0 answered the request with `Reprepare`: sending the deltas to the holders its
    /// pages' rings gained, then asking again.
    Restaging {
        waiting: BTreeSet<NodeId>,
    },
    /// Granted at `first`; node 0 installs it and acknowledges.
    Committed {
        first: u64,
    },
    /// Releasing what the holders keep, then reporting `outcome`.
    Aborting {
        outcome: AbortOutcome,
        waiting: BTreeSet<NodeId>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AbortOutcome {
    Refused(Conflict),
    /// A node it was preparing at died before answering: released, then prepared again in
    /// the new view, under the next attempt's id.
    Retry,
}

/// Bits of a transaction id that number the attempts of one prepare (`attempt_id`): the ids a
/// caller hands to `prepare` and `finish` keep them clear.
pub const ATTEMPT_SHIFT: u32 = 40;
const ATTEMPT_MASK: u64 = 0x7f << ATTEMPT_SHIFT;
/// Prepares of one transaction before it is refused as if it conflicted (each attempt needs a
/// node to die while it prepares).
const MAX_ATTEMPTS: u64 = 0x7f;

/// The id the caller gave a transaction, whatever attempt carries it now.
pub fn original_txn(txn: TxnId) -> TxnId {
    txn & !ATTEMPT_MASK
}

fn attempt_id(original: TxnId, attempt: u64) -> TxnId {
    original | (attempt << ATTEMPT_SHIFT)
}

struct Txn {
    /// The view its prepares were sent in (a holder ahead of it handles them by its own
    /// view; one behind waits until it has the view).
    epoch: u64,
    attempt: u64,
    snapshot_ts: u64,
    /// Every delta, to prepare again in a new view.
    deltas: Vec<PageDelta>,
    /// Conflict-checked deltas, by holder (every holder of each page gets it).
    checked: BTreeMap<NodeId, Vec<PageDelta>>,
    pages: Vec<u64>,
    forced: Vec<PageDelta>,
    count: u64,
    effects: Vec<u8>,
    state: TxnState,
}

pub struct Node {
    config: NodeConfig,
    view: View,
    /// Set once this node learned it was declared dead: it does nothing from then on.
    fenced: bool,
    /// Started again without the state it had (`restarted`): it acts on nothing until node 0
    /// has declared its former self dead, and then it is fenced.
    rejoining: bool,
    /// The last `tick`'s time: failure detection's clock.
    now_us: u64,
    store: Arc<PageStore>,
    pages: PageSource,
    /// Holder: transactions holding intents or staged deltas here, by transaction, and the
    /// staged ones by page (for the conflict check of a backup that became home).
    held: BTreeMap<TxnId, Held>,
    staged_pages: BTreeMap<u64, BTreeSet<TxnId>>,
    decided: BTreeMap<TxnId, home::Decided>,
    /// Coordinator: this node's endings in flight, by the id of their current attempt (and
    /// that id by the caller's, once an attempt was retried), and remote reads in flight.
    txns: BTreeMap<TxnId, Txn>,
    attempts: BTreeMap<TxnId, TxnId>,
    /// Prepares made again in a new view (for reports and tests).
    retried: u64,
    /// Granted-to-be transactions whose deltas went to holders their rings gained.
    restaged: u64,
    reads: BTreeMap<u64, (u64, u64)>,
    ts_batch: Vec<TsItem>,
    sequencer: Option<Sequencer>,
    /// This node's copies to new holders, in the round of the newest view that needed them.
    seeding: Option<SeedOut>,
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
    /// `store` holds the pages this node holds; `pages` is where their page memory comes from.
    pub fn new(config: NodeConfig, store: Arc<PageStore>, pages: PageSource) -> Node {
        let sequencer = (config.id == 0).then(|| Sequencer::new(config.world));
        Node {
            view: View::new(config.world, config.replicas),
            config,
            fenced: false,
            rejoining: false,
            now_us: 0,
            store,
            pages,
            held: BTreeMap::new(),
            staged_pages: BTreeMap::new(),
            decided: BTreeMap::new(),
            txns: BTreeMap::new(),
            attempts: BTreeMap::new(),
            retried: 0,
            restaged: 0,
            reads: BTreeMap::new(),
            ts_batch: Vec::new(),
            sequencer,
            seeding: None,
            watermark: 0,
            local: VecDeque::new(),
            outbox: Vec::new(),
            done: Vec::new(),
            published: None,
        }
    }

    /// The node `config.id` started again after a crash, with nothing of its state: it asks
    /// node 0 to declare the node it was dead, and serves no one meanwhile (an empty store
    /// must not answer for pages its former self held).
    pub fn restarted(config: NodeConfig, store: Arc<PageStore>, pages: PageSource) -> Node {
        let mut node = Node::new(config, store, pages);
        node.rejoining = node.config.id != 0;
        node
    }

    /// Publishes the newest version of every page this node installs (or serves) in `table`.
    pub fn set_published(&mut self, table: Option<Arc<PublishedTable>>) {
        self.published = table;
    }

    pub fn id(&self) -> NodeId {
        self.config.id
    }

    pub fn world(&self) -> usize {
        self.config.world
    }

    /// This node's view of who is alive.
    pub fn view(&self) -> &View {
        &self.view
    }

    /// Whether this node learned that it was declared dead.
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// The global watermark as this node last heard it: snapshots are taken here.
    pub fn watermark(&self) -> u64 {
        self.watermark
    }

    /// The holder's store.
    pub fn store(&self) -> &Arc<PageStore> {
        &self.store
    }

    /// Transactions this node holds intents or deltas for, undecided.
    pub fn held_count(&self) -> usize {
        self.held.len()
    }

    /// The transactions behind `held_count`, with their coordinators (for reports).
    pub fn held_txns(&self) -> Vec<(TxnId, NodeId)> {
        self.held
            .iter()
            .map(|(txn, held)| (*txn, held.coordinator()))
            .collect()
    }

    /// On the sequencer: committed transactions in commit order, with their first timestamps.
    pub fn commit_order(&self) -> Option<&[(TxnId, u64)]> {
        self.sequencer.as_ref().map(|seq| seq.applied.as_slice())
    }

    /// On the sequencer: the first timestamp granted to an attempt of the caller's `txn`, if
    /// one was granted (so it will commit, whatever becomes of its coordinator).
    pub fn granted(&self, txn: TxnId) -> Option<u64> {
        let seq = self.sequencer.as_ref()?;
        (0..=MAX_ATTEMPTS).find_map(|attempt| seq.granted(attempt_id(original_txn(txn), attempt)))
    }

    /// On node 0: whether pages are being copied to new holders (no grants meanwhile).
    pub fn copying(&self) -> bool {
        self.sequencer.as_ref().is_some_and(|seq| seq.copying())
    }

    /// Transactions whose deltas this node sent to new holders before node 0 granted them.
    pub fn restaged_prepares(&self) -> u64 {
        self.restaged
    }

    /// Prepares this node made again because a holder died before answering.
    pub fn retried_prepares(&self) -> u64 {
        self.retried
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
        self.reads.insert(req, (page, snapshot_ts));
        self.send_read(req, page, snapshot_ts);
        self.drain_local();
    }

    fn send_read(&mut self, req: u64, page: u64, snapshot_ts: u64) {
        // Any live holder has every version at or below the snapshot (`crate::view`); with
        // none, nothing can be read and node 0 reports the loss (`Done::DataLost`).
        if let Some(home) = self.view.home(page) {
            let msg = Msg::Read {
                req,
                page,
                snapshot_ts,
            };
            self.send(home, msg);
        }
    }

    /// Prepares the deltas of `txn`, made at `snapshot_ts`, at every holder of their pages; the
    /// answer comes as `Done::Prepare`. After an `Ok`, call `finish`; after an `Err`, nothing
    /// is held anywhere. If a holder dies before it answers, the prepare is released and made
    /// again in the new view, which the caller does not see: the same deltas at the same
    /// snapshot are what running the runner again would produce.
    pub fn prepare(&mut self, txn: TxnId, snapshot_ts: u64, deltas: Vec<PageDelta>) {
        debug_assert_eq!(original_txn(txn), txn, "txn {txn:#x} uses the attempt bits");
        let mut pages: Vec<u64> = deltas.iter().map(|delta| delta.page).collect();
        pages.sort_unstable();
        pages.dedup();
        let t = Txn {
            epoch: self.view.epoch(),
            attempt: 0,
            snapshot_ts,
            deltas,
            checked: BTreeMap::new(),
            pages,
            forced: Vec::new(),
            count: 1,
            effects: Vec::new(),
            state: TxnState::Prepared,
        };
        self.start_attempt(txn, t);
        self.drain_local();
    }

    /// Sends `t`'s prepares, in this node's view, under attempt `t.attempt` of `original`.
    fn start_attempt(&mut self, original: TxnId, mut t: Txn) {
        let txn = attempt_id(original, t.attempt);
        let mut checked: BTreeMap<NodeId, Vec<PageDelta>> = BTreeMap::new();
        let mut orphaned = false;
        for delta in &t.deltas {
            let holders = self.view.holders(delta.page);
            orphaned |= holders.is_empty();
            for holder in holders {
                checked.entry(holder).or_default().push(delta.clone());
            }
        }
        let waiting: BTreeSet<NodeId> = checked.keys().copied().collect();
        t.epoch = self.view.epoch();
        t.checked = checked;
        t.state = if orphaned || t.attempt > MAX_ATTEMPTS {
            // Every holder of a page is dead (node 0 reports the data lost), or nodes kept
            // dying under it: the commit cannot be made.
            let page = t.pages.first().copied().unwrap_or(0);
            TxnState::Aborting {
                outcome: AbortOutcome::Refused(Conflict {
                    key: page,
                    offset: 0,
                    with: ConflictWith::Prepared { txn },
                }),
                waiting,
            }
        } else if waiting.is_empty() {
            self.done.push(Done::Prepare {
                txn: original,
                result: Ok(()),
            });
            TxnState::Prepared
        } else {
            TxnState::Preparing { waiting }
        };
        if t.attempt > 0 {
            self.attempts.insert(original, txn);
        }
        self.txns.insert(txn, t);
        self.resend(txn);
        self.conclude_abort(txn);
    }

    /// The id of `original`'s current attempt.
    fn current(&self, original: TxnId) -> TxnId {
        self.attempts.get(&original).copied().unwrap_or(original)
    }

    /// Finishes `txn` — prepared, or never prepared (an ending that only publishes its exit
    /// record): `count` timestamps; prepared deltas installed at the first, `forced` at the
    /// last; `effects` handed out at node 0 in timestamp order. Answered by `Done::Finished`.
    pub fn finish(&mut self, txn: TxnId, forced: Vec<PageDelta>, count: u64, effects: Vec<u8>) {
        let epoch = self.view.epoch();
        let txn = self.current(txn);
        let t = self.txns.entry(txn).or_insert_with(|| Txn {
            epoch,
            attempt: 0,
            snapshot_ts: 0,
            deltas: Vec::new(),
            checked: BTreeMap::new(),
            pages: Vec::new(),
            forced: Vec::new(),
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

    /// Retries everything in flight (lost messages are lost with their connection), sends
    /// heartbeats, and on node 0 declares silent nodes dead. `now_us` is any monotonic clock.
    pub fn tick(&mut self, now_us: u64) {
        self.now_us = self.now_us.max(now_us);
        if self.fenced {
            return;
        }
        let reads: Vec<(u64, (u64, u64))> =
            self.reads.iter().map(|(req, read)| (*req, *read)).collect();
        for (req, (page, snapshot_ts)) in reads {
            self.send_read(req, page, snapshot_ts);
        }
        let txns: Vec<TxnId> = self.txns.keys().copied().collect();
        for txn in txns {
            self.resend(txn);
        }
        if self.rejoining {
            self.outbox.push((0, Msg::Rejoin));
        } else if self.config.id != 0 {
            let epoch = self.view.epoch();
            self.send(0, Msg::Heartbeat { epoch });
        }
        self.sequencer_tick();
        self.seed_tick();
        self.drain_local();
    }

    /// Handles a protocol message; `false` if `msg` is not one (the runtime's own messages).
    pub fn on_message(&mut self, from: NodeId, msg: Msg) -> bool {
        let handled = self.handle(from, msg);
        self.drain_local();
        handled
    }

    fn send(&mut self, to: NodeId, msg: Msg) {
        if to == self.config.id {
            self.local.push_back(msg);
        } else if self.view.is_live(to) || matches!(msg, Msg::View { .. }) {
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
            TxnState::Preparing { waiting } | TxnState::Restaging { waiting } => {
                for holder in waiting {
                    let deltas = t.checked.get(holder).cloned().unwrap_or_default();
                    out.push((
                        *holder,
                        Msg::Prepare {
                            txn,
                            epoch: t.epoch,
                            snapshot_ts: t.snapshot_ts,
                            deltas,
                        },
                    ));
                }
            }
            TxnState::Prepared => {}
            // Also once granted: node 0 answers a repeated request with the grant, and with
            // `CompleteAck` once installed, so a lost acknowledgement is asked for again.
            TxnState::AwaitTs | TxnState::Committed { .. } => self.ts_batch.push(TsItem {
                txn,
                epoch: t.epoch,
                count: t.count,
                pages: t.pages.clone(),
                forced: t.forced.clone(),
                effects: t.effects.clone(),
            }),
            TxnState::Aborting { waiting, .. } => {
                out.extend(waiting.iter().map(|holder| (*holder, Msg::Abort { txn })));
            }
        }
        for (to, msg) in out {
            self.send(to, msg);
        }
    }

    fn handle(&mut self, from: NodeId, msg: Msg) -> bool {
        if matches!(
            msg,
            Msg::RunTask { .. }
                | Msg::Control { .. }
                | Msg::ControlReply { .. }
                | Msg::Shutdown
                | Msg::NodeReport { .. }
                | Msg::ProfileSamples { .. }
                | Msg::Changes { .. }
                | Msg::Suspect { .. }
        ) {
            return false;
        }
        // Dropped by a fenced or rejoining node, like every other protocol message.
        if self.fenced {
            return true;
        }
        if self.rejoining {
            if let (0, Msg::View { epoch, dead, .. }) = (from, &msg) {
                // Only a view that names this node dead ends the wait (and fences it).
                if dead.contains(&(self.config.id as u64)) {
                    self.fenced = true;
                    self.done.push(Done::Fenced { epoch: *epoch });
                }
            }
            return true;
        }
        if !self.view.is_live(from) {
            // Fencing: nothing from a node declared dead is acted on. Node 0 tells it so.
            if self.sequencer.is_some() && matches!(msg, Msg::Heartbeat { .. } | Msg::Rejoin) {
                self.send_view(from);
            }
            return true;
        }
        if let Some(seq) = &mut self.sequencer {
            seq.heard(from, self.now_us);
        }
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
                epoch,
                snapshot_ts,
                deltas,
            } => self.home_prepare(from, txn, epoch, snapshot_ts, deltas),
            Msg::Commit {
                txn,
                first,
                last,
                forced,
            } => self.home_commit(from, txn, first, last, forced),
            Msg::Abort { txn } => self.home_abort(from, txn),
            Msg::Prepared { txn } => self.on_prepared(from, txn),
            Msg::Refused { txn, conflict } => self.on_refused(txn, conflict),
            Msg::Installed { txn } => self.sequencer_installed(from, txn),
            Msg::Aborted { txn } => self.on_aborted(from, txn),
            Msg::TsRequest { txns } => self.sequencer_request(from, txns),
            Msg::TsGrant { grants } => self.on_grants(grants),
            Msg::CompleteAck { txn } => self.on_complete_ack(txn),
            Msg::Watermark { ts, epoch } => {
                // A watermark of a newer view may count installs this node's view would look
                // for at a dead holder: wait for the view (node 0 sends it with heartbeats).
                if epoch <= self.view.epoch() {
                    self.watermark = self.watermark.max(ts);
                }
            }
            Msg::Heartbeat { epoch } => {
                if epoch < self.view.epoch() && self.sequencer.is_some() {
                    self.send_view(from);
                }
            }
            Msg::View {
                epoch,
                dead,
                settled,
                granted,
            } => {
                if from == 0 {
                    let nodes = |list: &[u64]| -> Vec<NodeId> {
                        list.iter()
                            .filter_map(|node| usize::try_from(*node).ok())
                            .collect()
                    };
                    if self.view.adopt(epoch, &nodes(&dead), &nodes(&settled)) {
                        self.on_view(&granted);
                    }
                }
            }
            Msg::Seed { epoch } => {
                if from == 0 {
                    self.on_seed(epoch);
                }
            }
            Msg::SeedPages {
                epoch,
                batch,
                pages,
            } => self.on_seed_pages(from, epoch, batch, pages),
            Msg::SeedAck { epoch, batch } => self.on_seed_ack(epoch, batch),
            Msg::Seeded { epoch } => self.sequencer_seeded(from, epoch),
            Msg::Reprepare { txns } => self.on_reprepare(txns),
            Msg::Rejoin => {
                if self.sequencer.is_some() {
                    self.declare_dead(from);
                    self.send_view(from);
                }
            }
            Msg::RunTask { .. }
            | Msg::Control { .. }
            | Msg::ControlReply { .. }
            | Msg::Shutdown
            | Msg::NodeReport { .. }
            | Msg::ProfileSamples { .. }
            | Msg::Changes { .. }
            | Msg::Suspect { .. } => return false,
        }
        true
    }

    fn send_view(&mut self, to: NodeId) {
        let msg = Msg::View {
            epoch: self.view.epoch(),
            dead: self.view.dead().iter().map(|node| *node as u64).collect(),
            settled: self
                .view
                .settled()
                .iter()
                .map(|node| *node as u64)
                .collect(),
            granted: self.granted_of_dead(),
        };
        self.send(to, msg);
    }

    /// A newer view was adopted (or, on node 0, made); `granted` as in `Msg::View`.
    fn on_view(&mut self, granted: &[TxnId]) {
        let epoch = self.view.epoch();
        if !self.view.is_live(self.config.id) {
            self.fenced = true;
            self.done.push(Done::Fenced { epoch });
            return;
        }
        // Coordinator: a transaction still waiting for a holder that died is released and
        // prepared again in this view (`AbortOutcome::Retry`). One fully prepared needs
        // nothing: its intents at a dead home are stood for by its staged deltas at the new
        // home (`home.rs`).
        let txns: Vec<TxnId> = self.txns.keys().copied().collect();
        for txn in txns {
            let live = |node: &NodeId| self.view.is_live(*node);
            let Some(t) = self.txns.get_mut(&txn) else {
                continue;
            };
            match &mut t.state {
                TxnState::Preparing { waiting } if !waiting.iter().all(live) => {
                    let waiting = t.checked.keys().copied().filter(live).collect();
                    t.state = TxnState::Aborting {
                        outcome: AbortOutcome::Retry,
                        waiting,
                    };
                    self.resend(txn);
                }
                TxnState::Aborting { waiting, .. } => waiting.retain(live),
                TxnState::Restaging { waiting } => {
                    waiting.retain(live);
                    self.restaged(txn);
                }
                _ => {}
            }
            self.conclude_abort(txn);
        }
        self.home_on_view(granted);
    }

    // ---- coordinator ----

    fn on_prepared(&mut self, from: NodeId, txn: TxnId) {
        let Some(t) = self.txns.get_mut(&txn) else {
            return;
        };
        if let TxnState::Restaging { waiting } = &mut t.state {
            waiting.remove(&from);
            self.restaged(txn);
            return;
        }
        if let TxnState::Preparing { waiting } = &mut t.state {
            waiting.remove(&from);
            if waiting.is_empty() {
                t.state = TxnState::Prepared;
                self.done.push(Done::Prepare {
                    txn: original_txn(txn),
                    result: Ok(()),
                });
            }
        }
    }

    /// Node 0 will not grant these before their deltas reach the holders their pages' rings
    /// gained (`seeding.rs`): those are sent, as to any backup, in this node's view.
    fn on_reprepare(&mut self, txns: Vec<TxnId>) {
        for txn in txns {
            let epoch = self.view.epoch();
            let Some(t) = self.txns.get_mut(&txn) else {
                continue;
            };
            if t.state != TxnState::AwaitTs || t.epoch >= epoch {
                // Already restaged in this view (a repeated answer), or not waiting for a
                // grant: the next request carries this view.
                continue;
            }
            let mut waiting = BTreeSet::new();
            for delta in &t.deltas {
                for holder in self.view.holders(delta.page) {
                    let deltas = t.checked.entry(holder).or_default();
                    if !deltas.iter().any(|sent| sent.page == delta.page) {
                        waiting.insert(holder);
                        deltas.push(delta.clone());
                    }
                }
            }
            t.epoch = epoch;
            self.restaged += u64::from(!waiting.is_empty());
            t.state = TxnState::Restaging { waiting };
            self.resend(txn);
            self.restaged(txn);
        }
    }

    /// A restaged transaction every new holder answered asks node 0 again.
    fn restaged(&mut self, txn: TxnId) {
        let Some(t) = self.txns.get_mut(&txn) else {
            return;
        };
        if matches!(&t.state, TxnState::Restaging { waiting } if waiting.is_empty()) {
            t.state = TxnState::AwaitTs;
            self.resend(txn);
        }
    }

    fn on_refused(&mut self, txn: TxnId, conflict: Conflict) {
        let Some(t) = self.txns.get_mut(&txn) else {
            return;
        };
        if let TxnState::Restaging { waiting } = &mut t.state {
            // Only a home refuses, and a new holder is home only when every holder with a
            // copy is dead: node 0 has reported the pages lost.
            tracing::warn!("txn {txn:#x}: a new holder refused its deltas ({conflict})");
            waiting.clear();
            self.restaged(txn);
            return;
        }
        if matches!(t.state, TxnState::Preparing { .. }) {
            let view = &self.view;
            let waiting = t
                .checked
                .keys()
                .copied()
                .filter(|n| view.is_live(*n))
                .collect();
            t.state = TxnState::Aborting {
                outcome: AbortOutcome::Refused(conflict),
                waiting,
            };
            self.resend(txn);
        }
    }

    fn on_grants(&mut self, grants: Vec<(TxnId, u64)>) {
        for (txn, first) in grants {
            let Some(t) = self.txns.get_mut(&txn) else {
                continue;
            };
            if t.state == TxnState::AwaitTs && first != 0 {
                t.state = TxnState::Committed { first };
            }
        }
    }

    fn on_aborted(&mut self, from: NodeId, txn: TxnId) {
        if let Some(Txn {
            state: TxnState::Aborting { waiting, .. },
            ..
        }) = self.txns.get_mut(&txn)
        {
            waiting.remove(&from);
        }
        self.conclude_abort(txn);
    }

    /// Reports an abort once every live holder released the transaction, or prepares it
    /// again if it was released for a retry.
    fn conclude_abort(&mut self, txn: TxnId) {
        let Some(Txn {
            state: TxnState::Aborting { outcome, waiting },
            ..
        }) = self.txns.get(&txn)
        else {
            return;
        };
        if !waiting.is_empty() {
            return;
        }
        let outcome = *outcome;
        let Some(mut t) = self.txns.remove(&txn) else {
            return;
        };
        let original = original_txn(txn);
        match outcome {
            AbortOutcome::Refused(conflict) => {
                self.attempts.remove(&original);
                self.done.push(Done::Prepare {
                    txn: original,
                    result: Err(conflict),
                });
            }
            AbortOutcome::Retry => {
                t.attempt += 1;
                self.retried += 1;
                self.start_attempt(original, t);
            }
        }
    }

    fn on_complete_ack(&mut self, txn: TxnId) {
        if let Some(Txn {
            state: TxnState::Committed { first },
            ..
        }) = self.txns.get(&txn)
        {
            let first = *first;
            self.txns.remove(&txn);
            let original = original_txn(txn);
            self.attempts.remove(&original);
            self.done.push(Done::Finished {
                txn: original,
                first,
            });
        }
    }
}
