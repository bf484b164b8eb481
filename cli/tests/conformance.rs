//! The conformance suite: every program in `tests/conformance` runs under `dvm run`, once with one
//! worker and once with every available core, and must produce exactly the expected stdout, exit
//! status, stderr fragments and statistics.
//!
//! A program is `NAME.dasm` (assembled by `dvm run` on the fly) or a hand-made binary
//! `NAME.disa`. Its expectations are comment directives in its first 30 lines (for a `.disa`, in
//! the sidecar `NAME.disa.meta`), and its exact stdout is `NAME.out` (absent: stdout is empty):
//!
//! ```text
//! # expect-exit: N              exit status (default 0)
//! # expect-stderr: TEXT         TEXT must appear in stderr (repeatable)
//! # args: ARGS                  extra `dvm run` arguments, whitespace-separated;
//!                               `$CONFORMANCE_DIR` in them names the suite directory
//! # expect-stat: KEY=VALUE      a value of the `--stats=json` line (repeatable; adds --stats=json)
//! # workers: 1                  run with one worker only (scheduling-order properties)
//! ```
//!
//! Every failure of every run is collected and reported together, so one `cargo test` shows the
//! whole picture. `DVM_CONFORMANCE_FILTER=substring` runs only the matching programs.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Directives are read from this many first lines of a program (or of its `.meta` file).
const HEADER_LINES: usize = 30;
/// A run taking longer than this is killed and reported (a hang must not stall CI). The
/// heaviest program (sum_10000) takes about 12 s in a debug build on 2 cores; CI may be loaded.
const TIMEOUT: Duration = Duration::from_secs(120);
/// The suite is not trivially satisfied by an empty or half-copied directory.
const MIN_PROGRAMS: usize = 25;
/// How much of stdout / stderr a failure report shows.
const EXCERPT_CHARS: usize = 1500;

fn suite_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/conformance")
}

/// What a program promises, from its directives and its `.out` file.
#[derive(Debug, Default)]
struct Expectations {
    exit: i32,
    stderr: Vec<String>,
    args: Vec<String>,
    stats: Vec<(String, i64)>,
    one_worker_only: bool,
    stdout: String,
}

struct Program {
    name: String,
    path: PathBuf,
    expect: Expectations,
}

fn parse_directives(text: &str) -> Result<Expectations, String> {
    let mut expect = Expectations::default();
    for (index, line) in text.lines().take(HEADER_LINES).enumerate() {
        let Some(comment) = line.trim_start().strip_prefix('#') else {
            continue;
        };
        let comment = comment.trim();
        let Some((key, value)) = comment.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let at = |message: String| format!("line {}: {message}", index + 1);
        match key.trim() {
            "expect-exit" => {
                expect.exit = value
                    .parse()
                    .map_err(|_| at(format!("expect-exit: `{value}` is not an integer")))?;
            }
            "expect-stderr" => {
                if value.is_empty() {
                    return Err(at("expect-stderr needs a text".into()));
                }
                expect.stderr.push(value.to_string());
            }
            "args" => expect
                .args
                .extend(value.split_whitespace().map(str::to_string)),
            "expect-stat" => {
                let (stat, number) = value
                    .split_once('=')
                    .ok_or_else(|| at(format!("expect-stat: `{value}` is not KEY=VALUE")))?;
                let number = number
                    .trim()
                    .parse()
                    .map_err(|_| at(format!("expect-stat: `{number}` is not an integer")))?;
                expect.stats.push((stat.trim().to_string(), number));
            }
            "workers" => {
                if value != "1" {
                    return Err(at(format!(
                        "workers: only `1` is meaningful, found `{value}`"
                    )));
                }
                expect.one_worker_only = true;
            }
            other if other.starts_with("expect") => {
                return Err(at(format!("unknown directive `{other}`")));
            }
            _ => {}
        }
    }
    Ok(expect)
}

