//! Fixtures for tests that need a cluster: `Slurm` (single-host, or across the namespace
//! hosts) and `Hosts` (h1..h3 from network namespaces), each up for the life of the value and
//! stopped on drop through `scripts/cluster`, plus helpers to run processes with bounded waits.
//! A fixture that cannot run here (not root, ...) says why through `skip` and is `None`.

use super::{
    child_command, clean_env, launch_command, run, run_script, script, script_command, skip,
    state_dir, Ran, LISTEN_VAR,
};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Takes a fixture's lock. A test that failed while holding it leaves nothing the next one
/// needs, so a poisoned lock is taken all the same.
pub fn lock(m: &'static Mutex<()>) -> MutexGuard<'static, ()> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reads a child's pipe to the end on a thread, so that a chatty child never blocks on a full
/// pipe while it is waited for.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut out);
        }
        out
    })
}

/// Waits (bounded) for a child started by `spawn`, killing it at the deadline. The children
/// run under `timeout` with a shorter limit, which stops the whole launch; this is the
/// backstop.
pub fn wait_child(mut child: Child, limit: Duration, what: &str) -> Ran {
    let started = Instant::now();
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < limit => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                break child
                    .wait()
                    .unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
            }
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    };
    // A grandchild that kept the pipes open could hold these: `timeout` kills the launch.
    let output = Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    Ran::from_output(output, started.elapsed())
}

/// Starts `cmd` with its output piped, for `wait_child`.
pub fn spawn(cmd: &mut Command, what: &str) -> Child {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"))
}

// ---- Slurm ----

static SLURM: Mutex<()> = Mutex::new(());

/// A test Slurm (single-host, or across the namespace hosts), up for the life of this value.
/// The single-host one is machine-wide: one test at a time holds it.
pub struct Slurm {
    _lock: Option<MutexGuard<'static, ()>>,
    pub dir: PathBuf,
    /// Across the namespace hosts (`slurm-up --netns`) rather than on this host.
    netns: bool,
}

impl Slurm {
    /// Starts Slurm, or says why it cannot run here.
    pub fn up(test: &str) -> Option<Slurm> {
        let guard = lock(&SLURM);
        Self::start(test, Some(guard), "slurm", false)
    }

    /// Starts Slurm with one node per namespace host (they must be up: hold `Hosts`). Its
    /// daemons live in the hosts' network namespaces, so it runs alongside `Slurm::up`'s.
    pub fn up_across(test: &str, _hosts: &Hosts) -> Option<Slurm> {
        Self::start(test, None, "slurm-netns", true)
    }

    fn start(
        test: &str,
        guard: Option<MutexGuard<'static, ()>>,
        name: &str,
        netns: bool,
    ) -> Option<Slurm> {
        let dir = state_dir(name);
        let mut cmd = script_command("slurm-up", 60);
        if netns {
            cmd.arg("--netns");
        }
        Self::env(&mut cmd, &dir);
        match run_script(&mut cmd) {
            Ok(_) => Some(Slurm {
                _lock: guard,
                dir,
                netns,
            }),
            Err(why) => {
                skip(test, &format!("Slurm cannot run here: {why}"));
                None
            }
        }
    }

    fn env(cmd: &mut Command, dir: &Path) {
        clean_env(cmd);
        // Other ports than slurm-up's defaults, so a developer's own test cluster is left alone.
        cmd.env("DVM_SLURM_DIR", dir)
            .env("DVM_SLURMCTLD_PORT", "16827")
            .env("DVM_SLURMD_PORT", "16828")
            .env("SLURM_CONF", dir.join("slurm.conf"));
    }

    /// `srun ARGS...` running `child_rank`, bounded at `limit_s`.
    pub fn srun(&self, args: &[&str], limit_s: u32) -> Command {
        let mut launcher = vec!["srun"];
        launcher.extend_from_slice(args);
        let mut cmd = child_command(&launcher, limit_s);
        cmd.env("SLURM_CONF", self.conf());
        cmd
    }

    /// `srun ARGS... PROGRAM PROGRAM_ARGS...` (any program, e.g. `dvm run ...`), bounded.
    pub fn srun_program(
        &self,
        args: &[&str],
        program: &Path,
        program_args: &[&str],
        limit_s: u32,
    ) -> Command {
        let mut launcher = vec!["srun"];
        launcher.extend_from_slice(args);
        let mut cmd = launch_command(&launcher, program, program_args, limit_s);
        cmd.env("SLURM_CONF", self.conf());
        cmd
    }

    /// The cluster's slurm.conf: clients need `SLURM_CONF` set to it.
    pub fn conf(&self) -> PathBuf {
        self.dir.join("slurm.conf")
    }

    /// A Slurm client command (sinfo, scancel, ...), bounded.
    pub fn client(&self, program: &str, args: &[&str]) -> Ran {
        let mut cmd = Command::new("timeout");
        cmd.args(["-k", "2", "10", program]).args(args);
        Self::env(&mut cmd, &self.dir);
        run(&mut cmd)
    }

