//! DVM's measurement: where the workers' time goes and where the program's time goes.
//!
//! - `phase`: the vocabulary: what a worker is doing (interpreting, committing, idle, …), where
//!   it runs, its time per phase.
//! - `meter`: each worker's phase, kept in one atomic byte that the worker writes and anyone may
//!   read; with timing on, the time spent in each phase (the per-worker time split of
//!   `--stats`); with sampling on, the guest profiler's clock (each worker samples itself, no
//!   sampler thread).
//! - `profile`: samples, their wire form (a cluster gathers them at node 0), and the `perf
//!   script` text that `inferno-collapse-perf`, `stackcollapse-perf.pl`, speedscope and the
//!   Firefox profiler read unchanged.
//! - `flame`: folded stacks and SVG flame graphs from any `perf script` text, with `inferno`.
//! - `hw`: cycles, instructions and cache misses per worker from `perf_event_open`, where the
//!   kernel offers them (never shown as zero when it does not).
//!
//! Nothing here knows the engine: the engine depends on this crate, never the other way round.

pub mod flame;
pub mod hw;
pub mod meter;
pub mod phase;
pub mod profile;
