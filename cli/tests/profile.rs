//! `dvm run --profile` and `dvm profile`: samples named by the program's own functions and
//! loops, call stacks, DVM's phases, one file for a multi-node run, errors before any work,
//! and `--stats` with each worker's time split.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dvm"))
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dvm-profile-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    dir
}

fn words(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A k-means input big enough for a debug build to run ~a second: N points of dimension D.
fn kmeans_input(dir: &Path, n: u64, d: u64, k: u64, iterations: u64, parts: u64) -> Vec<String> {
    let params = dir.join("params.bin");
    std::fs::write(&params, words(&[n, d, k, iterations, parts, 0])).expect("params");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let points: Vec<u8> = (0..n * d)
        .flat_map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            ((seed >> 11) as f64 / (1u64 << 53) as f64 * 100.0).to_le_bytes()
        })
        .collect();
    let data = dir.join("points.f64");
    std::fs::write(&data, points).expect("points");
    vec![
        "--load".into(),
        format!("{}@0x4000000000", params.display()),
        "--load".into(),
        format!("{}@0x5000000000", data.display()),
    ]
}

fn run_ok(command: &mut Command) -> Output {
    let output = command.output().expect("dvm runs");
    assert!(
        output.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr)
    );
    output
}

/// `(stack, count)` of folded lines.
fn folded(profile: &Path) -> Vec<(String, u64)> {
    let output = run_ok(dvm().arg("profile").arg(profile).args(["--folded", "-"]));
    text(&output.stdout)
        .lines()
        .filter_map(|line| {
            let (stack, count) = line.rsplit_once(' ')?;
            Some((stack.to_string(), count.parse().ok()?))
        })
        .collect()
}

