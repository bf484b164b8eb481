//! Criterion micro-benchmarks of the engine's hot paths: interpreter dispatch, snapshot-view
//! loads and stores, commit (conflict check + install), and spawning + committing empty runners.
//! `cargo bench -p dvm-engine` (each benchmark: 20 samples, about 3 s of measurement).
//!
//! The interpreter and runner benchmarks each run a whole program through `vm::run`, so they
//! include the fixed start-up cost of a run; `runners/vm_start_exit_only` measures that cost
//! alone (a program that only commits) so it can be subtracted.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use dvm_engine::image::{self, Format, LoadedImage};
use dvm_engine::page::{MemoryAccount, PageSource};
use dvm_engine::store::{PageRead, PageStore, Scope};
use dvm_engine::view::{Access, RangeSet, View};
use dvm_engine::vm::{self, Config, OutputMode};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

/// Iterations of the dispatch loop (3 instructions each).
const LOOP_ITERS: u64 = 1_000_000;
/// Empty runners the spawn benchmark creates.
const SPAWNS: u64 = 10_000;
/// Pages the view and commit benchmarks touch.
const PAGES: u64 = 16;
/// A shared-region address for data (the benchmark's `--load` area).
const DATA: u64 = 0x50_0000_0000;
const PAGE: u64 = 4096;

fn program(name: &str, source: &str) -> LoadedImage {
    let image = dvm_engine::asm::assemble(name, source).expect("benchmark program assembles");
    image::validate(Format::Elf, image).expect("benchmark program validates")
}

fn config() -> Config {
    Config {
        output: OutputMode::Capture,
        workers: Some(1),
        ..Config::default()
    }
}

fn run(image: &LoadedImage) -> vm::Report {
    let report = vm::run(image.clone(), config()).expect("benchmark program runs");
    assert_eq!(report.exit_code(), 0, "benchmark program failed");
    report
}

/// A counted loop of add + compare-and-branch: the interpreter's dispatch cost.
fn dispatch(c: &mut Criterion) {
    let source = format!(
        "
.equ I, 0x200000000
.equ S, 0x200000008
main:
    mov $0:se, I:se
loop:
    add:se S, I, S
    add:se I, $1, I
    br:l,se,a I, ${LOOP_ITERS}, $loop
    exit:c
"
    );
    let image = program("dispatch.dasm", &source);
    let instructions = run(&image).stats.instructions;
    let mut group = c.benchmark_group("interpreter");
    group.throughput(Throughput::Elements(instructions));
    group.bench_function("dispatch_loop", |b| b.iter(|| black_box(run(&image))));
    group.finish();
}

/// `root` spawns SPAWNS runners that each only `exit:c`, then commits.
fn spawn(c: &mut Criterion) {
    let source = format!(
        "
.equ I, 0x200000000
main:
    mov $0:se, I:se
again:
    newr $stack_desc, $using_desc, $watch_desc, $entry_word
    add:se I, $1, I
    br:l,se,a I, ${SPAWNS}, $again
    exit:c
child:
    exit:c

.data
stack_desc:  .quad 0, 0
using_desc:  .quad 0
watch_desc:  .quad 0
entry_word:  .quad child
"
    );
    let image = program("spawn.dasm", &source);
    let started = run(&image).stats.runners_started;
    assert!(
        started > SPAWNS,
        "the spawn benchmark started {started} runners"
    );
    let mut group = c.benchmark_group("runners");
    // The fixed cost of a run (topology, page pool, workers): subtract it from the others.
    let empty = program("empty.dasm", "main:\n    exit:c\n");
    group.bench_function("vm_start_exit_only", |b| b.iter(|| black_box(run(&empty))));
    group.throughput(Throughput::Elements(SPAWNS));
    group.bench_function("spawn_commit_empty", |b| b.iter(|| black_box(run(&image))));
    group.finish();
}

struct Memory {
    store: Arc<PageStore>,
    pages: PageSource,
}

impl Memory {
    /// A store whose PAGES data pages hold initial (timestamp 0) contents.
    fn new() -> Memory {
        let topology = dvm_numa::Topology::detect();
        let pool = dvm_numa::PagePool::new(&topology, 0, 2 << 20).expect("page pool");
        let pages = PageSource::new(pool, MemoryAccount::new(1 << 30));
        let store = Arc::new(PageStore::new());
        for p in 0..PAGES {
            let mut page = pages.zeroed().expect("page");
            page[..8].copy_from_slice(&p.to_le_bytes());
            store.install_initial((DATA + p * PAGE) >> 12, page);
        }
        Memory { store, pages }
    }

