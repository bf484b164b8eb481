//! Shared by the test binaries that re-run themselves under a real launcher: the rank's side
//! (`child::child_main`, run by an ignored `child_rank` test in each binary), the parent's
//! helpers (commands, the scripts in `scripts/cluster`, reading what the ranks printed) and, in
//! `cluster`, fixtures for a running Slurm and the namespace hosts. Only `child` depends on
//! `dvm_cluster`: the rest can launch any program (`launch_command`), `dvm` included.
//!
//! A rank prints one line: `DVM-RANK key=value ...` when the rendezvous succeeded, `DVM-FAIL
//! key=value ... error=<text>` (and exits non-zero) when it did not. The child is steered by
//! environment variables, so that any launcher can pass them on:
//! - `DVM_CLUSTER_TEST_CHILD`: must be set (guards against running the child by accident);
//! - `DVM_CLUSTER_TEST_LISTEN`: the IP of the data listener (default 127.0.0.1; 0.0.0.0 makes a
//!   rank advertise the address it reached rank 0 from);
//! - `DVM_CLUSTER_TEST_DEADLINE_MS`: the rendezvous deadline (default 20000);
//! - `DVM_CLUSTER_TEST_HOSTS`, `DVM_CLUSTER_TEST_RANK`: passed as `--hosts`/`--rank`;
//! - `DVM_CLUSTER_TEST_WAIT_FILE`: ranks other than 0 wait (within the deadline) for this file
//!   to exist before joining, so a test can order events between ranks and other processes.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

pub mod child;
pub mod cluster;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::{Duration, Instant};

pub const CHILD_VAR: &str = "DVM_CLUSTER_TEST_CHILD";
pub const LISTEN_VAR: &str = "DVM_CLUSTER_TEST_LISTEN";
pub const DEADLINE_VAR: &str = "DVM_CLUSTER_TEST_DEADLINE_MS";
pub const HOSTS_VAR: &str = "DVM_CLUSTER_TEST_HOSTS";
pub const RANK_VAR: &str = "DVM_CLUSTER_TEST_RANK";
pub const WAIT_FILE_VAR: &str = "DVM_CLUSTER_TEST_WAIT_FILE";

/// The exit code of `scripts/cluster/*` for "cannot run here".
pub const SCRIPT_SKIP: i32 = 77;

/// Says loudly that a test could not run here, and why; the test then returns. The harness
/// counts it as passed, so the reason goes straight to stderr, past the harness's capture of
/// a passing test's output.
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED {test}: {why} ***\n");
}

/// Whether `program --version` runs.
pub fn available(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate is inside the repository")
        .to_path_buf()
}

/// A script in `scripts/cluster`.
pub fn script(name: &str) -> PathBuf {
    repo().join("scripts/cluster").join(name)
}

/// Where the tests keep cluster state: under the build's target directory, not /tmp (the
/// namespace hosts each have their own /tmp).
pub fn state_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("cluster")
        .join(name)
}

/// What a command did.
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Ran {
    pub fn from_output(output: Output, elapsed: Duration) -> Ran {
        Ran {
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            elapsed,
        }
    }

    /// Everything, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "exit: {} after {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.status, self.elapsed, self.stdout, self.stderr
        )
    }

    pub fn ranks(&self) -> Vec<RankLine> {
        rank_lines(&self.stdout, "DVM-RANK ")
    }

    pub fn failures(&self) -> Vec<RankLine> {
        rank_lines(&self.stdout, "DVM-FAIL ")
    }
}

/// Runs `cmd` to completion (the caller bounds it, normally through `timeout`).
pub fn run(cmd: &mut Command) -> Ran {
    let started = Instant::now();
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    Ran::from_output(output, started.elapsed())
}

/// A command for `scripts/cluster/<name>`, bounded by `timeout`.
pub fn script_command(name: &str, limit_s: u32) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", &limit_s.to_string()])
        .arg(script(name))
        .current_dir(repo());
    cmd
}

/// Runs a script: `Ok(stdout)`, `Err(reason)` when it cannot run here (exit 77), a panic with
/// its output on any other failure.
pub fn run_script(cmd: &mut Command) -> Result<String, String> {
    let ran = run(cmd);
    match ran.status.code() {
        Some(0) => Ok(ran.stdout),
        Some(SCRIPT_SKIP) => Err(ran.stderr.trim().to_string()),
        _ => panic!("{cmd:?} failed:\n{}", ran.describe()),
    }
}

/// A command that runs `program args...` under `launcher` (program and arguments up to the
/// program to run; empty for none), bounded by `timeout` at `limit_s` (which stops the whole
/// launch). The environment is cleaned of anything that would describe another job. This is
/// the entry point for launching anything, e.g. `dvm run ...`, under the launchers here.
pub fn launch_command(launcher: &[&str], program: &Path, args: &[&str], limit_s: u32) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", &limit_s.to_string()])
        .args(launcher)
        .arg(program)
        .args(args);
    clean_env(&mut cmd);
    // Needed as root, harmless otherwise.
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    cmd
}

