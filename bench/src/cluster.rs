//! The cluster rows of `dvm-bench run` (`--only cluster`): the same programs on 1 node × 2
//! workers (the baseline), 2 nodes × 1 worker and 4 nodes × 1 worker (`dvm run --nodes N
//! --workers 1`), each checked against the baseline's output and timed; the network traffic and
//! latencies from `--stats=json`'s per-node rows; and the transport's loopback throughput against
//! a plain TCP socket copy (`transport/examples/throughput.rs --machine`), all in the same run.
//!
//! k-means runs twice per shape, with I_base and I iterations: the difference of the traffic,
//! divided by I - I_base, is the steady-state traffic of one iteration (iterations after the
//! first, which also fetches the points).

use crate::common::{
    answer, dvm_stats, example_program, markdown_table, measure_once, median, params_file,
    path_str, s,
};
use crate::data;
use crate::measure::Outcome;
use serde_json::Value;
use std::path::Path;

const PARAMS_ADDR: &str = "0x4000000000";
const DATA_ADDR: &str = "0x5000000000";

/// The sizes of the cluster cases.
pub struct Sizes {
    pub kmeans_n: u64,
    pub kmeans_d: u64,
    pub kmeans_k: u64,
    /// Iterations of the timed k-means runs.
    pub kmeans_i: u64,
    /// Iterations of the second k-means run per shape (traffic of iteration 1 and start-up).
    pub kmeans_i_base: u64,
    pub parts: u64,
    pub primes_m: u64,
    pub commit_r: u64,
    pub throughput_mib: u64,
    pub seed: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Shape {
    nodes: u64,
    workers: u64,
}

const BASELINE: Shape = Shape {
    nodes: 1,
    workers: 2,
};
const SHAPES: [Shape; 3] = [
    BASELINE,
    Shape {
        nodes: 2,
        workers: 1,
    },
    Shape {
        nodes: 4,
        workers: 1,
    },
];

impl Shape {
    fn label(self) -> String {
        let plural = |n: u64| if n == 1 { "" } else { "s" };
        format!(
            "{} node{} × {} worker{}",
            self.nodes,
            plural(self.nodes),
            self.workers,
            plural(self.workers)
        )
    }

    fn flags(self) -> Vec<String> {
        let mut v = Vec::new();
        if self.nodes > 1 {
            v.extend([s("--nodes"), self.nodes.to_string()]);
        }
        v.extend([s("--workers"), self.workers.to_string()]);
        v
    }
}

struct Case {
    /// The row label's workload, e.g. `kmeans I=6`; rows of one group compare with its baseline.
    group: String,
    /// The program, for `answer`/`agrees`: kmeans, primes, micro_commit.
    workload: &'static str,
    shape: Shape,
    argv: Result<Vec<String>, String>,
    /// Exactly this output (micro_commit); otherwise the group's baseline row's answer.
    expect: Option<String>,
    samples: Vec<Outcome>,
    errors: Vec<String>,
}

impl Case {
    fn ok(&self) -> Vec<&Outcome> {
        self.samples
            .iter()
            .filter(|o| o.exit == 0 && !o.timed_out)
            .collect()
    }

    fn stats(&self) -> Vec<Value> {
        self.ok()
            .iter()
            .filter_map(|o| dvm_stats(&o.stderr))
            .collect()
    }

    /// Median over the successful runs of `f(stats)`.
    fn med(&self, f: impl Fn(&Value) -> Option<f64>) -> Option<f64> {
        median(self.stats().iter().filter_map(f).collect())
    }

    fn wall(&self) -> Option<f64> {
        median(self.ok().iter().map(|o| o.wall_ms).collect())
    }