/// Finds the programs and their expectations; problems with the suite itself are errors.
fn discover(filter: Option<&str>) -> (Vec<Program>, Vec<String>) {
    let dir = suite_dir();
    let mut errors = Vec::new();
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("cannot read the suite directory {}: {err}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|entry| {
            entry
                .unwrap_or_else(|err| panic!("cannot list {}: {err}", dir.display()))
                .path()
        })
        .collect();
    files.sort();
    let file_name = |path: &Path| {
        path.file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let names: BTreeSet<String> = files.iter().map(|path| file_name(path)).collect();
    let mut programs = Vec::new();
    let mut stems = BTreeSet::new();
    for path in &files {
        let name = file_name(path);
        let (stem, header_file) = if let Some(stem) = name.strip_suffix(".dasm") {
            (stem.to_string(), path.clone())
        } else if let Some(stem) = name.strip_suffix(".disa") {
            (stem.to_string(), dir.join(format!("{name}.meta")))
        } else {
            if let Some(stem) = name.strip_suffix(".out") {
                if !names.contains(&format!("{stem}.dasm"))
                    && !names.contains(&format!("{stem}.disa"))
                {
                    errors.push(format!("{name}: expected output without a program"));
                }
            } else if let Some(image) = name.strip_suffix(".meta") {
                if !names.contains(image) {
                    errors.push(format!("{name}: directives without the image `{image}`"));
                }
            }
            continue;
        };
        if !stems.insert(stem.clone()) {
            errors.push(format!("{stem}: both a .dasm and a .disa program"));
            continue;
        }
        if filter.is_some_and(|filter| !name.contains(filter)) {
            continue;
        }
        let header = match std::fs::read_to_string(&header_file) {
            Ok(text) => text,
            Err(err) => {
                errors.push(format!(
                    "{name}: cannot read {}: {err}",
                    header_file.display()
                ));
                continue;
            }
        };
        let mut expect = match parse_directives(&header) {
            Ok(expect) => expect,
            Err(err) => {
                errors.push(format!("{}: {err}", file_name(&header_file)));
                continue;
            }
        };
        let out_path = dir.join(format!("{stem}.out"));
        expect.stdout = if out_path.exists() {
            match std::fs::read_to_string(&out_path) {
                Ok(text) => text,
                Err(err) => {
                    errors.push(format!("{stem}.out: cannot read: {err}"));
                    continue;
                }
            }
        } else {
            String::new()
        };
        programs.push(Program {
            name,
            path: path.clone(),
            expect,
        });
    }
    (programs, errors)
}

/// What one `dvm run` did.
struct Outcome {
    status: Option<ExitStatus>,
    timed_out: bool,
    elapsed: Duration,
    stdout: String,
    stderr: String,
}

fn reader<R: Read + Send + 'static>(mut pipe: R) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        // A read error ends the capture; what was read so far is still reported.
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

fn wait_with_timeout(child: &mut Child) -> Result<(Option<ExitStatus>, bool), String> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok((Some(status), false)),
            Ok(None) if Instant::now() >= deadline => {
                // The child may have exited just now; either way it is reaped below.
                let _ = child.kill();
                let status = child
                    .wait()
                    .map_err(|err| format!("cannot reap the killed dvm: {err}"))?;
                return Ok((Some(status), true));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(err) => return Err(format!("cannot wait for dvm: {err}")),
        }
    }
}

/// How a program is run: workers per node, and nodes (local processes, `--nodes`).
#[derive(Clone, Copy, Debug)]
struct Shape {
    workers: usize,
    nodes: u32,
    /// `--jit on`: every loop compiled at its first entry.
    jit: bool,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.nodes > 1 {
            write!(f, "{} nodes x {} worker", self.nodes, self.workers)?;
        } else {
            write!(f, "{} worker(s)", self.workers)?;
        }
        if self.jit {
            write!(f, ", --jit on")?;
        }
        Ok(())
    }
}

