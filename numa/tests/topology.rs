//! Topology detection, the fallback, synthetic multi-node topologies and worker placement.

// Tests fail loudly on purpose: an unwrap here is an assertion.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use dvm_numa::{Topology, TopologySource, WorkerSlot};

/// The invariants the crate documents for every topology, whatever its source.
fn assert_invariants(topology: &Topology) {
    let nodes = topology.nodes();
    let cores = topology.cores();
    assert!(!nodes.is_empty(), "no NUMA node in {topology:?}");
    assert!(!cores.is_empty(), "no core in {topology:?}");
    assert!(topology.packages() >= 1);
    for (index, node) in nodes.iter().enumerate() {
        assert_eq!(node.index, index, "node indexes must be dense");
        assert!(
            node.cores.windows(2).all(|pair| pair[0] < pair[1]),
            "node {index} cores not ascending: {:?}",
            node.cores
        );
        for &core in &node.cores {
            assert_eq!(
                cores[core].node, index,
                "core {core} listed under node {index}"
            );
        }
    }
    let mut all_pus = BTreeSet::new();
    for (index, core) in cores.iter().enumerate() {
        assert_eq!(core.index, index, "core indexes must be dense");
        assert!(core.node < nodes.len());
        assert!(
            nodes[core.node].cores.contains(&index),
            "core {index} missing from its node"
        );
        assert!(core.package < topology.packages());
        assert!(!core.pus.is_empty(), "core {index} has no PU");
        for &pu in &core.pus {
            assert!(all_pus.insert(pu), "PU {pu} belongs to two cores");
        }
    }
    assert_eq!(
        all_pus.len(),
        topology.pu_count(),
        "cores' PUs must cover pu_count exactly"
    );
    let listed: usize = nodes.iter().map(|node| node.cores.len()).sum();
    assert_eq!(
        listed,
        cores.len(),
        "every core belongs to exactly one node"
    );
}

#[test]
fn detect_reads_this_machine_with_hwloc() {
    let topology = Topology::detect();
    eprintln!("{}", topology.render());
    assert_invariants(&topology);
    match topology.source() {
        TopologySource::Hwloc { version } => {
            assert!(
                version.starts_with('2'),
                "unexpected hwloc version {version:?}"
            )
        }
        other => panic!("hwloc is installed here, yet detection gave {other:?}"),
    }
    let parallelism = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        topology.pu_count() >= parallelism,
        "hwloc sees {} PUs but the process may use {parallelism}",
        topology.pu_count()
    );
    // Every PU hwloc reports is a real OS processor id the kernel knows.
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    let online = parse_cpu_list(&online);
    for core in topology.cores() {
        for pu in &core.pus {
            assert!(online.contains(pu), "PU {pu} is not online ({online:?})");
        }
    }
    // Node memory is known on Linux and the OS node numbers are real.
    for node in topology.nodes() {
        assert!(node.memory_bytes.is_some_and(|bytes| bytes > 0), "{node:?}");
        let sysfs = format!("/sys/devices/system/node/node{}", node.os_index);
        assert!(std::path::Path::new(&sysfs).exists(), "{sysfs} missing");
    }
}

/// "0-3,8" -> {0,1,2,3,8}
fn parse_cpu_list(list: &str) -> BTreeSet<u32> {
    let mut ids = BTreeSet::new();
    for part in list.trim().split(',').filter(|part| !part.is_empty()) {
        match part.split_once('-') {
            Some((start, end)) => {
                ids.extend(start.parse::<u32>().unwrap()..=end.parse::<u32>().unwrap())
            }
            None => {
                ids.insert(part.parse::<u32>().unwrap());
            }
        }
    }
    ids
}

#[test]
fn render_reports_source_nodes_and_cores() {
    let topology = Topology::detect();
    let report = topology.render();
    assert!(report.starts_with("source: "), "{report}");
    assert!(
        report.contains(&format!("packages: {}", topology.packages())),
        "{report}"
    );
    assert!(
        report.contains(&format!("NUMA nodes: {}", topology.nodes().len())),
        "{report}"
    );
    for node in topology.nodes() {
        assert!(report.contains(&format!("node {} (OS node {})", node.index, node.os_index)));
    }
    for core in topology.cores() {
        assert!(
            report.contains(&format!("core {}: node {}", core.index, core.node)),
            "{report}"
        );
    }
    assert_eq!(report, topology.to_string());
}

#[test]
fn fallback_keeps_reason_and_is_usable() {
    let topology = Topology::fallback("hwloc refused for this test");
    assert_invariants(&topology);
    assert_eq!(
        topology.source(),
        &TopologySource::Fallback {
            reason: "hwloc refused for this test".to_owned()
        }
    );
    let parallelism = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(topology.cores().len(), parallelism);
    assert_eq!(topology.nodes().len(), 1);
    assert!(topology.cores().iter().all(|core| core.pus.len() == 1));
    assert!(topology.render().contains("hwloc refused for this test"));
    assert!(topology.memory_binding_note().is_some());
    // The fallback's PU ids are ones this thread may run on.
    let allowed = dvm_numa::current_thread_pus().unwrap();
    for core in topology.cores() {
        assert!(
            allowed.contains(&core.pus[0]),
            "{:?} not in {allowed:?}",
            core.pus
        );
    }
}

