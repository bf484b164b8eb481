//! Runners and their endings as bytes: tasks sent to the node that runs them, and endings —
//! fault reports, conflicts, children, output — sent to node 0, which applies them in commit
//! order and prints the console.
//!
//! The typed values cross the wire, not their text. The encoding is explicit little-endian with
//! a tag byte per variant and length-prefixed, bounded strings and lists; decoding untrusted
//! bytes returns a typed error naming the offset, never panics.

use crate::interp::{ChildSpec, Ending, Fault, FaultKind, MAX_OUTPUT_BYTES};
use crate::isa::ExitMode;
use crate::page::{Mask, EMPTY_MASK};
use crate::runner::{Ended, Outcome, Task, TaskKind};
use crate::store::{Change, Changed, Conflict, ConflictWith};
use crate::view::Range;

/// Most ranges, children or page changes in one encoded value.
pub const MAX_ITEMS: usize = 1 << 20;

/// Longest reason string carried (a fault reason is one line of text).
pub const MAX_REASON_BYTES: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReportDecodeError {
    #[error("report truncated at byte {offset}: {needed} more bytes needed")]
    Truncated { offset: usize, needed: usize },
    #[error("unknown {what} tag {tag} at byte {offset}")]
    UnknownTag {
        what: &'static str,
        tag: u8,
        offset: usize,
    },
    #[error("reason of {len_bytes} bytes at byte {offset} exceeds {MAX_REASON_BYTES}")]
    ReasonTooLong { len_bytes: usize, offset: usize },
    #[error("reason at byte {offset} is not UTF-8")]
    ReasonNotUtf8 { offset: usize },
    #[error("{what} count {count} at byte {offset} exceeds {limit}")]
    TooMany {
        what: &'static str,
        count: u64,
        limit: usize,
        offset: usize,
    },
    #[error("empty or reversed range at byte {offset}")]
    BadRange { offset: usize },
    #[error("byte offset {value} at byte {offset} is outside a page")]
    BadPageOffset { value: u64, offset: usize },
    #[error("flag {value} at byte {offset} is neither 0 nor 1")]
    BadFlag { value: u8, offset: usize },
    #[error("{extra} bytes after the value")]
    Trailing { extra: usize },
}

struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl Reader<'_> {
    fn take(&mut self, len: usize) -> Result<&[u8], ReportDecodeError> {
        let end = self.offset.saturating_add(len);
        let slice = self
            .bytes
            .get(self.offset..end)
            .ok_or(ReportDecodeError::Truncated {
                offset: self.offset,
                needed: end.saturating_sub(self.bytes.len()),
            })?;
        self.offset = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, ReportDecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, ReportDecodeError> {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(raw))
    }

    fn reason(&mut self) -> Result<String, ReportDecodeError> {
        let at = self.offset;
        let len = usize::try_from(self.u64()?).unwrap_or(usize::MAX);
        if len > MAX_REASON_BYTES {
            return Err(ReportDecodeError::ReasonTooLong {
                len_bytes: len,
                offset: at,
            });
        }
        let text = self.take(len)?;
        String::from_utf8(text.to_vec())
            .map_err(|_| ReportDecodeError::ReasonNotUtf8 { offset: at })
    }
}

