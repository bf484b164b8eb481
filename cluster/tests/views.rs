//! Views, step by step. Re-replication: a ring that loses a member gains the next live node of
//! its walk, which gets the page's history before any new commit is granted, and a
//! transaction prepared before the ring grew sends its deltas to the new holder before it is
//! granted. Majority: node 0 stops committing rather than go on with fewer than half of the
//! nodes. Messages are delivered in order by hand, so each step can be checked; the
//! simulation (`simulation.rs`) covers the same protocol under random faults.

use dvm_cluster::msg::{Msg, PageDelta};
use dvm_cluster::node::{home_of, Done, Node, NodeConfig, NodeId};
use dvm_engine::page::{mark, MemoryAccount, PageSource, EMPTY_MASK, PAGE_BYTES};
use dvm_engine::store::PageStore;
use std::collections::VecDeque;
use std::sync::Arc;

const WORLD: usize = 4;

fn pages() -> PageSource {
    let topology = dvm_numa::Topology::detect();
    let pool = dvm_numa::PagePool::new(&topology, 0, 1 << 20).expect("page pool");
    PageSource::new(pool, MemoryAccount::new(1 << 30))
}

struct Cluster {
    nodes: Vec<Node>,
    dead: Vec<NodeId>,
    done: Vec<Vec<Done>>,
    now_us: u64,
    /// Messages of each kind delivered, by tag name.
    seen: Vec<&'static str>,
}

impl Cluster {
    fn new() -> Cluster {
        Cluster::of(WORLD)
    }

    fn of(world: usize) -> Cluster {
        let pages = pages();
        let nodes = (0..world)
            .map(|id| {
                let config = NodeConfig {
                    replicas: 2,
                    ..NodeConfig::new(id, world)
                };
                Node::new(config, Arc::new(PageStore::new()), pages.clone())
            })
            .collect();
        Cluster {
            nodes,
            dead: Vec::new(),
            done: vec![Vec::new(); world],
            now_us: 0,
            seen: Vec::new(),
        }
    }

    /// Delivers every message, in order, until none is left.
    fn settle(&mut self) {
        let mut queue: VecDeque<(NodeId, NodeId, Msg)> = VecDeque::new();
        loop {
            for (from, node) in self.nodes.iter_mut().enumerate() {
                queue.extend(node.take_outbox().into_iter().map(|(to, m)| (from, to, m)));
                self.done[from].extend(node.take_done());
            }
            let Some((from, to, msg)) = queue.pop_front() else {
                return;
            };
            if self.dead.contains(&to) || self.dead.contains(&from) {
                continue;
            }
            self.seen.push(match &msg {
                Msg::Seed { .. } => "Seed",
                Msg::SeedPages { .. } => "SeedPages",
                Msg::Reprepare { .. } => "Reprepare",
                _ => "other",
            });
            self.nodes[to].on_message(from, msg);
        }
    }

    fn tick(&mut self) {
        self.now_us += 5_000;
        for node in &mut self.nodes {
            node.tick(self.now_us);
        }
        self.settle();
    }

    fn value(&self, node: NodeId, page: u64) -> u64 {
        let store = self.nodes[node].store();
        let data = store.read(page, u64::MAX).expect("page memory");
        data.map_or(0, |page| {
            u64::from_le_bytes(page[..8].try_into().expect("8 bytes"))
        })
    }

    /// Commits `value` to the first word of `page` from `coordinator`, all the way.
    fn commit(&mut self, coordinator: NodeId, txn: u64, page: u64, value: u64) {
        self.prepare(coordinator, txn, page, value);
        self.nodes[coordinator].finish(txn, Vec::new(), 1, Vec::new());
        self.settle();
        // A copy round under way holds grants back for a few ticks.
        for _ in 0..5 {
            if self.finished(coordinator, txn) {
                break;
            }
            self.tick();
        }
        assert!(self.finished(coordinator, txn), "txn {txn} finished");
    }

    fn prepare(&mut self, coordinator: NodeId, txn: u64, page: u64, value: u64) {
        let snapshot = self.nodes[coordinator].watermark();
        let mut data = [0u8; PAGE_BYTES];
        data[..8].copy_from_slice(&value.to_le_bytes());
        let mut mask = EMPTY_MASK;
        mark(&mut mask, 0, 8);
        let delta = PageDelta::from_page(page, &data, &mask);
        self.nodes[coordinator].prepare(txn, snapshot, vec![delta]);
        self.settle();
        let prepared = self.done[coordinator]
            .iter()
            .any(|done| matches!(done, Done::Prepare { txn: t, result: Ok(()) } if *t == txn));
        assert!(prepared, "txn {txn} prepared");
    }

    fn finished(&self, coordinator: NodeId, txn: u64) -> bool {
        let finished = |done: &Done| matches!(done, Done::Finished { txn: t, .. } if *t == txn);
        self.done[coordinator].iter().any(finished)
    }

    fn kill(&mut self, node: NodeId) {
        self.dead.push(node);
        self.nodes[0].declare_dead(node);
        self.settle();
    }
}

/// A page `home_of` places at `node` in a `world`-node cluster: its ring is `node` and the
/// nodes after it.
fn page_homed_at(node: NodeId, world: usize) -> u64 {
    (0..1u64 << 20)
        .step_by(512)
        .find(|page| home_of(*page, world) == node)
        .expect("a page homed at the node")
}

