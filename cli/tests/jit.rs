//! `dvm run --jit`: every example prints the same, ends the same way and counts the same
//! instructions with `--jit on` as interpreted; `--stats` reports the JIT; compiled loops are
//! named in the perf map.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

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
    let dir = std::env::temp_dir().join(format!("dvm-jit-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    dir
}

fn words(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Pseudo-random words (xorshift), for the inputs.
fn noise(count: u64, mut seed: u64) -> impl Iterator<Item = u64> {
    (0..count).map(move |_| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    })
}

/// `--load` arguments for an example: its parameters and input data.
fn inputs(dir: &Path, example: &str) -> Vec<String> {
    let params = dir.join(format!("{example}-params.bin"));
    let load =
        |path: &Path, addr: &str| vec!["--load".to_string(), format!("{}@{addr}", path.display())];
    let mut args = Vec::new();
    let values: Vec<u64> = match example {
        "kmeans" => {
            let (n, d) = (3000u64, 4u64);
            let points: Vec<u8> = noise(n * d, 0x9e37_79b9_7f4a_7c15)
                .flat_map(|x| ((x >> 11) as f64 / (1u64 << 53) as f64 * 100.0).to_le_bytes())
                .collect();
            let data = dir.join("points.f64");
            std::fs::write(&data, points).expect("points");
            args.extend(load(&data, "0x5000000000"));
            vec![n, d, 8, 3, 2, 0]
        }
        "sort" => {
            let n = 5000u64;
            let data = dir.join("values.u64");
            std::fs::write(&data, words(&noise(n, 7).collect::<Vec<_>>())).expect("values");
            args.extend(load(&data, "0x5000000000"));
            vec![n, 4]
        }
        "primes" => vec![30_000, 4],
        "micro_commit" => vec![20, 2],
        "micro_pinned" => vec![5, 2000],
        micro if micro.starts_with("micro_") => vec![20],
        _ => return args,
    };
    std::fs::write(&params, words(&values)).expect("params");
    args.extend(load(&params, "0x4000000000"));
    args
}

/// Runs `command`; returns its output and the perf map it wrote (removed from /tmp). A map
/// not written during the run is another process's, left behind under a reused pid.
fn run_command(command: &mut Command) -> (Output, String) {
    let started = SystemTime::now() - Duration::from_secs(1);
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dvm starts");
    let map_path = format!("/tmp/perf-{}.map", child.id());
    let output = child.wait_with_output().expect("dvm runs");
    let written_now = std::fs::metadata(&map_path)
        .and_then(|meta| meta.modified())
        .is_ok_and(|modified| modified >= started);
    let map = if written_now {
        let map = std::fs::read_to_string(&map_path).unwrap_or_default();
        let _ = std::fs::remove_file(&map_path);
        map
    } else {
        String::new()
    };
    (output, map)
}

fn run(example: &str, loads: &[String], jit: &str) -> (Output, String) {
    run_command(
        dvm()
            .args(["run", "--workers", "1", "--stats=json", "--jit", jit])
            // Every loop compiled at its first entry: the comparison covers all of them.
            .args(["--jit-threshold", "1"])
            .arg(repo(&format!("examples/{example}.dasm")))
            .args(loads),
    )
}

/// The value of `"key": VALUE` in the stats line.
fn stat<'a>(stderr: &'a str, key: &str) -> &'a str {
    let pattern = format!("\"{key}\": ");
    let at = stderr
        .find(&pattern)
        .unwrap_or_else(|| panic!("no {key} in {stderr}"))
        + pattern.len();
    let rest = &stderr[at..];
    &rest[..rest.find([',', '}']).unwrap_or(rest.len())]
}

#[test]
fn every_example_runs_the_same_with_the_jit() {
    let dir = scratch("examples");
    let mut examples: Vec<String> = std::fs::read_dir(repo("examples"))
        .expect("examples/")
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".dasm").map(str::to_string)
        })
        .collect();
    examples.sort();
    assert!(examples.len() >= 10, "examples found: {examples:?}");
    let mut native_total = 0u64;
    for example in &examples {
        let loads = inputs(&dir, example);
        let (off, off_map) = run(example, &loads, "off");
        let (on, _) = run(example, &loads, "on");
        assert_eq!(off_map, "", "{example}: --jit off writes no perf map");
        let (off_err, on_err) = (text(&off.stderr), text(&on.stderr));
        assert!(off.status.success(), "{example}: {off_err}");
        assert_eq!(off.status.code(), on.status.code(), "{example}: {on_err}");
        assert_eq!(text(&off.stdout), text(&on.stdout), "{example}: stdout");
        for key in [
            "instructions",
            "runners_committed",
            "runners_aborted",
            "runners_faulted",
        ] {
            assert_eq!(
                stat(&off_err, key),
                stat(&on_err, key),
                "{example}: {key}\n{on_err}"
            );
        }
        assert!(
            !off_err.contains("\"jit\""),
            "{example}: --jit off reports no JIT"
        );
        native_total += stat(&on_err, "native_instructions")
            .parse::<u64>()
            .expect("a count");
    }
    assert!(
        native_total > 100_000,
        "the examples' loops ran natively: {native_total}"
    );
}

#[test]
fn compiled_loops_are_named_in_the_perf_map() {
    let dir = scratch("perfmap");
    let loads = inputs(&dir, "primes");
    let (output, map) = run("primes", &loads, "on");
    assert!(output.status.success(), "{}", text(&output.stderr));
    // `<start> <size> <name>` per compiled region, named by the DISA function and loop label.
    let trial = map
        .lines()
        .find(|line| line.ends_with(" dvm:chunk/.Lnext_n"))
        .unwrap_or_else(|| panic!("the chunk's loop is named:\n{map}"));
    let fields: Vec<&str> = trial.split(' ').collect();
    assert_eq!(fields.len(), 3, "{trial}");
    let start = u64::from_str_radix(fields[0], 16).expect("hex start");
    let size = u64::from_str_radix(fields[1], 16).expect("hex size");
    assert!(start > 0 && size > 0, "{trial}");
}

#[test]
fn under_perf_every_map_entry_has_the_disa_name() {
    // `perf record` sets PERF_BUILDID_DIR in the child, and then Cranelift writes perf map
    // entries of its own for each function it defines, ahead of DVM's: their names must be the
    // DISA names too, or `perf script` shows those instead.
    let dir = scratch("perfenv");
    let loads = inputs(&dir, "primes");
    let (output, map) = run_command(
        dvm()
            .args([
                "run",
                "--workers",
                "1",
                "--jit",
                "on",
                "--jit-threshold",
                "1",
            ])
            .arg(repo("examples/primes.dasm"))
            .args(&loads)
            .env("PERF_BUILDID_DIR", &dir),
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(map.lines().count() > 1, "{map}");
    for line in map.lines() {
        assert!(
            line.contains(" dvm:"),
            "an entry without a DISA name: {line}\n{map}"
        );
    }
}

#[test]
fn stats_table_reports_the_jit() {
    // `sum` (100 iterations) reaches the threshold; `scale` and `digits` (4 entries each) do
    // not.
    // (`on` compiles where the threshold is reached; `auto` would compile on its thread, and
    // this short run could end first.)
    let (output, _) = run_command(
        dvm()
            .args(["run", "--workers", "1", "--stats", "--jit", "on"])
            .args(["--jit-threshold", "5"])
            .arg(repo("examples/loop.dasm")),
    );
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("jit regions compiled    1 ("), "{stderr}");
    assert!(stderr.contains("% of all)"), "{stderr}");
}