fn run(program: &Program, shape: Shape) -> Result<Outcome, String> {
    let dir = suite_dir().to_string_lossy().into_owned();
    let mut command = Command::new(env!("CARGO_BIN_EXE_dvm"));
    command
        .arg("run")
        .arg(&program.path)
        .arg("--workers")
        .arg(shape.workers.to_string());
    if shape.nodes > 1 {
        command.arg("--nodes").arg(shape.nodes.to_string());
    }
    if shape.jit {
        // Every loop compiled at its first entry, so short programs run natively too.
        command.args(["--jit", "on", "--jit-threshold", "1"]);
    }
    command.args(
        program
            .expect
            .args
            .iter()
            .map(|arg| arg.replace("$CONFORMANCE_DIR", &dir)),
    );
    if !program.expect.stats.is_empty() {
        command.arg("--stats=json");
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = command
        .spawn()
        .map_err(|err| format!("cannot start {}: {err}", env!("CARGO_BIN_EXE_dvm")))?;
    let stdout = reader(child.stdout.take().ok_or("no stdout pipe")?);
    let stderr = reader(child.stderr.take().ok_or("no stderr pipe")?);
    let (status, timed_out) = wait_with_timeout(&mut child)?;
    let elapsed = started.elapsed();
    let stdout = stdout.join().map_err(|_| "the stdout reader panicked")?;
    let stderr = stderr.join().map_err(|_| "the stderr reader panicked")?;
    Ok(Outcome {
        status,
        timed_out,
        elapsed,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

/// The `{"dvm_stats": {...}}` line's value for `key`, as written (number text).
fn stat_value<'a>(stats_line: &'a str, key: &str) -> Option<&'a str> {
    let quoted = format!("\"{key}\"");
    let after_key = &stats_line[stats_line.find(&quoted)? + quoted.len()..];
    let after_colon = after_key.trim_start().strip_prefix(':')?.trim_start();
    let end = after_colon
        .find(|c: char| c == ',' || c == '}' || c.is_whitespace())
        .unwrap_or(after_colon.len());
    Some(&after_colon[..end])
}

fn excerpt(text: &str) -> String {
    if text.is_empty() {
        return "    (empty)\n".into();
    }
    let chars: Vec<char> = text.chars().collect();
    let shown: String = if chars.len() <= EXCERPT_CHARS {
        text.to_string()
    } else {
        // The head and the tail: where a run starts going wrong, and how it ended.
        let head: String = chars[..EXCERPT_CHARS * 2 / 3].iter().collect();
        let tail: String = chars[chars.len() - EXCERPT_CHARS / 3..].iter().collect();
        format!("{head}\n[... {} bytes in all ...]\n{tail}", text.len())
    };
    shown
        .lines()
        .map(|line| format!("    | {line}\n"))
        .collect()
}

/// The first line where stdout differs, with its neighbours.
fn stdout_difference(expected: &str, actual: &str) -> String {
    let expected_lines: Vec<&str> = expected.split_inclusive('\n').collect();
    let actual_lines: Vec<&str> = actual.split_inclusive('\n').collect();
    let first = expected_lines
        .iter()
        .zip(&actual_lines)
        .position(|(e, a)| e != a)
        .unwrap_or_else(|| expected_lines.len().min(actual_lines.len()));
    let mut out = format!(
        "stdout differs from line {} on ({} lines expected, {} found):\n",
        first + 1,
        expected_lines.len(),
        actual_lines.len()
    );
    for index in first..(first + 4) {
        let (e, a) = (expected_lines.get(index), actual_lines.get(index));
        if e.is_none() && a.is_none() {
            break;
        }
        let show = |line: Option<&&str>| line.map_or("(none)".to_string(), |l| format!("{l:?}"));
        let _ = writeln!(out, "    line {}: expected {}", index + 1, show(e));
        let _ = writeln!(out, "    line {}: found    {}", index + 1, show(a));
    }
    out
}

/// Every way the outcome differs from the expectations (empty: the run passed).
fn check(program: &Program, outcome: &Outcome) -> Vec<String> {
    let expect = &program.expect;
    let mut problems = Vec::new();
    if outcome.timed_out {
        problems.push(format!(
            "timed out after {} s and was killed",
            TIMEOUT.as_secs()
        ));
    }
    match outcome.status.and_then(|status| status.code()) {
        Some(code) if code == expect.exit => {}
        Some(code) => problems.push(format!("exit status {code}, expected {}", expect.exit)),
        None => problems.push(format!(
            "no exit status (killed by a signal: {:?}), expected {}",
            outcome.status, expect.exit
        )),
    }
    if outcome.stdout != expect.stdout {
        problems.push(stdout_difference(&expect.stdout, &outcome.stdout));
    }
    for text in &expect.stderr {
        if !outcome.stderr.contains(text.as_str()) {
            problems.push(format!("stderr does not contain {text:?}"));
        }
    }
    if !expect.stats.is_empty() {
        let stats_lines: Vec<&str> = outcome
            .stderr
            .lines()
            .filter(|line| line.contains("\"dvm_stats\""))
            .collect();
        match stats_lines.as_slice() {
            [line] => {
                for (key, want) in &expect.stats {
                    match stat_value(line, key) {
                        Some(found) if found.parse::<i64>() == Ok(*want) => {}
                        Some(found) => {
                            problems.push(format!("stat {key} = {found}, expected {want}"))
                        }
                        None => problems.push(format!("stat {key} missing from {line}")),
                    }
                }
            }
            lines => problems.push(format!(
                "expected exactly one {{\"dvm_stats\": ...}} line on stderr, found {}",
                lines.len()
            )),
        }
    }
    problems
}

/// Runs every program in every shape; panics with every failure.
fn run_suite(shapes_of: impl Fn(&Program) -> Vec<Shape>) {
    let filter = std::env::var("DVM_CONFORMANCE_FILTER").ok();
    let (programs, mut failures) = discover(filter.as_deref());
    if filter.is_none() {
        assert!(
            programs.len() >= MIN_PROGRAMS,
            "only {} programs found in {}: the suite is incomplete",
            programs.len(),
            suite_dir().display()
        );
    }
    assert!(
        !programs.is_empty(),
        "no program matches the filter {filter:?}"
    );
    let mut runs = 0;
    let mut failed_runs = 0;
    for program in &programs {
        for shape in shapes_of(program) {
            runs += 1;
            let report = match run(program, shape) {
                Ok(outcome) => {
                    let problems = check(program, &outcome);
                    if problems.is_empty() {
                        eprintln!(
                            "ok   {} ({shape}, {:.1} s)",
                            program.name,
                            outcome.elapsed.as_secs_f64()
                        );
                        continue;
                    }
                    let mut report = String::new();
                    for problem in problems {
                        let _ = writeln!(report, "  - {}", problem.trim_end());
                    }
                    let _ = write!(
                        report,
                        "  stdout:\n{}  stderr:\n{}",
                        excerpt(&outcome.stdout),
                        excerpt(&outcome.stderr)
                    );
                    report
                }
                Err(err) => format!("  - {err}\n"),
            };
            failed_runs += 1;
            eprintln!("FAIL {} ({shape})", program.name);
            failures.push(format!(
                "{} with {shape} ({}):\n{report}",
                program.name,
                program.path.display()
            ));
        }
    }
    if !failures.is_empty() {
        panic!(
            "conformance: {failed_runs} of {runs} runs failed ({} programs){}\n\n{}",
            programs.len(),
            if failures.len() > failed_runs {
                format!(
                    ", and the suite has {} problems",
                    failures.len() - failed_runs
                )
            } else {
                String::new()
            },
            failures.join("\n")
        );
    }
}

#[test]
fn conformance_suite() {
    let all_workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2);
    run_suite(|program| {
        let mut shapes = vec![Shape {
            workers: 1,
            nodes: 1,
            jit: false,
        }];
        if !program.expect.one_worker_only {
            shapes.push(Shape {
                workers: all_workers,
                nodes: 1,
                jit: false,
            });
        }
        shapes
    });
}

/// The same programs on 2 and 4 nodes (local processes joined over loopback): identical
/// stdout, exit status, stderr fragments and outcome counters. Programs that state a property
/// of one worker's scheduling order (`# workers: 1`) run on one node only.
#[test]
fn conformance_suite_on_nodes() {
    run_suite(|program| {
        if program.expect.one_worker_only {
            return Vec::new();
        }
        [2, 4]
            .into_iter()
            .map(|nodes| Shape {
                workers: 1,
                nodes,
                jit: false,
            })
            .collect()
    });
}

/// The same programs with `--jit on` (every loop compiled at its first entry), one worker and
/// every core: the same stdout, exit status, stderr fragments and statistics as interpreted.
#[test]
fn conformance_suite_with_jit() {
    let all_workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2);
    run_suite(|program| {
        let mut shapes = vec![Shape {
            workers: 1,
            nodes: 1,
            jit: true,
        }];
        if !program.expect.one_worker_only {
            shapes.push(Shape {
                workers: all_workers,
                nodes: 1,
                jit: true,
            });
        }
        shapes
    });
}

