//! Slurm's compressed host lists, as found in `SLURM_STEP_NODELIST`.
//!
//! Grammar: comma-separated items; an item is host-name text with any number of bracket groups,
//! each a comma-separated list of `N` or `LO-HI` (decimal). The zero padding of `LO` sets the
//! width (`n[01-10]` gives `n01`..`n10`). Several groups expand as a cartesian product, leftmost
//! slowest (`a[1-2]-b[1-2]` gives `a1-b1 a1-b2 a2-b1 a2-b2`), as Slurm does.
//!
//! Invariants: parsing never panics, and the expansion is bounded by `MAX_HOSTS` hosts, checked
//! before anything is expanded. Errors name the byte offset and what was expected there.

use thiserror::Error;

/// Largest list `parse` expands.
pub const MAX_HOSTS: usize = 65_536;

/// Longest list text accepted, in bytes.
pub const MAX_LIST_BYTES: usize = 64 * 1024;

/// Numbers inside brackets: at most this many digits, so they fit a `u64` with room.
const MAX_DIGITS: usize = 18;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("malformed host list \"{shown}\": {why} at byte {offset}")]
pub struct HostlistError {
    /// The list, shortened if long.
    pub shown: String,
    pub offset: usize,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Text(String),
    /// (value, width) of every number the group stands for is derived from these ranges.
    Ranges(Vec<Range>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Range {
    lo: u64,
    hi: u64,
    width: usize,
}

impl Range {
    fn len(&self) -> u64 {
        self.hi - self.lo + 1
    }
}

/// Expands a Slurm host list into its host names, in order.
pub fn parse(list: &str) -> Result<Vec<String>, HostlistError> {
    let err = |offset: usize, why: String| HostlistError {
        shown: shorten(list),
        offset,
        why,
    };
    if list.len() > MAX_LIST_BYTES {
        return Err(err(
            MAX_LIST_BYTES,
            format!("longer than {MAX_LIST_BYTES} bytes"),
        ));
    }
    if list.is_empty() {
        return Err(err(0, "empty list".to_string()));
    }
    let mut items: Vec<Vec<Segment>> = Vec::new();
    let mut total: u64 = 0;
    for (start, item) in split_items(list).map_err(|(o, why)| err(o, why))? {
        let segments = parse_item(item, start).map_err(|(o, why)| err(o, why))?;
        let count = segments.iter().try_fold(1u64, |acc, seg| match seg {
            Segment::Text(_) => Some(acc),
            Segment::Ranges(ranges) => {
                let n = ranges
                    .iter()
                    .try_fold(0u64, |a, r| a.checked_add(r.len()))?;
                acc.checked_mul(n)
            }
        });
        total = count
            .and_then(|c| total.checked_add(c))
            .filter(|t| *t <= MAX_HOSTS as u64)
            .ok_or_else(|| err(start, format!("expands to more than {MAX_HOSTS} hosts")))?;
        items.push(segments);
    }
    let mut hosts = Vec::new();
    for segments in &items {
        expand(segments, String::new(), &mut hosts);
    }
    Ok(hosts)
}

/// The first host of a list; the whole list is validated, so a typo anywhere is reported.
pub fn first(list: &str) -> Result<String, HostlistError> {
    let hosts = parse(list)?;
    hosts.into_iter().next().ok_or_else(|| HostlistError {
        shown: shorten(list),
        offset: 0,
        why: "no host in the list".to_string(),
    })
}

fn shorten(list: &str) -> String {
    const SHOWN: usize = 120;
    if list.len() <= SHOWN {
        return list.to_string();
    }
    let mut end = SHOWN;
    while !list.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &list.get(..end).unwrap_or_default())
}

/// Splits at commas outside brackets; yields each item with its byte offset.
#[allow(clippy::type_complexity)]
fn split_items(list: &str) -> Result<Vec<(usize, &str)>, (usize, String)> {
    let mut items = Vec::new();
    let mut depth_open: Option<usize> = None;
    let mut start = 0;
    for (i, c) in list.char_indices() {
        match c {
            '[' => {
                if let Some(open) = depth_open {
                    return Err((i, format!("'[' inside the group opened at byte {open}")));
                }
                depth_open = Some(i);
            }
            ']' if depth_open.is_none() => {
                return Err((i, "']' without a matching '['".to_string()));
            }
            ']' => depth_open = None,
            ',' if depth_open.is_none() => {
                items.push((start, list.get(start..i).unwrap_or_default()));
                start = i + 1;
            }
            _ => {}
        }
    }
    if let Some(open) = depth_open {
        return Err((open, "'[' never closed".to_string()));
    }
    items.push((start, list.get(start..).unwrap_or_default()));
    Ok(items)
}

fn parse_item(item: &str, base: usize) -> Result<Vec<Segment>, (usize, String)> {
    if item.is_empty() {
        return Err((base, "empty host name (two commas in a row?)".to_string()));
    }
    let mut segments = Vec::new();
    let mut rest = item;
    let mut offset = base;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('[') {
            // split_items guarantees a matching ']'.
            let close = after
                .find(']')
                .ok_or((offset, "'[' never closed".to_string()))?;
            let inner = after.get(..close).unwrap_or_default();
            segments.push(Segment::Ranges(parse_ranges(inner, offset + 1)?));
            rest = after.get(close + 1..).unwrap_or_default();
            offset += close + 2;
        } else {
            let end = rest.find('[').unwrap_or(rest.len());
            let text = rest.get(..end).unwrap_or_default();
            if let Some((i, c)) = text
                .char_indices()
                .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
            {
                return Err((offset + i, format!("{c:?} is not allowed in a host name")));
            }
            segments.push(Segment::Text(text.to_string()));
            rest = rest.get(end..).unwrap_or_default();
            offset += end;
        }
    }
    Ok(segments)
}

