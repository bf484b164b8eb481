//! Profile samples: what they hold, their wire form, and their `perf script` text.
//!
//! A sample is a DISA call stack (the sampled PC, then the call sites, innermost first) or a
//! phase of DVM's own (commit, waiting for a page, …), tagged with its node, worker, processor
//! and time. The text is the format `perf script` prints, so the tools built on it read it
//! unchanged: one event line (`comm pid/tid [cpu] time: period event:`), one line per frame
//! (`address symbol+offset (dso)`, innermost first), a blank line. DVM's tags ride in the
//! fields those tools already split on: pid = node, tid = worker, cpu = processor.
//!
//! Frames: the function (the nearest symbol at or before the PC that is not a local `.L`
//! label) and, for the sampled PC only, the local label it runs under (`partition/.Lcoord`),
//! so a flame graph shows loops inside functions. An attempt that did not commit gets a root
//! frame saying so (`[aborted attempt]`, …): work thrown away is visible as such.

use crate::phase::{Phase, WorkerPlace};
use std::fmt::Write as _;

/// Deepest call stack a sample keeps (the innermost frames; the rest are cut).
pub const MAX_STACK_DEPTH: usize = 128;

/// How the runner attempt a program sample came from ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Attempt {
    Committed = 0,
    Aborted = 1,
    /// The commit failed on a conflict.
    Failed = 2,
    Faulted = 3,
    /// The run stopped before the attempt ended.
    Unfinished = 4,
}

impl Attempt {
    fn from_u8(value: u8) -> Option<Attempt> {
        [
            Attempt::Committed,
            Attempt::Aborted,
            Attempt::Failed,
            Attempt::Faulted,
            Attempt::Unfinished,
        ]
        .get(usize::from(value))
        .copied()
    }

    /// The root frame of the attempt's samples, if it did not commit.
    pub fn frame(self) -> Option<&'static str> {
        match self {
            Attempt::Committed => None,
            Attempt::Aborted => Some("[aborted attempt]"),
            Attempt::Failed => Some("[failed commit]"),
            Attempt::Faulted => Some("[faulted attempt]"),
            Attempt::Unfinished => Some("[unfinished attempt]"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum What {
    /// The interpreter was running the program.
    Program(Attempt),
    /// The worker was doing something else.
    Phase(Phase),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Since the run began (each node's own start on a cluster).
    pub time_ns: u64,
    pub place: WorkerPlace,
    pub what: What,
    /// DISA PCs, innermost first; empty for a phase sample.
    pub stack: Vec<u64>,
}

/// A malformed sample buffer (from a peer).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("profile samples truncated at byte {at}")]
    Truncated { at: usize },
    #[error("profile sample {index}: unknown kind {kind}")]
    Kind { index: usize, kind: u8 },
    #[error("profile sample {index}: stack depth {depth} exceeds {MAX_STACK_DEPTH}")]
    Depth { index: usize, depth: usize },
}

/// The wire form: count, then per sample time, node, worker, pu, kind, detail, depth, PCs;
/// little-endian.
pub fn encode(samples: &[Sample]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + samples.len() * 32);
    out.extend_from_slice(&(samples.len() as u64).to_le_bytes());
    for sample in samples {
        out.extend_from_slice(&sample.time_ns.to_le_bytes());
        for word in [sample.place.node, sample.place.worker, sample.place.pu] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        let (kind, detail) = match sample.what {
            What::Program(attempt) => (0u8, attempt as u8),
            What::Phase(phase) => (1u8, phase as u8),
        };
        out.extend_from_slice(&[kind, detail]);
        let depth = sample.stack.len().min(MAX_STACK_DEPTH);
        out.extend_from_slice(&(depth as u16).to_le_bytes());
        for pc in &sample.stack[..depth] {
            out.extend_from_slice(&pc.to_le_bytes());
        }
    }
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let end = self
            .at
            .checked_add(N)
            .filter(|end| *end <= self.bytes.len());
        let end = end.ok_or(DecodeError::Truncated { at: self.at })?;
        let mut word = [0u8; N];
        word.copy_from_slice(&self.bytes[self.at..end]);
        self.at = end;
        Ok(word)
    }
}

pub fn decode(bytes: &[u8]) -> Result<Vec<Sample>, DecodeError> {
    let mut r = Reader { bytes, at: 0 };
    let count = u64::from_le_bytes(r.take()?);
    // Each sample takes at least 24 bytes: a count beyond that is a lie, not an allocation.
    let mut samples = Vec::with_capacity((count as usize).min(bytes.len() / 24));
    for index in 0..count as usize {
        let time_ns = u64::from_le_bytes(r.take()?);
        let node = u32::from_le_bytes(r.take()?);
        let worker = u32::from_le_bytes(r.take()?);
        let pu = u32::from_le_bytes(r.take()?);
        let [kind, detail] = r.take()?;
        let what = match kind {
            0 => Attempt::from_u8(detail).map(What::Program),
            1 => Phase::from_u8(detail).map(What::Phase),
            _ => None,
        }
        .ok_or(DecodeError::Kind { index, kind })?;
        let depth = usize::from(u16::from_le_bytes(r.take()?));
        if depth > MAX_STACK_DEPTH {
            return Err(DecodeError::Depth { index, depth });
        }
        let stack = (0..depth)
            .map(|_| r.take().map(u64::from_le_bytes))
            .collect::<Result<_, _>>()?;
        samples.push(Sample {
            time_ns,
            place: WorkerPlace { node, worker, pu },
            what,
            stack,
        });
    }
    if r.at != bytes.len() {
        return Err(DecodeError::Truncated { at: r.at });
    }
    Ok(samples)
}

/// The program's code symbols, for naming frames.
#[derive(Clone, Debug, Default)]
pub struct Symbols {
    /// `(address, name)`, sorted by address; for equal addresses, the first given wins.
    entries: Vec<(u64, String)>,
    /// The name the frames give as their module (the program's file name).
    pub dso: String,
}

fn is_local(name: &str) -> bool {
    name.starts_with('.')
}

impl Symbols {
    pub fn new(dso: &str, symbols: impl IntoIterator<Item = (String, u64)>) -> Symbols {
        let mut entries: Vec<(u64, String)> = symbols
            .into_iter()
            .map(|(name, addr)| (addr, name))
            .collect();
        entries.sort_by_key(|(addr, _)| *addr);
        entries.dedup_by_key(|(addr, _)| *addr);
        Symbols {
            entries,
            dso: dso.to_string(),
        }
    }