    /// An allocation of `tasks` tasks without a shell (`salloc --no-shell`): its job id.
    pub fn allocate(&self, tasks: u32) -> Allocation<'_> {
        let ran = self.client("salloc", &["--no-shell", "-n", &tasks.to_string()]);
        assert!(ran.status.success(), "salloc: {}", ran.describe());
        let job = ran
            .stderr
            .split_whitespace()
            .last()
            .and_then(|w| w.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no job id in salloc's output: {}", ran.describe()));
        Allocation { slurm: self, job }
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        let mut cmd = script_command("slurm-down", 60);
        if self.netns {
            cmd.arg("--netns");
        }
        Self::env(&mut cmd, &self.dir);
        let ran = run(&mut cmd);
        if !ran.status.success() {
            eprintln!("slurm-down failed:\n{}", ran.describe());
        }
    }
}

/// A job allocation, cancelled on drop.
pub struct Allocation<'a> {
    slurm: &'a Slurm,
    pub job: u64,
}

impl Allocation<'_> {
    /// A step of this allocation: `srun --jobid=J --overlap -n N` running `child_rank`.
    pub fn step(&self, tasks: u32, limit_s: u32) -> Command {
        let job = format!("--jobid={}", self.job);
        let n = tasks.to_string();
        // --overlap: steps share the allocation's CPUs and memory, so they run at once.
        self.slurm.srun(
            &[&job, "--overlap", "-n", &n, "--kill-on-bad-exit=0"],
            limit_s,
        )
    }
}

impl Drop for Allocation<'_> {
    fn drop(&mut self) {
        let _ = self.slurm.client("scancel", &[&self.job.to_string()]);
    }
}

/// Whether something listens on TCP `port` in this network namespace.
pub fn listening(port: u16) -> bool {
    let needle = format!(":{port:04X} ");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|file| {
        std::fs::read_to_string(file).is_ok_and(|text| {
            text.lines().skip(1).any(|line| {
                let cols: Vec<&str> = line.split_whitespace().collect();
                cols.get(1).is_some_and(|local| {
                    format!("{local} ").ends_with(&needle) && cols.get(3) == Some(&"0A")
                })
            })
        })
    })
}

pub fn wait_listening(port: u16, limit: Duration, what: &str) {
    let started = Instant::now();
    while !listening(port) {
        assert!(
            started.elapsed() < limit,
            "{what}: nothing listens on port {port} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---- three hosts from network namespaces ----

static NETNS: Mutex<()> = Mutex::new(());

/// Hosts h1..h3 (10.77.0.1-3), up for the life of this value (one test at a time).
pub struct Hosts {
    _lock: MutexGuard<'static, ()>,
}

impl Hosts {
    pub fn up(test: &str) -> Option<Hosts> {
        let guard = lock(&NETNS);
        let mut cmd = script_command("netns-up", 30);
        cmd.env("DVM_NETNS_DIR", state_dir("netns"))
            .env("DVM_NETNS_HOSTS", "3");
        match run_script(&mut cmd) {
            Ok(_) => Some(Hosts { _lock: guard }),
            Err(why) => {
                skip(test, &format!("namespace hosts cannot run here: {why}"));
                None
            }
        }
    }

    /// `on HOST` followed by what `child_command` would run, bounded at `limit_s`; the rank
    /// listens on 0.0.0.0, so it advertises the address it reached rank 0 from.
    pub fn on(&self, host: &str, launcher: &[&str], limit_s: u32) -> Command {
        let on = script("on");
        let mut args = vec![on.to_str().expect("UTF-8 path"), host];
        args.extend_from_slice(launcher);
        let mut cmd = child_command(&args, limit_s);
        cmd.env(LISTEN_VAR, "0.0.0.0");
        cmd
    }

    /// `on HOST LAUNCHER... PROGRAM ARGS...` (any program, e.g. `dvm run ...`), bounded.
    pub fn on_program(
        &self,
        host: &str,
        launcher: &[&str],
        program: &Path,
        args: &[&str],
        limit_s: u32,
    ) -> Command {
        let on = script("on");
        let mut prefix = vec![on.to_str().expect("UTF-8 path"), host];
        prefix.extend_from_slice(launcher);
        launch_command(&prefix, program, args, limit_s)
    }

    /// Drops `percent`% of the packets `host` receives, at random (0: none).
    pub fn loss(&self, host: &str, percent: u32) {
        let mut cmd = script_command("loss", 10);
        cmd.args([host, &percent.to_string()])
            .env("DVM_NETNS_DIR", state_dir("netns"));
        if let Err(why) = run_script(&mut cmd) {
            panic!("loss {host} {percent}: {why}");
        }
    }

    pub fn link(&self, state: &str, host: &str) {
        let mut cmd = script_command(&format!("link-{state}"), 10);
        cmd.arg(host).env("DVM_NETNS_DIR", state_dir("netns"));
        if let Err(why) = run_script(&mut cmd) {
            panic!("link-{state} {host}: {why}");
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let mut cmd = script_command("netns-down", 30);
        cmd.env("DVM_NETNS_DIR", state_dir("netns"));
        let ran = run(&mut cmd);
        if !ran.status.success() {
            eprintln!("netns-down failed:\n{}", ran.describe());
        }
    }
}

/// Merges the outputs of the processes of one job.
pub fn merge(rans: &[Ran]) -> Ran {
    let status = rans
        .iter()
        .map(|r| r.status)
        .find(|s| !s.success())
        .or_else(|| rans.first().map(|r| r.status))
        .expect("at least one process");
    Ran {
        status,
        stdout: rans
            .iter()
            .map(|r| r.stdout.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        stderr: rans
            .iter()
            .map(|r| r.stderr.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        elapsed: rans.iter().map(|r| r.elapsed).max().unwrap_or_default(),
    }
}
