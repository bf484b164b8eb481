//! `dvm-bench`: DVM's benchmark harness. `dvm-bench run` generates the inputs, runs DVM and its
//! baselines side by side and prints one comparison table; the other subcommands are its
//! building blocks (data generators, parameter files, a measuring wrapper). See BENCHMARKS.md.

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

mod cluster;
mod common;
mod data;
mod engine;
mod harness;
mod measure;
mod transport;

#[derive(Parser)]
#[command(
    name = "dvm-bench",
    version,
    about = "DVM benchmark harness (see BENCHMARKS.md)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Clustered k-means input: DIR/points.f64 (N*D little-endian f64) and DIR/points.json.
    GenPoints {
        #[arg(long, default_value_t = 1_000_000)]
        n: u64,
        #[arg(long, default_value_t = 8)]
        d: u64,
        #[arg(long, default_value_t = 16)]
        k: u64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Random sort input: DIR/values.u64 (N little-endian u64) and DIR/values.json.
    GenU64 {
        #[arg(long, default_value_t = 1_000_000)]
        n: u64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a parameters file: the values as little-endian u64 words.
    Params {
        #[arg(long)]
        out: PathBuf,
        values: Vec<u64>,
    },
    /// The sort workload's native reference: sort a u64 file, print `checksum X` and `sorted yes`.
    SortRef { path: PathBuf },
    /// examples/sort.dasm's own algorithm in Rust, one thread (the same output as sort-ref).
    SortSame { path: PathBuf },
    /// Run one command; print one JSON line: wall_ms, exit, max_rss_kib, stdout, stderr.
    Measure {
        /// Kill the command after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Two nodes in this process over each transport this host has (TCP; RDMA with a device):
    /// round trips, page fetch latency and bandwidth, message rate, side by side.
    Transport {
        #[arg(long, default_value_t = 20_000)]
        round_trips: usize,
        #[arg(long, default_value_t = 20_000)]
        pages: usize,
        #[arg(long, default_value_t = 200_000)]
        messages: usize,
    },
    /// Run the benchmark suite and print the comparison table (also target/bench/latest.md).
    Run(Box<harness::RunArgs>),
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(message) => {
            eprintln!("dvm-bench: {message}");
            ExitCode::from(1)
        }
    }
}

fn report_generated(what: &str, (path, fresh): (PathBuf, bool)) {
    let verb = if fresh { "wrote" } else { "up to date:" };
    eprintln!("{what}: {verb} {}", path.display());
}

/// Prints what `sort` makes of the u64 file at `path` (examples/sort.dasm's output).
fn print_sorted(path: &Path, sort: fn(&Path) -> std::io::Result<String>) -> Result<(), String> {
    let text = sort(path).map_err(|e| format!("{}: {e}", path.display()))?;
    print!("{text}");
    Ok(())
}

fn real_main() -> Result<ExitCode, String> {
    let cli = Cli::parse();
    match cli.command {
        Command::GenPoints { n, d, k, seed, out } => {
            let made = data::gen_points(&out, n, d, k, seed).map_err(|e| e.to_string())?;
            report_generated("gen-points", made);
        }
        Command::GenU64 { n, seed, out } => {
            let made = data::gen_u64(&out, n, seed).map_err(|e| e.to_string())?;
            report_generated("gen-u64", made);
        }
        Command::Params { out, values } => {
            data::write_params(&out, &values).map_err(|e| e.to_string())?;
        }
        Command::SortRef { path } => print_sorted(&path, data::sort_reference)?,
        Command::SortSame { path } => print_sorted(&path, data::sort_same_algorithm)?,
        Command::Measure { timeout, command } => {
            let limit = timeout.map(Duration::from_secs_f64);
            let outcome = measure::measure(&command, limit)?;
            println!("{}", outcome.to_json());
        }
        Command::Transport {
            round_trips,
            pages,
            messages,
        } => transport::run(transport::Sizes {
            round_trips,
            pages,
            messages,
        })?,
        Command::Run(args) => return harness::run(*args),
    }
    Ok(ExitCode::SUCCESS)
}
