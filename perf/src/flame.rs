//! Folded stacks and flame graphs from `perf script` text (DVM's guest profiles, or `perf
//! script` of a host `perf record`), with `inferno`.

use inferno::collapse::Collapse as _;
use std::io;

/// `perf script` text to folded stacks (`a;b;c count`), as `inferno-collapse-perf` makes them.
pub fn fold(perf_script: &[u8]) -> io::Result<Vec<String>> {
    let mut folded = Vec::new();
    let mut folder = inferno::collapse::perf::Folder::default();
    folder.collapse(perf_script, &mut folded)?;
    let text = String::from_utf8(folded)
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err.to_string()))?;
    Ok(text.lines().map(str::to_string).collect())
}

/// An SVG flame graph of folded stacks.
pub fn svg(folded: &[String], title: &str, out: impl io::Write) -> io::Result<()> {
    let mut options = inferno::flamegraph::Options::default();
    options.title = title.to_string();
    options.count_name = "samples".to_string();
    inferno::flamegraph::from_lines(&mut options, folded.iter().map(String::as_str), out)
        .map_err(|err| io::Error::other(err.to_string()))
}

/// A frame's share of the samples.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameWidth {
    pub frame: String,
    /// Samples with this frame anywhere on their stack (a flame graph's width).
    pub total: u64,
    /// Samples with this frame innermost.
    pub own: u64,
}

/// Frames by width, widest first (the process-name root frame left out).
pub fn widths(folded: &[String]) -> (u64, Vec<FrameWidth>) {
    let mut by_frame: std::collections::HashMap<&str, (u64, u64)> = Default::default();
    let mut all = 0u64;
    for line in folded {
        let Some((stack, count)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(count) = count.parse::<u64>() else {
            continue;
        };
        all += count;
        let frames: Vec<&str> = stack.split(';').skip(1).collect();
        let mut seen: Vec<&str> = Vec::with_capacity(frames.len());
        for frame in &frames {
            if !seen.contains(frame) {
                seen.push(frame);
                by_frame.entry(frame).or_default().0 += count;
            }
        }
        if let Some(leaf) = frames.last() {
            by_frame.entry(leaf).or_default().1 += count;
        }
    }
    let mut widths: Vec<FrameWidth> = by_frame
        .into_iter()
        .map(|(frame, (total, own))| FrameWidth {
            frame: frame.to_string(),
            total,
            own,
        })
        .collect();
    widths.sort_by(|a, b| b.total.cmp(&a.total).then(a.frame.cmp(&b.frame)));
    (all, widths)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = "# a comment\n\
dvm 0/0 [000] 0.001000: 1000000 cpu-clock:\n\
\t             248 partition/.Lcoord+0x8 (k.dasm)\n\
\t             248 partition+0x48 (k.dasm)\n\
\t             110 main+0x10 (k.dasm)\n\
\n\
dvm 0/1 [001] 0.001000: 1000000 cpu-clock:\n\
\t             248 partition/.Lcoord+0x8 (k.dasm)\n\
\t             248 partition+0x48 (k.dasm)\n\
\t             110 main+0x10 (k.dasm)\n\
\n\
dvm 0/1 [001] 0.002000: 1000000 cpu-clock:\n\
\t               0 [dvm commit] (dvm)\n\
\n";

    #[test]
    fn folds_and_measures_widths() {
        let folded = fold(SCRIPT.as_bytes()).expect("folds");
        assert_eq!(
            folded,
            [
                "dvm;[dvm commit] 1000000",
                "dvm;main;partition;partition/.Lcoord 2000000"
            ]
        );
        let (all, widths) = widths(&folded);
        assert_eq!(all, 3_000_000);
        assert_eq!(widths[0].frame, "main");
        assert_eq!(widths[0].total, 2_000_000);
        let coord = widths
            .iter()
            .find(|w| w.frame == "partition/.Lcoord")
            .expect("the loop frame");
        assert_eq!((coord.total, coord.own), (2_000_000, 2_000_000));
        let mut out = Vec::new();
        svg(&folded, "test", &mut out).expect("renders");
        let svg = String::from_utf8(out).expect("utf-8");
        assert!(svg.contains("<svg") && svg.contains("partition/.Lcoord"));
    }
}
