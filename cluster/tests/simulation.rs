//! Deterministic simulation of the cluster's commit protocol (`dvm_cluster::node`) on the
//! simulated network (`dvm_transport::sim`): 3–5 nodes, 1–3 holders per page, random delays,
//! reordering across connections, lost connections, and runners that read counters at a
//! snapshot and commit increments — contended on purpose. Two seeds in three also lose a node:
//! a crash of a random non-root node after a random number of delivered messages, or a
//! partition of one from node 0 (or from everyone), short (it must be survived without a
//! declaration) or long (it is declared dead and fenced while still running). The runners of a
//! lost node run again on another node, except those whose commit node 0 had granted (node 0
//! finishes those). Every run is checked against a serial execution in the sequencer's commit
//! order:
//! - the committed transactions are exactly those the runners saw commit, each once, with dense
//!   timestamps (no lost or duplicated commit);
//! - every read saw the serial state at its snapshot, and nothing was committed to a word it
//!   wrote between its snapshot and its commit (first committer wins: no lost update);
//! - every live holder's final state is the serial final state (exact counters), every
//!   runner's exit record (published after each ending, whatever its outcome, without a
//!   conflict check) holds its count of endings at every live holder, and no intent or held
//!   transaction is left on a live node;
//! - node 0 hands out the endings' effects in timestamp order, each once;
//! - a crashed node is declared dead, and without faults no node is.
//!
//! `DVM_SIM_SEEDS=N` sets how many seeds run (default 2000; `DVM_SIM_FIRST=F` starts at F);
//! `DVM_SIM_SEED=S` reruns one seed alone (`scripts/simulate` wraps both). A seed reproduces
//! its run exactly (same trace hash, same commit order).
#![allow(clippy::unwrap_used)]

use dvm_cluster::msg::{Msg, PageDelta};
use dvm_cluster::node::{original_txn, Done, Node, NodeConfig, NodeId};
use dvm_engine::page::{mark, MemoryAccount, PageSource, EMPTY_MASK, PAGE_BYTES};
use dvm_engine::store::PageStore;
use dvm_transport::sim::{SimConfig, SimEvent, SimNet};
use std::collections::BTreeMap;
use std::collections::BTreeSet;

/// A counter: (page, byte offset), 8 bytes little-endian.
type Word = (u64, usize);

const TICK_US: u64 = 5_000;
/// Node 0 declares a node dead after this long without hearing from it (40 ticks).
const FAILURE_TIMEOUT_US: u64 = 200_000;
const TIME_LIMIT_US: u64 = 120_000_000;
const TXNS_PER_RUNNER: u32 = 4;
const MAX_ATTEMPTS: u32 = 12;
/// Runner `r`'s exit record: the first word of page `EXIT_PAGE + r`.
const EXIT_PAGE: u64 = 0x3d0_0000_0000 >> 12;

fn pages() -> PageSource {
    let topology = dvm_numa::Topology::detect();
    let pool = dvm_numa::PagePool::new(&topology, 0, 1 << 20).expect("page pool");
    PageSource::new(pool, MemoryAccount::new(1 << 32))
}

/// The hot counters: 2 words on each of 2 pages in each of 4 chunks (so 4 homes' worth).
fn hot_words() -> Vec<Word> {
    let mut words = Vec::new();
    for chunk in 0..4u64 {
        for page in 0..2u64 {
            for offset in [0usize, 8] {
                words.push(((0x800_0000 >> 12) + chunk * 512 + page, offset));
            }
        }
    }
    words
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    txn: u64,
    snapshot: u64,
    ts: u64,
    reads: Vec<(Word, u64)>,
}

enum RunnerState {
    Reading {
        txn: u64,
        snapshot: u64,
        words: Vec<Word>,
        waiting: usize,
        got: BTreeMap<u64, Option<Box<[u8; PAGE_BYTES]>>>,
    },
    Preparing {
        txn: u64,
        snapshot: u64,
        reads: Vec<(Word, u64)>,
    },
    /// Finishing a transaction: committing (with the reads) or only publishing the exit record.
    Finishing {
        txn: u64,
        snapshot: u64,
        reads: Option<Vec<(Word, u64)>>,
    },
    Finished,
}

impl RunnerState {
    fn describe(&self) -> String {
        match self {
            RunnerState::Reading { txn, waiting, .. } => {
                format!("txn {txn} reading, {waiting} pages to come")
            }
            RunnerState::Preparing { txn, .. } => format!("txn {txn} preparing"),
            RunnerState::Finishing { txn, reads, .. } => {
                format!("txn {txn} finishing (commit: {})", reads.is_some())
            }
            RunnerState::Finished => "finished".into(),
        }
    }
}