fn parse_ranges(inner: &str, base: usize) -> Result<Vec<Range>, (usize, String)> {
    let mut ranges = Vec::new();
    let mut offset = base;
    for part in inner.split(',') {
        let (lo_text, hi_text) = match part.split_once('-') {
            Some((lo, hi)) => (lo, Some(hi)),
            None => (part, None),
        };
        let lo = number(lo_text, offset)?;
        let hi = match hi_text {
            Some(h) => number(h, offset + lo_text.len() + 1)?,
            None => lo,
        };
        if hi < lo {
            return Err((
                offset,
                format!("range {lo_text}-{} goes down", hi_text.unwrap_or("")),
            ));
        }
        ranges.push(Range {
            lo,
            hi,
            width: lo_text.len(),
        });
        offset += part.len() + 1;
    }
    Ok(ranges)
}

fn number(text: &str, offset: usize) -> Result<u64, (usize, String)> {
    if text.is_empty() {
        return Err((offset, "expected a number".to_string()));
    }
    if let Some((i, c)) = text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        return Err((offset + i, format!("expected a digit, found {c:?}")));
    }
    if text.len() > MAX_DIGITS {
        return Err((
            offset,
            format!("number {text} has more than {MAX_DIGITS} digits"),
        ));
    }
    text.parse::<u64>()
        .map_err(|e| (offset, format!("number {text}: {e}")))
}

fn expand(segments: &[Segment], prefix: String, out: &mut Vec<String>) {
    match segments.split_first() {
        None => out.push(prefix),
        Some((Segment::Text(text), rest)) => expand(rest, prefix + text, out),
        Some((Segment::Ranges(ranges), rest)) => {
            for r in ranges {
                for v in r.lo..=r.hi {
                    expand(rest, format!("{prefix}{v:0width$}", width = r.width), out);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(list: &str) -> Vec<String> {
        parse(list).expect("valid host list")
    }

    #[test]
    fn expands_the_usual_forms() {
        assert_eq!(ok("h1"), ["h1"]);
        assert_eq!(ok("h[1-3,7]"), ["h1", "h2", "h3", "h7"]);
        assert_eq!(ok("n[01-03],n[09-10]"), ["n01", "n02", "n03", "n09", "n10"]);
        assert_eq!(ok("n[8-10]"), ["n8", "n9", "n10"]);
        assert_eq!(
            ok("a,b[2-3],c.example.org"),
            ["a", "b2", "b3", "c.example.org"]
        );
        assert_eq!(ok("a[1-2]-b[1-2]"), ["a1-b1", "a1-b2", "a2-b1", "a2-b2"]);
        assert_eq!(ok("rack[1]-n[001-2]x"), ["rack1-n001x", "rack1-n002x"]);
        assert_eq!(first("gpu[3-4],cpu1").expect("valid"), "gpu3");
    }

    #[test]
    fn malformed_lists_are_refused_precisely() {
        let e = |list: &str| parse(list).expect_err("malformed list");
        let cases: &[(&str, usize, &str)] = &[
            ("", 0, "empty list"),
            ("h1,,h2", 3, "empty host name"),
            ("h1,", 3, "empty host name"),
            ("h[1-3", 1, "never closed"),
            ("h1-3]", 4, "without a matching"),
            ("h[1-[2]]", 4, "inside the group"),
            ("h[]", 2, "expected a number"),
            ("h[3-1]", 2, "goes down"),
            ("h[1-x]", 4, "expected a digit"),
            ("h[1,,2]", 4, "expected a number"),
            ("h 1", 1, "not allowed"),
            ("h[0-99999999]", 0, "more than 65536 hosts"),
            ("h[1234567890123456789]", 2, "more than 18 digits"),
        ];
        for (list, offset, why) in cases {
            let err = e(list);
            assert_eq!(err.offset, *offset, "{list}: {err}");
            assert!(err.to_string().contains(why), "{list}: {err}");
        }
    }

    #[test]
    fn limit_counts_the_product_before_expanding() {
        let err = parse("a[1-1000]b[1-1000]").expect_err("a million hosts");
        assert!(err.to_string().contains("more than"), "{err}");
        assert_eq!(ok("a[1-256]b[1-256]").len(), 65_536);
    }

    proptest! {
        #[test]
        fn random_text_never_panics(list in "[a-c0-9\\[\\],\\- ]{0,40}") {
            let _ = parse(&list);
        }

        #[test]
        fn random_unicode_never_panics(list in "\\PC{0,40}") {
            let _ = parse(&list);
        }

        #[test]
        fn ranges_expand_to_every_number(prefix in "[a-z]{1,5}", lo in 0u64..500, n in 1u64..50) {
            let hi = lo + n - 1;
            let hosts = parse(&format!("{prefix}[{lo}-{hi}]")).expect("valid generated list");
            let want: Vec<String> = (lo..=hi).map(|v| format!("{prefix}{v}")).collect();
            prop_assert_eq!(hosts, want);
        }
    }
}
