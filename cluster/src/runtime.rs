//! A cluster node's runtime: one `dvm` process of a multi-node run. It joins the job
//! (rendezvous, then the io_uring TCP mesh), builds the node's engine `Machine` on a cluster
//! `Backend`, and runs a service thread that drives the protocol (`node::Node`) with the
//! transport's messages.
//!
//! Roles: every node homes the pages `home_of` gives it, runs the runners it is sent, and
//! coordinates their endings. Node 0 also runs the root, is the sequencer, applies every ending
//! in timestamp order (so the console, watchers, children and exit-record joins behave exactly
//! as on one node), places new runners on nodes, and serves runner ids, stacks, heap and
//! console input (`Control`) to the others. It ends the run when no runner is left, collecting
//! each node's counters.
//!
//! Threads: the workers (engine) call into the protocol through `with_node` — prepare and reads
//! block the worker until the answer arrives; the service thread feeds received messages to the
//! same `with_node`. Endings handed out by the sequencer are applied by one thread at a time, in
//! the order the protocol emitted them (`apply_pending`, flat combining), on whichever thread
//! produced them.
//!
//! Failure: a lost peer (connection closed or silent past the transport's timeout) ends the run
//! on every node that notices, naming the node; blocked workers are released. Retries of the
//! protocol are for lossy networks (the simulation); over TCP a lost connection is a lost node.

use crate::handouts::{ControlAnswer, ControlOp, Handouts};
use crate::launch::Launch;
use crate::msg::{Msg, PageDelta};
use crate::node::{home_of, Done, Node, NodeConfig, NodeId};
use crate::rendezvous::{local_host_name, rendezvous_on, Preflight, RendezvousError};
use dvm_engine::backend::{Apply, Backend, Control, Finishing};
use dvm_engine::image::LoadedImage;
use dvm_engine::page::{MemoryLimit, Page, PageSource, Reserved};
use dvm_engine::report::{decode_ended, decode_task, encode_ended, encode_task};
use dvm_engine::runner::{Outcome, Task};
use dvm_engine::sched::Executor;
use dvm_engine::sched::WorkerInfo;
use dvm_engine::store::{
    Conflict, ConflictWith, PageKey, PageRead, PageStore, PageWrite, Publication, TxnId,
};
use dvm_engine::view::{canonical, Range};
use dvm_engine::vm::{Config, Machine, MachineParts, Report, Resources, RunError, Shared, Stats};
use dvm_perf::phase::{Phase, TimeSplit};
use dvm_transport::tcp::{TcpConfig, TcpTransport};
use dvm_transport::verbs::memlock::{registered_bytes, LockLimit};
use dvm_transport::verbs::published::{self, Verdict};
use dvm_transport::verbs::{Chosen, SlotRead, VerbsConfig, VerbsTransport};
use dvm_transport::{Event, PeerCounters, Transport, TransportError};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

/// A transaction id is its coordinator's rank above this shift and a sequence below it (below
/// `node::ATTEMPT_SHIFT`: the protocol numbers a prepare's attempts in the bits above that).
const TXN_RANK_SHIFT: u32 = 48;
const _: () = assert!(PUBLICATION_BIT >> crate::node::ATTEMPT_SHIFT > 0x7f);
/// Set in the id of an ending's exit-record publication when it has no prepared commit: a
/// refused transaction's id is spent at its homes.
const PUBLICATION_BIT: u64 = 1 << 47;
/// After a node is lost, how often the protocol retries what waited for it.
const LOSS_TICK: Duration = Duration::from_millis(50);
/// Largest transport payload used: larger messages are sent in fragments.
const FRAGMENT_BYTES: usize = (4 << 20) - 4096;
/// Largest reassembled message.
const MAX_MESSAGE_BYTES: usize = 256 << 20;
/// Cached remote page versions kept (each one page of memory) before the cache is emptied.
const CACHE_MAX_PAGES: usize = 65_536;
/// Runners' last nodes remembered for placement before the memory is emptied.
const AFFINITY_MAX_ENTRIES: usize = 1 << 16;

/// What identifies "the same memory" for placement affinity: the start of a runner's largest
/// using range.
fn affinity_key(task: &Task) -> Option<u64> {
    task.using
        .iter()
        .max_by_key(|range| range.end - range.start)
        .map(|range| canonical(range.start))
}

/// How long node 0 waits for the other nodes' reports at the end.
const REPORT_WAIT: Duration = Duration::from_secs(10);
/// How often a blocked worker looks whether the run failed.
const WAIT_SLICE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("joining the job: {0}")]
    Rendezvous(#[from] RendezvousError),
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    #[error("node {rank} ({addr}) was lost: {reason}")]
    NodeLost {
        rank: usize,
        addr: SocketAddr,
        reason: String,
    },
    #[error("node {rank} sent a message this node cannot use: {reason}")]
    Garbage { rank: usize, reason: String },
    #[error(
        "nodes {nodes:?} are lost, and they were every holder of some pages: committed data is \
         gone (a run survives the loss of up to --replicas minus 1 of a page's holders)"
    )]
    DataLost { nodes: Vec<usize> },
    #[error("node 0 declared this node dead (it was cut off from node 0 for too long)")]
    Fenced,
    #[error(
        "node 0 is cut off from a majority of the nodes: it still reaches only nodes \
         {reachable:?} of {world} and cannot tell whether it is the one cut off, so it stopped \
         committing and the run ends (a run goes on while node 0 reaches at least half of the \
         nodes)"
    )]
    CutOff { reachable: Vec<usize>, world: usize },
}

/// A node lost during a run that went on without it (node 0's record).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostNode {
    pub rank: usize,
    pub addr: SocketAddr,
    pub reason: String,
    /// Runners it was running or had queued that ran again elsewhere.
    pub rerun: Vec<u64>,
    /// Lost after every ending took effect, while the nodes were reporting: the output is
    /// complete, only its statistics are missing.
    pub after_end: bool,
    /// When it was lost, and how long after that every page it held had its full number of
    /// holders again (`None`: not yet, or no live node was left to take the copies).
    pub lost_at: std::time::Instant,
    pub recopied_ms: Option<u64>,
}

/// Settings of the cluster layer.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// A peer silent this long is lost (the run ends, naming it).
    pub peer_timeout_ms: u64,
    /// Joining the job (rendezvous and mesh) fails after this long, naming who is missing.
    pub connect_timeout_ms: u64,
    /// Node 0's coordinator socket, already bound by a launcher that chose the port (see
    /// [`crate::rendezvous::rendezvous_on`]); `None` binds the coordinator address.
    pub coordinator_socket: Option<Arc<TcpListener>>,
    /// The transport between nodes, as `dvm_transport::verbs::choose` decided it, and why
    /// (every rank must have decided alike: rank 0 checks it when they join).
    pub transport: Chosen,
    pub transport_reason: String,
    /// Nodes holding each page: its home and `replicas - 1` backups. With 2 or more a run goes
    /// on when a non-root node is lost (`docs/CLUSTER.md`, "Replicas and the loss of a
    /// node"); with 1 a lost node ends the run.
    pub replicas: usize,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            replicas: 2,
            peer_timeout_ms: 5_000,
            connect_timeout_ms: 30_000,
            transport: Chosen::Tcp,
            transport_reason: String::new(),
            coordinator_socket: None,
        }
    }
}

/// Latency samples of one kind of operation, in microseconds (the first `MAX_SAMPLES`).
#[derive(Default)]
struct Samples {
    micros: Mutex<Vec<u32>>,
}

const MAX_SAMPLES: usize = 1 << 18;

impl Samples {
    fn record(&self, since: Instant) {
        let micros = u32::try_from(since.elapsed().as_micros()).unwrap_or(u32::MAX);
        let mut samples = lock(&self.micros);
        if samples.len() < MAX_SAMPLES {
            samples.push(micros);
        }
    }

    fn summary(&self) -> Latency {
        let mut samples = lock(&self.micros).clone();
        samples.sort_unstable();
        let at = |q: f64| {
            samples
                .get(((samples.len().saturating_sub(1)) as f64 * q).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        Latency {
            count: samples.len() as u64,
            p50_us: at(0.5),
            p99_us: at(0.99),
        }
    }
}

/// How long an operation took: how many were measured, the median and the 99th percentile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u32,
    pub p99_us: u32,
}

/// One node's counters, as node 0 reports them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeRow {
    pub rank: u32,
    pub stats: Stats,
    pub remote_reads: u64,
    pub cache_hits: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub messages_sent: u64,
    pub messages_received: u64,
    /// Workers pinned to a processor.
    pub workers_pinned: u64,
    /// A page read from its remote home (not from the cache).
    pub remote_read: Latency,
    /// The prepare of a commit whose pages are all homed on the node, or not all.
    pub prepare_local: Latency,
    pub prepare_remote: Latency,
    /// The node's workers' time per phase, summed (ns; `None` unless `--stats` measured it).
    pub time: Option<TimeSplit>,
    /// The RDMA verbs work of the node's transport; `None` over TCP.
    pub verbs: Option<VerbsRow>,
}

/// A node's RDMA verbs work over the run, taken when it reports (before its Goodbyes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerbsRow {
    /// Work requests posted to send queues (SENDs, RDMA READs and WRITEs).
    pub work_requests: u64,
    /// Signalled send completions reaped (selective signalling: one SEND in several).
    pub signalled_completions: u64,
    /// RDMA READs posted (published page slots).
    pub rdma_reads: u64,
    /// Those whose page bytes landed in a page of this node's pool directly (a registered
    /// chunk), with no copy.
    pub reads_landed: u64,
    /// Page pool chunks registered for READs to land in (each once).
    pub chunks_registered: u64,
    /// RDMA WRITEs with immediate posted: pieces of the message stream larger than a SEND
    /// (prepares with their page deltas, page answers, histories copied to new holders).
    pub rdma_writes: u64,
    /// Stream bytes those WRITEs carried.
    pub bytes_written: u64,
    /// Page fetches served by a READ whose slot's newest version lies above the snapshot,
    /// from the previous version it describes (counted in `read_hits`).
    pub read_previous: u64,
    /// READs repeated because the first saw the slot being written (torn).
    pub read_retries: u64,
    /// Page fetches served by a READ, with no message to the home.
    pub read_hits: u64,
    /// Of those, the READs of a vacant slot at an original holder: the page has no version
    /// (zeros).
    pub read_zeros: u64,
    /// Page fetches whose READ could not be used (another page's slot, a version newer than
    /// the snapshot, two torn READs, no answer): they went to the home as a message.
    pub read_fallbacks: u64,
    /// Page reads sent to the page's home as a `Read` message (served by the home's CPU).
    pub page_read_messages: u64,
}

