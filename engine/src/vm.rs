//! The virtual machine: loads a program, runs its runners on the workers, and ends each runner
//! — commit or abort, exit-record publication, children, watchers, output.
//!
//! An ending has two halves. `finish` runs on the worker that ran the runner, in parallel with
//! other endings: prepare, then hand the pages to the `Backend`, which installs them at the
//! ending's timestamps. `apply_ended` makes the ending observable — watermark, children,
//! watcher templates and activations, exit-record joins, output — and runs in timestamp order,
//! one ending at a time, on the node that applies endings (this one, or node 0 of a cluster).
//! That order is the order of everything a program can observe about endings, which is what
//! `docs/MEMORY-MODEL.md` promises ("output appears in the order in which runners end").
//!
//! A `Machine` is one node's VM. `run` is the single-node run; a cluster node builds its
//! `Machine` with a cluster `Backend` (and, away from node 0, a remote `Control`).
//!
//! Counting invariants (checked by assertions in debug builds and by the end-of-run report):
//! - `pending_tasks` = tasks queued + tasks running + endings not applied yet; the run ends when
//!   it reaches 0 (on a cluster, node 0 counts for everyone);
//! - `existing_runners` = children waiting for their parent's commit + queued/running
//!   ordinary runners + live watcher templates; `--max-runners` bounds it.

use crate::abi;
use crate::backend::{Backend, Control, Finishing, LocalBackend};
use crate::clock::{Clock, SystemClock};
use crate::image::{LoadedImage, SectionKind};
use crate::interp::{ChildSpec, Ending, Exec, FaultKind, Program, Services};
use crate::page::{
    mark, MemoryAccount, Page, PageSource, PAGE_BYTES, PAGE_OFFSET_MASK, PAGE_SHIFT,
};
pub use crate::runner::{Ended, Outcome, Task, TaskKind};
use crate::sched::{self, Executor, WorkerCtx, WorkerInfo};
use crate::slots::SlotPool;
use crate::store::{Change, Changed, PageKey, PageStore, PageWrite, Publication, Scope};
use crate::view::{canonical, page_key, Access, Range, RangeSet, View};
use dvm_numa::WorkerSlot;
use dvm_perf::meter::WorkerMeter;
use dvm_perf::phase::{Phase, WorkerPlace};
use dvm_perf::profile::Attempt;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

thread_local! {
    /// The view of the last runner this worker thread ended, reused for its next runner
    /// (`View::reset`: a TLB generation increment, no allocation). Workers are scoped threads
    /// of one run, so it never outlives the run.
    static SPARE_VIEW: std::cell::RefCell<Option<View>> = const { std::cell::RefCell::new(None) };
}

/// Runtime stacks: per space, from here, `STACK_BYTES` each.
pub const STACK_AREA: std::ops::Range<u64> = abi::STACK_AREA;
pub const STACK_BYTES: u64 = 256 << 10;
/// Stacks handed out in a space before the stacks of finished runners are preferred to fresh
/// ones (MEMORY-MODEL §2): what a long chain of runners keeps of its stacks.
pub const STACK_REUSE_AFTER: u64 = 65_536;
/// `malloc` heap: per space.
pub const HEAP_AREA: std::ops::Range<u64> = abi::HEAP_AREA;
/// Largest single `malloc`.
pub const MAX_MALLOC_BYTES: u64 = 1 << 36;
/// Exit-record area end (exclusive).
const EXIT_RECORD_END: u64 = abi::EXIT_RECORD_END;

/// Where the program's console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputMode {
    /// The process's stdout and stderr.
    Inherit,
    /// Collected and returned in the report (for tests and embedding).
    Capture,
    /// Handed, line by line as runners end, to a function (the C API's output callback).
    Callback(OutputSink),
}

/// Which console stream bytes belong to: the program's output, or DVM's reports about the
/// program (faults, failed commits) with the output those runners left pending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A receiver of console output for `OutputMode::Callback`. It is called on the console's
/// writer thread, one call at a time, in the order runners end; the run waits for it (a slow
/// receiver holds output back through the console's memory budget, as a slow pipe does).
#[derive(Clone)]
pub struct OutputSink(pub Arc<OutputFn>);

/// What an `OutputSink` calls: the stream, and bytes valid for the call.
pub type OutputFn = dyn Fn(Stream, &[u8]) + Send + Sync;

impl std::fmt::Debug for OutputSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutputSink(..)")
    }
}

/// Two sinks are equal when they are the same function object: closures have no other identity.
impl PartialEq for OutputSink {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for OutputSink {}

/// Where console input comes from.
#[derive(Clone, Debug)]
pub enum InputMode {
    Inherit,
    Bytes(Vec<u8>),
}

/// The bytes of one load: in memory, or a file of `len_bytes` read straight into the pages
/// when they are laid out, so a large input is neither held twice nor zeroed twice (k-means'
/// 64 MB input took 138 MB of peak memory and 88 ms to load from a `Vec`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadBytes {
    Bytes(Vec<u8>),
    File { path: PathBuf, len_bytes: u64 },
}

impl LoadBytes {
    pub fn len(&self) -> u64 {
        match self {
            LoadBytes::Bytes(bytes) => bytes.len() as u64,
            LoadBytes::File { len_bytes, .. } => *len_bytes,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<Vec<u8>> for LoadBytes {
    fn from(bytes: Vec<u8>) -> Self {
        LoadBytes::Bytes(bytes)
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    /// `None`: one worker per core.
    pub workers: Option<usize>,
    pub pin_workers: bool,
    pub max_instructions: u64,
    pub max_memory_bytes: u64,
    pub max_runners: u64,
    /// Data mapped into shared memory before the root starts: `(address, bytes, name)`.
    pub loads: Vec<(u64, LoadBytes, String)>,
    pub persist_dir: Option<PathBuf>,
    pub output: OutputMode,
    pub input: InputMode,
    /// The time programs see; the host's clocks unless a simulation injects its own.
    pub clock: Arc<dyn Clock>,
    /// Workers of other processes on this host come first in the core plan (a cluster node
    /// with local rank `r` and `w` workers per node skips `r * w` slots), so that nodes
    /// sharing a host pin to different cores.
    pub first_worker_slot: usize,
    /// Ids and runtime stacks handed out before freed ones are reused (tests shrink it).
    pub fresh_slots: FreshSlots,
    /// `--profile`: sample every worker at this rate (Hz); `Report::profile` holds the samples.
    pub profile_hz: Option<u32>,
    /// Measure each worker's time per phase and its hardware counters (`--stats`); off, the
    /// workers measure nothing and pay nothing.
    pub measure_workers: bool,
    /// This node's index in a cluster (0 alone), as profile samples name it.
    pub node_index: u32,
    /// Native code for the program's loops (`--jit`); `None` interprets everything. Not used
    /// with `profile_hz` (native code keeps no shadow call stack).
    pub jit: Option<Arc<dyn crate::interp::Jit>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            workers: None,
            pin_workers: true,
            max_instructions: u64::MAX,
            max_memory_bytes: default_memory_limit(),
            max_runners: 1_000_000,
            loads: Vec::new(),
            persist_dir: None,
            output: OutputMode::Inherit,
            input: InputMode::Inherit,
            clock: Arc::new(SystemClock::new()),
            first_worker_slot: 0,
            fresh_slots: FreshSlots::full(),
            profile_hz: None,
            measure_workers: false,
            node_index: 0,
            jit: None,
        }
    }
}

/// Half the machine's memory (from /proc/meminfo), or 8 GiB if it cannot be read.
pub fn default_memory_limit() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("MemTotal:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        });
    total.map_or(8 << 30, |kib| kib * 1024 / 2)
}

/// Errors that stop a run before it starts or after it ends (never a program's fault). Plain
/// data, so a node can report them to another.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    #[error(
        "--load: {name} ({len_bytes} bytes) at {addr:#x} does not fit inside the shared region"
    )]
    LoadOutsideShared {
        name: String,
        addr: u64,
        len_bytes: u64,
    },
    #[error("--load: {name} at {addr:#x} overlaps the program image")]
    LoadOverlapsImage { name: String, addr: u64 },
    #[error(
        "--load: {name} ({start:#x}..{end:#x}) overlaps the {area} {area_start:#x}..{area_end:#x}, \
         which the runtime reserves (docs/MEMORY-MODEL.md §1)"
    )]
    LoadInReservedArea {
        name: String,
        start: u64,
        end: u64,
        area: String,
        area_start: u64,
        area_end: u64,
    },
    #[error(
        "--load: {first} ({first_start:#x}..{first_end:#x}) and {second} \
         ({second_start:#x}..{second_end:#x}) overlap at {overlap_start:#x}..{overlap_end:#x}"
    )]
    LoadsOverlap {
        first: String,
        first_start: u64,
        first_end: u64,
        second: String,
        second_start: u64,
        second_end: u64,
        overlap_start: u64,
        overlap_end: u64,
    },
    #[error(
        "section {section} ({start:#x}..{end:#x}) lies in the persistent range \
         {area_start:#x}..{area_end:#x}, which --persist fills from the store"
    )]
    SectionInPersistentRange {
        section: String,
        start: u64,
        end: u64,
        area_start: u64,
        area_end: u64,
    },
    #[error("--load: the initial memory does not fit in --max-memory ({limit_bytes} bytes)")]
    InitialMemoryLimit { limit_bytes: u64 },
    #[error("--load: cannot read {name} at byte {offset} of {len_bytes}: {reason}")]
    LoadRead {
        name: String,
        offset: u64,
        len_bytes: u64,
        reason: String,
    },
    #[error("page pool for NUMA node {node}: {reason}")]
    PagePool { node: usize, reason: String },
    #[error("no page pool could be created (the topology has no NUMA node)")]
    NoPagePool,
    #[error("no stack for the root runner")]
    NoRootStack,
    #[error("--persist: {0}")]
    Persist(String),
}

/// Counters of a run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    pub workers: u64,
    pub instructions: u64,
    pub runners_started: u64,
    pub runners_committed: u64,
    pub runners_aborted: u64,
    pub runners_failed: u64,
    pub runners_faulted: u64,
    pub conflicts: u64,
    pub watcher_activations: u64,
    pub pages_allocated: u64,
    pub pages_copied: u64,
    pub versions_pruned: u64,
    pub peak_memory_bytes: u64,
    pub wall_time_ms: f64,
}

/// What a run did.
#[derive(Debug)]
pub struct Report {
    pub stats: Stats,
    pub workers: Vec<WorkerInfo>,
    /// Topology source and any note about pinning or memory binding.
    pub placement_notes: Vec<String>,
    pub internal_errors: u64,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// `--profile`: this node's samples, in no particular order.
    pub profile: Vec<dvm_perf::profile::Sample>,
    /// Samples not kept (a worker reached `dvm_perf::meter::MAX_SAMPLES_PER_WORKER`).
    pub profile_dropped: u64,
}

