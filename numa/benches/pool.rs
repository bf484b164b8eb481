//! Rough timings of the page pool, printed, not asserted: `cargo bench -p dvm-numa --bench pool`.

// A benchmark fails loudly on purpose: an unwrap here is an assertion.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use dvm_numa::{PageBox, PagePool, Topology, PAGE_BYTES};

const ROUNDS: u32 = 2_000_000;
const CHUNK: usize = 2 << 20;

fn report(what: &str, elapsed: Duration, operations: u32) {
    let nanos = elapsed.as_secs_f64() * 1e9 / f64::from(operations);
    println!("{what:<58} {nanos:>8.1} ns/op");
}

fn main() {
    let topology = Topology::detect();
    let pool = PagePool::new(&topology, 0, CHUNK).unwrap();
    println!(
        "node 0, {} KiB chunks, bound: {} {:?}",
        CHUNK >> 10,
        pool.stats().bound_to_node,
        pool.binding_note()
    );

    // Warm up: one page on the free list.
    drop(pool.alloc_zeroed().unwrap());

    let start = Instant::now();
    for _ in 0..ROUNDS {
        let page = pool.alloc_zeroed().unwrap();
        black_box(&page);
    }
    report(
        "alloc_zeroed + drop (recycled, zeroed)",
        start.elapsed(),
        ROUNDS,
    );

    let source = [7u8; PAGE_BYTES];
    let start = Instant::now();
    for _ in 0..ROUNDS {
        let page = pool.alloc_copy(black_box(&source)).unwrap();
        black_box(&page);
    }
    report("alloc_copy + drop (recycled)", start.elapsed(), ROUNDS);

    let mut buffer = Box::new([1u8; PAGE_BYTES]);
    let start = Instant::now();
    for _ in 0..ROUNDS {
        black_box(&mut buffer).fill(0);
    }
    report("baseline: zeroing 4 KiB alone", start.elapsed(), ROUNDS);

    let start = Instant::now();
    for _ in 0..ROUNDS {
        let page = vec![0u8; PAGE_BYTES].into_boxed_slice();
        black_box(&page);
    }
    report(
        "baseline: vec![0u8; 4096] + drop (malloc)",
        start.elapsed(),
        ROUNDS,
    );

    // Fresh pages: carving under the growth mutex, a chunk every 512 pages.
    let fresh = 100_000u32;
    let pool_fresh = PagePool::new(&topology, 0, CHUNK).unwrap();
    let start = Instant::now();
    let pages: Vec<PageBox> = (0..fresh)
        .map(|_| pool_fresh.alloc_zeroed().unwrap())
        .collect();
    report(
        "alloc_zeroed, never-used pages (mmap per chunk, no touch)",
        start.elapsed(),
        fresh,
    );
    let start = Instant::now();
    let mut pages = pages;
    for page in &mut pages {
        page[0] = 1;
    }
    report(
        "  first write to each of them (page fault)",
        start.elapsed(),
        fresh,
    );
    drop(pages);
    drop(pool_fresh);

    // Two threads allocating and dropping on the same pool at once.
    let threads = 2u32;
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || {
                for _ in 0..ROUNDS {
                    let page = pool.alloc_zeroed().unwrap();
                    black_box(&page);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    report(
        "alloc_zeroed + drop, 2 threads on one pool (per op, wall)",
        start.elapsed(),
        ROUNDS * threads,
    );

    // Allocated on one thread, dropped on another (includes the channel).
    let (sender, receiver) = mpsc::sync_channel::<PageBox>(64);
    let dropper = std::thread::spawn(move || receiver.into_iter().for_each(drop));
    let start = Instant::now();
    for _ in 0..ROUNDS {
        sender.send(pool.alloc_zeroed().unwrap()).unwrap();
    }
    drop(sender);
    dropper.join().unwrap();
    report(
        "alloc_zeroed here, drop on another thread (+ channel)",
        start.elapsed(),
        ROUNDS,
    );
    println!("final: {:?}", pool.stats());
}
