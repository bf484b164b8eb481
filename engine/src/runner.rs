//! What a runner is before it runs (`Task`) and how it ended (`Ended`): plain data, which is
//! why they can be queued, sent to another node (`report` encodes them) and applied later, in
//! commit order, by whichever thread or node applies endings.

use crate::interp::{ChildSpec, Ending, Fault};
use crate::store::{Change, Conflict};
use crate::view::Range;

/// What kind of runner a task starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskKind {
    Root,
    Child,
    /// An instance of the watcher template with this id.
    Instance(u64),
}

/// A runner ready to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    pub id: u64,
    pub kind: TaskKind,
    pub entry: u64,
    pub space: u64,
    pub stack: Range,
    pub using: Vec<Range>,
    pub watched: Vec<Range>,
    /// Registered snapshot; `None` for instances, which take theirs when they start.
    pub snapshot: Option<u64>,
}

impl Task {
    /// The id whose exit record this runner's ending publishes: its own, or its template's.
    pub fn exit_id(&self) -> u64 {
        match self.kind {
            TaskKind::Instance(template) => template,
            _ => self.id,
        }
    }

    pub fn is_instance(&self) -> bool {
        matches!(self.kind, TaskKind::Instance(_))
    }
}

/// How an ending turned out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Its writes are installed at the ending's first timestamp; `changes` are their masks.
    Committed {
        changes: Vec<Change>,
    },
    Aborted,
    Failed(Conflict),
    Faulted(Fault),
}

impl Outcome {
    /// The status word of the exit record (`docs/MEMORY-MODEL.md`).
    pub fn status(&self) -> u64 {
        match self {
            Outcome::Committed { .. } => 1,
            Outcome::Aborted => 2,
            Outcome::Failed(_) => 3,
            Outcome::Faulted(_) => 4,
        }
    }
}

/// An ending whose pages are installed, waiting for its turn in commit order to take effect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ended {
    pub task: Task,
    pub snapshot: u64,
    pub ending: Ending,
    pub outcome: Outcome,
    /// Created by the runner; they exist only if it committed.
    pub children: Vec<ChildSpec>,
    /// What its exit-record publication stored.
    pub exit_changes: Vec<Change>,
    pub output: Vec<u8>,
    pub ends_template: bool,
}