    fn view(&self) -> View {
        let ts = self.store.begin_snapshot(0, Scope::Everything);
        View::new(
            Arc::clone(&self.store) as Arc<dyn PageRead>,
            ts,
            self.pages.clone(),
            Access::everything(),
            Arc::new(RangeSet::default()),
        )
    }

    fn end(&self, view: View) {
        self.store.end_snapshot(view.snapshot_ts(), 0);
    }
}

fn view(c: &mut Criterion) {
    let memory = Memory::new();
    let words = PAGES * PAGE / 8;
    let mut group = c.benchmark_group("view");
    group.throughput(Throughput::Elements(words));

    // Loads of every word of PAGES committed pages (TLB hits after the first touch).
    let mut reader = memory.view();
    group.bench_function("load_u64_clean", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            for i in 0..words {
                sum = sum.wrapping_add(reader.load(DATA + i * 8, 8).expect("load"));
            }
            black_box(sum)
        })
    });
    memory.end(reader);

    // Stores to pages this view already copied (the store fast path).
    let mut writer = memory.view();
    for p in 0..PAGES {
        writer.store(DATA + p * PAGE, 8, 0).expect("store");
    }
    group.bench_function("store_u64_dirty", |b| {
        b.iter(|| {
            for i in 0..words {
                writer.store(DATA + i * 8, 8, i).expect("store");
            }
        })
    });
    memory.end(writer);

    // First store to each page of a fresh snapshot: copy-on-write of PAGES pages.
    group.throughput(Throughput::Elements(PAGES));
    group.bench_function("store_first_touch_page", |b| {
        b.iter_batched(
            || memory.view(),
            |mut fresh| {
                for p in 0..PAGES {
                    fresh.store(DATA + p * PAGE + 64, 8, p).expect("store");
                }
                memory.end(fresh);
            },
            BatchSize::SmallInput,
        )
    });

    // A worker's view reused for the next runner: reset (a TLB generation increment), the
    // first store to a private word (the ABI words every runner gets), drain, release.
    group.throughput(Throughput::Elements(1));
    let mut reused = memory.view();
    memory.store.end_snapshot(reused.snapshot_ts(), 0);
    group.bench_function("reset_private_store_drain", |b| {
        b.iter(|| {
            let ts = memory.store.begin_snapshot(0, Scope::Everything);
            reused.reset(
                Arc::clone(&memory.store) as Arc<dyn PageRead>,
                ts,
                memory.pages.clone(),
                Access::everything(),
                Arc::new(RangeSet::default()),
            );
            reused.store(0x2_0000_0000, 8, 1).expect("private store");
            black_box(reused.drain_writes(None));
            reused.release();
            memory.store.end_snapshot(ts, 0);
        })
    });
    group.finish();
}

/// One runner's commit of one word in each of PAGES pages: conflict check + install.
fn commit(c: &mut Criterion) {
    let memory = Memory::new();
    let mut group = c.benchmark_group("commit");
    group.throughput(Throughput::Elements(PAGES));
    let next_ts = std::sync::atomic::AtomicU64::new(1);
    group.bench_function("prepare_commit_16_pages", |b| {
        b.iter_batched(
            || {
                let mut view = memory.view();
                for p in 0..PAGES {
                    view.store(DATA + p * PAGE + 128, 8, p + 1).expect("store");
                }
                let ts = view.snapshot_ts();
                memory.store.end_snapshot(ts, 0);
                let (writes, _) = view.into_writes(None);
                (ts, writes)
            },
            |(snapshot, writes)| {
                // Every batch writes the same bytes, but each starts from the newest
                // snapshot, so there is never a conflict: this is the commit's fast path.
                let ts = next_ts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                assert!(memory.store.prepare(ts, snapshot, &writes).is_ok());
                memory
                    .store
                    .commit(ts, Some(snapshot), ts, writes, &memory.pages);
                memory.store.advance_watermark(ts);
            },
            // One setup per commit: setups batched ahead would share a snapshot and conflict.
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn short() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = short();
    targets = dispatch, view, commit, spawn
}
criterion_main!(benches);
