//! Workers and task queues.
//!
//! One worker thread per planned slot (by default one per core, from the NUMA topology),
//! pinned to its processor. Each worker owns a FIFO deque (`crossbeam_deque::Worker`): the
//! runners a worker's commits create go to its own deque, so children run near the memory
//! their parent just wrote. An idle worker looks, in order, at: its own deque, the deques of
//! workers on its NUMA node, the global injector (where the root starts), and finally the
//! deques of other nodes — stealing prefers the same node.
//!
//! Sleeping: a worker with nothing to do waits on a condition variable for at most
//! `IDLE_WAIT`; pushing a task wakes one sleeper. A wake-up can be missed in the window between
//! a worker's last look at the queues and its wait, which is why the wait is bounded: a missed
//! wake-up costs at most one `IDLE_WAIT`, never a hang.
//!
//! Termination: `Shared::pending_tasks` counts queued plus running tasks. A finishing task
//! pushes its successors (incrementing the count) before decrementing for itself, so the count
//! reaches zero exactly once, when no runner is queued or running.

use crate::page::{MemoryAccount, PageSource};
use crate::vm::{RunError, Shared, Task, IDLE_WAIT};
use crossbeam_deque::{Injector, Steal, Stealer, Worker};
use dvm_numa::{PagePool, Topology, WorkerSlot};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How often a long run reports progress (at `DVM_LOG=info`).
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Where a worker ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerInfo {
    pub worker: usize,
    pub node: usize,
    pub pu: u32,
    pub pinned: bool,
    pub tasks: u64,
    pub steals: u64,
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
pub struct WorkerCtx {
    local: Worker<Task>,
    pages: PageSource,
    sleep: Arc<Sleep>,
}

impl WorkerCtx {
    pub fn pages(&self) -> &PageSource {
        &self.pages
    }

    /// Queues a task on this worker; counted before it is visible to thieves.
    pub fn push(&self, task: Task, pending: &std::sync::atomic::AtomicU64) {
        pending.fetch_add(1, Ordering::AcqRel);
        self.local.push(task);
        self.sleep.wake_one();
    }
}

/// One page source per NUMA node (its pool), all counted in `account`.
pub fn node_pools(
    topology: &Topology,
    account: &Arc<MemoryAccount>,
) -> Result<Vec<PageSource>, RunError> {
    (0..topology.nodes().len())
        .map(|node| {
            PagePool::new(topology, node, 2 << 20)
                .map(|pool| PageSource::new(pool, Arc::clone(account)))
                .map_err(|err| RunError::BadLoad(format!("page pool for NUMA node {node}: {err}")))
        })
        .collect()
}

/// Runs workers until no task is pending; returns where they ran and notes worth logging.
pub fn run_workers(
    shared: &Arc<Shared>,
    slots: &[WorkerSlot],
    pools: &[PageSource],
    pin: bool,
    root: Task,
) -> (Vec<WorkerInfo>, Vec<String>) {
    let injector: Injector<Task> = Injector::new();
    injector.push(root);
    let locals: Vec<Worker<Task>> = slots.iter().map(|_| Worker::new_fifo()).collect();
    let stealers: Vec<(usize, Stealer<Task>)> = locals
        .iter()
        .zip(slots)
        .map(|(local, slot)| (slot.node, local.stealer()))
        .collect();
    let sleep = Arc::clone(&shared.sleep);
    let results: Vec<(WorkerInfo, Option<String>)> = std::thread::scope(|scope| {
        // Progress for long runs, at `DVM_LOG=info`: one line every PROGRESS_EVERY.
        scope.spawn(|| {
            let started = std::time::Instant::now();
            let mut last_report = started;
            while !shared.done.load(Ordering::Acquire) {
                std::thread::sleep(std::time::Duration::from_millis(50));
                if last_report.elapsed() >= PROGRESS_EVERY {
                    last_report = std::time::Instant::now();
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
                let sleep = Arc::clone(&sleep);
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
                        };
                        if let Some(pages) = pages {
                            let mut ctx = WorkerCtx {
                                local,
                                pages,
                                sleep,
                            };
                            work(&shared, &mut ctx, slot.node, injector, stealers, &mut info);
                        }
                        (info, pin_note)
                    })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|handle| handle.ok())
            .filter_map(|handle| handle.join().ok())
            .collect()
    });
    let mut notes = Vec::new();
    if let Some((_, Some(note))) = results.iter().find(|(_, note)| note.is_some()) {
        notes.push(format!("workers run unpinned: {note}"));
    }
    (results.into_iter().map(|(info, _)| info).collect(), notes)
}

fn work(
    shared: &Shared,
    ctx: &mut WorkerCtx,
    node: usize,
    injector: &Injector<Task>,
    stealers: &[(usize, Stealer<Task>)],
    info: &mut WorkerInfo,
) {
    loop {
        if shared.done.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let task = ctx.local.pop().or_else(|| {
            let stolen = find_task(&ctx.local, node, injector, stealers);
            if stolen.is_some() {
                info.steals += 1;
            }
            stolen
        });
        match task {
            Some(task) => {
                info.tasks += 1;
                shared.execute(task, ctx);
            }
            None => ctx.sleep.wait(),
        }
    }
}

fn find_task(
    local: &Worker<Task>,
    node: usize,
    injector: &Injector<Task>,
    stealers: &[(usize, Stealer<Task>)],
) -> Option<Task> {
    let near = stealers.iter().filter(|(n, _)| *n == node);
    let far = stealers.iter().filter(|(n, _)| *n != node);
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
