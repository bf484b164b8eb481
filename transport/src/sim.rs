//! A deterministic simulated network for simulation tests of the cluster protocol.
//!
//! Owns: virtual time, the queue of pending events (frame deliveries, connection-loss notices,
//! timers), the state of every connection between simulated nodes, and the one PRNG every random
//! choice is drawn from. A whole cluster of sans-IO node state machines runs on it in one thread.
//!
//! Invariants:
//! - Determinism: the run is a function of `SimConfig` and the sequence of calls only. No
//!   threads, no wall clock, no hash-map iteration, no global RNG; ties between events due at the
//!   same virtual time are broken by a sequence number assigned when the event was scheduled.
//! - TCP-like connections: on each directed connection frames are delivered in send order, at
//!   most once, and without gaps inside one incarnation of the connection. Different connections
//!   reorder freely. A frame is only ever lost together with its connection: the connection
//!   breaks, every frame in flight on it (both directions) is dropped, both ends are told with
//!   `ConnectionLost`, and frames sent before it is back (after `reconnect_delay_us`) are
//!   dropped too. A protocol that retries after `ConnectionLost` therefore sees duplicates, as it
//!   would over real TCP.
//! - Virtual time never goes backwards.
//! - Bounded: node count, payload size and the number of pending events are limited by the
//!   configuration; exceeding a limit is a typed error, never a panic or unbounded growth.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fmt;

/// A simulated node, `0..nodes`.
pub type NodeId = usize;

/// Hard upper bound on `SimConfig::nodes`: connection state is a dense `nodes x nodes` table.
pub const MAX_SIM_NODES: usize = 1024;

/// The PRNG shared by the network and the protocol simulations running on it: xoshiro256**
/// seeded through splitmix64, so any `u64` (including 0) is a good seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimRng {
    s: [u64; 4],
}

/// One splitmix64 step: used to expand a seed into xoshiro's 256-bit state.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SimRng {
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        SimRng { s }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `0..n`; 0 when `n` is 0. Lemire's widening multiply with rejection, so there
    /// is no modulo bias even for large `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            // The low half decides rejection; the high half is the result.
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Uniform in `lo..=hi` (`lo` when `hi < lo`).
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        match (hi - lo).checked_add(1) {
            Some(span) => lo + self.below(span),
            None => self.next_u64(),
        }
    }

    /// True with probability `p / 1_000_000` (always for `p >= 1_000_000`).
    pub fn chance_per_million(&mut self, p: u32) -> bool {
        self.below(1_000_000) < u64::from(p)
    }
}

/// How the simulated network behaves. `SimConfig::new` gives sensible defaults; every field is
/// public so a test states exactly what it depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    pub seed: u64,
    pub nodes: usize,
    /// One-way delay of each frame, drawn uniformly in `min_delay_us..=max_delay_us` (then pushed
    /// later if needed to keep its connection in order).
    pub min_delay_us: u64,
    pub max_delay_us: u64,
    /// Per frame: the chance that its connection breaks while the frame is in flight.
    pub loss_per_million: u32,
    /// How long a broken connection drops everything sent on it.
    pub reconnect_delay_us: u64,
    pub max_payload_bytes: usize,
    /// Frames, notices and timers waiting to happen, together.
    pub max_pending_events: usize,
}

impl SimConfig {
    pub fn new(seed: u64, nodes: usize) -> Self {
        SimConfig {
            seed,
            nodes,
            min_delay_us: 50,
            max_delay_us: 2_000,
            loss_per_million: 0,
            reconnect_delay_us: 10_000,
            max_payload_bytes: 1 << 20,
            max_pending_events: 1 << 20,
        }
    }
}

/// What `SimNet::step` hands to the simulation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimEvent {
    /// `payload`, sent by `from`, arrives at `to`.
    Deliver {
        from: NodeId,
        to: NodeId,
        payload: Vec<u8>,
    },
    /// Delivered to node `a`: its connection with `b` broke and everything in flight on it, both
    /// ways, is gone. `b` gets its own `ConnectionLost { a: b, b: a }` (unless it crashed).
    ConnectionLost { a: NodeId, b: NodeId },
    /// A timer set with `set_timer(node, _, token)` fired.
    Timer { node: NodeId, token: u64 },
}

/// Misuse of the simulator by the simulation driving it (network conditions are not errors:
/// they drop frames silently, as a real network would).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimError {
    InvalidConfig(String),
    UnknownNode {
        node: NodeId,
        nodes: usize,
    },
    PayloadTooLarge {
        len: usize,
        max_payload_bytes: usize,
    },
    TooManyPendingEvents {
        max_pending_events: usize,
    },
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimError::InvalidConfig(why) => write!(f, "invalid simulated network config: {why}"),
            SimError::UnknownNode { node, nodes } => {
                write!(
                    f,
                    "node {node} does not exist (the network has {nodes} nodes)"
                )
            }
            SimError::PayloadTooLarge {
                len,
                max_payload_bytes,
            } => write!(
                f,
                "payload of {len} bytes exceeds max_payload_bytes = {max_payload_bytes}"
            ),
            SimError::TooManyPendingEvents { max_pending_events } => write!(
                f,
                "more than max_pending_events = {max_pending_events} events pending"
            ),
        }
    }
}

