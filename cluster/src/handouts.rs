//! What node 0 hands runners through `Control` (runner ids, stacks, heap, console input): the
//! requests and answers as they cross the wire, and node 0's record of what each runner
//! running on another node was handed, kept until that runner's ending takes effect.
//!
//! Why the record: a runner whose node is lost runs again from its snapshot on another node
//! (`runtime.rs`, `rerun_lost`). Running the same code on the same snapshot, it asks for the
//! same things in the same order, and the record answers with what the lost attempt got: the
//! rerun spawns children with the same ids and stacks, gets the same heap and reads the same
//! console bytes. Served afresh instead, the ids the lost attempt took would be gaps whose
//! exit records never say "ended" (a join over a range of ids, like `micro_commit`'s, waits
//! for them and the run ends without its output), and the input it consumed would be gone.
//!
//! Invariants:
//! - a record grows only at its end, once replayed to its end: a rerun asking past what the
//!   lost attempt asked is served afresh, and that is recorded too (it may be lost as well);
//! - a request other than the recorded one at its place (a rerun that went another way, say
//!   after reading the clock) ends the replay: the rest of the record is dropped (its ids are
//!   given back to the runner count; its stacks and heap stay unused) and the rerun is served
//!   afresh from there;
//! - nothing from a node declared dead is recorded or answered (`runtime.rs`), so a lost
//!   attempt cannot append to the record its rerun is reading;
//! - a record holds at most `MAX_ANSWERS` answers; past that it stops growing and says so once.

use dvm_engine::backend::Control;
use dvm_engine::view::Range;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Answers kept per runner: a runner that spawns or allocates more than this and is then run
/// again after a node loss is handed fresh ids past this point.
pub(crate) const MAX_ANSWERS: usize = 1 << 20;

/// A request to node 0's `Control`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ControlOp {
    NewRunnerId,
    ForgetRunner,
    AllocateStack { space: u64 },
    AllocateHeap { space: u64, len_bytes: u64 },
    ConsoleInput,
}

/// Its answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ControlAnswer {
    Id(Result<u64, String>),
    Done,
    Range(Option<Range>),
    Byte(Option<u8>),
}

impl ControlOp {
    /// `[kind, runner, arguments...]`, little-endian words.
    pub(crate) fn encode(self, runner: u64) -> Vec<u8> {
        let (kind, args): (u8, &[u64]) = match self {
            ControlOp::NewRunnerId => (0, &[]),
            ControlOp::ForgetRunner => (1, &[]),
            ControlOp::AllocateStack { space } => (2, &[space]),
            ControlOp::AllocateHeap { space, len_bytes } => (3, &[space, len_bytes]),
            ControlOp::ConsoleInput => (4, &[]),
        };
        let mut bytes = vec![kind];
        bytes.extend_from_slice(&runner.to_le_bytes());
        for arg in args {
            bytes.extend_from_slice(&arg.to_le_bytes());
        }
        bytes
    }

    /// The asking runner and its request.
    pub(crate) fn decode(bytes: &[u8]) -> Result<(u64, ControlOp), String> {
        let word = |index: usize| -> Result<u64, String> {
            let at = 1 + 8 * index;
            bytes
                .get(at..at + 8)
                .and_then(|raw| raw.try_into().ok())
                .map(u64::from_le_bytes)
                .ok_or_else(|| format!("a control request of {} bytes is cut short", bytes.len()))
        };
        let kind = *bytes.first().ok_or("an empty control request")?;
        let runner = word(0)?;
        let (op, words) = match kind {
            0 => (ControlOp::NewRunnerId, 1),
            1 => (ControlOp::ForgetRunner, 1),
            2 => (ControlOp::AllocateStack { space: word(1)? }, 2),
            3 => {
                let (space, len_bytes) = (word(1)?, word(2)?);
                (ControlOp::AllocateHeap { space, len_bytes }, 3)
            }
            4 => (ControlOp::ConsoleInput, 1),
            _ => return Err(format!("a control request of unknown kind {kind}")),
        };
        if bytes.len() != 1 + 8 * words {
            return Err(format!(
                "a control request of kind {kind} with {} bytes (want {})",
                bytes.len(),
                1 + 8 * words
            ));
        }
        Ok((runner, op))
    }