impl Reader<'_> {
    fn count(&mut self, what: &'static str, limit: usize) -> Result<usize, ReportDecodeError> {
        let offset = self.offset;
        let count = self.u64()?;
        usize::try_from(count)
            .ok()
            .filter(|count| *count <= limit)
            .ok_or(ReportDecodeError::TooMany {
                what,
                count,
                limit,
                offset,
            })
    }

    fn flag(&mut self) -> Result<bool, ReportDecodeError> {
        let offset = self.offset;
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(ReportDecodeError::BadFlag { value, offset }),
        }
    }

    fn range(&mut self) -> Result<Range, ReportDecodeError> {
        let offset = self.offset;
        let (start, end) = (self.u64()?, self.u64()?);
        if start >= end {
            return Err(ReportDecodeError::BadRange { offset });
        }
        Ok(Range { start, end })
    }

    fn ranges(&mut self) -> Result<Vec<Range>, ReportDecodeError> {
        let count = self.count("range", MAX_ITEMS)?;
        (0..count).map(|_| self.range()).collect()
    }

    fn mask(&mut self) -> Result<Box<Mask>, ReportDecodeError> {
        let mut mask = Box::new(EMPTY_MASK);
        for word in mask.iter_mut() {
            *word = self.u64()?;
        }
        Ok(mask)
    }

    fn changes(&mut self) -> Result<Vec<Change>, ReportDecodeError> {
        let count = self.count("page change", MAX_ITEMS)?;
        (0..count)
            .map(|_| Ok((self.u64()?, Changed::of_mask(&*self.mask()?))))
            .collect()
    }

    fn fault(&mut self) -> Result<Fault, ReportDecodeError> {
        let (fault, used) =
            decode_fault(&self.bytes[self.offset..]).map_err(|err| shift(err, self.offset))?;
        self.offset += used;
        Ok(fault)
    }

    fn task(&mut self) -> Result<Task, ReportDecodeError> {
        let id = self.u64()?;
        let at = self.offset;
        let kind = match self.u8()? {
            0 => TaskKind::Root,
            1 => TaskKind::Child,
            2 => TaskKind::Instance(self.u64()?),
            tag => {
                return Err(ReportDecodeError::UnknownTag {
                    what: "task kind",
                    tag,
                    offset: at,
                })
            }
        };
        let entry = self.u64()?;
        let space = self.u64()?;
        let stack = self.range()?;
        let using = self.ranges()?;
        let watched = self.ranges()?;
        let snapshot = match self.flag()? {
            false => None,
            true => Some(self.u64()?),
        };
        Ok(Task {
            id,
            kind,
            entry,
            space,
            stack,
            using,
            watched,
            snapshot,
        })
    }

    fn child(&mut self) -> Result<ChildSpec, ReportDecodeError> {
        Ok(ChildSpec {
            id: self.u64()?,
            entry: self.u64()?,
            space: self.u64()?,
            stack: self.range()?,
            using: self.ranges()?,
            watched: self.ranges()?,
        })
    }

    fn finish(self) -> Result<(), ReportDecodeError> {
        match self.bytes.len() - self.offset {
            0 => Ok(()),
            extra => Err(ReportDecodeError::Trailing { extra }),
        }
    }
}

/// An error found `offset` bytes into a value decoded inside another.
fn shift(err: ReportDecodeError, by: usize) -> ReportDecodeError {
    match err {
        ReportDecodeError::Truncated { offset, needed } => ReportDecodeError::Truncated {
            offset: offset + by,
            needed,
        },
        ReportDecodeError::UnknownTag { what, tag, offset } => ReportDecodeError::UnknownTag {
            what,
            tag,
            offset: offset + by,
        },
        ReportDecodeError::ReasonTooLong { len_bytes, offset } => {
            ReportDecodeError::ReasonTooLong {
                len_bytes,
                offset: offset + by,
            }
        }
        ReportDecodeError::ReasonNotUtf8 { offset } => ReportDecodeError::ReasonNotUtf8 {
            offset: offset + by,
        },
        ReportDecodeError::TooMany {
            what,
            count,
            limit,
            offset,
        } => ReportDecodeError::TooMany {
            what,
            count,
            limit,
            offset: offset + by,
        },
        ReportDecodeError::BadRange { offset } => ReportDecodeError::BadRange {
            offset: offset + by,
        },
        other => other,
    }
}

fn put_range(out: &mut Vec<u8>, range: &Range) {
    put_u64(out, range.start);
    put_u64(out, range.end);
}

fn put_ranges(out: &mut Vec<u8>, ranges: &[Range]) {
    put_u64(out, ranges.len() as u64);
    for range in ranges {
        put_range(out, range);
    }
}

fn put_changes(out: &mut Vec<u8>, changes: &[Change]) {
    put_u64(out, changes.len() as u64);
    for (key, changed) in changes {
        put_u64(out, *key);
        // As a mask: the wire format does not depend on how the engine keeps the bytes.
        for word in changed.to_mask().iter() {
            put_u64(out, *word);
        }
    }
}

fn put_task(out: &mut Vec<u8>, task: &Task) {
    put_u64(out, task.id);
    match task.kind {
        TaskKind::Root => out.push(0),
        TaskKind::Child => out.push(1),
        TaskKind::Instance(template) => {
            out.push(2);
            put_u64(out, template);
        }
    }
    put_u64(out, task.entry);
    put_u64(out, task.space);
    put_range(out, &task.stack);
    put_ranges(out, &task.using);
    put_ranges(out, &task.watched);
    match task.snapshot {
        None => out.push(0),
        Some(ts) => {
            out.push(1);
            put_u64(out, ts);
        }
    }
}

/// A task, for the node that will run it.
pub fn encode_task(task: &Task) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    put_task(&mut out, task);
    out
}

pub fn decode_task(bytes: &[u8]) -> Result<Task, ReportDecodeError> {
    let mut r = Reader { bytes, offset: 0 };
    let task = r.task()?;
    r.finish()?;
    Ok(task)
}