struct Runner {
    node: NodeId,
    state: RunnerState,
    committed: u32,
    attempts: u32,
    endings: u64,
}

struct Sim {
    net: SimNet,
    nodes: Vec<Node>,
    configs: Vec<NodeConfig>,
    pages: PageSource,
    runners: Vec<Runner>,
    words: Vec<Word>,
    next_txn: u64,
    next_req: u64,
    req_owner: BTreeMap<u64, usize>,
    txn_owner: BTreeMap<u64, usize>,
    records: Vec<Record>,
    /// Every finished transaction's first timestamp and count (commits and publications).
    finished: BTreeMap<u64, (u64, u64)>,
    counts: BTreeMap<u64, u64>,
    /// Node 0's `Applied` hand-outs, in the order they came.
    applied: Vec<(u64, u64)>,
    gave_up: u64,
    refused: u64,
    fault: Fault,
    /// Events delivered so far (faults strike after a number of them).
    events: u64,
    crashed: BTreeSet<NodeId>,
    /// Nodes node 0 declared dead, in order.
    declared: Vec<NodeId>,
    /// Transactions of lost nodes that node 0 had granted: it finishes them; their runners
    /// go on when their effects are applied.
    orphans: BTreeMap<u64, usize>,
    /// Runs of runners again after a loss.
    rerun: u64,
    reported: std::collections::VecDeque<Done>,
    handling: bool,
    settled_views: u64,
    cut_off: bool,
}

/// What strikes a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    /// Crashes `node`, and with `restart_after_events`, starts it again later with nothing
    /// of its state (it must be fenced, never trusted with what its former self held).
    Crash {
        node: NodeId,
        after_events: u64,
        restart_after_events: Option<u64>,
    },
    /// Cuts `node` off from `from` (node 0, another non-root node, or everyone) for a while.
    Partition {
        node: NodeId,
        from: Cut,
        after_events: u64,
        duration_us: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cut {
    /// From node 0 only: its heartbeats stop reaching node 0.
    Root,
    /// From another non-root node only: node 0 hears it, the pair cannot talk (a link down).
    Peer(NodeId),
    Everyone,
}

/// A protocol broken on purpose, to show the checks catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Broken {
    No,
    SkipConflictCheck,
    AckBeforeBackup,
    SkipCopies,
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    trace_hash: u64,
    fault: Fault,
    order: Vec<(u64, u64)>,
    records: usize,
    refused: u64,
    connections_lost: u64,
    frames_dropped: u64,
    declared: Vec<NodeId>,
    rerun: u64,
    /// A crashed node was started again, fresh, and ended fenced.
    restarted: bool,
    /// Prepares made again in a new view, on live nodes.
    retried: u64,
    /// Views node 0 settled once new holders had their copies.
    settled: u64,
    /// Transactions whose deltas went to new holders before their grant.
    restaged: u64,
}