#[test]
fn kmeans_profile_names_the_partition_loop_and_renders() {
    let dir = scratch("kmeans");
    let loads = kmeans_input(&dir, 20_000, 4, 8, 3, 2);
    let profile = dir.join("k.perf");
    let svg = dir.join("k.svg");
    let output = run_ok(
        dvm()
            .args(["run", "--workers", "2", "--profile-hz", "5000", "--profile"])
            .arg(&profile)
            .arg("--profile-svg")
            .arg(&svg)
            .arg(repo("examples/kmeans.dasm"))
            .args(&loads),
    );
    assert!(text(&output.stdout).starts_with("checksum "));
    assert!(
        text(&output.stderr).contains("widest DISA frame partition"),
        "{}",
        text(&output.stderr)
    );
    let perf_script = std::fs::read_to_string(&profile).expect("the profile");
    assert!(
        perf_script.contains(" cpu-clock:\n"),
        "perf script event lines"
    );
    assert!(
        perf_script.contains(" (kmeans.dasm)\n"),
        "frames name the program"
    );

    // Most of the program's samples are in partition, and its distance loop is the widest
    // frame inside it.
    let stacks = folded(&profile);
    let program: u64 = stacks
        .iter()
        .filter(|(stack, _)| !stack.contains(";["))
        .map(|(_, count)| count)
        .sum();
    let partition: u64 = stacks
        .iter()
        .filter(|(stack, _)| stack.starts_with("dvm;partition"))
        .map(|(_, count)| count)
        .sum();
    assert!(program > 0, "{stacks:?}");
    assert!(
        partition * 10 >= program * 8,
        "{partition} of {program}: {stacks:?}"
    );
    let widest_loop = stacks
        .iter()
        .filter(|(stack, _)| stack.starts_with("dvm;partition;partition/"))
        .max_by_key(|(_, count)| *count)
        .map(|(stack, _)| stack.as_str());
    assert_eq!(widest_loop, Some("dvm;partition;partition/.Lcoord"));

    let svg = std::fs::read_to_string(&svg).expect("the flame graph");
    assert!(svg.starts_with("<?xml") && svg.contains("partition/.Lcoord"));
    let again = dir.join("again.svg");
    let summary = run_ok(dvm().arg("profile").arg(&profile).arg("--svg").arg(&again));
    assert!(text(&summary.stdout).contains("partition/.Lcoord"));
    assert!(std::fs::read_to_string(&again)
        .expect("the second flame graph")
        .contains("<svg"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// DISA's calling convention: store the return address, jump to the function; return through
/// the stored address.
const CALLS: &str = "
.equ RET, 0x200000010
.equ N, 0x200000018
main:
    mov $.Lback:ue, RET:ue
    br:j,a $work
.Lback:
    mov $.Lagain:ue, RET:ue
    br:j,a $work
.Lagain:
    exit:c
work:
    mov $400000:ue, N:ue
.Lspin:
    sub:ue N, $1, N
    br:nz,ue,a N, $.Lspin
    br:ji RET
";

#[test]
fn calls_and_returns_make_call_stacks() {
    let dir = scratch("calls");
    let program = dir.join("calls.dasm");
    std::fs::write(&program, CALLS).expect("the program");
    let profile = dir.join("calls.perf");
    run_ok(
        dvm()
            .args([
                "run",
                "--workers",
                "1",
                "--profile-hz",
                "10000",
                "--profile",
            ])
            .arg(&profile)
            .arg(&program),
    );
    let stacks = folded(&profile);
    let in_work: u64 = stacks
        .iter()
        .filter(|(stack, _)| stack == "dvm;main;work;work/.Lspin")
        .map(|(_, count)| count)
        .sum();
    assert!(in_work > 0, "{stacks:?}");
    // After each return, main is not left inside work: no stack nests work twice.
    assert!(
        stacks
            .iter()
            .all(|(stack, _)| !stack.contains("work;work;")),
        "{stacks:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn aborted_work_is_a_frame_of_its_own() {
    let dir = scratch("abort");
    let program = dir.join("abort.dasm");
    let source = ".equ N, 0x200000018\nmain:\n    mov $400000:ue, N:ue\n.Lspin:\n    sub:ue N, $1, N\n    br:nz,ue,a N, $.Lspin\n    exit:a\n";
    std::fs::write(&program, source).expect("the program");
    let profile = dir.join("abort.perf");
    run_ok(
        dvm()
            .args([
                "run",
                "--workers",
                "1",
                "--profile-hz",
                "10000",
                "--profile",
            ])
            .arg(&profile)
            .arg(&program),
    );
    let stacks = folded(&profile);
    assert!(
        stacks
            .iter()
            .any(|(stack, count)| stack == "dvm;[aborted attempt];main;main/.Lspin" && *count > 0),
        "{stacks:?}"
    );
    assert!(
        stacks
            .iter()
            .all(|(stack, _)| !stack.starts_with("dvm;main")),
        "work of an aborted runner is never shown as committed work: {stacks:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unwritable_profile_fails_before_the_program_runs() {
    let output = dvm()
        .args([
            "run",
            "--profile",
            "/nonexistent-dir/for/a.perf",
            repo("examples/hello.dasm").to_str().expect("utf-8 path"),
        ])
        .output()
        .expect("dvm runs");
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty(), "{}", text(&output.stdout));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("--profile") && stderr.contains("/nonexistent-dir/for/a.perf"),
        "{stderr}"
    );
}

#[test]
fn profile_reader_rejects_what_is_not_perf_script() {
    let dir = scratch("garbage");
    let file = dir.join("not.perf");
    std::fs::write(&file, "this is not perf script output\n").expect("a file");
    let output = dvm().arg("profile").arg(&file).output().expect("dvm runs");
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("no samples"),
        "{}",
        text(&output.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_nodes_write_one_profile_tagged_by_node() {
    let dir = scratch("nodes");
    let loads = kmeans_input(&dir, 8_000, 4, 8, 2, 4);
    let profile = dir.join("n.perf");
    let output = run_ok(
        dvm()
            .args([
                "run",
                "--nodes",
                "2",
                "--workers",
                "1",
                "--profile-hz",
                "5000",
                "--profile",
            ])
            .arg(&profile)
            .arg(repo("examples/kmeans.dasm"))
            .args(&loads),
    );
    assert!(text(&output.stdout).starts_with("checksum "));
    let perf_script = std::fs::read_to_string(&profile).expect("the profile");
    let events: Vec<&str> = perf_script
        .lines()
        .filter(|line| line.starts_with("dvm "))
        .collect();
    for node in ["dvm 0/", "dvm 1/"] {
        assert!(
            events.iter().any(|line| line.starts_with(node)),
            "no sample from {node}"
        );
    }
    assert!(perf_script.starts_with("# DVM guest profile of kmeans.dasm (2 nodes)"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stats_json_has_each_workers_time_split() {
    let output = run_ok(
        dvm()
            .args(["run", "--workers", "2", "--stats=json"])
            .arg(repo("examples/hello.dasm")),
    );
    let stderr = text(&output.stderr);
    let line = stderr
        .lines()
        .find(|line| line.starts_with("{\"dvm_stats\""))
        .expect("the JSON line");
    assert_eq!(
        line.matches("\"time_ms\": {\"idle\": ").count(),
        2,
        "{line}"
    );
    assert!(line.contains("\"interpreting\": "), "{line}");
    // These VMs have no hardware counters: unavailable is null, never 0.
    assert!(line.contains("\"cycles\": "), "{line}");
    assert!(!line.contains("\"cycles\": 0,"), "{line}");
}

/// The host's view (`perf record` + `perf script`, as scripts/profile runs them) names DVM's
/// own work by ordinary symbols: the interpreter and the worker loop.
#[test]
fn host_perf_names_dvm_phases() {
    let dir = scratch("host");
    let loads = kmeans_input(&dir, 20_000, 4, 8, 3, 2);
    let data = dir.join("perf.data");
    let record = Command::new("perf")
        .args([
            "record",
            "-q",
            "-F",
            "499",
            "-e",
            "cpu-clock",
            "-g",
            "--call-graph",
            "dwarf,8192",
            "-o",
        ])
        .arg(&data)
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_dvm"))
        .args(["run", "--workers", "1"])
        .arg(repo("examples/kmeans.dasm"))
        .args(&loads)
        .output()
        .expect("perf runs (scripts/install-deps installs linux-perf)");
    assert!(
        record.status.success(),
        "perf record failed: {}",
        text(&record.stderr)
    );
    assert!(text(&record.stdout).starts_with("checksum "));
    let script = Command::new("perf")
        .args(["script", "-i"])
        .arg(&data)
        .output()
        .expect("perf script runs");
    assert!(script.status.success(), "{}", text(&script.stderr));
    let perf_script = text(&script.stdout);
    for symbol in ["dvm_engine::interp::Exec::run", "dvm_engine::sched::work"] {
        assert!(
            perf_script.contains(symbol),
            "perf script does not name {symbol}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stats_json_has_each_nodes_time_split() {
    let output = run_ok(
        dvm()
            .args(["run", "--nodes", "2", "--workers", "1", "--stats=json"])
            .arg(repo("examples/hello.dasm")),
    );
    let stderr = text(&output.stderr);
    let line = stderr
        .lines()
        .find(|line| line.starts_with("{\"dvm_stats\""))
        .expect("the JSON line");
    // One split per node row (node 1's travelled in its report), one per node 0 worker.
    assert_eq!(
        line.matches("\"time_ms\": {\"idle\": ").count(),
        3,
        "{line}"
    );
    assert!(line.contains("\"waiting_for_pages\": "), "{line}");
}
