//! Time, as the engine sees it: the wall clock a program reads (`int 0x80` call 7), the sleeps
//! it asks for (call 2), and the monotonic time of progress reports.
//!
//! Behind a trait so that a deterministic simulation can run the engine — or a whole cluster of
//! engines — on virtual time: `ManualClock` never reads the host's clocks and sleeps by
//! advancing itself. Nothing in the engine reads `std::time` directly for program-visible time.

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync + Debug {
    /// Nanoseconds since the Unix epoch.
    fn unix_time_ns(&self) -> u64;
    /// Time since the clock was made; never goes back.
    fn elapsed(&self) -> Duration;
    /// Blocks the calling runner for `duration` (of this clock's time).
    fn sleep(&self, duration: Duration);
}

/// The host's clocks.
#[derive(Debug)]
pub struct SystemClock {
    start: Instant,
}

impl SystemClock {
    pub fn new() -> SystemClock {
        SystemClock {
            start: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock::new()
    }
}

impl Clock for SystemClock {
    fn unix_time_ns(&self) -> u64 {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        u64::try_from(since_epoch.as_nanos()).unwrap_or(u64::MAX)
    }

    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

/// Virtual time for simulations and tests: starts at a given instant and moves only when
/// advanced or slept on (a sleep returns at once, having moved the clock).
#[derive(Debug)]
pub struct ManualClock {
    start_unix_ns: u64,
    elapsed_ns: AtomicU64,
}

impl ManualClock {
    pub fn new(start_unix_ns: u64) -> ManualClock {
        ManualClock {
            start_unix_ns,
            elapsed_ns: AtomicU64::new(0),
        }
    }

    pub fn advance(&self, duration: Duration) {
        let ns = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        self.elapsed_ns.fetch_add(ns, Ordering::AcqRel);
    }
}

impl Clock for ManualClock {
    fn unix_time_ns(&self) -> u64 {
        self.start_unix_ns
            .saturating_add(self.elapsed_ns.load(Ordering::Acquire))
    }

    fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.elapsed_ns.load(Ordering::Acquire))
    }

    fn sleep(&self, duration: Duration) {
        self.advance(duration);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_time_moves_only_when_told() {
        let clock = ManualClock::new(1_700_000_000_000_000_000);
        assert_eq!(clock.elapsed(), Duration::ZERO);
        clock.sleep(Duration::from_micros(1500));
        assert_eq!(clock.elapsed(), Duration::from_micros(1500));
        assert_eq!(clock.unix_time_ns(), 1_700_000_000_001_500_000);
    }

    #[test]
    fn system_time_is_after_2020() {
        assert!(SystemClock::new().unix_time_ns() > 1_577_836_800_000_000_000);
    }
}
