//! DVM's view of the machine it runs on.
//!
//! This crate owns four things:
//! - the **topology** ([`Topology`]): packages, NUMA nodes, cores and the OS processor ids (PUs)
//!   of each core, read from hwloc through `hwlocality`, and the placement of worker threads
//!   on it ([`Topology::plan_workers`]);
//! - **pinning** a thread to one PU ([`pin_current_thread`]);
//! - **node-local memory** ([`NodeMemory`]): anonymous mappings bound to one NUMA node;
//! - **page pools** ([`PagePool`]): 4 KiB pages of one node's memory, handed out as owned,
//!   thread-safe [`PageBox`]es with a fully safe API (the engine's snapshot memory).
//!
//! Invariants every caller may rely on:
//! - a [`Topology`] always has at least one NUMA node and at least one core, every core has at
//!   least one PU, every core belongs to exactly one node (`Core::node`) and is listed in that
//!   node's `cores`, and indexes (`NumaNode::index`, `Core::index`) are dense from 0;
//! - nothing here panics because the machine is unusual: when hwloc fails, the topology is a
//!   fallback built from `std::thread::available_parallelism` and says why
//!   ([`TopologySource::Fallback`]); when pinning is refused the caller gets an error to log
//!   once and can run unpinned; when memory cannot be bound the memory is still returned and
//!   says why ([`NodeMemory::binding_note`], [`PagePool::binding_note`]).

mod error;
mod memory;
mod pin;
mod pool;
mod topology;

pub use error::{NumaError, PinError};
pub use memory::{NodeMemory, Placement};
pub use pin::{current_thread_pus, pin_current_thread};
pub use pool::{ChunkLease, PageBox, PagePool, PoolStats, PAGE_BYTES};
pub use topology::{Core, NumaNode, Topology, TopologySource, WorkerSlot};
