//! The machine's topology as DVM uses it, and worker placement on it.
//!
//! Built once at start-up from hwloc (or, when hwloc fails, from
//! `std::thread::available_parallelism`), then immutable and cheap to clone. hwloc's own
//! topology is kept only for memory binding ([`crate::NodeMemory`]); everything else is copied
//! out into plain vectors so that the scheduler never calls into hwloc on a hot path.
//!
//! Invariants (established by every constructor): at least one node and one core; every core
//! has at least one PU and its PUs are distinct from every other core's; `cores[i].index == i`,
//! `nodes[i].index == i`; core `c` appears in `nodes[cores[c].node].cores`, in ascending order.

use std::any::Any;
use std::fmt;
use std::num::{NonZeroU64, NonZeroUsize};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;

use hwlocality::cpu::cpuset::CpuSet;
use hwlocality::errors::RawHwlocError;
use hwlocality::object::attributes::ObjectAttributes;
use hwlocality::object::types::ObjectType;
use hwlocality::object::TopologyObject;

use crate::error::NumaError;
use crate::pin::current_thread_pus;

/// hwloc's topology (hwlocality's type; `Send + Sync`).
pub(crate) type HwTopology = hwlocality::Topology;

/// Where a [`Topology`] came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TopologySource {
    /// Read from this machine by hwloc; `version` is the hwloc library's (e.g. "2.9.0").
    Hwloc { version: String },
    /// Built by hwloc from a synthetic description (tests and planning for other machines);
    /// its PUs are not this machine's and its memory cannot be bound.
    Synthetic { description: String },
    /// hwloc was unusable; one node, one core per available processor. `reason` says why, so
    /// the engine can report it once.
    Fallback { reason: String },
}

impl fmt::Display for TopologySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hwloc { version } => write!(f, "hwloc {version}"),
            Self::Synthetic { description } => {
                write!(f, "hwloc synthetic topology {description:?}")
            }
            Self::Fallback { reason } => write!(f, "fallback without hwloc ({reason})"),
        }
    }
}

/// One NUMA node: a memory bank and the cores closest to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaNode {
    /// Dense index into [`Topology::nodes`].
    pub index: usize,
    /// The kernel's node number (as in `/sys/devices/system/node/nodeN`).
    pub os_index: u32,
    /// Memory local to this node, when hwloc knows it.
    pub memory_bytes: Option<u64>,
    /// Indexes into [`Topology::cores`], ascending. Empty for CPU-less (memory-only) nodes.
    pub cores: Vec<usize>,
}

/// One physical core.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Core {
    /// Dense index into [`Topology::cores`].
    pub index: usize,
    /// Index into [`Topology::nodes`] of the node whose memory is closest.
    pub node: usize,
    /// Dense package (socket) index, `< Topology::packages()`.
    pub package: usize,
    /// OS processor ids of the core's hardware threads, ascending, never empty.
    pub pus: Vec<u32>,
}

/// Where one worker thread should run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerSlot {
    /// Worker number, `0..workers`.
    pub worker: usize,
    /// Index into [`Topology::cores`].
    pub core: usize,
    /// Index into [`Topology::nodes`] (the core's node).
    pub node: usize,
    /// OS processor id to pin the worker to.
    pub pu: u32,
}

/// DVM's view of the machine. See the module documentation for invariants.
#[derive(Clone)]
pub struct Topology {
    source: TopologySource,
    nodes: Vec<NumaNode>,
    cores: Vec<Core>,
    packages: usize,
    pu_count: usize,
    /// hwloc's topology when memory can be bound with it, else why not. Shared so that clones
    /// of a `Topology` do not reload hwloc.
    binder: Result<Arc<HwTopology>, String>,
}

/// The plain-data part of a topology, as extracted from hwloc.
struct Shape {
    nodes: Vec<NumaNode>,
    cores: Vec<Core>,
    packages: usize,
}

impl Topology {
    /// Read the topology of this machine with hwloc; if that fails (or hwlocality panics),
    /// return [`Topology::fallback`] with the reason. Never fails, never panics.
    pub fn detect() -> Topology {
        match panic::catch_unwind(AssertUnwindSafe(detect_with_hwloc)) {
            Ok(Ok(topology)) => topology,
            Ok(Err(reason)) => Topology::fallback(reason),
            Err(payload) => Topology::fallback(format!(
                "hwlocality panicked while reading the topology: {}",
                panic_message(payload.as_ref())
            )),
        }
    }

