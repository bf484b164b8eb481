//! Who this process is in a multi-node job: rank, world size, ranks on this host, where rank 0
//! waits for the others (the coordinator) and the token that proves a peer belongs to the job.
//!
//! Sources, innermost launcher first (an inner launcher runs inside an outer one's allocation
//! and inherits its variables, so the inner one describes this process):
//! 1. explicit `--hosts h1:p,h2:p,... --rank R` from the command line;
//! 2. DVM's local launcher's children: `DVM_RANK`, `DVM_WORLD`, `DVM_COORD`, `DVM_JOB_TOKEN`;
//! 3. Open MPI `mpirun`: `OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}`;
//!    MPICH Hydra `mpiexec`: `PMI_RANK`, `PMI_SIZE`, `MPI_LOCALRANKID`, `MPI_LOCALNRANKS`;
//! 4. Slurm `srun`: `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_STEP_NODELIST`,
//!    `SLURM_JOB_ID`, `SLURM_STEP_ID`. `srun --mpi=pmi2` also sets `PMI_RANK`/`PMI_SIZE`
//!    (without Hydra's `MPI_LOCAL*`); they must then agree with Slurm's.
//!
//! Coordinator: `DVM_COORD=host:port` always wins. Otherwise: the first explicit host; under
//! Slurm the first host of `SLURM_STEP_NODELIST`, port `20000 + (SLURM_JOB_ID + 7919 *
//! SLURM_STEP_ID) % 20000` (so steps running at once in one allocation do not collide); under
//! `mpirun`/`mpiexec` only when every rank is on this host (local size == world): 127.0.0.1 and a
//! port derived from something every rank of the job shares and no other job does. Open MPI
//! sets `PMIX_NAMESPACE` (and `OMPI_MCA_ess_base_jobid`) for that. Hydra sets no job-wide
//! variable at all (only `PMI_RANK`, `PMI_SIZE`, `PMI_FD`, `MPI_LOCALRANKID`,
//! `MPI_LOCALNRANKS`, `HYDI_CONTROL_FD`), but all ranks on a host are children of one
//! `hydra_pmi_proxy`: its process id, found by `HostFacts::probe`, stands in for a job id.
//!
//! Token: `DVM_JOB_TOKEN`, or the contents of the file named by `DVM_JOB_TOKEN_FILE`, is a
//! secret shared by the job's processes: only processes that know it can join. Without either,
//! the token is derived from the launcher's job identity (Slurm job and step id, Open MPI
//! namespace, the coordinator address): that keeps stray processes of *other* jobs out of a
//! rendezvous, but it is not a secret: anyone who can read the job's environment or guess the
//! job id can join. Use `DVM_JOB_TOKEN(_FILE)` when that matters.
//!
//! Invariants: the functions here read only the map and facts they are given (and the token
//! file), never the process environment, so every case is testable; `rank < world <=
//! MAX_WORLD`, `local_rank < local_size <= world`; every error names the variable and value.

use crate::hostlist::{self, HostlistError};
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use thiserror::Error;

/// Largest job accepted, in processes.
pub const MAX_WORLD: u32 = 65_536;

/// Longest job token, in bytes.
pub const MAX_TOKEN_BYTES: usize = 1024;

/// Derived coordinator ports are in `BASE_PORT..BASE_PORT + PORT_SPAN`.
pub const BASE_PORT: u16 = 20_000;
pub const PORT_SPAN: u16 = 20_000;

/// Special Slurm step ids (batch script, extern, interactive, ...) are at the top of the u32
/// range: a process in them is not a task of an `srun` step.
const FIRST_SPECIAL_SLURM_STEP: u64 = 0xFFFF_FFF0;

/// The launcher that described this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchSource {
    Explicit,
    Local,
    OpenMpi,
    Hydra,
    Slurm,
}

impl fmt::Display for LaunchSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LaunchSource::Explicit => "--hosts/--rank",
            LaunchSource::Local => "dvm's local launcher",
            LaunchSource::OpenMpi => "Open MPI mpirun",
            LaunchSource::Hydra => "MPICH Hydra mpiexec",
            LaunchSource::Slurm => "Slurm srun",
        })
    }
}

/// Where the job token came from, and so what it is worth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `DVM_JOB_TOKEN`: a secret.
    Env,
    /// `DVM_JOB_TOKEN_FILE`: a secret.
    File(PathBuf),
    /// Derived from the job's identity, described here: keeps other jobs out, not a secret.
    Derived(String),
}

/// A `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// This process's place in a multi-process job.
#[derive(Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: u32,
    pub world: u32,
    /// Among the ranks on this host.
    pub local_rank: u32,
    pub local_size: u32,
    pub source: LaunchSource,
    /// Rank 0's rendezvous address.
    pub coordinator: Endpoint,
    pub token: Vec<u8>,
    pub token_source: TokenSource,
}

// Never print the token: it may be a secret.
impl fmt::Debug for Launch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Launch")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("local_rank", &self.local_rank)
            .field("local_size", &self.local_size)
            .field("source", &self.source)
            .field("coordinator", &self.coordinator)
            .field("token", &format_args!("<{} bytes>", self.token.len()))
            .field("token_source", &self.token_source)
            .finish()
    }
}

/// Settings from the command line, as typed (parsed here so errors are uniform).
#[derive(Debug, Clone, Copy, Default)]
pub struct Explicit<'a> {
    /// `--hosts h1:port,h2:port,...`: every rank's host, in rank order. The first entry is the
    /// coordinator (rank 0's rendezvous address); the other entries' hosts give the local rank
    /// and size, their ports are not used here (each rank advertises its data address itself at
    /// the rendezvous).
    pub hosts: Option<&'a str>,
    /// `--rank R`.
    pub rank: Option<&'a str>,
}

/// Facts about this process that are not in its environment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// The `hydra_pmi_proxy` this process descends from, if any.
    pub hydra_proxy_pid: Option<u32>,
}

impl HostFacts {
    /// Reads `/proc` for the facts. Anything unreadable is simply unknown.
    pub fn probe() -> HostFacts {
        HostFacts {
            hydra_proxy_pid: find_ancestor("hydra_pmi_proxy"),
        }
    }
}

