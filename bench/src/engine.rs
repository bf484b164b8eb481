//! The engine rows of `dvm-bench run` (`--only engine`): what one worker pays per DISA
//! instruction, per runner and per commit, for this build and, with `--baseline-dvm`, for an
//! earlier build side by side in the same run.
//!
//! Every figure is a difference of two runs of one program that differ only in the amount of
//! work (I=1 against I=0 k-means iterations, R against R/10 runners, ...), so the start-up of
//! the process (assembling, loading, thread start) cancels out:
//! - host instructions per DISA instruction: `valgrind --tool=callgrind`'s instruction count
//!   (repeatable whatever the machine does), divided by the difference of DVM's own
//!   `instructions` counter; measured once, as it does not vary;
//! - microseconds per empty runner and commits per second: the process's CPU time (user +
//!   system, getrusage), medians over the repetitions. CPU time rather than wall time: with one
//!   worker it is the work done, and it is less disturbed by other programs on a shared machine;
//! - bytes retained per finished runner: the difference of the processes' peak RSS (getrusage),
//!   and of DVM's page-memory peak (`peak_memory_bytes`), per runner.

use crate::common::{
    dvm_run_argv, dvm_stats, example_program, markdown_table, measure_once, median, params_file,
    path_str, s,
};
use crate::data;
use crate::measure::Outcome;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The sizes of the engine cases.
pub struct Sizes {
    /// k-means points of the callgrind runs (I=1 minus I=0).
    pub kmeans_n: u64,
    /// Primes below this bound (minus a run below `primes_m / 16`).
    pub primes_m: u64,
    /// Empty runners (micro_spawn) and one-page commits (micro_commit): R against R/10.
    pub runners: u64,
    /// Runners of the callgrind micro_spawn runs (R against R/10).
    pub callgrind_runners: u64,
    /// Links of micro_chain (a chain of runners), when the example exists.
    pub chain_r: u64,
    /// Batches of 1,000 aborted children of micro_abort, when the example exists.
    pub abort_batches: u64,
    /// Commits of micro_pinned's chain, and its spinner's loop iterations (enough to outlast
    /// the chain: the output says whether it did).
    pub pinned_r: u64,
    pub pinned_spin: u64,
    pub parts: u64,
    pub seed: u64,
}

/// One `dvm` binary to measure.
pub struct Build {
    pub label: String,
    pub dvm: PathBuf,
}

/// A pair of runs of one program: `big` does more work than `small`; the figure is their
/// difference.
struct Pair {
    build: usize,
    metric: Metric,
    small: Result<Vec<String>, String>,
    big: Result<Vec<String>, String>,
    /// The work of `big` minus that of `small` (runners, commits), for per-unit figures.
    units: u64,
    /// Measured once (callgrind) rather than every repetition.
    once: bool,
    samples: Vec<(Outcome, Outcome)>,
    errors: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Metric {
    KmeansHostPerDisa,
    PrimesHostPerDisa,
    SpawnHostPerRunner,
    SpawnMicros,
    SpawnRetained,
    CommitRate,
    ChainRetained,
    AbortPeak,
    PinnedRetained,
}

impl Metric {
    fn label(self) -> &'static str {
        match self {
            Metric::KmeansHostPerDisa => {
                "host instructions per DISA instruction, k-means inner loop (callgrind)"
            }
            Metric::PrimesHostPerDisa => {
                "host instructions per DISA instruction, primes (callgrind)"
            }
            Metric::SpawnHostPerRunner => {
                "host instructions per empty runner, spawn + commit (callgrind)"
            }
            Metric::SpawnMicros => "µs of CPU per empty runner, spawn + commit (micro_spawn)",
            Metric::SpawnRetained => {
                "bytes retained per finished empty runner: peak RSS / page memory"
            }
            Metric::CommitRate => "one-page commits per CPU second (micro_commit)",
            Metric::ChainRetained => {
                "bytes retained per link of a runner chain: peak RSS / page memory (micro_chain)"
            }
            Metric::AbortPeak => {
                "peak RSS spawning and aborting children 1,000 at a time (micro_abort), MiB"
            }
            Metric::PinnedRetained => {
                "bytes kept per commit to one page next to a runner running the whole time: \
                 peak RSS / page memory (micro_pinned, 2 workers)"
            }
        }
    }

