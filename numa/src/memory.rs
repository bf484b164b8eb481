//! Memory bound to one NUMA node, for page pools that workers on that node use.
//!
//! A [`NodeMemory`] is an anonymous private mapping (page-aligned, zero-filled) that it owns
//! alone and unmaps on drop. One whose length is whole 2 MiB huge pages starts on a huge-page
//! boundary and asks the kernel for transparent huge pages (`map_anonymous` says why).
//!
//! Binding happens right after `mmap` and before any page is touched, so that every page is
//! first faulted in on the chosen node (the kernel places a page at its first touch, following
//! the area's policy). hwloc's BIND policy is used with its STRICT flag: on Linux hwloc maps
//! non-strict BIND to MPOL_PREFERRED, which would silently spill to other nodes; strict gives
//! MPOL_BIND.
//!
//! Binding is best effort by design: if it fails the memory is still handed out, marked
//! unbound with the reason, because a slower page pool is better than no DVM.

use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::ptr::NonNull;

use hwlocality::memory::binding::{MemoryBindingFlags, MemoryBindingPolicy};
use hwlocality::memory::nodeset::NodeSet;

use crate::error::NumaError;
use crate::topology::{panic_message, HwTopology, Topology};

/// Memory bound to one NUMA node: page-aligned, zero-filled, owned, freed on drop.
pub struct NodeMemory {
    /// Start of the mapping; valid for `len_bytes` bytes until drop.
    ptr: NonNull<u8>,
    len_bytes: usize,
    node: usize,
    /// `Ok` when bound to `node`, else the reason it is not.
    binding: Result<(), String>,
}

// SAFETY: NodeMemory owns its mapping exclusively, like a `Box<[u8]>`: no other handle to it
// exists, shared access only hands out `&[u8]`, and mutation needs `&mut self`. Moving it to
// another thread or sharing `&NodeMemory` is therefore as safe as for `Box<[u8]>`. (Writes
// through `as_ptr()` are the caller's unsafe code and must be synchronised by the caller.)
unsafe impl Send for NodeMemory {}
// SAFETY: see `Send` above; `&NodeMemory` only allows reads of plain bytes.
unsafe impl Sync for NodeMemory {}

/// Where hwloc says a [`NodeMemory`] is bound and where its pages are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Nodes (dense indexes) the area's policy binds it to.
    pub bound_nodes: Vec<usize>,
    /// hwloc's name for the area's policy ("Bind", "FirstTouch", ...), if uniform.
    pub policy: Option<String>,
    /// Nodes (dense indexes) holding the area's resident pages, if hwloc can tell; untouched
    /// pages are in no node.
    pub resident_nodes: Option<Vec<usize>>,
}

impl NodeMemory {
    /// Map `len_bytes` of zeroed memory and bind it to `topology.nodes()[node]`.
    ///
    /// Binding failure is not an error: the memory is returned with
    /// [`bound_to_node`](Self::bound_to_node) false and the reason in
    /// [`binding_note`](Self::binding_note).
    ///
    /// # Errors
    /// [`NumaError::UnknownNode`] if `node` is not a node of `topology`,
    /// [`NumaError::ZeroLength`] if `len_bytes` is 0, [`NumaError::Mmap`] if the kernel refuses
    /// the mapping.
    pub fn allocate(
        topology: &Topology,
        node: usize,
        len_bytes: usize,
    ) -> Result<NodeMemory, NumaError> {
        let node_count = topology.nodes().len();
        let Some(numa_node) = topology.nodes().get(node) else {
            return Err(NumaError::UnknownNode { node, node_count });
        };
        if len_bytes == 0 {
            return Err(NumaError::ZeroLength { node });
        }
        let ptr = map_anonymous(len_bytes).map_err(|source| NumaError::Mmap {
            node,
            len_bytes,
            source,
        })?;
        let mut memory = NodeMemory {
            ptr,
            len_bytes,
            node,
            binding: Ok(()),
        };
        memory.binding = match topology.binder() {
            Ok(hw) => bind_area(hw, numa_node.os_index, memory.as_slice()).map_err(|reason| {
                format!(
                    "memory for NUMA node {node} (OS node {}) is not bound: {reason}",
                    numa_node.os_index
                )
            }),
            Err(reason) => Err(format!(
                "memory for NUMA node {node} is not bound: {reason}"
            )),
        };
        Ok(memory)
    }

