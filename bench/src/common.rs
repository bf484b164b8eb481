//! What every group of benchmark rows shares: running `dvm` and `dvm-bench measure`, reading
//! their output (answers, `--stats` JSON), medians, markdown tables. The suite (`harness`) and
//! the row groups (`engine`, `cluster`) all use it; it uses none of them.

use crate::data;
use crate::measure::Outcome;
use std::path::Path;
use std::process::Command;

/// Where the workloads' parameters and input data are loaded (`--load FILE@ADDR`).
pub(crate) const PARAMS_ADDR: &str = "0x4000000000";
pub(crate) const DATA_ADDR: &str = "0x5000000000";

pub(crate) fn s(text: impl Into<String>) -> String {
    text.into()
}

/// The path of `examples/NAME.dasm`, or why it cannot be run (kept as a row's error).
pub(crate) fn example_program(root: &Path, name: &str) -> Result<String, String> {
    let path = root.join("examples").join(format!("{name}.dasm"));
    if path.exists() {
        Ok(path_str(&path))
    } else {
        Err(format!("missing: {} not found", path.display()))
    }
}

/// `BIN run PROG --workers W --stats=json --load PARAMS@.. [--load INPUT@..]`: how every DVM row
/// runs a workload (or why it cannot, kept as the row's error).
pub(crate) fn dvm_run_argv(
    bin: &Path,
    prog: &Result<String, String>,
    workers: u64,
    params: &str,
    input: Option<&str>,
) -> Result<Vec<String>, String> {
    let mut argv = vec![
        path_str(bin),
        s("run"),
        prog.clone()?,
        s("--workers"),
        workers.to_string(),
        s("--stats=json"),
        s("--load"),
        format!("{params}@{PARAMS_ADDR}"),
    ];
    if let Some(input) = input {
        argv.extend([s("--load"), format!("{input}@{DATA_ADDR}")]);
    }
    Ok(argv)
}

/// Writes a parameters file `DATA_DIR/params/NAME.bin`; returns its path.
pub(crate) fn params_file(data_dir: &Path, name: &str, values: &[u64]) -> Result<String, String> {
    let path = data_dir.join("params").join(format!("{name}.bin"));
    data::write_params(&path, values).map_err(|e| e.to_string())?;
    Ok(path_str(&path))
}

pub(crate) fn path_str(path: &Path) -> String {
    path.display().to_string()
}

pub(crate) fn dvm_stats(stderr: &str) -> Option<serde_json::Value> {
    stderr
        .lines()
        .filter(|l| l.contains("\"dvm_stats\""))
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .and_then(|v| v.get("dvm_stats").cloned())
}

/// The value after `key ` on the first line that starts with it.
pub(crate) fn field<'a>(stdout: &'a str, key: &str) -> Option<&'a str> {
    stdout.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix(' '))
            .map(str::trim)
    })
}

/// The workload's answer from a run's stdout: the part compared between systems.
pub(crate) fn answer(workload: &str, stdout: &str) -> Option<String> {
    match workload {
        "kmeans" => field(stdout, "checksum").map(str::to_string),
        "primes" => field(stdout, "primes").map(str::to_string),
        "sort" => {
            let sorted = field(stdout, "sorted")?;
            Some(format!(
                "checksum {} sorted {sorted}",
                field(stdout, "checksum")?
            ))
        }
        _ => {
            let lines: Vec<&str> = stdout
                .lines()
                .filter(|l| !l.starts_with("iteration "))
                .collect();
            Some(lines.join("\n"))
        }
    }
}

pub(crate) fn agrees(workload: &str, got: &str, want: &str) -> bool {
    if workload == "kmeans" {
        match (got.parse::<f64>(), want.parse::<f64>()) {
            (Ok(a), Ok(b)) => (a - b).abs() <= 1e-6 * b.abs().max(a.abs()).max(1e-12),
            _ => false,
        }
    } else {
        got == want
    }
}

pub(crate) fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// One measurement through `dvm-bench measure` in a fresh process.
pub(crate) fn measure_once(me: &Path, argv: &[String], timeout: f64) -> Result<Outcome, String> {
    let output = Command::new(me)
        .arg("measure")
        .arg("--timeout")
        .arg(timeout.to_string())
        .arg("--")
        .args(argv)
        .output()
        .map_err(|e| format!("cannot run measure: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let json: serde_json::Value = serde_json::from_str(text.trim()).map_err(|e| {
        format!(
            "measure said {:?} ({e}); stderr {}",
            text.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        )
    })?;
    Outcome::from_json(&json).ok_or_else(|| format!("measure printed unexpected JSON: {json}"))
}

/// A markdown table with padded columns.
pub(crate) fn markdown_table(header: &[String], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: &[String]| -> String {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = widths.get(i).copied().unwrap_or(0)))
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(header);
    out.push_str(&line(
        &widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>(),
    ));
    for row in rows {
        out.push_str(&line(row));
    }
    out
}
