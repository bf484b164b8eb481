//! Workers and task queues.
//!
//! One worker thread per planned slot (by default one per core, from the NUMA topology),
//! pinned to its processor. Each worker owns a FIFO deque (`crossbeam_deque::Worker`): the
//! runners a worker's commits create go to its own deque, so children run near the memory
//! their parent just wrote. An idle worker looks, in order, at: its own deque, the deques of
//! workers on its NUMA node, the global injector (where the root starts), and finally the
//! deques of other nodes — stealing prefers the same node.
//!
//! Queued tasks are boxed: a spawner's commit pushes its children (1000 at once in
//! micro_spawn) onto its own deque, which grows by doubling and shrinks as it drains; with
//! tasks of ~120 bytes each growth copied them and reached for fresh (page-faulting) memory,
//! with boxes it moves pointers, and a box costs less than that.
//!
//! Sleeping: a worker with nothing to do waits on a condition variable for at most
//! `IDLE_WAIT`; pushing a task wakes one sleeper. A wake-up can be missed in the window between
//! a worker's last look at the queues and its wait, which is why the wait is bounded: a missed
//! wake-up costs at most one `IDLE_WAIT`, never a hang.
//!
//! Termination is the executor's business (`Executor::is_done`): the scheduler knows nothing of
//! runners, commits or the VM (`vm` uses `sched`, never the other way round). The VM counts
//! queued plus running tasks; a finishing task pushes its successors before it stops counting
//! itself, so the count reaches zero exactly once, when no runner is queued or running.
//!
//! Idle hook: a worker that finds no task calls `Executor::idle` before it sleeps, which is
//! where a cluster node polls its transport's completions. Steal order: thieves start at a
//! different victim each time (a per-worker xorshift sequence), so one busy worker's deque is
//! not always the first probed by everyone.

use crate::page::{MemoryAccount, PageSource};
use crossbeam_deque::{Injector, Steal, Stealer, Worker};
use dvm_numa::{PagePool, Topology, WorkerSlot};
use dvm_perf::hw::{HwCounts, WorkerCounters};
use dvm_perf::meter::WorkerMeter;
use dvm_perf::phase::{Phase, TimeSplit};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How often a long run reports progress (at `DVM_LOG=info`).
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Idle-wait granularity of workers: a missed wake-up costs at most this.
pub const IDLE_WAIT: Duration = Duration::from_millis(1);

/// What the workers run.
pub trait Executor: Send + Sync {
    type Task: Send;
    /// Runs one task to its end; may push successors with `ctx.push`.
    fn execute(&self, task: Self::Task, ctx: &mut WorkerCtx<Self::Task>);
    /// No task is queued or running, and none will be: the workers stop.
    fn is_done(&self) -> bool;
    /// Called by a worker that found nothing to do, before it sleeps; `true` if it did work
    /// (then the worker looks for tasks again at once).
    fn idle(&self, _ctx: &mut WorkerCtx<Self::Task>) -> bool {
        false
    }
    /// A progress line for long runs.
    fn log_progress(&self, elapsed: Duration);
}

/// Where a worker ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerInfo {
    pub worker: usize,
    pub node: usize,
    pub pu: u32,
    pub pinned: bool,
    pub tasks: u64,
    pub steals: u64,
    /// Time per phase, when the run measured it.
    pub time: Option<TimeSplit>,
    /// Hardware counters, when the run asked for them (each `None` where the kernel has none).
    pub hw: Option<HwCounts>,
}

/// What the workers measure about themselves.
#[derive(Default)]
pub struct Metering {
    /// One meter per worker slot, or none at all (nothing measured, nothing paid).
    pub meters: Vec<Arc<WorkerMeter>>,
    /// Open hardware counters on each worker.
    pub hw: bool,
}

/// Idle workers wait here.
#[derive(Default)]
pub struct Sleep {
    lock: Mutex<()>,
    wakeup: Condvar,
    sleepers: AtomicUsize,
}

impl Sleep {
    fn wait(&self) {
        let guard = self
            .lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let _ = self.wakeup.wait_timeout(guard, IDLE_WAIT);
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }

    pub fn wake_one(&self) {
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            self.wakeup.notify_one();
        }
    }

    pub fn wake_all(&self) {
        self.wakeup.notify_all();
    }
}