/// What a node's part of a run did. On node 0, `report` is the run's (its console, its exit
/// code, the whole machine's counters) and `nodes` has a row per node.
pub struct ClusterRun {
    pub rank: u32,
    pub world: u32,
    /// On node 0: the nodes lost during the run, which went on without them.
    pub lost: Vec<LostNode>,
    pub report: Report,
    pub nodes: Vec<NodeRow>,
    pub transport: Vec<PeerCounters>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Wait {
    Read(u64),
    Prepare(TxnId),
    Control(u64),
}

enum Reply {
    Done(Done),
    Control(Vec<u8>),
}

#[derive(Default)]
struct ApplyState {
    queue: VecDeque<Done>,
    busy: bool,
}

struct Cached {
    version_ts: u64,
    valid_to: u64,
    page: Option<Arc<Page>>,
}

/// Remote page versions this node read, and what it knows of later changes: node 0 sends,
/// in order, which pages every applied ending changed (`Msg::Changes`), so a cached version
/// stays usable for later snapshots until its page changes. That is what lets k-means read
/// its data pages once rather than once per iteration.
#[derive(Default)]
struct Cache {
    versions: HashMap<PageKey, Vec<Cached>>,
    pages: usize,
    /// Every ending up to this timestamp took effect, and the pages it changed are known.
    feed_ts: u64,
    /// For each page changed by an ending: an upper bound of the newest timestamp it changed at.
    changed_at: HashMap<PageKey, u64>,
}

impl Cache {
    fn lookup(&self, key: PageKey, snapshot_ts: u64) -> Option<Option<Arc<Page>>> {
        let versions = self.versions.get(&key)?;
        let changed = self.changed_at.get(&key).copied();
        versions
            .iter()
            .find(|v| {
                v.version_ts <= snapshot_ts
                    && (snapshot_ts <= v.valid_to
                        || (snapshot_ts <= self.feed_ts && changed.is_none_or(|c| c <= v.valid_to)))
            })
            .map(|v| v.page.clone())
    }

    fn insert(&mut self, key: PageKey, cached: Cached) {
        if self.pages >= CACHE_MAX_PAGES {
            self.versions.clear();
            self.pages = 0;
        }
        self.pages += 1;
        self.versions.entry(key).or_default().push(cached);
    }

    fn note_changes(&mut self, upto: u64, pages: &[PageKey]) {
        for page in pages {
            self.changed_at.insert(*page, upto);
        }
        self.feed_ts = self.feed_ts.max(upto);
    }
}

/// The transport a node runs over. Both serve the same cluster code through [`Transport`]; only
/// building and closing differ.
enum NodeTransport {
    Tcp(TcpTransport),
    Verbs(VerbsTransport),
}

impl NodeTransport {
    fn close(self) {
        match self {
            NodeTransport::Tcp(t) => t.close(),
            NodeTransport::Verbs(t) => t.close(),
        }
    }
}

impl std::ops::Deref for NodeTransport {
    type Target = dyn Transport;