impl Report {
    /// 0 when every runner ended by its own choice, 1 when one faulted, 2 on an internal error.
    pub fn exit_code(&self) -> u8 {
        if self.internal_errors > 0 {
            2
        } else if self.stats.runners_faulted > 0 {
            1
        } else {
            0
        }
    }
}

#[derive(Default)]
struct Counters {
    instructions: AtomicU64,
    started: AtomicU64,
    committed: AtomicU64,
    aborted: AtomicU64,
    failed: AtomicU64,
    faulted: AtomicU64,
    activations: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TemplateState {
    Idle,
    Queued,
    Running { pending: bool },
}

struct Template {
    spec: ChildSpec,
    state: TemplateState,
}

enum ConsoleLine {
    Out(Vec<u8>),
    Err(Vec<u8>),
}

impl ConsoleLine {
    fn len_bytes(&self) -> u64 {
        match self {
            ConsoleLine::Out(bytes) | ConsoleLine::Err(bytes) => bytes.len() as u64,
        }
    }
}

/// Output, in the order runners end, written by one thread so that committing does not wait
/// on a pipe while the pipe keeps up.
///
/// Output waiting for a slow reader is bounded: the bytes queued or being written are counted
/// against `--max-memory` (in whole pages, through the run's `MemoryAccount`) and never exceed
/// `budget_bytes`; a line that does not fit makes its sender (the worker applying the
/// ending) wait until the writer has made room — back-pressure instead of a queue that grows
/// with the output. A line arriving at an empty queue is always taken, reserved or not, so an
/// ending is never refused and a line larger than the budget still gets out, alone.
struct Console {
    queue: Mutex<ConsoleQueue>,
    /// A line was queued, or the console closed: the writer waits on it.
    queued: Condvar,
    /// The writer finished a line: senders waiting for room wait on it.
    room: Condvar,
    account: Arc<MemoryAccount>,
    budget_bytes: u64,
}

#[derive(Default)]
struct ConsoleQueue {
    lines: VecDeque<ConsoleLine>,
    /// Queued plus being written.
    pending_bytes: u64,
    /// Pages of the memory account held for the pending bytes.
    reserved_pages: u64,
    closed: bool,
}

/// Output waiting for the reader, at most: this, and a quarter of `--max-memory`, so that a
/// stalled reader leaves the runners most of their memory (they would fault without it).
const CONSOLE_MAX_BYTES: u64 = 16 << 20;

fn pages_for(bytes: u64) -> u64 {
    bytes.div_ceil(PAGE_BYTES as u64)
}

type CaptureHandle = std::thread::JoinHandle<(Vec<u8>, Vec<u8>)>;

impl Console {
    /// Starts the writer thread; joining it yields what was captured (stdout, stderr).
    fn start(mode: OutputMode, account: Arc<MemoryAccount>) -> (Arc<Console>, CaptureHandle) {
        let console = Arc::new(Console {
            queue: Mutex::new(ConsoleQueue::default()),
            queued: Condvar::new(),
            room: Condvar::new(),
            budget_bytes: CONSOLE_MAX_BYTES.min(account.limit_bytes() / 4),
            account,
        });
        let writer_console = Arc::clone(&console);
        let writer = std::thread::Builder::new()
            .name("dvm-console".into())
            .spawn(move || writer_console.write_all(&mode))
            .unwrap_or_else(|err| panic!("cannot start the console thread: {err}"));
        (console, writer)
    }

    /// The writer thread: lines in order until the console is closed and empty.
    fn write_all(&self, mode: &OutputMode) -> (Vec<u8>, Vec<u8>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let stdout = std::io::stdout();
        let stderr = std::io::stderr();
        loop {
            let line = {
                let mut queue = lock(&self.queue);
                loop {
                    if let Some(line) = queue.lines.pop_front() {
                        break line;
                    }
                    if queue.closed {
                        return (out, err);
                    }
                    queue = self
                        .queued
                        .wait(queue)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
            };
            let len_bytes = line.len_bytes();
            // Write errors (a closed pipe) cannot be reported anywhere better; the run goes on
            // so that committed state and persistence are not lost.
            match (mode, line) {
                (OutputMode::Capture, ConsoleLine::Out(bytes)) => out.extend(bytes),
                (OutputMode::Capture, ConsoleLine::Err(bytes)) => err.extend(bytes),
                (OutputMode::Inherit, ConsoleLine::Out(bytes)) => {
                    let mut lock = stdout.lock();
                    let _ = lock.write_all(&bytes).and_then(|()| lock.flush());
                }
                (OutputMode::Inherit, ConsoleLine::Err(bytes)) => {
                    let _ = stderr.lock().write_all(&bytes);
                }
                (OutputMode::Callback(sink), line) => {
                    let (stream, bytes) = match line {
                        ConsoleLine::Out(bytes) => (Stream::Stdout, bytes),
                        ConsoleLine::Err(bytes) => (Stream::Stderr, bytes),
                    };
                    // A receiver that panics must not take the writer with it: senders waiting
                    // for room would wait forever. Its output is lost, like a closed pipe's.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        (sink.0)(stream, &bytes)
                    }));
                }
            }
            let mut queue = lock(&self.queue);
            queue.pending_bytes -= len_bytes;
            let keep = pages_for(queue.pending_bytes).min(queue.reserved_pages);
            self.account.release_reserved(queue.reserved_pages - keep);
            queue.reserved_pages = keep;
            drop(queue);
            self.room.notify_all();
        }
    }

    /// Queues `line`, waiting while the output already waiting leaves no room for it.
    fn send(&self, line: ConsoleLine) {
        let len_bytes = line.len_bytes();
        let mut queue = lock(&self.queue);
        loop {
            if queue.closed {
                return;
            }
            let total = queue.pending_bytes + len_bytes;
            let wanted = pages_for(total).saturating_sub(queue.reserved_pages);
            let reserved = (queue.pending_bytes == 0 || total <= self.budget_bytes)
                && self.account.reserve_pages(wanted).is_ok();
            if reserved {
                queue.reserved_pages += wanted;
                break;
            }
            if queue.pending_bytes == 0 {
                break;
            }
            queue = self
                .room
                .wait(queue)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        queue.pending_bytes += len_bytes;
        queue.lines.push_back(line);
        drop(queue);
        self.queued.notify_one();
    }

    fn close(&self) {
        lock(&self.queue).closed = true;
        self.queued.notify_all();
        self.room.notify_all();
    }
}

struct Input {
    source: Box<dyn Read + Send>,
    buffer: Vec<u8>,
    position: usize,
    ended: bool,
}

impl Input {
    fn next_byte(&mut self) -> Option<u8> {
        if self.position == self.buffer.len() {
            if self.ended {
                return None;
            }
            self.buffer.resize(64 << 10, 0);
            match self.source.read(&mut self.buffer) {
                Ok(0) | Err(_) => {
                    self.buffer.clear();
                    self.position = 0;
                    self.ended = true;
                    return None;
                }
                Ok(n) => {
                    self.buffer.truncate(n);
                    self.position = 0;
                }
            }
        }
        let byte = self.buffer[self.position];
        self.position += 1;
        Some(byte)
    }
}

/// The runner ids, stacks, heap and console input of one machine, served by the node that owns
/// them (the only node, or node 0 of a cluster).
///
/// Ids and runtime stacks come from `SlotPool`s: fresh ones first, in creation order; once an
/// area is exhausted, those of runners that ended or never started are handed out again
/// (`docs/MEMORY-MODEL.md` §2, §6). Ids are reused only where the backend can reset a reused
/// id's exit record (`Backend::resets_exit_records`); stacks wherever the frees are applied.
pub struct LocalControl {
    max_runners: u64,
    /// Id slot 0: the root's id.
    first_id: u64,
    ids: Mutex<SlotPool>,
    reuse_ids: bool,
    /// Set once a freed id has been handed out again: from then on every new runner's exit
    /// record is reset when its creator commits.
    ids_reused: AtomicBool,
    /// One pool per space.
    stacks: Vec<Mutex<SlotPool>>,
    /// The snapshot registry: a freed stack waits until every live snapshot sees its last
    /// owner's writes.
    store: Arc<PageStore>,
    next_heap: Vec<AtomicU64>,
    existing_runners: AtomicU64,
    input: Mutex<Input>,
}

/// How many ids and runtime stacks per space exist before freed ones are reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreshSlots {
    pub ids: u64,
    pub stacks_per_space: u64,
}

impl FreshSlots {
    /// The whole exit-record area and the whole stack area of a space.
    pub fn full() -> FreshSlots {
        FreshSlots {
            ids: (EXIT_RECORD_END - FIRST_ID) / abi::PAGE_BYTES,
            stacks_per_space: (STACK_AREA.end - STACK_AREA.start) / STACK_BYTES,
        }
    }

    /// At most `slots` of each (a test's way to reach reuse without millions of spawns).
    pub fn at_most(slots: u64) -> FreshSlots {
        let full = FreshSlots::full();
        FreshSlots {
            ids: full.ids.min(slots.max(1)),
            stacks_per_space: full.stacks_per_space.min(slots.max(1)),
        }
    }
}

/// The root runner's id: the first exit-record page after the reserved ones.
const FIRST_ID: u64 = abi::EXIT_RECORD_BASE + abi::EXIT_RECORD_RESERVED * abi::PAGE_BYTES;

impl LocalControl {
    fn new(
        max_runners: u64,
        fresh: FreshSlots,
        reuse_ids: bool,
        store: Arc<PageStore>,
        input: Box<dyn Read + Send>,
    ) -> LocalControl {
        // Where ids are never reused, a shrunken id area would only end the run early.
        let fresh_ids = if reuse_ids {
            fresh.ids
        } else {
            FreshSlots::full().ids
        };
        let mut ids = SlotPool::new(fresh_ids);
        // Slot 0 is the root's, in use from the start.
        let _root = ids.take(|| 0);
        LocalControl {
            max_runners: max_runners.max(1),
            first_id: FIRST_ID,
            ids: Mutex::new(ids),
            reuse_ids,
            ids_reused: AtomicBool::new(false),
            stacks: (0..abi::SPACE_COUNT)
                .map(|_| {
                    Mutex::new(SlotPool::reusing_after(
                        fresh.stacks_per_space,
                        STACK_REUSE_AFTER,
                    ))
                })
                .collect(),
            store,
            next_heap: (0..abi::SPACE_COUNT).map(|_| AtomicU64::new(0)).collect(),
            // The root exists from the start.
            existing_runners: AtomicU64::new(1),
            input: Mutex::new(Input {
                source: input,
                buffer: Vec::new(),
                position: 0,
                ended: false,
            }),
        }
    }