impl std::error::Error for SimError {}

/// Counters over the whole run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    pub frames_sent: u64,
    pub frames_delivered: u64,
    /// Every frame accepted by `send` that will never be delivered, whatever the reason.
    pub frames_dropped: u64,
    pub connections_lost: u64,
    pub timers_fired: u64,
}

#[derive(Debug)]
enum Pending {
    Frame {
        from: NodeId,
        to: NodeId,
        /// The incarnation of the connection the frame was sent on; stale frames are dropped.
        epoch: u64,
        /// The connection breaks when this frame would have arrived.
        breaks: bool,
        payload: Vec<u8>,
    },
    /// `life` is the incarnation of the notified node when it was scheduled: events for an
    /// earlier life of a restarted node never reach the new one.
    Lost {
        a: NodeId,
        b: NodeId,
        life: u64,
    },
    Timer {
        node: NodeId,
        token: u64,
        life: u64,
    },
}

#[derive(Debug)]
struct Scheduled {
    at_us: u64,
    seq: u64,
    what: Pending,
}

// Ordered by (at_us, seq) only, reversed so `BinaryHeap` pops the earliest. `seq` is unique, so
// this is a total order consistent with `Eq`.
impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at_us, self.seq) == (other.at_us, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at_us, other.seq).cmp(&(self.at_us, self.seq))
    }
}

/// One undirected connection `{a, b}`; `in_flight` and `last_arrival_us` are per direction.
#[derive(Clone, Debug, Default)]
struct Conn {
    epoch: u64,
    /// Sends are dropped while `now_us < down_until_us` (after a break or during a partition).
    down_until_us: u64,
    /// Frames of the current epoch not yet delivered, indexed by direction (0: low->high id).
    in_flight: [u64; 2],
    /// Arrival time of the last frame queued in each direction: the next one may not be earlier.
    last_arrival_us: [u64; 2],
}

/// FNV-1a, 64-bit: a stable, platform-independent hash for `trace_hash`.
#[derive(Clone, Copy, Debug)]
struct Fnv(u64);

impl Fnv {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    fn bytes(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(Self::PRIME);
        }
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
}

/// The simulated network. See the module comment for the guarantees it keeps.
#[derive(Debug)]
pub struct SimNet {
    cfg: SimConfig,
    rng: SimRng,
    now_us: u64,
    next_seq: u64,
    queue: BinaryHeap<Scheduled>,
    /// Dense `nodes x nodes` table; only entries with `a <= b` are used.
    conns: Vec<Conn>,
    crashed: Vec<bool>,
    /// Incremented by every crash.
    lives: Vec<u64>,
    stats: SimStats,
    trace: Fnv,
}

impl SimNet {
    pub fn new(cfg: SimConfig) -> Result<Self, SimError> {
        if cfg.nodes == 0 || cfg.nodes > MAX_SIM_NODES {
            return Err(SimError::InvalidConfig(format!(
                "nodes = {} is not in 1..={MAX_SIM_NODES}",
                cfg.nodes
            )));
        }
        if cfg.min_delay_us > cfg.max_delay_us {
            return Err(SimError::InvalidConfig(format!(
                "min_delay_us = {} is above max_delay_us = {}",
                cfg.min_delay_us, cfg.max_delay_us
            )));
        }
        if cfg.loss_per_million > 1_000_000 {
            return Err(SimError::InvalidConfig(format!(
                "loss_per_million = {} is above 1000000",
                cfg.loss_per_million
            )));
        }
        if cfg.max_pending_events == 0 {
            return Err(SimError::InvalidConfig(
                "max_pending_events = 0 leaves no room for any event".to_string(),
            ));
        }
        let rng = SimRng::new(cfg.seed);
        let mut trace = Fnv(Fnv::OFFSET);
        trace.u64(cfg.seed);
        Ok(SimNet {
            conns: vec![Conn::default(); cfg.nodes * cfg.nodes],
            crashed: vec![false; cfg.nodes],
            lives: vec![0; cfg.nodes],
            cfg,
            rng,
            now_us: 0,
            next_seq: 0,
            queue: BinaryHeap::new(),
            stats: SimStats::default(),
            trace,
        })
    }

    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    pub fn now_us(&self) -> u64 {
        self.now_us
    }

    pub fn stats(&self) -> SimStats {
        self.stats
    }

    /// A hash of every event `step` has returned so far, with its virtual time: equal for two
    /// runs exactly when they behaved the same (up to hash collisions).
    pub fn trace_hash(&self) -> u64 {
        self.trace.0
    }

    /// The network's PRNG, for protocol simulations that want their randomness from the same
    /// seed. Drawing from it changes the network's later choices (deterministically).
    pub fn rng(&mut self) -> &mut SimRng {
        &mut self.rng
    }

    /// Events (including frames that will turn out to be dropped) still queued.
    pub fn pending_events(&self) -> usize {
        self.queue.len()
    }

    pub fn is_crashed(&self, node: NodeId) -> Result<bool, SimError> {
        self.check_node(node)?;
        Ok(self.crashed.get(node).copied().unwrap_or(true))
    }