    fn deref(&self) -> &Self::Target {
        match self {
            NodeTransport::Tcp(t) => t,
            NodeTransport::Verbs(t) => t,
        }
    }
}

struct Runtime {
    rank: usize,
    world: usize,
    peers: Vec<SocketAddr>,
    transport: NodeTransport,
    node: Mutex<Node>,
    applying: Mutex<ApplyState>,
    waiters: Mutex<HashMap<Wait, SyncSender<Reply>>>,
    next_req: AtomicU64,
    cache: Mutex<Cache>,
    pages: PageSource,
    store: Arc<PageStore>,
    /// The node's VM. Weak: the VM's backend holds the runtime, and the runtime must be the
    /// last owner of the transport when the run ends, to close it cleanly.
    shared: OnceLock<Weak<Shared>>,
    failure: Mutex<Option<ClusterError>>,
    failed: AtomicBool,
    /// Node 0: runners placed on each node whose endings have not taken effect.
    outstanding: Vec<AtomicU64>,
    /// Node 0: the runners placed on each other node, until their endings take effect: those
    /// of a lost node run again.
    placed: Mutex<Vec<HashMap<u64, Task>>>,
    /// Node 0: what `Control` handed runners on nodes that may be lost, so that their reruns
    /// get the same (`crate::handouts`).
    handouts: Handouts,
    replicas: usize,
    /// Nodes this node lost (node 0: declared dead), and, not on node 0, when and why, until
    /// node 0's view says so too.
    lost: Vec<AtomicBool>,
    /// Node 0: the peers it has heard from (any message), which over RDMA means they have
    /// published their loaded pages and marked their tables (`publish_loaded`).
    heard: Mutex<Vec<bool>>,
    heard_cv: Condvar,
    /// Nodes dead in this node's view, and that view's epoch: kept up to date after every
    /// protocol step, so an RDMA reader never READs a node declared dead, whose table stops
    /// at its death, once this node's snapshots can include commits after it (the view comes
    /// from node 0 before any change feed that covers them).
    view_dead: Vec<AtomicBool>,
    view_epoch: AtomicU64,
    lost_waiting: Mutex<Vec<(usize, Instant, String)>>,
    /// Node 0: the nodes lost so far, for the report.
    lost_nodes: Mutex<Vec<LostNode>>,
    /// Node 0: runners waiting for room on a node, with the node they prefer.
    placement: Mutex<VecDeque<(Option<usize>, Task)>>,
    /// Node 0: where a runner using the same memory last ran (keyed by the start of its
    /// largest using range), so that a node that stole such a runner once steals it again: it
    /// already holds its pages (k-means' partitions, iteration after iteration).
    last_ran: Mutex<HashMap<u64, usize>>,
    workers_per_node: u64,
    shutting_down: AtomicBool,
    /// Not node 0: a node that left cleanly before node 0's `Shutdown` reached this one, and
    /// when. Node 0 tells the nodes one after the other, so a node told first may leave before
    /// the others hear it; a departure that no `Shutdown` follows within `left_grace` is a loss.
    left_early: Mutex<Option<(usize, Instant)>>,
    left_grace: Duration,
    reports: Mutex<BTreeMap<usize, NodeRow>>,
    /// Node 0: the other nodes' profile samples.
    profiles: Mutex<Vec<dvm_perf::profile::Sample>>,
    fragments: Mutex<HashMap<(usize, u64), Vec<u8>>>,
    next_fragment: AtomicU64,
    remote_reads: AtomicU64,
    /// `Msg::Read`s this node sent to a page's home.
    read_messages: AtomicU64,
    /// One-sided fetches: READs repeated after a torn one, served, and given up on.
    read_retries: AtomicU64,
    read_hits: AtomicU64,
    read_fallbacks: AtomicU64,
    /// READs of vacant slots, used as zeros (counted in `read_hits` too).
    read_zeros: AtomicU64,
    /// READs whose slot's previous version served an older snapshot (counted in `read_hits`).
    read_previous: AtomicU64,
    cache_hits: AtomicU64,
    workers_pinned: AtomicU64,
    read_latency: Samples,
    prepare_local_latency: Samples,
    prepare_remote_latency: Samples,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Runtime {
    fn shared(&self) -> Option<Arc<Shared>> {
        self.shared.get().and_then(Weak::upgrade)
    }

    fn fail(&self, err: ClusterError) {
        {
            let mut failure = lock(&self.failure);
            if failure.is_none() {
                tracing::info!("ending the run: {err}");
                *failure = Some(err);
            }
        }
        self.failed.store(true, Ordering::Release);
        // Blocked workers get no answer: their waits end.
        lock(&self.waiters).clear();
        if let Some(shared) = self.shared() {
            shared.stop();
        }
    }

    /// Registers interest in `wait` before the request goes out, so an answer produced at once
    /// (a local home) is not missed.
    fn waiter(&self, wait: Wait) -> Receiver<Reply> {
        let (sender, receiver) = mpsc::sync_channel(1);
        lock(&self.waiters).insert(wait, sender);
        receiver
    }

    /// The answer, or `None` when the run failed (and is being torn down).
    fn wait(&self, receiver: &Receiver<Reply>) -> Option<Reply> {
        // A worker waiting on another node: a page wait says so itself, anything else (a
        // remote prepare, a control request) is network time.
        let waiting_for_page =
            dvm_perf::meter::with_current(|meter| meter.phase() == Phase::WaitPage);
        let _network =
            (waiting_for_page == Some(false)).then(|| dvm_perf::meter::enter(Phase::Network));
        loop {
            match receiver.recv_timeout(WAIT_SLICE) {
                Ok(reply) => return Some(reply),
                Err(RecvTimeoutError::Timeout) if !self.failed.load(Ordering::Acquire) => {}
                Err(_) => return None,
            }
        }
    }

    fn answer(&self, wait: Wait, reply: Reply) {
        if let Some(sender) = lock(&self.waiters).remove(&wait) {
            let _ = sender.try_send(reply);
        }
    }

    /// Runs `f` on the protocol node, then sends what it sent, answers who waits, and applies
    /// endings the sequencer handed out.
    fn with_node(&self, f: impl FnOnce(&mut Node)) {
        let (outbox, done) = {
            let mut node = lock(&self.node);
            f(&mut node);
            let epoch = node.view().epoch();
            if self.view_epoch.swap(epoch, Ordering::AcqRel) != epoch {
                for dead in node.view().dead() {
                    if let Some(flag) = self.view_dead.get(dead) {
                        flag.store(true, Ordering::Release);
                    }
                }
            }
            let outbox = node.take_outbox();
            // A lost node is handled in the order of the endings around it: those applied
            // before it are not run again.
            let (applied, done): (Vec<Done>, Vec<Done>) = node
                .take_done()
                .into_iter()
                .partition(|done| matches!(done, Done::Applied { .. } | Done::NodeLost { .. }));
            // Queued before the node lock goes, so endings keep the order they were handed
            // out in whichever threads pick them up.
            if !applied.is_empty() {
                lock(&self.applying).queue.extend(applied);
            }
            (outbox, done)
        };
        for (to, msg) in outbox {
            self.send(to, &msg);
        }
        for done in done {
            match done {
                Done::Read { req, .. } => self.answer(Wait::Read(req), Reply::Done(done)),
                Done::Prepare { txn, .. } => self.answer(Wait::Prepare(txn), Reply::Done(done)),
                Done::Finished { .. } | Done::Applied { .. } | Done::NodeLost { .. } => {}
                Done::DataLost { nodes, .. } => self.fail(ClusterError::DataLost { nodes }),
                Done::Fenced { .. } => self.fail(ClusterError::Fenced),
                Done::CutOff { reachable, world } => {
                    self.fail(ClusterError::CutOff { reachable, world })
                }
                Done::Settled { epoch } => {
                    for lost in lock(&self.lost_nodes).iter_mut() {
                        let elapsed = lost.lost_at.elapsed().as_millis();
                        lost.recopied_ms.get_or_insert(elapsed as u64);
                    }
                    tracing::info!("view {epoch}: the lost nodes' pages have new holders");
                }
            }
        }
        self.apply_pending();
    }

    /// Applies queued endings, one thread at a time, in order.
    fn apply_pending(&self) {
        let Some(shared) = self.shared() else { return };
        let mut state = lock(&self.applying);
        if state.busy {
            return;
        }
        state.busy = true;
        loop {
            let batch: Vec<Done> = state.queue.drain(..).collect();
            if batch.is_empty() {
                state.busy = false;
                return;
            }
            drop(state);
            let mut endings = Vec::with_capacity(batch.len());
            for done in batch {
                let (txn, first, last, effects) = match done {
                    Done::Applied {
                        txn,
                        first,
                        last,
                        effects,
                    } => (txn, first, last, effects),
                    Done::NodeLost { node, granted, .. } => {
                        // Endings queued before this one are applied first (they leave
                        // `placed`): what the lost node still holds runs again.
                        self.apply_endings(&shared, std::mem::take(&mut endings));
                        self.rerun_lost(node, &granted);
                        continue;
                    }
                    _ => continue,
                };
                let coordinator = (txn >> TXN_RANK_SHIFT) as usize;
                match decode_ended(&effects) {
                    Ok(ended) => endings.push((coordinator, first, last, ended)),
                    Err(err) => self.fail(ClusterError::Garbage {
                        rank: coordinator,
                        reason: format!("the ending of transaction {txn:#x}: {err}"),
                    }),
                }
            }
            self.apply_endings(&shared, endings);
            self.place_queued();
            state = lock(&self.applying);
        }
    }

    /// Applies decoded endings in order: the change feed first, then their effects.
    fn apply_endings(
        &self,
        shared: &Arc<Shared>,
        endings: Vec<(usize, u64, u64, dvm_engine::runner::Ended)>,
    ) {
        // Before the endings create runners anywhere: which pages they changed.
        if let Some((_, _, upto, _)) = endings.last() {
            let upto = *upto;
            let mut pages: Vec<PageKey> = endings
                .iter()
                .flat_map(|(_, _, _, ended)| {
                    let committed = match &ended.outcome {
                        Outcome::Committed { changes } => changes.as_slice(),
                        _ => &[],
                    };
                    committed
                        .iter()
                        .chain(&ended.exit_changes)
                        .map(|(key, _)| *key)
                })
                .collect();
            pages.sort_unstable();
            pages.dedup();
            lock(&self.cache).note_changes(upto, &pages);
            let horizon = self.store.prune_horizon();
            for node in (0..self.world).filter(|node| *node != self.rank) {
                self.send(
                    node,
                    &Msg::Changes {
                        upto,
                        horizon,
                        pages: pages.clone(),
                    },
                );
            }
        }
        for (coordinator, first, last, ended) in endings {
            if coordinator != self.rank {
                if let Some(placed) = lock(&self.placed).get_mut(coordinator) {
                    placed.remove(&ended.task.id);
                }
            }
            // Wherever it ran (a rerun may run here): it never runs again.
            self.handouts.forget(ended.task.id);
            // A lost node's count was reset when its runners were queued again.
            if let Some(count) = self.outstanding.get(coordinator) {
                let _ =
                    count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
            }
            shared.apply_ended(first, last, ended, &mut |task| self.dispatch(task));
        }
    }

    /// Node 0, in apply order: the runners `node` was running or had queued run again on the
    /// other nodes from their snapshots, except those whose commit was granted (`granted`:
    /// their endings are applied here all the same).
    fn rerun_lost(&self, node: NodeId, granted: &[Vec<u8>]) {
        let finishing: std::collections::BTreeSet<u64> = granted
            .iter()
            .filter_map(|effects| decode_ended(effects).ok())
            .map(|ended| ended.task.id)
            .collect();
        let tasks: Vec<Task> = lock(&self.placed)
            .get_mut(node)
            .map(|placed| {
                let mut tasks: Vec<Task> = placed
                    .drain()
                    .map(|(_, task)| task)
                    .filter(|task| !finishing.contains(&task.id))
                    .collect();
                tasks.sort_by_key(|task| task.id);
                tasks
            })
            .unwrap_or_default();
        if let Some(count) = self.outstanding.get(node) {
            count.store(0, Ordering::Release);
        }
        let ids: Vec<u64> = tasks.iter().map(|task| task.id).collect();
        for id in &ids {
            self.handouts.rewind(*id);
        }
        tracing::warn!(
            "node {node}: {} runner(s) it was running or had queued run again on the other \
             nodes from their snapshots {ids:?}; {} it had finished are applied",
            ids.len(),
            finishing.len()
        );
        if let Some(lost) = lock(&self.lost_nodes).iter_mut().find(|l| l.rank == node) {
            lost.rerun = ids;
        }
        self.requeue_front(tasks);
        self.place_queued();
    }

    fn send(&self, to: NodeId, msg: &Msg) {
        // A lost node is told nothing but the view that says so (if it still listens, it
        // stops: `Done::Fenced`).
        if self.is_lost(to) && !matches!(msg, Msg::View { .. }) {
            return;
        }
        let bytes = msg.encode();
        let result = if bytes.len() < FRAGMENT_BYTES {
            let mut payload = Vec::with_capacity(bytes.len() + 1);
            payload.push(0);
            payload.extend_from_slice(&bytes);
            self.transport.send(to as u32, &payload)
        } else {
            // Fragments: [1, id, index, count, bytes...]; the transport keeps their order.
            let id = self.next_fragment.fetch_add(1, Ordering::Relaxed);
            let chunk = FRAGMENT_BYTES - 32;
            let count = bytes.len().div_ceil(chunk) as u32;
            bytes
                .chunks(chunk)
                .enumerate()
                .try_for_each(|(index, part)| {
                    let mut payload = Vec::with_capacity(part.len() + 17);
                    payload.push(1);
                    payload.extend_from_slice(&id.to_le_bytes());
                    payload.extend_from_slice(&(index as u32).to_le_bytes());
                    payload.extend_from_slice(&count.to_le_bytes());
                    payload.extend_from_slice(part);
                    self.transport.send(to as u32, &payload)
                })
        };
        if let Err(err) = result {
            // A peer lost meanwhile is handled by its `PeerLost`.
            if !self.shutting_down.load(Ordering::Acquire) && !self.may_lose(to) {
                self.fail(ClusterError::Transport(err));
            }
        }
    }

    fn is_lost(&self, node: NodeId) -> bool {
        self.lost
            .get(node)
            .is_some_and(|lost| lost.load(Ordering::Acquire))
    }

    /// Whether the run goes on without `node` if it is lost.
    fn may_lose(&self, node: NodeId) -> bool {
        self.replicas >= 2 && node != 0
    }

    /// A whole message from a payload, or `None` while fragments are missing.
    fn reassemble(&self, from: usize, payload: Vec<u8>) -> Result<Option<Vec<u8>>, String> {
        match payload.first() {
            Some(0) => Ok(Some(payload[1..].to_vec())),
            Some(1) if payload.len() >= 17 => {
                let word = |at: usize, len: usize| {
                    let mut raw = [0u8; 8];
                    raw[..len].copy_from_slice(&payload[at..at + len]);
                    u64::from_le_bytes(raw)
                };
                let (id, index, count) = (word(1, 8), word(9, 4), word(13, 4));
                let mut fragments = lock(&self.fragments);
                let buffer = fragments.entry((from, id)).or_default();
                if buffer.len() + payload.len() - 17 > MAX_MESSAGE_BYTES {
                    return Err(format!("a message of more than {MAX_MESSAGE_BYTES} bytes"));
                }
                buffer.extend_from_slice(&payload[17..]);
                if index + 1 < count {
                    return Ok(None);
                }
                Ok(fragments.remove(&(from, id)))
            }
            _ => Err("a payload that is neither a message nor a fragment".into()),
        }
    }

    // ---- placement (node 0) ----

    /// Queues a new runner for placement (node 0). Instances take their snapshot now.
    fn dispatch(&self, mut task: Task) {
        let Some(shared) = self.shared() else { return };
        if task.snapshot.is_none() && !shared.start_instance(&mut task) {
            return;
        }
        let preferred = self.preferred_node(&task);
        lock(&self.placement).push_back((preferred, task));
    }

    /// Hands queued runners to nodes with room: each node holds at most `2 * workers`
    /// runners, so a node that finishes early takes work that would have waited elsewhere
    /// (stealing, decided here), while a node with room gets the runners that prefer it first.
    fn place_queued(&self) {
        let Some(shared) = self.shared() else { return };
        let capacity = 2 * self.workers_per_node.max(1);
        loop {
            let (target, task) = {
                let mut queue = lock(&self.placement);
                if queue.is_empty() {
                    return;
                }
                let load = |node: usize| self.outstanding[node].load(Ordering::Acquire);
                let lost = |node: usize| self.is_lost(node);
                let mut with_room: Vec<usize> = (0..self.world)
                    .filter(|node| !lost(*node) && load(*node) < capacity)
                    .collect();
                with_room.sort_by_key(|node| (load(*node), *node));
                // For the least busy node with room: a runner whose data lives there; else one
                // whose own node is full (stealing: it would wait), preferring one that last
                // ran there; else none, and the next node is asked: a node with room is not
                // robbed, or data would move for nothing. A bounded look down the queue.
                let last_ran = lock(&self.last_ran);
                let stealable = |preferred: &Option<usize>| {
                    preferred.is_none_or(|node| lost(node) || load(node) >= capacity)
                };
                let eligible = |target: usize| {
                    let window = || queue.iter().take(256);
                    window()
                        .position(|(preferred, _)| *preferred == Some(target))
                        .or_else(|| {
                            window().position(|(preferred, task)| {
                                stealable(preferred)
                                    && affinity_key(task).and_then(|key| last_ran.get(&key))
                                        == Some(&target)
                            })
                        })
                        .or_else(|| window().position(|(preferred, _)| stealable(preferred)))
                        .map(|index| (target, index))
                };
                let Some((target, index)) = with_room.into_iter().find_map(eligible) else {
                    return;
                };
                drop(last_ran);
                let Some((_, task)) = queue.remove(index) else {
                    return;
                };
                if let Some(key) = affinity_key(&task) {
                    let mut last_ran = lock(&self.last_ran);
                    if last_ran.len() >= AFFINITY_MAX_ENTRIES {
                        last_ran.clear();
                    }
                    last_ran.insert(key, target);
                }
                self.outstanding[target].fetch_add(1, Ordering::AcqRel);
                (target, task)
            };
            if target == self.rank {
                shared.inject(task);
            } else {
                let encoded = encode_task(&task);
                if self.may_lose(target) {
                    let id = task.id;
                    if let Some(placed) = lock(&self.placed).get_mut(target) {
                        placed.insert(id, task);
                    }
                    // `target` may have been lost since it was chosen, and its placed runners
                    // queued again (`rerun_lost`) before this one was recorded: `lost` is set
                    // before that, so seen here. Whichever of the two takes it from `placed`
                    // queues it again; without this the runner would go to a dead node and
                    // never run, and the run could end without it.
                    if self.is_lost(target) {
                        let orphan = lock(&self.placed)
                            .get_mut(target)
                            .and_then(|p| p.remove(&id));
                        if let Some(task) = orphan {
                            tracing::warn!(
                                "runner {id:#x} was placed on lost node {target}: placed again"
                            );
                            self.requeue_front(vec![task]);
                        }
                        continue;
                    }
                }
                self.send(target, &Msg::RunTask { task: encoded });
            }
        }
    }

    /// Queues runners to be placed again, ahead of new ones and in their order: the runners
    /// of a lost node, or one placed on a node lost meanwhile.
    fn requeue_front(&self, tasks: Vec<Task>) {
        let entries: Vec<_> = tasks
            .into_iter()
            .map(|task| (self.preferred_node(&task), task))
            .collect();
        let mut queue = lock(&self.placement);
        for entry in entries.into_iter().rev() {
            queue.push_front(entry);
        }
    }

    /// The node homing most of the bytes the runner may use (`None`: it uses none).
    fn preferred_node(&self, task: &Task) -> Option<usize> {
        let mut bytes = vec![0u64; self.world];
        let mut budget = 256u32;
        for range in task.using.iter().chain(&task.watched) {
            let mut at = canonical(range.start);
            let end = at.saturating_add(range.end - range.start);
            while at < end && budget > 0 {
                let chunk_end = ((at >> 21) + 1) << 21;
                let stop = end.min(chunk_end);
                bytes[home_of(at >> 12, self.world)] += stop - at;
                at = stop;
                budget -= 1;
            }
        }
        (0..self.world)
            .filter(|node| bytes[*node] > 0)
            .max_by_key(|node| (bytes[*node], std::cmp::Reverse(*node)))
    }

    // ---- messages ----

    fn on_message(self: &Arc<Self>, from: usize, msg: Msg) {
        match msg {
            Msg::RunTask { task } => match decode_task(&task) {
                Ok(task) => {
                    if let Some(shared) = self.shared() {
                        shared.inject(task);
                    }
                }
                Err(err) => self.fail(ClusterError::Garbage {
                    rank: from,
                    reason: format!("a task: {err}"),
                }),
            },
            Msg::Control { req, op } => self.serve_control(from, req, op),
            Msg::ControlReply { req, reply } => {
                self.answer(Wait::Control(req), Reply::Control(reply))
            }
            Msg::Shutdown => {
                self.shutting_down.store(true, Ordering::Release);
                if let Some(shared) = self.shared() {
                    shared.stop();
                }
            }
            Msg::Changes {
                upto,
                horizon,
                pages,
            } => {
                lock(&self.cache).note_changes(upto, &pages);
                // Snapshots are registered on node 0 only: here the watermark is the horizon.
                self.store.advance_watermark(horizon);
                self.with_node(|node| {
                    node.on_message(0, Msg::Watermark { ts: upto, epoch: 0 });
                });
            }
            Msg::Suspect { node } => match usize::try_from(node) {
                // Only from a node still in the run: a dead one's word does not count.
                Ok(node)
                    if self.rank == 0
                        && node < self.world
                        && !self.is_lost(from)
                        && self.may_lose(node) =>
                {
                    self.lose_node(node, format!("node {from} lost its connection to it"));
                }
                // The run cannot go on without `node`, and `from`, which lost it, is ending:
                // the report names the node lost, not the one that left because of it.
                Ok(node)
                    if self.rank == 0 && node != 0 && node < self.world && !self.is_lost(from) =>
                {
                    self.fail(ClusterError::NodeLost {
                        rank: node,
                        addr: self.peer_addr(node),
                        reason: format!("node {from} lost its connection to it"),
                    });
                }
                _ => {}
            },
            Msg::ProfileSamples { samples } => match dvm_perf::profile::decode(&samples) {
                Ok(samples) => lock(&self.profiles).extend(samples),
                Err(err) => self.fail(ClusterError::Garbage {
                    rank: from,
                    reason: format!("malformed profile samples: {err}"),
                }),
            },
            Msg::NodeReport { report } => match decode_row(&report) {
                Some(row) => {
                    lock(&self.reports).insert(from, row);
                }
                None => self.fail(ClusterError::Garbage {
                    rank: from,
                    reason: "a malformed node report".into(),
                }),
            },
            protocol => {
                self.with_node(|node| {
                    node.on_message(from, protocol);
                });
            }
        }
    }

    /// Node 0: a runner on `from` asks for an id, a stack, heap or input.
    fn serve_control(self: &Arc<Self>, from: usize, req: u64, op: Vec<u8>) {
        // A node declared dead gets nothing: its runners run again elsewhere, and what they
        // are handed there must not be taken by the lost attempt.
        if self.is_lost(from) {
            return;
        }
        let (runner, op) = match ControlOp::decode(&op) {
            Ok(request) => request,
            Err(reason) => {
                return self.fail(ClusterError::Garbage {
                    rank: from,
                    reason: format!("a control request: {reason}"),
                })
            }
        };
        if op == ControlOp::ConsoleInput {
            // Reading stdin may block: not on the service thread.
            let runtime = Arc::clone(self);
            std::thread::spawn(move || {
                let answer = runtime.hand_out(runner, op, Some(from));
                runtime.send(
                    from,
                    &Msg::ControlReply {
                        req,
                        reply: answer.encode(),
                    },
                );
            });
            return;
        }
        let answer = self.hand_out(runner, op, Some(from));
        self.send(
            from,
            &Msg::ControlReply {
                req,
                reply: answer.encode(),
            },
        );
    }

    /// Node 0: what `runner` is handed for `op`: what a lost attempt of it was handed at this
    /// point, else afresh, recorded when it runs on node `on` (not this one) and that node may
    /// be lost.
    fn hand_out(&self, runner: u64, op: ControlOp, on: Option<usize>) -> ControlAnswer {
        let dropped_ids = match self.handouts.replay(runner, op) {
            Ok(answer) => return answer,
            Err(dropped_ids) => dropped_ids,
        };
        let Some(shared) = self.shared() else {
            // The run is over: nothing is handed out any more.
            return match op {
                ControlOp::NewRunnerId => ControlAnswer::Id(Err("the run is over".into())),
                ControlOp::ForgetRunner => ControlAnswer::Done,
                ControlOp::AllocateStack { .. } | ControlOp::AllocateHeap { .. } => {
                    ControlAnswer::Range(None)
                }
                ControlOp::ConsoleInput => ControlAnswer::Byte(None),
            };
        };
        for _ in 0..dropped_ids {
            shared.local_control().forget_runner(runner);
        }
        let answer = op.serve(&**shared.local_control(), runner);
        if on.is_some_and(|node| self.may_lose(node)) {
            self.handouts.record(runner, op, answer.clone());
        }
        answer
    }
}

/// The engine's backend on a cluster node: prepare and commit through the protocol.
struct ClusterBackend {
    runtime: Arc<Runtime>,
    reader: Arc<ClusterReader>,
}

fn deltas_of<'a>(writes: impl Iterator<Item = &'a PageWrite>) -> Vec<PageDelta> {
    writes
        .map(|write| PageDelta::from_page(write.key, &write.data, &write.stored))
        .collect()
}

impl Backend for ClusterBackend {
    fn reader(&self) -> Arc<dyn PageRead> {
        Arc::clone(&self.reader) as Arc<dyn PageRead>
    }