impl Sim {
    fn new(seed: u64, broken: Broken, pages: &PageSource) -> Sim {
        let mut probe = dvm_transport::sim::SimRng::new(seed ^ 0x5eed);
        let world = 3 + probe.below(3) as usize;
        let mut config = SimConfig::new(seed, world);
        config.min_delay_us = 20;
        config.max_delay_us = 20 + probe.below(3_000);
        config.loss_per_million = [0, 500, 5_000][probe.below(3) as usize];
        config.reconnect_delay_us = 2_000;
        let net = SimNet::new(config).expect("sim config");
        let victim = 1 + probe.below(world as u64 - 1) as usize;
        let after_events = 20 + probe.below(4_000);
        let peer = match (victim + 1) % world {
            0 => 1,
            other => other,
        };
        let fault = match probe.below(7) {
            0 | 1 => Fault::None,
            2 | 3 => Fault::Crash {
                node: victim,
                after_events,
                restart_after_events: match probe.below(2) {
                    0 => None,
                    _ => Some(after_events + 1 + probe.below(2_000)),
                },
            },
            kind => Fault::Partition {
                node: victim,
                from: match kind {
                    4 => Cut::Root,
                    5 => Cut::Everyone,
                    _ => Cut::Peer(peer),
                },
                after_events,
                // Half shorter than the failure timeout (survived in place), half longer.
                duration_us: [50_000, 150_000, 400_000, 1_000_000][probe.below(4) as usize],
            },
        };
        // One holder per page cannot survive a loss; with a fault, two or three.
        let replicas = match fault {
            Fault::None => 1 + probe.below(3) as usize,
            _ => 2 + probe.below(2) as usize,
        };
        let configs: Vec<NodeConfig> = (0..world)
            .map(|id| NodeConfig {
                replicas,
                failure_timeout_us: Some(FAILURE_TIMEOUT_US),
                broken_skip_conflict_check: broken == Broken::SkipConflictCheck && id == 1,
                broken_ack_before_backup: broken == Broken::AckBeforeBackup,
                broken_skip_copies: broken == Broken::SkipCopies,
                broadcast_watermark: true,
                ..NodeConfig::new(id, world)
            })
            .collect();
        let nodes = configs
            .iter()
            .map(|config| {
                let store = std::sync::Arc::new(PageStore::new());
                Node::new(config.clone(), store, pages.clone())
            })
            .collect();
        let per_node = 1 + probe.below(3) as usize;
        let runners = (0..world * per_node)
            .map(|index| Runner {
                node: index % world,
                state: RunnerState::Finished,
                committed: 0,
                attempts: 0,
                endings: 0,
            })
            .collect();
        Sim {
            net,
            nodes,
            configs,
            pages: pages.clone(),
            runners,
            words: hot_words(),
            next_txn: 1,
            next_req: 1,
            req_owner: BTreeMap::new(),
            txn_owner: BTreeMap::new(),
            records: Vec::new(),
            finished: BTreeMap::new(),
            counts: BTreeMap::new(),
            applied: Vec::new(),
            gave_up: 0,
            refused: 0,
            fault,
            events: 0,
            crashed: BTreeSet::new(),
            declared: Vec::new(),
            orphans: BTreeMap::new(),
            rerun: 0,
            reported: Default::default(),
            handling: false,
            settled_views: 0,
            cut_off: false,
        }
    }

    /// A node that neither crashed nor was declared dead.
    fn is_live(&self, node: NodeId) -> bool {
        !self.crashed.contains(&node) && !self.declared.contains(&node)
    }

    fn start(&mut self, runner: usize) {
        let node = self.runners[runner].node;
        let snapshot = self.nodes[node].watermark();
        // One to three distinct hot words; the first four are hotter still.
        let count = 1 + self.net.rng().below(3) as usize;
        let mut words: Vec<Word> = Vec::new();
        while words.len() < count {
            let range = if self.net.rng().below(2) == 0 {
                4
            } else {
                self.words.len()
            };
            let word = self.words[self.net.rng().below(range as u64) as usize];
            if !words.contains(&word) {
                words.push(word);
            }
        }
        words.sort_unstable();
        let txn = self.next_txn;
        self.next_txn += 1;
        let mut pages: Vec<u64> = words.iter().map(|(page, _)| *page).collect();
        pages.dedup();
        self.runners[runner].state = RunnerState::Reading {
            txn,
            snapshot,
            words,
            waiting: pages.len(),
            got: BTreeMap::new(),
        };
        for page in pages {
            let req = self.next_req;
            self.next_req += 1;
            self.req_owner.insert(req, runner);
            self.nodes[node].read(req, page, snapshot);
        }
        self.pump(node);
    }

    /// Hands a node's finished operations to its runners and its messages to the network.
    /// Operations are handled in the order nodes reported them, never nested: handling one
    /// can make a node report more (a local read answered at once), which queue behind.
    fn pump(&mut self, node: NodeId) {
        let done = self.nodes[node].take_done();
        // A node declared dead may still run for a while (cut off, not crashed): what it
        // reports is not acted on; its runners run again elsewhere.
        if self.is_live(node) {
            self.reported.extend(done);
        }
        for (to, msg) in self.nodes[node].take_outbox() {
            self.net.send(node, to, msg.encode()).expect("send");
        }
        if self.handling {
            return;
        }
        self.handling = true;
        while let Some(item) = self.reported.pop_front() {
            self.on_done(item);
        }
        self.handling = false;
    }

