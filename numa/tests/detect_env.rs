//! How `Topology::detect` degrades when hwloc fails or describes something other than this
//! machine. hwloc reads its environment at load time, so these cases set hwloc's variables; they
//! live in one test of their own binary so that no other test sees the variables.

// Tests fail loudly on purpose: an unwrap here is an assertion.
#![allow(clippy::unwrap_used)]

use dvm_numa::{NodeMemory, Topology, TopologySource};

fn detect_with(variable: &str, value: &str) -> Topology {
    std::env::set_var(variable, value);
    let topology = Topology::detect();
    std::env::remove_var(variable);
    eprintln!("{variable}={value}:\n{}", topology.render());
    topology
}

#[test]
fn detect_degrades_instead_of_failing() {
    // No discovery component at all: hwloc_topology_load fails, detect falls back.
    let topology = detect_with("HWLOC_COMPONENTS", "-linux,-x86,-no_os");
    let TopologySource::Fallback { reason } = topology.source() else {
        panic!("expected a fallback, got {:?}", topology.source());
    };
    assert!(reason.contains("hwloc"), "{reason}");
    let parallelism = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(topology.cores().len(), parallelism);
    assert_eq!(topology.plan_workers(parallelism).len(), parallelism);
    let memory = NodeMemory::allocate(&topology, 0, 4096).unwrap();
    assert!(!memory.bound_to_node());
    assert!(memory.binding_note().unwrap().contains(reason.as_str()));

    // Without the Linux and x86 backends hwloc sees PUs but no Core objects: each PU becomes a
    // core of its own.
    let topology = detect_with("HWLOC_COMPONENTS", "-linux,-x86");
    assert!(
        matches!(topology.source(), TopologySource::Hwloc { .. }),
        "{topology:?}"
    );
    assert!(!topology.cores().is_empty());
    assert!(
        topology.cores().iter().all(|core| core.pus.len() == 1),
        "{topology:?}"
    );
    assert_eq!(topology.pu_count(), topology.cores().len());

    // A synthetic machine from the environment is hwloc's, but not this machine: its memory
    // must not be bound with it.
    let topology = detect_with("HWLOC_SYNTHETIC", "numa:2 core:2 pu:1");
    assert!(
        matches!(topology.source(), TopologySource::Hwloc { .. }),
        "{topology:?}"
    );
    assert_eq!(topology.nodes().len(), 2);
    let note = topology.memory_binding_note().unwrap();
    assert!(note.contains("not read from this machine"), "{note}");
    let memory = NodeMemory::allocate(&topology, 1, 4096).unwrap();
    assert!(!memory.bound_to_node());

    // With the environment restored, detection is back to this machine.
    let topology = Topology::detect();
    assert!(matches!(topology.source(), TopologySource::Hwloc { .. }));
    assert!(topology.memory_binding_note().is_none(), "{topology:?}");
}