    fn prefetch(&self, ranges: &[Range], snapshot_ts: u64) {
        self.reader.prefetch(ranges, snapshot_ts);
    }

    fn idle(&self) -> bool {
        match &self.runtime.transport {
            NodeTransport::Verbs(verbs) => verbs.progress(),
            NodeTransport::Tcp(_) => false,
        }
    }

    fn prepare(&self, txn: TxnId, snapshot_ts: u64, writes: &[PageWrite]) -> Result<(), Conflict> {
        let started = Instant::now();
        let rt = &self.runtime;
        let local = writes
            .iter()
            .all(|write| home_of(write.key, rt.world) == rt.rank);
        let deltas = deltas_of(writes.iter());
        let receiver = self.runtime.waiter(Wait::Prepare(txn));
        self.runtime
            .with_node(|node| node.prepare(txn, snapshot_ts, deltas));
        let answer = self.runtime.wait(&receiver);
        match local {
            true => rt.prepare_local_latency.record(started),
            false => rt.prepare_remote_latency.record(started),
        }
        match answer {
            Some(Reply::Done(Done::Prepare { result, .. })) => result,
            // The run failed and is ending: this commit does not happen.
            _ => Err(Conflict {
                key: writes.first().map_or(0, |write| write.key),
                offset: 0,
                with: ConflictWith::Prepared { txn },
            }),
        }
    }

    fn finish(&self, finishing: Finishing, _pages: &PageSource, _apply: &mut Apply<'_>) {
        let count = finishing.timestamps();
        let txn = match finishing.prepared {
            Some(_) => finishing.txn,
            None => finishing.txn | PUBLICATION_BIT,
        };
        let forced = finishing
            .exit
            .iter()
            .map(|publication| match publication {
                Publication::Page { write, .. } => {
                    PageDelta::from_page(write.key, &write.data, &write.stored)
                }
                Publication::Bytes(bytes) => PageDelta {
                    page: bytes.key,
                    mask: bytes.mask(),
                    bytes: bytes.bytes().to_vec(),
                },
            })
            .collect();
        let effects = encode_ended(&finishing.ended);
        // The prepared pages are at their homes already; node 0 applies the effects.
        drop(finishing);
        self.runtime
            .with_node(|node| node.finish(txn, forced, count, effects));
    }
}

/// Committed pages on a cluster: this node's own from its store, others' from their homes,
/// cached by version for the snapshots each answer is valid for.
struct ClusterReader {
    runtime: Arc<Runtime>,
}

/// Over RDMA, publishes the pages this node loaded (its part of the image and the `--load`
/// files, at timestamp 0) before it serves anyone, so that peers READ even their first fetch;
/// then marks every other slot vacant, which readers take to mean "no page of this slot has a
/// version" (`ClusterReader::finish_read`). A READ before that finds the slot empty and asks
/// the home, whose service starts only after this. A load larger than the
/// table publishes one page per slot (the last of the slot's pages in address order); a
/// reader of one of the others finds another page's slot and asks the home, which publishes it
/// then (`Node::home_read`).
fn publish_loaded(runtime: &Runtime) {
    let NodeTransport::Verbs(verbs) = &runtime.transport else {
        return;
    };
    let Some(table) = verbs.table() else {
        return;
    };
    let store = &runtime.store;
    let slots = table.slots();
    let mut chosen = vec![None; slots];
    for page in store.keys() {
        if let Some(slot) = chosen.get_mut(published::slot_of(page, slots)) {
            *slot = Some(page);
        }
    }
    for page in chosen.into_iter().flatten() {
        table.publish_with(page, || {
            store
                .read_version(page, u64::MAX)
                .version
                .map(|(ts, data)| (ts, Some(data)))
        });
    }
    table.fill_vacant();
}

/// What a READ's slot showed, for logs.
fn verdict_name(v: &Verdict) -> &'static str {
    match v {
        Verdict::Accept { .. } => "accept",
        Verdict::AcceptPrevious { .. } => "accept the previous version",
        Verdict::Empty => "empty",
        Verdict::Vacant => "vacant at a holder that joined after a loss",
        Verdict::Torn => "torn twice",
        Verdict::OtherPage => "another page",
        Verdict::Newer => "newer than the snapshot",
    }
}