    fn on_done(&mut self, done: Done) {
        match done {
            Done::Read {
                req, page, data, ..
            } => {
                let Some(runner) = self.req_owner.remove(&req) else {
                    return;
                };
                let ready = match &mut self.runners[runner].state {
                    RunnerState::Reading { waiting, got, .. } => {
                        got.insert(page, data);
                        *waiting -= 1;
                        *waiting == 0
                    }
                    _ => false,
                };
                if ready {
                    self.commit(runner);
                }
            }
            Done::Prepare { txn, result } => {
                let Some(runner) = self.txn_owner.remove(&txn) else {
                    return;
                };
                let RunnerState::Preparing {
                    snapshot, reads, ..
                } = std::mem::replace(&mut self.runners[runner].state, RunnerState::Finished)
                else {
                    return;
                };
                // Like a DVM ending: commit at the first timestamp and publish the exit record
                // at the next; or, refused, only publish the exit record (a new transaction).
                let (txn, count, reads) = match result {
                    Ok(()) => (txn, 2, Some(reads)),
                    Err(_) => {
                        self.refused += 1;
                        let publish = self.next_txn;
                        self.next_txn += 1;
                        (publish, 1, None)
                    }
                };
                self.runners[runner].endings += 1;
                let exit = self.exit_delta(runner);
                self.runners[runner].state = RunnerState::Finishing {
                    txn,
                    snapshot,
                    reads,
                };
                self.txn_owner.insert(txn, runner);
                self.counts.insert(txn, count);
                let node = self.runners[runner].node;
                self.nodes[node].finish(txn, vec![exit], count, txn.to_le_bytes().to_vec());
                self.pump(node);
            }
            Done::Finished { txn, first } => self.finished(txn, first),
            Done::NodeLost { node, .. } => self.node_lost(node),
            Done::Settled { .. } => self.settled_views += 1,
            Done::DataLost { .. } | Done::Fenced { .. } => {}
            // One node is cut off at most, so node 0 always keeps a majority; `check` fails
            // the run if it stopped all the same.
            Done::CutOff { .. } => self.cut_off = true,
            Done::Applied {
                txn,
                first,
                effects,
                ..
            } => {
                // The commit order names the attempt that committed; the runners know the
                // transaction by the id they gave it.
                let txn = original_txn(txn);
                let named = u64::from_le_bytes(effects.try_into().unwrap_or([0; 8]));
                assert_eq!(named, txn, "effects handed out with their own transaction");
                self.applied.push((txn, first));
                if self.orphans.remove(&txn).is_some() {
                    self.finished(txn, first);
                }
            }
        }
    }

    /// `txn` is installed everywhere: its runner goes on to its next transaction.
    fn finished(&mut self, txn: u64, first: u64) {
        let Some(runner) = self.txn_owner.remove(&txn) else {
            return;
        };
        let count = self.counts.get(&txn).copied().unwrap_or(0);
        self.finished.insert(txn, (first, count));
        let RunnerState::Finishing {
            snapshot, reads, ..
        } = std::mem::replace(&mut self.runners[runner].state, RunnerState::Finished)
        else {
            return;
        };
        let r = &mut self.runners[runner];
        match reads {
            Some(reads) => {
                self.records.push(Record {
                    txn,
                    snapshot,
                    ts: first,
                    reads,
                });
                r.committed += 1;
                r.attempts = 0;
            }
            None => r.attempts += 1,
        }
        if r.attempts > MAX_ATTEMPTS {
            self.gave_up += 1;
            r.committed += 1;
            r.attempts = 0;
        }
        if r.committed < TXNS_PER_RUNNER {
            self.start(runner);
        }
    }

    /// The runner's transaction in flight had no effect (nothing committed): it runs again
    /// from a new snapshot, as a re-executed DVM runner does. An ending it had counted did
    /// not happen.
    fn run_again(&mut self, runner: usize) {
        let state = std::mem::replace(&mut self.runners[runner].state, RunnerState::Finished);
        match state {
            RunnerState::Reading { txn, .. } | RunnerState::Preparing { txn, .. } => {
                self.txn_owner.remove(&txn);
            }
            RunnerState::Finishing { txn, .. } => {
                self.txn_owner.remove(&txn);
                self.counts.remove(&txn);
                self.runners[runner].endings -= 1;
            }
            RunnerState::Finished => return,
        }
        self.req_owner.retain(|_, owner| *owner != runner);
        self.rerun += 1;
        self.start(runner);
    }

    /// Node 0 declared `node` dead: its runners move to live nodes. Those whose commit node 0
    /// granted wait for it to be applied; the others run again.
    fn node_lost(&mut self, node: NodeId) {
        self.declared.push(node);
        let live: Vec<NodeId> = (0..self.nodes.len()).filter(|n| self.is_live(*n)).collect();
        for runner in 0..self.runners.len() {
            if self.runners[runner].node != node {
                continue;
            }
            self.runners[runner].node = live[runner % live.len()];
            let granted = match &self.runners[runner].state {
                RunnerState::Finishing { txn, .. } => {
                    self.nodes[0].granted(*txn).is_some().then_some(*txn)
                }
                _ => None,
            };
            // Granted and maybe already applied (the coordinator died before it heard).
            let applied = granted.and_then(|txn| {
                self.applied
                    .iter()
                    .find(|(t, _)| *t == txn)
                    .map(|(_, first)| (txn, *first))
            });
            match (granted, applied) {
                (_, Some((txn, first))) => self.finished(txn, first),
                (Some(txn), None) => {
                    self.orphans.insert(txn, runner);
                }
                (None, _) => self.run_again(runner),
            }
        }
    }