/// What a worker thread carries while running tasks.
pub struct WorkerCtx<T> {
    local: Worker<Box<T>>,
    pages: PageSource,
    sleep: Arc<Sleep>,
    /// This worker's phase and time split, when the run measures them.
    pub meter: Option<Arc<WorkerMeter>>,
}

impl<T> WorkerCtx<T> {
    /// Switches this worker's phase (nothing when the run measures nothing).
    #[inline]
    pub fn phase(&self, phase: Phase) {
        if let Some(meter) = &self.meter {
            meter.switch(phase);
        }
    }

    pub fn pages(&self) -> &PageSource {
        &self.pages
    }

    /// Queues a task on this worker. The executor counts its tasks before they are pushed,
    /// so a thief can never finish one before it is counted.
    pub fn push(&self, task: T) {
        self.local.push(Box::new(task));
        self.sleep.wake_one();
    }
}

/// One page source per NUMA node (its pool), all counted in `account`.
pub fn node_pools(
    topology: &Topology,
    account: &Arc<MemoryAccount>,
) -> Result<Vec<PageSource>, (usize, dvm_numa::NumaError)> {
    (0..topology.nodes().len())
        .map(|node| {
            PagePool::new(topology, node, 2 << 20)
                .map(|pool| PageSource::new(pool, Arc::clone(account)))
                .map_err(|err| (node, err))
        })
        .collect()
}

/// Runs workers until no task is pending; returns where they ran and notes worth logging.
pub fn run_workers<E: Executor>(
    shared: &Arc<E>,
    slots: &[WorkerSlot],
    pools: &[PageSource],
    sleep: &Arc<Sleep>,
    pin: bool,
    root: Option<E::Task>,
    metering: &Metering,
) -> (Vec<WorkerInfo>, Vec<String>) {
    let injector: Injector<Box<E::Task>> = Injector::new();
    if let Some(root) = root {
        injector.push(Box::new(root));
    }
    let locals: Vec<Worker<Box<E::Task>>> = slots.iter().map(|_| Worker::new_fifo()).collect();
    let stealers: Vec<(usize, Stealer<Box<E::Task>>)> = locals
        .iter()
        .zip(slots)
        .map(|(local, slot)| (slot.node, local.stealer()))
        .collect();
    // Set once every worker has returned: the progress thread ends at once rather than at its
    // next tick (a tick-sized sleep here would be added to every run's time).
    let workers_gone = (Mutex::new(false), Condvar::new());
    let results: Vec<(WorkerInfo, Option<String>)> = std::thread::scope(|scope| {
        // Progress for long runs, at `DVM_LOG=info`: one line every PROGRESS_EVERY.
        scope.spawn(|| {
            let started = std::time::Instant::now();
            let mut next_report = PROGRESS_EVERY;
            let (gone, wake) = &workers_gone;
            let mut gone = gone.lock().unwrap_or_else(|poison| poison.into_inner());
            while !*gone {
                let left = next_report.saturating_sub(started.elapsed());
                gone = match wake.wait_timeout(gone, left) {
                    Ok((guard, _)) => guard,
                    Err(poison) => poison.into_inner().0,
                };
                if !*gone && started.elapsed() >= next_report {
                    next_report += PROGRESS_EVERY;
                    shared.log_progress(started.elapsed());
                }
            }
        });
        let handles: Vec<_> = locals
            .into_iter()
            .zip(slots)
            .map(|(local, slot)| {
                let injector = &injector;
                let stealers = &stealers;
                let shared = Arc::clone(shared);
                let pages = pools.get(slot.node).or(pools.first()).cloned();
                let sleep = Arc::clone(sleep);
                let meter = metering.meters.get(slot.worker).cloned();
                let hw = metering.hw;
                let slot = *slot;
                std::thread::Builder::new()
                    .name(format!("dvm-worker-{}", slot.worker))
                    .spawn_scoped(scope, move || {
                        // A refused pin is worth one warning; `--no-pin` is the user's choice.
                        let pin_result = pin.then(|| dvm_numa::pin_current_thread(slot.pu));
                        let pinned = matches!(pin_result, Some(Ok(())));
                        let pin_note = match pin_result {
                            Some(Err(err)) => Some(err.to_string()),
                            _ => None,
                        };
                        let mut info = WorkerInfo {
                            worker: slot.worker,
                            node: slot.node,
                            pu: slot.pu,
                            pinned,
                            tasks: 0,
                            steals: 0,
                            time: None,
                            hw: None,
                        };
                        let counters = hw.then(WorkerCounters::start);
                        // Code far from the scheduler (a cluster backend waiting for a page)
                        // finds the meter through the thread.
                        dvm_perf::meter::install(meter.clone());
                        if let Some(pages) = pages {
                            let mut ctx = WorkerCtx {
                                local,
                                pages,
                                sleep,
                                meter: meter.clone(),
                            };
                            work(&*shared, &mut ctx, slot.node, injector, stealers, &mut info);
                        }
                        dvm_perf::meter::install(None);
                        if let Some(meter) = &meter {
                            meter.settle();
                            info.time = meter.time_split();
                        }
                        info.hw = counters.map(WorkerCounters::finish);
                        (info, pin_note)
                    })
            })
            .collect();
        let results = handles
            .into_iter()
            .filter_map(|handle| handle.ok())
            .filter_map(|handle| handle.join().ok())
            .collect();
        let (gone, wake) = &workers_gone;
        *gone.lock().unwrap_or_else(|poison| poison.into_inner()) = true;
        wake.notify_all();
        results
    });
    let mut notes = Vec::new();
    if let Some((_, Some(note))) = results.iter().find(|(_, note)| note.is_some()) {
        notes.push(format!("workers run unpinned: {note}"));
    }
    (results.into_iter().map(|(info, _)| info).collect(), notes)
}