/// The verbs transport's settings: the defaults, with the published table's slots from
/// `DVM_RDMA_PUBLISHED_SLOTS` when set (0: no table; every page read goes to the home's CPU).
fn verbs_config() -> Result<VerbsConfig, ClusterError> {
    let mut config = VerbsConfig::default();
    if let Some(value) = std::env::var_os("DVM_RDMA_PUBLISHED_SLOTS") {
        config.published_slots = value
            .to_str()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|slots| *slots <= 1 << 24)
            .ok_or_else(|| {
                ClusterError::Transport(TransportError::Config(format!(
                    "DVM_RDMA_PUBLISHED_SLOTS={value:?}: want a number of slots up to 16777216"
                )))
            })?;
    }
    Ok(config)
}

/// A page version's bytes as a home gives them (`None`: it holds no version, zeros).
type Contents = Option<Box<[u8; dvm_engine::page::PAGE_BYTES]>>;

/// An RDMA READ of a published slot in flight, and the change feed's horizon when it was posted.
struct PendingRead {
    feed_ts: u64,
    receiver: Receiver<SlotRead>,
    /// The count of the page lent to the READ (it lands there), until it is kept.
    reserved: Reserved,
    /// The READ goes to one of the page's holders from the start (its home or an original
    /// backup), which installed and published every version of it: a vacant slot there means
    /// the page has none (see `finish_read`).
    from_original_holder: bool,
}

/// How long a reader waits for one RDMA READ before asking the home instead (a READ that does
/// not complete ends its queue pair, and the peer is lost, well within the peer timeout).
const READ_WAIT: Duration = Duration::from_secs(5);

/// How long a reader polls for its READ's completion itself before it sleeps until the I/O
/// thread hands the READ over: a READ takes a few microseconds on InfiniBand or RoCE, less
/// than the I/O thread's wake-up on its completion channel.
const READ_SPIN: Duration = Duration::from_micros(20);

/// Pages a runner's start fetches at most (its using ranges may be far larger than what it
/// touches).
const PREFETCH_MAX_PAGES: usize = 1024;

impl ClusterReader {
    /// Fetches the remote pages of `ranges` this node has no usable version of, all requests
    /// in flight at once; the answers land in the cache.
    fn prefetch(&self, ranges: &[Range], snapshot_ts: u64) {
        let rt = &self.runtime;
        let mut wanted = Vec::new();
        {
            let cache = lock(&rt.cache);
            'ranges: for range in ranges {
                let first = canonical(range.start) >> 12;
                let last = (canonical(range.start) + (range.end - range.start - 1)) >> 12;
                for page in first..=last {
                    if wanted.len() >= PREFETCH_MAX_PAGES {
                        break 'ranges;
                    }
                    if home_of(page, rt.world) != rt.rank
                        && cache.lookup(page, snapshot_ts).is_none()
                    {
                        wanted.push(page);
                    }
                }
            }
        }
        if wanted.is_empty() {
            return;
        }
        let _wait = dvm_perf::meter::enter(Phase::WaitPage);
        // Every READ in flight at once first; what they cannot serve goes to the homes.
        let reads: Vec<(u64, Option<PendingRead>)> = wanted
            .iter()
            .map(|page| (*page, self.start_read(*page)))
            .collect();
        let mut wanted = Vec::new();
        for (page, receiver) in reads {
            match receiver.and_then(|r| self.finish_read(page, snapshot_ts, r)) {
                Some((version_ts, valid_to, data)) => {
                    rt.remote_reads.fetch_add(1, Ordering::Relaxed);
                    self.keep(page, version_ts, valid_to, data);
                }
                None => wanted.push(page),
            }
        }
        if wanted.is_empty() {
            return;
        }
        let requests: Vec<(u64, u64, Receiver<Reply>)> = wanted
            .iter()
            .map(|page| {
                let req = rt.next_req.fetch_add(1, Ordering::Relaxed);
                (req, *page, rt.waiter(Wait::Read(req)))
            })
            .collect();
        rt.with_node(|node| {
            for (req, page, _) in &requests {
                node.read(*req, *page, snapshot_ts);
            }
        });
        rt.read_messages
            .fetch_add(requests.len() as u64, Ordering::Relaxed);
        for (_, key, receiver) in requests {
            let Some(Reply::Done(Done::Read {
                version_ts,
                valid_to,
                data,
                ..
            })) = rt.wait(&receiver)
            else {
                return;
            };
            rt.remote_reads.fetch_add(1, Ordering::Relaxed);
            // Out of page memory: the runner will ask again, and fault if it must.
            if let Ok(data) = self.page_of(data) {
                self.keep(key, version_ts, valid_to, data);
            }
        }
    }

    /// Starts the RDMA READ of `page`'s slot in its home's published table; `None` over TCP or
    /// when the home publishes nothing.
    fn start_read(&self, page: u64) -> Option<PendingRead> {
        let rt = &self.runtime;
        let NodeTransport::Verbs(verbs) = &rt.transport else {
            return None;
        };
        // Taken before the READ is posted: every commit the feed covers then was published
        // before the READ reads the slot.
        let feed_ts = lock(&rt.cache).feed_ts;
        // The first holder not known lost: after a loss, the backup that became home (every
        // holder publishes what it installs, before it acknowledges). A holder lost without
        // this node knowing fails the READ, and the read goes to the home as a message.
        let start = home_of(page, rt.world);
        let lost = |node: NodeId| {
            let flag =
                |flags: &[AtomicBool]| flags.get(node).is_some_and(|f| f.load(Ordering::Acquire));
            flag(&rt.view_dead) || flag(&rt.lost)
        };
        let ring = crate::view::ring_from(start, rt.world, rt.replicas, lost);
        let home = *ring.first()?;
        // The READ lands in a page of this node's memory, which becomes the cached version.
        let (landing, reserved) = rt.pages.lend().ok()?;
        let receiver = verbs
            .read_published(home as u32, page, Some(landing))
            .ok()
            .flatten()?;
        let from_original_holder =
            crate::view::ring_from(start, rt.world, rt.replicas, |_| false).contains(&home);
        Some(PendingRead {
            feed_ts,
            receiver,
            reserved,
            from_original_holder,
        })
    }

    /// Judges the READ started by `start_read` for a reader at `snapshot_ts`; a torn slot is
    /// read once more. The version, the last snapshot it holds for, and its contents; `None`
    /// means: ask the home.
    ///
    /// Why an accepted slot is the version visible at `snapshot_ts` (`docs/CLUSTER.md`,
    /// "One-sided page reads"): the home republishes a page's newest version after every
    /// install of it and before acknowledging the install; a snapshot exists only once every
    /// commit at or below it was acknowledged by every home; so every version at or below the
    /// snapshot was published before this READ was posted, and a valid slot of this page with
    /// `version_ts <= snapshot_ts` has no version in (`version_ts`, `snapshot_ts`], nor up to
    /// the change feed's horizon, whose commits were acknowledged before it reached this node.
    fn finish_read(
        &self,
        page: u64,
        snapshot_ts: u64,
        pending: PendingRead,
    ) -> Option<(u64, u64, Option<Page>)> {
        let rt = &self.runtime;
        let mut pending = pending;
        for attempt in 0..2 {
            let Some(read) = self.await_read(&pending.receiver) else {
                break;
            };
            // Always given back: `start_read` lends one.
            let Some(mut landing) = read.page else {
                break;
            };
            let valid_from_feed = snapshot_ts.max(pending.feed_ts);
            let verdict = published::judge_in_place(&read.bytes, &mut landing, page, snapshot_ts);
            let contents =
                |zeros: bool, reserved: Reserved| (!zeros).then(|| reserved.adopt(landing));
            match verdict {
                Verdict::Accept { version_ts, zeros } => {
                    rt.read_hits.fetch_add(1, Ordering::Relaxed);
                    let data = contents(zeros, pending.reserved);
                    return Some((version_ts, valid_from_feed, data));
                }
                // The version below the slot's newest, which lies above the snapshot: it is
                // the one visible here by the same argument, and holds only below the newest.
                Verdict::AcceptPrevious {
                    version_ts,
                    zeros,
                    newer_ts,
                } => {
                    rt.read_hits.fetch_add(1, Ordering::Relaxed);
                    rt.read_previous.fetch_add(1, Ordering::Relaxed);
                    let valid_to = valid_from_feed.min(newer_ts - 1);
                    let data = contents(zeros, pending.reserved);
                    return Some((version_ts, valid_to, data));
                }
                // The home marked the slot vacant after publishing its loads, and replaces
                // the mark with the first version of any of the slot's pages, before
                // acknowledging it. An original holder (its home or an original backup) has
                // installed every version of the page, so none lies at or below the feed's
                // horizon, as for an accepted slot: the page reads as zeros up to it. A holder
                // that joined after a loss may still be waiting for its copies: ask.
                Verdict::Vacant if pending.from_original_holder => {
                    rt.read_hits.fetch_add(1, Ordering::Relaxed);
                    rt.read_zeros.fetch_add(1, Ordering::Relaxed);
                    return Some((0, valid_from_feed, None));
                }
                Verdict::Torn if attempt == 0 => {
                    rt.read_retries.fetch_add(1, Ordering::Relaxed);
                    match self.start_read(page) {
                        Some(again) => pending = again,
                        None => break,
                    }
                }
                other => {
                    tracing::debug!(
                        page = format_args!("{:#x}", page << 12),
                        snapshot_ts,
                        slot = verdict_name(&other),
                        "page READ not usable: asking the home"
                    );
                    break;
                }
            }
        }
        rt.read_fallbacks.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// The READ's bytes: polled for on this thread for `READ_SPIN` (posting and completing it
    /// here when the I/O thread is not in a turn), then waited for; `None` if it does not
    /// come within `READ_WAIT` or the peer went away.
    fn await_read(&self, receiver: &Receiver<SlotRead>) -> Option<SlotRead> {
        if let NodeTransport::Verbs(verbs) = &self.runtime.transport {
            let deadline = Instant::now() + READ_SPIN;
            loop {
                match receiver.try_recv() {
                    Ok(read) => return Some(read),
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return None,
                    Err(std::sync::mpsc::TryRecvError::Empty) => {}
                }
                if Instant::now() >= deadline {
                    break;
                }
                if !verbs.progress() {
                    std::hint::spin_loop();
                }
            }
        }
        receiver.recv_timeout(READ_WAIT).ok()
    }

    /// A home's answer (`None`: zeros) as a page of this node's memory.
    fn page_of(&self, data: Contents) -> Result<Option<Page>, MemoryLimit> {
        let Some(bytes) = data else {
            return Ok(None);
        };
        let mut page = self.runtime.pages.zeroed()?;
        page.copy_from_slice(&bytes[..]);
        Ok(Some(page))
    }

    /// A version of `key` (`None`: zeros), cached for the snapshots it holds for.
    fn keep(
        &self,
        key: PageKey,
        version_ts: u64,
        valid_to: u64,
        page: Option<Page>,
    ) -> Option<Arc<Page>> {
        let page = page.map(Arc::new);
        lock(&self.runtime.cache).insert(
            key,
            Cached {
                version_ts,
                valid_to,
                page: page.clone(),
            },
        );
        page
    }
}

