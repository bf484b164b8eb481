//! Membership: which nodes are alive, in which epoch, and which of them hold each page.
//!
//! Owns the placement rule of replicas and the epoch that fences a node declared dead
//! (`docs/CLUSTER.md`, "Replicas and the loss of a node"). Node 0 is the only node that
//! declares deaths; every other node adopts the views node 0 sends.
//!
//! Invariants:
//! - epochs only grow, and each epoch's dead set contains the previous one's: a node declared
//!   dead never comes back (a healed node could rejoin only as a new node, which is not
//!   supported yet);
//! - a page's **ring** is the `replicas` nodes that follow its home by hash (`home_of`) in rank
//!   order; its **holders** are the live members of its ring, home first. No node joins a ring
//!   when one dies (re-replication does not exist yet), so a page survives the loss of up to
//!   `replicas - 1` of its holders, and a holder that is live now was live, and a holder, in
//!   every earlier epoch.

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

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    epoch: u64,
    world: usize,
    replicas: usize,
    dead: BTreeSet<NodeId>,
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

    pub fn live(&self) -> impl Iterator<Item = NodeId> + '_ {
        (0..self.world).filter(|node| !self.dead.contains(node))
    }

    /// The live holders of `page`, home first; empty if every member of its ring is dead.
    pub fn holders(&self, page: u64) -> Vec<NodeId> {
        let start = home_of(page, self.world);
        (0..self.replicas)
            .map(|step| (start + step) % self.world)
            .filter(|node| !self.dead.contains(node))
            .collect()
    }

    /// The node that answers reads of `page` and checks conflicts on it: its first live holder.
    pub fn home(&self, page: u64) -> Option<NodeId> {
        let start = home_of(page, self.world);
        (0..self.replicas)
            .map(|step| (start + step) % self.world)
            .find(|node| !self.dead.contains(node))
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

    /// Adopts node 0's view `epoch` with these dead nodes; `false` if it is not newer than this
    /// one or would bring a dead node back (both ignored: views only move forward).
    pub fn adopt(&mut self, epoch: u64, dead: &[NodeId]) -> bool {
        if epoch <= self.epoch {
            return false;
        }
        let dead: BTreeSet<NodeId> = dead.iter().copied().filter(|n| *n < self.world).collect();
        if !self.dead.is_subset(&dead) {
            return false;
        }
        self.epoch = epoch;
        self.dead = dead;
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
        assert_eq!(view.holders(page), vec![0]);
        assert_eq!(view.home(page), Some(0));
        assert!(!view.declare_dead(3), "declared once");
        assert!(view.declare_dead(0));
        assert_eq!(view.home(page), None, "both holders lost");
    }

    #[test]
    fn views_only_move_forward() {
        let mut view = View::new(3, 5);
        assert_eq!(view.replicas(), 3, "clamped to the world");
        assert!(view.adopt(2, &[1]));
        assert!(!view.adopt(2, &[1, 2]), "not newer");
        assert!(!view.adopt(3, &[2]), "would bring node 1 back");
        assert!(view.adopt(3, &[1, 2]));
        assert_eq!(view.live().collect::<Vec<_>>(), vec![0]);
    }
}