/// The nearest ancestor process named `comm` (from `/proc/PID/stat`), at most 64 levels up.
fn find_ancestor(comm: &str) -> Option<u32> {
    let mut pid = std::os::unix::process::parent_id();
    for _ in 0..64 {
        if pid <= 1 {
            return None;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // "PID (COMM) STATE PPID ...": COMM may contain spaces and parentheses, so split at
        // the last ')'.
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let name = stat.get(open + 1..close)?;
        if name == comm {
            return Some(pid);
        }
        let mut rest = stat.get(close + 1..)?.split_whitespace();
        let _state = rest.next()?;
        pid = rest.next()?.parse().ok()?;
    }
    None
}

/// The environment of this process, for `detect`. Variables that are not UTF-8 are left out
/// (none of the ones read here legitimately are).
pub fn process_env() -> BTreeMap<String, String> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

#[derive(Debug, Error)]
pub enum LaunchError {
    #[error("{var}=\"{value}\" is not a number")]
    NotANumber { var: String, value: String },
    #[error("{rank_var}={rank} is not below {size_var}={size}")]
    NotBelow {
        rank_var: String,
        rank: u64,
        size_var: String,
        size: u64,
    },
    #[error("{var}={value}: a job has between 1 and {MAX_WORLD} processes")]
    BadWorld { var: String, value: u64 },
    #[error("{missing} is not set, but {present} is: {launcher} sets both")]
    Missing {
        missing: String,
        present: String,
        launcher: LaunchSource,
    },
    #[error("conflicting launchers: {first} and {second} describe this process differently; unset the stale variables")]
    Conflict { first: String, second: String },
    #[error("{var}=\"{value}\" is not host:port ({why})")]
    BadEndpoint {
        var: String,
        value: String,
        why: String,
    },
    #[error("{var}=\"{value}\": {why}")]
    BadValue {
        var: String,
        value: String,
        why: String,
    },
    #[error("{var}: {source}")]
    BadHostlist {
        var: String,
        #[source]
        source: HostlistError,
    },
    #[error("--{given} was given without --{missing}: a multi-node run needs both")]
    ExplicitIncomplete {
        given: &'static str,
        missing: &'static str,
    },
    #[error("{launcher} started {world} ranks over several hosts ({local_size} on this one) and nothing names rank 0's host: {how}")]
    CoordinatorUnknown {
        launcher: LaunchSource,
        world: u32,
        local_size: u32,
        how: &'static str,
    },
    #[error("{launcher} started {world} ranks on this host, but no job-wide value to derive a port from was found ({why}); pass DVM_COORD=127.0.0.1:PORT to every rank")]
    NoJobIdentity {
        launcher: LaunchSource,
        world: u32,
        why: &'static str,
    },
    #[error("both DVM_JOB_TOKEN and DVM_JOB_TOKEN_FILE are set; set one")]
    TokenConflict,
    #[error("{var} is empty")]
    TokenEmpty { var: &'static str },
    #[error("{var} holds {len} bytes, more than the {MAX_TOKEN_BYTES} allowed")]
    TokenTooLong { var: &'static str, len: usize },
    #[error("DVM_JOB_TOKEN_FILE={path}: {source}")]
    TokenFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{launcher} does not pass a job token; set DVM_JOB_TOKEN or DVM_JOB_TOKEN_FILE")]
    TokenMissing { launcher: LaunchSource },
}

const HOW_MPIRUN: &str = "put rank 0's host first and pass `mpirun -x DVM_COORD=host:port` (or export DVM_COORD before `mpirun -x DVM_COORD`)";
const HOW_HYDRA: &str =
    "put rank 0's host first and pass `mpiexec -env DVM_COORD host:port` (or `-genv`)";

/// Rank, world and local rank as read from some launcher, before the coordinator and token.
#[derive(Debug, Clone)]
struct Place {
    source: LaunchSource,
    rank: u32,
    world: u32,
    local_rank: u32,
    local_size: u32,
}

/// Works out this process's place in a job from `env` (normally `process_env()`), the
/// command-line settings and `facts` (normally `HostFacts::probe()`). `Ok(None)`: no launcher
/// and no explicit settings, a plain single-node run.
pub fn detect(
    env: &BTreeMap<String, String>,
    explicit: &Explicit<'_>,
    facts: &HostFacts,
) -> Result<Option<Launch>, LaunchError> {
    if explicit.hosts.is_some() || explicit.rank.is_some() {
        return from_explicit(env, explicit).map(Some);
    }
    if env.contains_key("DVM_RANK") {
        return from_local(env).map(Some);
    }
    let ompi = read_ompi(env)?;
    let hydra = read_pmi(env)?;
    let slurm = read_slurm(env)?;
    match (ompi, hydra, slurm) {
        (Some(o), Some(h), _) => Err(LaunchError::Conflict {
            first: format!(
                "Open MPI (OMPI_COMM_WORLD_RANK={} OMPI_COMM_WORLD_SIZE={})",
                o.rank, o.world
            ),
            second: format!("PMI (PMI_RANK={} PMI_SIZE={})", h.place.rank, h.place.world),
        }),
        (Some(o), None, _) => finish_ompi(env, o).map(Some),
        // Hydra, possibly inside a Slurm allocation: Hydra launched this process.
        (None, Some(h), _) if h.hydra => finish_hydra(env, h.place, facts).map(Some),
        (None, Some(h), Some(s)) => {
            // `srun --mpi=pmi2`: Slurm's own PMI, which must agree with Slurm.
            if h.place.rank != s.place.rank || h.place.world != s.place.world {
                return Err(LaunchError::Conflict {
                    first: format!("PMI (PMI_RANK={} PMI_SIZE={})", h.place.rank, h.place.world),
                    second: format!(
                        "Slurm (SLURM_PROCID={} SLURM_NTASKS={})",
                        s.place.rank, s.place.world
                    ),
                });
            }
            finish_slurm(env, s).map(Some)
        }
        (None, Some(_), None) => Err(LaunchError::Missing {
            missing: "MPI_LOCALRANKID".to_string(),
            present: "PMI_RANK".to_string(),
            launcher: LaunchSource::Hydra,
        }),
        (None, None, Some(s)) => finish_slurm(env, s).map(Some),
        (None, None, None) => Ok(None),
    }
}

fn get<'a>(env: &'a BTreeMap<String, String>, var: &str) -> Option<&'a str> {
    env.get(var).map(String::as_str)
}

fn number(env: &BTreeMap<String, String>, var: &str) -> Result<Option<u64>, LaunchError> {
    match get(env, var) {
        None => Ok(None),
        Some(value) => parse_number(var, value).map(Some),
    }
}

fn parse_number(var: &str, value: &str) -> Result<u64, LaunchError> {
    // Digits only: `u64::from_str` would also take a leading '+'.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(LaunchError::NotANumber {
            var: var.to_string(),
            value: value.to_string(),
        });
    }
    value.parse::<u64>().map_err(|_| LaunchError::NotANumber {
        var: var.to_string(),
        value: value.to_string(),
    })
}

fn required(
    env: &BTreeMap<String, String>,
    var: &str,
    present: &str,
    launcher: LaunchSource,
) -> Result<u64, LaunchError> {
    number(env, var)?.ok_or_else(|| LaunchError::Missing {
        missing: var.to_string(),
        present: present.to_string(),
        launcher,
    })
}