/// `launch_command` for this test binary's `child_rank` (see `child`).
pub fn child_command(launcher: &[&str], limit_s: u32) -> Command {
    let me = std::env::current_exe().expect("test binary path");
    let mut cmd = launch_command(
        launcher,
        &me,
        &["--ignored", "--exact", "child_rank", "--nocapture"],
        limit_s,
    );
    cmd.env(CHILD_VAR, "1")
        // A failing rank's message is what matters, not the harness's stack.
        .env("RUST_BACKTRACE", "0");
    cmd
}

/// Removes variables of launchers and of this harness inherited from the test's own
/// environment (e.g. when CI itself runs inside a Slurm job).
pub fn clean_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("DVM_")
            || key.starts_with("SLURM_")
            || key.starts_with("OMPI_")
            || key.starts_with("PMIX_")
            || key.starts_with("PMI_")
            || key.starts_with("MPI_LOCAL")
        {
            cmd.env_remove(key);
        }
    }
}

/// One line printed by a rank.
#[derive(Debug, Clone)]
pub struct RankLine {
    pub line: String,
    fields: BTreeMap<String, String>,
}

impl RankLine {
    /// The value of `key`, or "" when absent.
    pub fn get(&self, key: &str) -> &str {
        self.fields.get(key).map_or("", String::as_str)
    }
}

/// The lines starting with `marker`, sorted by rank. `error=` takes the rest of its line.
fn rank_lines(stdout: &str, marker: &str) -> Vec<RankLine> {
    let mut lines: Vec<RankLine> = stdout
        .lines()
        .filter_map(|l| l.split_once(marker).map(|(_, rest)| rest))
        .map(|rest| {
            let (head, error) = match rest.split_once(" error=") {
                Some((h, e)) => (h, Some(e)),
                None => (rest, None),
            };
            let mut fields: BTreeMap<String, String> = head
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            if let Some(e) = error {
                fields.insert("error".to_string(), e.to_string());
            }
            RankLine {
                line: rest.to_string(),
                fields,
            }
        })
        .collect();
    lines.sort_by_key(|l| l.get("rank").parse::<u32>().unwrap_or(u32::MAX));
    lines
}

/// Checks the lines of a successful job of `world` ranks from `source` (a `LaunchSource` as
/// printed by `{:?}`): one line per rank, every rank got the same table, and each rank's entry
/// is its own listener (or, for a listener on 0.0.0.0, an address with its port). Returns the
/// table.
pub fn check_job(ran: &Ran, world: u32, source: &str) -> Vec<String> {
    assert!(ran.status.success(), "the job failed:\n{}", ran.describe());
    let lines = ran.ranks();
    assert_eq!(
        lines.len(),
        world as usize,
        "one line per rank:\n{}",
        ran.describe()
    );
    let table: Vec<String> = lines
        .first()
        .map(|l| l.get("table").split(',').map(str::to_string).collect())
        .unwrap_or_default();
    assert_eq!(table.len(), world as usize, "{}", ran.describe());
    for (rank, line) in lines.iter().enumerate() {
        let l = &line.line;
        assert_eq!(line.get("rank"), rank.to_string(), "{l}");
        assert_eq!(line.get("world"), world.to_string(), "{l}");
        assert_eq!(line.get("source"), source, "{l}");
        assert_eq!(
            line.get("table").split(',').collect::<Vec<_>>(),
            table,
            "{l}"
        );
        let me = line.get("me");
        let entry = table.get(rank).map_or("", String::as_str);
        if me.starts_with("0.0.0.0:") {
            let port = me.trim_start_matches("0.0.0.0");
            assert!(
                entry.ends_with(port) && !entry.starts_with("0.0.0.0"),
                "{l}"
            );
        } else {
            assert_eq!(entry, me, "{l}");
        }
    }
    table
}

/// k-means input for runs long enough to lose a node in the middle: `examples/kmeans.dasm`'s
/// parameters (N points of D dimensions, K clusters, I iterations, P partitions) and N*D
/// coordinates from a fixed generator, written under `dir`; returns the `--load` arguments.
pub fn kmeans_loads(dir: &Path, n: u64, d: u64, k: u64, iterations: u64, p: u64) -> [String; 2] {
    std::fs::create_dir_all(dir).expect("the data directory");
    let params = dir.join("kmeans-params.bin");
    let points = dir.join("kmeans-points.bin");
    let words: Vec<u8> = [n, d, k, iterations, p, 0]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    std::fs::write(&params, words).expect("the parameters");
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let coordinates: Vec<u8> = (0..n * d)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 / (1u64 << 53) as f64).to_le_bytes()
        })
        .collect();
    std::fs::write(&points, coordinates).expect("the points");
    [
        format!("{}@0x4000000000", params.display()),
        format!("{}@0x5000000000", points.display()),
    ]
}
