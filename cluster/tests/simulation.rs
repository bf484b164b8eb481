//! Deterministic simulation of the cluster's commit protocol (`dvm_cluster::node`) on the
//! simulated network (`dvm_transport::sim`): 3–5 nodes, random delays, reordering across
//! connections, lost connections, and runners that read counters at a snapshot and commit
//! increments — contended on purpose. Every run is checked against a serial execution in the
//! sequencer's commit order:
//! - the committed transactions are exactly those the runners saw commit, each once, with dense
//!   timestamps (no lost or duplicated commit);
//! - every read saw the serial state at its snapshot, and nothing was committed to a word it
//!   wrote between its snapshot and its commit (first committer wins: no lost update);
//! - every home's final state is the serial final state (exact counters), every runner's exit
//!   record (published after each ending, whatever its outcome, without a conflict check) holds
//!   its count of endings, and no intent is left;
//! - node 0 hands out the endings' effects in timestamp order.
//!
//! `DVM_SIM_SEEDS=N` sets how many seeds run (default 2000); `DVM_SIM_SEED=S` reruns one seed
//! alone. A seed reproduces its run exactly (same trace hash, same commit order).
#![allow(clippy::unwrap_used)]

use dvm_cluster::msg::{Msg, PageDelta};
use dvm_cluster::node::{Done, Node, NodeConfig, NodeId};
use dvm_engine::page::{mark, MemoryAccount, PageSource, EMPTY_MASK, PAGE_BYTES};
use dvm_engine::store::PageStore;
use dvm_transport::sim::{SimConfig, SimEvent, SimNet};
use std::collections::BTreeMap;

/// A counter: (page, byte offset), 8 bytes little-endian.
type Word = (u64, usize);

const TICK_US: u64 = 5_000;
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
        snapshot: u64,
        reads: Vec<(Word, u64)>,
    },
    /// Finishing a transaction: committing (with the reads) or only publishing the exit record.
    Finishing {
        snapshot: u64,
        reads: Option<Vec<(Word, u64)>>,
    },
    Finished,
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
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    trace_hash: u64,
    order: Vec<(u64, u64)>,
    records: usize,
    refused: u64,
    connections_lost: u64,
    frames_dropped: u64,
}