    /// `count` runners stopped existing (ended, never created, or templates deleted).
    fn release(&self, count: u64) {
        self.existing_runners.fetch_sub(count, Ordering::Relaxed);
    }

    /// Has any id been handed out a second time? (Then new runners' exit records are reset.)
    fn ids_reused(&self) -> bool {
        self.ids_reused.load(Ordering::Relaxed)
    }

    /// Gives back the id and, if the runtime allocated it, the stack of a runner that ended
    /// (its writes installed at or below `freed_ts`) or never started (`freed_ts` 0).
    fn free_runner(&self, id: u64, stack: Range, freed_ts: u64) {
        let horizon = || self.store.prune_horizon();
        if self.reuse_ids {
            if let Some(slot) = id
                .checked_sub(self.first_id)
                .filter(|offset| offset % abi::PAGE_BYTES == 0)
                .map(|offset| offset / abi::PAGE_BYTES)
            {
                // Nobody can write an id's record under an old snapshot to any effect that
                // matters: a reused id's record is reset when its new runner's creator commits.
                lock(&self.ids).free(slot, 0, horizon);
            }
        }
        let space = stack.start >> abi::SPACE_SHIFT;
        let offset = stack.start & SPACE_OFFSET_MASK;
        let runtime_stack = stack.end - stack.start == STACK_BYTES
            && STACK_AREA.contains(&offset)
            && (offset - STACK_AREA.start) % STACK_BYTES == 0;
        if let (true, Some(pool)) = (runtime_stack, self.stacks.get(space as usize)) {
            let slot = (offset - STACK_AREA.start) / STACK_BYTES;
            lock(pool).free(slot, freed_ts, horizon);
        }
    }
}

const SPACE_OFFSET_MASK: u64 = (1 << abi::SPACE_SHIFT) - 1;

impl Control for LocalControl {
    fn new_runner_id(&self, _runner: u64) -> Result<u64, String> {
        let existing = self.existing_runners.fetch_add(1, Ordering::Relaxed) + 1;
        if existing > self.max_runners {
            self.existing_runners.fetch_sub(1, Ordering::Relaxed);
            return Err(format!(
                "more than {} runners would exist at once (--max-runners)",
                self.max_runners
            ));
        }
        let Some((slot, reused)) = lock(&self.ids).take(|| 0) else {
            self.existing_runners.fetch_sub(1, Ordering::Relaxed);
            return Err(if self.reuse_ids {
                "runner ids are exhausted (the exit-record area is full and every id is in use)"
            } else {
                "runner ids are exhausted (the exit-record area is full)"
            }
            .into());
        };
        if reused && !self.ids_reused() {
            self.ids_reused.store(true, Ordering::Relaxed);
        }
        Ok(self.first_id + slot * abi::PAGE_BYTES)
    }

    fn forget_runner(&self, _runner: u64) {
        self.release(1);
    }

    fn allocate_stack(&self, _runner: u64, space: u64) -> Option<Range> {
        let pool = self.stacks.get(space as usize)?;
        let (slot, _) = lock(pool).take(|| self.store.prune_horizon())?;
        Range::new(
            (space << abi::SPACE_SHIFT) + STACK_AREA.start + slot * STACK_BYTES,
            STACK_BYTES,
        )
    }

    fn allocate_heap(&self, _runner: u64, space: u64, len_bytes: u64) -> Option<Range> {
        if len_bytes == 0 || len_bytes > MAX_MALLOC_BYTES {
            return None;
        }
        let rounded = len_bytes.div_ceil(16) * 16;
        let counter = self.next_heap.get(space as usize)?;
        let offset = counter.fetch_add(rounded, Ordering::Relaxed);
        let start = HEAP_AREA.start.checked_add(offset)?;
        (start + rounded <= HEAP_AREA.end)
            .then(|| Range::new((space << abi::SPACE_SHIFT) + start, rounded))?
    }

    fn console_input(&self, _runner: u64) -> Option<u8> {
        lock(&self.input).next_byte()
    }
}

/// State shared by every worker of one node.
pub struct Shared {
    /// This node's pages (all of them on one node, those it homes on a cluster) and, on the
    /// node that applies endings, the registry of live snapshots and the watermark.
    store: Arc<PageStore>,
    backend: Arc<dyn Backend>,
    /// What runners ask for ids, stacks, heap and input: `local`, or node 0 on a cluster.
    control: Arc<dyn Control>,
    local: Arc<LocalControl>,
    program: Program,
    read_only: Arc<RangeSet>,
    /// The image's sections: every runner may use them.
    image_set: RangeSet,
    max_instructions: u64,
    pending_tasks: AtomicU64,
    done: AtomicBool,
    sleep: Arc<sched::Sleep>,
    /// Tasks handed to this node from outside its workers (another node, the cluster runtime).
    inbox: Mutex<VecDeque<Task>>,
    templates: Mutex<HashMap<u64, Template>>,
    console: Arc<Console>,
    counters: Counters,
    internal_errors: AtomicU64,
    clock: Arc<dyn Clock>,
    next_txn: AtomicU64,
    /// Where the resets of reused ids' exit records take their pages.
    reset_pages: PageSource,
    /// Runners keep a shadow call stack and take samples (`--profile`).
    profiling: bool,
}

impl Executor for Shared {
    type Task = Task;

    fn execute(&self, task: Task, ctx: &mut WorkerCtx<Task>) {
        self.run_task(task, ctx);
    }

    fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    fn idle(&self, ctx: &mut WorkerCtx<Task>) -> bool {
        let found = {
            let mut inbox = lock(&self.inbox);
            let found = !inbox.is_empty();
            while let Some(task) = inbox.pop_front() {
                ctx.push(task);
            }
            found
        };
        // The inbox first: a task found there is worth more than a turn of transport work.
        found || self.backend.idle()
    }

    fn log_progress(&self, elapsed: Duration) {
        self.report_progress(elapsed);
    }
}

/// What one runner's interpreter asks of the VM: the VM's services, with the runner's id for
/// those a cluster records per runner (`Control`).
struct RunnerServices<'a> {
    shared: &'a Shared,
    runner: u64,
}

impl Services for RunnerServices<'_> {
    fn new_runner_id(&self) -> Result<u64, String> {
        self.shared.control.new_runner_id(self.runner)
    }

    fn forget_runner(&self) {
        self.shared.control.forget_runner(self.runner);
    }

    fn allocate_stack(&self, space: u64) -> Option<Range> {
        self.shared.control.allocate_stack(self.runner, space)
    }

    fn allocate_heap(&self, space: u64, len_bytes: u64) -> Option<Range> {
        self.shared
            .control
            .allocate_heap(self.runner, space, len_bytes)
    }

    fn console_input(&self) -> Option<u8> {
        self.shared.control.console_input(self.runner)
    }

    fn count_instructions(&self, instructions: u64) {
        bump(&self.shared.counters.instructions, instructions);
    }

    fn clock(&self) -> &dyn Clock {
        &*self.shared.clock
    }

    fn stopping(&self) -> bool {
        self.shared.is_done()
    }
}

impl Shared {
    pub(crate) fn program(&self) -> &Program {
        &self.program
    }

    /// The services this node hands out for the machine (what a remote `Control` asks for).
    pub fn local_control(&self) -> &Arc<LocalControl> {
        &self.local
    }

    /// Queues a task that arrived from outside the workers; it runs on the next idle worker.
    pub fn inject(&self, task: Task) {
        lock(&self.inbox).push_back(task);
        self.sleep.wake_one();
    }

    /// Counts a task the caller will run or send elsewhere (node 0 counts every task).
    pub fn count_task(&self) {
        self.pending_tasks.fetch_add(1, Ordering::AcqRel);
    }

    /// Stops the workers (a cluster node, when node 0 says the run is over).
    pub fn stop(&self) {
        self.done.store(true, Ordering::Release);
        self.sleep.wake_all();
    }

    /// Tasks queued, running, or whose ending has not taken effect (meaningful where endings
    /// are applied).
    pub fn pending(&self) -> u64 {
        self.pending_tasks.load(Ordering::Acquire)
    }

