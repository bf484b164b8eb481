//! Runs a DISA source with and without the JIT and compares everything observable.
#![allow(dead_code)] // each test binary uses a part

use dvm_engine::image::{self, Format};
use dvm_engine::vm::{self, Config, OutputMode};
use dvm_jit::{DvmJit, JitOptions, JitStats};
use std::fmt::Write as _;
use std::sync::Arc;

/// What a run shows: output, fault reports, outcome counters and the instruction count.
#[derive(Debug, PartialEq, Eq)]
pub struct Observed {
    pub stdout: String,
    pub stderr: String,
    pub instructions: u64,
    pub committed: u64,
    pub aborted: u64,
    pub faulted: u64,
    pub exit_code: u8,
}

pub fn run(source: &str, max_instructions: u64, jit: Option<Arc<DvmJit>>) -> Observed {
    let image = dvm_engine::asm::assemble("generated.dasm", source)
        .unwrap_or_else(|err| panic!("the program assembles: {err}\n{source}"));
    let image = image::validate(Format::Elf, image).expect("the program validates");
    let config = Config {
        output: OutputMode::Capture,
        workers: Some(1),
        pin_workers: false,
        max_instructions,
        jit: jit.map(|jit| jit as Arc<dyn dvm_engine::interp::Jit>),
        ..Config::default()
    };
    let report = vm::run(image, config).expect("the program runs");
    Observed {
        stdout: String::from_utf8_lossy(&report.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&report.stderr).into_owned(),
        instructions: report.stats.instructions,
        committed: report.stats.runners_committed,
        aborted: report.stats.runners_aborted,
        faulted: report.stats.runners_faulted,
        exit_code: report.exit_code(),
    }
}

pub fn jit(threshold: u32) -> Arc<DvmJit> {
    jit_with(threshold, false)
}

/// A JIT compiling at `threshold`, on its compiler thread if `background`.
pub fn jit_with(threshold: u32, background: bool) -> Arc<DvmJit> {
    Arc::new(
        DvmJit::new(JitOptions {
            threshold,
            perf_map: false,
            local_labels: Vec::new(),
            background,
        })
        .expect("the JIT sets up on this host"),
    )
}

/// Runs `source` interpreted and with the JIT (compiling at `threshold`); panics on any
/// difference. Returns what the JIT did.
pub fn same_with_jit(source: &str, max_instructions: u64, threshold: u32) -> (Observed, JitStats) {
    same_with(source, max_instructions, jit(threshold))
}

/// `same_with_jit` with the JIT given.
pub fn same_with(source: &str, max_instructions: u64, jit: Arc<DvmJit>) -> (Observed, JitStats) {
    let interpreted = run(source, max_instructions, None);
    let compiled = run(source, max_instructions, Some(Arc::clone(&jit)));
    assert_eq!(
        interpreted, compiled,
        "--jit off (left) and --jit on (right) differ (max instructions {max_instructions}) for:\n{source}"
    );
    (interpreted, jit.stats())
}

/// Runs `source` with and without the JIT at each instruction limit in `limits`; each run must
/// be identical both ways and end at the limit.
pub fn stops_at_every_limit(source: &str, limits: impl IntoIterator<Item = u64>) {
    for limit in limits {
        let (observed, _) = same_with_jit(source, limit, 1);
        assert!(
            observed.stderr.contains("instruction limit"),
            "limit {limit}: {}",
            observed.stderr
        );
    }
}

/// DISA that prints each of `words` (8 bytes, as a decimal `u64`) followed by a space, then
/// commits: the end of a generated test program.
pub fn print_words_and_exit(out: &mut String, words: impl IntoIterator<Item = u64>) {
    for word in words {
        let _ = writeln!(out, "    mov {word:#x}:ue, 0x100001000:ue");
        let _ = writeln!(out, "    mov $102:ue, 0x100000420:ue\n    int 0x80");
        let _ = writeln!(out, "    mov $0x20:ue, 0x100000208:ue");
    }
    out.push_str("    exit:c\n");
}

/// The decimal numbers a program printed, in order (what `print_words_and_exit` printed).
pub fn printed_numbers(stdout: &str) -> Vec<u64> {
    stdout
        .split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect()
}