fn work<E: Executor>(
    shared: &E,
    ctx: &mut WorkerCtx<E::Task>,
    node: usize,
    injector: &Injector<Box<E::Task>>,
    stealers: &[(usize, Stealer<Box<E::Task>>)],
    info: &mut WorkerInfo,
) {
    // Seeded by the worker's index: runs differ in timing, never in what is computed.
    let mut victim_seed = (info.worker as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    loop {
        if shared.is_done() {
            return;
        }
        let task = ctx.local.pop().or_else(|| {
            victim_seed ^= victim_seed << 13;
            victim_seed ^= victim_seed >> 7;
            victim_seed ^= victim_seed << 17;
            ctx.phase(Phase::Steal);
            let stolen = find_task(&ctx.local, node, injector, stealers, victim_seed);
            if stolen.is_some() {
                info.steals += 1;
            }
            stolen
        });
        match task {
            Some(task) => {
                info.tasks += 1;
                // The next task's own phases follow; a worker with no next task turns idle
                // below. (One phase change fewer per runner: each reads the clock when the
                // run is measured.)
                shared.execute(*task, ctx);
            }
            None => {
                ctx.phase(Phase::Idle);
                if !shared.idle(ctx) {
                    ctx.sleep.wait();
                }
            }
        }
    }
}

/// Looks for work: the workers of this NUMA node, the injector, then the other nodes' workers;
/// within each group starting at a victim chosen by `start`.
fn find_task<T>(
    local: &Worker<T>,
    node: usize,
    injector: &Injector<T>,
    stealers: &[(usize, Stealer<T>)],
    start: u64,
) -> Option<T> {
    let count = stealers.len().max(1);
    let rotated = || {
        let first = (start % count as u64) as usize;
        stealers[first..].iter().chain(&stealers[..first])
    };
    let near = rotated().filter(|(n, _)| *n == node);
    let far = rotated().filter(|(n, _)| *n != node);
    loop {
        let mut retry = false;
        for (_, stealer) in near.clone() {
            match stealer.steal_batch_and_pop(local) {
                Steal::Success(task) => return Some(task),
                Steal::Retry => retry = true,
                Steal::Empty => {}
            }
        }
        match injector.steal_batch_and_pop(local) {
            Steal::Success(task) => return Some(task),
            Steal::Retry => retry = true,
            Steal::Empty => {}
        }
        for (_, stealer) in far.clone() {
            match stealer.steal_batch_and_pop(local) {
                Steal::Success(task) => return Some(task),
                Steal::Retry => retry = true,
                Steal::Empty => {}
            }
        }
        if !retry {
            return None;
        }
    }
}