    fn cpu(&self) -> Option<f64> {
        median(self.ok().iter().filter_map(|o| o.cpu_ms).collect())
    }
}

/// The per-node rows of a `dvm_stats` object.
fn nodes(st: &Value) -> &[Value] {
    st.get("nodes")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// `key` summed over all nodes (None on one node, where `nodes` is empty).
fn sum_nodes(st: &Value, key: &str) -> Option<f64> {
    let rows = nodes(st);
    if rows.is_empty() {
        return None;
    }
    rows.iter()
        .map(|n| n.get(key).and_then(Value::as_f64))
        .sum()
}

fn node_stat(st: &Value, rank: u64, key: &str) -> Option<f64> {
    nodes(st)
        .iter()
        .find(|n| n.get("rank").and_then(Value::as_u64) == Some(rank))
        .and_then(|n| n.get(key))
        .and_then(Value::as_f64)
}

pub struct Suite {
    cases: Vec<Case>,
    throughput: Result<Vec<String>, String>,
    throughput_samples: Vec<Outcome>,
    throughput_errors: Vec<String>,
    sizes: Sizes,
    pub sizes_line: String,
}

/// Writes the inputs and lists the cluster cases.
pub fn plan(
    dvm: &Path,
    bin_dir: &Path,
    root: &Path,
    data_dir: &Path,
    sz: Sizes,
) -> Result<Suite, String> {
    let program = |name: &str| example_program(root, name);
    let params = |name: &str, values: &[u64]| params_file(data_dir, name, values);
    let argv = |prog: &Result<String, String>,
                shape: Shape,
                params: &str,
                input: Option<&str>|
     -> Result<Vec<String>, String> {
        let mut v = vec![path_str(dvm), s("run"), prog.clone()?];
        v.extend(shape.flags());
        v.extend([
            s("--stats=json"),
            s("--load"),
            format!("{params}@{PARAMS_ADDR}"),
        ]);
        if let Some(input) = input {
            v.extend([s("--load"), format!("{input}@{DATA_ADDR}")]);
        }
        Ok(v)
    };
    let mut cases = Vec::new();
    let mut push = |group: String,
                    workload: &'static str,
                    shapes: &[Shape],
                    make: &dyn Fn(Shape) -> Result<Vec<String>, String>,
                    expect: Option<String>| {
        for &shape in shapes {
            cases.push(Case {
                group: group.clone(),
                workload,
                shape,
                argv: make(shape),
                expect: expect.clone(),
                samples: Vec::new(),
                errors: Vec::new(),
            });
        }
    };

    let (n, d, k, p) = (sz.kmeans_n, sz.kmeans_d, sz.kmeans_k, sz.parts);
    if sz.kmeans_i <= sz.kmeans_i_base {
        return Err(format!(
            "cluster k-means: I ({}) must exceed I_base ({})",
            sz.kmeans_i, sz.kmeans_i_base
        ));
    }
    let primes = params("cluster_primes", &[sz.primes_m, p])?;
    let prog = program("primes");
    push(
        s("primes"),
        "primes",
        &SHAPES,
        &|sh| argv(&prog, sh, &primes, None),
        None,
    );

    let dir = data_dir.join(format!("kmeans-n{n}-d{d}-k{k}-s{}", sz.seed));
    let (points, fresh) = data::gen_points(&dir, n, d, k, sz.seed).map_err(|e| e.to_string())?;
    eprintln!(
        "dvm-bench: {} {}",
        if fresh { "generated" } else { "reusing" },
        points.display()
    );
    let points = path_str(&points);
    let prog = program("kmeans");
    for i in [sz.kmeans_i, sz.kmeans_i_base] {
        let pf = params(&format!("cluster_kmeans_i{i}"), &[n, d, k, i, p, 1])?;
        push(
            format!("kmeans I={i}"),
            "kmeans",
            &SHAPES,
            &|sh| argv(&prog, sh, &pf, Some(&points)),
            None,
        );
    }

    let r = sz.commit_r;
    let pf = params("cluster_micro_commit", &[r, 1])?;
    let prog = program("micro_commit");
    push(
        s("micro_commit"),
        "micro_commit",
        &SHAPES[..2],
        &|sh| argv(&prog, sh, &pf, None),
        Some(format!("commits {r} pages 1")),
    );

    let example = bin_dir.join("examples").join("throughput");
    let throughput = if example.exists() {
        Ok(vec![
            path_str(&example),
            s("--mib"),
            sz.throughput_mib.to_string(),
            s("--machine"),
        ])
    } else {
        Err(format!(
            "missing: {} (cargo build --release -p dvm-transport --example throughput; \
             scripts/bench does)",
            example.display()
        ))
    };
    let sizes_line = format!(
        "cluster: k-means N={n} D={d} K={k} P={p}, I={} and I={}; primes M={} C={p}; \
         micro_commit R={r} (1 page/runner); transport {} MiB per case",
        sz.kmeans_i, sz.kmeans_i_base, sz.primes_m, sz.throughput_mib
    );
    Ok(Suite {
        cases,
        throughput,
        throughput_samples: Vec::new(),
        throughput_errors: Vec::new(),
        sizes: sz,
        sizes_line,
    })
}

impl Suite {
    /// One repetition: every case once, then the throughput example.
    pub fn measure(&mut self, me: &Path, rep: usize, reps: usize, timeout: f64) {
        for c in self.cases.iter_mut() {
            let Ok(argv) = &c.argv else { continue };
            let label = format!("{} {}", c.group, c.shape.label());
            match measure_once(me, argv, timeout) {
                Ok(o) => {
                    eprintln!(
                        "[{}/{reps}] cluster {label:<40} {:>10.1} ms  exit {}{}",
                        rep + 1,
                        o.wall_ms,
                        o.exit,
                        if o.timed_out { " (timed out)" } else { "" }
                    );
                    c.samples.push(o);
                }
                Err(e) => {
                    eprintln!("[{}/{reps}] cluster {label}: {e}", rep + 1);
                    c.errors.push(e);
                }
            }
        }
        if let Ok(argv) = &self.throughput {
            match measure_once(me, argv, timeout) {
                Ok(o) => {
                    eprintln!(
                        "[{}/{reps}] cluster transport throughput {:>24.1} ms  exit {}",
                        rep + 1,
                        o.wall_ms,
                        o.exit
                    );
                    self.throughput_samples.push(o);
                }
                Err(e) => {
                    eprintln!("[{}/{reps}] cluster transport throughput: {e}", rep + 1);
                    self.throughput_errors.push(e);
                }
            }
        }
    }

    fn find(&self, group: &str, shape: Shape) -> Option<&Case> {
        self.cases
            .iter()
            .find(|c| c.group == group && c.shape == shape)
    }

    /// The markdown section, and whether any row failed or disagreed.
    pub fn render(&self) -> (String, bool) {
        let mut bad = false;
        let mut out = String::new();
        out.push_str(&self.render_walls(&mut bad));
        out.push('\n');
        out.push_str(&self.render_traffic());
        out.push('\n');
        out.push_str(&self.render_iteration());
        out.push('\n');
        out.push_str(&self.render_latency());
        out.push('\n');
        out.push_str(&self.render_throughput(&mut bad));
        (out, bad)
    }

    fn verdict(&self, c: &Case, bad: &mut bool) -> String {
        let ok = c.ok();
        if c.samples.is_empty() {
            *bad = true;
            return format!(
                "failed: {}",
                c.errors.first().cloned().unwrap_or_else(|| s("no runs"))
            );
        }
        let failures = c.samples.len() - ok.len();
        if failures > 0 {
            *bad = true;
            let why = c
                .samples
                .iter()
                .find(|o| o.exit != 0 || o.timed_out)
                .map(|o| {
                    if o.timed_out {
                        s("timed out")
                    } else {
                        let last = o.stderr.lines().rev().find(|l| !l.contains("dvm_stats"));
                        format!("exit {}: {}", o.exit, last.unwrap_or("").trim())
                    }
                })
                .unwrap_or_default();
            return format!("FAILED {failures}/{}: {why}", c.samples.len());
        }
        let baseline = self
            .find(&c.group, BASELINE)
            .and_then(|b| b.ok().first().and_then(|o| answer(b.workload, &o.stdout)));
        let want = c.expect.clone().or(baseline);
        let Some(want) = want else {
            *bad = true;
            return s("no baseline output");
        };
        let wrong = ok
            .iter()
            .map(|o| answer(c.workload, &o.stdout))
            .find(|a| a.as_deref() != Some(want.as_str()));
        match wrong {
            None if c.shape == BASELINE => format!("baseline: {}", want.replace('\n', "; ")),
            None => s("yes"),
            Some(got) => {
                *bad = true;
                format!("NO: got {:?}, want {want:?}", got.unwrap_or_default())
            }
        }
    }

    fn render_walls(&self, bad: &mut bool) -> String {
        let header = [
            "workload",
            "nodes × workers",
            "median wall (ms)",
            "vs 1 node × 2 workers",
            "median CPU (ms, all nodes)",
            "CPU vs 1 node × 2 workers",
            "output agrees",
            "runners",
            "notes",
        ];
        let mut rows = Vec::new();
        for c in &self.cases {
            let mut row = vec![c.group.clone(), c.shape.label()];
            if let Err(reason) = &c.argv {
                *bad = true;
                row.extend([
                    s("-"),
                    s("-"),
                    s("-"),
                    s("-"),
                    reason.clone(),
                    s("-"),
                    s(""),
                ]);
                rows.push(row);
                continue;
            }
            let wall = c.wall();
            let base = self.find(&c.group, BASELINE).and_then(Case::wall);
            row.push(wall.map_or(s("-"), |w| format!("{w:.1}")));
            row.push(match (wall, base) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
                _ => s("-"),
            });
            let cpu = c.cpu();
            let base_cpu = self.find(&c.group, BASELINE).and_then(Case::cpu);
            row.push(cpu.map_or(s("-"), |w| format!("{w:.0}")));
            row.push(match (cpu, base_cpu) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
                _ => s("-"),
            });
            row.push(self.verdict(c, bad));
            row.push(
                c.med(|st| st.get("runners_started").and_then(Value::as_f64))
                    .map_or(s("-"), |r| format!("{r:.0}")),
            );
            let mut notes = Vec::new();
            if c.workload == "kmeans" {
                if let Some(t) = later_iterations_ms(&c.ok()) {
                    notes.push(format!("{t:.1} ms/iteration (iterations 2..I)"));
                }
            }
            if c.workload == "micro_commit" {
                let rate = c.med(|st| {
                    let ms = st.get("wall_time_ms").and_then(Value::as_f64)?;
                    let n = st.get("runners_committed").and_then(Value::as_f64)?;
                    (ms > 0.0).then(|| n / ms * 1e3)
                });
                if let Some(rate) = rate {
                    notes.push(format!("{rate:.0} commits/s"));
                }
            }
            row.push(notes.join("; "));
            rows.push(row);
        }
        let mut out = s(
            "Wall time (process start to exit of node 0's `dvm`, which launches the others and \
             waits for them), CPU time (user + system, all nodes' processes) and output, against \
             1 node × 2 workers in the same run:\n\n",
        );
        out.push_str(&markdown_table(&header.map(s), &rows));
        let group = format!("kmeans I={}", self.sizes.kmeans_i);
        let two = Shape {
            nodes: 2,
            workers: 1,
        };
        let ratio = match (
            self.find(&group, two).and_then(Case::wall),
            self.find(&group, BASELINE).and_then(Case::wall),
        ) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        out.push('\n');
        let per_iteration = match (
            self.find(&group, two)
                .and_then(|c| later_iterations_ms(&c.ok())),
            self.find(&group, BASELINE)
                .and_then(|c| later_iterations_ms(&c.ok())),
        ) {
            (Some(a), Some(b)) if b > 0.0 => {
                format!(
                    "; per iteration (2..I, the program's own clock): {a:.1} / {b:.1} ms = {:.2}x",
                    a / b
                )
            }
            _ => String::new(),
        };
        out.push_str(&match ratio {
            Some(r) => format!(
                "k-means ({group}), 2 nodes × 1 worker vs 1 node × 2 workers: **{r:.3}x** the \
                 wall time (bar: at most 1.3x; {}){per_iteration}\n",
                if r <= 1.3 { "within it" } else { "over it" }
            ),
            None => {
                s("k-means, 2 nodes × 1 worker vs 1 node × 2 workers: no figure (a run failed)\n")
            }
        });
        out
    }