/// Checks `rank < size` and `1 <= size <= MAX_WORLD` and narrows both to u32.
fn rank_in(
    rank_var: &str,
    rank: u64,
    size_var: &str,
    size: u64,
) -> Result<(u32, u32), LaunchError> {
    let size32 = u32::try_from(size)
        .ok()
        .filter(|s| (1..=MAX_WORLD).contains(s))
        .ok_or_else(|| LaunchError::BadWorld {
            var: size_var.to_string(),
            value: size,
        })?;
    match u32::try_from(rank) {
        Ok(r) if r < size32 => Ok((r, size32)),
        _ => Err(LaunchError::NotBelow {
            rank_var: rank_var.to_string(),
            rank,
            size_var: size_var.to_string(),
            size,
        }),
    }
}

/// Reads a rank/size pair plus the local pair, which must come together; `None` when
/// `rank_var` is absent. The flag tells whether the local pair was there.
fn read_place(
    env: &BTreeMap<String, String>,
    source: LaunchSource,
    [rank_var, size_var, local_rank_var, local_size_var]: [&str; 4],
) -> Result<Option<(Place, bool)>, LaunchError> {
    let Some(rank) = number(env, rank_var)? else {
        return Ok(None);
    };
    let size = required(env, size_var, rank_var, source)?;
    let (rank, world) = rank_in(rank_var, rank, size_var, size)?;
    let local = match (number(env, local_rank_var)?, number(env, local_size_var)?) {
        (Some(lr), Some(ls)) => {
            let (lr, ls) = rank_in(local_rank_var, lr, local_size_var, ls)?;
            if ls > world {
                return Err(LaunchError::BadValue {
                    var: local_size_var.to_string(),
                    value: ls.to_string(),
                    why: format!("more ranks on this host than {size_var}={world}"),
                });
            }
            Some((lr, ls))
        }
        (Some(_), None) => {
            return Err(LaunchError::Missing {
                missing: local_size_var.to_string(),
                present: local_rank_var.to_string(),
                launcher: source,
            })
        }
        (None, Some(_)) => {
            return Err(LaunchError::Missing {
                missing: local_rank_var.to_string(),
                present: local_size_var.to_string(),
                launcher: source,
            })
        }
        (None, None) => None,
    };
    let known = local.is_some();
    // Unknown local layout: assume this rank is alone on its host, which never wrongly claims
    // that the whole job is local.
    let (local_rank, local_size) = local.unwrap_or((0, 1));
    Ok(Some((
        Place {
            source,
            rank,
            world,
            local_rank,
            local_size,
        },
        known,
    )))
}

fn read_ompi(env: &BTreeMap<String, String>) -> Result<Option<Place>, LaunchError> {
    Ok(read_place(
        env,
        LaunchSource::OpenMpi,
        [
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "OMPI_COMM_WORLD_LOCAL_SIZE",
        ],
    )?
    .map(|(p, _)| p))
}

struct Pmi {
    place: Place,
    /// Hydra's `MPI_LOCALRANKID`/`MPI_LOCALNRANKS` are present (Slurm's PMI sets neither).
    hydra: bool,
}

fn read_pmi(env: &BTreeMap<String, String>) -> Result<Option<Pmi>, LaunchError> {
    Ok(read_place(
        env,
        LaunchSource::Hydra,
        ["PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"],
    )?
    .map(|(place, hydra)| Pmi { place, hydra }))
}

struct Slurm {
    place: Place,
    job_id: u64,
    step_id: u64,
}

fn read_slurm(env: &BTreeMap<String, String>) -> Result<Option<Slurm>, LaunchError> {
    // A batch script (or salloc shell) has SLURM_PROCID but is not a task of an srun step:
    // `dvm` started there directly is a single-node run.
    // srun writes step ids unsigned; a negative one would be a special step printed signed.
    if get(env, "SLURM_STEP_ID").is_none_or(|v| v.starts_with('-')) {
        return Ok(None);
    }
    let Some(step_id) = number(env, "SLURM_STEP_ID")? else {
        return Ok(None);
    };
    if step_id >= FIRST_SPECIAL_SLURM_STEP || !env.contains_key("SLURM_PROCID") {
        return Ok(None);
    }
    let Some(rank) = number(env, "SLURM_PROCID")? else {
        return Ok(None);
    };
    let size = required(env, "SLURM_NTASKS", "SLURM_PROCID", LaunchSource::Slurm)?;
    let (rank, world) = rank_in("SLURM_PROCID", rank, "SLURM_NTASKS", size)?;
    // Slurm gives the local id but not the local count directly: that comes from the tasks per
    // node ("2(x3),1") at this node's index. srun sets all three; without them this rank is
    // taken to be the last on its host, which is all the local count is used for.
    let local_rank = match number(env, "SLURM_LOCALID")? {
        Some(l) => rank_in("SLURM_LOCALID", l, "SLURM_NTASKS", size)?.0,
        None => 0,
    };
    let local_size = match (
        number(env, "SLURM_NODEID")?,
        get(env, "SLURM_STEP_TASKS_PER_NODE"),
    ) {
        (Some(node), Some(spec)) => {
            let n = tasks_on_node(spec, node).ok_or_else(|| LaunchError::BadValue {
                var: "SLURM_STEP_TASKS_PER_NODE".to_string(),
                value: spec.to_string(),
                why: format!("no task count for SLURM_NODEID={node}"),
            })?;
            if u64::from(local_rank) >= n || n > u64::from(world) {
                return Err(LaunchError::NotBelow {
                    rank_var: "SLURM_LOCALID".to_string(),
                    rank: u64::from(local_rank),
                    size_var: format!("the SLURM_STEP_TASKS_PER_NODE count of node {node}"),
                    size: n,
                });
            }
            n as u32
        }
        _ => local_rank + 1,
    };
    let place = Place {
        source: LaunchSource::Slurm,
        rank,
        world,
        local_rank,
        local_size,
    };
    let job_id = required(env, "SLURM_JOB_ID", "SLURM_PROCID", LaunchSource::Slurm)?;
    Ok(Some(Slurm {
        place,
        job_id,
        step_id,
    }))
}

/// Tasks on node `node` from a Slurm count list such as `4,1(x2)` (4 on node 0, 1 on nodes 1
/// and 2). `None` when malformed or too short.
fn tasks_on_node(spec: &str, node: u64) -> Option<u64> {
    let mut first_node: u64 = 0;
    for part in spec.split(',') {
        let (count, repeat) = match part.split_once("(x") {
            Some((c, r)) => (c, r.strip_suffix(')')?),
            None => (part, "1"),
        };
        let count = parse_number("", count).ok()?;
        let repeat = parse_number("", repeat).ok()?;
        let next = first_node.checked_add(repeat)?;
        if node < next {
            return Some(count);
        }
        first_node = next;
    }
    None
}