    /// Served by `control` (node 0's own). Console input may block until a byte comes.
    pub(crate) fn serve(self, control: &dyn Control, runner: u64) -> ControlAnswer {
        match self {
            ControlOp::NewRunnerId => ControlAnswer::Id(control.new_runner_id(runner)),
            ControlOp::ForgetRunner => {
                control.forget_runner(runner);
                ControlAnswer::Done
            }
            ControlOp::AllocateStack { space } => {
                ControlAnswer::Range(control.allocate_stack(runner, space))
            }
            ControlOp::AllocateHeap { space, len_bytes } => {
                ControlAnswer::Range(control.allocate_heap(runner, space, len_bytes))
            }
            ControlOp::ConsoleInput => ControlAnswer::Byte(control.console_input(runner)),
        }
    }
}

impl ControlAnswer {
    /// Id: `[0, id]` or `[1, reason...]`; done: nothing; range: `[1, start, end]` or `[0]`;
    /// byte: `[1, byte]` or `[0]`.
    pub(crate) fn encode(&self) -> Vec<u8> {
        match self {
            ControlAnswer::Id(Ok(id)) => [&[0u8][..], &id.to_le_bytes()].concat(),
            ControlAnswer::Id(Err(reason)) => [&[1u8][..], reason.as_bytes()].concat(),
            ControlAnswer::Done => Vec::new(),
            ControlAnswer::Range(Some(range)) => [
                &[1u8][..],
                &range.start.to_le_bytes(),
                &range.end.to_le_bytes(),
            ]
            .concat(),
            ControlAnswer::Range(None) | ControlAnswer::Byte(None) => vec![0],
            ControlAnswer::Byte(Some(byte)) => vec![1, *byte],
        }
    }

    /// The answer to `op` in `bytes`.
    pub(crate) fn decode(op: ControlOp, bytes: &[u8]) -> Result<ControlAnswer, String> {
        let word = |at: usize| -> Option<u64> {
            bytes
                .get(at..at + 8)
                .and_then(|raw| raw.try_into().ok())
                .map(u64::from_le_bytes)
        };
        let nonsense = || {
            format!(
                "an answer of {} bytes to {op:?} that makes no sense",
                bytes.len()
            )
        };
        match op {
            ControlOp::NewRunnerId => match bytes.split_first() {
                Some((0, _)) if bytes.len() == 9 => {
                    Ok(ControlAnswer::Id(Ok(word(1).ok_or_else(nonsense)?)))
                }
                Some((1, reason)) => Ok(ControlAnswer::Id(Err(
                    String::from_utf8_lossy(reason).into_owned()
                ))),
                _ => Err(nonsense()),
            },
            ControlOp::ForgetRunner if bytes.is_empty() => Ok(ControlAnswer::Done),
            ControlOp::AllocateStack { .. } | ControlOp::AllocateHeap { .. } => match bytes {
                [0] => Ok(ControlAnswer::Range(None)),
                [1, ..] if bytes.len() == 17 => {
                    let (start, end) =
                        (word(1).ok_or_else(nonsense)?, word(9).ok_or_else(nonsense)?);
                    if start > end {
                        return Err(nonsense());
                    }
                    Ok(ControlAnswer::Range(Some(Range { start, end })))
                }
                _ => Err(nonsense()),
            },
            ControlOp::ConsoleInput => match bytes {
                [0] => Ok(ControlAnswer::Byte(None)),
                [1, byte] => Ok(ControlAnswer::Byte(Some(*byte))),
                _ => Err(nonsense()),
            },
            ControlOp::ForgetRunner => Err(nonsense()),
        }
    }
}

/// One runner's answers, in the order it asked, and how many a rerun has been given again.
#[derive(Default)]
struct Record {
    answers: Vec<(ControlOp, ControlAnswer)>,
    replayed: usize,
    full: bool,
}

/// Node 0's records, by runner (task id).
#[derive(Default)]
pub(crate) struct Handouts {
    records: Mutex<HashMap<u64, Record>>,
    /// The map's length, stored under its lock: a run that may lose no node (one node, or
    /// `--replicas 1` with every runner on node 0) records nothing, and its runners' requests
    /// and endings then skip the lock. A record is made while its runner asks, so before its
    /// ending is applied (or it is run again): a reader that sees 0 has nothing to find.
    recorded: AtomicUsize,
}

