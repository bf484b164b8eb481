//! `dvm-bench run`: the benchmark suite. Every measurement runs as `dvm-bench measure` in a fresh
//! process (so peak RSS is that command's), systems are interleaved within each repetition (so
//! noisy neighbours hit all of them alike), and the table reports medians.

use crate::cluster;
use crate::common::{
    agrees, answer, dvm_run_argv, dvm_stats, example_program, field, markdown_table, measure_once,
    median, params_file, path_str, s, DATA_ADDR, PARAMS_ADDR,
};
use crate::data;
use crate::engine;
use crate::measure::Outcome;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

#[derive(clap::Args)]
pub struct RunArgs {
    /// Also run the Apache Spark peer (needs scripts/setup-spark).
    #[arg(long)]
    peers: bool,
    /// Repetitions; the table shows medians [default: 3, or 1 with --quick].
    #[arg(long)]
    reps: Option<usize>,
    /// Small sizes, for a smoke test of the harness.
    #[arg(long)]
    quick: bool,
    /// Only these workloads (kmeans, primes, sort, micro, engine, cluster); repeatable.
    #[arg(long)]
    only: Vec<String>,
    /// k-means points [default: 1000000, quick 20000].
    #[arg(long)]
    kmeans_n: Option<u64>,
    /// k-means iterations [default: 10, quick 3].
    #[arg(long)]
    kmeans_iters: Option<u64>,
    /// Primes below this bound [default: 2000000, quick 100000].
    #[arg(long)]
    primes_m: Option<u64>,
    /// Sort input length [default: 1000000, quick 20000].
    #[arg(long)]
    sort_n: Option<u64>,
    /// Runners per micro benchmark [default: 100000, quick 1000].
    #[arg(long)]
    micro_r: Option<u64>,
    /// Runners of micro_conflict, which all increment one counter [default: 10000, quick 200].
    #[arg(long)]
    conflict_r: Option<u64>,
    /// Cluster rows: k-means points [default: 200000, quick 20000].
    #[arg(long)]
    cluster_kmeans_n: Option<u64>,
    /// Cluster rows: k-means iterations of the timed runs [default: 6, quick 3].
    #[arg(long)]
    cluster_kmeans_iters: Option<u64>,
    /// Cluster rows: iterations of the second k-means run, whose traffic is subtracted to get
    /// one steady-state iteration's [default: 2, quick 1].
    #[arg(long)]
    cluster_kmeans_iters_base: Option<u64>,
    /// Cluster rows: primes below this bound [default: 2000000, quick 100000].
    #[arg(long)]
    cluster_primes_m: Option<u64>,
    /// Cluster rows: micro_commit runners [default: 10000, quick 1000].
    #[arg(long)]
    cluster_commit_r: Option<u64>,
    /// Cluster rows: MiB each transport throughput case moves [default: 256, quick 32].
    #[arg(long)]
    throughput_mib: Option<u64>,
    /// An earlier `dvm` binary to run side by side with this one: a "DVM before" row for every
    /// 1-worker DVM row, and a column of the engine table (`scripts/bench --baseline REV`
    /// builds one from a git revision).
    #[arg(long)]
    baseline_dvm: Option<PathBuf>,
    /// What to call the baseline in the tables [default: "before"].
    #[arg(long, default_value = "before")]
    baseline_label: String,
    /// Engine rows: runners of micro_spawn and micro_commit (minus a run of a tenth)
    /// [default: 100000, quick 5000].
    #[arg(long)]
    engine_runners: Option<u64>,
    /// Engine rows: links of micro_chain [default: 1000000, quick 10000].
    #[arg(long)]
    engine_chain_r: Option<u64>,
    /// Engine rows: batches of 1,000 aborted children of micro_abort [default: 10000, quick 100].
    #[arg(long)]
    engine_abort_batches: Option<u64>,
    /// JIT modes of the k-means, primes and sort DVM rows (auto, on, off); repeatable. Every
    /// mode gets a 1-worker row; the all-workers row uses the last one [default: off and on].
    #[arg(long, value_parser = ["auto", "on", "off"])]
    jit: Vec<String>,
    /// The P / C parameter of the DVM programs: parallel parts (runners) per phase.
    #[arg(long, default_value_t = 64)]
    parts: u64,
    /// Seed of the generated inputs.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Kill any single measured command after this many seconds.
    #[arg(long, default_value_t = 1800.0)]
    timeout: f64,
    /// Repository root (examples/, bench/, target/).
    #[arg(long, default_value = ".")]
    root: PathBuf,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Dvm,
    NativeOne,
    NativeAll,
    Spark,
}

