//! The vocabulary of worker measurement: what a worker is doing (`Phase`), where it runs
//! (`WorkerPlace`), and how long it spent on each phase (`TimeSplit`). Plain types that the
//! profile samples (`profile`) and the meters (`meter`) share.

/// What a worker is doing. The discriminants index a meter's per-phase times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Phase {
    /// Nothing to do: looking at its own queue, polling, sleeping.
    Idle = 0,
    /// Taking work from another worker's queue or the injector.
    Steal = 1,
    /// Starting a runner: its snapshot, its view of memory.
    Start = 2,
    /// Running a runner's instructions.
    Interpret = 3,
    /// Ending a runner: prepare, install, the ending's effects (children, watchers, output).
    Commit = 4,
    /// Waiting for a page held by another node.
    WaitPage = 5,
    /// Sending or receiving cluster messages outside a page wait.
    Network = 6,
}

impl Phase {
    pub const COUNT: usize = 7;
    pub const ALL: [Phase; Phase::COUNT] = [
        Phase::Idle,
        Phase::Steal,
        Phase::Start,
        Phase::Interpret,
        Phase::Commit,
        Phase::WaitPage,
        Phase::Network,
    ];

    pub fn from_u8(value: u8) -> Option<Phase> {
        Phase::ALL.get(usize::from(value)).copied()
    }

    /// The short name used in `--stats`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Steal => "stealing",
            Phase::Start => "starting",
            Phase::Interpret => "interpreting",
            Phase::Commit => "committing",
            Phase::WaitPage => "waiting for pages",
            Phase::Network => "network",
        }
    }

    /// The frame a profile shows for time spent in this phase outside the interpreter.
    pub fn frame(self) -> &'static str {
        match self {
            Phase::Idle => "[dvm idle]",
            Phase::Steal => "[dvm steal]",
            Phase::Start => "[dvm start runner]",
            Phase::Interpret => "[dvm interpreter]",
            Phase::Commit => "[dvm commit]",
            Phase::WaitPage => "[dvm wait for page]",
            Phase::Network => "[dvm network]",
        }
    }
}

/// Where a worker runs, for reports and profile tags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerPlace {
    pub node: u32,
    pub worker: u32,
    pub pu: u32,
}

/// Nanoseconds a worker spent in each phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeSplit {
    pub ns: [u64; Phase::COUNT],
}

impl TimeSplit {
    pub fn total_ns(&self) -> u64 {
        self.ns.iter().sum()
    }

    pub fn get(&self, phase: Phase) -> u64 {
        self.ns[phase as usize]
    }
}
