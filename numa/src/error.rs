//! Errors of this crate. Messages name the resource (node, processor, byte count) involved so
//! that a single log line is enough to understand what went wrong.

use std::io;

/// Why a [`crate::NodeMemory`] or a [`crate::PagePool`] page could not be allocated or queried,
/// or why a topology could not be built from a description.
#[derive(Debug, thiserror::Error)]
pub enum NumaError {
    /// The node index is not one of `Topology::nodes()`.
    #[error("NUMA node {node} does not exist: this topology has {node_count} node(s), indexes 0..{node_count}")]
    UnknownNode { node: usize, node_count: usize },

    /// A zero-byte mapping is not possible (mmap rejects it) and is almost surely a caller bug.
    #[error("cannot allocate 0 bytes of node memory for NUMA node {node}")]
    ZeroLength { node: usize },

    /// The kernel refused the anonymous mapping.
    #[error("mmap of {len_bytes} bytes for NUMA node {node} failed: {source}")]
    Mmap {
        node: usize,
        len_bytes: usize,
        #[source]
        source: io::Error,
    },

    /// Asking hwloc where memory lives needs a topology of this machine with binding support.
    #[error("cannot query the placement of node memory: {reason}")]
    PlacementUnavailable { reason: String },

    /// hwloc rejected or failed a placement query.
    #[error("hwloc could not report the placement of {len_bytes} bytes of node memory: {reason}")]
    PlacementQuery { len_bytes: usize, reason: String },

    /// A synthetic topology description was rejected by hwloc or describes an unusable machine.
    #[error("synthetic topology {description:?} is unusable: {reason}")]
    Synthetic { description: String, reason: String },

    /// A [`crate::PagePool`]'s chunk size must be a non-zero multiple of
    /// [`crate::PAGE_BYTES`] and hold fewer than 2^32 pages.
    #[error("invalid page pool chunk size of {chunk_bytes} bytes for NUMA node {node}: it must be a non-zero multiple of {page_bytes} bytes and hold fewer than 2^32 pages")]
    InvalidChunkSize {
        node: usize,
        chunk_bytes: usize,
        page_bytes: usize,
    },

    /// A [`crate::PagePool`] indexes its pages with 32 bits and has used them all up.
    #[error("the page pool of NUMA node {node} cannot grow: it already reserves {pages} pages, the most one pool can index")]
    PoolFull { node: usize, pages: u64 },
}

/// Why [`crate::pin_current_thread`] could not pin the calling thread.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The id cannot even be expressed in the kernel's affinity mask.
    #[error("processor id {pu} is out of range: affinity masks hold processor ids 0..{limit}")]
    OutOfRange { pu: u32, limit: usize },

    /// The kernel rejected the mask (EINVAL): the processor is offline, does not exist, or is
    /// outside this process's cgroup cpuset.
    #[error("cannot pin the calling thread to processor {pu}: no such processor is available to this process ({source})")]
    Unavailable {
        pu: u32,
        #[source]
        source: io::Error,
    },

    /// Any other refusal (for example EPERM under a restrictive security policy).
    #[error("the OS refused to pin the calling thread to processor {pu}: {source}")]
    Refused {
        pu: u32,
        #[source]
        source: io::Error,
    },
}