    /// The runner's exit record: its count of endings so far.
    fn exit_delta(&self, runner: usize) -> PageDelta {
        let mut data = [0u8; PAGE_BYTES];
        data[..8].copy_from_slice(&self.runners[runner].endings.to_le_bytes());
        let mut mask = EMPTY_MASK;
        mark(&mut mask, 0, 8);
        PageDelta::from_page(EXIT_PAGE + runner as u64, &data, &mask)
    }

    fn commit(&mut self, runner: usize) {
        let RunnerState::Reading {
            txn,
            snapshot,
            words,
            got,
            ..
        } = std::mem::replace(&mut self.runners[runner].state, RunnerState::Finished)
        else {
            return;
        };
        let mut reads = Vec::new();
        let mut by_page: BTreeMap<u64, ([u8; PAGE_BYTES], Box<dvm_engine::page::Mask>)> =
            BTreeMap::new();
        for (page, offset) in &words {
            let data = got.get(page).and_then(|d| d.as_deref()).copied();
            let entry = by_page
                .entry(*page)
                .or_insert_with(|| (data.unwrap_or([0u8; PAGE_BYTES]), Box::new(EMPTY_MASK)));
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&entry.0[*offset..*offset + 8]);
            let value = u64::from_le_bytes(raw);
            reads.push(((*page, *offset), value));
            entry.0[*offset..*offset + 8].copy_from_slice(&(value + 1).to_le_bytes());
            mark(&mut entry.1, *offset, 8);
        }
        let deltas = by_page
            .iter()
            .map(|(page, (data, mask))| PageDelta::from_page(*page, data, mask))
            .collect();
        let node = self.runners[runner].node;
        self.runners[runner].state = RunnerState::Preparing {
            txn,
            snapshot,
            reads,
        };
        self.txn_owner.insert(txn, runner);
        self.nodes[node].prepare(txn, snapshot, deltas);
        self.pump(node);
    }

    fn all_finished(&self) -> bool {
        self.runners
            .iter()
            .all(|r| r.committed >= TXNS_PER_RUNNER && matches!(r.state, RunnerState::Finished))
    }

    fn run(&mut self) -> Result<(), String> {
        for node in 0..self.nodes.len() {
            self.net.set_timer(node, TICK_US, 0).expect("timer");
        }
        for runner in 0..self.runners.len() {
            self.start(runner);
        }
        let expected_ts = |sim: &Sim| sim.counts.values().sum::<u64>();
        // Until the work is done and the cluster has settled: every live node in node 0's
        // view and holding nothing (an orphaned transaction is released only once its
        // holder has the view that names its coordinator dead).
        while !(self.all_finished()
            && self.nodes[0].watermark() == expected_ts(self)
            && self.settled())
        {
            self.strike();
            let Some(event) = self.net.step() else {
                return Err("the network went quiet with work left".into());
            };
            if self.net.now_us() > TIME_LIMIT_US {
                let unsettled: Vec<String> = self
                    .nodes
                    .iter()
                    .filter(|n| self.is_live(n.id()))
                    .map(|n| {
                        format!(
                            "node {} in view {} holds {:?}",
                            n.id(),
                            n.view().epoch(),
                            n.held_txns()
                        )
                    })
                    .collect();
                let stuck: Vec<String> = self
                    .runners
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.committed < TXNS_PER_RUNNER)
                    .map(|(index, r)| {
                        format!("runner {index} on node {}: {}", r.node, r.state.describe())
                    })
                    .collect();
                return Err(format!(
                    "no progress after {} s of virtual time ({:?}, declared dead {:?}): {}; {}",
                    TIME_LIMIT_US / 1_000_000,
                    self.fault,
                    self.declared,
                    stuck.join("; "),
                    unsettled.join("; ")
                ));
            }
            self.events += 1;
            match event {
                SimEvent::Deliver { from, to, payload } => {
                    let msg = Msg::decode(&payload).map_err(|e| format!("bad frame: {e}"))?;
                    self.nodes[to].on_message(from, msg);
                    self.pump(to);
                }
                SimEvent::ConnectionLost { .. } => {}
                SimEvent::Timer { node, .. } => {
                    let now = self.net.now_us();
                    self.nodes[node].tick(now);
                    self.pump(node);
                    self.net.set_timer(node, now + TICK_US, 0).expect("timer");
                }
            }
        }
        self.check()
    }

    fn settled(&self) -> bool {
        // A crashed node is noticed (the failure detector's liveness), and one started again
        // learns that it is fenced.
        let restarted = |node: &NodeId| self.net.is_crashed(*node) == Ok(false);
        if self.crashed.iter().any(|node| {
            !self.declared.contains(node) || (restarted(node) && !self.nodes[*node].is_fenced())
        }) {
            return false;
        }
        // New holders have their copies (checked below like every holder).
        if self.nodes[0].copying() {
            return false;
        }
        let epoch = self.nodes[0].view().epoch();
        self.nodes.iter().filter(|n| self.is_live(n.id())).all(|n| {
            n.view().epoch() == epoch && n.held_count() == 0 && n.store().intent_count() == 0
        })
    }

    /// Makes the fault happen once its time has come.
    fn strike(&mut self) {
        match self.fault {
            Fault::Crash {
                node, after_events, ..
            } if self.events == after_events => {
                self.net.crash(node).expect("crash");
                self.crashed.insert(node);
            }
            Fault::Crash {
                node,
                restart_after_events: Some(at),
                ..
            } if self.events == at => {
                self.net.restart(node).expect("restart");
                let config = self.configs[node].clone();
                let store = std::sync::Arc::new(PageStore::new());
                self.nodes[node] = Node::restarted(config, store, self.pages.clone());
                let first_tick = self.net.now_us() + TICK_US;
                self.net.set_timer(node, first_tick, 0).expect("timer");
            }
            Fault::Partition {
                node,
                from,
                after_events,
                duration_us,
            } if self.events == after_events => {
                let until = self.net.now_us() + duration_us;
                for other in (0..self.nodes.len()).filter(|other| *other != node) {
                    let cut = match from {
                        Cut::Root => other == 0,
                        Cut::Peer(peer) => other == peer,
                        Cut::Everyone => true,
                    };
                    if cut {
                        self.net.partition(node, other, until).expect("partition");
                    }
                }
            }
            _ => {}
        }
    }

    fn check(&self) -> Result<(), String> {
        let order: Vec<(u64, u64)> = self.nodes[0]
            .commit_order()
            .ok_or("node 0 is no sequencer")?
            .iter()
            .map(|(txn, first)| (original_txn(*txn), *first))
            .collect();
        let order = &order;
        let mut by_txn: BTreeMap<u64, &Record> = BTreeMap::new();
        for record in &self.records {
            if by_txn.insert(record.txn, record).is_some() {
                return Err(format!("txn {} reported committed twice", record.txn));
            }
        }
        if order.len() != self.finished.len() {
            return Err(format!(
                "{} endings in the commit order, {} finished at their coordinators",
                order.len(),
                self.finished.len()
            ));
        }
        let mut next = 1;
        for (txn, first) in order {
            let (seen_first, count) = self.finished.get(txn).copied().ok_or(format!(
                "txn {txn} in the commit order never finished at its coordinator"
            ))?;
            if *first != next || seen_first != *first {
                return Err(format!(
                    "timestamps not dense: txn {txn} at {first} (coordinator saw {seen_first}), expected {next}"
                ));
            }
            next += count;
        }
        if &self.applied != order {
            return Err("node 0 handed out effects out of commit order".into());
        }
        let mut history: BTreeMap<Word, Vec<(u64, u64)>> = BTreeMap::new();
        let value_at = |history: &BTreeMap<Word, Vec<(u64, u64)>>, word: &Word, ts: u64| {
            history.get(word).map_or(0, |versions| {
                versions
                    .iter()
                    .take_while(|(at, _)| *at <= ts)
                    .last()
                    .map_or(0, |(_, value)| *value)
            })
        };
        for (txn, ts) in order {
            let Some(record) = by_txn.get(txn) else {
                continue;
            };
            for (word, value) in &record.reads {
                let at_snapshot = value_at(&history, word, record.snapshot);
                if at_snapshot != *value {
                    return Err(format!(
                        "txn {txn} read {value} from {word:?} at snapshot {}, serial state {at_snapshot}",
                        record.snapshot
                    ));
                }
                let before = value_at(&history, word, ts - 1);
                if before != *value {
                    return Err(format!(
                        "lost update: txn {txn} (snapshot {}, ts {ts}) wrote {word:?} over a commit it did not see ({value} -> {before})",
                        record.snapshot
                    ));
                }
                history.entry(*word).or_default().push((*ts, value + 1));
            }
        }
        let watermark = self.nodes[0].watermark();
        let view = self.nodes[0].view();
        let value_at_holders = |page: u64, offset: usize| -> Vec<(NodeId, u64)> {
            view.holders(page)
                .into_iter()
                .map(|holder| {
                    let value = self.nodes[holder]
                        .store()
                        .read(page, watermark)
                        .expect("page memory")
                        .map_or(0, |data| {
                            let mut raw = [0u8; 8];
                            raw.copy_from_slice(&data[offset..offset + 8]);
                            u64::from_le_bytes(raw)
                        });
                    (holder, value)
                })
                .collect()
        };
        for word in &self.words {
            let expected = value_at(&history, word, u64::MAX);
            for (holder, got) in value_at_holders(word.0, word.1) {
                if got != expected {
                    return Err(format!(
                        "counter {word:?} at holder {holder} is {got}, serially {expected}"
                    ));
                }
            }
        }
        for (index, runner) in self.runners.iter().enumerate() {
            let page = EXIT_PAGE + index as u64;
            for (holder, got) in value_at_holders(page, 0) {
                if got != runner.endings {
                    return Err(format!(
                        "runner {index}'s exit record at holder {holder} says {got} endings, it had {}",
                        runner.endings
                    ));
                }
            }
        }
        for node in self.nodes.iter().filter(|node| self.is_live(node.id())) {
            if node.store().intent_count() != 0 || node.held_count() != 0 {
                return Err(format!(
                    "node {} holds {} intents and transactions {:?} after the run ({:?}, declared dead {:?})",
                    node.id(),
                    node.store().intent_count(),
                    node.held_txns(),
                    self.fault,
                    self.declared
                ));
            }
        }
        match self.fault {
            Fault::None
            | Fault::Partition {
                from: Cut::Peer(_), ..
            } if !self.declared.is_empty() => {
                return Err(format!(
                "nodes {:?} declared dead without a fault that cuts a node off from node 0 ({:?})",
                self.declared, self.fault
            ))
            }
            Fault::Crash { node, .. }
                if self.crashed.contains(&node) && !self.declared.contains(&node) =>
            {
                return Err(format!("node {node} crashed but was never declared dead"))
            }
            _ => {}
        }
        if self.declared.contains(&0) {
            return Err("node 0 declared dead".into());
        }
        if self.cut_off {
            return Err("node 0 stopped for want of a majority with one node cut off".into());
        }
        Ok(())
    }

    fn outcome(&self) -> Outcome {
        Outcome {
            trace_hash: self.net.trace_hash(),
            order: self.nodes[0].commit_order().unwrap_or(&[]).to_vec(),
            records: self.records.len(),
            refused: self.refused,
            connections_lost: self.net.stats().connections_lost,
            frames_dropped: self.net.stats().frames_dropped,
            declared: self.declared.clone(),
            rerun: self.rerun,
            retried: self
                .nodes
                .iter()
                .filter(|node| self.is_live(node.id()))
                .map(|node| node.retried_prepares())
                .sum(),
            fault: self.fault,
            settled: self.settled_views,
            restaged: self
                .nodes
                .iter()
                .filter(|node| self.is_live(node.id()))
                .map(|node| node.restaged_prepares())
                .sum(),
            restarted: self.crashed.iter().any(|node| {
                self.net.is_crashed(*node) == Ok(false) && self.nodes[*node].is_fenced()
            }),
        }
    }
}