impl Handouts {
    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Record>> {
        self.records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What a lost attempt of `runner` was handed for `op` at the place its rerun has reached,
    /// if the rerun asks what the attempt asked there. `Err(ids)`: serve it afresh; `ids` runner
    /// ids the dropped rest of the record held, to be given back (their runners never exist).
    pub(crate) fn replay(&self, runner: u64, op: ControlOp) -> Result<ControlAnswer, u64> {
        if self.recorded.load(Ordering::Acquire) == 0 {
            return Err(0);
        }
        let mut records = self.records();
        let Some(record) = records.get_mut(&runner) else {
            return Err(0);
        };
        let Some((recorded, answer)) = record.answers.get(record.replayed) else {
            return Err(0);
        };
        if *recorded == op {
            let answer = answer.clone();
            record.replayed += 1;
            return Ok(answer);
        }
        tracing::warn!(
            "runner {runner:#x}, run again after its node's loss, asked for {op:?} where the \
             lost attempt asked for {recorded:?}: it went another way, and is served afresh \
             from here ({} earlier answers left unused)",
            record.answers.len() - record.replayed
        );
        let dropped = record.answers.split_off(record.replayed);
        let ids = dropped
            .iter()
            .filter(|(_, answer)| matches!(answer, ControlAnswer::Id(Ok(_))))
            .count() as u64;
        Err(ids)
    }

    /// Keeps `answer`, just handed to `runner` for `op`, at the end of its record.
    pub(crate) fn record(&self, runner: u64, op: ControlOp, answer: ControlAnswer) {
        let mut records = self.records();
        records.entry(runner).or_default();
        self.recorded.store(records.len(), Ordering::Release);
        let Some(record) = records.get_mut(&runner) else {
            return;
        };
        if record.answers.len() >= MAX_ANSWERS {
            if !std::mem::replace(&mut record.full, true) {
                tracing::warn!(
                    "runner {runner:#x} was handed more than {MAX_ANSWERS} ids, stacks, heap \
                     blocks or input bytes: if its node is lost, its rerun gets fresh ones \
                     past those"
                );
            }
            return;
        }
        record.answers.push((op, answer));
        record.replayed = record.answers.len();
    }

    /// `runner`'s ending took effect: it never runs again.
    pub(crate) fn forget(&self, runner: u64) {
        if self.recorded.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut records = self.records();
        if records.remove(&runner).is_some() {
            self.recorded.store(records.len(), Ordering::Release);
        }
    }

    /// `runner` runs again (its node was lost): it is handed its record from the start.
    pub(crate) fn rewind(&self, runner: u64) {
        if self.recorded.load(Ordering::Acquire) == 0 {
            return;
        }
        if let Some(record) = self.records().get_mut(&runner) {
            record.replayed = 0;
        }
    }

    /// Runners with a record.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.records().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> ControlAnswer {
        ControlAnswer::Id(Ok(n))
    }

    #[test]
    fn a_rerun_is_handed_what_the_lost_attempt_was_then_served_afresh_and_recorded() {
        let handouts = Handouts::default();
        let stack = ControlOp::AllocateStack { space: 0 };
        let range = ControlAnswer::Range(Some(Range {
            start: 0x1000,
            end: 0x2000,
        }));
        handouts.record(7, stack, range.clone());
        handouts.record(7, ControlOp::NewRunnerId, id(0x3d0_0001_1000));
        // The first attempt, still running, is not answered from its own record.
        assert_eq!(handouts.replay(7, stack), Err(0));
        handouts.rewind(7);
        assert_eq!(handouts.replay(7, stack), Ok(range));
        assert_eq!(
            handouts.replay(7, ControlOp::NewRunnerId),
            Ok(id(0x3d0_0001_1000))
        );
        // Past the record: afresh, and kept for a rerun of the rerun.
        assert_eq!(handouts.replay(7, ControlOp::NewRunnerId), Err(0));
        handouts.record(7, ControlOp::NewRunnerId, id(0x3d0_0001_2000));
        handouts.rewind(7);
        assert!(handouts.replay(7, stack).is_ok());
        assert_eq!(
            handouts.replay(7, ControlOp::NewRunnerId),
            Ok(id(0x3d0_0001_1000))
        );
        assert_eq!(
            handouts.replay(7, ControlOp::NewRunnerId),
            Ok(id(0x3d0_0001_2000))
        );
        // Another runner's record is its own.
        assert_eq!(handouts.replay(8, ControlOp::NewRunnerId), Err(0));
        handouts.forget(7);
        assert_eq!(handouts.len(), 0);
    }