    /// A topology that needs nothing from hwloc: one NUMA node and one single-PU core per
    /// processor `std::thread::available_parallelism` grants, using the OS ids of the calling
    /// thread's affinity mask when the kernel reports one. `reason` is kept as the source.
    pub fn fallback(reason: impl Into<String>) -> Topology {
        let count = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        // available_parallelism may be below the mask size (cgroup CPU quota), so the mask only
        // supplies ids; the count decides how many cores there are.
        let pus: Vec<u32> = match current_thread_pus() {
            Some(mask) if mask.len() >= count => mask.into_iter().take(count).collect(),
            _ => (0..count).filter_map(|id| u32::try_from(id).ok()).collect(),
        };
        let cores: Vec<Core> = pus
            .into_iter()
            .enumerate()
            .map(|(index, pu)| Core {
                index,
                node: 0,
                package: 0,
                pus: vec![pu],
            })
            .collect();
        let nodes = vec![NumaNode {
            index: 0,
            os_index: 0,
            memory_bytes: None,
            cores: (0..cores.len()).collect(),
        }];
        let reason = reason.into();
        let binder = Err(format!("hwloc is not in use: {reason}"));
        Topology::from_shape(
            TopologySource::Fallback { reason },
            Shape {
                nodes,
                cores,
                packages: 1,
            },
            binder,
        )
    }

    /// A topology built by hwloc from a synthetic description such as
    /// `"pack:2 numa:2 core:4 pu:2"` (see hwloc's "Synthetic topologies" documentation). Used to
    /// exercise multi-node code on a single-node machine; its memory cannot be bound and its PU
    /// ids are hwloc's invention.
    ///
    /// # Errors
    /// [`NumaError::Synthetic`] if hwloc rejects the description or it has no usable core.
    pub fn from_synthetic(description: &str) -> Result<Topology, NumaError> {
        let build = || -> Result<Topology, String> {
            let hw = HwTopology::builder()
                .from_synthetic(description)
                .map_err(|error| error.to_string())?
                .build()
                .map_err(|error| describe_hwloc_error(&error))?;
            let shape = shape_from_hwloc(&hw)?;
            Ok(Topology::from_shape(
                TopologySource::Synthetic {
                    description: description.to_owned(),
                },
                shape,
                Err("a synthetic topology has no memory to bind".to_owned()),
            ))
        };
        let failure = |reason: String| NumaError::Synthetic {
            description: description.to_owned(),
            reason,
        };
        match panic::catch_unwind(AssertUnwindSafe(build)) {
            Ok(result) => result.map_err(failure),
            Err(payload) => Err(failure(format!(
                "hwlocality panicked: {}",
                panic_message(payload.as_ref())
            ))),
        }
    }

    fn from_shape(
        source: TopologySource,
        shape: Shape,
        binder: Result<Arc<HwTopology>, String>,
    ) -> Topology {
        let pu_count = shape.cores.iter().map(|core| core.pus.len()).sum();
        Topology {
            source,
            nodes: shape.nodes,
            cores: shape.cores,
            packages: shape.packages,
            pu_count,
            binder,
        }
    }

    /// Where this topology came from.
    pub fn source(&self) -> &TopologySource {
        &self.source
    }

    /// NUMA nodes, by dense index; never empty.
    pub fn nodes(&self) -> &[NumaNode] {
        &self.nodes
    }

    /// Cores, by dense index; never empty. Cores of one node are contiguous when hwloc lists
    /// them so (it does on every machine we know), but only `NumaNode::cores` is authoritative.
    pub fn cores(&self) -> &[Core] {
        &self.cores
    }

    /// Number of packages (sockets); at least 1.
    pub fn packages(&self) -> usize {
        self.packages
    }

    /// Number of OS processors (hardware threads) across all cores.
    pub fn pu_count(&self) -> usize {
        self.pu_count
    }

    /// The dense index of the node the kernel numbers `os_index`, if any.
    pub fn node_by_os_index(&self, os_index: u32) -> Option<usize> {
        self.nodes.iter().position(|node| node.os_index == os_index)
    }

    /// `None` when [`crate::NodeMemory`] can bind memory to nodes with this topology, else why
    /// it cannot (so the engine can say it once instead of once per allocation).
    pub fn memory_binding_note(&self) -> Option<&str> {
        self.binder.as_ref().err().map(String::as_str)
    }

    pub(crate) fn binder(&self) -> Result<&HwTopology, &str> {
        match &self.binder {
            Ok(hw) => Ok(hw),
            Err(reason) => Err(reason),
        }
    }