    /// Counters so far (for a cluster node's report to node 0).
    pub fn counters_now(&self) -> Stats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let c = &self.counters;
        Stats {
            instructions: get(&c.instructions),
            runners_started: get(&c.started),
            runners_committed: get(&c.committed),
            runners_aborted: get(&c.aborted),
            runners_failed: get(&c.failed),
            runners_faulted: get(&c.faulted),
            conflicts: get(&c.failed),
            watcher_activations: get(&c.activations),
            ..Stats::default()
        }
    }

    /// What pruning keeps for `task`'s snapshot: the pages its access rule starts with.
    fn scope_for(&self, task: &Task) -> Scope {
        self.access_for(task).scope()
    }

    fn access_for(&self, task: &Task) -> Access {
        if task.kind == TaskKind::Root {
            return Access::everything();
        }
        // The image's ranges are merged once, when the machine is built; the task's are added
        // in one pass (this runs for every runner, twice for a child: its registration and
        // its start).
        let ranges = task.using.iter().chain(&task.watched).copied();
        let allowed = RangeSet::union_of(
            &self.image_set,
            ranges
                .chain(std::iter::once(task.stack))
                .chain(Range::new(task.exit_id(), abi::PAGE_BYTES)),
        );
        Access {
            everything: false,
            allowed,
        }
    }

    /// Starts a watcher instance: takes its snapshot as its template moves to `Running`.
    /// `false` (and the task is done) when the template was deleted while it was queued.
    pub fn start_instance(&self, task: &mut Task) -> bool {
        let TaskKind::Instance(template) = task.kind else {
            return true;
        };
        let mut templates = lock(&self.templates);
        match templates.get_mut(&template) {
            Some(entry) => {
                entry.state = TemplateState::Running { pending: false };
                // Under the templates lock: a commit activating this template either took
                // effect before (and this snapshot sees it) or sees `Running` and leaves a
                // pending activation. No change is missed.
                task.snapshot = Some(
                    self.store
                        .begin_snapshot(task.exit_id(), self.scope_for(task)),
                );
                true
            }
            None => {
                drop(templates);
                self.task_done();
                false
            }
        }
    }

    /// Runs one task to its end and finishes it. Called by workers.
    fn run_task(&self, mut task: Task, ctx: &mut WorkerCtx<Task>) {
        ctx.phase(Phase::Start);
        if task.snapshot.is_none() && !self.start_instance(&mut task) {
            return;
        }
        let access = self.access_for(&task);
        let snapshot = match task.snapshot {
            Some(snapshot) => snapshot,
            None => self.store.begin_snapshot(task.exit_id(), access.scope()),
        };
        bump(&self.counters.started, 1);
        if task.is_instance() {
            bump(&self.counters.activations, 1);
        }
        if task.kind != TaskKind::Root {
            self.backend.prefetch(&task.using, snapshot);
        }
        let (reader, pages) = (self.backend.reader(), ctx.pages().clone());
        let read_only = Arc::clone(&self.read_only);
        let view = match SPARE_VIEW.with(|spare| spare.borrow_mut().take()) {
            Some(mut view) => {
                view.reset(reader, snapshot, pages, access, read_only);
                view
            }
            None => View::new(reader, snapshot, pages, access, read_only),
        };
        let services = RunnerServices {
            shared: self,
            runner: task.id,
        };
        let mut exec = Exec::new(
            view,
            &self.program,
            &services,
            task.space,
            self.max_instructions,
        );
        if let (true, Some(meter)) = (self.profiling, &ctx.meter) {
            exec.profile_with(Arc::clone(meter));
        }
        // Registers fixed by the ABI: held by the view until the runner writes their page.
        exec.view.set_abi_words(
            task.stack.start,
            task.stack.end - task.stack.start,
            task.exit_id(),
        );
        ctx.phase(Phase::Interpret);
        let ending =
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| exec.run(task.entry))) {
                Ok(ending) => ending,
                Err(panic) => {
                    self.internal_errors.fetch_add(1, Ordering::Relaxed);
                    let reason = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "a panic".into());
                    Ending::Fault(crate::interp::Fault {
                        kind: FaultKind::Internal { reason },
                        pc: task.entry,
                    })
                }
            };
        ctx.phase(Phase::Commit);
        if self.is_done() {
            // Stopped from outside (a cluster lost a node): nothing of this runner is kept.
            if let Some(profile) = exec.profile.take() {
                profile.finish(Attempt::Unfinished);
            }
            return;
        }
        // The snapshot stays registered, and the task pending, until the ending takes effect.
        self.finish(task, snapshot, exec, ending, ctx);
    }

    fn report_progress(&self, elapsed: Duration) {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let c = &self.counters;
        let ended = get(&c.committed) + get(&c.aborted) + get(&c.failed) + get(&c.faulted);
        tracing::info!(
            "running for {:.0} s: {} runners started, {} ended ({} failed to commit, {} faulted), {} queued or running, {} templates waiting, {:.1} M instructions/s so far",
            elapsed.as_secs_f64(),
            get(&c.started),
            ended,
            get(&c.failed),
            get(&c.faulted),
            self.pending_tasks.load(Ordering::Relaxed),
            lock(&self.templates).len(),
            get(&c.instructions) as f64 / elapsed.as_secs_f64().max(1e-9) / 1e6,
        );
    }

    fn task_done(&self) {
        if self.pending_tasks.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.stop();
        }
    }

    /// Ends a runner on the worker that ran it, in parallel with other endings: prepare, then
    /// the backend installs its pages at its timestamps; its effects take effect in commit
    /// order (`apply_ended`), here or on node 0. Never inlined: a host profile (`perf`) names
    /// committing by this symbol.
    #[inline(never)]
    fn finish(
        &self,
        task: Task,
        snapshot: u64,
        exec: Exec<'_>,
        ending: Ending,
        ctx: &mut WorkerCtx<Task>,
    ) {
        let instructions = exec.instructions - exec.instructions_reported;
        let Exec {
            view,
            output,
            children,
            profile,
            ..
        } = exec;
        bump(&self.counters.instructions, instructions);
        let ordinary = !task.is_instance();
        let exit_key = ordinary.then(|| page_key(task.id));
        let mut view = view;
        let (writes, exit_write) = view.drain_writes(exit_key);
        // The runner's other pages are freed here, as dropping its view did; the view itself
        // serves this worker's next runner.
        view.release();
        let _ = SPARE_VIEW.try_with(|spare| *spare.borrow_mut() = Some(view));
        let pages = ctx.pages().clone();
        let txn = self.next_txn.fetch_add(1, Ordering::Relaxed);

        // Prepare. Discarded writes are freed here, before anything this ending publishes can
        // wake another runner: a joiner must not find the memory of a finished runner in use.
        let mut prepared = None;
        let outcome = match &ending {
            Ending::Exit(mode) if mode.commits() => {
                match self.backend.prepare(txn, snapshot, &writes) {
                    Err(conflict) => Outcome::Failed(conflict),
                    Ok(()) => {
                        let changes = writes
                            .iter()
                            .map(|write| (write.key, Changed::of_mask(&write.stored)))
                            .collect();
                        prepared = Some(writes);
                        Outcome::Committed { changes }
                    }
                }
            }
            Ending::Exit(_) => Outcome::Aborted,
            Ending::Fault(fault) => Outcome::Faulted(fault.clone()),
        };
        if let Some(profile) = profile {
            profile.finish(match outcome {
                Outcome::Committed { .. } => Attempt::Committed,
                Outcome::Aborted => Attempt::Aborted,
                Outcome::Failed(_) => Attempt::Failed,
                Outcome::Faulted(_) => Attempt::Faulted,
            });
        }
        let ends_template = match (&task.kind, &ending) {
            (TaskKind::Instance(_), Ending::Exit(mode)) => {
                mode.deletes_template() && !matches!(outcome, Outcome::Failed(_))
            }
            (TaskKind::Instance(_), Ending::Fault(_)) => true,
            _ => false,
        };
        // Exit records: an ordinary runner's own page; an instance's template when it goes.
        let exit = (ordinary || ends_template)
            .then(|| {
                let own = exit_write.map(|write| (write, snapshot));
                exit_record_write(task.exit_id(), own, outcome.status())
            })
            .flatten();
        let exit_changes = exit.iter().map(Publication::change).collect();
        let finishing = Finishing {
            txn,
            snapshot_ts: snapshot,
            prepared,
            exit,
            ended: Ended {
                task,
                snapshot,
                ending,
                outcome,
                children,
                exit_changes,
                output,
                ends_template,
            },
        };
        self.backend
            .finish(finishing, &pages, &mut |first, last, ended| {
                self.apply_ended(first, last, ended, &mut |task| ctx.push(task))
            });
    }

    /// Makes an ending observable, in commit order: the watermark, children, watcher
    /// templates and activations, output, counters, the end of its task, and the ids and
    /// stacks it gives back. `push` receives the tasks it creates, already counted. Never
    /// inlined, for host profiles, like `finish`.
    #[inline(never)]
    pub fn apply_ended(
        &self,
        first_ts: u64,
        last_ts: u64,
        ended: Ended,
        push: &mut dyn FnMut(Task),
    ) {
        let Ended {
            task,
            snapshot,
            ending,
            outcome,
            children,
            exit_changes,
            output,
            ends_template,
        } = ended;
        // Before the watermark passes `first_ts`: no snapshot can see the commit without the
        // resets.
        let resets = match &outcome {
            Outcome::Committed { changes } if self.local.ids_reused() => {
                self.reset_exit_records(first_ts, &children, changes)
            }
            _ => Vec::new(),
        };
        self.store.advance_watermark(last_ts);
        let mut new_tasks: Vec<Task> = Vec::new();
        match &outcome {
            Outcome::Committed { changes } => {
                let new_templates = children.iter().any(|child| !child.watched.is_empty());
                if !changes.is_empty() || !resets.is_empty() {
                    // The commit's changes activate the templates that existed before it.
                    self.activate_watchers(changes, &mut new_tasks);
                    self.activate_watchers(&resets, &mut new_tasks);
                }
                // Templates it created are registered now, as it takes effect: the
                // exit-record publication is a later timestamp, which they do see (a
                // template may watch its creator's exit record).
                let mut templates = new_templates.then(|| lock(&self.templates));
                for child in children {
                    if child.watched.is_empty() {
                        let task = Task {
                            id: child.id,
                            kind: TaskKind::Child,
                            entry: child.entry,
                            space: child.space,
                            stack: child.stack,
                            using: child.using,
                            watched: Vec::new(),
                            snapshot: Some(first_ts),
                        };
                        // Registered while this ending takes effect: above the floor.
                        self.store
                            .register_snapshot(first_ts, task.id, self.scope_for(&task));
                        new_tasks.push(task);
                    } else if let Some(templates) = templates.as_mut() {
                        templates.insert(
                            child.id,
                            Template {
                                spec: child,
                                state: TemplateState::Idle,
                            },
                        );
                    }
                }
            }
            // The children never exist: their ids and stacks are free again at once.
            _ => {
                self.local.release(children.len() as u64);
                for child in &children {
                    self.local.free_runner(child.id, child.stack, 0);
                }
            }
        }

        if let TaskKind::Instance(template) = task.kind {
            let mut templates = lock(&self.templates);
            if ends_template {
                if let Some(gone) = templates.remove(&template) {
                    drop(templates);
                    self.local.release(1);
                    self.local.free_runner(template, gone.spec.stack, last_ts);
                }
            } else if let Some(entry) = templates.get_mut(&template) {
                let again = matches!(outcome, Outcome::Failed(_))
                    || entry.state == TemplateState::Running { pending: true };
                if again {
                    entry.state = TemplateState::Queued;
                    new_tasks.push(instance_task(template, &entry.spec));
                } else {
                    entry.state = TemplateState::Idle;
                }
            }
        }

        if !exit_changes.is_empty() {
            self.activate_watchers(&exit_changes, &mut new_tasks);
        }

        match &outcome {
            Outcome::Committed { .. } => bump(&self.counters.committed, 1),
            Outcome::Aborted => bump(&self.counters.aborted, 1),
            Outcome::Failed(_) => bump(&self.counters.failed, 1),
            Outcome::Faulted(_) => bump(&self.counters.faulted, 1),
        }
        if !task.is_instance() {
            self.local.release(1);
            self.local.free_runner(task.id, task.stack, last_ts);
        }
        self.report_ending(&task, &ending, &outcome, output);
        self.store.end_snapshot(snapshot, task.exit_id());
        self.pending_tasks
            .fetch_add(new_tasks.len() as u64, Ordering::AcqRel);
        for task in new_tasks {
            push(task);
        }
        self.task_done();
    }

    /// Makes the exit records of `children` read "not ended" (status 0) from `ts` on, once
    /// ids are being reused: a reused id's page still holds its earlier runner's status. The
    /// reset is a runtime publication at the creating commit's timestamp, so exactly the
    /// snapshots that can know of the child see it. A page the commit itself stored to is left
    /// to the commit (one version per timestamp).
    fn reset_exit_records(
        &self,
        ts: u64,
        children: &[ChildSpec],
        changes: &[Change],
    ) -> Vec<Change> {
        let mut resets = Vec::with_capacity(children.len());
        for child in children {
            let key = page_key(child.id);
            if changes.iter().any(|(changed, _)| *changed == key) {
                continue;
            }
            let Some(reset) = exit_record_write(child.id, None, 0) else {
                continue;
            };
            if let Some(change) = self.backend.reset_exit_record(ts, reset, &self.reset_pages) {
                resets.push(change);
            }
        }
        resets
    }

    fn activate_watchers(&self, changes: &[Change], new_tasks: &mut Vec<Task>) {
        let mut templates = lock(&self.templates);
        for (id, template) in templates.iter_mut() {
            if template.state == TemplateState::Queued
                || template.state == (TemplateState::Running { pending: true })
            {
                continue;
            }
            let fired = changes.iter().any(|(key, changed)| {
                template
                    .spec
                    .watched
                    .iter()
                    .any(|range| watched_bytes_stored(range, *key, changed))
            });
            if !fired {
                continue;
            }
            template.state = match template.state {
                TemplateState::Idle => {
                    new_tasks.push(instance_task(*id, &template.spec));
                    TemplateState::Queued
                }
                _ => TemplateState::Running { pending: true },
            };
        }
    }

    fn report_ending(&self, task: &Task, ending: &Ending, outcome: &Outcome, output: Vec<u8>) {
        // Formatted only for a report: most endings print nothing or only their own output.
        let id = || match task.kind {
            TaskKind::Instance(template) => format!("{template:#x} (watcher instance)"),
            _ => format!("{:#x}", task.id),
        };
        match outcome {
            Outcome::Committed { .. } | Outcome::Aborted => {
                if !output.is_empty() {
                    self.console.send(ConsoleLine::Out(output));
                }
            }
            Outcome::Failed(conflict) => {
                if !output.is_empty() {
                    let mut text = format!(
                        "dvm: runner {} failed to commit: {conflict}; its output follows:\n",
                        id()
                    )
                    .into_bytes();
                    text.extend(output);
                    self.console.send(ConsoleLine::Err(text));
                }
            }
            Outcome::Faulted(fault) => {
                let Ending::Fault(_) = ending else { return };
                let mut text = format!("dvm: runner {} faulted: {}\n", id(), fault.kind);
                let instr = self
                    .program
                    .disassemble_at(fault.pc)
                    .unwrap_or_else(|| "(no instruction here)".into());
                text.push_str(&format!(
                    "  at {}: {}\n",
                    self.program.describe_pc(fault.pc),
                    instr
                ));
                if let Some(addr) = fault.kind.address() {
                    text.push_str(&format!("  address: {addr:#x}\n"));
                }
                if matches!(fault.kind, FaultKind::NotAllowed { .. }) {
                    let ranges: Vec<String> = task.using.iter().map(|r| r.to_string()).collect();
                    let watched: Vec<String> = task.watched.iter().map(|r| r.to_string()).collect();
                    text.push_str(&format!(
                        "  runner may use: the image, stack {}, exit record {:#x}, using [{}], watched [{}], its children's stacks and its malloc memory\n",
                        task.stack,
                        task.id,
                        ranges.join(", "),
                        watched.join(", ")
                    ));
                }
                let mut bytes = text.into_bytes();
                if !output.is_empty() {
                    bytes.extend(
                        format!("  its pending output ({} bytes) follows:\n", output.len())
                            .into_bytes(),
                    );
                    bytes.extend(output);
                    if bytes.last() != Some(&b'\n') {
                        bytes.push(b'\n');
                    }
                }
                self.console.send(ConsoleLine::Err(bytes));
            }
        }
    }
}