    /// Whether a frame sent now from `a` to `b` would be accepted (not dropped at once).
    pub fn is_connected(&self, a: NodeId, b: NodeId) -> Result<bool, SimError> {
        self.check_node(a)?;
        self.check_node(b)?;
        let down = self
            .conn(a, b)
            .is_none_or(|c| self.now_us < c.down_until_us);
        Ok(!down && !self.crashed_either(a, b))
    }

    /// Queues `payload` from `from` to `to`. Returns `Ok` whether or not the network will drop
    /// it: the sender cannot know, and learns of losses only through `ConnectionLost`.
    pub fn send(&mut self, from: NodeId, to: NodeId, payload: Vec<u8>) -> Result<(), SimError> {
        self.check_node(from)?;
        self.check_node(to)?;
        if payload.len() > self.cfg.max_payload_bytes {
            return Err(SimError::PayloadTooLarge {
                len: payload.len(),
                max_payload_bytes: self.cfg.max_payload_bytes,
            });
        }
        self.check_room(1)?;
        self.stats.frames_sent += 1;
        let now_us = self.now_us;
        let crashed = self.crashed_either(from, to);
        let delay_us = self
            .rng
            .between(self.cfg.min_delay_us, self.cfg.max_delay_us);
        let breaks = self.rng.chance_per_million(self.cfg.loss_per_million);
        let dir = direction(from, to);
        let Some(conn) = self.conn_mut(from, to) else {
            self.stats.frames_dropped += 1;
            return Ok(());
        };
        if crashed || now_us < conn.down_until_us {
            self.stats.frames_dropped += 1;
            return Ok(());
        }
        // Later than every frame already queued this way: that is what keeps the connection FIFO
        // (equal times are ordered by `seq`, which grows with every send).
        let at_us = now_us
            .saturating_add(delay_us)
            .max(conn.last_arrival_us[dir]);
        conn.last_arrival_us[dir] = at_us;
        conn.in_flight[dir] += 1;
        let epoch = conn.epoch;
        self.push(
            at_us,
            Pending::Frame {
                from,
                to,
                epoch,
                breaks,
                payload,
            },
        );
        Ok(())
    }

    /// Fires `Timer { node, token }` at virtual time `at_us` (at once if that is in the past).
    pub fn set_timer(&mut self, node: NodeId, at_us: u64, token: u64) -> Result<(), SimError> {
        self.check_node(node)?;
        self.check_room(1)?;
        let at_us = at_us.max(self.now_us);
        let life = self.life(node);
        self.push(at_us, Pending::Timer { node, token, life });
        Ok(())
    }

    /// Breaks the connection between `a` and `b` now, as a random loss would. No effect if it is
    /// already down (both ends were told then).
    pub fn break_connection(&mut self, a: NodeId, b: NodeId) -> Result<(), SimError> {
        self.check_node(a)?;
        self.check_node(b)?;
        let until_us = self.now_us.saturating_add(self.cfg.reconnect_delay_us);
        self.break_until(a, b, until_us);
        Ok(())
    }

    /// Cuts `a` from `b` until virtual time `until_us`: the connection breaks now (if up) and
    /// stays down until then, or until its reconnect delay is over, whichever is later.
    pub fn partition(&mut self, a: NodeId, b: NodeId, until_us: u64) -> Result<(), SimError> {
        self.check_node(a)?;
        self.check_node(b)?;
        let until_us = until_us.max(self.now_us.saturating_add(self.cfg.reconnect_delay_us));
        self.break_until(a, b, until_us);
        Ok(())
    }

    /// Stops `node` (until `restart`): everything in flight to or from it is dropped, its timers
    /// never fire, later sends to or from it are dropped, and its live peers get
    /// `ConnectionLost`.
    pub fn crash(&mut self, node: NodeId) -> Result<(), SimError> {
        self.check_node(node)?;
        if self.is_crashed(node)? {
            return Ok(());
        }
        // Marked first, so the node itself gets no notice.
        if let Some(c) = self.crashed.get_mut(node) {
            *c = true;
        }
        if let Some(life) = self.lives.get_mut(node) {
            *life += 1;
        }
        for peer in 0..self.cfg.nodes {
            self.break_until(node, peer, u64::MAX);
        }
        Ok(())
    }

    /// Brings a crashed node back, as a fresh process: nothing from its previous life (timers,
    /// notices, frames) reaches it, and its connections to live nodes are usable after
    /// `reconnect_delay_us`. No effect on a live node.
    pub fn restart(&mut self, node: NodeId) -> Result<(), SimError> {
        self.check_node(node)?;
        if !self.is_crashed(node)? {
            return Ok(());
        }
        if let Some(c) = self.crashed.get_mut(node) {
            *c = false;
        }
        let up_us = self.now_us.saturating_add(self.cfg.reconnect_delay_us);
        for peer in 0..self.cfg.nodes {
            if self.crashed.get(peer).copied().unwrap_or(true) {
                continue;
            }
            if let Some(conn) = self.conn_mut(node, peer) {
                conn.down_until_us = up_us;
            }
        }
        Ok(())
    }

