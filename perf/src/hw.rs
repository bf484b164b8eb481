//! Hardware counters per worker thread, where `perf_event_open` offers them.
//!
//! Each counter is opened on its own (not as a group) so that one the kernel refuses — these
//! VMs have no hardware counters at all — leaves the others; a refused counter is `None` and is
//! reported as unavailable, never as zero. Counters measure the calling thread from
//! `WorkerCounters::start` to `finish`.

use perf_event::events::Hardware;
use perf_event::{Builder, Counter};

/// Counts of one worker; `None`: the kernel does not offer that counter here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HwCounts {
    pub cycles: Option<u64>,
    pub instructions: Option<u64>,
    pub cache_misses: Option<u64>,
}

/// Counters opened on the calling thread.
pub struct WorkerCounters {
    counters: [Option<Counter>; 3],
}

fn open(event: Hardware) -> Option<Counter> {
    // pid 0 (the default: this thread, as `inherit` is off), any CPU, user space only: what a
    // runner's instructions cost, without the kernel's share.
    let mut counter = Builder::new(event)
        .exclude_kernel(true)
        .exclude_hv(true)
        .build()
        .ok()?;
    counter.enable().ok()?;
    Some(counter)
}

impl WorkerCounters {
    /// Opens and starts the counters on the calling thread.
    pub fn start() -> WorkerCounters {
        WorkerCounters {
            counters: [
                open(Hardware::CPU_CYCLES),
                open(Hardware::INSTRUCTIONS),
                open(Hardware::CACHE_MISSES),
            ],
        }
    }

    pub fn finish(self) -> HwCounts {
        let [cycles, instructions, misses] = self.counters.map(|counter| {
            counter.and_then(|mut counter| {
                let _ = counter.disable();
                counter.read().ok()
            })
        });
        HwCounts {
            cycles,
            instructions,
            cache_misses: misses,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_count_or_say_they_cannot() {
        let counters = WorkerCounters::start();
        let mut x = 0u64;
        for i in 0..1_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let counts = counters.finish();
        // Where the kernel offers instructions, a million-step loop ran at least that many.
        if let Some(instructions) = counts.instructions {
            assert!(instructions >= 1_000_000, "{counts:?}");
        }
    }
}