    /// Worker placement for `workers` threads. Workers take one core each first, spreading
    /// across nodes round-robin (worker 0 on node 0's first core, worker 1 on node 1's first
    /// core, ..., then each node's second core, and so on; CPU-less nodes are skipped). Once
    /// every core has a worker, further workers reuse cores in the same order. `pu` is the
    /// core's first PU on the first pass; later passes rotate through the core's hardware
    /// threads, so that two workers on a two-thread core run on distinct PUs.
    pub fn plan_workers(&self, workers: usize) -> Vec<WorkerSlot> {
        let order = self.round_robin_cores();
        if order.is_empty() {
            return Vec::new();
        }
        (0..workers)
            .filter_map(|worker| {
                let core = self.cores.get(order[worker % order.len()])?;
                let pass = worker / order.len();
                let pu = *core.pus.get(pass % core.pus.len().max(1))?;
                Some(WorkerSlot {
                    worker,
                    core: core.index,
                    node: core.node,
                    pu,
                })
            })
            .collect()
    }

    /// All core indexes, visiting nodes round-robin: rank 0 of every node, then rank 1, ...
    fn round_robin_cores(&self) -> Vec<usize> {
        let deepest = self
            .nodes
            .iter()
            .map(|node| node.cores.len())
            .max()
            .unwrap_or(0);
        (0..deepest)
            .flat_map(|rank| {
                self.nodes
                    .iter()
                    .filter_map(move |node| node.cores.get(rank).copied())
            })
            .collect()
    }

    /// Human-readable multi-line report for `dvm topology`: source, packages, nodes with their
    /// memory and cores, cores with their PUs, and whether memory can be bound.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        // Writing into a String cannot fail; the results are ignored for that reason.
        let _ = writeln!(out, "source: {}", self.source);
        let _ = writeln!(
            out,
            "packages: {}, NUMA nodes: {}, cores: {}, PUs: {}",
            self.packages,
            self.nodes.len(),
            self.cores.len(),
            self.pu_count
        );
        for node in &self.nodes {
            let memory = node
                .memory_bytes
                .map_or_else(|| "memory unknown".to_owned(), format_bytes);
            let cores = if node.cores.is_empty() {
                "no cores".to_owned()
            } else {
                format!("cores {}", format_ids(node.cores.iter().map(|&c| c as u64)))
            };
            let _ = writeln!(
                out,
                "node {} (OS node {}): {memory}, {cores}",
                node.index, node.os_index
            );
            for core in node.cores.iter().filter_map(|&core| self.cores.get(core)) {
                let _ = writeln!(
                    out,
                    "  core {}: node {}, package {}, PUs {}",
                    core.index,
                    core.node,
                    core.package,
                    format_ids(core.pus.iter().map(|&pu| u64::from(pu)))
                );
            }
        }
        match self.memory_binding_note() {
            None => out.push_str("node-local memory: bound with hwloc\n"),
            Some(reason) => {
                let _ = writeln!(out, "node-local memory: not bound ({reason})");
            }
        }
        out
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

impl fmt::Debug for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Topology")
            .field("source", &self.source)
            .field("nodes", &self.nodes)
            .field("cores", &self.cores)
            .field("packages", &self.packages)
            .field("pu_count", &self.pu_count)
            .field("memory_binding_note", &self.memory_binding_note())
            .finish()
    }
}

/// Load this machine's topology with hwloc, or say why not.
fn detect_with_hwloc() -> Result<Topology, String> {
    let hw = HwTopology::new().map_err(|error| {
        format!(
            "hwloc could not load the topology: {}",
            describe_hwloc_error(&error)
        )
    })?;
    let version = hwloc_version(&hw);
    let shape = shape_from_hwloc(&hw)?;
    let binder = if !hw.is_this_system() {
        // HWLOC_XMLFILE / HWLOC_SYNTHETIC in the environment make hwloc describe some other
        // machine; binding with it would bind to nodes that may not exist here.
        Err("hwloc's topology was not read from this machine (HWLOC_XMLFILE or HWLOC_SYNTHETIC set?)".to_owned())
    } else if !hw
        .feature_support()
        .memory_binding()
        .is_some_and(|support| support.set_area())
    {
        Err("hwloc cannot bind memory areas on this system".to_owned())
    } else {
        Ok(Arc::new(hw))
    };
    Ok(Topology::from_shape(
        TopologySource::Hwloc { version },
        shape,
        binder,
    ))
}

