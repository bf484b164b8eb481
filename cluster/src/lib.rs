//! DVM's cluster layer: how a `dvm` process learns its place in a multi-node job, and the
//! protocol that keeps one memory across the nodes.
//!
//! - `launch`: rank, world size, local rank, the coordinator's address and the job token, read
//!   from an explicit host list or from the environment set by a launcher (DVM's local
//!   launcher, Open MPI's `mpirun`, MPICH's Hydra `mpiexec`, Slurm's `srun`).
//! - `hostlist`: Slurm's compressed host-list syntax (`node[01-10,12]`).
//! - `rendezvous`: the one-time exchange, through rank 0, that gives every rank the data
//!   address of every other rank.
//! - `msg`: the protocol's messages and their byte encoding.
//! - `view`: membership (epochs, dead nodes) and which nodes hold each page.
//! - `handouts`: what node 0 hands runners through `Control` (ids, stacks, heap, input), and
//!   its record of it, so that a runner run again after its node's loss gets the same.
//! - `node`: one node's side of the protocol (holder, coordinator, sequencer, membership) as a
//!   sans-IO state machine, run by the deterministic simulation (`tests/simulation.rs`) and
//!   the real nodes.
//!
//! Safe Rust only: everything here parses input from the environment or the network.
#![forbid(unsafe_code)]

mod handouts;
pub mod hostlist;
pub mod launch;
pub mod msg;
pub mod node;
pub mod rendezvous;
pub mod runtime;
pub mod view;