/// A page whose ring is `[3, 0]` while everyone lives: losing node 3 makes node 0 its home
/// and node 1 its new holder.
fn page_homed_at_3() -> u64 {
    page_homed_at(3, WORLD)
}

#[test]
fn a_new_holder_gets_the_history_and_the_deltas_prepared_before_it_joined() {
    let page = page_homed_at_3();
    let mut cluster = Cluster::new();
    assert_eq!(cluster.nodes[0].view().holders(page), vec![3, 0]);
    cluster.commit(2, 1, page, 41);
    assert_eq!((cluster.value(3, page), cluster.value(0, page)), (41, 41));
    assert_eq!(cluster.value(1, page), 0, "node 1 is no holder yet");

    // Prepared at nodes 3 and 0; node 3 dies before it is granted.
    cluster.prepare(2, 2, page, 42);
    cluster.kill(3);
    assert_eq!(cluster.nodes[2].view().holders(page), vec![0, 1]);
    assert!(cluster.nodes[0].copying(), "node 0 waits for the copies");
    cluster.nodes[2].finish(2, Vec::new(), 1, Vec::new());
    cluster.settle();
    assert!(cluster.seen.contains(&"Reprepare"), "{:?}", cluster.seen);
    assert_eq!(cluster.nodes[2].restaged_prepares(), 1);
    assert!(!cluster.finished(2, 2), "no grant while copies are made");

    for _ in 0..3 {
        cluster.tick();
    }
    assert!(cluster.seen.contains(&"SeedPages"));
    assert!(!cluster.nodes[0].copying(), "settled");
    let settled = |done: &Done| matches!(done, Done::Settled { .. });
    assert!(cluster.done[0].iter().any(settled));
    assert!(cluster.finished(2, 2), "granted once settled");
    for node in [0, 1] {
        assert_eq!(cluster.value(node, page), 42, "node {node}");
    }
    let old = cluster.nodes[1].store().read(page, 1).expect("page memory");
    let old = old.map(|data| data[0]);
    assert_eq!(old, Some(41), "the copy holds the older version too");
    assert!(cluster.nodes[1].view().new_holders(page).is_empty());
}

/// A page whose ring is `[2, 3]`: losing node 3 makes node 0 its new holder.
fn page_homed_at_2() -> u64 {
    page_homed_at(2, WORLD)
}

#[test]
fn a_ring_survives_a_second_loss_once_its_copies_are_made_and_not_before() {
    let page = page_homed_at_2();
    let lost = |cluster: &Cluster| {
        let lost = |done: &&Done| matches!(done, Done::DataLost { .. });
        cluster.done[0].iter().find(lost).cloned()
    };

    // Node 2 lost before node 0 got its copy (`Seed` waits for node 0's tick).
    let mut cluster = Cluster::new();
    cluster.commit(1, 1, page, 7);
    cluster.kill(3);
    assert_eq!(cluster.nodes[0].view().new_holders(page), vec![0]);
    cluster.kill(2);
    assert_eq!(
        lost(&cluster),
        Some(Done::DataLost {
            nodes: vec![2, 3],
            epoch: 2
        })
    );

    // The same losses with the copies made in between.
    let mut cluster = Cluster::new();
    cluster.commit(1, 1, page, 7);
    cluster.kill(3);
    for _ in 0..3 {
        cluster.tick();
    }
    assert!(!cluster.nodes[0].copying());
    cluster.kill(2);
    assert_eq!(lost(&cluster), None);
    assert_eq!(cluster.nodes[0].view().holders(page), vec![0, 1]);
    for _ in 0..3 {
        cluster.tick();
    }
    for node in [0, 1] {
        assert_eq!(cluster.value(node, page), 7, "node {node}");
    }
    cluster.commit(1, 2, page, 8);
    for node in [0, 1] {
        assert_eq!(cluster.value(node, page), 8, "node {node}");
    }
}

#[test]
fn node_0_stops_committing_without_a_majority_and_keeps_what_it_acknowledged() {
    let cut_off = |cluster: &Cluster| {
        let cut_off = |done: &&Done| matches!(done, Done::CutOff { .. });
        cluster.done[0].iter().find(cut_off).cloned()
    };
    // Five nodes: node 0 goes on with three, and with two of four (a tie: the other side has
    // no sequencer and cannot commit).
    let page = page_homed_at(0, 5);
    let mut five = Cluster::of(5);
    five.kill(4);
    five.kill(3);
    assert_eq!(cut_off(&five), None);
    five.commit(1, 1, page, 5);
    five.kill(2);
    assert_eq!(
        cut_off(&five),
        Some(Done::CutOff {
            reachable: vec![0, 1],
            world: 5
        })
    );
    assert!(
        five.nodes[0].view().is_live(2),
        "not declared dead: node 0 stopped instead"
    );
    five.prepare(1, 2, page, 6);
    five.nodes[1].finish(2, Vec::new(), 1, Vec::new());
    for _ in 0..3 {
        five.tick();
    }
    assert!(!five.finished(1, 2), "nothing granted after the stop");
    for node in [0, 1] {
        assert_eq!(
            five.value(node, page),
            5,
            "node {node} keeps what was acknowledged"
        );
    }

    let mut four = Cluster::of(4);
    four.kill(3);
    four.kill(2);
    assert_eq!(cut_off(&four), None, "two of four: node 0's side goes on");
    four.commit(1, 1, page_homed_at_3(), 9);
    assert_eq!(four.value(0, page_homed_at_3()), 9);
}