    /// What issue 8 asks for, for the table's last column.
    fn target(self) -> &'static str {
        match self {
            Metric::KmeansHostPerDisa => "≤ 60",
            Metric::SpawnMicros => "≤ 2",
            Metric::SpawnRetained | Metric::ChainRetained => "≤ 1024",
            Metric::CommitRate => "≥ 250,000",
            Metric::AbortPeak => "constant in the batches",
            Metric::PinnedRetained => "flat (≈ 0)",
            _ => "",
        }
    }
}

pub struct Suite {
    builds: Vec<Build>,
    pairs: Vec<Pair>,
    pub sizes_line: String,
}

/// Writes the inputs and lists the engine cases for every build.
pub fn plan(builds: Vec<Build>, root: &Path, data_dir: &Path, sz: &Sizes) -> Result<Suite, String> {
    let program = |name: &str| example_program(root, name);
    let params = |name: &str, values: &[u64]| params_file(data_dir, name, values);
    let p = sz.parts;
    // Two k-means partitions: the pages at a partition's slice boundaries are only partly
    // allowed to it and take the checked path on every access. At N=10^6 over 64 partitions
    // they are 1% of the data; at the small N callgrind can afford over 64 partitions they would
    // be most of it, and the figure would not be the inner loop's.
    let (n, d, k, kp) = (sz.kmeans_n, 8, 16, 2);
    let dir = data_dir.join(format!("kmeans-n{n}-d{d}-k{k}-s{}", sz.seed));
    let (points, _) = data::gen_points(&dir, n, d, k, sz.seed).map_err(|e| e.to_string())?;
    let points = path_str(&points);
    let kmeans = program("kmeans");
    let k0 = params("engine_kmeans_i0", &[n, d, k, 0, kp, 1])?;
    let k1 = params("engine_kmeans_i1", &[n, d, k, 1, kp, 1])?;
    let primes = program("primes");
    let p_small = params("engine_primes_small", &[sz.primes_m / 16, p])?;
    let p_big = params("engine_primes", &[sz.primes_m, p])?;
    let r = sz.runners;
    let spawn = program("micro_spawn");
    let s_small = params("engine_spawn_small", &[r / 10])?;
    let s_big = params("engine_spawn", &[r])?;
    let cr = sz.callgrind_runners;
    let cg_small = params("engine_spawn_cg_small", &[cr / 10])?;
    let cg_big = params("engine_spawn_cg", &[cr])?;
    let commit = program("micro_commit");
    let c_small = params("engine_commit_small", &[r / 10, 1])?;
    let c_big = params("engine_commit", &[r, 1])?;
    let chain = program("micro_chain");
    let ch_small = params("engine_chain_small", &[sz.chain_r / 10])?;
    let ch_big = params("engine_chain", &[sz.chain_r])?;
    let abort = program("micro_abort");
    let a_small = params("engine_abort_small", &[sz.abort_batches / 10])?;
    let a_big = params("engine_abort", &[sz.abort_batches])?;
    let pinned = program("micro_pinned");
    let pn_small = params("engine_pinned_small", &[sz.pinned_r / 10, sz.pinned_spin])?;
    let pn_big = params("engine_pinned", &[sz.pinned_r, sz.pinned_spin])?;

    let mut pairs = Vec::new();
    for (b, build) in builds.iter().enumerate() {
        let run_on = |workers: u64,
                      prog: &Result<String, String>,
                      params: &str,
                      input: Option<&str>,
                      callgrind: bool| {
            let mut v = Vec::new();
            if callgrind {
                v.extend([
                    s("valgrind"),
                    s("--tool=callgrind"),
                    s("--callgrind-out-file=/dev/null"),
                ]);
            }
            v.extend(dvm_run_argv(&build.dvm, prog, workers, params, input)?);
            Ok(v)
        };
        let run = |prog: &Result<String, String>,
                   params: &str,
                   input: Option<&str>,
                   callgrind: bool| { run_on(1, prog, params, input, callgrind) };
        let mut pair = |metric, small, big, units, once| {
            pairs.push(Pair {
                build: b,
                metric,
                small,
                big,
                units,
                once,
                samples: Vec::new(),
                errors: Vec::new(),
            });
        };
        pair(
            Metric::KmeansHostPerDisa,
            run(&kmeans, &k0, Some(&points), true),
            run(&kmeans, &k1, Some(&points), true),
            0,
            true,
        );
        pair(
            Metric::PrimesHostPerDisa,
            run(&primes, &p_small, None, true),
            run(&primes, &p_big, None, true),
            0,
            true,
        );
        pair(
            Metric::SpawnHostPerRunner,
            run(&spawn, &cg_small, None, true),
            run(&spawn, &cg_big, None, true),
            cr - cr / 10,
            true,
        );
        let units = r - r / 10;
        pair(
            Metric::SpawnMicros,
            run(&spawn, &s_small, None, false),
            run(&spawn, &s_big, None, false),
            units,
            false,
        );
        pair(
            Metric::SpawnRetained,
            Err(s("from the micro_spawn runs")),
            Err(s("")),
            units,
            false,
        );
        pair(
            Metric::CommitRate,
            run(&commit, &c_small, None, false),
            run(&commit, &c_big, None, false),
            units,
            false,
        );
        let chain_units = sz.chain_r - sz.chain_r / 10;
        pair(
            Metric::ChainRetained,
            run(&chain, &ch_small, None, false),
            run(&chain, &ch_big, None, false),
            chain_units,
            false,
        );
        pair(
            Metric::AbortPeak,
            run(&abort, &a_small, None, false),
            run(&abort, &a_big, None, false),
            0,
            false,
        );
        pair(
            Metric::PinnedRetained,
            run_on(2, &pinned, &pn_small, None, false),
            run_on(2, &pinned, &pn_big, None, false),
            sz.pinned_r - sz.pinned_r / 10,
            false,
        );
    }
    let sizes_line = format!(
        "engine (1 worker): k-means N={n} D={d} K={k} P={kp} I=1 minus I=0; primes M={} C={p} minus M={}; \
         micro_spawn and micro_commit R={r} minus R={}; callgrind micro_spawn R={cr} minus R={}; \
         micro_chain R={} minus R={}; micro_abort {} minus {} batches of 1,000; \
         micro_pinned R={} minus R={} next to L={}",
        sz.primes_m,
        sz.primes_m / 16,
        r / 10,
        cr / 10,
        sz.chain_r,
        sz.chain_r / 10,
        sz.abort_batches,
        sz.abort_batches / 10,
        sz.pinned_r,
        sz.pinned_r / 10,
        sz.pinned_spin,
    );
    Ok(Suite {
        builds,
        pairs,
        sizes_line,
    })
}