/// An ending, for node 0, which applies it in commit order.
pub fn encode_ended(ended: &Ended) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + ended.output.len());
    put_task(&mut out, &ended.task);
    put_u64(&mut out, ended.snapshot);
    match &ended.ending {
        Ending::Exit(mode) => {
            out.push(0);
            out.push(mode.code());
        }
        Ending::Fault(fault) => {
            out.push(1);
            encode_fault(fault, &mut out);
        }
    }
    match &ended.outcome {
        Outcome::Committed { changes } => {
            out.push(0);
            put_changes(&mut out, changes);
        }
        Outcome::Aborted => out.push(1),
        Outcome::Failed(conflict) => {
            out.push(2);
            encode_conflict(conflict, &mut out);
        }
        Outcome::Faulted(fault) => {
            out.push(3);
            encode_fault(fault, &mut out);
        }
    }
    put_u64(&mut out, ended.children.len() as u64);
    for child in &ended.children {
        put_u64(&mut out, child.id);
        put_u64(&mut out, child.entry);
        put_u64(&mut out, child.space);
        put_range(&mut out, &child.stack);
        put_ranges(&mut out, &child.using);
        put_ranges(&mut out, &child.watched);
    }
    put_changes(&mut out, &ended.exit_changes);
    put_u64(&mut out, ended.output.len() as u64);
    out.extend_from_slice(&ended.output);
    out.push(u8::from(ended.ends_template));
    out
}