#[test]
fn directives_are_parsed() {
    let expect = parse_directives(
        "# title\n# expect-exit: 1\n# expect-stderr: division by zero\n\
         # args: --max-instructions 100  --max-runners 5\n# expect-stat: conflicts=1\n\
         # workers: 1\n.equ X, 1\n",
    )
    .expect("valid directives");
    assert_eq!(expect.exit, 1);
    assert_eq!(expect.stderr, ["division by zero"]);
    assert_eq!(
        expect.args,
        ["--max-instructions", "100", "--max-runners", "5"]
    );
    assert_eq!(expect.stats, [("conflicts".to_string(), 1)]);
    assert!(expect.one_worker_only);
    assert!(parse_directives("# expect-exitt: 1\n").is_err());
    assert!(parse_directives("# expect-stat: conflicts\n").is_err());
    assert!(parse_directives("# workers: 4\n").is_err());
}

#[test]
fn stats_line_values_are_found() {
    let line = r#"{"dvm_stats": {"workers": 2, "runners_failed": 1, "wall_time_ms": 3.5}}"#;
    assert_eq!(stat_value(line, "workers"), Some("2"));
    assert_eq!(stat_value(line, "runners_failed"), Some("1"));
    assert_eq!(stat_value(line, "wall_time_ms"), Some("3.5"));
    assert_eq!(stat_value(line, "conflicts"), None);
}