impl Suite {
    /// One repetition: every pair once (the callgrind pairs only in the first repetition).
    pub fn measure(&mut self, me: &Path, rep: usize, reps: usize, timeout: f64) {
        for pair in self.pairs.iter_mut() {
            if pair.once && rep > 0 {
                continue;
            }
            let (Ok(small), Ok(big)) = (&pair.small, &pair.big) else {
                continue;
            };
            let label = format!("{:?} ({})", pair.metric, self.builds[pair.build].label);
            let one = |argv: &[String]| match measure_once(me, argv, timeout) {
                Ok(o) if o.exit == 0 && !o.timed_out => Ok(o),
                Ok(o) => Err(format!(
                    "exit {}{}: {}",
                    o.exit,
                    if o.timed_out { " (timed out)" } else { "" },
                    why_failed(&o.stderr)
                )),
                Err(e) => Err(e),
            };
            match one(small).and_then(|a| one(big).map(|b| (a, b))) {
                Ok((a, b)) => {
                    eprintln!(
                        "[{}/{reps}] engine {label:<44} {:>10.1} ms + {:>10.1} ms",
                        rep + 1,
                        a.wall_ms,
                        b.wall_ms
                    );
                    pair.samples.push((a, b));
                }
                Err(e) => {
                    eprintln!("[{}/{reps}] engine {label}: {e}", rep + 1);
                    pair.errors.push(e);
                }
            }
        }
    }

