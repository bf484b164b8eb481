//! The page pool: zeroing and reuse, copies, distinct pages, cross-thread use, binding,
//! lifetime beyond the pool handle, and argument checking.

// Tests fail loudly on purpose: an unwrap here is an assertion.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::{mpsc, Arc, Mutex};

use dvm_numa::{NumaError, PageBox, PagePool, PoolStats, Topology, PAGE_BYTES};

const MIB: usize = 1 << 20;
/// Small chunks, so that tests cross chunk boundaries with few pages.
const SMALL_CHUNK_PAGES: usize = 16;
const SMALL_CHUNK: usize = SMALL_CHUNK_PAGES * PAGE_BYTES;

/// Fill `page` with 8-byte words that depend on `seed` and the word's offset.
fn write_pattern(page: &mut [u8; PAGE_BYTES], seed: u64) {
    for (word, bytes) in page.chunks_exact_mut(8).enumerate() {
        bytes.copy_from_slice(&pattern_word(seed, word).to_le_bytes());
    }
}

fn has_pattern(page: &[u8; PAGE_BYTES], seed: u64) -> bool {
    page.chunks_exact(8)
        .enumerate()
        .all(|(word, bytes)| bytes == pattern_word(seed, word).to_le_bytes())
}

fn pattern_word(seed: u64, word: usize) -> u64 {
    (seed << 16 | word as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
}

fn is_zero(page: &[u8; PAGE_BYTES]) -> bool {
    page.iter().all(|&byte| byte == 0)
}

#[test]
fn zeroed_pages_are_zero_and_recycled_pages_are_zeroed_again() {
    let topology = Topology::detect();
    let pool = PagePool::new(&topology, 0, 2 * MIB).unwrap();
    let pages_per_chunk = (2 * MIB / PAGE_BYTES) as u64;
    assert_eq!(
        pool.stats(),
        PoolStats {
            pages_in_use: 0,
            pages_free: 0,
            pages_never_used: 0,
            chunks: 0,
            reserved_bytes: 0,
            bound_to_node: topology.memory_binding_note().is_none(),
        },
        "nothing is reserved before the first allocation"
    );

    let mut page = pool.alloc_zeroed().unwrap();
    assert!(is_zero(&page));
    assert_eq!(page.as_ptr() as usize % PAGE_BYTES, 0, "page-aligned");
    let stats = pool.stats();
    assert_eq!(stats.chunks, 1);
    assert_eq!(stats.reserved_bytes, 2 * MIB as u64);
    assert_eq!(stats.pages_in_use, 1);
    assert_eq!(stats.pages_free, pages_per_chunk - 1);
    assert_eq!(stats.pages_never_used, pages_per_chunk - 1);

    page.fill(0xA5);
    let address = page.as_ptr();
    drop(page);
    let stats = pool.stats();
    assert_eq!((stats.pages_in_use, stats.pages_free), (0, pages_per_chunk));
    assert_eq!(
        stats.pages_never_used,
        pages_per_chunk - 1,
        "one page on the free list"
    );

    // The dirty page is reused (the free list is LIFO) and comes back zeroed.
    let page = pool.alloc_zeroed().unwrap();
    assert_eq!(page.as_ptr(), address, "the freed page is reused first");
    assert!(is_zero(&page), "a recycled page must be zeroed again");
    let stats = pool.stats();
    assert_eq!(stats.chunks, 1, "no new chunk for a reused page");
    assert_eq!(
        stats.pages_never_used,
        pages_per_chunk - 1,
        "no fresh page carved"
    );
    drop(page);

    // Many dirty pages at once: all reused, all zeroed, still one chunk.
    let mut pages: Vec<PageBox> = (0..100).map(|_| pool.alloc_zeroed().unwrap()).collect();
    for (seed, page) in pages.iter_mut().enumerate() {
        write_pattern(page, seed as u64);
    }
    let addresses: HashSet<_> = pages.iter().map(|page| page.as_ptr() as usize).collect();
    drop(pages);
    let before = pool.stats();
    let pages: Vec<PageBox> = (0..100).map(|_| pool.alloc_zeroed().unwrap()).collect();
    assert!(pages.iter().all(|page| is_zero(page)));
    let again: HashSet<_> = pages.iter().map(|page| page.as_ptr() as usize).collect();
    assert_eq!(addresses, again, "the same 100 pages are reused");
    let after = pool.stats();
    assert_eq!(after.chunks, 1);
    assert_eq!(after.pages_never_used, before.pages_never_used);
    assert_eq!(after.pages_in_use, 100);
}

/// Fresh pages are zero from mmap: alloc_zeroed must not write them (which would fault them
/// in). `mincore` tells whether a page is resident.
#[test]
fn alloc_zeroed_does_not_touch_fresh_pages() {
    let topology = Topology::detect();
    let pool = PagePool::new(&topology, 0, SMALL_CHUNK).unwrap();
    let pages: Vec<PageBox> = (0..4).map(|_| pool.alloc_zeroed().unwrap()).collect();
    for page in &pages {
        let mut resident = [0u8; 1];
        // SAFETY: the page is a live, page-aligned, one-page mapping range; `resident` has one
        // byte per page of that range. mincore reads no memory of ours.
        let rc = unsafe {
            libc::mincore(
                page.as_ptr().cast_mut().cast::<libc::c_void>(),
                PAGE_BYTES,
                resident.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        assert_eq!(
            resident[0] & 1,
            0,
            "a fresh page was touched by alloc_zeroed"
        );
    }
    assert!(pages.iter().all(|page| is_zero(page)));
}

#[test]
fn alloc_copy_copies_exactly() {
    let topology = Topology::detect();
    let pool = PagePool::new(&topology, 0, SMALL_CHUNK).unwrap();
    let mut source = [0u8; PAGE_BYTES];
    for (index, byte) in source.iter_mut().enumerate() {
        *byte = (index * 7 + 3) as u8;
    }
    // A fresh page.
    let copy = pool.alloc_copy(&source).unwrap();
    assert_eq!(*copy, source);

    // A recycled, dirty page must be overwritten entirely.
    let mut dirty = pool.alloc_zeroed().unwrap();
    dirty.fill(0xFF);
    let address = dirty.as_ptr();
    drop(dirty);
    let mut recycled = pool.alloc_copy(&source).unwrap();
    assert_eq!(recycled.as_ptr(), address);
    assert_eq!(*recycled, source);

    // A copy of a page is independent of it.
    let copy_of_copy = pool.alloc_copy(&recycled).unwrap();
    recycled[0] ^= 0xFF;
    assert_eq!(*copy_of_copy, source);
    assert_ne!(*recycled, source);
    assert_eq!(pool.stats().pages_in_use, 3);
}

#[test]
fn pages_allocated_at_once_are_distinct() {
    let topology = Topology::detect();
    let pool = PagePool::new(&topology, 0, SMALL_CHUNK).unwrap();
    let count = 3 * SMALL_CHUNK_PAGES + 1;
    let mut pages: Vec<PageBox> = (0..count)
        .map(|index| {
            if index % 2 == 0 {
                pool.alloc_zeroed().unwrap()
            } else {
                pool.alloc_copy(&[0x5A; PAGE_BYTES]).unwrap()
            }
        })
        .collect();
    for (seed, page) in pages.iter_mut().enumerate() {
        write_pattern(page, seed as u64);
    }
    for (seed, page) in pages.iter().enumerate() {
        assert!(
            has_pattern(page, seed as u64),
            "page {seed} was overwritten"
        );
    }
    // No two pages overlap.
    let mut addresses: Vec<usize> = pages.iter().map(|page| page.as_ptr() as usize).collect();
    addresses.sort_unstable();
    assert!(addresses
        .windows(2)
        .all(|pair| pair[1] - pair[0] >= PAGE_BYTES));

    let stats = pool.stats();
    assert_eq!(stats.chunks, 4, "3 chunks' worth plus one page");
    assert_eq!(stats.reserved_bytes, 4 * SMALL_CHUNK as u64);
    assert_eq!(stats.pages_in_use, count as u64);
    assert_eq!(
        stats.pages_free,
        4 * SMALL_CHUNK_PAGES as u64 - count as u64
    );

    // Freeing every other page and allocating as many again reuses exactly those.
    let mut kept = Vec::new();
    let mut freed = HashSet::new();
    for (index, page) in pages.into_iter().enumerate() {
        if index % 2 == 0 {
            freed.insert(page.as_ptr() as usize);
        } else {
            kept.push((index, page));
        }
    }
    let reused: Vec<PageBox> = (0..freed.len())
        .map(|_| pool.alloc_zeroed().unwrap())
        .collect();
    let reused_addresses: HashSet<usize> =
        reused.iter().map(|page| page.as_ptr() as usize).collect();
    assert_eq!(reused_addresses, freed);
    assert!(reused.iter().all(|page| is_zero(page)));
    for (seed, page) in &kept {
        assert!(has_pattern(page, *seed as u64), "kept page {seed} changed");
    }
    assert_eq!(pool.stats().chunks, 4);
}

#[test]
fn pages_move_between_threads_and_return_to_the_pool() {
    const PRODUCERS: usize = 4;
    const CONSUMERS: usize = 2;
    const PAGES_PER_PRODUCER: u64 = 2_000;
    const CHANNEL_BOUND: usize = 16;
    const CONSUMER_BUFFER: usize = 8;

    let topology = Topology::detect();
    let pool = PagePool::new(&topology, 0, SMALL_CHUNK).unwrap();
    // Addresses of pages owned right now: a second owner of a page would be caught here.
    let live: Arc<Mutex<HashSet<usize>>> = Arc::default();

    let mut senders = Vec::new();
    let mut consumers = Vec::new();
    for _ in 0..CONSUMERS {
        let (sender, receiver) = mpsc::sync_channel::<(u64, PageBox)>(CHANNEL_BOUND);
        senders.push(sender);
        let live = Arc::clone(&live);
        consumers.push(std::thread::spawn(move || {
            let mut held: Vec<(u64, PageBox)> = Vec::new();
            let mut checked = 0u64;
            for (seed, page) in receiver {
                held.push((seed, page));
                // Hold a few pages for a while, then drop them out of order.
                if held.len() > CONSUMER_BUFFER {
                    let (seed, page) = held.swap_remove(seed as usize % held.len());
                    assert!(has_pattern(&page, seed), "page {seed:#x} changed in flight");
                    assert!(live.lock().unwrap().remove(&(page.as_ptr() as usize)));
                    drop(page);
                    checked += 1;
                }
            }
            for (seed, page) in held {
                assert!(has_pattern(&page, seed), "page {seed:#x} changed in flight");
                assert!(live.lock().unwrap().remove(&(page.as_ptr() as usize)));
                checked += 1;
            }
            checked
        }));
    }

    let producers: Vec<_> = (0..PRODUCERS)
        .map(|producer| {
            let pool = Arc::clone(&pool);
            let senders = senders.clone();
            let live = Arc::clone(&live);
            std::thread::spawn(move || {
                for sequence in 0..PAGES_PER_PRODUCER {
                    let seed = (producer as u64) << 32 | sequence;
                    let mut page = if sequence % 3 == 0 {
                        pool.alloc_copy(&[0xEE; PAGE_BYTES]).unwrap()
                    } else {
                        let page = pool.alloc_zeroed().unwrap();
                        assert!(is_zero(&page), "recycled page not zeroed");
                        page
                    };
                    assert_eq!(page.node(), 0);
                    assert!(
                        live.lock().unwrap().insert(page.as_ptr() as usize),
                        "a page was handed out while owned"
                    );
                    write_pattern(&mut page, seed);
                    let consumer = (sequence as usize + producer) % senders.len();
                    senders[consumer].send((seed, page)).unwrap();
                }
            })
        })
        .collect();
    drop(senders);
    for producer in producers {
        producer.join().unwrap();
    }
    let checked: u64 = consumers.into_iter().map(|c| c.join().unwrap()).sum();
    assert_eq!(checked, PRODUCERS as u64 * PAGES_PER_PRODUCER);
    assert!(live.lock().unwrap().is_empty());

    let stats = pool.stats();
    let carved = stats.chunks * SMALL_CHUNK_PAGES as u64;
    assert_eq!(stats.pages_in_use, 0, "{stats:?}");
    assert_eq!(stats.pages_free, carved, "{stats:?}");
    // Pages alive at once: one per producer, CHANNEL_BOUND per channel, CONSUMER_BUFFER + 1
    // per consumer. A page is carved only when the free list is empty, i.e. every carved page
    // is alive or being dropped (at most one per consumer), so at most 4 + 32 + 18 + 2 = 56
    // pages are ever carved: 4 chunks of 16, whereas 8000 pages were allocated.
    let max_alive = PRODUCERS + CONSUMERS * CHANNEL_BOUND + CONSUMERS * (CONSUMER_BUFFER + 1);
    let bound = (max_alive + CONSUMERS).div_ceil(SMALL_CHUNK_PAGES) as u64;
    assert!(stats.chunks <= bound, "{stats:?}: more than {bound} chunks");
    eprintln!("cross-thread: {stats:?}");
}

#[test]
fn pages_are_bound_to_their_node_where_hwloc_allows() {
    let topology = Topology::detect();
    for node in topology.nodes() {
        let pool = PagePool::new(&topology, node.index, SMALL_CHUNK).unwrap();
        assert_eq!(pool.node(), node.index);
        let mut pages: Vec<PageBox> = (0..SMALL_CHUNK_PAGES + 1)
            .map(|_| pool.alloc_zeroed().unwrap())
            .collect();
        for page in &mut pages {
            page.fill(1); // fault every page in
            assert_eq!(page.node(), node.index);
        }
        let stats = pool.stats();
        assert_eq!(stats.chunks, 2);
        assert_eq!(stats.bound_to_node, pool.binding_note().is_none());
        match topology.memory_binding_note() {
            Some(reason) => {
                eprintln!("hwloc cannot bind memory here ({reason}); checked the unbound path");
                assert!(!stats.bound_to_node);
                assert!(pool.binding_note().unwrap().contains(reason));
            }
            None => {
                assert!(stats.bound_to_node, "{:?}", pool.binding_note());
                for page in &pages {
                    let placement = page.placement(&topology).unwrap();
                    assert_eq!(placement.bound_nodes, vec![node.index], "{placement:?}");
                    assert_eq!(placement.policy.as_deref(), Some("Bind"), "{placement:?}");
                    if let Some(resident) = &placement.resident_nodes {
                        assert_eq!(resident, &vec![node.index], "{placement:?}");
                    }
                }
            }
        }
    }
}

#[test]
fn without_binding_pages_are_still_handed_out_and_the_reason_is_kept() {
    let topology = Topology::fallback("no hwloc in this pool test");
    let pool = PagePool::new(&topology, 0, SMALL_CHUNK).unwrap();
    // Known before any chunk exists.
    assert!(!pool.stats().bound_to_node);
    assert!(pool
        .binding_note()
        .unwrap()
        .contains("no hwloc in this pool test"));
    let mut page = pool.alloc_zeroed().unwrap();
    page[PAGE_BYTES - 1] = 9;
    assert_eq!(page[PAGE_BYTES - 1], 9);
    assert!(!pool.stats().bound_to_node);
    assert!(matches!(
        page.placement(&topology),
        Err(NumaError::PlacementUnavailable { .. })
    ));

    // Any node of a synthetic multi-node machine, unbound.
    let synthetic = Topology::from_synthetic("numa:3 core:1 pu:1").unwrap();
    let pool = PagePool::new(&synthetic, 2, PAGE_BYTES).unwrap();
    let pages: Vec<PageBox> = (0..3).map(|_| pool.alloc_zeroed().unwrap()).collect();
    assert!(pages.iter().all(|page| page.node() == 2));
    assert_eq!(pool.stats().chunks, 3, "one-page chunks");
    assert!(pool.binding_note().unwrap().contains("synthetic"));
}

#[test]
fn pages_outlive_the_pool_handle() {
    let topology = Topology::detect();
    let pool = PagePool::new(&topology, 0, SMALL_CHUNK).unwrap();
    let count = 3 * SMALL_CHUNK_PAGES;
    let mut pages: Vec<PageBox> = (0..count).map(|_| pool.alloc_zeroed().unwrap()).collect();
    for (seed, page) in pages.iter_mut().enumerate() {
        write_pattern(page, seed as u64);
    }
    drop(pool);

    // Chunks are still mapped: read, write, drop some here and the rest on another thread.
    for (seed, page) in pages.iter_mut().enumerate() {
        assert!(has_pattern(page, seed as u64));
        write_pattern(page, seed as u64 + 1000);
    }
    let rest = pages.split_off(count / 2);
    for (seed, page) in pages.iter().enumerate() {
        assert!(has_pattern(page, seed as u64 + 1000));
    }
    drop(pages);
    std::thread::spawn(move || {
        for (offset, page) in rest.iter().enumerate() {
            assert!(has_pattern(page, (count / 2 + offset) as u64 + 1000));
            assert_eq!(page.node(), 0);
        }
        drop(rest);
    })
    .join()
    .unwrap();
}

#[test]
fn bad_node_or_chunk_size_is_an_error() {
    let topology = Topology::detect();
    let node_count = topology.nodes().len();
    let error = PagePool::new(&topology, node_count, 2 * MIB).unwrap_err();
    assert!(
        matches!(error, NumaError::UnknownNode { node, node_count: count } if node == node_count && count == node_count),
        "{error:?}"
    );
    assert!(PagePool::new(&topology, usize::MAX, 2 * MIB).is_err());

    for chunk_bytes in [0, 1, PAGE_BYTES - 1, PAGE_BYTES + 1, 6000, 2 * MIB + 512] {
        let error = PagePool::new(&topology, 0, chunk_bytes).unwrap_err();
        assert!(
            matches!(error, NumaError::InvalidChunkSize { node: 0, chunk_bytes: bytes, page_bytes: PAGE_BYTES } if bytes == chunk_bytes),
            "{chunk_bytes}: {error:?}"
        );
        assert!(error.to_string().contains("chunk size"), "{error}");
    }
    // 2^32 pages per chunk cannot be indexed.
    let error = PagePool::new(&topology, 0, (1usize << 32) * PAGE_BYTES).unwrap_err();
    assert!(
        matches!(error, NumaError::InvalidChunkSize { .. }),
        "{error:?}"
    );
    // The smallest and a large valid size.
    assert!(PagePool::new(&topology, 0, PAGE_BYTES).is_ok());
    assert!(PagePool::new(&topology, 0, 1 << 30).is_ok());
}

/// A chunk the kernel refuses is an Mmap error, and the pool stays usable.
#[test]
fn a_refused_chunk_is_an_mmap_error() {
    let overcommit = std::fs::read_to_string("/proc/sys/vm/overcommit_memory").unwrap_or_default();
    if overcommit.trim() == "1" {
        eprintln!("vm.overcommit_memory=1: the kernel grants any mapping; nothing to check");
        return;
    }
    let topology = Topology::detect();
    // 16 TiB - 4 KiB: valid for the pool, more than any machine running these tests can commit.
    let chunk_bytes = u32::MAX as usize * PAGE_BYTES;
    let pool = PagePool::new(&topology, 0, chunk_bytes).unwrap();
    let error = pool.alloc_zeroed().unwrap_err();
    assert!(
        matches!(error, NumaError::Mmap { node: 0, .. }),
        "{error:?}"
    );
    assert!(matches!(
        pool.alloc_copy(&[1; PAGE_BYTES]),
        Err(NumaError::Mmap { .. })
    ));
    let stats = pool.stats();
    assert_eq!(
        (stats.chunks, stats.pages_in_use, stats.reserved_bytes),
        (0, 0, 0)
    );
}

#[test]
fn pool_and_pages_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<PagePool>();
    assert_send_sync::<Arc<PagePool>>();
    assert_send_sync::<PageBox>();
}

/// Hammer a small free list from more threads than cores, so that threads are often
/// preempted inside a pop or push: each thread stamps the pages it owns and checks the stamps
/// before dropping them, so two owners of one page (e.g. an ABA bug in the free list) show up
/// as a changed stamp.
#[test]
fn free_list_survives_contention() {
    const THREADS: u64 = 4;
    // Override to run it shorter (under valgrind) or longer (hunting a race).
    let rounds: u64 = std::env::var("DVM_POOL_STRESS_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(200_000);
    let topology = Topology::fallback("contention test");
    let pool = PagePool::new(&topology, 0, 4 * PAGE_BYTES).unwrap();
    let workers: Vec<_> = (0..THREADS)
        .map(|thread| {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || {
                let stamp =
                    |round: u64, slot: u64| (thread << 48 | round << 2 | slot).to_le_bytes();
                for round in 0..rounds {
                    let mut held: Vec<PageBox> =
                        (0..3).map(|_| pool.alloc_zeroed().unwrap()).collect();
                    for (slot, page) in held.iter_mut().enumerate() {
                        assert_eq!(page[..8], [0; 8], "a page was not zero on allocation");
                        page[..8].copy_from_slice(&stamp(round, slot as u64));
                    }
                    std::hint::spin_loop();
                    for (slot, page) in held.iter().enumerate() {
                        assert_eq!(
                            page[..8],
                            stamp(round, slot as u64),
                            "two owners of one page"
                        );
                    }
                    // Drop in varying orders.
                    if round % 2 == 0 {
                        held.reverse();
                    }
                    drop(held);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let stats = pool.stats();
    assert_eq!(stats.pages_in_use, 0);
    // A page is carved only when the free list is empty, i.e. when every carved page is held
    // by some thread (3 each at most, the carving thread 2): at most 12 pages, 3 chunks.
    assert!(stats.chunks <= 3, "{stats:?}");
    eprintln!("contention: {stats:?}");
}

/// Pages freed as zeros are what `alloc_zeroed` hands out first; `alloc_zeroed_recycled_first`
/// and `alloc_copy` take recycled pages first; each list serves when the other is empty, and
/// neither makes the pool carve or grow.
#[test]
fn pages_freed_as_zeros_are_handed_out_by_alloc_zeroed_first() {
    let topology = Topology::detect();
    let pool = PagePool::new(&topology, 0, SMALL_CHUNK).unwrap();
    let mut zeros = pool.alloc_zeroed().unwrap();
    let mut written = pool.alloc_zeroed().unwrap();
    let zeros_at = zeros.as_ptr();
    let written_at = written.as_ptr();
    zeros[100] = 7;
    zeros[100] = 0;
    zeros.set_free_as_zeros();
    drop(zeros);
    write_pattern(&mut written, 3);
    drop(written); // the recycled list holds `written_at`, the list of zeros `zeros_at`
    let carved = pool.stats().pages_never_used;

    let first = pool.alloc_zeroed().unwrap();
    assert_eq!(
        first.as_ptr(),
        zeros_at,
        "the page freed as zeros comes first"
    );
    assert!(is_zero(&first));
    let second = pool.alloc_zeroed().unwrap();
    assert_eq!(second.as_ptr(), written_at, "then a recycled page, zeroed");
    assert!(is_zero(&second));
    drop(second); // recycled list: written_at
    let mut first = first;
    first.set_free_as_zeros();
    drop(first); // zeros list: zeros_at

    let scratch = pool.alloc_zeroed_recycled_first().unwrap();
    assert_eq!(
        scratch.as_ptr(),
        written_at,
        "scratch pages come from the recycled list"
    );
    assert!(is_zero(&scratch));
    let copy = pool.alloc_copy(&[9; PAGE_BYTES]).unwrap();
    assert_eq!(
        copy.as_ptr(),
        zeros_at,
        "the list of zeros serves when the other is empty"
    );
    assert!(copy.iter().all(|&byte| byte == 9));
    drop((scratch, copy));
    assert_eq!(pool.stats().pages_never_used, carved, "nothing carved");
    assert_eq!(pool.stats().pages_in_use, 0);
}

/// A page freed as zeros that is not is caught in debug builds (it would hand its bytes to
/// `alloc_zeroed`'s caller).
#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "a page freed as zeros holds other bytes")]
fn a_page_freed_as_zeros_must_hold_zeros() {
    let topology = Topology::detect();
    let pool = PagePool::new(&topology, 0, SMALL_CHUNK).unwrap();
    let mut page = pool.alloc_zeroed().unwrap();
    page[5] = 1;
    page.set_free_as_zeros();
    drop(page);
}