    /// Pops the earliest event, advances virtual time to it and returns it; `None` when nothing
    /// is left to happen. Frames dropped by the network are skipped without advancing time.
    pub fn step(&mut self) -> Option<SimEvent> {
        while let Some(Scheduled { at_us, what, .. }) = self.queue.pop() {
            match what {
                Pending::Frame {
                    from,
                    to,
                    epoch,
                    breaks,
                    payload,
                } => {
                    let dir = direction(from, to);
                    let current = self.conn(from, to).is_some_and(|c| c.epoch == epoch);
                    if !current {
                        // Already counted as dropped when its connection broke.
                        continue;
                    }
                    self.now_us = self.now_us.max(at_us);
                    if breaks {
                        let until_us = self.now_us.saturating_add(self.cfg.reconnect_delay_us);
                        self.break_now(from, to, until_us);
                        continue;
                    }
                    if let Some(conn) = self.conn_mut(from, to) {
                        conn.in_flight[dir] = conn.in_flight[dir].saturating_sub(1);
                    }
                    self.stats.frames_delivered += 1;
                    let event = SimEvent::Deliver { from, to, payload };
                    self.record(&event);
                    return Some(event);
                }
                Pending::Lost { a, b, life } => {
                    if !self.alive_in(a, life) {
                        continue;
                    }
                    self.now_us = self.now_us.max(at_us);
                    let event = SimEvent::ConnectionLost { a, b };
                    self.record(&event);
                    return Some(event);
                }
                Pending::Timer { node, token, life } => {
                    if !self.alive_in(node, life) {
                        continue;
                    }
                    self.now_us = self.now_us.max(at_us);
                    self.stats.timers_fired += 1;
                    let event = SimEvent::Timer { node, token };
                    self.record(&event);
                    return Some(event);
                }
            }
        }
        None
    }

    /// Breaks `{a, b}` if it is up; if it is already down, only keeps it down until `until_us`.
    fn break_until(&mut self, a: NodeId, b: NodeId, until_us: u64) {
        let now_us = self.now_us;
        let Some(conn) = self.conn_mut(a, b) else {
            return;
        };
        if now_us < conn.down_until_us {
            conn.down_until_us = conn.down_until_us.max(until_us);
            return;
        }
        self.break_now(a, b, until_us);
    }

    /// Ends the current incarnation of `{a, b}`: its frames in flight become stale (and are
    /// counted as dropped now), and both live ends are told.
    fn break_now(&mut self, a: NodeId, b: NodeId, until_us: u64) {
        let Some(conn) = self.conn_mut(a, b) else {
            return;
        };
        let dropped = conn.in_flight[0] + conn.in_flight[1];
        conn.in_flight = [0, 0];
        conn.epoch += 1;
        conn.down_until_us = until_us;
        self.stats.frames_dropped += dropped;
        self.stats.connections_lost += 1;
        for (x, y) in [(a, b), (b, a)] {
            if !self.crashed.get(x).copied().unwrap_or(true) {
                let life = self.life(x);
                self.push(self.now_us, Pending::Lost { a: x, b: y, life });
            }
            if a == b {
                break;
            }
        }
    }

    fn push(&mut self, at_us: u64, what: Pending) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push(Scheduled { at_us, seq, what });
    }

    fn record(&mut self, event: &SimEvent) {
        self.trace.u64(self.now_us);
        match event {
            SimEvent::Deliver { from, to, payload } => {
                self.trace.u64(1);
                self.trace.u64(*from as u64);
                self.trace.u64(*to as u64);
                self.trace.u64(payload.len() as u64);
                self.trace.bytes(payload);
            }
            SimEvent::ConnectionLost { a, b } => {
                self.trace.u64(2);
                self.trace.u64(*a as u64);
                self.trace.u64(*b as u64);
            }
            SimEvent::Timer { node, token } => {
                self.trace.u64(3);
                self.trace.u64(*node as u64);
                self.trace.u64(*token);
            }
        }
    }

    fn check_node(&self, node: NodeId) -> Result<(), SimError> {
        if node < self.cfg.nodes {
            Ok(())
        } else {
            Err(SimError::UnknownNode {
                node,
                nodes: self.cfg.nodes,
            })
        }
    }

    /// Bounds what callers queue. `ConnectionLost` notices are not checked: there are at most
    /// two per break, and a connection breaks at most once per frame or forced break.
    fn check_room(&self, extra: usize) -> Result<(), SimError> {
        let needed = self.queue.len().saturating_add(extra);
        if needed > self.cfg.max_pending_events {
            return Err(SimError::TooManyPendingEvents {
                max_pending_events: self.cfg.max_pending_events,
            });
        }
        Ok(())
    }

    fn life(&self, node: NodeId) -> u64 {
        self.lives.get(node).copied().unwrap_or(u64::MAX)
    }

    fn alive_in(&self, node: NodeId, life: u64) -> bool {
        !self.crashed.get(node).copied().unwrap_or(true) && self.life(node) == life
    }

    fn crashed_either(&self, a: NodeId, b: NodeId) -> bool {
        self.crashed.get(a).copied().unwrap_or(true) || self.crashed.get(b).copied().unwrap_or(true)
    }

    fn conn(&self, a: NodeId, b: NodeId) -> Option<&Conn> {
        let (lo, hi) = (a.min(b), a.max(b));
        self.conns.get(lo * self.cfg.nodes + hi)
    }

    fn conn_mut(&mut self, a: NodeId, b: NodeId) -> Option<&mut Conn> {
        let (lo, hi) = (a.min(b), a.max(b));
        self.conns.get_mut(lo * self.cfg.nodes + hi)
    }
}