impl PageRead for ClusterReader {
    fn read(&self, key: PageKey, snapshot_ts: u64) -> Result<Option<Arc<Page>>, MemoryLimit> {
        let rt = &self.runtime;
        if home_of(key, rt.world) == rt.rank {
            return rt.store.read(key, snapshot_ts);
        }
        if let Some(hit) = lock(&rt.cache).lookup(key, snapshot_ts) {
            rt.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hit);
        }
        rt.remote_reads.fetch_add(1, Ordering::Relaxed);
        let _wait = dvm_perf::meter::enter(Phase::WaitPage);
        let started = Instant::now();
        tracing::trace!(
            page = format_args!("{:#x}", key << 12),
            snapshot_ts,
            "remote read"
        );
        if let Some((version_ts, valid_to, data)) = self
            .start_read(key)
            .and_then(|receiver| self.finish_read(key, snapshot_ts, receiver))
        {
            rt.read_latency.record(started);
            return Ok(self.keep(key, version_ts, valid_to, data));
        }
        let req = rt.next_req.fetch_add(1, Ordering::Relaxed);
        let receiver = rt.waiter(Wait::Read(req));
        rt.with_node(|node| node.read(req, key, snapshot_ts));
        rt.read_messages.fetch_add(1, Ordering::Relaxed);
        let Some(Reply::Done(Done::Read {
            version_ts,
            valid_to,
            data,
            ..
        })) = rt.wait(&receiver)
        else {
            // The run failed and is ending; the runner ends with it.
            return Err(MemoryLimit { limit_bytes: 0 });
        };
        rt.read_latency.record(started);
        let data = self.page_of(data)?;
        Ok(self.keep(key, version_ts, valid_to, data))
    }
}

/// Runner ids, stacks, heap and console input, which node 0 hands out for the whole machine:
/// node 0's own runners ask its services directly, through the record a rerun replays; other
/// nodes' runners ask node 0 by message.
struct ClusterControl {
    runtime: Arc<Runtime>,
}

impl ClusterControl {
    /// Node 0's answer, or `None` when the run failed and is ending (or the answer made no
    /// sense: the run fails, naming node 0).
    fn ask(&self, runner: u64, op: ControlOp) -> Option<ControlAnswer> {
        let rt = &self.runtime;
        if rt.rank == 0 {
            return Some(rt.hand_out(runner, op, None));
        }
        let req = rt.next_req.fetch_add(1, Ordering::Relaxed);
        let receiver = rt.waiter(Wait::Control(req));
        rt.send(
            0,
            &Msg::Control {
                req,
                op: op.encode(runner),
            },
        );
        let Some(Reply::Control(bytes)) = rt.wait(&receiver) else {
            return None;
        };
        match ControlAnswer::decode(op, &bytes) {
            Ok(answer) => Some(answer),
            Err(reason) => {
                rt.fail(ClusterError::Garbage { rank: 0, reason });
                None
            }
        }
    }
}

impl Control for ClusterControl {
    fn new_runner_id(&self, runner: u64) -> Result<u64, String> {
        match self.ask(runner, ControlOp::NewRunnerId) {
            Some(ControlAnswer::Id(id)) => id,
            Some(other) => Err(format!(
                "node 0 answered a runner-id request with {other:?}"
            )),
            None => Err("node 0 is gone".to_string()),
        }
    }

    fn forget_runner(&self, runner: u64) {
        let _ = self.ask(runner, ControlOp::ForgetRunner);
    }

    fn allocate_stack(&self, runner: u64, space: u64) -> Option<Range> {
        match self.ask(runner, ControlOp::AllocateStack { space })? {
            ControlAnswer::Range(range) => range,
            _ => None,
        }
    }

    fn allocate_heap(&self, runner: u64, space: u64, len_bytes: u64) -> Option<Range> {
        match self.ask(runner, ControlOp::AllocateHeap { space, len_bytes })? {
            ControlAnswer::Range(range) => range,
            _ => None,
        }
    }

    fn console_input(&self, runner: u64) -> Option<u8> {
        match self.ask(runner, ControlOp::ConsoleInput)? {
            ControlAnswer::Byte(byte) => byte,
            _ => None,
        }
    }
}

/// The row's words: 31 counters, a flag saying whether a time split follows, its phases, a flag
/// saying whether verbs counters follow, and `VERBS_WORDS` of them.
const ROW_WORDS: usize = 32 + Phase::COUNT + 1 + VERBS_WORDS;
const VERBS_WORDS: usize = 13;

fn encode_row(row: &NodeRow) -> Vec<u8> {
    let s = &row.stats;
    let words: [u64; 31] = [
        u64::from(row.rank),
        s.workers,
        s.instructions,
        s.runners_started,
        s.runners_committed,
        s.runners_aborted,
        s.runners_failed,
        s.runners_faulted,
        s.conflicts,
        s.watcher_activations,
        s.pages_allocated,
        s.pages_copied,
        s.versions_pruned,
        s.peak_memory_bytes,
        s.wall_time_ms.to_bits(),
        row.remote_reads,
        row.cache_hits,
        row.bytes_sent,
        row.bytes_received,
        row.messages_sent,
        row.messages_received,
        row.remote_read.count,
        u64::from(row.remote_read.p50_us),
        u64::from(row.remote_read.p99_us),
        row.prepare_local.count,
        u64::from(row.prepare_local.p50_us),
        u64::from(row.prepare_local.p99_us),
        row.prepare_remote.count,
        u64::from(row.prepare_remote.p50_us),
        u64::from(row.prepare_remote.p99_us),
        row.workers_pinned,
    ];
    let time = row.time.unwrap_or_default();
    let verbs = row.verbs.unwrap_or_default();
    let verbs_words: [u64; VERBS_WORDS] = [
        verbs.work_requests,
        verbs.signalled_completions,
        verbs.rdma_reads,
        verbs.read_retries,
        verbs.read_hits,
        verbs.read_fallbacks,
        verbs.page_read_messages,
        verbs.read_zeros,
        verbs.rdma_writes,
        verbs.bytes_written,
        verbs.read_previous,
        verbs.reads_landed,
        verbs.chunks_registered,
    ];
    words
        .iter()
        .copied()
        .chain([u64::from(row.time.is_some())])
        .chain(time.ns)
        .chain([u64::from(row.verbs.is_some())])
        .chain(verbs_words)
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

/// Profile samples in wire chunks of at most `MAX_PROFILE_CHUNK_BYTES`.
fn profile_chunks(samples: Vec<dvm_perf::profile::Sample>) -> Vec<Vec<u8>> {
    let mut chunks = Vec::new();
    let mut rest = samples.as_slice();
    while !rest.is_empty() {
        // A sample encodes to at most 32 + 8 * MAX_STACK_DEPTH bytes.
        let most = 32 + 8 * dvm_perf::profile::MAX_STACK_DEPTH;
        let take = (crate::msg::MAX_PROFILE_CHUNK_BYTES / most).clamp(1, rest.len());
        chunks.push(dvm_perf::profile::encode(&rest[..take]));
        rest = &rest[take..];
    }
    chunks
}

fn decode_row(bytes: &[u8]) -> Option<NodeRow> {
    if bytes.len() != ROW_WORDS * 8 {
        return None;
    }
    let w: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(c);
            u64::from_le_bytes(raw)
        })
        .collect();
    Some(NodeRow {
        rank: u32::try_from(w[0]).ok()?,
        stats: Stats {
            workers: w[1],
            instructions: w[2],
            runners_started: w[3],
            runners_committed: w[4],
            runners_aborted: w[5],
            runners_failed: w[6],
            runners_faulted: w[7],
            conflicts: w[8],
            watcher_activations: w[9],
            pages_allocated: w[10],
            pages_copied: w[11],
            versions_pruned: w[12],
            peak_memory_bytes: w[13],
            wall_time_ms: f64::from_bits(w[14]),
        },
        remote_reads: w[15],
        cache_hits: w[16],
        bytes_sent: w[17],
        bytes_received: w[18],
        messages_sent: w[19],
        messages_received: w[20],
        remote_read: latency(&w[21..24])?,
        prepare_local: latency(&w[24..27])?,
        prepare_remote: latency(&w[27..30])?,
        workers_pinned: w[30],
        time: match w[31] {
            0 => None,
            1 => Some(TimeSplit {
                ns: std::array::from_fn(|i| w[32 + i]),
            }),
            _ => return None,
        },
        verbs: {
            let at = 32 + Phase::COUNT;
            match w[at] {
                0 => None,
                1 => Some(VerbsRow {
                    work_requests: w[at + 1],
                    signalled_completions: w[at + 2],
                    rdma_reads: w[at + 3],
                    read_retries: w[at + 4],
                    read_hits: w[at + 5],
                    read_fallbacks: w[at + 6],
                    page_read_messages: w[at + 7],
                    read_zeros: w[at + 8],
                    rdma_writes: w[at + 9],
                    bytes_written: w[at + 10],
                    read_previous: w[at + 11],
                    reads_landed: w[at + 12],
                    chunks_registered: w[at + 13],
                }),
                _ => return None,
            }
        },
    })
}

fn latency(words: &[u64]) -> Option<Latency> {
    Some(Latency {
        count: words[0],
        p50_us: u32::try_from(words[1]).ok()?,
        p99_us: u32::try_from(words[2]).ok()?,
    })
}

