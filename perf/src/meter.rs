//! What each worker is doing, and (with timing on) for how long.
//!
//! A `WorkerMeter` belongs to one worker thread, which is the only writer of its phase and of
//! its time split; the end-of-run report reads them. The worker finds
//! its meter through a thread-local (`install`), so code far from the scheduler (a cluster
//! backend waiting for a page) can say what it is doing with `enter(Phase::WaitPage)`
//! without a meter being passed down to it; on a thread with no meter that is a no-op.
//!
//! Sampling (`--profile`) needs no thread: each worker keeps its own tick schedule. When a
//! worker leaves a phase it records one sample of that phase per tick that fell inside it (so a
//! phase of 3.2 ms at 1 kHz yields 3 samples), and an interpreting worker checks the clock every
//! few thousand instructions and samples its runner's PC when a tick is due (`tick_due`). A
//! sampler thread raising flags was tried first: on these VMs its 1,000 wake-ups a second cost
//! 3% of a worker, more than the samples themselves.
//!
//! Cost: a phase change is one relaxed load and store (by the owner, the only writer); with
//! timing on, also a read of the time-stamp counter (`stamp`, ~8 ns); with sampling on, a read
//! of the monotonic clock (vDSO, ~25 ns). Both are on only when the run asked for statistics or
//! a profile.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::phase::{Phase, TimeSplit, WorkerPlace};
use crate::profile::{Sample, What};

/// Highest sampling rate accepted (a sample per 100 µs per worker).
pub const MAX_HZ: u32 = 10_000;

/// One phase interval yields at most this many samples (a worker asleep for a minute at 10
/// kHz would otherwise make 600,000 at once).
const MAX_SAMPLES_PER_INTERVAL: usize = 1 << 16;

/// One worker's phase, time split and pending profile samples.
#[derive(Debug)]
pub struct WorkerMeter {
    pub place: WorkerPlace,
    phase: AtomicU8,
    timed: bool,
    /// Sampling period, 0 when not sampling.
    period_ns: u64,
    /// When the next sample is due, in ns since `epoch` (owning worker only).
    next_tick_ns: AtomicU64,
    /// Stamps (`stamp()` units) per phase (written by the owning worker only, read after it
    /// stopped).
    time_stamps: [AtomicU64; Phase::COUNT],
    /// When the current phase began, as a stamp (owning worker only).
    since_stamp: AtomicU64,
    epoch: Instant,
    epoch_stamp: u64,
    /// Samples recorded for this worker, in no particular order (at most
    /// `MAX_SAMPLES_PER_WORKER`; the rest are counted in `dropped`).
    samples: Mutex<Vec<Sample>>,
    dropped: AtomicU64,
}

/// A worker keeps at most this many samples (about 70 minutes at 1 kHz, ~0.5 GiB at most).
pub const MAX_SAMPLES_PER_WORKER: usize = 1 << 22;