/// Parses `host:port`, `[v6]:port`.
pub fn parse_endpoint(var: &str, value: &str) -> Result<Endpoint, LaunchError> {
    let bad = |why: &str| LaunchError::BadEndpoint {
        var: var.to_string(),
        value: value.to_string(),
        why: why.to_string(),
    };
    if value.is_empty() {
        return Err(bad("empty"));
    }
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| bad("no ']' after an IPv6 address"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| bad("no ':PORT' after ']'"))?;
        (host, port)
    } else {
        value.rsplit_once(':').ok_or_else(|| bad("no ':PORT'"))?
    };
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    if host.len() > 253 {
        return Err(bad("host longer than 253 bytes"));
    }
    if host
        .chars()
        .any(|c| c.is_whitespace() || c == '/' || c == ',')
    {
        return Err(bad("the host contains a space, '/' or ','"));
    }
    if !value.starts_with('[') && host.contains(':') {
        return Err(bad("write an IPv6 address as [ADDR]:PORT"));
    }
    let port: u16 = if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
        port.parse().map_err(|_| bad("port above 65535"))?
    } else {
        return Err(bad("the port is not a number"));
    };
    if port == 0 {
        return Err(bad("port 0"));
    }
    Ok(Endpoint {
        host: host.to_string(),
        port,
    })
}

/// `DVM_COORD`, if set.
fn coord_override(env: &BTreeMap<String, String>) -> Result<Option<Endpoint>, LaunchError> {
    get(env, "DVM_COORD")
        .map(|v| parse_endpoint("DVM_COORD", v))
        .transpose()
}

/// A port in the derived range, from a job-wide value: FNV-1a, so nearby job ids spread.
fn derived_port(job_identity: &str) -> u16 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in job_identity.bytes() {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    BASE_PORT + (hash % u64::from(PORT_SPAN)) as u16
}

/// Spacing of the coordinator ports of the steps of one Slurm job: a prime, so coprime with
/// `PORT_SPAN`, so the first `PORT_SPAN` steps of a job all get different ports.
const SLURM_STEP_STRIDE: u64 = 7919;

/// Rank 0's port under Slurm, for step `step_id` of job `job_id`: `BASE_PORT + job_id %
/// PORT_SPAN` for step 0, and apart for each further step, since the steps of one allocation
/// may run at the same time on the same first node (each is a job of its own to DVM: its
/// token is derived from the step too).
pub fn slurm_coordinator_port(job_id: u64, step_id: u64) -> u16 {
    let span = u64::from(PORT_SPAN);
    let offset = (job_id % span + (step_id % span) * SLURM_STEP_STRIDE % span) % span;
    BASE_PORT + offset as u16
}

/// `DVM_JOB_TOKEN` / `DVM_JOB_TOKEN_FILE`, if either is set.
fn token_from_env(
    env: &BTreeMap<String, String>,
) -> Result<Option<(Vec<u8>, TokenSource)>, LaunchError> {
    match (get(env, "DVM_JOB_TOKEN"), get(env, "DVM_JOB_TOKEN_FILE")) {
        (Some(_), Some(_)) => Err(LaunchError::TokenConflict),
        (Some(token), None) => {
            check_token("DVM_JOB_TOKEN", token.as_bytes())?;
            Ok(Some((token.as_bytes().to_vec(), TokenSource::Env)))
        }
        (None, Some(path)) => {
            let token = read_token_file(path)?;
            Ok(Some((token, TokenSource::File(PathBuf::from(path)))))
        }
        (None, None) => Ok(None),
    }
}

fn check_token(var: &'static str, token: &[u8]) -> Result<(), LaunchError> {
    if token.is_empty() {
        return Err(LaunchError::TokenEmpty { var });
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(LaunchError::TokenTooLong {
            var,
            len: token.len(),
        });
    }
    Ok(())
}

fn read_token_file(path: &str) -> Result<Vec<u8>, LaunchError> {
    use std::io::Read;
    let file_err = |source| LaunchError::TokenFile {
        path: path.to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(file_err)?;
    let mut token = Vec::new();
    // One byte over the limit is enough to know it is too long.
    file.take(MAX_TOKEN_BYTES as u64 + 1)
        .read_to_end(&mut token)
        .map_err(file_err)?;
    // Files written by `echo` or an editor end with a newline that is not part of the secret.
    while token.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        token.pop();
    }
    check_token("DVM_JOB_TOKEN_FILE", &token)?;
    Ok(token)
}

fn token_or_derived(
    env: &BTreeMap<String, String>,
    identity: String,
) -> Result<(Vec<u8>, TokenSource), LaunchError> {
    match token_from_env(env)? {
        Some(t) => Ok(t),
        None => Ok((
            format!("dvm-derived:{identity}").into_bytes(),
            TokenSource::Derived(identity),
        )),
    }
}

fn build(
    place: Place,
    coordinator: Endpoint,
    (token, token_source): (Vec<u8>, TokenSource),
) -> Launch {
    Launch {
        rank: place.rank,
        world: place.world,
        local_rank: place.local_rank,
        local_size: place.local_size,
        source: place.source,
        coordinator,
        token,
        token_source,
    }
}

fn from_explicit(
    env: &BTreeMap<String, String>,
    explicit: &Explicit<'_>,
) -> Result<Launch, LaunchError> {
    let (hosts, rank) = match (explicit.hosts, explicit.rank) {
        (Some(h), Some(r)) => (h, r),
        (Some(_), None) => {
            return Err(LaunchError::ExplicitIncomplete {
                given: "hosts",
                missing: "rank",
            })
        }
        _ => {
            return Err(LaunchError::ExplicitIncomplete {
                given: "rank",
                missing: "hosts",
            })
        }
    };
    let mut endpoints = Vec::new();
    for item in hosts.split(',') {
        if endpoints.len() >= MAX_WORLD as usize {
            return Err(LaunchError::BadWorld {
                var: "--hosts".to_string(),
                value: u64::from(MAX_WORLD) + 1,
            });
        }
        endpoints.push(parse_endpoint("--hosts", item)?);
    }
    let world = endpoints.len() as u64;
    let rank = parse_number("--rank", rank)?;
    let (rank, world) = rank_in("--rank", rank, "the number of --hosts", world)?;
    let me = endpoints
        .get(rank as usize)
        .ok_or_else(|| LaunchError::NotBelow {
            rank_var: "--rank".to_string(),
            rank: u64::from(rank),
            size_var: "the number of --hosts".to_string(),
            size: u64::from(world),
        })?;
    let same_host = |e: &&Endpoint| e.host == me.host;
    let local_rank = endpoints
        .iter()
        .take(rank as usize)
        .filter(same_host)
        .count() as u32;
    let local_size = endpoints.iter().filter(same_host).count() as u32;
    let first = endpoints
        .first()
        .cloned()
        .ok_or_else(|| LaunchError::BadWorld {
            var: "--hosts".to_string(),
            value: 0,
        })?;
    let coordinator = coord_override(env)?.unwrap_or(first);
    // Every rank is given the same list, so it identifies the job among other jobs.
    let token = token_or_derived(env, format!("hosts={hosts}"))?;
    let place = Place {
        source: LaunchSource::Explicit,
        rank,
        world,
        local_rank,
        local_size,
    };
    Ok(build(place, coordinator, token))
}