impl Runtime {
    fn row(&self, mut stats: Stats, workers: &[WorkerInfo]) -> NodeRow {
        let counters = self.transport.counters();
        let account = self.pages.account();
        stats.workers = stats.workers.max(self.workers_per_node);
        stats.peak_memory_bytes = stats.peak_memory_bytes.max(account.peak_bytes());
        stats.pages_allocated = stats.pages_allocated.max(account.pages_allocated());
        stats.pages_copied = stats.pages_copied.max(account.pages_copied());
        NodeRow {
            rank: self.rank as u32,
            stats,
            remote_reads: self.remote_reads.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            bytes_sent: counters.iter().map(|c| c.bytes_sent).sum(),
            bytes_received: counters.iter().map(|c| c.bytes_received).sum(),
            messages_sent: counters.iter().map(|c| c.messages_sent).sum(),
            messages_received: counters.iter().map(|c| c.messages_received).sum(),
            workers_pinned: self.workers_pinned.load(Ordering::Relaxed),
            remote_read: self.read_latency.summary(),
            prepare_local: self.prepare_local_latency.summary(),
            prepare_remote: self.prepare_remote_latency.summary(),
            time: workers
                .iter()
                .filter_map(|worker| worker.time)
                .reduce(|a, b| TimeSplit {
                    ns: std::array::from_fn(|i| a.ns[i] + b.ns[i]),
                }),
            verbs: match &self.transport {
                NodeTransport::Tcp(_) => None,
                NodeTransport::Verbs(t) => {
                    let v = t.verbs_counters();
                    Some(VerbsRow {
                        work_requests: v.work_requests_posted,
                        signalled_completions: v.signalled_completions,
                        rdma_reads: v.rdma_reads,
                        reads_landed: v.reads_landed,
                        chunks_registered: v.chunks_registered,
                        rdma_writes: v.rdma_writes,
                        bytes_written: v.bytes_written,
                        read_retries: self.read_retries.load(Ordering::Relaxed),
                        read_hits: self.read_hits.load(Ordering::Relaxed),
                        read_zeros: self.read_zeros.load(Ordering::Relaxed),
                        read_previous: self.read_previous.load(Ordering::Relaxed),
                        read_fallbacks: self.read_fallbacks.load(Ordering::Relaxed),
                        page_read_messages: self.read_messages.load(Ordering::Relaxed),
                    })
                }
            },
        }
    }