    /// The value of one metric for one build, as text.
    fn value(&self, build: usize, metric: Metric) -> Option<f64> {
        let source = if metric == Metric::SpawnRetained {
            Metric::SpawnMicros
        } else {
            metric
        };
        let pair = self
            .pairs
            .iter()
            .find(|p| p.build == build && p.metric == source)?;
        let stat = |o: &Outcome, key: &str| {
            dvm_stats(&o.stderr).and_then(|v| v.get(key).and_then(Value::as_f64))
        };
        let per = |values: Vec<f64>| median(values);
        match metric {
            Metric::KmeansHostPerDisa | Metric::PrimesHostPerDisa => per(pair
                .samples
                .iter()
                .filter_map(|(a, b)| {
                    let host = collected(&b.stderr)? - collected(&a.stderr)?;
                    let disa = stat(b, "instructions")? - stat(a, "instructions")?;
                    (disa > 0.0).then(|| host / disa)
                })
                .collect()),
            Metric::SpawnHostPerRunner => per(pair
                .samples
                .iter()
                .filter_map(|(a, b)| {
                    Some((collected(&b.stderr)? - collected(&a.stderr)?) / pair.units as f64)
                })
                .collect()),
            Metric::SpawnMicros => per(pair
                .samples
                .iter()
                .filter_map(|(a, b)| Some((b.cpu_ms? - a.cpu_ms?) * 1000.0 / pair.units as f64))
                .collect()),
            Metric::CommitRate => per(pair
                .samples
                .iter()
                .filter_map(|(a, b)| {
                    let ms = b.cpu_ms? - a.cpu_ms?;
                    (ms > 0.0).then(|| pair.units as f64 * 1000.0 / ms)
                })
                .collect()),
            Metric::SpawnRetained | Metric::ChainRetained | Metric::PinnedRetained => per(pair
                .samples
                .iter()
                .map(|(a, b)| (b.max_rss_kib - a.max_rss_kib) as f64 * 1024.0 / pair.units as f64)
                .collect()),
            Metric::AbortPeak => per(pair
                .samples
                .iter()
                .map(|(_, b)| b.max_rss_kib as f64 / 1024.0)
                .collect()),
        }
    }

    /// Page-memory retention per runner (DVM's own accounting), for the retention rows.
    fn page_bytes(&self, build: usize, metric: Metric) -> Option<f64> {
        let source = if metric == Metric::SpawnRetained {
            Metric::SpawnMicros
        } else {
            metric
        };
        let pair = self
            .pairs
            .iter()
            .find(|p| p.build == build && p.metric == source)?;
        let peak = |o: &Outcome| {
            dvm_stats(&o.stderr).and_then(|v| v.get("peak_memory_bytes").and_then(Value::as_f64))
        };
        median(
            pair.samples
                .iter()
                .filter_map(|(a, b)| Some((peak(b)? - peak(a)?) / pair.units as f64))
                .collect(),
        )
    }