    #[test]
    fn a_rerun_that_asks_something_else_drops_the_rest_of_the_record() {
        let handouts = Handouts::default();
        handouts.record(7, ControlOp::NewRunnerId, id(1));
        handouts.record(7, ControlOp::NewRunnerId, id(2));
        handouts.record(7, ControlOp::ConsoleInput, ControlAnswer::Byte(Some(b'x')));
        handouts.rewind(7);
        assert_eq!(handouts.replay(7, ControlOp::NewRunnerId), Ok(id(1)));
        // The rest held one id, to be given back.
        assert_eq!(handouts.replay(7, ControlOp::ConsoleInput), Err(1));
        handouts.record(7, ControlOp::ConsoleInput, ControlAnswer::Byte(Some(b'y')));
        handouts.rewind(7);
        assert_eq!(handouts.replay(7, ControlOp::NewRunnerId), Ok(id(1)));
        assert_eq!(
            handouts.replay(7, ControlOp::ConsoleInput),
            Ok(ControlAnswer::Byte(Some(b'y')))
        );
    }

    #[test]
    fn requests_and_answers_cross_the_wire_unchanged_and_garbage_is_named() {
        let ops = [
            ControlOp::NewRunnerId,
            ControlOp::ForgetRunner,
            ControlOp::AllocateStack { space: 3 },
            ControlOp::AllocateHeap {
                space: 1,
                len_bytes: 4096,
            },
            ControlOp::ConsoleInput,
        ];
        for op in ops {
            assert_eq!(ControlOp::decode(&op.encode(0xabc)), Ok((0xabc, op)));
            let mut long = op.encode(1);
            long.push(0);
            assert!(
                ControlOp::decode(&long).is_err(),
                "{op:?} with a byte too many"
            );
            let short = &op.encode(1)[..5];
            assert!(ControlOp::decode(short).is_err(), "{op:?} cut short");
        }
        assert!(ControlOp::decode(&[]).is_err());
        assert!(ControlOp::decode(
            &ControlOp::NewRunnerId
                .encode(1)
                .iter()
                .map(|_| 9)
                .collect::<Vec<u8>>()
        )
        .is_err());
        let answers = [
            (ControlOp::NewRunnerId, id(0x3d0_0000_1000)),
            (
                ControlOp::NewRunnerId,
                ControlAnswer::Id(Err("too many".into())),
            ),
            (ControlOp::ForgetRunner, ControlAnswer::Done),
            (
                ControlOp::AllocateStack { space: 0 },
                ControlAnswer::Range(Some(Range { start: 16, end: 32 })),
            ),
            (
                ControlOp::AllocateHeap {
                    space: 0,
                    len_bytes: 8,
                },
                ControlAnswer::Range(None),
            ),
            (ControlOp::ConsoleInput, ControlAnswer::Byte(Some(0))),
            (ControlOp::ConsoleInput, ControlAnswer::Byte(None)),
        ];
        for (op, answer) in answers {
            assert_eq!(ControlAnswer::decode(op, &answer.encode()), Ok(answer));
        }
        assert!(ControlAnswer::decode(ControlOp::NewRunnerId, &[0, 1, 2]).is_err());
        assert!(ControlAnswer::decode(ControlOp::ForgetRunner, &[0]).is_err());
        assert!(ControlAnswer::decode(ControlOp::ConsoleInput, &[1]).is_err());
        let backwards = [&[1u8][..], &32u64.to_le_bytes(), &16u64.to_le_bytes()].concat();
        assert!(ControlAnswer::decode(ControlOp::AllocateStack { space: 0 }, &backwards).is_err());
    }
}
