//! Fault reports and commit conflicts as bytes: how a node tells another why a runner ended.
//!
//! A cluster node that runs a runner is not always the node that prints its report (node 0
//! merges the console in commit order), so the typed values cross the wire, not their text. The
//! encoding is explicit little-endian with a tag byte per variant and length-prefixed, bounded
//! strings; decoding untrusted bytes returns a typed error naming the offset, never panics.

use crate::interp::{Fault, FaultKind};
use crate::store::{Conflict, ConflictWith};

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
        FaultKind::MemoryLimit { limit_bytes } => {
            out.push(7);
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
    let offset = (r.u64()? % crate::page::PAGE_BYTES as u64) as usize;
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
            any::<u64>().prop_map(|limit_bytes| FaultKind::MemoryLimit { limit_bytes }),
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
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_fault(&bytes);
            let _ = decode_conflict(&bytes);
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