/// What a workload's output must say.
#[derive(Clone)]
enum Expect {
    /// Agree with the workload's reference row (k-means: 1e-6 relative on the checksum).
    Reference,
    /// Exactly this text (the micro benchmarks: their output follows from the parameters).
    Text(String),
}

struct Case {
    workload: String,
    system: String,
    kind: Kind,
    /// The row every other row of the workload is compared with.
    reference: bool,
    argv: Result<Vec<String>, String>,
    expect: Expect,
    samples: Vec<Outcome>,
    errors: Vec<String>,
}

struct Sizes {
    kmeans_n: u64,
    kmeans_d: u64,
    kmeans_k: u64,
    kmeans_i: u64,
    primes_m: u64,
    sort_n: u64,
    micro_r: u64,
    conflict_r: u64,
    commit_pages: u64,
}

/// Compile `src` into `out` with gcc unless `out` is newer. Returns the command line used.
fn compile(src: &Path, out: &Path, openmp: bool) -> Result<String, String> {
    let mut argv = vec![s("gcc"), s("-O2")];
    if openmp {
        argv.push(s("-fopenmp"));
    }
    argv.extend([s("-o"), path_str(out), path_str(src)]);
    let line = argv.join(" ");
    let fresh = match (fs::metadata(src), fs::metadata(out)) {
        (Ok(a), Ok(b)) => matches!((a.modified(), b.modified()), (Ok(x), Ok(y)) if y >= x),
        (Err(e), _) => return Err(format!("{}: {e}", src.display())),
        _ => false,
    };
    if !fresh {
        if let Some(dir) = out.parent() {
            fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        let status = Command::new(&argv[0])
            .args(&argv[1..])
            .status()
            .map_err(|e| format!("gcc: {e}"))?;
        if !status.success() {
            return Err(format!("`{line}` failed"));
        }
    }
    Ok(line)
}

fn stat(stats: &serde_json::Value, key: &str) -> Option<f64> {
    stats.get(key).and_then(|v| v.as_f64())
}

/// Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        t / 3600,
        (t / 60) % 60
    )
}

fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).trim().to_string())
        .unwrap_or_else(|| s("unknown CPU"));
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!(
        "{cpus} vCPUs ({model}), {:.1} GiB memory",
        mem_kib / (1024.0 * 1024.0)
    )
}

/// The 1-minute load average (`/proc/loadavg`): how busy the machine was around the run.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| s("unknown"))
}