fn from_local(env: &BTreeMap<String, String>) -> Result<Launch, LaunchError> {
    let rank = required(env, "DVM_RANK", "DVM_RANK", LaunchSource::Local)?;
    let world = required(env, "DVM_WORLD", "DVM_RANK", LaunchSource::Local)?;
    let (rank, world) = rank_in("DVM_RANK", rank, "DVM_WORLD", world)?;
    let coordinator = coord_override(env)?.ok_or_else(|| LaunchError::Missing {
        missing: "DVM_COORD".to_string(),
        present: "DVM_RANK".to_string(),
        launcher: LaunchSource::Local,
    })?;
    // The local launcher makes a random token for each job; its absence means the variables
    // did not come from it.
    let token = token_from_env(env)?.ok_or(LaunchError::TokenMissing {
        launcher: LaunchSource::Local,
    })?;
    let place = Place {
        source: LaunchSource::Local,
        rank,
        world,
        local_rank: rank,
        local_size: world,
    };
    Ok(build(place, coordinator, token))
}

fn finish_ompi(env: &BTreeMap<String, String>, place: Place) -> Result<Launch, LaunchError> {
    // Open MPI 4 sets both, Open MPI 5 (PRRTE) only the namespace.
    let job = get(env, "PMIX_NAMESPACE")
        .or_else(|| get(env, "OMPI_MCA_ess_base_jobid"))
        .filter(|j| !j.is_empty());
    let coordinator = match coord_override(env)? {
        Some(c) => c,
        None if place.local_size == place.world => {
            let job = job.ok_or(LaunchError::NoJobIdentity {
                launcher: LaunchSource::OpenMpi,
                world: place.world,
                why: "neither PMIX_NAMESPACE nor OMPI_MCA_ess_base_jobid is set",
            })?;
            Endpoint {
                host: "127.0.0.1".to_string(),
                port: derived_port(&format!("ompi:{job}")),
            }
        }
        None => {
            return Err(LaunchError::CoordinatorUnknown {
                launcher: LaunchSource::OpenMpi,
                world: place.world,
                local_size: place.local_size,
                how: HOW_MPIRUN,
            })
        }
    };
    let identity = match job {
        Some(job) => format!("ompi:{job}"),
        None => format!("ompi:coord={coordinator}:world={}", place.world),
    };
    let token = token_or_derived(env, identity)?;
    Ok(build(place, coordinator, token))
}

fn finish_hydra(
    env: &BTreeMap<String, String>,
    place: Place,
    facts: &HostFacts,
) -> Result<Launch, LaunchError> {
    let coordinator = match coord_override(env)? {
        Some(c) => c,
        None if place.local_size == place.world => {
            let pid = facts.hydra_proxy_pid.ok_or(LaunchError::NoJobIdentity {
                launcher: LaunchSource::Hydra,
                world: place.world,
                why: "Hydra sets no job id and no hydra_pmi_proxy was found among this process's ancestors",
            })?;
            Endpoint {
                host: "127.0.0.1".to_string(),
                port: derived_port(&format!("hydra-proxy:{pid}")),
            }
        }
        None => {
            return Err(LaunchError::CoordinatorUnknown {
                launcher: LaunchSource::Hydra,
                world: place.world,
                local_size: place.local_size,
                how: HOW_HYDRA,
            })
        }
    };
    // The proxy pid is per host, so the job-wide identity is the coordinator every rank uses.
    let token = token_or_derived(
        env,
        format!("hydra:coord={coordinator}:world={}", place.world),
    )?;
    Ok(build(place, coordinator, token))
}

