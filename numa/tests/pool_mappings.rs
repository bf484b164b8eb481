//! The page pool's chunks as the kernel sees them (`/proc/self/maps`, `/proc/self/numa_maps`):
//! bound with MPOL_BIND to the pool's node, mapped while any page lives, unmapped when the
//! last page and the pool are gone. One test alone in its binary, so that no other test maps
//! or unmaps memory while it looks at the process's mappings.

// Tests fail loudly on purpose: an unwrap here is an assertion.
#![allow(clippy::unwrap_used)]

use dvm_numa::{PageBox, PagePool, Topology, PAGE_BYTES};

const CHUNK_PAGES: usize = 8;

/// The `[start, end)` of the mapping containing `address`, from /proc/self/maps.
fn mapping_containing(address: usize) -> Option<(usize, usize)> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines().find_map(|line| {
        let range = line.split_whitespace().next()?;
        let (start, end) = range.split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        (start <= address && address < end).then_some((start, end))
    })
}

/// The /proc/self/numa_maps line of the mapping that starts at `start` (the kernel prints
/// addresses with at least 8 hex digits; low addresses happen under valgrind).
fn numa_maps_line(start: usize) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/numa_maps").ok()?;
    let prefix = format!("{start:08x} ");
    maps.lines()
        .find(|line| line.starts_with(&prefix))
        .map(str::to_owned)
}

#[test]
fn chunks_are_bound_and_unmapped_after_the_last_page() {
    let topology = Topology::detect();
    let pool = PagePool::new(&topology, 0, CHUNK_PAGES * PAGE_BYTES).unwrap();
    let mut pages: Vec<PageBox> = (0..CHUNK_PAGES)
        .map(|_| pool.alloc_zeroed().unwrap())
        .collect();
    for page in &mut pages {
        page.fill(0x3C);
    }
    let address = pages[0].as_ptr() as usize;
    let (start, end) = mapping_containing(address).expect("the chunk is mapped");
    assert!(end - start >= CHUNK_PAGES * PAGE_BYTES);

    let kernel_reports_numa = std::path::Path::new("/proc/self/numa_maps").exists();
    if topology.memory_binding_note().is_none() && kernel_reports_numa {
        // Kernel's view: MPOL_BIND (not "prefer") on the node, all 8 pages resident there.
        let os_node = topology.nodes()[0].os_index;
        let line = numa_maps_line(start).expect("the chunk is listed in /proc/self/numa_maps");
        assert!(line.contains(&format!(" bind:{os_node} ")), "{line}");
        assert!(
            line.contains(&format!(" N{os_node}={CHUNK_PAGES}")),
            "{line}"
        );
    } else {
        eprintln!(
            "binding not checked: {:?}, /proc/self/numa_maps: {kernel_reports_numa}",
            topology.memory_binding_note()
        );
    }

    // The pool handle goes first; one page keeps the chunk mapped.
    drop(pool);
    let last = pages.pop().unwrap();
    drop(pages);
    assert!(mapping_containing(address).is_some(), "unmapped too early");
    assert!(last.iter().all(|&byte| byte == 0x3C));
    drop(last);
    assert_eq!(
        mapping_containing(address),
        None,
        "the chunk must be unmapped once the pool and its pages are gone"
    );
}