    fn render_traffic(&self) -> String {
        let header = [
            "workload",
            "nodes × workers",
            "bytes sent (all nodes)",
            "messages sent (all nodes)",
            "runners started",
            "bytes/runner",
            "messages/runner",
            "remote page reads",
            "cache hits",
        ];
        let mut rows = Vec::new();
        for c in self.cases.iter().filter(|c| c.shape.nodes > 1) {
            let per_runner = |key: &'static str| {
                c.med(move |st| {
                    let runners = sum_nodes(st, "runners_started")?;
                    (runners > 0.0).then(|| sum_nodes(st, key).map(|b| b / runners))?
                })
            };
            let total = |key: &'static str| c.med(move |st| sum_nodes(st, key));
            let fmt0 = |v: Option<f64>| v.map_or(s("-"), |v| format!("{v:.0}"));
            rows.push(vec![
                c.group.clone(),
                c.shape.label(),
                fmt0(total("bytes_sent")),
                fmt0(total("messages_sent")),
                fmt0(total("runners_started")),
                fmt0(per_runner("bytes_sent")),
                per_runner("messages_sent").map_or(s("-"), |v| format!("{v:.1}")),
                fmt0(total("remote_reads")),
                fmt0(total("cache_hits")),
            ]);
        }
        let mut out = s(
            "Traffic, summed over the nodes' rows (`bytes_sent`, `messages_sent`, `remote_reads`, \
             `cache_hits`); per runner = ÷ all runners started on all nodes; medians over \
             repetitions:\n\n",
        );
        out.push_str(&markdown_table(&header.map(s), &rows));
        out
    }

    fn render_iteration(&self) -> String {
        let sz = &self.sizes;
        let (hi, lo) = (sz.kmeans_i, sz.kmeans_i_base);
        let span = (hi - lo) as f64;
        let centroids = sz.kmeans_k * sz.kmeans_d * 8;
        let partials = sz.parts * (sz.kmeans_k * sz.kmeans_d + sz.kmeans_k) * 8;
        let header = [
            "k-means",
            "bytes/iteration",
            "messages/iteration",
            "remote page reads/iteration",
            "runners/iteration",
            "page reads × 4 KiB ÷ bytes",
            "iteration 1 + start (bytes)",
            "centroids K×D×8 (B)",
            "partial sums P×(K×D+K)×8 (B)",
            "bytes/iteration ÷ (centroids + partial sums)",
        ];
        let mut rows = Vec::new();
        for &shape in SHAPES.iter().filter(|sh| sh.nodes > 1) {
            let get = |i: u64, key: &'static str| {
                self.find(&format!("kmeans I={i}"), shape)
                    .and_then(|c| c.med(move |st| sum_nodes(st, key)))
            };
            let per = |key: &'static str| Some((get(hi, key)? - get(lo, key)?) / span);
            let bytes = per("bytes_sent");
            let first = bytes.and_then(|b| Some(get(lo, "bytes_sent")? - (lo - 1) as f64 * b));
            let fmt = |v: Option<f64>, digits: usize| v.map_or(s("-"), |v| format!("{v:.digits$}"));
            rows.push(vec![
                shape.label(),
                fmt(bytes, 0),
                fmt(per("messages_sent"), 1),
                fmt(per("remote_reads"), 1),
                fmt(per("runners_started"), 1),
                match (per("remote_reads"), bytes) {
                    (Some(r), Some(b)) if b > 0.0 => format!("{:.0}%", 100.0 * r * 4096.0 / b),
                    _ => s("-"),
                },
                fmt(first, 0),
                centroids.to_string(),
                partials.to_string(),
                bytes.map_or(s("-"), |b| {
                    format!("{:.1}x", b / (centroids + partials) as f64)
                }),
            ]);
        }
        let mut out = format!(
            "Steady-state k-means traffic per iteration = (median over repetitions at I={hi} − \
             median at I={lo}) ÷ {}, summed over all nodes:\n\n",
            hi - lo
        );
        out.push_str(&markdown_table(&header.map(s), &rows));
        out
    }

    fn render_latency(&self) -> String {
        let header = [
            "workload, 2 nodes × 1 worker",
            "node",
            "remote page reads",
            "read p50 (µs)",
            "read p99 (µs)",
            "prepares, local home",
            "p50 (µs)",
            "p99 (µs)",
            "prepares, remote home",
            "p50 (µs)",
            "p99 (µs)",
        ];
        let two = Shape {
            nodes: 2,
            workers: 1,
        };
        let groups = [
            format!("kmeans I={}", self.sizes.kmeans_i),
            s("micro_commit"),
        ];
        let mut rows = Vec::new();
        for group in &groups {
            let Some(c) = self.find(group, two) else {
                continue;
            };
            for rank in 0..two.nodes {
                let mut row = vec![c.group.clone(), rank.to_string()];
                for key in [
                    "remote_reads",
                    "remote_read_p50_us",
                    "remote_read_p99_us",
                    "prepare_local_count",
                    "prepare_local_p50_us",
                    "prepare_local_p99_us",
                    "prepare_remote_count",
                    "prepare_remote_p50_us",
                    "prepare_remote_p99_us",
                ] {
                    let v = c.med(|st| node_stat(st, rank, key));
                    row.push(v.map_or(s("-"), |v| format!("{v:.0}")));
                }
                rows.push(row);
            }
        }
        let mut out = s(
            "Latency at 2 nodes, from each node's row of `--stats=json` (node 0 applies endings \
             and places runners; node 1 is the other), medians over repetitions of each node's \
             own p50/p99:\n\n",
        );
        out.push_str(&markdown_table(&header.map(s), &rows));
        out
    }

    fn render_throughput(&self, bad: &mut bool) -> String {
        let mut out = s(
            "Transport throughput on loopback, two endpoints in one process \
                         (`transport/examples/throughput.rs --machine`), against a plain \
                         blocking TCP socket copy in the same run:\n\n",
        );
        if let Err(reason) = &self.throughput {
            *bad = true;
            out.push_str(reason);
            out.push('\n');
            return out;
        }
        // (kind, unit) -> GiB/s per sample, in first-seen order.
        let mut series: Vec<((String, u64), Vec<f64>)> = Vec::new();
        for o in self
            .throughput_samples
            .iter()
            .filter(|o| o.exit == 0 && !o.timed_out)
        {
            for line in o.stdout.lines() {
                let Some(rest) = line.strip_prefix("throughput ") else {
                    continue;
                };
                let kv = |key: &str| {
                    rest.split_whitespace()
                        .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
                };
                let (Some(kind), Some(unit), Some(bytes), Some(secs)) = (
                    kv("kind"),
                    kv("unit_bytes").and_then(|v| v.parse::<u64>().ok()),
                    kv("bytes").and_then(|v| v.parse::<f64>().ok()),
                    kv("seconds").and_then(|v| v.parse::<f64>().ok()),
                ) else {
                    continue;
                };
                if secs <= 0.0 {
                    continue;
                }
                let rate = bytes / secs / (1u64 << 30) as f64;
                let key = (kind.to_string(), unit);
                match series.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, v)) => v.push(rate),
                    None => series.push((key, vec![rate])),
                }
            }
        }
        if series.is_empty() {
            *bad = true;
            let why = self
                .throughput_samples
                .iter()
                .find(|o| o.exit != 0 || o.timed_out)
                .map(|o| format!("exit {}: {}", o.exit, o.stderr.trim()))
                .or_else(|| self.throughput_errors.first().cloned())
                .unwrap_or_else(|| s("no output"));
            out.push_str(&format!("throughput: failed ({why})\n"));
            return out;
        }
        let medians: Vec<((String, u64), f64)> = series
            .into_iter()
            .filter_map(|(k, v)| Some((k, median(v)?)))
            .collect();
        let plain = |unit: u64| {
            medians
                .iter()
                .find(|((kind, u), _)| kind == "plain_tcp" && *u == unit)
                .map(|(_, r)| *r)
        };
        let best = medians
            .iter()
            .filter(|((kind, _), _)| kind == "plain_tcp")
            .map(|(_, r)| *r)
            .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))));
        let header = [
            "case",
            "bytes per call",
            "median GiB/s",
            "% of plain TCP, same bytes per write",
            "% of best plain TCP",
        ];
        let pct = |a: f64, b: Option<f64>| {
            b.filter(|b| *b > 0.0)
                .map_or(s("-"), |b| format!("{:.0}%", 100.0 * a / b))
        };
        let rows: Vec<Vec<String>> = medians
            .iter()
            .map(|((kind, unit), rate)| {
                let name = match kind.as_str() {
                    "plain_tcp" => s("plain blocking TCP, write()"),
                    "messages" => s("transport, send() messages"),
                    "pages" => format!("transport, push_pages() of {} pages", unit / 4096),
                    other => other.to_string(),
                };
                vec![
                    name,
                    unit.to_string(),
                    format!("{rate:.2}"),
                    pct(*rate, plain(*unit)),
                    pct(*rate, best),
                ]
            })
            .collect();
        out.push_str(&markdown_table(&header.map(s), &rows));
        out
    }
}

/// Median over runs of the mean of k-means' `iteration i: T ms` lines for i >= 2.
fn later_iterations_ms(ok: &[&Outcome]) -> Option<f64> {
    median(
        ok.iter()
            .filter_map(|o| {
                let times: Vec<f64> = o
                    .stdout
                    .lines()
                    .filter_map(|l| l.strip_prefix("iteration "))
                    .filter_map(|l| l.split_once(':'))
                    .filter(|(i, _)| i.trim().parse::<u64>().is_ok_and(|i| i >= 2))
                    .filter_map(|(_, t)| t.trim().trim_end_matches("ms").trim().parse().ok())
                    .collect();
                (!times.is_empty()).then(|| times.iter().sum::<f64>() / times.len() as f64)
            })
            .collect(),
    )
}