fn finish_slurm(env: &BTreeMap<String, String>, s: Slurm) -> Result<Launch, LaunchError> {
    let coordinator = match coord_override(env)? {
        Some(c) => c,
        None => {
            let list = get(env, "SLURM_STEP_NODELIST").ok_or_else(|| LaunchError::Missing {
                missing: "SLURM_STEP_NODELIST".to_string(),
                present: "SLURM_PROCID".to_string(),
                launcher: LaunchSource::Slurm,
            })?;
            let host = hostlist::first(list).map_err(|source| LaunchError::BadHostlist {
                var: "SLURM_STEP_NODELIST".to_string(),
                source,
            })?;
            Endpoint {
                host,
                port: slurm_coordinator_port(s.job_id, s.step_id),
            }
        }
    };
    let token = token_or_derived(env, format!("slurm:{}.{}", s.job_id, s.step_id))?;
    Ok(build(s.place, coordinator, token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> BTreeMap<String, String> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn detect_env(vars: &[(&str, &str)]) -> Result<Option<Launch>, LaunchError> {
        detect(&env(vars), &Explicit::default(), &HostFacts::default())
    }

    fn launch(vars: &[(&str, &str)]) -> Launch {
        detect_env(vars)
            .expect("valid launch environment")
            .expect("a launcher is present")
    }

    fn error(vars: &[(&str, &str)]) -> String {
        detect_env(vars)
            .expect_err("the environment is invalid")
            .to_string()
    }

    fn ep(host: &str, port: u16) -> Endpoint {
        Endpoint {
            host: host.to_string(),
            port,
        }
    }

    const OMPI_1HOST: &[(&str, &str)] = &[
        ("OMPI_COMM_WORLD_RANK", "1"),
        ("OMPI_COMM_WORLD_SIZE", "2"),
        ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ("PMIX_NAMESPACE", "1945501697"),
        ("OMPI_MCA_ess_base_jobid", "1945501697"),
    ];

    const HYDRA_1HOST: &[(&str, &str)] = &[
        ("PMI_RANK", "0"),
        ("PMI_SIZE", "2"),
        ("PMI_FD", "6"),
        ("MPI_LOCALRANKID", "0"),
        ("MPI_LOCALNRANKS", "2"),
        ("HYDI_CONTROL_FD", "7"),
    ];

    const SLURM: &[(&str, &str)] = &[
        ("SLURM_PROCID", "2"),
        ("SLURM_NTASKS", "3"),
        ("SLURM_LOCALID", "0"),
        ("SLURM_STEP_NODELIST", "node[07-09]"),
        ("SLURM_JOB_ID", "123456"),
        ("SLURM_STEP_ID", "0"),
    ];

    fn with(
        base: &[(&str, &str)],
        extra: &[(&'static str, &'static str)],
    ) -> Vec<(String, String)> {
        let mut m: BTreeMap<String, String> = env(base);
        for (k, v) in extra {
            m.insert(k.to_string(), v.to_string());
        }
        m.into_iter().collect()
    }

    fn refs(v: &[(String, String)]) -> Vec<(&str, &str)> {
        v.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }

    #[test]
    fn no_launcher_is_a_single_node_run() {
        assert!(detect_env(&[("HOME", "/root")]).expect("valid").is_none());
        // A Slurm batch script (no step id, or a special one) is not an srun task.
        assert!(detect_env(&[("SLURM_PROCID", "0"), ("SLURM_JOB_ID", "5")])
            .expect("valid")
            .is_none());
        assert!(detect_env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_JOB_ID", "5"),
            ("SLURM_STEP_ID", "4294967291")
        ])
        .expect("valid")
        .is_none());
        assert!(detect_env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_JOB_ID", "5"),
            ("SLURM_STEP_ID", "-5")
        ])
        .expect("valid")
        .is_none());
    }

    #[test]
    fn explicit_hosts_and_rank() {
        let e = env(&[("DVM_JOB_TOKEN", "s3cret")]);
        let explicit = Explicit {
            hosts: Some("h1:7700,h2:7700,h1:7701,[::1]:9"),
            rank: Some("2"),
        };
        let l = detect(&e, &explicit, &HostFacts::default())
            .expect("valid")
            .expect("explicit launch");
        assert_eq!((l.rank, l.world, l.local_rank, l.local_size), (2, 4, 1, 2));
        assert_eq!(l.source, LaunchSource::Explicit);
        assert_eq!(l.coordinator, ep("h1", 7700));
        assert_eq!(l.token, b"s3cret");
        assert_eq!(l.token_source, TokenSource::Env);
        // Without a token, the list itself identifies the job (same on every rank).
        let l0 = detect(&BTreeMap::new(), &explicit, &HostFacts::default())
            .expect("valid")
            .expect("explicit launch");
        assert!(matches!(l0.token_source, TokenSource::Derived(_)));
        assert!(
            !format!("{l:?}").contains("s3cret"),
            "Debug hides the token"
        );
    }

    #[test]
    fn explicit_errors() {
        let run = |hosts: Option<&str>, rank: Option<&str>| {
            detect(
                &BTreeMap::new(),
                &Explicit { hosts, rank },
                &HostFacts::default(),
            )
            .expect_err("invalid explicit settings")
            .to_string()
        };
        assert_eq!(
            run(Some("h1:1"), None),
            "--hosts was given without --rank: a multi-node run needs both"
        );
        assert!(run(None, Some("0")).contains("--rank was given without --hosts"));
        assert_eq!(
            run(Some("h1:1,h2:1"), Some("2")),
            "--rank=2 is not below the number of --hosts=2"
        );
        assert_eq!(run(Some("h1:1"), Some("x")), "--rank=\"x\" is not a number");
        assert!(run(Some("h1:1,h2"), Some("0")).contains("--hosts=\"h2\" is not host:port"));
        assert_eq!(
            run(Some("h1:1,,h2:2"), Some("0")),
            "--hosts=\"\" is not host:port (empty)"
        );
        assert!(run(Some("h1:99999"), Some("0")).contains("port above 65535"));
        assert!(run(Some("h1:0"), Some("0")).contains("port 0"));
        assert!(run(Some("::1:5"), Some("0")).contains("[ADDR]:PORT"));
    }

    #[test]
    fn local_launcher_children() {
        let l = launch(&[
            ("DVM_RANK", "1"),
            ("DVM_WORLD", "4"),
            ("DVM_COORD", "127.0.0.1:41000"),
            ("DVM_JOB_TOKEN", "abc"),
            // Inherited from an outer launcher: the local launcher is the inner one.
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "1"),
        ]);
        assert_eq!((l.rank, l.world, l.local_rank, l.local_size), (1, 4, 1, 4));
        assert_eq!(l.source, LaunchSource::Local);
        assert_eq!(l.coordinator, ep("127.0.0.1", 41000));
        assert_eq!(l.token, b"abc");
        assert_eq!(
            error(&[
                ("DVM_RANK", "1"),
                ("DVM_WORLD", "4"),
                ("DVM_JOB_TOKEN", "a")
            ]),
            "DVM_COORD is not set, but DVM_RANK is: dvm's local launcher sets both"
        );
        assert_eq!(
            error(&[("DVM_RANK", "1"), ("DVM_WORLD", "4"), ("DVM_COORD", "h:1")]),
            "dvm's local launcher does not pass a job token; set DVM_JOB_TOKEN or DVM_JOB_TOKEN_FILE"
        );
        assert_eq!(
            error(&[("DVM_RANK", "4"), ("DVM_WORLD", "4")]),
            "DVM_RANK=4 is not below DVM_WORLD=4"
        );
        assert_eq!(
            error(&[("DVM_RANK", "0"), ("DVM_WORLD", "0")]),
            "DVM_WORLD=0: a job has between 1 and 65536 processes"
        );
        assert_eq!(
            error(&[("DVM_RANK", "0"), ("DVM_WORLD", "70000")]),
            "DVM_WORLD=70000: a job has between 1 and 65536 processes"
        );
        assert_eq!(
            error(&[
                ("DVM_RANK", "0"),
                ("DVM_WORLD", "2"),
                ("DVM_COORD", "nohost")
            ]),
            "DVM_COORD=\"nohost\" is not host:port (no ':PORT')"
        );
    }

    #[test]
    fn open_mpi_on_one_host_derives_the_port_from_the_namespace() {
        let l = launch(OMPI_1HOST);
        assert_eq!((l.rank, l.world, l.local_rank, l.local_size), (1, 2, 1, 2));
        assert_eq!(l.source, LaunchSource::OpenMpi);
        assert_eq!(l.coordinator.host, "127.0.0.1");
        assert!((BASE_PORT..BASE_PORT + PORT_SPAN).contains(&l.coordinator.port));
        assert_eq!(
            l.token_source,
            TokenSource::Derived("ompi:1945501697".to_string())
        );
        // Every rank of the job derives the same; another job derives another.
        let rank0 = with(
            OMPI_1HOST,
            &[
                ("OMPI_COMM_WORLD_RANK", "0"),
                ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
            ],
        );
        let l0 = launch(&refs(&rank0));
        assert_eq!(
            (l0.coordinator.clone(), l0.token.clone()),
            (l.coordinator.clone(), l.token.clone())
        );
        let other = with(OMPI_1HOST, &[("PMIX_NAMESPACE", "1945567233")]);
        let lo = launch(&refs(&other));
        assert_ne!(lo.coordinator.port, l.coordinator.port);
        assert_ne!(lo.token, l.token);
        // DVM_COORD and DVM_JOB_TOKEN win.
        let set = with(
            OMPI_1HOST,
            &[("DVM_COORD", "h1:7700"), ("DVM_JOB_TOKEN", "t")],
        );
        let ls = launch(&refs(&set));
        assert_eq!(ls.coordinator, ep("h1", 7700));
        assert_eq!(
            (ls.token.as_slice(), ls.token_source),
            (&b"t"[..], TokenSource::Env)
        );
    }

    #[test]
    fn open_mpi_across_hosts_needs_dvm_coord() {
        let multi = with(
            OMPI_1HOST,
            &[("OMPI_COMM_WORLD_SIZE", "4"), ("OMPI_COMM_WORLD_RANK", "3")],
        );
        let e = error(&refs(&multi));
        assert!(e.contains("mpirun -x DVM_COORD=host:port"), "{e}");
        assert!(
            e.contains("started 4 ranks over several hosts (2 on this one)"),
            "{e}"
        );
        let given = with(&refs(&multi), &[("DVM_COORD", "10.0.0.1:7700")]);
        assert_eq!(launch(&refs(&given)).coordinator, ep("10.0.0.1", 7700));
    }

    #[test]
    fn open_mpi_errors_name_variable_and_value() {
        let bad = with(
            OMPI_1HOST,
            &[("OMPI_COMM_WORLD_RANK", "3"), ("OMPI_COMM_WORLD_SIZE", "3")],
        );
        assert_eq!(
            error(&refs(&bad)),
            "OMPI_COMM_WORLD_RANK=3 is not below OMPI_COMM_WORLD_SIZE=3"
        );
        let nan = with(OMPI_1HOST, &[("OMPI_COMM_WORLD_SIZE", "two")]);
        assert_eq!(
            error(&refs(&nan)),
            "OMPI_COMM_WORLD_SIZE=\"two\" is not a number"
        );
        assert_eq!(
            error(&[("OMPI_COMM_WORLD_RANK", "0")]),
            "OMPI_COMM_WORLD_SIZE is not set, but OMPI_COMM_WORLD_RANK is: Open MPI mpirun sets both"
        );
        let local = with(OMPI_1HOST, &[("OMPI_COMM_WORLD_LOCAL_SIZE", "3")]);
        assert_eq!(
            error(&refs(&local)),
            "OMPI_COMM_WORLD_LOCAL_SIZE=\"3\": more ranks on this host than OMPI_COMM_WORLD_SIZE=2"
        );
        let huge = with(OMPI_1HOST, &[("OMPI_COMM_WORLD_RANK", "99999999999")]);
        assert_eq!(
            error(&refs(&huge)),
            "OMPI_COMM_WORLD_RANK=99999999999 is not below OMPI_COMM_WORLD_SIZE=2"
        );
        let plus = with(OMPI_1HOST, &[("OMPI_COMM_WORLD_RANK", "+1")]);
        assert_eq!(
            error(&refs(&plus)),
            "OMPI_COMM_WORLD_RANK=\"+1\" is not a number"
        );
    }

    #[test]
    fn hydra_on_one_host_derives_the_port_from_the_proxy() {
        let facts = HostFacts {
            hydra_proxy_pid: Some(8065),
        };
        let l = detect(&env(HYDRA_1HOST), &Explicit::default(), &facts)
            .expect("valid")
            .expect("hydra launch");
        assert_eq!((l.rank, l.world, l.local_rank, l.local_size), (0, 2, 0, 2));
        assert_eq!(l.source, LaunchSource::Hydra);
        assert_eq!(l.coordinator.host, "127.0.0.1");
        let other = detect(
            &env(HYDRA_1HOST),
            &Explicit::default(),
            &HostFacts {
                hydra_proxy_pid: Some(9000),
            },
        )
        .expect("valid")
        .expect("hydra launch");
        assert_ne!(other.coordinator.port, l.coordinator.port);
        assert_ne!(other.token, l.token);
        // Without the proxy there is nothing job-wide to derive from.
        let e = error(HYDRA_1HOST);
        assert!(
            e.contains("no hydra_pmi_proxy") && e.contains("DVM_COORD"),
            "{e}"
        );
    }

    #[test]
    fn hydra_across_hosts_needs_dvm_coord() {
        let multi = with(HYDRA_1HOST, &[("PMI_SIZE", "6")]);
        let e = error(&refs(&multi));
        assert!(e.contains("mpiexec -env DVM_COORD host:port"), "{e}");
        let given = with(&refs(&multi), &[("DVM_COORD", "[fd00::1]:7700")]);
        let l = launch(&refs(&given));
        assert_eq!(l.coordinator, ep("fd00::1", 7700));
        assert_eq!(l.coordinator.to_string(), "[fd00::1]:7700");
        assert_eq!(
            error(&[("PMI_RANK", "0"), ("PMI_SIZE", "2")]),
            "MPI_LOCALRANKID is not set, but PMI_RANK is: MPICH Hydra mpiexec sets both"
        );
        let half = with(HYDRA_1HOST, &[]);
        let mut half: BTreeMap<String, String> = half.into_iter().collect();
        half.remove("MPI_LOCALNRANKS");
        let e = detect(&half, &Explicit::default(), &HostFacts::default())
            .expect_err("incomplete")
            .to_string();
        assert_eq!(
            e,
            "MPI_LOCALNRANKS is not set, but MPI_LOCALRANKID is: MPICH Hydra mpiexec sets both"
        );
    }

    #[test]
    fn slurm_coordinator_is_the_first_node() {
        let l = launch(SLURM);
        assert_eq!((l.rank, l.world, l.local_rank), (2, 3, 0));
        assert_eq!(l.source, LaunchSource::Slurm);
        assert_eq!(l.coordinator, ep("node07", 23_456));
        assert_eq!(
            l.token_source,
            TokenSource::Derived("slurm:123456.0".to_string())
        );
        let step1 = with(SLURM, &[("SLURM_STEP_ID", "1")]);
        let l1 = launch(&refs(&step1));
        assert_ne!(l1.token, l.token);
        // Another step of the job, possibly running at the same time: another port.
        assert_eq!(l1.coordinator, ep("node07", 31_375)); // 20000 + (123456 + 7919) % 20000
        let ports: std::collections::BTreeSet<u16> = (0..u64::from(PORT_SPAN))
            .map(|step| slurm_coordinator_port(123_456, step))
            .collect();
        assert_eq!(ports.len(), usize::from(PORT_SPAN));
        assert!(ports
            .iter()
            .all(|p| (BASE_PORT..BASE_PORT + PORT_SPAN).contains(p)));
        let last = slurm_coordinator_port(u64::MAX, u64::from(u32::MAX));
        assert!((BASE_PORT..BASE_PORT + PORT_SPAN).contains(&last));
    }

    #[test]
    fn slurm_errors() {
        let nan = with(SLURM, &[("SLURM_PROCID", "abc")]);
        assert_eq!(error(&refs(&nan)), "SLURM_PROCID=\"abc\" is not a number");
        let big = with(SLURM, &[("SLURM_PROCID", "3")]);
        assert_eq!(
            error(&refs(&big)),
            "SLURM_PROCID=3 is not below SLURM_NTASKS=3"
        );
        let list = with(SLURM, &[("SLURM_STEP_NODELIST", "node[07-")]);
        let e = error(&refs(&list));
        assert!(
            e.starts_with("SLURM_STEP_NODELIST: malformed host list \"node[07-\""),
            "{e}"
        );
        let mut nolist: BTreeMap<String, String> = env(SLURM);
        nolist.remove("SLURM_STEP_NODELIST");
        let e = detect(&nolist, &Explicit::default(), &HostFacts::default())
            .expect_err("no node list")
            .to_string();
        assert_eq!(
            e,
            "SLURM_STEP_NODELIST is not set, but SLURM_PROCID is: Slurm srun sets both"
        );
        let job = with(SLURM, &[("SLURM_JOB_ID", "")]);
        assert_eq!(error(&refs(&job)), "SLURM_JOB_ID=\"\" is not a number");
    }

    #[test]
    fn slurm_local_size_from_tasks_per_node() {
        let spread = with(
            SLURM,
            &[
                ("SLURM_NTASKS", "6"),
                ("SLURM_PROCID", "5"),
                ("SLURM_LOCALID", "1"),
                ("SLURM_NODEID", "2"),
                ("SLURM_STEP_TASKS_PER_NODE", "3,1,2"),
            ],
        );
        let l = launch(&refs(&spread));
        assert_eq!((l.rank, l.world, l.local_rank, l.local_size), (5, 6, 1, 2));
        assert_eq!(tasks_on_node("4,1(x2)", 0), Some(4));
        assert_eq!(tasks_on_node("4,1(x2)", 2), Some(1));
        assert_eq!(tasks_on_node("4,1(x2)", 3), None);
        assert_eq!(tasks_on_node("4,1(x", 1), None);
        let short = with(&refs(&spread), &[("SLURM_STEP_TASKS_PER_NODE", "3,1")]);
        assert_eq!(
            error(&refs(&short)),
            "SLURM_STEP_TASKS_PER_NODE=\"3,1\": no task count for SLURM_NODEID=2"
        );
        let over = with(&refs(&spread), &[("SLURM_LOCALID", "2")]);
        assert!(error(&refs(&over)).starts_with("SLURM_LOCALID=2 is not below"));
    }

    #[test]
    fn srun_pmi2_must_agree_with_slurm() {
        let agree = with(SLURM, &[("PMI_RANK", "2"), ("PMI_SIZE", "3")]);
        assert_eq!(launch(&refs(&agree)).source, LaunchSource::Slurm);
        let disagree = with(SLURM, &[("PMI_RANK", "1"), ("PMI_SIZE", "3")]);
        let e = error(&refs(&disagree));
        assert!(e.starts_with("conflicting launchers: PMI (PMI_RANK=1 PMI_SIZE=3) and Slurm (SLURM_PROCID=2 SLURM_NTASKS=3)"), "{e}");
    }

    #[test]
    fn inner_launchers_win_over_slurm_and_mpi_launchers_conflict() {
        // mpirun inside an sbatch allocation: the ranks inherit Slurm's variables.
        let nested = with(SLURM, OMPI_1HOST);
        assert_eq!(launch(&refs(&nested)).source, LaunchSource::OpenMpi);
        let nested = with(SLURM, HYDRA_1HOST);
        let l = detect(
            &refs(&nested)
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            &Explicit::default(),
            &HostFacts {
                hydra_proxy_pid: Some(1234),
            },
        )
        .expect("valid")
        .expect("hydra launch");
        assert_eq!(l.source, LaunchSource::Hydra);
        let both = with(OMPI_1HOST, HYDRA_1HOST);
        let e = error(&refs(&both));
        assert!(e.starts_with("conflicting launchers: Open MPI (OMPI_COMM_WORLD_RANK=1 OMPI_COMM_WORLD_SIZE=2) and PMI (PMI_RANK=0 PMI_SIZE=2)"), "{e}");
    }

    #[test]
    fn token_from_a_file() {
        let dir = std::env::temp_dir().join(format!("dvm-launch-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("token");
        std::fs::write(&path, b"file-secret\n").expect("write token");
        let p = path.to_str().expect("utf-8 temp path");
        let l = launch(
            &refs(&with(SLURM, &[]))
                .into_iter()
                .chain([("DVM_JOB_TOKEN_FILE", p)])
                .collect::<Vec<_>>(),
        );
        assert_eq!(l.token, b"file-secret");
        assert_eq!(l.token_source, TokenSource::File(path.clone()));
        std::fs::write(&path, b"\n").expect("write token");
        let e = error(&[
            ("DVM_RANK", "0"),
            ("DVM_WORLD", "1"),
            ("DVM_COORD", "h:1"),
            ("DVM_JOB_TOKEN_FILE", p),
        ]);
        assert_eq!(e, "DVM_JOB_TOKEN_FILE is empty");
        std::fs::write(&path, vec![b'x'; MAX_TOKEN_BYTES + 1]).expect("write token");
        let e = error(&[
            ("DVM_RANK", "0"),
            ("DVM_WORLD", "1"),
            ("DVM_COORD", "h:1"),
            ("DVM_JOB_TOKEN_FILE", p),
        ]);
        assert_eq!(
            e,
            "DVM_JOB_TOKEN_FILE holds 1025 bytes, more than the 1024 allowed"
        );
        std::fs::remove_dir_all(&dir).expect("clean up");
        let e = error(&[
            ("DVM_RANK", "0"),
            ("DVM_WORLD", "1"),
            ("DVM_COORD", "h:1"),
            ("DVM_JOB_TOKEN_FILE", p),
        ]);
        assert!(e.starts_with(&format!("DVM_JOB_TOKEN_FILE={p}: ")), "{e}");
        let e = error(&[
            ("DVM_RANK", "0"),
            ("DVM_WORLD", "1"),
            ("DVM_COORD", "h:1"),
            ("DVM_JOB_TOKEN_FILE", p),
            ("DVM_JOB_TOKEN", "x"),
        ]);
        assert_eq!(
            e,
            "both DVM_JOB_TOKEN and DVM_JOB_TOKEN_FILE are set; set one"
        );
        let e = error(&[
            ("DVM_RANK", "0"),
            ("DVM_WORLD", "1"),
            ("DVM_COORD", "h:1"),
            ("DVM_JOB_TOKEN", ""),
        ]);
        assert_eq!(e, "DVM_JOB_TOKEN is empty");
    }

    #[test]
    fn probe_finds_nothing_outside_hydra() {
        // The test runner is not under mpiexec; the walk must end cleanly at init.
        if std::env::var_os("PMI_RANK").is_none() {
            assert_eq!(HostFacts::probe().hydra_proxy_pid, None);
        }
        assert_eq!(find_ancestor("no-such-process-name"), None);
    }
}