impl Sim {
    fn new(seed: u64, broken: bool, pages: &PageSource) -> Sim {
        let mut probe = dvm_transport::sim::SimRng::new(seed ^ 0x5eed);
        let world = 3 + probe.below(3) as usize;
        let mut config = SimConfig::new(seed, world);
        config.min_delay_us = 20;
        config.max_delay_us = 20 + probe.below(3_000);
        config.loss_per_million = [0, 500, 5_000][probe.below(3) as usize];
        config.reconnect_delay_us = 2_000;
        let net = SimNet::new(config).expect("sim config");
        let nodes = (0..world)
            .map(|id| {
                let config = NodeConfig {
                    id,
                    world,
                    broken_skip_conflict_check: broken && id == 1,
                    broadcast_watermark: true,
                };
                Node::new(config, std::sync::Arc::new(PageStore::new()), pages.clone())
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
        }
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
    fn pump(&mut self, node: NodeId) {
        loop {
            let done = self.nodes[node].take_done();
            if done.is_empty() {
                break;
            }
            for item in done {
                self.on_done(item);
            }
        }
        for (to, msg) in self.nodes[node].take_outbox() {
            self.net.send(node, to, msg.encode()).expect("send");
        }
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
                self.runners[runner].state = RunnerState::Finishing { snapshot, reads };
                self.txn_owner.insert(txn, runner);
                self.counts.insert(txn, count);
                let node = self.runners[runner].node;
                self.nodes[node].finish(txn, vec![exit], count, txn.to_le_bytes().to_vec());
                self.pump(node);
            }
            Done::Finished { txn, first } => {
                let Some(runner) = self.txn_owner.remove(&txn) else {
                    return;
                };
                let count = self.counts.get(&txn).copied().unwrap_or(0);
                self.finished.insert(txn, (first, count));
                let RunnerState::Finishing { snapshot, reads } =
                    std::mem::replace(&mut self.runners[runner].state, RunnerState::Finished)
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
            Done::Applied {
                txn,
                first,
                effects,
                ..
            } => {
                let named = u64::from_le_bytes(effects.try_into().unwrap_or([0; 8]));
                assert_eq!(named, txn, "effects handed out with their own transaction");
                self.applied.push((txn, first));
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
        self.runners[runner].state = RunnerState::Preparing { snapshot, reads };
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
        while !(self.all_finished() && self.nodes[0].watermark() == expected_ts(self)) {
            let Some(event) = self.net.step() else {
                return Err("the network went quiet with work left".into());
            };
            if self.net.now_us() > TIME_LIMIT_US {
                return Err(format!(
                    "no progress: {} runners unfinished after {} s of virtual time",
                    self.runners
                        .iter()
                        .filter(|r| r.committed < TXNS_PER_RUNNER)
                        .count(),
                    TIME_LIMIT_US / 1_000_000
                ));
            }
            match event {
                SimEvent::Deliver { from, to, payload } => {
                    let msg = Msg::decode(&payload).map_err(|e| format!("bad frame: {e}"))?;
                    self.nodes[to].on_message(from, msg);
                    self.pump(to);
                }
                SimEvent::ConnectionLost { .. } => {}
                SimEvent::Timer { node, .. } => {
                    self.nodes[node].tick();
                    self.pump(node);
                    let at = self.net.now_us() + TICK_US;
                    self.net.set_timer(node, at, 0).expect("timer");
                }
            }
        }
        self.check()
    }

    fn check(&self) -> Result<(), String> {
        let order = self.nodes[0]
            .commit_order()
            .ok_or("node 0 is no sequencer")?;
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
        if self.applied != order {
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
        for word in &self.words {
            let expected = value_at(&history, word, u64::MAX);
            let home = dvm_cluster::node::home_of(word.0, self.nodes.len());
            let got = self.nodes[home]
                .store()
                .read(word.0, watermark)
                .expect("page memory")
                .map_or(0, |page| {
                    let mut raw = [0u8; 8];
                    raw.copy_from_slice(&page[word.1..word.1 + 8]);
                    u64::from_le_bytes(raw)
                });
            if got != expected {
                return Err(format!(
                    "counter {word:?} at its home is {got}, serially {expected}"
                ));
            }
        }
        for (index, runner) in self.runners.iter().enumerate() {
            let page = EXIT_PAGE + index as u64;
            let home = dvm_cluster::node::home_of(page, self.nodes.len());
            let got = self.nodes[home]
                .store()
                .read(page, watermark)
                .expect("page memory")
                .map_or(0, |page| {
                    u64::from_le_bytes(page[..8].try_into().unwrap_or([0; 8]))
                });
            if got != runner.endings {
                return Err(format!(
                    "runner {index}'s exit record says {got} endings, it had {}",
                    runner.endings
                ));
            }
        }
        for node in &self.nodes {
            if node.store().intent_count() != 0 {
                return Err(format!(
                    "node {} holds {} intents after the run",
                    node.id(),
                    node.store().intent_count()
                ));
            }
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
        }
    }
}

fn run_seed(seed: u64, broken: bool, pages: &PageSource) -> Result<Outcome, String> {
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
    let count = std::env::var("DVM_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    0..count
}

#[test]
fn thousands_of_seeds_match_a_serial_execution() {
    let pages = pages();
    let (mut commits, mut refused, mut lost, mut dropped) = (0, 0, 0, 0);
    let seeds = seeds();
    for seed in seeds.clone() {
        match run_seed(seed, false, &pages) {
            Ok(outcome) => {
                commits += outcome.records;
                refused += outcome.refused;
                lost += outcome.connections_lost;
                dropped += outcome.frames_dropped;
            }
            Err(err) => panic!(
                "{err}\nrerun alone: DVM_SIM_SEED={seed} cargo test -p dvm-cluster --test simulation"
            ),
        }
    }
    eprintln!(
        "simulated seeds {seeds:?}: {commits} commits, {refused} refused by a conflict and retried, {lost} connections lost, {dropped} frames dropped"
    );
    // The runs must exercise what they claim to: contention and lost connections.
    assert!(
        commits > 0 && refused > 0,
        "no contention: {commits} commits, {refused} refused"
    );
    assert!(
        seeds.end - seeds.start < 20 || lost > 0,
        "no connection was lost in {seeds:?}"
    );
}

#[test]
fn a_seed_reproduces_its_run_exactly() {
    let pages = pages();
    let a = run_seed(7, false, &pages).expect("seed 7");
    let b = run_seed(7, false, &pages).expect("seed 7 again");
    assert_eq!(a, b);
    let c = run_seed(8, false, &pages).expect("seed 8");
    assert_ne!(a.trace_hash, c.trace_hash, "another seed, another run");
}

#[test]
fn a_home_that_skips_its_conflict_check_is_caught() {
    let pages = pages();
    let caught = (0..200u64).find_map(|seed| run_seed(seed, true, &pages).err());
    let caught = caught.expect("no seed out of 200 caught the broken home");
    eprintln!("the broken home was caught: {caught}");
    assert!(
        caught.contains("lost update") || caught.contains("counter") || caught.contains("read"),
        "caught for an unexpected reason: {caught}"
    );
}