    /// The memory as bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live private mapping of `len_bytes` readable bytes (mmap succeeded
        // and it is unmapped only in drop), mmap'd memory is initialised (zero-filled), and the
        // borrow of `self` keeps it alive and prevents `&mut` access for the slice's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len_bytes) }
    }

    /// The memory as mutable bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, plus the mapping is writable (PROT_WRITE) and `&mut self`
        // guarantees this is the only reference into it for the slice's lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len_bytes) }
    }

    /// Start of the memory (page-aligned), for page pools that manage it themselves. Valid for
    /// `len_bytes()` bytes while `self` lives; writing through it while a slice from
    /// `as_slice` is alive, or from several threads at once, is the caller's responsibility.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Start of the memory as a non-null pointer, with the provenance of the whole mapping (for
    /// the page pool, which hands out pages inside it).
    pub(crate) fn base(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Length in bytes as requested (the mapping itself is rounded up to whole pages).
    pub fn len_bytes(&self) -> usize {
        self.len_bytes
    }

    /// Dense index of the node this memory was allocated for.
    pub fn node(&self) -> usize {
        self.node
    }

    /// Whether the memory is bound to [`node`](Self::node).
    pub fn bound_to_node(&self) -> bool {
        self.binding.is_ok()
    }

    /// Why the memory is not bound, when it is not.
    pub fn binding_note(&self) -> Option<&str> {
        self.binding.as_ref().err().map(String::as_str)
    }

    /// Ask hwloc how this memory is bound and where its pages are; `topology` should be the
    /// one it was allocated with.
    ///
    /// # Errors
    /// [`NumaError::PlacementUnavailable`] if `topology` cannot bind memory (fallback,
    /// synthetic, or no support), [`NumaError::PlacementQuery`] if hwloc's query fails.
    pub fn placement(&self, topology: &Topology) -> Result<Placement, NumaError> {
        area_placement(topology, self.as_slice())
    }
}

/// How hwloc says `area` is bound and where its pages are (see [`NodeMemory::placement`]).
pub(crate) fn area_placement(topology: &Topology, area: &[u8]) -> Result<Placement, NumaError> {
    let hw = topology
        .binder()
        .map_err(|reason| NumaError::PlacementUnavailable {
            reason: reason.to_owned(),
        })?;
    let query = || -> Result<Placement, String> {
        let (bound_set, policy) = hw
            .area_memory_binding::<[u8], NodeSet>(area, MemoryBindingFlags::empty())
            .map_err(|error| format!("binding query: {error}"))?;
        let can_locate = hw
            .feature_support()
            .memory_binding()
            .is_some_and(|support| support.get_area_memory_location());
        let resident_nodes = if can_locate {
            let resident_set = hw
                .area_memory_location::<[u8], NodeSet>(area, MemoryBindingFlags::empty())
                .map_err(|error| format!("location query: {error}"))?;
            Some(dense_nodes(topology, &resident_set))
        } else {
            None
        };
        Ok(Placement {
            bound_nodes: dense_nodes(topology, &bound_set),
            policy: policy.map(|policy| policy.to_string()),
            resident_nodes,
        })
    };
    let failure = |reason: String| NumaError::PlacementQuery {
        len_bytes: area.len(),
        reason,
    };
    match panic::catch_unwind(AssertUnwindSafe(query)) {
        Ok(result) => result.map_err(failure),
        Err(payload) => Err(failure(format!(
            "hwlocality panicked: {}",
            panic_message(payload.as_ref())
        ))),
    }
}