fn run_seed(seed: u64, broken: Broken, pages: &PageSource) -> Result<Outcome, String> {
    let mut sim = Sim::new(seed, broken, pages);
    sim.run().map_err(|err| format!("seed {seed}: {err}"))?;
    Ok(sim.outcome())
}

fn seeds() -> std::ops::Range<u64> {
    if let Some(seed) = std::env::var("DVM_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return seed..seed + 1;
    }
    let count: u64 = std::env::var("DVM_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let first: u64 = std::env::var("DVM_SIM_FIRST")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    first..first.saturating_add(count)
}

#[test]
fn thousands_of_seeds_match_a_serial_execution() {
    let pages = pages();
    let (mut commits, mut refused, mut lost, mut dropped) = (0, 0, 0, 0);
    let (mut crashed, mut fenced, mut rerun, mut restarted, mut links) = (0, 0, 0, 0, 0);
    let (mut retried, mut settled, mut restaged) = (0, 0, 0);
    let seeds = seeds();
    for seed in seeds.clone() {
        match run_seed(seed, Broken::No, &pages) {
            Ok(outcome) => {
                commits += outcome.records;
                refused += outcome.refused;
                lost += outcome.connections_lost;
                dropped += outcome.frames_dropped;
                rerun += outcome.rerun;
                retried += outcome.retried;
                settled += outcome.settled;
                restaged += outcome.restaged;
                restarted += u64::from(outcome.restarted);
                match outcome.fault {
                    Fault::Crash { .. } if !outcome.declared.is_empty() => crashed += 1,
                    Fault::Partition { .. } if !outcome.declared.is_empty() => fenced += 1,
                    Fault::Partition {
                        from: Cut::Peer(_), ..
                    } => links += 1,
                    _ => {}
                }
            }
            Err(err) => panic!(
                "{err}\nrerun alone: DVM_SIM_SEED={seed} cargo test -p dvm-cluster --test simulation"
            ),
        }
    }
    eprintln!(
        "simulated seeds {seeds:?}: {commits} commits, {refused} refused by a conflict and retried, \
         {lost} connections lost, {dropped} frames dropped; {crashed} runs lost a node to a crash, \
         {restarted} of them started it again (fenced); {fenced} declared a cut-off node dead; \
         {links} had a link between two nodes down; \
         {rerun} runners of lost nodes ran again, {retried} prepares were made again in a new view, \
         {settled} views settled with copies at new holders, {restaged} transactions sent \
         their deltas to new holders before their grant"
    );
    // The runs must exercise what they claim to: contention, lost connections, and both
    // kinds of node loss survived with runners run again.
    assert!(
        commits > 0 && refused > 0,
        "no contention: {commits} commits, {refused} refused"
    );
    if seeds.end - seeds.start >= 100 {
        assert!(lost > 0, "no connection was lost in {seeds:?}");
        assert!(
            crashed > 0 && fenced > 0 && rerun > 0 && restarted > 0 && settled > 0,
            "{crashed} crashes ({restarted} restarted) and {fenced} fenced nodes survived, \
             {rerun} runners rerun, {settled} views settled with new copies"
        );
    }
}

#[test]
fn a_seed_reproduces_its_run_exactly() {
    let pages = pages();
    // Seeds with each kind of fault, and without.
    let mut kinds = Vec::new();
    for seed in 0..64u64 {
        let fault = Sim::new(seed, Broken::No, &pages).fault;
        let kind = std::mem::discriminant(&fault);
        if !kinds.iter().any(|(k, _)| *k == kind) {
            kinds.push((kind, seed));
        }
    }
    assert_eq!(
        kinds.len(),
        3,
        "seeds 0..64 cover no fault, crash and partition"
    );
    for (_, seed) in kinds {
        let a = run_seed(seed, Broken::No, &pages).expect("a seed");
        let b = run_seed(seed, Broken::No, &pages).expect("the seed again");
        assert_eq!(a, b, "seed {seed}");
        let c = run_seed(seed + 1000, Broken::No, &pages).expect("another seed");
        assert_ne!(a.trace_hash, c.trace_hash, "another seed, another run");
    }
}

/// Asserts that the checks catch a run of the `broken` protocol within `seeds` seeds, for one of
/// `symptoms`.
fn caught(broken: Broken, seeds: u64, symptoms: &[&str]) {
    let pages = pages();
    let caught =
        (0..seeds).find_map(|seed| run_seed(seed, broken, &pages).err().map(|err| (seed, err)));
    let (seed, caught) =
        caught.unwrap_or_else(|| panic!("no seed out of {seeds} caught {broken:?}"));
    eprintln!("{broken:?}: caught by seed {seed}: {caught}");
    assert!(
        symptoms.iter().any(|symptom| caught.contains(symptom)),
        "{broken:?} caught for an unexpected reason: {caught}"
    );
}

#[test]
fn a_home_that_skips_its_conflict_check_is_caught() {
    caught(
        Broken::SkipConflictCheck,
        200,
        &["lost update", "counter", "read"],
    );
}

/// Node 0 counts a commit complete once its homes installed it and only then sends it to the
/// backups: a home lost in between leaves a backup that becomes home without the version,
/// and a runner reads or overwrites the page without it.
#[test]
fn a_commit_acknowledged_before_its_backup_has_it_is_caught() {
    caught(
        Broken::AckBeforeBackup,
        600,
        &["lost update", "counter", "read", "exit record"],
    );
}

/// Node 0 counts a ring's new member as a full holder without copying the page to it: its
/// commits land on an empty page, and its copy of a counter or an exit record is wrong.
#[test]
fn a_new_holder_counted_without_its_copies_is_caught() {
    caught(
        Broken::SkipCopies,
        600,
        &["counter", "exit record", "read", "lost update"],
    );
}