pub fn decode_ended(bytes: &[u8]) -> Result<Ended, ReportDecodeError> {
    let mut r = Reader { bytes, offset: 0 };
    let task = r.task()?;
    let snapshot = r.u64()?;
    let at = r.offset;
    let ending = match r.u8()? {
        0 => {
            let at = r.offset;
            let code = r.u8()?;
            Ending::Exit(
                ExitMode::from_code(code).ok_or(ReportDecodeError::UnknownTag {
                    what: "exit mode",
                    tag: code,
                    offset: at,
                })?,
            )
        }
        1 => Ending::Fault(r.fault()?),
        tag => {
            return Err(ReportDecodeError::UnknownTag {
                what: "ending",
                tag,
                offset: at,
            })
        }
    };
    let at = r.offset;
    let outcome = match r.u8()? {
        0 => Outcome::Committed {
            changes: r.changes()?,
        },
        1 => Outcome::Aborted,
        2 => {
            let (conflict, used) =
                decode_conflict(&bytes[r.offset..]).map_err(|err| shift(err, r.offset))?;
            r.offset += used;
            Outcome::Failed(conflict)
        }
        3 => Outcome::Faulted(r.fault()?),
        tag => {
            return Err(ReportDecodeError::UnknownTag {
                what: "outcome",
                tag,
                offset: at,
            })
        }
    };
    let count = r.count("child", MAX_ITEMS)?;
    let children = (0..count).map(|_| r.child()).collect::<Result<_, _>>()?;
    let exit_changes = r.changes()?;
    let len = r.count("output byte", MAX_OUTPUT_BYTES)?;
    let output = r.take(len)?.to_vec();
    let ends_template = r.flag()?;
    r.finish()?;
    Ok(Ended {
        task,
        snapshot,
        ending,
        outcome,
        children,
        exit_changes,
        output,
        ends_template,
    })
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_reason(out: &mut Vec<u8>, reason: &str) {
    // Truncated on a character boundary rather than refused: a report is never lost.
    let mut end = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    put_u64(out, end as u64);
    out.extend_from_slice(&reason.as_bytes()[..end]);
}

/// Appends `fault` (its PC and kind).
pub fn encode_fault(fault: &Fault, out: &mut Vec<u8>) {
    put_u64(out, fault.pc);
    match &fault.kind {
        FaultKind::DivisionByZero => out.push(0),
        FaultKind::DivisionOverflow => out.push(1),
        FaultKind::NotAllowed { addr, len } => {
            out.push(2);
            put_u64(out, *addr);
            put_u64(out, *len);
        }
        FaultKind::Unmapped { addr } => {
            out.push(3);
            put_u64(out, *addr);
        }
        FaultKind::ReadOnly { addr } => {
            out.push(4);
            put_u64(out, *addr);
        }
        FaultKind::InvalidInstruction { reason } => {
            out.push(5);
            put_reason(out, reason);
        }
        FaultKind::InstructionLimit { limit } => {
            out.push(6);
            put_u64(out, *limit);
        }
        FaultKind::MemoryLimit { addr, limit_bytes } => {
            out.push(7);
            put_u64(out, *addr);
            put_u64(out, *limit_bytes);
        }
        FaultKind::RunnerLimit { reason } => {
            out.push(8);
            put_reason(out, reason);
        }
        FaultKind::SystemCall { reason } => {
            out.push(9);
            put_reason(out, reason);
        }
        FaultKind::BadSpawnDescriptor { reason } => {
            out.push(10);
            put_reason(out, reason);
        }
        FaultKind::OutputLimit => out.push(11),
        FaultKind::Internal { reason } => {
            out.push(12);
            put_reason(out, reason);
        }
    }
}

/// Decodes a fault written by `encode_fault`; returns it and the bytes it took.
pub fn decode_fault(bytes: &[u8]) -> Result<(Fault, usize), ReportDecodeError> {
    let mut r = Reader { bytes, offset: 0 };
    let pc = r.u64()?;
    let at = r.offset;
    let kind = match r.u8()? {
        0 => FaultKind::DivisionByZero,
        1 => FaultKind::DivisionOverflow,
        2 => FaultKind::NotAllowed {
            addr: r.u64()?,
            len: r.u64()?,
        },
        3 => FaultKind::Unmapped { addr: r.u64()? },
        4 => FaultKind::ReadOnly { addr: r.u64()? },
        5 => FaultKind::InvalidInstruction {
            reason: r.reason()?,
        },
        6 => FaultKind::InstructionLimit { limit: r.u64()? },
        7 => FaultKind::MemoryLimit {
            addr: r.u64()?,
            limit_bytes: r.u64()?,
        },
        8 => FaultKind::RunnerLimit {
            reason: r.reason()?,
        },
        9 => FaultKind::SystemCall {
            reason: r.reason()?,
        },
        10 => FaultKind::BadSpawnDescriptor {
            reason: r.reason()?,
        },
        11 => FaultKind::OutputLimit,
        12 => FaultKind::Internal {
            reason: r.reason()?,
        },
        tag => {
            return Err(ReportDecodeError::UnknownTag {
                what: "fault",
                tag,
                offset: at,
            })
        }
    };
    Ok((Fault { kind, pc }, r.offset))
}

/// Appends `conflict`.
pub fn encode_conflict(conflict: &Conflict, out: &mut Vec<u8>) {
    put_u64(out, conflict.key);
    put_u64(out, conflict.offset as u64);
    match conflict.with {
        ConflictWith::Committed { ts } => {
            out.push(0);
            put_u64(out, ts);
        }
        ConflictWith::Prepared { txn } => {
            out.push(1);
            put_u64(out, txn);
        }
    }
}

/// Decodes a conflict written by `encode_conflict`; returns it and the bytes it took.
pub fn decode_conflict(bytes: &[u8]) -> Result<(Conflict, usize), ReportDecodeError> {
    let mut r = Reader { bytes, offset: 0 };
    let key = r.u64()?;
    let at = r.offset;
    let value = r.u64()?;
    let offset = usize::try_from(value)
        .ok()
        .filter(|offset| *offset < crate::page::PAGE_BYTES)
        .ok_or(ReportDecodeError::BadPageOffset { value, offset: at })?;
    let at = r.offset;
    let with = match r.u8()? {
        0 => ConflictWith::Committed { ts: r.u64()? },
        1 => ConflictWith::Prepared { txn: r.u64()? },
        tag => {
            return Err(ReportDecodeError::UnknownTag {
                what: "conflict",
                tag,
                offset: at,
            })
        }
    };
    Ok((Conflict { key, offset, with }, r.offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kinds() -> impl Strategy<Value = FaultKind> {
        let reason = "[ -~é]{0,40}";
        prop_oneof![
            Just(FaultKind::DivisionByZero),
            Just(FaultKind::DivisionOverflow),
            (any::<u64>(), any::<u64>())
                .prop_map(|(addr, len)| FaultKind::NotAllowed { addr, len }),
            any::<u64>().prop_map(|addr| FaultKind::Unmapped { addr }),
            any::<u64>().prop_map(|addr| FaultKind::ReadOnly { addr }),
            reason.prop_map(|reason| FaultKind::InvalidInstruction { reason }),
            any::<u64>().prop_map(|limit| FaultKind::InstructionLimit { limit }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(addr, limit_bytes)| FaultKind::MemoryLimit { addr, limit_bytes }),
            reason.prop_map(|reason| FaultKind::RunnerLimit { reason }),
            reason.prop_map(|reason| FaultKind::SystemCall { reason }),
            reason.prop_map(|reason| FaultKind::BadSpawnDescriptor { reason }),
            Just(FaultKind::OutputLimit),
            reason.prop_map(|reason| FaultKind::Internal { reason }),
        ]
    }

    proptest! {
        #[test]
        fn every_fault_round_trips(kind in kinds(), pc in any::<u64>()) {
            let fault = Fault { kind, pc };
            let mut bytes = Vec::new();
            encode_fault(&fault, &mut bytes);
            prop_assert_eq!(decode_fault(&bytes), Ok((fault, bytes.len())));
            for cut in 0..bytes.len() {
                let truncated = decode_fault(&bytes[..cut]);
                prop_assert!(
                    matches!(truncated, Err(ReportDecodeError::Truncated { .. })),
                    "cut at {} decoded as {:?}", cut, truncated
                );
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_fault(&bytes);
            let _ = decode_conflict(&bytes);
            let _ = decode_task(&bytes);
            let _ = decode_ended(&bytes);
        }

        #[test]
        fn conflicts_round_trip(key in any::<u64>(), offset in 0usize..4096, ts in any::<u64>(), prepared in any::<bool>()) {
            let with = if prepared { ConflictWith::Prepared { txn: ts } } else { ConflictWith::Committed { ts } };
            let conflict = Conflict { key, offset, with };
            let mut bytes = Vec::new();
            encode_conflict(&conflict, &mut bytes);
            prop_assert_eq!(decode_conflict(&bytes), Ok((conflict, bytes.len())));
        }
    }

    fn sample_task(kind: TaskKind) -> Task {
        Task {
            id: 0x3d0_0001_0000,
            kind,
            entry: 0x8_0000_0040,
            space: 1,
            stack: Range {
                start: 0x180_0000_0000,
                end: 0x180_0004_0000,
            },
            using: vec![Range {
                start: 0x9_0000_0000,
                end: 0x9_0000_1000,
            }],
            watched: vec![],
            snapshot: Some(17),
        }
    }

    #[test]
    fn tasks_and_endings_round_trip_and_truncations_are_refused() {
        let mut mask = Box::new(EMPTY_MASK);
        crate::page::mark(&mut mask, 8, 8);
        let child = ChildSpec {
            id: 0x3d0_0002_0000,
            entry: 0x8_0000_0080,
            space: 0,
            stack: Range { start: 1, end: 2 },
            using: vec![],
            watched: vec![Range { start: 5, end: 9 }],
        };
        let endings = [
            Ended {
                task: sample_task(TaskKind::Child),
                snapshot: 17,
                ending: Ending::Exit(ExitMode::Commit),
                outcome: Outcome::Committed {
                    changes: vec![(9, Changed::of_mask(&mask))],
                },
                children: vec![child],
                exit_changes: vec![(3, Changed::of_mask(&mask))],
                output: b"hello\n".to_vec(),
                ends_template: false,
            },
            Ended {
                task: sample_task(TaskKind::Instance(0x3d0_0003_0000)),
                snapshot: 4,
                ending: Ending::Fault(Fault {
                    kind: FaultKind::DivisionByZero,
                    pc: 0x8_0000_0000,
                }),
                outcome: Outcome::Faulted(Fault {
                    kind: FaultKind::DivisionByZero,
                    pc: 0x8_0000_0000,
                }),
                children: vec![],
                exit_changes: vec![],
                output: vec![],
                ends_template: true,
            },
            Ended {
                task: sample_task(TaskKind::Root),
                snapshot: 0,
                ending: Ending::Exit(ExitMode::Commit),
                outcome: Outcome::Failed(Conflict {
                    key: 1,
                    offset: 2,
                    with: ConflictWith::Prepared { txn: 3 },
                }),
                children: vec![],
                exit_changes: vec![],
                output: vec![1, 2],
                ends_template: false,
            },
        ];
        for ended in endings {
            let bytes = encode_ended(&ended);
            assert_eq!(decode_ended(&bytes), Ok(ended.clone()));
            for cut in 0..bytes.len() {
                assert!(decode_ended(&bytes[..cut]).is_err(), "cut at {cut}");
            }
            let task = encode_task(&ended.task);
            assert_eq!(decode_task(&task), Ok(ended.task.clone()));
        }
    }

    #[test]
    fn an_unknown_tag_is_named_with_its_offset() {
        let mut bytes = 7u64.to_le_bytes().to_vec();
        bytes.push(200);
        assert_eq!(
            decode_fault(&bytes),
            Err(ReportDecodeError::UnknownTag {
                what: "fault",
                tag: 200,
                offset: 8
            })
        );
    }
}