    fn peer_addr(&self, rank: usize) -> SocketAddr {
        self.peers
            .get(rank)
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The service thread: messages in, protocol driven, the end of the run.
    fn serve(self: &Arc<Self>) {
        let mut events = Vec::new();
        let mut report_deadline: Option<Instant> = None;
        let started = Instant::now();
        let mut last_tick = Instant::now();
        loop {
            events.clear();
            if let Err(err) = self.transport.poll(&mut events, Duration::from_millis(2)) {
                self.fail(ClusterError::Transport(err));
            }
            for event in events.drain(..) {
                self.on_event(event);
            }
            if !self.shutting_down.load(Ordering::Acquire) {
                let left = *lock(&self.left_early);
                if let Some((rank, at)) = left.filter(|(_, at)| at.elapsed() > self.left_grace) {
                    self.fail(ClusterError::NodeLost {
                        rank,
                        addr: self.peer_addr(rank),
                        reason: format!(
                            "it left before the run ended (no end of the run from node 0 \
                             within {} ms after it left)",
                            at.elapsed().as_millis()
                        ),
                    });
                }
            }
            if last_tick.elapsed() >= LOSS_TICK
                && (self.lost.iter().any(|lost| lost.load(Ordering::Acquire))
                    || lock(&self.node).view().epoch() > 0)
            {
                // After a loss: what waited for the lost node goes to the new holders
                // (retried reads, prepares made again, installs counted without it).
                last_tick = Instant::now();
                let now_us = started.elapsed().as_micros() as u64;
                self.with_node(|node| node.tick(now_us));
                self.check_lost_waiting();
            }
            if self.failed.load(Ordering::Acquire) {
                return;
            }
            let Some(shared) = self.shared() else {
                continue;
            };
            if self.rank == 0 {
                if report_deadline.is_none() && shared.is_done() {
                    // No runner is left anywhere: every ending was applied here.
                    self.shutting_down.store(true, Ordering::Release);
                    for node in 1..self.world {
                        self.send(node, &Msg::Shutdown);
                    }
                    report_deadline = Some(Instant::now() + REPORT_WAIT);
                }
                if let Some(deadline) = report_deadline {
                    let lost = self
                        .lost
                        .iter()
                        .filter(|l| l.load(Ordering::Acquire))
                        .count();
                    let all = lock(&self.reports).len() + 1 + lost >= self.world;
                    if all || Instant::now() > deadline {
                        return;
                    }
                }
            } else if self.shutting_down.load(Ordering::Acquire) {
                // The report goes once the workers have stopped (`run`).
                return;
            }
        }
    }

    /// Not node 0: a peer lost here that node 0 has not declared dead within the peer timeout
    /// (only the link between the two is down, say) cannot be done without: the run ends.
    fn check_lost_waiting(&self) {
        if self.rank == 0 || self.shutting_down.load(Ordering::Acquire) {
            return;
        }
        let dead = lock(&self.node).view().dead();
        let mut waiting = lock(&self.lost_waiting);
        waiting.retain(|(rank, _, _)| !dead.contains(rank));
        let overdue = waiting
            .iter()
            .find(|(_, at, _)| at.elapsed() > self.left_grace)
            .cloned();
        drop(waiting);
        if let Some((rank, _, reason)) = overdue {
            self.fail(ClusterError::NodeLost {
                rank,
                addr: self.peer_addr(rank),
                reason: format!("{reason}; node 0 still counts it alive"),
            });
        }
    }

    /// Node 0: `rank` is lost. It is declared dead (a new view for everyone); its pages are
    /// served by their backups from now on, and its runners run again (`rerun_lost`, in the
    /// order of the endings around the loss).
    fn lose_node(&self, rank: usize, reason: String) {
        if self.shutting_down.load(Ordering::Acquire)
            || self.lost[rank].swap(true, Ordering::AcqRel)
        {
            return;
        }
        let addr = self.peer_addr(rank);
        // What follows is the protocol's to say: declared dead (the run goes on, its pages
        // served by their backups), or node 0 left without a majority (the run ends).
        tracing::warn!("node {rank} ({addr}) was lost: {reason}");
        lock(&self.lost_nodes).push(LostNode {
            rank,
            addr,
            reason,
            rerun: Vec::new(),
            after_end: false,
            lost_at: Instant::now(),
            recopied_ms: None,
        });
        self.with_node(|node| node.declare_dead(rank));
    }

    /// A peer's connection is gone: the run goes on without it if it can (node 0 decides),
    /// else it ends, naming the peer.
    fn peer_lost(&self, rank: usize, reason: String) {
        if self.shutting_down.load(Ordering::Acquire) && self.may_lose(rank) {
            // Every ending took effect and the output is written: only its report is missing.
            if self.rank == 0 && !self.lost[rank].swap(true, Ordering::AcqRel) {
                lock(&self.lost_nodes).push(LostNode {
                    rank,
                    addr: self.peer_addr(rank),
                    reason,
                    rerun: Vec::new(),
                    after_end: true,
                    lost_at: Instant::now(),
                    recopied_ms: None,
                });
            }
            return;
        }
        if !self.may_lose(rank) || self.shutting_down.load(Ordering::Acquire) {
            if self.rank != 0 && rank != 0 && !self.shutting_down.load(Ordering::Acquire) {
                // Before this node leaves: node 0 may not have noticed yet, and would
                // otherwise report this node's departure as the loss.
                self.send(0, &Msg::Suspect { node: rank as u64 });
            }
            self.fail(ClusterError::NodeLost {
                rank,
                addr: self.peer_addr(rank),
                reason,
            });
        } else if self.rank == 0 {
            self.lose_node(rank, reason);
        } else if !self.lost[rank].swap(true, Ordering::AcqRel) {
            // Node 0 decides, told by this node (only the link between the two may be down);
            // if it does not declare the node dead soon, this node cannot go on without it
            // (`check_lost_waiting`).
            tracing::warn!(
                "node {rank} ({}) was lost: {reason}; asking node 0 to go on without it",
                self.peer_addr(rank)
            );
            lock(&self.lost_waiting).push((rank, Instant::now(), reason));
            self.send(0, &Msg::Suspect { node: rank as u64 });
        }
    }

    /// Over RDMA, node 0 waits (at most `limit`) until every node not lost has sent it
    /// something, which each does once it has published its loaded pages and marked the rest
    /// of its table vacant: a READ before that finds an empty slot and must ask the home, so
    /// starting the root first would send the run's first fetches to homes' CPUs.
    fn await_published(&self, limit: Duration) {
        if !matches!(self.transport, NodeTransport::Verbs(_)) {
            return;
        }
        let started = Instant::now();
        let mut heard = lock(&self.heard);
        loop {
            let waiting: Vec<usize> = (1..self.world)
                .filter(|&r| !heard.get(r).copied().unwrap_or(true) && !self.is_lost(r))
                .collect();
            if waiting.is_empty() {
                return;
            }
            let left = limit.saturating_sub(started.elapsed());
            if left.is_zero() {
                tracing::warn!(
                    nodes = ?waiting,
                    "starting without word from these nodes: their first page fetches may go to their CPUs"
                );
                return;
            }
            heard = self
                .heard_cv
                .wait_timeout(heard, left.min(Duration::from_millis(50)))
                .map(|(guard, _)| guard)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
    }

    fn on_event(self: &Arc<Self>, event: Event) {
        match event {
            Event::Message { from, payload } => {
                let from = from as usize;
                if self.rank == 0 {
                    let mut heard = lock(&self.heard);
                    if heard.get(from).is_some_and(|h| !h) {
                        heard[from] = true;
                        self.heard_cv.notify_all();
                    }
                }
                match self.reassemble(from, payload) {
                    Ok(None) => {}
                    Ok(Some(bytes)) => match Msg::decode(&bytes) {
                        Ok(msg) => self.on_message(from, msg),
                        Err(err) => self.fail(ClusterError::Garbage {
                            rank: from,
                            reason: err.to_string(),
                        }),
                    },
                    Err(reason) => self.fail(ClusterError::Garbage { rank: from, reason }),
                }
            }
            Event::PeerLost { peer, reason } => self.peer_lost(peer as usize, reason.to_string()),
            Event::PeerLeft { peer } => {
                // A clean departure is only expected once node 0 ended the run. Node 0 knows
                // when that is; another node may hear of it after a node told before it left.
                // A node that leaves early (it gave up on its own) is lost like any other.
                let rank = peer as usize;
                if self.shutting_down.load(Ordering::Acquire) {
                } else if self.may_lose(rank) {
                    self.peer_lost(rank, "it left before the run ended".into());
                } else if self.rank != 0 && rank != 0 {
                    lock(&self.left_early).get_or_insert((rank, Instant::now()));
                } else {
                    self.fail(ClusterError::NodeLost {
                        rank,
                        addr: self.peer_addr(rank),
                        reason: "it left before the run ended".into(),
                    });
                }
            }
            Event::Request { from, .. }
            | Event::Response { from, .. }
            | Event::ReadPage { from, .. }
            | Event::PageData { from, .. }
            | Event::Pages { from, .. } => self.fail(ClusterError::Garbage {
                rank: from as usize,
                reason: "a transport operation this runtime does not use".into(),
            }),
        }
    }
}

/// Runs this process's node of a multi-node run described by `launch`.
pub fn run(
    image: LoadedImage,
    config: Config,
    launch: &Launch,
    options: &ClusterOptions,
) -> Result<ClusterRun, ClusterError> {
    let rank = launch.rank as usize;
    let world = launch.world as usize;
    let config = Config {
        node_index: launch.rank,
        ..config
    };
    let mut tcp = TcpConfig::new(
        launch.rank,
        launch.world,
        SocketAddr::from(([0, 0, 0, 0], 0)),
        &launch.token,
    );
    tcp.connect_timeout_ms = options.connect_timeout_ms;
    tcp.peer_timeout_ms = options.peer_timeout_ms;
    tcp.heartbeat_ms = (options.peer_timeout_ms / 4).max(50);
    let bound = TcpTransport::bind(tcp)?;
    // Read before the rendezvous: a bad setting is this node's error, and what it registers
    // is checked against the locked-memory limit in the preflight.
    let verbs = match options.transport {
        Chosen::Rdma => Some(verbs_config()?),
        Chosen::Tcp => None,
    };
    let peers = rendezvous_on(
        launch,
        bound.local_addr(),
        options.connect_timeout_ms,
        options.coordinator_socket.as_deref(),
        &Preflight {
            host: local_host_name(),
            transport: options.transport,
            transport_reason: options.transport_reason.clone(),
            problem: verbs
                .as_ref()
                .and_then(|config| {
                    LockLimit::current().refuses(registered_bytes(config, launch.world))
                })
                .unwrap_or_default(),
        },
    )?;
    tracing::info!(
        "node {rank} of {world} ({}): peers {peers:?}",
        launch.source
    );
    let transport = match verbs {
        None => NodeTransport::Tcp(bound.establish(peers.clone())?),
        Some(config) => {
            NodeTransport::Verbs(VerbsTransport::establish(bound, peers.clone(), config)?)
        }
    };
    match &transport {
        NodeTransport::Verbs(verbs) => tracing::info!(
            "node {rank} of {world}: transport {} (device {})",
            verbs.name(),
            verbs.device()
        ),
        NodeTransport::Tcp(tcp) => {
            tracing::info!("node {rank} of {world}: transport {}", tcp.name())
        }
    }

    let resources = Resources::new(&config)?;
    let store = Arc::new(PageStore::new());
    let node = Node::new(
        NodeConfig {
            replicas: options.replicas,
            // The transport detects lost peers (its own thread, heartbeats on every
            // connection); node 0 declares them dead (`lose_node`).
            failure_timeout_us: None,
            // `Changes` carries the watermark to the nodes.
            broadcast_watermark: false,
            ..NodeConfig::new(rank, world)
        },
        Arc::clone(&store),
        resources.pages().clone(),
    );
    let mut node = node;
    if let NodeTransport::Verbs(verbs) = &transport {
        node.set_published(verbs.table());
    }
    let runtime = Arc::new(Runtime {
        rank,
        world,
        peers,
        transport,
        node: Mutex::new(node),
        applying: Mutex::new(ApplyState::default()),
        waiters: Mutex::new(HashMap::new()),
        next_req: AtomicU64::new(1),
        cache: Mutex::new(Cache::default()),
        pages: resources.pages().clone(),
        store: Arc::clone(&store),
        shared: OnceLock::new(),
        failure: Mutex::new(None),
        failed: AtomicBool::new(false),
        outstanding: (0..world).map(|_| AtomicU64::new(0)).collect(),
        placed: Mutex::new((0..world).map(|_| HashMap::new()).collect()),
        handouts: Handouts::default(),
        replicas: options.replicas.max(1),
        lost: (0..world).map(|_| AtomicBool::new(false)).collect(),
        heard: Mutex::new(vec![false; world]),
        heard_cv: Condvar::new(),
        view_dead: (0..world).map(|_| AtomicBool::new(false)).collect(),
        view_epoch: AtomicU64::new(0),
        lost_waiting: Mutex::new(Vec::new()),
        lost_nodes: Mutex::new(Vec::new()),
        placement: Mutex::new(VecDeque::new()),
        last_ran: Mutex::new(HashMap::new()),
        workers_per_node: resources.slots.len() as u64,
        shutting_down: AtomicBool::new(false),
        left_early: Mutex::new(None),
        left_grace: Duration::from_millis(options.peer_timeout_ms),
        reports: Mutex::new(BTreeMap::new()),
        profiles: Mutex::new(Vec::new()),
        fragments: Mutex::new(HashMap::new()),
        next_fragment: AtomicU64::new(0),
        remote_reads: AtomicU64::new(0),
        read_messages: AtomicU64::new(0),
        read_retries: AtomicU64::new(0),
        read_hits: AtomicU64::new(0),
        read_fallbacks: AtomicU64::new(0),
        read_zeros: AtomicU64::new(0),
        read_previous: AtomicU64::new(0),
        cache_hits: AtomicU64::new(0),
        workers_pinned: AtomicU64::new(0),
        read_latency: Samples::default(),
        prepare_local_latency: Samples::default(),
        prepare_remote_latency: Samples::default(),
    });
    let backend = Arc::new(ClusterBackend {
        reader: Arc::new(ClusterReader {
            runtime: Arc::clone(&runtime),
        }),
        runtime: Arc::clone(&runtime),
    });
    let control: Arc<dyn Control> = Arc::new(ClusterControl {
        runtime: Arc::clone(&runtime),
    });
    let parts = MachineParts {
        store,
        first_txn: ((rank as u64) << TXN_RANK_SHIFT) + 1,
        backend,
        control: Some(control),
    };
    // Every holder of a page loads it (its home and its backups).
    let view = crate::view::View::new(world, options.replicas);
    let machine = Machine::new(image, config, resources, parts, &|key| {
        view.holders(key).contains(&rank)
    })?;
    let _ = runtime.shared.set(Arc::downgrade(machine.shared()));
    publish_loaded(&runtime);
    if rank != 0 && matches!(runtime.transport, NodeTransport::Verbs(_)) {
        // Node 0 starts the run once it has heard from every node (`await_published`).
        runtime.send(0, &Msg::Heartbeat { epoch: 0 });
    }
    let root = if rank == 0 {
        let root = machine.root_task()?;
        runtime.outstanding[0].fetch_add(1, Ordering::AcqRel);
        Some(root)
    } else {
        None
    };
    let service = {
        let runtime = Arc::clone(&runtime);
        std::thread::Builder::new()
            .name("dvm-cluster".into())
            .spawn(move || runtime.serve())
            .map_err(|err| {
                ClusterError::Run(RunError::Persist(format!(
                    "cannot start the cluster thread: {err}"
                )))
            })?
    };
    if rank == 0 {
        runtime.await_published(Duration::from_millis(options.connect_timeout_ms));
    }
    let (workers, notes) = machine.run(root);
    runtime.workers_pinned.store(
        workers.iter().filter(|worker| worker.pinned).count() as u64,
        Ordering::Relaxed,
    );
    let _ = service.join();
    if rank != 0 && !runtime.failed.load(Ordering::Acquire) {
        // Samples first: node 0 has them all once it has this node's report.
        for chunk in profile_chunks(machine.take_profile()) {
            runtime.send(0, &Msg::ProfileSamples { samples: chunk });
        }
        let row = runtime.row(machine.shared().counters_now(), &workers);
        runtime.send(
            0,
            &Msg::NodeReport {
                report: encode_row(&row),
            },
        );
        let _ = runtime.transport.flush();
    }
    let failure = lock(&runtime.failure).take();
    let report = machine.finish(workers, notes)?;
    let transport = runtime.transport.counters();
    let rows = lock(&runtime.reports).clone();
    let others_samples = std::mem::take(&mut *lock(&runtime.profiles));
    let lost = lock(&runtime.lost_nodes).clone();
    let me = runtime.row(report.stats.clone(), &report.workers);
    // The VM is gone, and with it every other owner of the runtime: leave the mesh cleanly.
    match Arc::try_unwrap(runtime) {
        Ok(runtime) => runtime.transport.close(),
        Err(_) => tracing::debug!("the runtime is still shared; the transport closes on exit"),
    }
    if let Some(failure) = failure {
        return Err(failure);
    }
    let mut report = report;
    report.profile.extend(others_samples);
    let mut nodes = vec![me];
    nodes.extend(rows.into_values());
    if rank == 0 {
        // Outcomes are counted where endings are applied (here); work where it was done.
        let s = &mut report.stats;
        let others = &nodes[1..];
        s.workers += others.iter().map(|n| n.stats.workers).sum::<u64>();
        s.instructions += others.iter().map(|n| n.stats.instructions).sum::<u64>();
        s.runners_started += others.iter().map(|n| n.stats.runners_started).sum::<u64>();
        s.watcher_activations += others
            .iter()
            .map(|n| n.stats.watcher_activations)
            .sum::<u64>();
        s.pages_allocated += others.iter().map(|n| n.stats.pages_allocated).sum::<u64>();
        s.pages_copied += others.iter().map(|n| n.stats.pages_copied).sum::<u64>();
        s.peak_memory_bytes += others
            .iter()
            .map(|n| n.stats.peak_memory_bytes)
            .sum::<u64>();
    }
    Ok(ClusterRun {
        rank: launch.rank,
        world: launch.world,
        lost,
        report,
        nodes,
        transport,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(verbs: Option<VerbsRow>) -> NodeRow {
        NodeRow {
            rank: 2,
            remote_reads: 7,
            cache_hits: 9,
            messages_sent: 11,
            time: Some(TimeSplit {
                ns: std::array::from_fn(|i| 100 + i as u64),
            }),
            verbs,
            ..NodeRow::default()
        }
    }

    #[test]
    fn node_rows_round_trip_with_and_without_verbs_counters() {
        for verbs in [
            None,
            Some(VerbsRow {
                work_requests: 40,
                signalled_completions: 5,
                rdma_reads: 30,
                reads_landed: 28,
                chunks_registered: 2,
                rdma_writes: 6,
                bytes_written: 70_000,
                read_previous: 7,
                read_retries: 2,
                read_hits: 25,
                read_zeros: 4,
                read_fallbacks: 3,
                page_read_messages: 12,
            }),
        ] {
            let row = row(verbs);
            let bytes = encode_row(&row);
            assert_eq!(bytes.len(), ROW_WORDS * 8);
            assert_eq!(decode_row(&bytes), Some(row));
        }
    }

    #[test]
    fn a_node_row_with_a_bad_verbs_flag_or_length_is_refused() {
        let mut bytes = encode_row(&row(None));
        let flag = (32 + Phase::COUNT) * 8;
        bytes[flag] = 2;
        assert_eq!(decode_row(&bytes), None);
        bytes[flag] = 0;
        bytes.truncate(bytes.len() - 8);
        assert_eq!(decode_row(&bytes), None);
    }
}