    fn cell(&self, build: usize, metric: Metric) -> String {
        let pair = self
            .pairs
            .iter()
            .find(|p| p.build == build && p.metric == metric);
        if let Some(pair) = pair {
            if let Err(e) = &pair.big {
                if metric != Metric::SpawnRetained {
                    return e.clone();
                }
            }
            if pair.samples.is_empty() && !pair.errors.is_empty() {
                return format!("failed: {}", pair.errors[0]);
            }
        }
        let Some(v) = self.value(build, metric) else {
            return s("-");
        };
        match metric {
            Metric::SpawnRetained | Metric::ChainRetained | Metric::PinnedRetained => {
                let overlapped = pair.is_none_or(|p| {
                    p.samples.iter().all(|(_, b)| {
                        metric != Metric::PinnedRetained || b.stdout.starts_with("chain")
                    })
                });
                let warn = if overlapped {
                    ""
                } else {
                    " (the spinner ended before the chain: raise L)"
                };
                let pages = self
                    .page_bytes(build, metric)
                    .map_or(s("-"), |p| format!("{p:.0}"));
                format!("{v:.0} / {pages}{warn}")
            }
            Metric::CommitRate => format!("{v:.0}"),
            Metric::KmeansHostPerDisa
            | Metric::PrimesHostPerDisa
            | Metric::SpawnMicros
            | Metric::AbortPeak => {
                format!("{v:.1}")
            }
            Metric::SpawnHostPerRunner => format!("{v:.0}"),
        }
    }

    pub fn render(&self) -> String {
        let mut header = vec![s("measure")];
        header.extend(self.builds.iter().map(|b| b.label.clone()));
        if self.builds.len() == 2 {
            header.push(format!(
                "{} / {}",
                self.builds[0].label, self.builds[1].label
            ));
        }
        header.push(s("issue 8 asks"));
        let metrics = [
            Metric::KmeansHostPerDisa,
            Metric::PrimesHostPerDisa,
            Metric::SpawnHostPerRunner,
            Metric::SpawnMicros,
            Metric::SpawnRetained,
            Metric::CommitRate,
            Metric::ChainRetained,
            Metric::AbortPeak,
            Metric::PinnedRetained,
        ];
        let rows: Vec<Vec<String>> = metrics
            .iter()
            .map(|&m| {
                let mut row = vec![s(m.label())];
                row.extend((0..self.builds.len()).map(|b| self.cell(b, m)));
                if self.builds.len() == 2 {
                    row.push(match (self.value(0, m), self.value(1, m)) {
                        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}x", a / b),
                        _ => s("-"),
                    });
                }
                row.push(s(m.target()));
                row
            })
            .collect();
        markdown_table(&header, &rows)
    }
}

/// The line of a failed run's stderr that says why: DVM's fault report or error line, cut to
/// fit a table cell.
fn why_failed(stderr: &str) -> String {
    let line = stderr
        .lines()
        .find(|l| l.contains("faulted:") || l.starts_with("error"))
        .or_else(|| stderr.lines().last())
        .unwrap_or("no output");
    line.chars().take(120).collect()
}

/// `Collected : N` from callgrind's summary on stderr: the host instructions executed.
fn collected(stderr: &str) -> Option<f64> {
    stderr.lines().find_map(|l| {
        let (_, rest) = l.split_once("Collected :")?;
        rest.trim().parse::<f64>().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_told_by_its_fault_line() {
        let err = "dvm: runner 0x3d0 faulted: runner limit: the stack area of space 0 is exhausted\n  at 0x8 (driver+0x4b): newr\n{\"dvm_stats\": {}}\n";
        assert_eq!(
            why_failed(err),
            "dvm: runner 0x3d0 faulted: runner limit: the stack area of space 0 is exhausted"
        );
        assert_eq!(why_failed("one\ntwo"), "two");
        assert_eq!(why_failed(""), "no output");
    }

    #[test]
    fn callgrind_summary_is_read() {
        let err = "==12== Events    : Ir\n==12== Collected : 123456789\n==12==\n==12== I   refs:      123,456,789\n";
        assert_eq!(collected(err), Some(123_456_789.0));
        assert_eq!(collected("no summary"), None);
    }
}
