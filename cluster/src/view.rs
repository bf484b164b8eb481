//! Membership: which nodes are alive, in which epoch, and which of them hold each page.
//!
//! Owns the placement rule of replicas and the epoch that fences a node declared dead
//! (`docs/CLUSTER.md`, "Replicas and the loss of a node"). Node 0 is the only node that
//! declares deaths and settles rings; every other node adopts the views node 0 sends.
//!
//! A page's **walk** is every node in rank order from the node `home_of` gives it. Its
//! **ring** is the first `replicas` live nodes of its walk, home first: when a member dies,
//! the next live node of the walk joins the ring at its end (re-replication), and the member
//! after the dead one moves up. The **settled** dead set is the one whose rings every member
//! holds a full copy of; a ring member that is not in the settled ring is **new** and holds
//! nothing until its home sends it the page's history (`node/seeding.rs`), after which node 0
//! settles the view.
//!
//! Invariants:
//! - epochs only grow, and each epoch's dead set contains the previous one's: a node declared
//!   dead never comes back (a healed node could rejoin only as a new node, which is not
//!   supported yet); the settled dead set is always a subset of the dead set;
//! - the members of a ring that were in the settled ring come before the new ones (a new one
//!   was beyond every settled member on the walk), so a page's home is a member with a full
//!   copy whenever one is alive; when none is, the page is lost (`lost_ring`);
//! - a live member of a ring stays in it until it dies: rings only gain members at their end.

use std::collections::BTreeSet;

pub type NodeId = usize;

/// Most replicas of a page (the rings are computed per access, so they stay small).
pub const MAX_REPLICAS: usize = 8;

/// The node that homes `page` while every node lives: a hash of its 2 MiB chunk, so a chunk's
/// pages live together.
pub fn home_of(page: u64, world: usize) -> NodeId {
    let chunk = page >> 9;
    let hash = chunk.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
    (hash % world.max(1) as u64) as NodeId
}

/// The ring of the pages `home_of` places at `start`: the first `replicas` nodes of the walk
/// from `start` that `dead` does not name. The one placement rule, for views and for readers
/// that know only which peers they lost.
pub fn ring_from(
    start: NodeId,
    world: usize,
    replicas: usize,
    dead: impl Fn(NodeId) -> bool,
) -> Vec<NodeId> {
    (0..world)
        .map(|step| (start + step) % world)
        .filter(|node| !dead(*node))
        .take(replicas)
        .collect()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    epoch: u64,
    world: usize,
    replicas: usize,
    dead: BTreeSet<NodeId>,
    settled: BTreeSet<NodeId>,
}