/// An exit-record publication for runner `id`: its own writes to its page (if any), plus the
/// status word. Without writes of its own, only the status word goes (over whatever the page
/// holds at its timestamp), with no page behind it.
fn exit_record_write(
    id: u64,
    own_writes: Option<(PageWrite, u64)>,
    status: u64,
) -> Option<Publication> {
    let offset = abi::EXIT_STATUS_OFFSET as usize;
    match own_writes {
        Some((mut write, snapshot)) => {
            write.data[offset..offset + 8].copy_from_slice(&status.to_le_bytes());
            mark(&mut write.stored, offset, 8);
            Some(Publication::Page {
                write,
                base_ts: Some(snapshot),
            })
        }
        None => crate::store::PageBytes::new(page_key(id), offset, &status.to_le_bytes())
            .map(Publication::Bytes),
    }
}

fn instance_task(template: u64, spec: &ChildSpec) -> Task {
    Task {
        id: template,
        kind: TaskKind::Instance(template),
        entry: spec.entry,
        space: spec.space,
        stack: spec.stack,
        using: spec.using.clone(),
        watched: spec.watched.clone(),
        snapshot: None,
    }
}

/// Did a commit that stored `mask` on page `key` store a byte inside `range`?
fn watched_bytes_stored(range: &Range, key: PageKey, changed: &Changed) -> bool {
    let start = canonical(range.start);
    let end = start + (range.end - range.start);
    let page_start = key << PAGE_SHIFT;
    let page_end = page_start + PAGE_BYTES as u64;
    if end <= page_start || start >= page_end {
        return false;
    }
    let from = (start.max(page_start) - page_start) as usize;
    let to = (end.min(page_end) - page_start) as usize;
    changed.touches(from..to)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Builds the initial memory (persistent store, image, `--load` files) of the pages `homes`
/// selects, in pages from `source` (counted against `--max-memory`): the persisted contents
/// first, the image's non-bss sections over them, then each `--load` in order over those.
fn initial_pages(
    image: &LoadedImage,
    config: &Config,
    persisted: Vec<(PageKey, Box<[u8; PAGE_BYTES]>)>,
    source: &PageSource,
    homes: &dyn Fn(PageKey) -> bool,
) -> Result<HashMap<PageKey, Page>, RunError> {
    // Checked again here (callers may have checked already) so that no page is taken for a
    // misplaced load, even when the initial memory would also exceed `--max-memory`.
    check_initial_memory(image, config)?;
    let mut pages = HashMap::new();
    for (key, bytes) in persisted {
        if homes(key) {
            let mut page = initial_page(source)?;
            page.copy_from_slice(&bytes[..]);
            pages.insert(key, page);
        }
    }
    for section in &image.image.sections {
        if section.kind != SectionKind::Bss {
            place_bytes(&mut pages, source, homes, section.addr, &section.bytes)?;
        }
    }
    for (addr, bytes, name) in &config.loads {
        match bytes {
            LoadBytes::Bytes(bytes) => place_bytes(&mut pages, source, homes, *addr, bytes)?,
            LoadBytes::File { path, len_bytes } => {
                place_file(&mut pages, source, homes, *addr, path, *len_bytes, name)?
            }
        }
    }
    Ok(pages)
}

/// Bytes a loaded file is read by at a time (one buffer, reused).
const LOAD_CHUNK_BYTES: usize = 1 << 20;

/// `place_bytes` for the `len_bytes` of the file at `path`, read a chunk at a time; chunks
/// with no page this node homes are skipped, not read. A file that cannot be read, or that
/// is shorter now than when it was checked, is an error naming the byte it stopped at.
fn place_file(
    pages: &mut HashMap<PageKey, Page>,
    source: &PageSource,
    homes: &dyn Fn(PageKey) -> bool,
    addr: u64,
    path: &std::path::Path,
    len_bytes: u64,
    name: &str,
) -> Result<(), RunError> {
    use std::io::{Seek, SeekFrom};
    let failed = |offset: u64, reason: String| RunError::LoadRead {
        name: name.to_string(),
        offset,
        len_bytes,
        reason,
    };
    let mut file = std::fs::File::open(path).map_err(|err| failed(0, err.to_string()))?;
    let mut buffer = vec![0u8; LOAD_CHUNK_BYTES.min(len_bytes as usize)];
    let mut offset = 0u64;
    let mut at_file = 0u64;
    while offset < len_bytes {
        let len = (len_bytes - offset).min(LOAD_CHUNK_BYTES as u64) as usize;
        let start = addr + offset;
        let last = start + len as u64 - 1;
        let homed = (start >> PAGE_SHIFT..=last >> PAGE_SHIFT)
            .any(|page| homes(page_key(page << PAGE_SHIFT)));
        if homed {
            if at_file != offset {
                file.seek(SeekFrom::Start(offset))
                    .map_err(|err| failed(offset, err.to_string()))?;
            }
            let chunk = &mut buffer[..len];
            file.read_exact(chunk)
                .map_err(|err| failed(offset, err.to_string()))?;
            place_bytes(pages, source, homes, start, chunk)?;
            at_file = offset + len as u64;
        }
        offset += len as u64;
    }
    Ok(())
}

/// The persistent range, for runs with `--persist`: its initial contents are the store's, and
/// a load or section there would silently replace what earlier runs committed (and be saved
/// over it at the end). Persisted pages are canonical ones (space 0, where the AMR's part of the
/// range is seen from every space), so it is compared with canonical addresses.
const PERSISTENT_RANGE: &str = "persistent range (kept by --persist)";

/// `start..end` (inside one space's shared region) as canonical pieces `(canonical start,
/// canonical end, start)`: split where the AMR begins and ends, whose bytes are space 0's.
fn canonical_pieces(start: u64, end: u64) -> Vec<(u64, u64, u64)> {
    let space_base = start & !SPACE_OFFSET_MASK;
    let cuts = [space_base + abi::AMR_BASE, space_base + abi::AMR_END];
    let mut pieces = Vec::with_capacity(3);
    let mut at = start;
    for cut in cuts.into_iter().chain([end]) {
        let piece_end = cut.min(end);
        if at < piece_end {
            let from = canonical(at);
            pieces.push((from, from + (piece_end - at), at));
            at = piece_end;
        }
    }
    pieces
}

/// Refuses initial memory that cannot be laid out as asked, before any work: a `--load` outside
/// the shared region, over the image, in an area the runtime reserves (and, with `--persist`,
/// in the persistent range), two `--load`s over the same bytes, and image sections in the
/// persistent range under `--persist` (the loader refuses sections in the other areas).
pub fn check_initial_memory(image: &LoadedImage, config: &Config) -> Result<(), RunError> {
    let persist = config.persist_dir.is_some();
    // Canonical pieces of every non-empty load: (canonical start, canonical end, start, load).
    let mut pieces = Vec::with_capacity(config.loads.len());
    for (index, (addr, bytes, name)) in config.loads.iter().enumerate() {
        let end = addr.checked_add(bytes.len());
        // One space's shared region: a load cannot run on into the next space's.
        let inside = crate::view::region_of(*addr) == crate::view::Region::Shared
            && end.is_some_and(|end| {
                bytes.is_empty()
                    || (crate::view::region_of(end - 1) == crate::view::Region::Shared
                        && (end - 1) >> abi::SPACE_SHIFT == addr >> abi::SPACE_SHIFT)
            });
        let end = match end {
            Some(end) if inside => end,
            _ => {
                return Err(RunError::LoadOutsideShared {
                    name: name.clone(),
                    addr: *addr,
                    len_bytes: bytes.len(),
                })
            }
        };
        let own = canonical_pieces(*addr, end);
        // Sections are in space 0, so canonical pieces meet them wherever the load aliases them.
        let image_overlap =
            own.iter().any(|(from, to, _)| {
                image.image.sections.iter().any(|section| {
                    section.len_bytes > 0 && *from < section.end() && section.addr < *to
                })
            });
        if image_overlap {
            return Err(RunError::LoadOverlapsImage {
                name: name.clone(),
                addr: *addr,
            });
        }
        let space_base = addr & !SPACE_OFFSET_MASK;
        let reserved = abi::first_reserved_overlap(&abi::RESERVED_AREAS, *addr, end)
            .map(|(area, _)| {
                (
                    area.name,
                    space_base + area.offsets.start,
                    space_base + area.offsets.end,
                )
            })
            .or_else(|| {
                let persisted = abi::PERSIST_BASE..abi::PERSIST_END;
                let hit = own
                    .iter()
                    .any(|(from, to, _)| *from < persisted.end && persisted.start < *to);
                (persist && hit).then_some((PERSISTENT_RANGE, persisted.start, persisted.end))
            });
        if let Some((area, area_start, area_end)) = reserved {
            return Err(RunError::LoadInReservedArea {
                name: name.clone(),
                start: *addr,
                end,
                area: area.to_string(),
                area_start,
                area_end,
            });
        }
        pieces.extend(own.into_iter().map(|(from, to, at)| (from, to, at, index)));
    }
    // A sweep in canonical address order: a piece that starts before the furthest end seen so
    // far overlaps the load that reached it.
    pieces.sort_unstable();
    let mut furthest: Option<(u64, usize)> = None;
    for (from, to, at, index) in pieces {
        if let Some((reach, earlier)) = furthest {
            if from < reach {
                let (first_start, first_bytes, first) = &config.loads[earlier];
                let (second_start, second_bytes, second) = &config.loads[index];
                return Err(RunError::LoadsOverlap {
                    first: first.clone(),
                    first_start: *first_start,
                    first_end: first_start + first_bytes.len(),
                    second: second.clone(),
                    second_start: *second_start,
                    second_end: second_start + second_bytes.len(),
                    overlap_start: at,
                    overlap_end: at + (to.min(reach) - from),
                });
            }
        }
        if furthest.is_none_or(|(reach, _)| to > reach) {
            furthest = Some((to, index));
        }
    }
    if persist {
        for section in &image.image.sections {
            if section.addr < abi::PERSIST_END && abi::PERSIST_BASE < section.end() {
                return Err(RunError::SectionInPersistentRange {
                    section: section.kind.name().to_string(),
                    start: section.addr,
                    end: section.end(),
                    area_start: abi::PERSIST_BASE,
                    area_end: abi::PERSIST_END,
                });
            }
        }
    }
    Ok(())
}

/// Lays `bytes` into the pages from `addr` on, over whatever they already hold (persisted
/// contents, earlier sections or loads); a page not present yet starts as zeros. One map lookup
/// and one slice copy per page touched — a partial first page, whole pages, a partial last page
/// — rather than per byte: a 64 MiB `--load` is 16,384 lookups instead of 67 million. Pages are
/// keyed by `page_key`, which canonicalises per page (AMR boundaries are page-aligned), so a
/// piece never straddles two keys. Pieces on pages this node does not home are skipped.
fn place_bytes(
    pages: &mut HashMap<PageKey, Page>,
    source: &PageSource,
    homes: &dyn Fn(PageKey) -> bool,
    addr: u64,
    bytes: &[u8],
) -> Result<(), RunError> {
    let mut at = addr;
    let mut rest = bytes;
    while !rest.is_empty() {
        let offset = (at & PAGE_OFFSET_MASK) as usize;
        let (piece, tail) = rest.split_at(rest.len().min(PAGE_BYTES - offset));
        let key = page_key(at);
        if homes(key) {
            let page = match pages.entry(key) {
                Entry::Occupied(entry) => entry.into_mut(),
                Entry::Vacant(entry) => entry.insert(initial_page(source)?),
            };
            page[offset..offset + piece.len()].copy_from_slice(piece);
        }
        rest = tail;
        // Only used again while bytes remain, and callers place only bytes whose addresses
        // exist, so this never wraps into a used address.
        at = at.wrapping_add(piece.len() as u64);
    }
    Ok(())
}

/// A zeroed page of initial memory, or the error saying it does not fit in `--max-memory`.
fn initial_page(source: &PageSource) -> Result<Page, RunError> {
    source
        .zeroed()
        .map_err(|limit| RunError::InitialMemoryLimit {
            limit_bytes: limit.limit_bytes,
        })
}

/// Where one node's workers run and get their page memory.
pub struct Resources {
    pub slots: Vec<WorkerSlot>,
    /// One page source per NUMA node, never empty.
    pub pools: Vec<PageSource>,
    pub account: Arc<MemoryAccount>,
    /// Topology source and any note about memory binding.
    pub notes: Vec<String>,
}

impl Resources {
    pub fn new(config: &Config) -> Result<Resources, RunError> {
        let topology = dvm_numa::Topology::detect();
        let workers = config
            .workers
            .unwrap_or_else(|| topology.cores().len())
            .max(1);
        let mut slots = topology.plan_workers(config.first_worker_slot + workers);
        slots.drain(..config.first_worker_slot.min(slots.len()));
        for (index, slot) in slots.iter_mut().enumerate() {
            slot.worker = index;
        }
        let mut notes = vec![format!("topology: {}", topology.source())];
        if let Some(note) = topology.memory_binding_note() {
            notes.push(format!("page memory is not bound to NUMA nodes: {note}"));
        }
        let account = MemoryAccount::new(config.max_memory_bytes);
        let pools =
            sched::node_pools(&topology, &account).map_err(|(node, err)| RunError::PagePool {
                node,
                reason: err.to_string(),
            })?;
        if pools.is_empty() {
            return Err(RunError::NoPagePool);
        }
        Ok(Resources {
            slots,
            pools,
            account,
            notes,
        })
    }

    /// The first NUMA node's page source (loading, and what a cluster backend allocates from).
    pub fn pages(&self) -> &PageSource {
        &self.pools[0]
    }
}

/// What a node's VM is built on: its store, its backend, and who serves runner ids, stacks,
/// heap and input (`None`: this node itself).
pub struct MachineParts {
    pub store: Arc<PageStore>,
    /// This node's transaction ids start here (unique across a cluster's nodes).
    pub first_txn: u64,
    pub backend: Arc<dyn Backend>,
    pub control: Option<Arc<dyn Control>>,
}

/// One node's VM, ready to run.
pub struct Machine {
    shared: Arc<Shared>,
    resources: Resources,
    console_thread: CaptureHandle,
    persist_dir: Option<PathBuf>,
    pin_workers: bool,
    started: Instant,
    first_id: u64,
    metering: sched::Metering,
}

impl Machine {
    /// Loads the initial memory (persistent store, image, `--load` files) of the pages this
    /// node homes, and prepares its workers.
    pub fn new(
        image: LoadedImage,
        config: Config,
        resources: Resources,
        parts: MachineParts,
        homes: &dyn Fn(PageKey) -> bool,
    ) -> Result<Machine, RunError> {
        let started = Instant::now();
        // Bad input is refused before any page is taken or any runner runs: the placement of
        // the initial memory, then a store directory that could not be saved to at the end.
        check_initial_memory(&image, &config)?;
        let persisted = match &config.persist_dir {
            Some(dir) => {
                let persist_err =
                    |err: crate::persist::PersistError| RunError::Persist(err.to_string());
                crate::persist::check_dir(dir).map_err(persist_err)?;
                crate::persist::load(dir).map_err(persist_err)?
            }
            None => Vec::new(),
        };
        let initial = initial_pages(&image, &config, persisted, resources.pages(), homes)?;
        let MachineParts {
            store,
            first_txn,
            backend,
            control,
        } = parts;
        for (key, page) in initial {
            store.install_initial(key, page);
        }

        let mut read_only = RangeSet::default();
        let mut image_set = RangeSet::default();
        for section in &image.image.sections {
            if let Some(range) = Range::new(section.addr, section.len_bytes) {
                image_set.insert(range);
                if !section.kind.writable() {
                    read_only.insert(range);
                }
            }
        }

        let (console, console_thread) =
            Console::start(config.output.clone(), Arc::clone(&resources.account));
        let input: Box<dyn Read + Send> = match &config.input {
            InputMode::Inherit => Box::new(std::io::stdin()),
            InputMode::Bytes(bytes) => Box::new(std::io::Cursor::new(bytes.clone())),
        };
        let first_id = FIRST_ID;
        let local = Arc::new(LocalControl::new(
            config.max_runners,
            config.fresh_slots,
            backend.resets_exit_records(),
            Arc::clone(&store),
            input,
        ));
        let control = control.unwrap_or_else(|| Arc::clone(&local) as Arc<dyn Control>);
        let shared = Arc::new(Shared {
            store,
            backend,
            control,
            local,
            program: {
                let mut program = Program::new(image);
                if config.profile_hz.is_some() {
                    program.track_calls();
                } else if let Some(jit) = &config.jit {
                    program.attach_jit(Arc::clone(jit));
                }
                program
            },
            read_only: Arc::new(read_only),
            image_set,
            max_instructions: config.max_instructions,
            pending_tasks: AtomicU64::new(0),
            done: AtomicBool::new(false),
            sleep: Arc::new(sched::Sleep::default()),
            inbox: Mutex::new(VecDeque::new()),
            templates: Mutex::new(HashMap::new()),
            console,
            counters: Counters::default(),
            internal_errors: AtomicU64::new(0),
            clock: Arc::clone(&config.clock),
            next_txn: AtomicU64::new(first_txn.max(1)),
            reset_pages: resources.pages().clone(),
            profiling: config.profile_hz.is_some(),
        });
        let measured = config.measure_workers || config.profile_hz.is_some();
        let metering = sched::Metering {
            meters: if measured {
                resources
                    .slots
                    .iter()
                    .map(|slot| {
                        let place = WorkerPlace {
                            node: config.node_index,
                            worker: slot.worker as u32,
                            pu: slot.pu,
                        };
                        Arc::new(WorkerMeter::new(
                            place,
                            config.measure_workers,
                            config.profile_hz,
                            started,
                        ))
                    })
                    .collect()
            } else {
                Vec::new()
            },
            hw: config.measure_workers,
        };
        Ok(Machine {
            shared,
            resources,
            console_thread,
            persist_dir: config.persist_dir,
            pin_workers: config.pin_workers,
            started,
            first_id,
            metering,
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The profile samples taken so far (a cluster node sends them to node 0 before it
    /// reports; `finish` puts what is left in the report).
    pub fn take_profile(&self) -> Vec<dvm_perf::profile::Sample> {
        self.metering
            .meters
            .iter()
            .flat_map(|meter| meter.take_samples())
            .collect()
    }

    pub fn resources(&self) -> &Resources {
        &self.resources
    }

    /// The root runner, counted and with its snapshot registered (on the node that runs it).
    pub fn root_task(&self) -> Result<Task, RunError> {
        let stack = self
            .shared
            .local
            .allocate_stack(self.first_id, 0)
            .ok_or(RunError::NoRootStack)?;
        self.shared.count_task();
        Ok(Task {
            id: self.first_id,
            kind: TaskKind::Root,
            entry: self.shared.program().image.image.entry,
            space: 0,
            stack,
            using: Vec::new(),
            watched: Vec::new(),
            snapshot: Some(
                self.shared
                    .store
                    .begin_snapshot(self.first_id, Scope::Everything),
            ),
        })
    }

    /// Runs the workers until the node is done; returns where they ran and notes on pinning.
    pub fn run(&self, root: Option<Task>) -> (Vec<WorkerInfo>, Vec<String>) {
        sched::run_workers(
            &self.shared,
            &self.resources.slots,
            &self.resources.pools,
            &self.shared.sleep,
            self.pin_workers,
            root,
            &self.metering,
        )
    }

    /// Ends the run: flushes the console, saves the persistent range, and reports.
    pub fn finish(self, workers: Vec<WorkerInfo>, notes: Vec<String>) -> Result<Report, RunError> {
        self.conclude(workers, notes, false)
    }

    /// `finish`, leaving the freeing of the store and the pools to a thread of its own: for a
    /// process that exits once it has the report. Only where nothing else (a cluster node's
    /// transport, say) must be closed in order before the process exits.
    pub fn finish_detached(
        self,
        workers: Vec<WorkerInfo>,
        notes: Vec<String>,
    ) -> Result<Report, RunError> {
        self.conclude(workers, notes, true)
    }

    fn conclude(
        self,
        workers: Vec<WorkerInfo>,
        notes: Vec<String>,
        detach: bool,
    ) -> Result<Report, RunError> {
        // Every task is done: dropped templates were never runners that ran.
        self.shared.console.close();
        let (stdout, stderr) = self.console_thread.join().unwrap_or_default();
        if let Some(dir) = &self.persist_dir {
            crate::persist::save(dir, &self.shared.store)
                .map_err(|err| RunError::Persist(err.to_string()))?;
        }
        let account = &self.resources.account;
        let stats = Stats {
            workers: workers.len() as u64,
            pages_allocated: account.pages_allocated(),
            pages_copied: account.pages_copied(),
            versions_pruned: self.shared.store.versions_pruned(),
            peak_memory_bytes: account.peak_bytes(),
            wall_time_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            ..self.shared.counters_now()
        };
        let mut placement_notes = self.resources.notes.clone();
        placement_notes.extend(notes);
        let meters = &self.metering.meters;
        let report = Report {
            stats,
            workers,
            placement_notes,
            internal_errors: self.shared.internal_errors.load(Ordering::Relaxed),
            stdout,
            stderr,
            profile: meters
                .iter()
                .flat_map(|meter| meter.take_samples())
                .collect(),
            profile_dropped: meters.iter().map(|meter| meter.dropped()).sum(),
        };
        if detach {
            // Freeing every version and page of a long run takes a while (a run of 10^5
            // runners: tens of milliseconds, a sixth of its time), and a process about to exit
            // need not wait for it.
            let Machine {
                shared, resources, ..
            } = self;
            let teardown = move || drop((shared, resources));
            // Should the thread not start, the closure, and with it the machine, is dropped here.
            let _ = std::thread::Builder::new()
                .name("dvm-teardown".into())
                .spawn(teardown);
        }
        Ok(report)
    }
}

/// Runs a program to completion on this node alone.
pub fn run(image: LoadedImage, config: Config) -> Result<Report, RunError> {
    let resources = Resources::new(&config)?;
    let store = Arc::new(PageStore::new());
    let parts = MachineParts {
        backend: Arc::new(LocalBackend::new(Arc::clone(&store))),
        store,
        first_txn: 1,
        control: None,
    };
    let machine = Machine::new(image, config, resources, parts, &|_| true)?;
    let root = machine.root_task()?;
    let (workers, notes) = machine.run(Some(root));
    machine.finish_detached(workers, notes)
}

/// The committed shared memory of a finished single-node run, readable after it: the newest
/// committed version of every page (what a runner starting after the run would see). It holds
/// the run's page store, and with it the run's committed pages, until it is dropped.
pub struct CommittedMemory {
    store: Arc<PageStore>,
}

/// Why committed memory could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MemoryReadError {
    #[error(
        "{addr:#x} + {len_bytes} bytes is not inside one space's shared region \
         ({:#x}..{:#x} of a space)",
        abi::SHARED_BASE,
        abi::SHARED_END
    )]
    NotShared { addr: u64, len_bytes: u64 },
}

impl CommittedMemory {
    /// Fills `buf` with the newest committed bytes from `addr` on (zeros where nothing was ever
    /// written). The whole range must lie in the shared region of one space: private memory
    /// belongs to runners and ends with them.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryReadError> {
        let len_bytes = buf.len() as u64;
        if len_bytes == 0 {
            return Ok(());
        }
        let not_shared = MemoryReadError::NotShared { addr, len_bytes };
        let last = addr.checked_add(len_bytes - 1).ok_or(not_shared.clone())?;
        let same_space = addr >> abi::SPACE_SHIFT == last >> abi::SPACE_SHIFT;
        let shared = |at| crate::view::region_of(at) == crate::view::Region::Shared;
        if !(same_space && shared(addr) && shared(last)) {
            return Err(not_shared);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = addr + done as u64;
            let offset = (at & PAGE_OFFSET_MASK) as usize;
            let take = (PAGE_BYTES - offset).min(buf.len() - done);
            let out = &mut buf[done..done + take];
            match self.store.read_version(page_key(at), u64::MAX).version {
                Some((_, page)) => out.copy_from_slice(&page[offset..offset + take]),
                None => out.fill(0),
            }
            done += take;
        }
        Ok(())
    }
}

/// `run`, keeping the committed shared memory readable afterwards. Nothing of the run is left
/// running when it returns (the store and pools are freed when the `CommittedMemory` is
/// dropped, on the caller's thread).
pub fn run_keeping(
    image: LoadedImage,
    config: Config,
) -> Result<(Report, CommittedMemory), RunError> {
    let resources = Resources::new(&config)?;
    let store = Arc::new(PageStore::new());
    let parts = MachineParts {
        backend: Arc::new(LocalBackend::new(Arc::clone(&store))),
        store: Arc::clone(&store),
        first_txn: 1,
        control: None,
    };
    let machine = Machine::new(image, config, resources, parts, &|_| true)?;
    let root = machine.root_task()?;
    let (workers, notes) = machine.run(Some(root));
    let report = machine.finish(workers, notes)?;
    Ok((report, CommittedMemory { store }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Format;

    /// Free shared memory, page-aligned, away from the image.
    const W: u64 = 0x30_0000_0000;
    const PAGE: u64 = PAGE_BYTES as u64;

    fn image() -> LoadedImage {
        let source =
            "main:\n    exit:c\n.data\nd: .quad 0x1122334455667788\n.bss\nb: .zero 0x3000\n";
        let image = crate::asm::assemble("initial.dasm", source).expect("the program assembles");
        crate::image::validate(Format::Elf, image).expect("the image is valid")
    }

    fn source(limit_bytes: u64) -> PageSource {
        let topology = dvm_numa::Topology::detect();
        let pool = dvm_numa::PagePool::new(&topology, 0, 1 << 20).expect("a page pool");
        PageSource::new(pool, MemoryAccount::new(limit_bytes))
    }

    fn config(loads: Vec<(u64, Vec<u8>)>) -> Config {
        Config {
            loads: loads
                .into_iter()
                .enumerate()
                .map(|(index, (addr, bytes))| (addr, bytes.into(), format!("load{index}")))
                .collect(),
            ..Config::default()
        }
    }

    fn filled(byte: u8) -> Box<[u8; PAGE_BYTES]> {
        Box::new([byte; PAGE_BYTES])
    }

    /// The placement's definition, one byte at a time: persisted pages, then the non-bss
    /// sections, then the loads in order, each byte over what is there; new pages start zero.
    fn reference(
        image: &LoadedImage,
        config: &Config,
        persisted: &[(PageKey, Box<[u8; PAGE_BYTES]>)],
        homes: &dyn Fn(PageKey) -> bool,
    ) -> HashMap<PageKey, Vec<u8>> {
        let mut pages: HashMap<PageKey, Vec<u8>> = persisted
            .iter()
            .map(|(key, bytes)| (*key, bytes.to_vec()))
            .collect();
        let sections = image
            .image
            .sections
            .iter()
            .filter(|section| section.kind != SectionKind::Bss)
            .map(|section| (section.addr, &section.bytes));
        let loads = config.loads.iter().map(|(addr, bytes, _)| {
            let bytes = match bytes {
                LoadBytes::Bytes(bytes) => bytes.clone(),
                LoadBytes::File { path, .. } => std::fs::read(path).expect("the load file"),
            };
            (*addr, bytes)
        });
        let sections = sections.map(|(addr, bytes)| (addr, bytes.clone()));
        for (addr, bytes) in sections.chain(loads) {
            for (index, byte) in bytes.iter().enumerate() {
                let at = addr + index as u64;
                let page = pages
                    .entry(page_key(at))
                    .or_insert_with(|| vec![0; PAGE_BYTES]);
                page[(at & PAGE_OFFSET_MASK) as usize] = *byte;
            }
        }
        pages.retain(|key, _| homes(*key));
        pages
    }

    fn contents(pages: &HashMap<PageKey, Page>) -> HashMap<PageKey, Vec<u8>> {
        pages
            .iter()
            .map(|(key, page)| (*key, page.to_vec()))
            .collect()
    }

    #[test]
    fn a_load_over_partial_and_whole_pages_lands_byte_exact() {
        let image = image();
        // 16 bytes at the end of W's page, the whole next page, 100 bytes of the one after.
        let first = W + PAGE - 16;
        let data: Vec<u8> = (0..16 + PAGE_BYTES + 100)
            .map(|index| (index % 251 + 1) as u8)
            .collect();
        // A later load shares the earlier one's last page (loads may not overlap).
        let config = config(vec![
            (first, data.clone()),
            (W + 2 * PAGE + 150, vec![0xAB; 10]),
        ]);
        // W's page was persisted: the load's first piece lands over it, the rest stays.
        let persisted = || {
            vec![
                (page_key(W), filled(0xEE)),
                (page_key(W + 16 * PAGE), filled(0x55)),
            ]
        };
        let pages = source(1 << 30);
        let all = initial_pages(&image, &config, persisted(), &pages, &|_| true)
            .expect("the initial memory is built");

        let page = |addr: u64| all.get(&page_key(addr)).expect("the page exists");
        assert!(page(W)[..PAGE_BYTES - 16].iter().all(|byte| *byte == 0xEE));
        assert_eq!(page(W)[PAGE_BYTES - 16..], data[..16]);
        assert_eq!(page(W + PAGE)[..], data[16..16 + PAGE_BYTES]);
        let last = page(W + 2 * PAGE);
        assert_eq!(last[..100], data[16 + PAGE_BYTES..]);
        assert_eq!(last[150..160], [0xAB; 10]);
        assert!(
            last[100..150]
                .iter()
                .chain(&last[160..])
                .all(|byte| *byte == 0),
            "outside the loads: zero"
        );
        assert!(page(W + 16 * PAGE).iter().all(|byte| *byte == 0x55));
        assert_eq!(
            contents(&all),
            reference(&image, &config, &persisted(), &|_| true)
        );

        // Bss pages are zero without being materialised.
        let bss = image
            .image
            .sections
            .iter()
            .find(|section| section.kind == SectionKind::Bss)
            .expect("the image has a .bss");
        assert!(!all.contains_key(&page_key(bss.end() - 1)));
        assert_eq!(pages.account().pages_allocated(), all.len() as u64);

        // A node takes only the pages it homes, and allocates no others.
        let odd = |key: PageKey| key % 2 == 1;
        let homed = source(1 << 30);
        let some = initial_pages(&image, &config, persisted(), &homed, &odd)
            .expect("the homed initial memory is built");
        assert!(!some.is_empty() && some.len() < all.len());
        assert_eq!(
            contents(&some),
            reference(&image, &config, &persisted(), &odd)
        );
        assert_eq!(homed.account().pages_allocated(), some.len() as u64);
    }

    /// `config` with each load's bytes written to a file in `dir` and loaded from there.
    fn from_files(config: &Config, dir: &std::path::Path) -> Config {
        std::fs::create_dir_all(dir).expect("a scratch directory");
        let loads = config
            .loads
            .iter()
            .enumerate()
            .map(|(index, (addr, bytes, name))| {
                let LoadBytes::Bytes(bytes) = bytes else {
                    panic!("loads in memory")
                };
                let path = dir.join(format!("load{index}.bin"));
                std::fs::write(&path, bytes).expect("the load file is written");
                let len_bytes = bytes.len() as u64;
                (*addr, LoadBytes::File { path, len_bytes }, name.clone())
            })
            .collect();
        Config {
            loads,
            ..config.clone()
        }
    }

    #[test]
    fn a_load_from_a_file_lands_as_the_same_bytes_in_memory_do() {
        let image = image();
        // Over 2 MiB (chunks of 1 MiB) starting 16 bytes before a page end, and a small one.
        let first = W + PAGE - 16;
        let data: Vec<u8> = (0..(2 << 20) + 5000)
            .map(|index| (index % 253) as u8)
            .collect();
        let in_memory = config(vec![(first, data), (W + 4096 * PAGE, vec![7; 10])]);
        let dir = std::env::temp_dir().join(format!("dvm-load-{}", std::process::id()));
        let from_file = from_files(&in_memory, &dir);
        for homes in [&(|_| true) as &dyn Fn(PageKey) -> bool, &|key: PageKey| {
            key % 3 == 0
        }] {
            let memory_pages =
                initial_pages(&image, &in_memory, Vec::new(), &source(1 << 30), homes)
                    .expect("built from memory");
            let pool = source(1 << 30);
            let file_pages = initial_pages(&image, &from_file, Vec::new(), &pool, homes)
                .expect("built from files");
            assert_eq!(contents(&file_pages), contents(&memory_pages));
            assert_eq!(
                contents(&file_pages),
                reference(&image, &from_file, &[], homes)
            );
            assert_eq!(pool.account().pages_allocated(), file_pages.len() as u64);
        }
        // A file shorter than it was when checked: an error naming the load and the byte.
        let (_, LoadBytes::File { path, .. }, _) = &from_file.loads[0] else {
            panic!("a file load")
        };
        std::fs::write(path, vec![1u8; (1 << 20) + 10]).expect("the file shrinks");
        let err = initial_pages(&image, &from_file, Vec::new(), &source(1 << 30), &|_| true)
            .expect_err("a short file is refused");
        assert!(
            matches!(&err, RunError::LoadRead { name, offset, .. } if name == "load0" && *offset == 1 << 20),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn loads_in_reserved_areas_and_overlapping_loads_are_refused() {
        let image = image();
        let check = |loads: Vec<(u64, Vec<u8>)>, persist: bool| {
            let mut config = config(loads);
            if persist {
                config.persist_dir = Some(PathBuf::from("unused"));
            }
            check_initial_memory(&image, &config)
        };
        for area in &abi::RESERVED_AREAS {
            // In space 0 and in space 3, just inside the area's end (heap and stacks adjoin).
            for space in [0u64, 3] {
                let start = (space << abi::SPACE_SHIFT) + area.offsets.end - 8;
                assert_eq!(
                    check(vec![(W, vec![1; 8]), (start, vec![1; 16])], false),
                    Err(RunError::LoadInReservedArea {
                        name: "load1".into(),
                        start,
                        end: start + 16,
                        area: area.name.into(),
                        area_start: (space << abi::SPACE_SHIFT) + area.offsets.start,
                        area_end: (space << abi::SPACE_SHIFT) + area.offsets.end,
                    }),
                    "{}",
                    area.name
                );
            }
        }
        // The persistent range is reserved only when --persist fills it (its AMR part from any
        // space, the rest in space 0 alone).
        let persistent = abi::PERSIST_BASE + PAGE;
        assert_eq!(check(vec![(persistent, vec![1; 8])], false), Ok(()));
        assert!(matches!(
            check(vec![(persistent, vec![1; 8])], true),
            Err(RunError::LoadInReservedArea { area, .. }) if area.contains("persistent")
        ));
        let aliased = (2 << abi::SPACE_SHIFT) + persistent;
        assert!(check(vec![(aliased, vec![1; 8])], true).is_err());
        let private_to_space = (2 << abi::SPACE_SHIFT) + abi::AMR_END;
        assert_eq!(check(vec![(private_to_space, vec![1; 8])], true), Ok(()));

        assert_eq!(
            check(
                vec![
                    (W, vec![1; 64]),
                    (W + 0x1000, vec![1; 8]),
                    (W + 48, vec![1; 32])
                ],
                false
            ),
            Err(RunError::LoadsOverlap {
                first: "load0".into(),
                first_start: W,
                first_end: W + 64,
                second: "load2".into(),
                second_start: W + 48,
                second_end: W + 80,
                overlap_start: W + 48,
                overlap_end: W + 64,
            })
        );
        // A load inside another, found although a third lies between them in address order.
        assert!(matches!(
            check(vec![(W, vec![1; 4096]), (W + 8, vec![1; 8]), (W + 100, vec![1; 8])], false),
            Err(RunError::LoadsOverlap { first, second, .. }) if first == "load0" && second == "load1"
        ));
        // Touching loads and empty ones do not overlap.
        assert_eq!(
            check(
                vec![(W, vec![1; 64]), (W + 64, vec![1; 8]), (W + 8, Vec::new())],
                false
            ),
            Ok(())
        );
        // The same AMR bytes through two spaces do.
        let amr = abi::AMR_BASE + 0x10_0000;
        assert!(matches!(
            check(vec![(amr, vec![1; 16]), ((1 << abi::SPACE_SHIFT) + amr + 8, vec![1; 16])], false),
            Err(RunError::LoadsOverlap { overlap_start, overlap_end, .. })
                if overlap_start == (1 << abi::SPACE_SHIFT) + amr + 8
                    && overlap_end == (1 << abi::SPACE_SHIFT) + amr + 16
        ));
        // Non-AMR addresses of two spaces are different memory.
        assert_eq!(
            check(
                vec![(W, vec![1; 16]), ((1 << abi::SPACE_SHIFT) + W, vec![1; 16])],
                false
            ),
            Ok(())
        );
        // A load may not run from one space's shared region into the next.
        let last = (1 << abi::SPACE_SHIFT) - 8;
        assert!(matches!(
            check(vec![(last, vec![1; 16])], false),
            Err(RunError::LoadOutsideShared { .. })
        ));
    }

    #[test]
    fn misplaced_loads_and_the_memory_limit_are_reported() {
        let image = image();
        let build = |loads: Vec<(u64, Vec<u8>)>, limit_bytes: u64| {
            initial_pages(
                &image,
                &config(loads),
                Vec::new(),
                &source(limit_bytes),
                &|_| true,
            )
            .map(|pages| pages.len())
        };
        assert_eq!(
            build(vec![(abi::CODE_BASE + 1, vec![1; 8])], 1 << 30),
            Err(RunError::LoadOverlapsImage {
                name: "load0".into(),
                addr: abi::CODE_BASE + 1
            })
        );
        let below = 0x7_FFFF_FFF8;
        assert_eq!(
            build(vec![(W, vec![1; 8]), (below, vec![1; 16])], 1 << 30),
            Err(RunError::LoadOutsideShared {
                name: "load1".into(),
                addr: below,
                len_bytes: 16
            })
        );
        // Three pages of load plus the image's do not fit in two pages.
        let three_pages = vec![(W + 1, vec![1; 2 * PAGE_BYTES])];
        assert_eq!(
            build(three_pages.clone(), 2 * PAGE),
            Err(RunError::InitialMemoryLimit {
                limit_bytes: 2 * PAGE
            })
        );
        // A misplaced load is reported as such even when the memory would not fit either.
        let mut with_bad = three_pages.clone();
        with_bad.push((below, vec![1; 16]));
        assert!(matches!(
            build(with_bad, 2 * PAGE),
            Err(RunError::LoadOutsideShared { .. })
        ));
        assert_eq!(
            build(three_pages, 1 << 30),
            Ok(3 + 2),
            "3 load pages, .text and .data"
        );
    }
}
