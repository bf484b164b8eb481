//! Deterministic input data: clustered points for k-means and random u64 for sort, each with a
//! JSON sidecar carrying the parameters and the file's sha256 so regeneration can be skipped.

use sha2::{Digest, Sha256};
use std::fs;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// splitmix64: tiny, fast, and good enough for benchmark data.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in the open interval (0, 1).
    pub fn next_f64(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box–Muller, one value per call).
    pub fn next_gaussian(&mut self) -> f64 {
        let u1 = self.next_f64();
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let got = file.read(&mut buf)?;
        if got == 0 {
            break;
        }
        hasher.update(&buf[..got]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// True when `data` exists, `sidecar` describes the same parameters, and the sha256 matches.
fn up_to_date(data: &Path, sidecar: &Path, params: &serde_json::Value) -> bool {
    let Ok(text) = fs::read_to_string(sidecar) else {
        return false;
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    let Some(obj) = params.as_object() else {
        return false;
    };
    if obj.iter().any(|(key, value)| json.get(key) != Some(value)) {
        return false;
    }
    let Some(want) = json.get("sha256").and_then(|v| v.as_str()) else {
        return false;
    };
    matches!(sha256_file(data), Ok(got) if got == want)
}

/// Writes `data` with the generator's bytes and the sidecar, unless both are already current.
/// Returns the data path and whether it was (re)generated.
fn generate(
    dir: &Path,
    name: &str,
    params: serde_json::Value,
    mut fill: impl FnMut(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<(PathBuf, bool)> {
    fs::create_dir_all(dir)?;
    let data = dir.join(name);
    let sidecar = data.with_extension("json");
    if up_to_date(&data, &sidecar, &params) {
        return Ok((data, false));
    }
    struct Hashing<W: Write> {
        inner: W,
        hasher: Sha256,
    }
    impl<W: Write> Write for Hashing<W> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = self.inner.write(buf)?;
            self.hasher.update(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }
    let tmp = data.with_extension("tmp");
    let mut out = Hashing {
        inner: BufWriter::with_capacity(1 << 20, fs::File::create(&tmp)?),
        hasher: Sha256::new(),
    };
    fill(&mut out)?;
    out.flush()?;
    let digest = hex(&out.hasher.finalize());
    drop(out.inner);
    fs::rename(&tmp, &data)?;
    let mut json = params;
    if let Some(obj) = json.as_object_mut() {
        obj.insert("sha256".into(), serde_json::Value::String(digest));
    }
    fs::write(&sidecar, format!("{json}\n"))?;
    Ok((data, true))
}

/// `points.f64`: N points of dimension D around K random centres in [-10, 10]^D, unit Gaussian
/// noise, each point's cluster drawn uniformly. Raw little-endian f64, row-major.
pub fn gen_points(
    dir: &Path,
    n: u64,
    d: u64,
    k: u64,
    seed: u64,
) -> std::io::Result<(PathBuf, bool)> {
    let params = serde_json::json!({"n": n, "d": d, "k": k, "seed": seed});
    generate(dir, "points.f64", params, |out| {
        let mut rng = SplitMix64::new(seed);
        let centres: Vec<f64> = (0..k * d).map(|_| rng.next_f64() * 20.0 - 10.0).collect();
        let mut row = Vec::with_capacity(d as usize * 8);
        for _ in 0..n {
            let c = rng.next_u64() % k.max(1);
            row.clear();
            for e in 0..d {
                let x = centres[(c * d + e) as usize] + rng.next_gaussian();
                row.extend_from_slice(&x.to_le_bytes());
            }
            out.write_all(&row)?;
        }
        Ok(())
    })
}

/// `values.u64`: N uniformly random little-endian u64.
pub fn gen_u64(dir: &Path, n: u64, seed: u64) -> std::io::Result<(PathBuf, bool)> {
    let params = serde_json::json!({"n": n, "seed": seed});
    generate(dir, "values.u64", params, |out| {
        let mut rng = SplitMix64::new(seed);
        for _ in 0..n {
            out.write_all(&rng.next_u64().to_le_bytes())?;
        }
        Ok(())
    })
}

/// A parameters file: little-endian u64 words.
pub fn write_params(path: &Path, values: &[u64]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    fs::write(path, bytes)
}

/// The sort workload's reference: sort the file's u64 and print what examples/sort.dasm prints.
pub fn sort_reference(path: &Path) -> std::io::Result<String> {
    let mut values = read_u64s(path)?;
    values.sort_unstable();
    Ok(sort_answer(&values))
}

/// examples/sort.dasm's algorithm in Rust, one thread, printing what it prints: the engine's
/// own cost next to `sort_reference` (the workload's bar is `sort_unstable`, a different
/// algorithm).
pub fn sort_same_algorithm(path: &Path) -> std::io::Result<String> {
    let values = read_u64s(path)?;
    let mut out = vec![0u64; values.len()];
    let mut scratch = vec![0u64; values.len()];
    // One top byte's split at a time, reused: it stays in cache, as a bucket runner's does.
    let mut split = Vec::new();
    // By the top byte into `scratch` (what the chunks and the bucket runners' gathers do).
    let tops = counting_pass(&values, &mut scratch, 56);
    let mut start = 0;
    for count in tops {
        let end = start + count;
        if split.len() < count {
            split.resize(count, 0);
        }
        sort_top_byte(
            &scratch[start..end],
            &mut split[..count],
            &mut out[start..end],
        );
        start = end;
    }
    Ok(sort_answer(&out))
}

/// Runs of up to this many elements are insertion-sorted (examples/sort.dasm's SMALL).
const SMALL: usize = 64;

/// One top byte's elements (`from`) sorted into `out`, as a bucket runner does: split by byte
/// 6 into runs (in `split`, as long as `from`), each insertion-sorted or, if long, sorted by
/// six counting passes (between `split` and `out`: an even number, so they end in `split`).
fn sort_top_byte(from: &[u64], split: &mut [u64], out: &mut [u64]) {
    if from.len() <= SMALL {
        insert_into(from, out);
        return;
    }
    let runs = counting_pass(from, split, 48);
    let mut start = 0;
    for count in runs {
        let end = start + count;
        let (run, place) = (&mut split[start..end], &mut out[start..end]);
        if count <= SMALL {
            insert_into(run, place);
        } else {
            for shift in (0..48).step_by(16) {
                counting_pass(run, place, shift);
                counting_pass(place, run, shift + 8);
            }
            place.copy_from_slice(run);
        }
        start = end;
    }
}

/// A stable counting pass by the byte at `shift`; returns the 256 counts.
fn counting_pass(from: &[u64], to: &mut [u64], shift: u32) -> [usize; 256] {
    let mut counts = [0usize; 256];
    for value in from {
        counts[(value >> shift) as usize & 255] += 1;
    }
    let mut cursors = [0usize; 256];
    let mut at = 0;
    for (cursor, count) in cursors.iter_mut().zip(counts) {
        *cursor = at;
        at += count;
    }
    for &value in from {
        let byte = (value >> shift) as usize & 255;
        to[cursors[byte]] = value;
        cursors[byte] += 1;
    }
    counts
}

/// Insertion sort while copying `from` into `out` (the same length).
fn insert_into(from: &[u64], out: &mut [u64]) {
    for (filled, &value) in from.iter().enumerate() {
        let mut at = filled;
        while at > 0 && out[at - 1] > value {
            out[at] = out[at - 1];
            at -= 1;
        }
        out[at] = value;
    }
}

fn read_u64s(path: &Path) -> std::io::Result<Vec<u64>> {
    let bytes = fs::read(path)?;
    Ok(bytes
        .chunks_exact(8)
        .map(|c| {
            let mut word = [0u8; 8];
            word.copy_from_slice(c);
            u64::from_le_bytes(word)
        })
        .collect())
}

/// What examples/sort.dasm prints for a sorted `values`.
fn sort_answer(values: &[u64]) -> String {
    let checksum = values.iter().enumerate().fold(0u64, |acc, (i, v)| {
        acc.wrapping_add(v.wrapping_mul(i as u64 + 1))
    });
    let sorted = values.windows(2).all(|pair| pair[0] <= pair[1]);
    format!(
        "checksum {checksum}\nsorted {}\n",
        if sorted { "yes" } else { "no" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same answer as `sort_unstable` for random values, for values that share their top
    /// two bytes (one long run: the counting passes), and for descending and equal ones.
    #[test]
    fn sort_dasm_s_algorithm_sorts() {
        let dir = std::env::temp_dir().join(format!("dvm-bench-sort-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("a scratch directory");
        let mut rng = SplitMix64::new(3);
        let random: Vec<u64> = (0..20_000).map(|_| rng.next_u64()).collect();
        let one_run: Vec<u64> = random.iter().map(|v| (0xabcd << 48) | (v >> 16)).collect();
        let descending: Vec<u64> = (0..5_000u64).rev().map(|v| v << 40).collect();
        let equal = vec![7u64; 3_000];
        for (name, values) in [
            ("random", random),
            ("one_run", one_run),
            ("descending", descending),
            ("equal", equal),
            ("empty", Vec::new()),
        ] {
            let path = dir.join(name);
            write_params(&path, &values).expect("written");
            let same = sort_same_algorithm(&path).expect("sorted");
            assert_eq!(same, sort_reference(&path).expect("sorted"), "{name}");
            assert!(same.ends_with("sorted yes\n"), "{name}: {same}");
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