pub fn run(args: RunArgs) -> Result<ExitCode, String> {
    let load_before = load_average();
    let root = args.root.clone();
    let me = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let bin_dir = me.parent().map(Path::to_path_buf).unwrap_or_default();
    let dvm = bin_dir.join("dvm");
    let out_dir = root.join("target/bench");
    let data_dir = out_dir.join("data");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let reps = args.reps.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let q = args.quick;
    let sz = Sizes {
        kmeans_n: args.kmeans_n.unwrap_or(if q { 20_000 } else { 1_000_000 }),
        kmeans_d: 8,
        kmeans_k: 16,
        kmeans_i: args.kmeans_iters.unwrap_or(if q { 3 } else { 10 }),
        primes_m: args.primes_m.unwrap_or(if q { 100_000 } else { 2_000_000 }),
        sort_n: args.sort_n.unwrap_or(if q { 20_000 } else { 1_000_000 }),
        micro_r: args.micro_r.unwrap_or(if q { 1_000 } else { 100_000 }),
        conflict_r: args.conflict_r.unwrap_or(if q { 200 } else { 10_000 }),
        commit_pages: 1,
    };
    let want = |w: &str| args.only.is_empty() || args.only.iter().any(|o| o == w);
    if !dvm.exists() {
        return Err(format!(
            "{} not found: build it first (scripts/bench does)",
            dvm.display()
        ));
    }

    // Native baselines, compiled on demand.
    let native_dir = out_dir.join("native");
    let mut gcc_lines = Vec::new();
    let mut native = BTreeMap::new();
    for name in ["kmeans", "primes"] {
        if !want(name) {
            continue;
        }
        let src = root.join("bench/native").join(format!("{name}.c"));
        for (openmp, suffix) in [(false, ""), (true, "_omp")] {
            let bin = native_dir.join(format!("{name}{suffix}"));
            let built = compile(&src, &bin, openmp).map(|line| {
                gcc_lines.push(line);
                path_str(&bin)
            });
            let built = built.map_err(|e| {
                eprintln!("dvm-bench: {e}");
                format!("missing: {e}")
            });
            native.insert(format!("{name}{suffix}"), built);
        }
    }
    let spark_python = root.join("target/spark-venv/bin/python");
    let spark = if !args.peers {
        None
    } else if spark_python.exists() {
        Some(Ok(path_str(&spark_python)))
    } else {
        Some(Err(s("missing: run scripts/setup-spark")))
    };

    let program = |name: &str| example_program(&root, name);
    let params = |name: &str, values: &[u64]| params_file(&data_dir, name, values);
    let baseline = args.baseline_dvm.clone();
    if let Some(base) = &baseline {
        if !base.exists() {
            return Err(format!("--baseline-dvm {}: no such file", base.display()));
        }
    }
    let dvm_argv_of = dvm_run_argv;
    let dvm_argv =
        |prog: &Result<String, String>, workers: u64, params: &str, input: Option<&str>| {
            dvm_argv_of(&dvm, prog, workers, params, input)
        };
    let mut worker_counts = vec![1];
    if cpus > 1 {
        worker_counts.push(cpus);
    }
    let jit_modes = if args.jit.is_empty() {
        vec![s("off"), s("on")]
    } else {
        args.jit.clone()
    };
    // The DVM rows of k-means, primes and sort: every JIT mode on 1 worker (the interpreter and
    // the JIT side by side), the last mode on all workers.
    let dvm_rows = |prog: &Result<String, String>, params: &str, input: Option<&str>| {
        let mut rows = Vec::new();
        for &w in &worker_counts {
            let first = if w == 1 { 0 } else { jit_modes.len() - 1 };
            for mode in &jit_modes[first..] {
                let argv = dvm_argv(prog, w, params, input).map(|mut v| {
                    v.extend([s("--jit"), mode.clone()]);
                    v
                });
                let plural = if w == 1 { "" } else { "s" };
                rows.push((format!("DVM --jit {mode}, {w} worker{plural}"), argv));
            }
        }
        rows
    };
    let native_argv = |key: &str, rest: &[String]| -> Result<Vec<String>, String> {
        let bin = native
            .get(key)
            .cloned()
            .unwrap_or_else(|| Err(s("missing")))?;
        Ok(std::iter::once(bin).chain(rest.iter().cloned()).collect())
    };
    let case = |workload: &str, system: String, kind: Kind, argv, expect: Expect| Case {
        workload: s(workload),
        system,
        kind,
        reference: false,
        argv,
        expect,
        samples: Vec::new(),
        errors: Vec::new(),
    };

    let mut cases: Vec<Case> = Vec::new();
    let mut sizes_line = Vec::new();
    if want("kmeans") {
        let (n, d, k, i) = (sz.kmeans_n, sz.kmeans_d, sz.kmeans_k, sz.kmeans_i);
        sizes_line.push(format!("k-means N={n} D={d} K={k} I={i} P={}", args.parts));
        let dir = data_dir.join(format!("kmeans-n{n}-d{d}-k{k}-s{}", args.seed));
        let (points, fresh) =
            data::gen_points(&dir, n, d, k, args.seed).map_err(|e| e.to_string())?;
        eprintln!(
            "dvm-bench: {} {}",
            if fresh { "generated" } else { "reusing" },
            points.display()
        );
        let points = path_str(&points);
        let p = params("kmeans", &[n, d, k, i, args.parts, 1])?;
        let prog = program("kmeans");
        let nargs: Vec<String> = vec![
            points.clone(),
            n.to_string(),
            d.to_string(),
            k.to_string(),
            i.to_string(),
            s("1"),
        ];
        let mut reference = case(
            "kmeans",
            s("native C, 1 thread"),
            Kind::NativeOne,
            native_argv("kmeans", &nargs),
            Expect::Reference,
        );
        reference.reference = true;
        cases.push(reference);
        cases.push(case(
            "kmeans",
            format!("native C, OpenMP {cpus} threads"),
            Kind::NativeAll,
            native_argv("kmeans_omp", &nargs),
            Expect::Reference,
        ));
        for (system, argv) in dvm_rows(&prog, &p, Some(&points)) {
            cases.push(case("kmeans", system, Kind::Dvm, argv, Expect::Reference));
        }
        if let Some(base) = &baseline {
            cases.push(case(
                "kmeans",
                format!("DVM {}, 1 worker", args.baseline_label),
                Kind::Dvm,
                dvm_argv_of(base, &prog, 1, &p, Some(&points)),
                Expect::Reference,
            ));
        }
        if let Some(py) = &spark {
            let argv = py.clone().map(|py| {
                let script = path_str(&root.join("bench/spark/kmeans.py"));
                let mut v = vec![py, script];
                v.extend(nargs[..5].iter().cloned());
                v.push(format!("local[{cpus}]"));
                v
            });
            cases.push(case(
                "kmeans",
                format!("Spark MLlib, local[{cpus}]"),
                Kind::Spark,
                argv,
                Expect::Reference,
            ));
        }
    }
    if want("primes") {
        let m = sz.primes_m;
        sizes_line.push(format!("primes M={m} C={}", args.parts));
        let p = params("primes", &[m, args.parts])?;
        let prog = program("primes");
        let nargs = vec![m.to_string()];
        let mut reference = case(
            "primes",
            s("native C, 1 thread"),
            Kind::NativeOne,
            native_argv("primes", &nargs),
            Expect::Reference,
        );
        reference.reference = true;
        cases.push(reference);
        cases.push(case(
            "primes",
            format!("native C, OpenMP {cpus} threads"),
            Kind::NativeAll,
            native_argv("primes_omp", &nargs),
            Expect::Reference,
        ));
        for (system, argv) in dvm_rows(&prog, &p, None) {
            cases.push(case("primes", system, Kind::Dvm, argv, Expect::Reference));
        }
        if let Some(base) = &baseline {
            cases.push(case(
                "primes",
                format!("DVM {}, 1 worker", args.baseline_label),
                Kind::Dvm,
                dvm_argv_of(base, &prog, 1, &p, None),
                Expect::Reference,
            ));
        }
        if let Some(py) = &spark {
            let argv = py.clone().map(|py| {
                let script = path_str(&root.join("bench/spark/primes.py"));
                vec![py, script, m.to_string(), format!("local[{cpus}]")]
            });
            cases.push(case(
                "primes",
                format!("Spark RDD, local[{cpus}]"),
                Kind::Spark,
                argv,
                Expect::Reference,
            ));
        }
    }
    if want("sort") {
        let n = sz.sort_n;
        sizes_line.push(format!("sort N={n} C={}", args.parts));
        let dir = data_dir.join(format!("sort-n{n}-s{}", args.seed));
        let (values, _) = data::gen_u64(&dir, n, args.seed).map_err(|e| e.to_string())?;
        let values = path_str(&values);
        let p = params("sort", &[n, args.parts])?;
        let prog = program("sort");
        let mut reference = case(
            "sort",
            s("native Rust sort_unstable, 1 thread"),
            Kind::NativeOne,
            Ok(vec![path_str(&me), s("sort-ref"), values.clone()]),
            Expect::Reference,
        );
        reference.reference = true;
        cases.push(reference);
        cases.push(case(
            "sort",
            s("native Rust, sort.dasm's algorithm, 1 thread"),
            Kind::NativeOne,
            Ok(vec![path_str(&me), s("sort-same"), values.clone()]),
            Expect::Reference,
        ));
        for (system, argv) in dvm_rows(&prog, &p, Some(&values)) {
            cases.push(case("sort", system, Kind::Dvm, argv, Expect::Reference));
        }
        if let Some(base) = &baseline {
            cases.push(case(
                "sort",
                format!("DVM {}, 1 worker", args.baseline_label),
                Kind::Dvm,
                dvm_argv_of(base, &prog, 1, &p, Some(&values)),
                Expect::Reference,
            ));
        }
    }
    if want("micro") {
        let r = sz.micro_r;
        let pages = sz.commit_pages;
        sizes_line.push(format!(
            "micro R={r} (commit: {pages} page/runner; conflict: R={})",
            sz.conflict_r
        ));
        let micro: [(&str, Vec<u64>, String); 3] = [
            ("micro_spawn", vec![r], format!("runners {r}")),
            (
                "micro_commit",
                vec![r, pages],
                format!("commits {r} pages {pages}"),
            ),
            (
                "micro_conflict",
                vec![sz.conflict_r],
                format!("counter {}", sz.conflict_r),
            ),
        ];
        for (name, values, text) in micro {
            let p = params(name, &values)?;
            let prog = program(name);
            for &w in &worker_counts {
                cases.push(case(
                    name,
                    format!("DVM, {w} worker{}", if w == 1 { "" } else { "s" }),
                    Kind::Dvm,
                    dvm_argv(&prog, w, &p, None),
                    Expect::Text(text.clone()),
                ));
            }
            if let Some(base) = &baseline {
                cases.push(case(
                    name,
                    format!("DVM {}, 1 worker", args.baseline_label),
                    Kind::Dvm,
                    dvm_argv_of(base, &prog, 1, &p, None),
                    Expect::Text(text.clone()),
                ));
            }
        }
    }

    let mut engine_suite = if want("engine") {
        let sizes = engine::Sizes {
            kmeans_n: if q { 2_000 } else { 10_000 },
            primes_m: if q { 32_000 } else { 200_000 },
            runners: args
                .engine_runners
                .unwrap_or(if q { 5_000 } else { 100_000 }),
            callgrind_runners: if q { 1_000 } else { 5_000 },
            chain_r: args
                .engine_chain_r
                .unwrap_or(if q { 10_000 } else { 1_000_000 }),
            abort_batches: args
                .engine_abort_batches
                .unwrap_or(if q { 100 } else { 10_000 }),
            pinned_r: if q { 5_000 } else { 100_000 },
            pinned_spin: if q { 30_000_000 } else { 2_000_000_000 },
            parts: args.parts,
            seed: args.seed,
        };
        let mut builds = vec![engine::Build {
            label: s("this build"),
            dvm: dvm.clone(),
        }];
        if let Some(base) = &baseline {
            builds.push(engine::Build {
                label: args.baseline_label.clone(),
                dvm: base.clone(),
            });
        }
        let suite = engine::plan(builds, &root, &data_dir, &sizes)?;
        sizes_line.push(suite.sizes_line.clone());
        Some(suite)
    } else {
        None
    };
    let mut cluster = if want("cluster") {
        let sizes = cluster::Sizes {
            kmeans_n: args
                .cluster_kmeans_n
                .unwrap_or(if q { 20_000 } else { 200_000 }),
            kmeans_d: 8,
            kmeans_k: 16,
            kmeans_i: args.cluster_kmeans_iters.unwrap_or(if q { 3 } else { 6 }),
            kmeans_i_base: args
                .cluster_kmeans_iters_base
                .unwrap_or(if q { 1 } else { 2 }),
            parts: args.parts,
            primes_m: args
                .cluster_primes_m
                .unwrap_or(if q { 100_000 } else { 2_000_000 }),
            commit_r: args
                .cluster_commit_r
                .unwrap_or(if q { 1_000 } else { 10_000 }),
            throughput_mib: args.throughput_mib.unwrap_or(if q { 32 } else { 256 }),
            seed: args.seed,
        };
        let suite = cluster::plan(&dvm, &bin_dir, &root, &data_dir, sizes)?;
        sizes_line.push(suite.sizes_line.clone());
        Some(suite)
    } else {
        None
    };

    // Measure: repetitions outermost, every system once per repetition.
    for rep in 0..reps {
        for c in cases.iter_mut() {
            let Ok(argv) = &c.argv else { continue };
            match measure_once(&me, argv, args.timeout) {
                Ok(outcome) => {
                    eprintln!(
                        "[{}/{reps}] {:<15} {:<32} {:>10.1} ms  exit {}{}",
                        rep + 1,
                        c.workload,
                        c.system,
                        outcome.wall_ms,
                        outcome.exit,
                        if outcome.timed_out {
                            " (timed out)"
                        } else {
                            ""
                        }
                    );
                    c.samples.push(outcome);
                }
                Err(e) => {
                    eprintln!("[{}/{reps}] {} {}: {e}", rep + 1, c.workload, c.system);
                    c.errors.push(e);
                }
            }
        }
        if let Some(suite) = engine_suite.as_mut() {
            suite.measure(&me, rep, reps, args.timeout);
        }
        if let Some(suite) = cluster.as_mut() {
            suite.measure(&me, rep, reps, args.timeout);
        }
    }

    let (table, mut bad) = if cases.is_empty() {
        (String::new(), false)
    } else {
        render(&cases)
    };
    let mut doc = String::new();
    let _ = writeln!(doc, "## DVM benchmark, {}", now_utc());
    let _ = writeln!(doc);
    let _ = writeln!(doc, "- machine: {}", machine());
    let _ = writeln!(
        doc,
        "- sizes: {}{}",
        sizes_line.join("; "),
        if args.quick { " (--quick)" } else { "" }
    );
    let _ = writeln!(
        doc,
        "- {reps} repetition(s), median shown; systems interleaved within each repetition"
    );
    let _ = writeln!(
        doc,
        "- 1-minute load average (/proc/loadavg) before the runs {load_before}, after {}",
        load_average()
    );
    let _ = writeln!(
        doc,
        "- wall = process start to exit, including loading the input (Spark: job time, \
         JVM/context start excluded and given in the notes); peak RSS = the process's \
         getrusage maximum (Spark: Python driver + JVM, Python workers not counted)"
    );
    if !gcc_lines.is_empty() {
        let _ = writeln!(
            doc,
            "- native: `{}` (OpenMP uses all {cpus} vCPUs)",
            gcc_lines.join("`, `")
        );
    }
    let _ = writeln!(
        doc,
        "- DVM: `target/release/dvm run examples/W.dasm --workers N --stats=json --load \
         params@{PARAMS_ADDR} [--load data@{DATA_ADDR}]`; M instr/s = instructions / DVM's own \
         wall time"
    );
    if cluster.is_some() {
        let _ = writeln!(
            doc,
            "- cluster: `dvm run examples/W.dasm [--nodes N] --workers W ...` on local nodes \
             joined over loopback; every ratio is against the 1 node × 2 workers row of the \
             same workload in this run; traffic sums `bytes_sent`/`messages_sent` over the \
             `nodes` rows of node 0's `--stats=json`"
        );
    }
    let _ = writeln!(doc);
    doc.push_str(&table);
    if let Some(suite) = &engine_suite {
        if !table.is_empty() {
            let _ = writeln!(doc);
        }
        let _ = writeln!(
            doc,
            "### Engine: per instruction, per runner, per commit (1 worker)"
        );
        let _ = writeln!(doc);
        doc.push_str(&suite.render());
    }
    if let Some(suite) = &cluster {
        let (section, cluster_bad) = suite.render();
        bad |= cluster_bad;
        if !table.is_empty() {
            let _ = writeln!(doc);
        }
        let _ = writeln!(doc, "### Cluster");
        let _ = writeln!(doc);
        doc.push_str(&section);
    }
    print!("{doc}");
    let _ = fs::create_dir_all(&out_dir);
    let latest = out_dir.join("latest.md");
    fs::write(&latest, &doc).map_err(|e| format!("{}: {e}", latest.display()))?;
    eprintln!("dvm-bench: wrote {}", latest.display());
    Ok(if bad {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The table, and whether any row failed or disagreed.
fn render(cases: &[Case]) -> (String, bool) {
    let mut bad = false;
    let wall = |c: &Case| -> Option<f64> {
        let values: Vec<f64> = c
            .samples
            .iter()
            .filter(|o| o.exit == 0 && !o.timed_out)
            .filter_map(|o| {
                if c.kind == Kind::Spark {
                    field(&o.stdout, "job_ms").and_then(|v| v.parse().ok())
                } else {
                    Some(o.wall_ms)
                }
            })
            .collect();
        median(values)
    };
    let mut reference: BTreeMap<&str, (Option<f64>, Option<String>)> = BTreeMap::new();
    let mut spark_wall: BTreeMap<&str, f64> = BTreeMap::new();
    for c in cases {
        if c.reference {
            let ans = c
                .samples
                .iter()
                .find(|o| o.exit == 0)
                .and_then(|o| answer(&c.workload, &o.stdout));
            if ans.is_some() {
                reference.insert(&c.workload, (wall(c), ans));
            }
        }
        if !c.reference && !reference.contains_key(c.workload.as_str()) {
            // No reference row: the first row that ran is the one the others must match.
            if let Some(o) = c.samples.iter().find(|o| o.exit == 0 && !o.timed_out) {
                reference.insert(&c.workload, (None, answer(&c.workload, &o.stdout)));
            }
        }
        if c.kind == Kind::Spark {
            if let Some(w) = wall(c) {
                spark_wall.insert(&c.workload, w);
            }
        }
    }
    let header = [
        "workload",
        "system",
        "median wall (ms)",
        "vs native 1-thread",
        "DVM/Spark",
        "peak RSS (MiB)",
        "DVM M instr/s",
        "output agrees",
        "notes",
    ];
    let mut rows: Vec<Vec<String>> = Vec::new();
    for c in cases {
        let mut row = vec![c.workload.clone(), c.system.clone()];
        if let Err(reason) = &c.argv {
            row.extend([
                s("-"),
                s("-"),
                s("-"),
                s("-"),
                s("-"),
                reason.clone(),
                s(""),
            ]);
            rows.push(row);
            continue;
        }
        let ok: Vec<&Outcome> = c
            .samples
            .iter()
            .filter(|o| o.exit == 0 && !o.timed_out)
            .collect();
        let w = wall(c);
        let (ref_wall, ref_answer) = reference
            .get(c.workload.as_str())
            .cloned()
            .unwrap_or((None, None));
        row.push(w.map_or(s("-"), |w| format!("{w:.1}")));
        row.push(match (w, ref_wall) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => s("-"),
        });
        row.push(match (c.kind, w, spark_wall.get(c.workload.as_str())) {
            (Kind::Dvm, Some(a), Some(b)) if *b > 0.0 => format!("{:.3}", a / b),
            _ => s("-"),
        });
        // Spark: the Python driver (this measurement's child) plus the JVM's own peak, which
        // the script reports because PySpark never waits for its JVM. Python workers excluded.
        let rss = median(
            ok.iter()
                .map(|o| {
                    let jvm: f64 = field(&o.stdout, "jvm_peak_rss_kib")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0.0);
                    (o.max_rss_kib as f64 + jvm) / 1024.0
                })
                .collect(),
        );
        row.push(rss.map_or(s("-"), |r| format!("{r:.1}")));
        let stats: Vec<serde_json::Value> =
            ok.iter().filter_map(|o| dvm_stats(&o.stderr)).collect();
        let rate = median(
            stats
                .iter()
                .filter_map(|st| {
                    let ms = stat(st, "wall_time_ms")?;
                    (ms > 0.0).then(|| stat(st, "instructions").map(|i| i / ms / 1e3))?
                })
                .collect(),
        );
        row.push(if c.kind == Kind::Dvm {
            rate.map_or(s("-"), |r| format!("{r:.1}"))
        } else {
            s("")
        });

        // Agreement: every successful sample, against the reference or the expected text.
        let failures = c.samples.len() - ok.len();
        let mut verdict = if c.samples.is_empty() {
            bad = true;
            format!(
                "failed: {}",
                c.errors.first().cloned().unwrap_or_else(|| s("no runs"))
            )
        } else if failures > 0 {
            bad = true;
            let o = c
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
            format!("FAILED {failures}/{}: {o}", c.samples.len())
        } else {
            String::new()
        };
        if verdict.is_empty() {
            let want = match &c.expect {
                Expect::Text(t) => Some(t.clone()),
                Expect::Reference => ref_answer.clone(),
            };
            let answers: Vec<Option<String>> =
                ok.iter().map(|o| answer(&c.workload, &o.stdout)).collect();
            verdict = match want {
                None => s("no reference"),
                Some(want) => {
                    let wrong = answers.iter().find(|a| match a {
                        Some(a) => !agrees(&c.workload, a, &want),
                        None => true,
                    });
                    match wrong {
                        None if c.reference => format!("reference: {}", want.replace('\n', "; ")),
                        None => s("yes"),
                        Some(got) => {
                            bad = true;
                            format!(
                                "NO: got {:?}, want {:?}",
                                got.clone().unwrap_or_default(),
                                want
                            )
                        }
                    }
                }
            };
        }
        row.push(verdict);
        row.push(notes(c, &ok, &stats));
        rows.push(row);
    }
    (markdown_table(&header.map(s), &rows), bad)
}

/// What the JIT did, medians over the runs: regions compiled, compile time, native share.
fn jit_note(stats: &[serde_json::Value]) -> Option<String> {
    let field = |key: &str| -> Option<f64> {
        median(
            stats
                .iter()
                .filter_map(|st| st.get("jit")?.get(key)?.as_f64())
                .collect(),
        )
    };
    let regions = field("regions")?;
    let compile_ms = field("compile_ms")?;
    let share = field("native_share")?;
    Some(format!(
        "JIT: {regions:.0} regions compiled in {compile_ms:.1} ms, {:.1}% of instructions native",
        share * 100.0
    ))
}

/// Per-row extras: micro-benchmark rates, k-means time per iteration, Spark's JVM start.
fn notes(c: &Case, ok: &[&Outcome], stats: &[serde_json::Value]) -> String {
    let mut notes = Vec::new();
    let per_stats = |f: &dyn Fn(&serde_json::Value) -> Option<f64>| -> Option<f64> {
        median(stats.iter().filter_map(f).collect())
    };
    let seconds = |st: &serde_json::Value| stat(st, "wall_time_ms").map(|ms| ms / 1e3);
    match c.workload.as_str() {
        "micro_spawn" => {
            if let Some(rate) = per_stats(&|st| Some(stat(st, "runners_started")? / seconds(st)?)) {
                notes.push(format!("{rate:.0} runners/s, {:.2} µs/runner", 1e6 / rate));
            }
        }
        "micro_commit" => {
            if let Some(rate) = per_stats(&|st| Some(stat(st, "runners_committed")? / seconds(st)?))
            {
                notes.push(format!("{rate:.0} commits/s"));
            }
        }
        "micro_conflict" => {
            if let Some(conflicts) = per_stats(&|st| stat(st, "conflicts")) {
                let failed = per_stats(&|st| stat(st, "runners_failed")).unwrap_or(0.0);
                notes.push(format!(
                    "{conflicts:.0} conflicts, {failed:.0} failed commits (retries)"
                ));
            }
        }
        _ => {}
    }
    if c.kind == Kind::Dvm && !c.workload.starts_with("micro") {
        if let Some(r) = per_stats(&|st| stat(st, "runners_started")) {
            notes.push(format!("{r:.0} runners"));
        }
    }
    if let Some(jit) = jit_note(stats) {
        notes.push(jit);
    }
    if c.workload == "kmeans" && c.kind != Kind::Spark {
        // Median over runs of the mean `iteration i: T ms`.
        let per_iter = median(
            ok.iter()
                .filter_map(|o| {
                    let times: Vec<f64> = o
                        .stdout
                        .lines()
                        .filter(|l| l.starts_with("iteration "))
                        .filter_map(|l| l.rsplit(':').next())
                        .filter_map(|t| t.trim().trim_end_matches("ms").trim().parse().ok())
                        .collect();
                    (!times.is_empty()).then(|| times.iter().sum::<f64>() / times.len() as f64)
                })
                .collect(),
        );
        if let Some(t) = per_iter {
            notes.push(format!("{t:.1} ms/iteration"));
        }
    }
    if c.kind == Kind::Spark {
        let get = |key: &str| -> Option<f64> {
            median(
                ok.iter()
                    .filter_map(|o| field(&o.stdout, key).and_then(|v| v.parse().ok()))
                    .collect(),
            )
        };
        if let Some(t) = get("jvm_start_ms") {
            notes.push(format!("JVM+context start {t:.0} ms"));
        }
        if let Some(t) = get("load_ms") {
            notes.push(format!("data to JVM {t:.0} ms (not in job)"));
        }
        if let Some(p) = median(ok.iter().map(|o| o.wall_ms).collect()) {
            notes.push(format!("process {p:.0} ms"));
        }
        // MLlib's own log line (bench/spark/kmeans.py turns that logger up to INFO).
        let iterations: Vec<String> = ok
            .iter()
            .filter_map(|o| {
                o.stderr.lines().find_map(|l| {
                    let l = l.trim().trim_end_matches('.');
                    if let Some((_, n)) = l.split_once("reached the max number of iterations: ") {
                        Some(format!("{n} (max)"))
                    } else {
                        l.split_once("KMeans converged in ").map(|(_, rest)| {
                            format!("{} (converged)", rest.trim_end_matches(" iterations"))
                        })
                    }
                })
            })
            .collect();
        if let Some(first) = iterations.first() {
            let same = iterations.iter().all(|i| i == first);
            notes.push(format!(
                "MLlib ran {first} iterations{}",
                if same { "" } else { " (varied between runs)" }
            ));
        }
    }
    notes.join("; ")
}