/// Index of the direction `from -> to` within its undirected connection.
fn direction(from: NodeId, to: NodeId) -> usize {
    usize::from(from > to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A frame's payload in these tests: (sender's sequence number on this connection).
    fn seq_payload(n: u64) -> Vec<u8> {
        n.to_le_bytes().to_vec()
    }

    fn payload_seq(payload: &[u8]) -> u64 {
        let bytes: [u8; 8] = payload.try_into().expect("test payloads are 8 bytes");
        u64::from_le_bytes(bytes)
    }

    fn net(cfg: SimConfig) -> SimNet {
        SimNet::new(cfg).expect("valid test config")
    }

    /// Drives a random workload: random senders and receivers, random interleaving of sends and
    /// steps. Returns what each directed connection delivered, in order, plus the lost notices.
    struct Workload {
        delivered: BTreeMap<(NodeId, NodeId), Vec<u64>>,
        sent: BTreeMap<(NodeId, NodeId), u64>,
        lost_notices: Vec<(u64, NodeId, NodeId)>,
        times_us: Vec<u64>,
    }

    fn run_workload(cfg: SimConfig, sends: usize, driver_seed: u64) -> (SimNet, Workload) {
        let nodes = cfg.nodes;
        let mut sim = net(cfg);
        let mut driver = SimRng::new(driver_seed);
        let mut w = Workload {
            delivered: BTreeMap::new(),
            sent: BTreeMap::new(),
            lost_notices: Vec::new(),
            times_us: Vec::new(),
        };
        let mut remaining = sends;
        loop {
            if remaining > 0 && driver.chance_per_million(600_000) {
                let from = driver.below(nodes as u64) as usize;
                let to = driver.below(nodes as u64) as usize;
                let n = w.sent.entry((from, to)).or_insert(0);
                sim.send(from, to, seq_payload(*n))
                    .expect("send within limits");
                *n += 1;
                remaining -= 1;
                continue;
            }
            match sim.step() {
                Some(SimEvent::Deliver { from, to, payload }) => {
                    w.delivered
                        .entry((from, to))
                        .or_default()
                        .push(payload_seq(&payload));
                }
                Some(SimEvent::ConnectionLost { a, b }) => {
                    w.lost_notices.push((sim.now_us(), a, b))
                }
                Some(SimEvent::Timer { .. }) => {}
                None if remaining == 0 => break,
                None => {}
            }
            w.times_us.push(sim.now_us());
        }
        (sim, w)
    }

    #[test]
    fn splitmix_matches_the_reference_sequence() {
        // First outputs of the reference splitmix64 for seed 0.
        let mut s = 0u64;
        assert_eq!(splitmix64(&mut s), 0xe220_a839_7b1d_cdaf);
        assert_eq!(splitmix64(&mut s), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn rng_is_seeded_reproducible_and_bounded() {
        let mut a = SimRng::new(7);
        let mut b = SimRng::new(7);
        let mut c = SimRng::new(8);
        let xs: Vec<u64> = (0..16).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..16).map(|_| b.next_u64()).collect();
        let zs: Vec<u64> = (0..16).map(|_| c.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
        let mut hist = [0u32; 7];
        for _ in 0..70_000 {
            let v = a.below(7);
            assert!(v < 7);
            hist[v as usize] += 1;
        }
        // Each bucket expects 10000; 9000..11000 is > 20 sigma wide.
        assert!(
            hist.iter().all(|&h| (9_000..11_000).contains(&h)),
            "{hist:?}"
        );
        assert_eq!(a.below(0), 0);
        assert!((0..1000).all(|_| !a.chance_per_million(0)));
        assert!((0..1000).all(|_| a.chance_per_million(1_000_000)));
        let hits = (0..100_000)
            .filter(|_| a.chance_per_million(250_000))
            .count();
        assert!((23_000..27_000).contains(&hits), "{hits}");
        assert_eq!(a.between(5, 5), 5);
        assert!((0..1000).all(|_| (3..=9).contains(&a.between(3, 9))));
    }

    #[test]
    fn config_errors_name_the_field() {
        let bad = |cfg: SimConfig| SimNet::new(cfg).expect_err("config should be refused");
        let e = bad(SimConfig::new(1, 0));
        assert!(e.to_string().contains("nodes = 0"), "{e}");
        let e = bad(SimConfig {
            min_delay_us: 10,
            max_delay_us: 5,
            ..SimConfig::new(1, 3)
        });
        assert!(e.to_string().contains("min_delay_us = 10"), "{e}");
        let e = bad(SimConfig {
            loss_per_million: 1_000_001,
            ..SimConfig::new(1, 3)
        });
        assert!(e.to_string().contains("loss_per_million"), "{e}");
        let mut sim = net(SimConfig::new(1, 3));
        assert_eq!(
            sim.send(0, 3, vec![]),
            Err(SimError::UnknownNode { node: 3, nodes: 3 })
        );
        assert_eq!(
            sim.set_timer(9, 0, 0),
            Err(SimError::UnknownNode { node: 9, nodes: 3 })
        );
    }

    #[test]
    fn limits_on_payload_and_pending_events() {
        let mut sim = net(SimConfig {
            max_payload_bytes: 4,
            max_pending_events: 3,
            ..SimConfig::new(1, 2)
        });
        assert_eq!(
            sim.send(0, 1, vec![0; 5]),
            Err(SimError::PayloadTooLarge {
                len: 5,
                max_payload_bytes: 4
            })
        );
        for _ in 0..3 {
            sim.send(0, 1, vec![1]).expect("room for three");
        }
        assert_eq!(
            sim.send(0, 1, vec![1]),
            Err(SimError::TooManyPendingEvents {
                max_pending_events: 3
            })
        );
        assert_eq!(sim.stats().frames_sent, 3);
    }

    /// Property over many seeds: without losses every frame arrives exactly once, in send order
    /// on its connection, and time never goes backwards; and the random delays really do
    /// reorder frames across connections (else the FIFO check would be vacuous).
    #[test]
    fn per_connection_fifo_under_random_delays() {
        let mut cross_connection_reorders = 0u64;
        for seed in 0..300 {
            let cfg = SimConfig {
                nodes: 3 + (seed % 3) as usize,
                min_delay_us: 1,
                max_delay_us: 5_000,
                ..SimConfig::new(seed, 3)
            };
            let (sim, w) = run_workload(cfg, 200, seed ^ 0xABCD);
            assert!(w.times_us.windows(2).all(|p| p[0] <= p[1]), "seed {seed}");
            for (conn, sent) in &w.sent {
                let got = w.delivered.get(conn).cloned().unwrap_or_default();
                let want: Vec<u64> = (0..*sent).collect();
                assert_eq!(got, want, "seed {seed} connection {conn:?}");
            }
            let s = sim.stats();
            assert_eq!(
                (s.frames_sent, s.frames_delivered, s.frames_dropped),
                (200, 200, 0)
            );
            assert!(w.lost_notices.is_empty());
            cross_connection_reorders += count_cross_reorders(seed);
        }
        assert!(cross_connection_reorders > 0);
    }

    /// Two frames on different connections, the first sent first: how often does the second
    /// arrive first? (It must, sometimes, for delays to mean anything.)
    fn count_cross_reorders(seed: u64) -> u64 {
        let mut sim = net(SimConfig {
            min_delay_us: 1,
            max_delay_us: 5_000,
            ..SimConfig::new(seed, 3)
        });
        sim.send(0, 1, vec![1]).expect("send");
        sim.send(0, 2, vec![2]).expect("send");
        match sim.step() {
            Some(SimEvent::Deliver { payload, .. }) if payload == [2] => 1,
            _ => 0,
        }
    }

    /// Property over many seeds with random losses: a connection never duplicates or reorders,
    /// every frame is either delivered or counted as dropped, and every break tells both ends.
    #[test]
    fn random_losses_keep_order_and_account_for_every_frame() {
        let mut total_lost = 0;
        for seed in 0..200 {
            let cfg = SimConfig {
                loss_per_million: 50_000,
                reconnect_delay_us: 3_000,
                ..SimConfig::new(seed, 4)
            };
            let (sim, w) = run_workload(cfg, 300, seed.wrapping_mul(31));
            for (conn, got) in &w.delivered {
                assert!(
                    got.windows(2).all(|p| p[0] < p[1]),
                    "seed {seed} connection {conn:?} delivered {got:?}"
                );
            }
            let s = sim.stats();
            assert_eq!(
                s.frames_sent,
                s.frames_delivered + s.frames_dropped,
                "seed {seed}"
            );
            let notices = w.lost_notices.len() as u64;
            let self_breaks = w.lost_notices.iter().filter(|(_, a, b)| a == b).count() as u64;
            // Two notices per break, except a node's connection to itself (one end).
            assert_eq!(notices + self_breaks, 2 * s.connections_lost, "seed {seed}");
            total_lost += s.connections_lost;
        }
        assert!(total_lost > 100, "losses happened: {total_lost}");
    }

    #[test]
    fn a_break_drops_in_flight_frames_both_ways_and_notifies_both_ends() {
        let mut sim = net(SimConfig {
            min_delay_us: 100,
            max_delay_us: 100,
            reconnect_delay_us: 1_000,
            ..SimConfig::new(3, 3)
        });
        for i in 0..3 {
            sim.send(0, 1, seq_payload(i)).expect("send");
            sim.send(1, 0, seq_payload(i)).expect("send");
        }
        sim.send(0, 2, seq_payload(0)).expect("send");
        sim.break_connection(1, 0).expect("break");
        assert!(!sim.is_connected(0, 1).expect("nodes exist"));
        sim.send(0, 1, seq_payload(99))
            .expect("send while down is accepted");
        let mut events = Vec::new();
        while let Some(e) = sim.step() {
            events.push(e);
        }
        assert_eq!(
            events,
            vec![
                SimEvent::ConnectionLost { a: 1, b: 0 },
                SimEvent::ConnectionLost { a: 0, b: 1 },
                SimEvent::Deliver {
                    from: 0,
                    to: 2,
                    payload: seq_payload(0)
                },
            ]
        );
        let s = sim.stats();
        assert_eq!(
            (s.frames_sent, s.frames_delivered, s.frames_dropped),
            (8, 1, 7)
        );
        // Back after the reconnect delay.
        sim.set_timer(0, 1_000, 7).expect("timer");
        assert_eq!(sim.step(), Some(SimEvent::Timer { node: 0, token: 7 }));
        assert!(sim.is_connected(0, 1).expect("nodes exist"));
        sim.send(0, 1, seq_payload(5)).expect("send");
        assert_eq!(
            sim.step(),
            Some(SimEvent::Deliver {
                from: 0,
                to: 1,
                payload: seq_payload(5)
            })
        );
        assert_eq!(sim.now_us(), 1_100);
    }

    #[test]
    fn total_loss_breaks_on_the_first_frame_and_tells_both_ends() {
        let mut sim = net(SimConfig {
            loss_per_million: 1_000_000,
            ..SimConfig::new(11, 2)
        });
        sim.send(0, 1, vec![1]).expect("send");
        sim.send(0, 1, vec![2]).expect("send");
        sim.send(1, 0, vec![3]).expect("send");
        let mut events = Vec::new();
        while let Some(e) = sim.step() {
            events.push(format!("{e:?}"));
        }
        // Which direction's frame arrives (and so breaks) first depends on the seed.
        events.sort();
        assert_eq!(
            events,
            vec![
                format!("{:?}", SimEvent::ConnectionLost { a: 0, b: 1 }),
                format!("{:?}", SimEvent::ConnectionLost { a: 1, b: 0 }),
            ]
        );
        assert_eq!(sim.stats().frames_dropped, 3);
        assert_eq!(sim.stats().connections_lost, 1);
    }

    #[test]
    fn same_seed_same_run_different_seeds_differ() {
        let run = |seed: u64| {
            let cfg = SimConfig {
                loss_per_million: 20_000,
                ..SimConfig::new(seed, 5)
            };
            let (sim, w) = run_workload(cfg, 500, 42);
            (sim.trace_hash(), sim.stats(), w.delivered, w.lost_notices)
        };
        for seed in 0..20 {
            assert_eq!(run(seed), run(seed), "seed {seed}");
        }
        let hashes: std::collections::BTreeSet<u64> = (0..50).map(|s| run(s).0).collect();
        assert_eq!(hashes.len(), 50);
    }

    #[test]
    fn timers_fire_in_time_order_ties_in_set_order() {
        let mut sim = net(SimConfig::new(1, 2));
        sim.set_timer(1, 500, 1).expect("timer");
        sim.set_timer(0, 200, 2).expect("timer");
        sim.set_timer(1, 200, 3).expect("timer");
        let mut fired = Vec::new();
        while let Some(e) = sim.step() {
            fired.push((sim.now_us(), e));
        }
        assert_eq!(
            fired,
            vec![
                (200, SimEvent::Timer { node: 0, token: 2 }),
                (200, SimEvent::Timer { node: 1, token: 3 }),
                (500, SimEvent::Timer { node: 1, token: 1 }),
            ]
        );
        // A timer in the past fires now, not back in time.
        sim.set_timer(0, 10, 4).expect("timer");
        assert_eq!(sim.step(), Some(SimEvent::Timer { node: 0, token: 4 }));
        assert_eq!(sim.now_us(), 500);
    }

    #[test]
    fn crash_silences_a_node_and_tells_its_peers() {
        let mut sim = net(SimConfig::new(5, 3));
        sim.send(0, 2, vec![1]).expect("send");
        sim.send(2, 1, vec![2]).expect("send");
        sim.send(0, 1, vec![3]).expect("send");
        sim.set_timer(2, 10, 9).expect("timer");
        sim.crash(2).expect("crash");
        sim.send(2, 0, vec![4])
            .expect("send from crashed node is accepted");
        sim.send(1, 2, vec![5])
            .expect("send to crashed node is accepted");
        sim.set_timer(2, 20, 10).expect("timer");
        let mut events = Vec::new();
        while let Some(e) = sim.step() {
            events.push(e);
        }
        for e in &events {
            let involves_2 = match e {
                SimEvent::Deliver { from, to, .. } => *from == 2 || *to == 2,
                SimEvent::ConnectionLost { a, .. } => *a == 2,
                SimEvent::Timer { node, .. } => *node == 2,
            };
            assert!(!involves_2, "crashed node saw or sent {e:?}");
        }
        assert!(events.contains(&SimEvent::ConnectionLost { a: 0, b: 2 }));
        assert!(events.contains(&SimEvent::ConnectionLost { a: 1, b: 2 }));
        assert!(events.contains(&SimEvent::Deliver {
            from: 0,
            to: 1,
            payload: vec![3]
        }));
        let s = sim.stats();
        assert_eq!(
            (s.frames_sent, s.frames_delivered, s.frames_dropped),
            (5, 1, 4)
        );
        assert!(sim.is_crashed(2).expect("node exists"));
        // Long after any reconnect delay the node stays unreachable.
        sim.set_timer(0, 10_000_000, 0).expect("timer");
        let _ = sim.step();
        assert!(!sim.is_connected(0, 2).expect("nodes exist"));
    }

    #[test]
    fn partition_holds_until_its_end() {
        let mut sim = net(SimConfig {
            min_delay_us: 10,
            max_delay_us: 10,
            reconnect_delay_us: 100,
            ..SimConfig::new(2, 2)
        });
        sim.partition(0, 1, 5_000).expect("partition");
        assert_eq!(sim.step(), Some(SimEvent::ConnectionLost { a: 0, b: 1 }));
        assert_eq!(sim.step(), Some(SimEvent::ConnectionLost { a: 1, b: 0 }));
        sim.set_timer(0, 4_999, 0).expect("timer");
        assert!(sim.step().is_some());
        sim.send(0, 1, vec![1]).expect("send");
        assert_eq!(sim.step(), None, "dropped during the partition");
        sim.set_timer(0, 5_000, 0).expect("timer");
        assert!(sim.step().is_some());
        sim.send(0, 1, vec![2]).expect("send");
        assert_eq!(
            sim.step(),
            Some(SimEvent::Deliver {
                from: 0,
                to: 1,
                payload: vec![2]
            })
        );
        assert_eq!(sim.stats().frames_dropped, 1);
    }

    /// A small retransmitting protocol, as a cluster simulation would run one: node 0 sends
    /// messages 0..N to node 1, resends everything unacknowledged after each `ConnectionLost`,
    /// and node 1 acknowledges the next number it expects. Over many seeds with random losses:
    /// everything arrives, duplicates do reach the receiver (the retries), and no message is
    /// ever skipped, which is the no-gap guarantee a protocol relies on.
    #[test]
    fn a_retrying_protocol_sees_duplicates_but_never_gaps() {
        const N: u64 = 40;
        const RETRY: u64 = u64::MAX;
        let mut total_duplicates = 0;
        for seed in 0..200 {
            let cfg = SimConfig {
                loss_per_million: 30_000,
                reconnect_delay_us: 5_000,
                ..SimConfig::new(seed, 2)
            };
            let reconnect_delay_us = cfg.reconnect_delay_us;
            let mut sim = net(cfg);
            let mut acked = 0u64;
            let mut expected = 0u64;
            let mut duplicates = 0u64;
            let send_unacked = |sim: &mut SimNet, from: u64| {
                for k in from..N {
                    sim.send(0, 1, seq_payload(k)).expect("send");
                }
            };
            send_unacked(&mut sim, 0);
            let mut steps = 0;
            while let Some(event) = sim.step() {
                steps += 1;
                assert!(steps < 1_000_000, "seed {seed}: no progress");
                match event {
                    SimEvent::Deliver { to: 1, payload, .. } => {
                        let k = payload_seq(&payload);
                        assert!(
                            k <= expected,
                            "seed {seed}: gap, got {k} expecting {expected}"
                        );
                        if k == expected {
                            expected += 1;
                        } else {
                            duplicates += 1;
                        }
                        sim.send(1, 0, seq_payload(expected)).expect("ack");
                    }
                    SimEvent::Deliver { to: 0, payload, .. } => {
                        acked = acked.max(payload_seq(&payload));
                    }
                    SimEvent::ConnectionLost { a: 0, .. } if acked < N => {
                        let at_us = sim.now_us() + reconnect_delay_us + 1;
                        sim.set_timer(0, at_us, RETRY).expect("timer");
                    }
                    SimEvent::Timer { node: 0, token } if token == RETRY && acked < N => {
                        send_unacked(&mut sim, acked);
                    }
                    _ => {}
                }
            }
            assert_eq!((expected, acked), (N, N), "seed {seed}");
            total_duplicates += duplicates;
        }
        assert!(total_duplicates > 0, "retries produced duplicates");
    }

    #[test]
    fn a_restarted_node_starts_afresh() {
        let mut sim = net(SimConfig {
            min_delay_us: 10,
            max_delay_us: 10,
            reconnect_delay_us: 1_000,
            ..SimConfig::new(9, 2)
        });
        sim.set_timer(1, 5_000, 1).expect("timer of the first life");
        sim.send(0, 1, vec![1]).expect("send");
        sim.crash(1).expect("crash");
        assert_eq!(sim.step(), Some(SimEvent::ConnectionLost { a: 0, b: 1 }));
        sim.restart(1).expect("restart");
        assert!(!sim.is_crashed(1).expect("node exists"));
        // Down until the reconnect delay is over, then usable again.
        sim.send(0, 1, vec![2]).expect("send");
        sim.set_timer(0, 1_000, 2).expect("timer");
        assert_eq!(sim.step(), Some(SimEvent::Timer { node: 0, token: 2 }));
        sim.send(0, 1, vec![3]).expect("send");
        sim.set_timer(1, 6_000, 3)
            .expect("timer of the second life");
        let mut rest = Vec::new();
        while let Some(e) = sim.step() {
            rest.push(e);
        }
        assert_eq!(
            rest,
            vec![
                SimEvent::Deliver {
                    from: 0,
                    to: 1,
                    payload: vec![3]
                },
                SimEvent::Timer { node: 1, token: 3 },
            ],
            "the first life's timer and frames never reach the second"
        );
        let s = sim.stats();
        assert_eq!(
            (s.frames_sent, s.frames_delivered, s.frames_dropped),
            (3, 1, 2)
        );
    }
}