/// Each core is used `per_core` times and the first pass covers every core once.
fn assert_each_core_used(topology: &Topology, slots: &[WorkerSlot], per_core: usize) {
    let cores = topology.cores().len();
    assert_eq!(slots.len(), cores * per_core);
    let mut uses: BTreeMap<usize, usize> = BTreeMap::new();
    for (index, slot) in slots.iter().enumerate() {
        assert_eq!(slot.worker, index);
        let core = &topology.cores()[slot.core];
        assert_eq!(slot.node, core.node, "slot node must be its core's node");
        assert!(
            core.pus.contains(&slot.pu),
            "slot PU {} not on core {}",
            slot.pu,
            slot.core
        );
        *uses.entry(slot.core).or_default() += 1;
    }
    assert_eq!(uses.len(), cores, "every core gets a worker");
    assert!(uses.values().all(|&count| count == per_core), "{uses:?}");
    let first_pass: BTreeSet<usize> = slots[..cores].iter().map(|slot| slot.core).collect();
    assert_eq!(
        first_pass.len(),
        cores,
        "the first pass uses each core once"
    );
}

#[test]
fn plan_workers_on_this_machine() {
    let topology = Topology::detect();
    let cores = topology.cores().len();

    assert!(topology.plan_workers(0).is_empty());

    let one = topology.plan_workers(1);
    let first_core = &topology.cores()[topology.nodes()[0].cores[0]];
    assert_eq!(
        one,
        vec![WorkerSlot {
            worker: 0,
            core: first_core.index,
            node: 0,
            pu: first_core.pus[0]
        }]
    );

    let per_core = topology.plan_workers(cores);
    assert_each_core_used(&topology, &per_core, 1);
    for slot in &per_core {
        assert_eq!(
            slot.pu,
            topology.cores()[slot.core].pus[0],
            "first pass uses first PUs"
        );
    }

    let triple = topology.plan_workers(3 * cores);
    assert_each_core_used(&topology, &triple, 3);
    // Reuse follows the first pass's order.
    for (index, slot) in triple.iter().enumerate() {
        assert_eq!(slot.core, per_core[index % cores].core);
    }
}

#[test]
fn plan_workers_spreads_across_nodes_round_robin() {
    // 2 packages x 2 nodes x 2 cores x 2 PUs: 4 nodes, 8 cores, 16 PUs.
    let topology = Topology::from_synthetic("pack:2 numa:2 core:2 pu:2").unwrap();
    assert_invariants(&topology);
    assert!(matches!(
        topology.source(),
        TopologySource::Synthetic { .. }
    ));
    assert_eq!(topology.packages(), 2);
    assert_eq!(topology.nodes().len(), 4);
    assert_eq!(topology.cores().len(), 8);
    assert_eq!(topology.pu_count(), 16);
    for node in topology.nodes() {
        assert_eq!(node.cores.len(), 2, "{node:?}");
        assert_eq!(node.memory_bytes, Some(1 << 30));
    }
    assert_eq!(topology.cores()[5].package, 1);
    assert_eq!(topology.cores()[5].pus, vec![10, 11]);

    let four = topology.plan_workers(4);
    let nodes: Vec<usize> = four.iter().map(|slot| slot.node).collect();
    assert_eq!(
        nodes,
        vec![0, 1, 2, 3],
        "one worker per node before doubling up"
    );

    let eight = topology.plan_workers(8);
    let cores: Vec<usize> = eight.iter().map(|slot| slot.core).collect();
    assert_eq!(cores, vec![0, 2, 4, 6, 1, 3, 5, 7]);
    assert_each_core_used(&topology, &eight, 1);

    let twenty_four = topology.plan_workers(24);
    assert_each_core_used(&topology, &twenty_four, 3);
    // Second pass moves to each core's second hardware thread, third pass wraps around.
    assert_eq!(twenty_four[0].pu, 0);
    assert_eq!(twenty_four[8].pu, 1);
    assert_eq!(twenty_four[16].pu, 0);
    let distinct: BTreeSet<u32> = twenty_four[..16].iter().map(|slot| slot.pu).collect();
    assert_eq!(
        distinct.len(),
        16,
        "16 workers on 16 PUs must not share a PU"
    );
}

#[test]
fn cores_go_to_their_most_local_node_and_cpu_less_nodes_get_none() {
    // A machine-wide memory node (like HBM or CXL memory) plus one node per package: cores
    // belong to their package's node, the machine-wide node has no cores of its own.
    let topology =
        Topology::from_synthetic("[numa(memory=1000000)] pack:2 [numa] core:2 pu:1").unwrap();
    assert_invariants(&topology);
    eprintln!("{}", topology.render());
    assert_eq!(topology.nodes().len(), 3);
    let per_node: Vec<usize> = topology
        .nodes()
        .iter()
        .map(|node| node.cores.len())
        .collect();
    let cpu_less: Vec<usize> = topology
        .nodes()
        .iter()
        .filter(|node| node.cores.is_empty())
        .map(|node| node.index)
        .collect();
    assert_eq!(cpu_less.len(), 1, "{per_node:?}");
    assert_eq!(topology.nodes()[cpu_less[0]].memory_bytes, Some(1_000_000));
    let slots = topology.plan_workers(4);
    assert_each_core_used(&topology, &slots, 1);
    assert!(slots.iter().all(|slot| slot.node != cpu_less[0]));
    let nodes: BTreeSet<usize> = slots[..2].iter().map(|slot| slot.node).collect();
    assert_eq!(
        nodes.len(),
        2,
        "the first two workers go to different nodes"
    );
}

#[test]
fn invalid_synthetic_description_is_an_error_not_a_panic() {
    let error = Topology::from_synthetic("this is not a topology").unwrap_err();
    let message = error.to_string();
    assert!(message.contains("this is not a topology"), "{message}");
}