impl View {
    /// Everyone alive, epoch 0; `replicas` is clamped to `1..=min(world, MAX_REPLICAS)`.
    pub fn new(world: usize, replicas: usize) -> View {
        let world = world.max(1);
        View {
            epoch: 0,
            world,
            replicas: replicas.clamp(1, world.min(MAX_REPLICAS)),
            dead: BTreeSet::new(),
            settled: BTreeSet::new(),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn replicas(&self) -> usize {
        self.replicas
    }

    pub fn is_live(&self, node: NodeId) -> bool {
        node < self.world && !self.dead.contains(&node)
    }

    pub fn dead(&self) -> Vec<NodeId> {
        self.dead.iter().copied().collect()
    }

    /// The dead set whose rings are fully copied.
    pub fn settled(&self) -> Vec<NodeId> {
        self.settled.iter().copied().collect()
    }

    pub fn live(&self) -> impl Iterator<Item = NodeId> + '_ {
        (0..self.world).filter(|node| !self.dead.contains(node))
    }

    /// The ring of the pages `home_of` places at `start`, with `dead` excluded.
    fn ring(&self, start: NodeId, dead: &BTreeSet<NodeId>) -> Vec<NodeId> {
        ring_from(start, self.world, self.replicas, |node| {
            dead.contains(&node)
        })
    }

    /// The live holders of `page`, home first (new members last); empty if every node is
    /// dead.
    pub fn holders(&self, page: u64) -> Vec<NodeId> {
        self.ring(home_of(page, self.world), &self.dead)
    }

    /// The node that answers reads of `page` and checks conflicts on it: its first holder.
    pub fn home(&self, page: u64) -> Option<NodeId> {
        self.holders(page).first().copied()
    }

    /// The holders of `page` that have no copy of it yet (they joined its ring after the
    /// last settled view).
    pub fn new_holders(&self, page: u64) -> Vec<NodeId> {
        let start = home_of(page, self.world);
        let settled = self.ring(start, &self.settled);
        let ring = self.ring(start, &self.dead);
        ring.into_iter().filter(|n| !settled.contains(n)).collect()
    }

    /// Whether some ring has a new member: the view is settled once its homes have copied
    /// their pages to them.
    pub fn needs_copies(&self) -> bool {
        (0..self.world).any(|start| {
            let settled = self.ring(start, &self.settled);
            self.ring(start, &self.dead)
                .iter()
                .any(|n| !settled.contains(n))
        })
    }

    /// A settled ring every member of which is dead: its pages are gone. The first, if any.
    pub fn lost_ring(&self) -> Option<Vec<NodeId>> {
        (0..self.world)
            .map(|start| self.ring(start, &self.settled))
            .find(|ring| ring.iter().all(|node| self.dead.contains(node)))
    }

    /// Node 0's decision: `node` is dead from the next epoch on. `false` (and no new epoch)
    /// if it already was, or is not a node of this world.
    pub fn declare_dead(&mut self, node: NodeId) -> bool {
        if node >= self.world || !self.dead.insert(node) {
            return false;
        }
        self.epoch += 1;
        true
    }

    /// Node 0's decision: every new ring member has its copies; a new epoch in which they
    /// count as full holders.
    pub fn settle(&mut self) {
        self.settled = self.dead.clone();
        self.epoch += 1;
    }

    /// Adopts node 0's view `epoch` with these dead and settled nodes; `false` if it is not
    /// newer than this one, would bring a dead node back or settles a live one (all ignored:
    /// views only move forward).
    pub fn adopt(&mut self, epoch: u64, dead: &[NodeId], settled: &[NodeId]) -> bool {
        if epoch <= self.epoch {
            return false;
        }
        let dead: BTreeSet<NodeId> = dead.iter().copied().filter(|n| *n < self.world).collect();
        let settled: BTreeSet<NodeId> = settled.iter().copied().collect();
        if !self.dead.is_subset(&dead)
            || !settled.is_subset(&dead)
            || !self.settled.is_subset(&settled)
        {
            return false;
        }
        self.epoch = epoch;
        self.dead = dead;
        self.settled = settled;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_are_the_live_members_of_the_ring_home_first() {
        let mut view = View::new(4, 2);
        let page = (0..1u64 << 20)
            .step_by(512)
            .find(|page| home_of(*page, 4) == 3)
            .expect("a page homed at 3");
        assert_eq!(view.holders(page), vec![3, 0]);
        assert!(view.declare_dead(3));
        assert_eq!(view.epoch(), 1);
        assert_eq!(
            view.holders(page),
            vec![0, 1],
            "node 1 joins the ring at its end"
        );
        assert_eq!(view.home(page), Some(0), "the backup became home");
        assert_eq!(view.new_holders(page), vec![1]);
        assert!(view.needs_copies());
        assert!(!view.declare_dead(3), "declared once");
        assert!(view.declare_dead(0));
        assert_eq!(view.holders(page), vec![1, 2]);
        assert_eq!(view.lost_ring(), Some(vec![3, 0]), "node 1 had no copy yet");
    }

    #[test]
    fn a_settled_ring_survives_the_next_loss() {
        let mut view = View::new(4, 2);
        let page = (0..1u64 << 20)
            .step_by(512)
            .find(|page| home_of(*page, 4) == 3)
            .expect("a page homed at 3");
        assert!(view.declare_dead(3));
        view.settle();
        assert_eq!(view.epoch(), 2);
        assert!(!view.needs_copies());
        assert!(view.new_holders(page).is_empty());
        assert!(view.declare_dead(0));
        assert_eq!(view.holders(page), vec![1, 2]);
        assert_eq!(view.new_holders(page), vec![2]);
        assert_eq!(view.lost_ring(), None, "node 1 holds a copy");
    }

    #[test]
    fn views_only_move_forward() {
        let mut view = View::new(3, 5);
        assert_eq!(view.replicas(), 3, "clamped to the world");
        assert!(view.adopt(2, &[1], &[]));
        assert!(!view.adopt(2, &[1, 2], &[]), "not newer");
        assert!(!view.adopt(3, &[2], &[]), "would bring node 1 back");
        assert!(!view.adopt(3, &[1], &[2]), "settles a live node");
        assert!(view.adopt(3, &[1, 2], &[1]));
        assert!(!view.adopt(4, &[1, 2], &[]), "unsettles node 1");
        assert_eq!(view.live().collect::<Vec<_>>(), vec![0]);
    }
}
