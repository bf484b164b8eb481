//! `dvm-bench measure -- CMD ARGS...`: run one command and report wall time, exit status, peak
//! RSS and its output as one JSON line. The harness runs every measurement through this
//! subcommand in a fresh process, because `getrusage(RUSAGE_CHILDREN)` reports the largest peak
//! RSS among *all* children a process has waited for: a process with exactly one child gets that
//! child's figure (or its largest waited-for descendant's). `cpu_ms` is user + system CPU time
//! from the same call: the command's and every descendant's it waited for, so `dvm run --nodes N`
//! (whose node 0 waits for the others) reports the CPU time of all N nodes.

use nix::sys::resource::{getrusage, UsageWho};
use std::io::Read;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub struct Outcome {
    pub wall_ms: f64,
    /// The exit code, or 128 + signal number when the command was killed.
    pub exit: i32,
    pub timed_out: bool,
    pub max_rss_kib: i64,
    /// User + system CPU time of the command and every descendant it waited for, in ms.
    pub cpu_ms: Option<f64>,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "wall_ms": self.wall_ms,
            "exit": self.exit,
            "timed_out": self.timed_out,
            "max_rss_kib": self.max_rss_kib,
            "cpu_ms": self.cpu_ms,
            "stdout": self.stdout,
            "stderr": self.stderr,
        })
    }

    pub fn from_json(json: &serde_json::Value) -> Option<Outcome> {
        Some(Outcome {
            wall_ms: json.get("wall_ms")?.as_f64()?,
            exit: i32::try_from(json.get("exit")?.as_i64()?).ok()?,
            timed_out: json.get("timed_out")?.as_bool()?,
            max_rss_kib: json.get("max_rss_kib")?.as_i64()?,
            cpu_ms: json.get("cpu_ms").and_then(serde_json::Value::as_f64),
            stdout: json.get("stdout")?.as_str()?.to_string(),
            stderr: json.get("stderr")?.as_str()?.to_string(),
        })
    }
}

fn drain(mut from: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = from.read_to_end(&mut bytes);
        bytes
    })
}

/// Runs `argv` to completion (killing it after `timeout`), measuring it. Must be the only child
/// this process ever waits for, or `max_rss_kib` is not this command's.
pub fn measure(argv: &[String], timeout: Option<Duration>) -> Result<Outcome, String> {
    let (program, args) = argv.split_first().ok_or("measure: no command given")?;
    let start = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("measure: cannot start {program}: {e}"))?;
    let out = drain(child.stdout.take().ok_or("measure: no stdout pipe")?);
    let err = drain(child.stderr.take().ok_or("measure: no stderr pipe")?);
    let mut timed_out = false;
    // Polling (every 1 ms for the first second, then every 10 ms, so a long run does not pay
    // for a busy waiter) bounds the timing error at about 1% without a helper thread that
    // would race with reaping the child.
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(format!("measure: wait failed: {e}")),
        }
        if let Some(limit) = timeout {
            if !timed_out && start.elapsed() > limit {
                timed_out = true;
                let _ = child.kill();
            }
        }
        let pause = if start.elapsed() < Duration::from_secs(1) {
            1
        } else {
            10
        };
        thread::sleep(Duration::from_millis(pause));
    };
    let wall_ms = start.elapsed().as_secs_f64() * 1e3;
    let stdout = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
    let usage = getrusage(UsageWho::RUSAGE_CHILDREN).map_err(|e| format!("getrusage: {e}"))?;
    use std::os::unix::process::ExitStatusExt;
    let exit = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1);
    Ok(Outcome {
        wall_ms,
        exit,
        timed_out,
        max_rss_kib: usage.max_rss(),
        cpu_ms: Some(
            [usage.user_time(), usage.system_time()]
                .iter()
                .map(|t| t.tv_sec() as f64 * 1e3 + t.tv_usec() as f64 / 1e3)
                .sum(),
        ),
        stdout,
        stderr,
    })
}