/// Copy nodes, cores and packages out of hwloc's tree.
fn shape_from_hwloc(hw: &HwTopology) -> Result<Shape, String> {
    let node_objects: Vec<&TopologyObject> = hw.objects_with_type(ObjectType::NUMANode).collect();
    if node_objects.is_empty() {
        return Err("hwloc reported no NUMA node".to_owned());
    }
    let mut nodes: Vec<NumaNode> = node_objects
        .iter()
        .enumerate()
        .map(|(index, object)| NumaNode {
            index,
            os_index: object
                .os_index()
                .and_then(|os| u32::try_from(os).ok())
                .unwrap_or_else(|| u32::try_from(index).unwrap_or(u32::MAX)),
            memory_bytes: node_memory_bytes(object),
            cores: Vec::new(),
        })
        .collect();

    // Some virtual machines expose PUs without Core objects: then each PU stands for a core.
    let mut core_objects: Vec<&TopologyObject> = hw.objects_with_type(ObjectType::Core).collect();
    if core_objects.is_empty() {
        core_objects = hw.objects_with_type(ObjectType::PU).collect();
    }
    let packages = hw.objects_with_type(ObjectType::Package).len().max(1);

    let mut cores: Vec<Core> = Vec::with_capacity(core_objects.len());
    for object in core_objects {
        let Some(cpuset) = object.cpuset() else {
            continue;
        };
        let pus = cpuset_pus(&cpuset);
        // A core whose PUs are all disallowed (cgroup cpuset) cannot run workers.
        if pus.is_empty() {
            continue;
        }
        let node = local_node(&node_objects, &cpuset);
        let package = object
            .first_ancestor_with_type(ObjectType::Package)
            .map_or(0, TopologyObject::logical_index)
            .min(packages - 1);
        let index = cores.len();
        if let Some(numa_node) = nodes.get_mut(node) {
            numa_node.cores.push(index);
        }
        cores.push(Core {
            index,
            node,
            package,
            pus,
        });
    }
    if cores.is_empty() {
        return Err("hwloc reported no core with a usable processor".to_owned());
    }
    Ok(Shape {
        nodes,
        cores,
        packages,
    })
}

/// The node a core's memory accesses are closest to. In hwloc 2 NUMA nodes are memory
/// children attached at the level whose CPUs they serve, so their cpusets nest: the smallest
/// node cpuset that contains the core's is the most local one (e.g. a sub-NUMA cluster rather
/// than a package-wide high-bandwidth memory). Ties go to the lowest index, which hwloc gives
/// to ordinary DRAM.
fn local_node(node_objects: &[&TopologyObject], core_cpuset: &CpuSet) -> usize {
    node_objects
        .iter()
        .enumerate()
        .filter_map(|(index, node)| {
            let node_cpuset = node.cpuset()?;
            node_cpuset
                .includes(core_cpuset)
                .then(|| (node_cpuset.weight().unwrap_or(usize::MAX), index))
        })
        .min()
        .map_or(0, |(_, index)| index)
}

/// OS processor ids of a cpuset; empty for an infinite set, which no real core has.
fn cpuset_pus(cpuset: &CpuSet) -> Vec<u32> {
    if cpuset.weight().is_none() {
        return Vec::new();
    }
    cpuset
        .iter_set()
        .filter_map(|pu| u32::try_from(usize::from(pu)).ok())
        .collect()
}

fn node_memory_bytes(node: &TopologyObject) -> Option<u64> {
    match node.attributes() {
        Some(ObjectAttributes::NUMANode(attributes)) => {
            attributes.local_memory().map(NonZeroU64::get)
        }
        _ => None,
    }
}

/// The hwloc library's release, which hwloc records on the root object; the API version
/// (which only moves when the API changes) if it is missing.
fn hwloc_version(hw: &HwTopology) -> String {
    if let Some(version) = hw.root_object().info("hwlocVersion") {
        return version.to_string_lossy().into_owned();
    }
    let api = hwlocality::hwloc_api_version();
    format!("API {}.{}.{}", api >> 16, (api >> 8) & 0xff, api & 0xff)
}

/// "hwloc_topology_load failed: Invalid argument (errno 22)"; hwlocality's own message prints
/// the errno with `Debug`, which is unreadable in a log line.
fn describe_hwloc_error(error: &RawHwlocError) -> String {
    match error.errno {
        Some(errno) => format!("{} failed: {errno} (errno {})", error.api, errno.0),
        None => format!("{} failed without setting errno", error.api),
    }
}

pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "non-text panic payload".to_owned()
    }
}

/// "3.8 GiB" style sizes for the report.
fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Ascending ids as compact ranges: 0-3,8,10-11.
fn format_ids(ids: impl IntoIterator<Item = u64>) -> String {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for id in ids {
        match ranges.last_mut() {
            Some((_, end)) if end.checked_add(1) == Some(id) => *end = id,
            _ => ranges.push((id, id)),
        }
    }
    ranges
        .iter()
        .map(|&(start, end)| {
            if start == end {
                start.to_string()
            } else {
                format!("{start}-{end}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_compacted_into_ranges() {
        assert_eq!(format_ids([0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(format_ids([5]), "5");
        assert_eq!(format_ids([]), "");
    }

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(4 * 1024 * 1024 * 1024), "4.0 GiB");
        assert_eq!(format_bytes(1536 * 1024), "1.5 MiB");
    }

    #[test]
    fn topology_is_send_sync_and_clone() {
        fn assert_traits<T: Send + Sync + Clone>() {}
        assert_traits::<Topology>();
    }
}