    /// The function holding `pc` and the offset into it.
    pub fn function(&self, pc: u64) -> Option<(&str, u64)> {
        let end = self.entries.partition_point(|(addr, _)| *addr <= pc);
        self.entries[..end]
            .iter()
            .rev()
            .find(|(_, name)| !is_local(name))
            .map(|(addr, name)| (name.as_str(), pc - addr))
    }

    /// The local label `pc` runs under, if the nearest symbol is one.
    pub fn label(&self, pc: u64) -> Option<(&str, u64)> {
        let end = self.entries.partition_point(|(addr, _)| *addr <= pc);
        let (addr, name) = end.checked_sub(1).map(|last| &self.entries[last])?;
        is_local(name).then(|| (name.as_str(), pc - addr))
    }
}

/// What the text's header says.
pub struct Header<'a> {
    pub program: &'a str,
    pub hz: u32,
    pub nodes: u32,
}

/// Writes `samples` as `perf script` text (sorted by time, then node and worker).
pub fn perf_script(header: &Header<'_>, symbols: &Symbols, samples: &mut [Sample]) -> String {
    samples.sort_by_key(|s| (s.time_ns, s.place.node, s.place.worker));
    let period_ns = 1_000_000_000 / u64::from(header.hz.max(1));
    let mut out = String::with_capacity(samples.len() * 96 + 256);
    let _ = writeln!(
        out,
        "# DVM guest profile of {} ({} node{}): `perf script` text; pid = DVM node, tid = worker, cpu = processor.",
        header.program,
        header.nodes,
        if header.nodes == 1 { "" } else { "s" }
    );
    let _ = writeln!(
        out,
        "# {} Hz per worker; frames are DISA functions (with the local label of the sampled PC) and DVM's own phases in [brackets].",
        header.hz
    );
    for s in samples.iter() {
        let _ = writeln!(
            out,
            "dvm {}/{} [{:03}] {}.{:06}: {} cpu-clock:",
            s.place.node,
            s.place.worker,
            s.place.pu,
            s.time_ns / 1_000_000_000,
            (s.time_ns % 1_000_000_000) / 1000,
            period_ns
        );
        match s.what {
            What::Phase(phase) => {
                let _ = writeln!(out, "\t{:>16x} {} (dvm)", 0, phase.frame());
            }
            What::Program(attempt) => {
                for (depth, pc) in s.stack.iter().enumerate() {
                    if depth == 0 {
                        if let (Some((label, off)), Some((function, _))) =
                            (symbols.label(*pc), symbols.function(*pc))
                        {
                            let _ = writeln!(
                                out,
                                "\t{pc:>16x} {function}/{label}+{off:#x} ({})",
                                symbols.dso
                            );
                        }
                    }
                    match symbols.function(*pc) {
                        Some((name, off)) => {
                            let _ = writeln!(out, "\t{pc:>16x} {name}+{off:#x} ({})", symbols.dso);
                        }
                        None => {
                            let _ = writeln!(out, "\t{pc:>16x} [unknown] ({})", symbols.dso);
                        }
                    }
                }
                if let Some(frame) = attempt.frame() {
                    let _ = writeln!(out, "\t{:>16x} {frame} (dvm)", 0);
                }
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn symbols() -> Symbols {
        Symbols::new(
            "k.dasm",
            [
                ("main".to_string(), 0x100),
                (".Lloop".to_string(), 0x120),
                ("partition".to_string(), 0x200),
                (".Lcoord".to_string(), 0x240),
                ("alias".to_string(), 0x200),
            ],
        )
    }

    #[test]
    fn functions_and_labels() {
        let s = symbols();
        assert_eq!(s.function(0x128), Some(("main", 0x28)));
        assert_eq!(s.label(0x128), Some((".Lloop", 0x8)));
        assert_eq!(s.function(0x248), Some(("partition", 0x48)));
        assert_eq!(s.label(0x208), None);
        assert_eq!(s.function(0x50), None);
    }

    fn samples() -> Vec<Sample> {
        vec![
            Sample {
                time_ns: 2_000_000,
                place: WorkerPlace {
                    node: 1,
                    worker: 2,
                    pu: 3,
                },
                what: What::Program(Attempt::Aborted),
                stack: vec![0x248, 0x110],
            },
            Sample {
                time_ns: 1_000_000,
                place: WorkerPlace::default(),
                what: What::Phase(Phase::Commit),
                stack: vec![],
            },
        ]
    }

    #[test]
    fn wire_round_trip_and_garbage() {
        let samples = samples();
        let bytes = encode(&samples);
        assert_eq!(decode(&bytes), Ok(samples));
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Truncated { .. })
        ));
        let mut bad = bytes.clone();
        bad[8 + 8 + 12] = 9;
        assert_eq!(decode(&bad), Err(DecodeError::Kind { index: 0, kind: 9 }));
        let mut huge = bytes;
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode(&huge).is_err());
    }

    #[test]
    fn text_is_what_perf_script_prints() {
        let mut samples = samples();
        let text = perf_script(
            &Header {
                program: "k.dasm",
                hz: 1000,
                nodes: 2,
            },
            &symbols(),
            &mut samples,
        );
        let events: Vec<&str> = text.lines().filter(|l| l.starts_with("dvm ")).collect();
        assert_eq!(
            events,
            [
                "dvm 0/0 [000] 0.001000: 1000000 cpu-clock:",
                "dvm 1/2 [003] 0.002000: 1000000 cpu-clock:"
            ]
        );
        assert!(text.contains("\t               0 [dvm commit] (dvm)\n"));
        assert!(text.contains("\t             248 partition/.Lcoord+0x8 (k.dasm)\n"));
        assert!(text.contains("\t             248 partition+0x48 (k.dasm)\n"));
        assert!(text.contains("\t             110 main+0x10 (k.dasm)\n"));
        assert!(text.contains("\t               0 [aborted attempt] (dvm)\n\n"));
    }
}