impl WorkerMeter {
    /// `epoch`: the run's start, shared by every meter so that sample times line up.
    /// `sample_hz`: sample at this rate (clamped to `MAX_HZ`), or not at all.
    pub fn new(
        place: WorkerPlace,
        timed: bool,
        sample_hz: Option<u32>,
        epoch: Instant,
    ) -> WorkerMeter {
        let period_ns = sample_hz.map_or(0, |hz| 1_000_000_000 / u64::from(hz.clamp(1, MAX_HZ)));
        let now = epoch.elapsed().as_nanos() as u64;
        WorkerMeter {
            place,
            phase: AtomicU8::new(Phase::Idle as u8),
            timed,
            period_ns,
            next_tick_ns: AtomicU64::new(now + period_ns),
            time_stamps: Default::default(),
            since_stamp: AtomicU64::new(stamp()),
            epoch,
            epoch_stamp: stamp(),
            samples: Mutex::new(Vec::new()),
            dropped: AtomicU64::new(0),
        }
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Relaxed)).unwrap_or(Phase::Idle)
    }

    /// Nanoseconds since the run began.
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Switches to `phase`; returns the previous one. Owning worker only.
    #[inline]
    pub fn switch(&self, phase: Phase) -> Phase {
        // The owner is the only writer: a load and a store, no read-modify-write. Relaxed:
        // readers need a recent value, not an ordering with anything else.
        let previous = Phase::from_u8(self.phase.load(Ordering::Relaxed)).unwrap_or(Phase::Idle);
        self.phase.store(phase as u8, Ordering::Relaxed);
        if previous != phase && (self.timed || self.period_ns != 0) {
            self.close_interval(previous);
        }
        previous
    }

    /// Accounts the interval of `previous` that ends now: its time, and its samples.
    fn close_interval(&self, previous: Phase) {
        // Owner-only fields: loads and stores, no read-modify-write (a locked instruction per
        // phase change was a measurable share of an empty runner's cost).
        if self.timed {
            let now = stamp();
            let since = self.since_stamp.load(Ordering::Relaxed);
            self.since_stamp.store(now, Ordering::Relaxed);
            let slot = &self.time_stamps[previous as usize];
            let spent = slot.load(Ordering::Relaxed) + now.saturating_sub(since);
            slot.store(spent, Ordering::Relaxed);
        }
        if self.period_ns == 0 {
            return;
        }
        let now = self.now_ns();
        let mut tick = self.next_tick_ns.load(Ordering::Relaxed);
        let mut samples = Vec::new();
        while tick <= now {
            // The interpreter samples its own ticks (with the PC); a tick it had no chance to
            // see (between its last check and the switch) is skipped, not misattributed.
            if previous != Phase::Interpret && samples.len() < MAX_SAMPLES_PER_INTERVAL {
                samples.push(Sample {
                    time_ns: tick,
                    place: self.place,
                    what: What::Phase(previous),
                    stack: Vec::new(),
                });
            }
            tick += self.period_ns;
        }
        self.next_tick_ns.store(tick, Ordering::Relaxed);
        if !samples.is_empty() {
            self.record(samples);
        }
    }

    /// The interpreter asks, every few thousand instructions: is a sample due? Takes the due
    /// tick(s): a runner that ran 3 periods since its last check takes one sample, weighted
    /// by `sample_weight` ticks.
    #[inline]
    pub fn tick_due(&self) -> Option<u64> {
        if self.period_ns == 0 {
            return None;
        }
        let now = self.now_ns();
        let tick = self.next_tick_ns.load(Ordering::Relaxed);
        if now < tick {
            return None;
        }
        let ticks = (now - tick) / self.period_ns + 1;
        self.next_tick_ns
            .store(tick + ticks * self.period_ns, Ordering::Relaxed);
        Some(ticks)
    }

    /// Closes the current phase's interval (at the end of the run).
    pub fn settle(&self) {
        let phase = self.phase();
        if self.timed || self.period_ns != 0 {
            self.close_interval(phase);
        }
        self.phase.store(Phase::Idle as u8, Ordering::Relaxed);
    }

    /// The time split, or `None` when timing was off.
    pub fn time_split(&self) -> Option<TimeSplit> {
        // Stamps to nanoseconds at the rate the stamps advanced over the whole run so far.
        let elapsed_ns = self.now_ns().max(1) as f64;
        let per_ns = stamp().saturating_sub(self.epoch_stamp).max(1) as f64 / elapsed_ns;
        self.timed.then(|| TimeSplit {
            ns: std::array::from_fn(|i| {
                (self.time_stamps[i].load(Ordering::Relaxed) as f64 / per_ns) as u64
            }),
        })
    }

    pub fn record(&self, samples: impl IntoIterator<Item = Sample>) {
        let mut kept = self
            .samples
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        for sample in samples {
            if kept.len() < MAX_SAMPLES_PER_WORKER {
                kept.push(sample);
            } else {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Samples not kept because the worker had `MAX_SAMPLES_PER_WORKER` already.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub fn take_samples(&self) -> Vec<Sample> {
        std::mem::take(
            &mut *self
                .samples
                .lock()
                .unwrap_or_else(|poison| poison.into_inner()),
        )
    }
}

/// A cheap timestamp for the time split, in units whose rate `time_split` measures. On x86_64
/// the CPU's time-stamp counter: ~8 ns and no call, where the vDSO clock took ~25 ns and ~100
/// instructions, and an empty runner changes phase three times (the clock reads made `--stats`
/// cost 5% of an empty runner). Elsewhere, nanoseconds from the monotonic clock. Only
/// differences on one thread are used; a worker that migrates between cores may see a few
/// cycles of skew between their counters, which a time split does not notice.
#[inline]
fn stamp() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC reads a register and has no preconditions or side effects; the
        // intrinsic is `unsafe` only because some operating systems may disable it (CR4.TSD),
        // which Linux does not do for user space.
        #[allow(unsafe_code)]
        unsafe {
            core::arch::x86_64::_rdtsc()
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<WorkerMeter>>> = const { RefCell::new(None) };
}

/// Makes `meter` this thread's meter (a worker, at its start).
pub fn install(meter: Option<Arc<WorkerMeter>>) {
    let _ = CURRENT.try_with(|current| *current.borrow_mut() = meter);
}

/// This thread's meter, if it is a worker with one.
pub fn current() -> Option<Arc<WorkerMeter>> {
    CURRENT
        .try_with(|current| current.borrow().clone())
        .ok()
        .flatten()
}

/// Runs `f` with this thread's meter, if any.
#[inline]
pub fn with_current<R>(f: impl FnOnce(&WorkerMeter) -> R) -> Option<R> {
    CURRENT
        .try_with(|current| current.borrow().as_deref().map(f))
        .ok()
        .flatten()
}

/// Switches this thread to `phase` until the guard drops (then back to what it was).
pub fn enter(phase: Phase) -> PhaseGuard {
    PhaseGuard {
        previous: with_current(|meter| meter.switch(phase)),
    }
}

/// Restores the previous phase on drop.
#[must_use = "the phase lasts as long as the guard"]
pub struct PhaseGuard {
    previous: Option<Phase>,
}

impl Drop for PhaseGuard {
    fn drop(&mut self) {
        if let Some(previous) = self.previous {
            with_current(|meter| meter.switch(previous));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_nest_and_restore() {
        let meter = Arc::new(WorkerMeter::new(
            WorkerPlace::default(),
            true,
            None,
            Instant::now(),
        ));
        install(Some(Arc::clone(&meter)));
        {
            let _commit = enter(Phase::Commit);
            assert_eq!(meter.phase(), Phase::Commit);
            {
                let _wait = enter(Phase::WaitPage);
                assert_eq!(meter.phase(), Phase::WaitPage);
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            assert_eq!(meter.phase(), Phase::Commit);
        }
        assert_eq!(meter.phase(), Phase::Idle);
        meter.settle();
        let split = meter.time_split().expect("timing is on");
        assert!(split.get(Phase::WaitPage) >= 2_000_000, "{split:?}");
        assert!(split.total_ns() >= split.get(Phase::WaitPage));
        install(None);
        // No meter: entering a phase does nothing and does not panic.
        let _idle = enter(Phase::Commit);
        assert!(current().is_none());
    }

    #[test]
    fn untimed_unsampled_meters_measure_nothing() {
        let meter = WorkerMeter::new(WorkerPlace::default(), false, None, Instant::now());
        meter.switch(Phase::Commit);
        std::thread::sleep(std::time::Duration::from_millis(2));
        meter.switch(Phase::Interpret);
        assert_eq!(meter.time_split(), None);
        assert_eq!(meter.tick_due(), None);
        meter.settle();
        assert!(meter.take_samples().is_empty());
    }

    #[test]
    fn phases_yield_one_sample_per_tick_and_the_interpreter_takes_its_own() {
        let place = WorkerPlace {
            node: 1,
            worker: 2,
            pu: 3,
        };
        let meter = WorkerMeter::new(place, false, Some(1000), Instant::now());
        meter.switch(Phase::Commit);
        std::thread::sleep(std::time::Duration::from_millis(20));
        meter.switch(Phase::Interpret);
        let commits = meter.take_samples();
        // 20 ms at 1 kHz: 20 ticks, give or take one at each end (and a slow wake-up).
        assert!((19..=40).contains(&commits.len()), "{}", commits.len());
        assert!(commits
            .iter()
            .all(|s| s.what == What::Phase(Phase::Commit) && s.place == place));
        assert!(commits
            .windows(2)
            .all(|w| w[1].time_ns - w[0].time_ns == 1_000_000));
        std::thread::sleep(std::time::Duration::from_millis(3));
        let due = meter.tick_due().expect("3 ms at 1 kHz: ticks are due");
        assert!(due >= 2, "{due}");
        assert_eq!(meter.tick_due(), None, "taken ticks are not due again");
        meter.switch(Phase::Idle);
        assert!(
            meter.take_samples().is_empty(),
            "interpreter ticks are the interpreter's"
        );
    }
}