impl Drop for NodeMemory {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len_bytes` describe exactly the mapping created in `allocate`, which
        // has not been unmapped yet (only drop unmaps), and no borrow of it can outlive `self`.
        // munmap can only fail for invalid arguments, which these are not; there is nothing
        // useful to do on failure in a destructor anyway.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast::<libc::c_void>(), self.len_bytes);
        }
    }
}

impl std::fmt::Debug for NodeMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeMemory")
            .field("ptr", &self.ptr)
            .field("len_bytes", &self.len_bytes)
            .field("node", &self.node)
            .field("binding_note", &self.binding_note())
            .finish()
    }
}

/// The size of a transparent huge page on x86-64 and arm64 (4 KiB base pages).
const HUGE_PAGE_BYTES: usize = 2 << 20;

/// A fresh private anonymous read-write mapping of `len_bytes` (> 0) bytes.
///
/// A mapping of whole huge pages starts on a huge-page boundary and asks for transparent huge
/// pages (`MADV_HUGEPAGE`; hosts whose THP setting is `madvise`, Debian's default, give them
/// only when asked): page pools carve their chunks page after page, so a 2 MiB chunk is used
/// whole, and one fault that zeroes 2 MiB replaces 512 faults of 4 KiB each (sort of 10^6
/// values: its 30 MB of pages took 7,500 faults, a fifth of the run). Best effort: where the
/// kernel says no, the mapping has 4 KiB pages as before.
fn map_anonymous(len_bytes: usize) -> io::Result<NonNull<u8>> {
    let huge = len_bytes % HUGE_PAGE_BYTES == 0;
    // Room to move the start to a huge-page boundary; the excess is unmapped below.
    let map_len = if huge {
        len_bytes
            .checked_add(HUGE_PAGE_BYTES)
            .ok_or_else(|| io::Error::other("mapping size overflows"))?
    } else {
        len_bytes
    };
    // SAFETY: a new anonymous mapping at an address of the kernel's choosing (null hint, no
    // MAP_FIXED) cannot alias any existing Rust object; all arguments are valid constants and
    // `map_len` is non-zero (checked by the caller). The result is checked for MAP_FAILED.
    let address = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if address == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let start = address as usize;
    if !huge {
        return NonNull::new(address.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"));
    }
    let aligned = start.next_multiple_of(HUGE_PAGE_BYTES);
    let head = aligned - start;
    let tail = map_len - head - len_bytes;
    // SAFETY: both ranges lie inside the mapping just made (`head + len_bytes + tail ==
    // map_len`), are page-aligned (mmap returns page-aligned addresses and `HUGE_PAGE_BYTES`
    // is a multiple of the page size), and nothing refers to them: unmapping them leaves
    // exactly `aligned .. aligned + len_bytes` mapped. A failed munmap only leaves memory
    // mapped that nothing uses.
    unsafe {
        if head > 0 {
            libc::munmap(address, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len_bytes) as *mut libc::c_void, tail);
        }
    }
    // SAFETY: `aligned .. aligned + len_bytes` is the private anonymous mapping kept above;
    // MADV_HUGEPAGE changes only how the kernel backs it, never its contents (zero-filled).
    // Refused (THP disabled, an old kernel): 4 KiB pages, as without it.
    unsafe {
        libc::madvise(aligned as *mut libc::c_void, len_bytes, libc::MADV_HUGEPAGE);
    }
    NonNull::new(aligned as *mut u8).ok_or_else(|| io::Error::other("mmap returned a null mapping"))
}

/// Bind `area` to the node the kernel numbers `os_index`, with BIND + STRICT (see module doc).
fn bind_area(hw: &HwTopology, os_index: u32, area: &[u8]) -> Result<(), String> {
    let bind = || -> Result<(), String> {
        let os_index = usize::try_from(os_index)
            .map_err(|_| format!("OS node number {os_index} does not fit in usize"))?;
        let node = hw
            .node_with_os_index(os_index)
            .ok_or_else(|| format!("hwloc has no NUMA node with OS number {os_index}"))?;
        let nodeset = node
            .nodeset()
            .ok_or_else(|| format!("hwloc's NUMA node {os_index} has no nodeset"))?;
        hw.bind_memory_area::<[u8], _>(
            area,
            nodeset,
            MemoryBindingPolicy::Bind,
            MemoryBindingFlags::STRICT,
        )
        .map_err(|error| format!("hwloc_set_area_membind failed: {error}"))
    };
    match panic::catch_unwind(AssertUnwindSafe(bind)) {
        Ok(result) => result,
        Err(payload) => Err(format!(
            "hwlocality panicked: {}",
            panic_message(payload.as_ref())
        )),
    }
}

/// Dense node indexes of the OS node numbers in `set` (all nodes for an infinite set).
fn dense_nodes(topology: &Topology, set: &NodeSet) -> Vec<usize> {
    if set.weight().is_none() {
        return (0..topology.nodes().len()).collect();
    }
    set.iter_set()
        .filter_map(|os| u32::try_from(usize::from(os)).ok())
        .filter_map(|os| topology.node_by_os_index(os))
        .collect()
}
