//! The io_uring TCP transport.
//!
//! Start-up is two steps so tests can use ephemeral ports: [`TcpTransport::bind`] opens the
//! listener, [`Bound::establish`] builds the full mesh (the lower rank accepts, the higher rank
//! connects; every connection starts with a Hello the acceptor checks) with plain non-blocking
//! sockets, then hands every socket to one I/O thread that owns an io_uring.
//!
//! The I/O thread owns the ring and everything the kernel may touch while an operation is in
//! flight (receive buffers, outbound batches, the eventfd counter); callers never share those.
//! Callers append encoded frames to a per-peer outbound queue (under a mutex) and wake the
//! thread through an eventfd read armed on the ring; each ring turn the thread takes a peer's
//! whole queue as one batch and sends it with one SEND (SEND_ZC for large batches to remote
//! peers when the kernel supports it; see [`ZeroCopy`]). Receives are multishot RECVs drawing
//! from one provided-buffer ring when the kernel has them, single-shot RECVs otherwise.
//!
//! Memory locking: the only pinned memory is the buffer ring's entry page, taken only when
//! RLIMIT_MEMLOCK leaves room; no fixed buffers are registered, because batches are built in
//! ordinary growable buffers (fixed buffers pay off once page payloads are sent straight from the
//! engine's registered page pools).
//!
//! Not supported: reconnecting a lost peer (a later Hello from its rank is refused; the job
//! restarts), and adding ranks after establish. Invariants:
//! - at most one send is in flight per peer, so bytes leave in queue order;
//! - a buffer or socket referenced by an operation lives until that operation's final completion
//!   (a CQE without the MORE flag); sockets are shut down, not closed, to end their operations;
//! - every peer yields exactly one PeerLeft or PeerLost event;
//! - queues are bounded: `max_queue_bytes` per peer outbound (callers block up to
//!   `send_timeout_ms`, then get [`TransportError::QueueFull`]), `max_inbound_bytes` of undelivered
//!   events (receiving pauses until [`Transport::poll`] drains them), `MAX_PENDING_HANDSHAKES`
//!   connections in handshake.

use crate::handshake::{HandshakeError, Policy, Refusal, Refusals, PROTOCOL_VERSION};
use crate::uring::{self, BufRing, EventFd, RECV_BGID};
use crate::wire::{self, Decoder, Frame, FrameKind, HEADER_BYTES, MAX_PAYLOAD_BYTES};
use crate::{
    Event, LossReason, NodeId, PageVersionRef, PeerCounters, RefuseReason, RequestId, Transport,
    TransportError, UnreachablePeer,
};
use io_uring::{cqueue, opcode, types, IoUring, Probe};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Connections allowed in handshake at once; more are closed unanswered.
const MAX_PENDING_HANDSHAKES: usize = 16;
/// Most bytes read from one handshaking socket per pass of the establish loop.
const HANDSHAKE_READ_BYTES: usize = 16 * 1024;
/// A Hello is small: a handshake decoder refuses larger payloads from the header.
const MAX_HANDSHAKE_PAYLOAD_BYTES: usize = 1024;
/// Batches at least this large go out with SEND_ZC when the kernel has it.
const ZC_MIN_BYTES: usize = 64 * 1024;
/// Receive buffers in the provided-buffer ring, and their size.
const RECV_BUFFERS: u16 = 64;
const RECV_BUFFER_BYTES: u32 = 64 * 1024;
/// Locked memory the buffer ring pins (its entry page).
const BUF_RING_PINNED_BYTES: u64 = 4096;
/// How long a graceful close waits for queued frames and the Goodbye to leave.
const CLOSE_DRAIN_MS: u64 = 2000;
/// Largest batch buffer kept for reuse after a burst.
const SPARE_KEEP_BYTES: usize = 8 << 20;
/// Rough per-event overhead counted against `max_inbound_bytes`.
const EVENT_OVERHEAD_BYTES: u64 = 64;

/// Configuration of one node's TCP transport.
#[derive(Clone, Debug)]
pub struct TcpConfig {
    pub rank: NodeId,
    pub world: u32,
    pub listen_addr: SocketAddr,
    /// Shared secret of the job; a Hello with another token is refused.
    pub token: Vec<u8>,
    /// Establishing the mesh fails after this long, naming the peers not reached.
    pub connect_timeout_ms: u64,
    /// A Ping goes to a peer nothing was sent to for this long.
    pub heartbeat_ms: u64,
    /// A peer nothing was received from for this long is lost.
    pub peer_timeout_ms: u64,
    /// An incoming connection must complete its Hello within this long.
    pub handshake_timeout_ms: u64,
    /// Outbound bytes queued per peer before `send` blocks.
    pub max_queue_bytes: u64,
    /// How long `send` and `flush` block on a full queue before failing.
    pub send_timeout_ms: u64,
    /// Undelivered inbound event bytes before receiving pauses.
    pub max_inbound_bytes: u64,
    /// Submission queue entries of the ring.
    pub ring_entries: u32,
    /// Use multishot receives when the kernel has them (false forces the single-shot path).
    pub multishot_recv: bool,
    /// When to send large batches with SEND_ZC (if the kernel has it).
    pub zero_copy: ZeroCopy,
}

/// Where SEND_ZC is used for batches of at least 64 KiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroCopy {
    /// Plain SEND only.
    Off,
    /// Only to peers that are not on a loopback address: a zero-copy buffer sent over loopback
    /// is copied by the kernel anyway when it is delivered, which costs more than a plain send.
    RemoteOnly,
    /// To every peer (tests use it to exercise the path on loopback).
    Always,
}

impl TcpConfig {
    pub fn new(rank: NodeId, world: u32, listen_addr: SocketAddr, token: &[u8]) -> TcpConfig {
        TcpConfig {
            rank,
            world,
            listen_addr,
            token: token.to_vec(),
            connect_timeout_ms: 10_000,
            heartbeat_ms: 1_000,
            peer_timeout_ms: 5_000,
            handshake_timeout_ms: 5_000,
            max_queue_bytes: 64 << 20,
            send_timeout_ms: 10_000,
            max_inbound_bytes: 256 << 20,
            ring_entries: 256,
            multishot_recv: true,
            zero_copy: ZeroCopy::RemoteOnly,
        }
    }

    fn validate(&self) -> Result<(), TransportError> {
        let bad = |s: String| Err(TransportError::Config(s));
        if self.world == 0 || self.rank >= self.world {
            return bad(format!("rank {} outside world {}", self.rank, self.world));
        }
        if self.world > 1 << 20 {
            return bad(format!("world {} larger than 2^20", self.world));
        }
        if self.token.len() > wire::MAX_TOKEN_BYTES {
            return bad(format!("token of {} bytes (max 256)", self.token.len()));
        }
        if self.heartbeat_ms == 0 || self.peer_timeout_ms <= self.heartbeat_ms {
            return bad(format!(
                "peer_timeout_ms ({}) must exceed heartbeat_ms ({}) > 0",
                self.peer_timeout_ms, self.heartbeat_ms
            ));
        }
        let one_frame = (HEADER_BYTES + MAX_PAYLOAD_BYTES) as u64;
        if self.max_queue_bytes < one_frame || self.max_inbound_bytes < one_frame {
            return bad(format!(
                "max_queue_bytes and max_inbound_bytes must hold one largest frame ({one_frame} bytes)"
            ));
        }
        if !(8..=32768).contains(&self.ring_entries) {
            return bad(format!(
                "ring_entries {} not in 8..=32768",
                self.ring_entries
            ));
        }
        Ok(())
    }
}

/// What the kernel offered when the ring was set up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UringFeatures {
    /// Multishot RECV with a provided-buffer ring (else one RECV per read).
    pub multishot_recv: bool,
    /// IORING_OP_SEND_ZC is available and allowed by the configuration; see [`ZeroCopy`] for
    /// which peers it is used with.
    pub send_zc: bool,
    /// The soft RLIMIT_MEMLOCK; `None` = unlimited.
    pub memlock_limit_bytes: Option<u64>,
    /// Memory pinned by this transport (the buffer ring's entry page).
    pub pinned_bytes: u64,
}

// ---------------------------------------------------------------------------------------------
// State shared between callers and the I/O thread

const LIVE: u8 = 0;
const LEFT: u8 = 1;
const LOST: u8 = 2;

const RUN: u8 = 0;
const STOP_GRACEFUL: u8 = 1;
const STOP_ABORT: u8 = 2;

#[derive(Default)]
struct OutQueue {
    /// Encoded frames not yet taken by the I/O thread.
    pending: Vec<u8>,
    enqueued_total: u64,
    /// Bytes the kernel accepted.
    written_total: u64,
    max_depth: u64,
}

struct PeerShared {
    addr: SocketAddr,
    out: Mutex<OutQueue>,
    out_cv: Condvar,
    state: AtomicU8,
    messages_sent: AtomicU64,
    bytes_sent: AtomicU64,
    messages_received: AtomicU64,
    bytes_received: AtomicU64,
}

#[derive(Default)]
struct Inbox {
    events: VecDeque<Event>,
    bytes: u64,
}

struct Shared {
    rank: NodeId,
    local_addr: SocketAddr,
    world: u32,
    peers: Vec<PeerShared>,
    inbox: Mutex<Inbox>,
    inbox_cv: Condvar,
    eventfd: EventFd,
    wake_pending: AtomicBool,
    stop: AtomicU8,
    rx_paused: AtomicBool,
    next_request: AtomicU64,
    refusals: Refusals,
    features: UringFeatures,
    max_queue_bytes: u64,
    send_timeout: Duration,
    max_inbound_bytes: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn event_bytes(e: &Event) -> u64 {
    EVENT_OVERHEAD_BYTES
        + match e {
            Event::Message { payload, .. }
            | Event::Request { payload, .. }
            | Event::Response { payload, .. } => payload.len() as u64,
            Event::PageData { .. } => wire::PAGE_RECORD_BYTES as u64,
            Event::Pages { pages, .. } => (pages.len() * wire::PAGE_RECORD_BYTES) as u64,
            _ => 0,
        }
}

impl Shared {
    fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            self.eventfd.signal();
        }
    }

    fn peer(&self, to: NodeId) -> Result<&PeerShared, TransportError> {
        if to == self.rank {
            return Err(TransportError::ToSelf(to));
        }
        self.peers
            .get(to as usize)
            .ok_or(TransportError::UnknownPeer {
                peer: to,
                world: self.world,
            })
    }

    /// Append frames to `to`'s queue, blocking (bounded) while the queue is full. `encode`
    /// returns the wire bytes it appended and how many data frames they hold.
    fn enqueue(
        &self,
        to: NodeId,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<(usize, u64), wire::WireError>,
    ) -> Result<(), TransportError> {
        let peer = self.peer(to)?;
        let deadline = Instant::now() + self.send_timeout;
        let mut q = lock(&peer.out);
        loop {
            if self.stop.load(Ordering::Acquire) != RUN {
                return Err(TransportError::Closed);
            }
            if peer.state.load(Ordering::Acquire) != LIVE {
                return Err(TransportError::PeerGone {
                    peer: to,
                    addr: peer.addr,
                });
            }
            let depth = q.enqueued_total - q.written_total;
            // A frame is accepted while the queue is below the limit, so one frame of any size
            // up to MAX_PAYLOAD_BYTES always fits an empty queue.
            if depth < self.max_queue_bytes {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(TransportError::QueueFull {
                    peer: to,
                    addr: peer.addr,
                    queued_bytes: depth,
                    limit_bytes: self.max_queue_bytes,
                    waited_ms: self.send_timeout.as_millis() as u64,
                });
            }
            q = peer
                .out_cv
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let (len, frames) = encode(&mut q.pending)?;
        q.enqueued_total += len as u64;
        let depth = q.enqueued_total - q.written_total;
        q.max_depth = q.max_depth.max(depth);
        drop(q);
        if frames > 0 {
            peer.messages_sent.fetch_add(frames, Ordering::Relaxed);
            peer.bytes_sent.fetch_add(len as u64, Ordering::Relaxed);
        }
        self.wake();
        Ok(())
    }

    fn push_events(&self, events: &mut Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let mut inbox = lock(&self.inbox);
        for e in events.drain(..) {
            inbox.bytes += event_bytes(&e);
            inbox.events.push_back(e);
        }
        if inbox.bytes > self.max_inbound_bytes {
            self.rx_paused.store(true, Ordering::Release);
        }
        drop(inbox);
        self.inbox_cv.notify_all();
    }

    fn next_id(&self) -> u64 {
        // Starts at 1 and would take centuries to wrap; 0 stays reserved for one-way frames.
        self.next_request.fetch_add(1, Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------------------------
// Start-up

/// A transport whose listener is bound but whose mesh is not built yet.
pub struct Bound {
    config: TcpConfig,
    listener: TcpListener,
    local_addr: SocketAddr,
}

/// The io_uring TCP transport. Dropping it closes it gracefully (see [`TcpTransport::close`]).
pub struct TcpTransport {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl TcpTransport {
    /// Validate the configuration and bind the listener (port 0 picks an ephemeral port).
    pub fn bind(config: TcpConfig) -> Result<Bound, TransportError> {
        config.validate()?;
        let listener =
            TcpListener::bind(config.listen_addr).map_err(|source| TransportError::Io {
                what: "binding the listener",
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| TransportError::Io {
            what: "reading the listener address",
            source,
        })?;
        Ok(Bound {
            config,
            listener,
            local_addr,
        })
    }
}

/// Per rank, the handshaken socket to it and its decoder (`None` for this node's own rank).
pub(crate) type Mesh = Vec<Option<(TcpStream, Decoder)>>;

/// A connection in handshake during establish.
struct Incoming {
    stream: TcpStream,
    addr: SocketAddr,
    decoder: Decoder,
    deadline: Instant,
    bytes_seen: u64,
}

enum Outgoing {
    Idle {
        next_attempt: Instant,
        last_error: String,
    },
    AwaitAck {
        stream: TcpStream,
        decoder: Decoder,
    },
    Done,
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> TransportError {
    move |source| TransportError::Io { what, source }
}

/// Read what is available (at most `HANDSHAKE_READ_BYTES`, so a peer streaming garbage
/// cannot grow the decoder before it is checked) from a non-blocking socket into `decoder`.
/// Returns bytes read, or `Ok(None)` at end of stream.
fn read_available(
    stream: &mut TcpStream,
    decoder: &mut Decoder,
    scratch: &mut [u8],
) -> io::Result<Option<usize>> {
    let mut total = 0;
    while total < HANDSHAKE_READ_BYTES {
        match stream.read(scratch) {
            Ok(0) => {
                return if total == 0 {
                    Ok(None)
                } else {
                    Ok(Some(total))
                }
            }
            Ok(n) => {
                decoder.feed(scratch.get(..n).unwrap_or(&[]));
                total += n;
                if n < scratch.len() {
                    return Ok(Some(total));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Some(total)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(total))
}

fn write_frame(stream: &mut TcpStream, frame: &Frame) -> io::Result<()> {
    let bytes = frame
        .to_bytes()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    // Handshake frames are tiny and go first on a fresh socket: the send buffer takes them whole.
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    let r = stream.write_all(&bytes);
    stream.set_nonblocking(true)?;
    r
}

impl Bound {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Build the full mesh: connect to every lower rank, accept every higher rank, then start
    /// the I/O thread. `peers[r]` is rank r's listen address (our own entry is ignored). Fails
    /// after `connect_timeout_ms` naming every peer not reached, or at once if a peer refuses
    /// our Hello (a configuration mismatch retrying cannot fix).
    pub fn establish(self, peers: Vec<SocketAddr>) -> Result<TcpTransport, TransportError> {
        let (connected, refusals) = self.mesh(&peers)?;
        self.start(peers, connected, refusals)
    }

    /// The configuration this listener was bound with.
    pub fn config(&self) -> &TcpConfig {
        &self.config
    }

    /// The mesh of [`Bound::establish`] without the I/O thread: one handshaken socket per peer
    /// (non-blocking, its decoder past the Hello exchange). The verbs transport bootstraps its
    /// queue pairs over these.
    pub(crate) fn mesh(&self, peers: &[SocketAddr]) -> Result<(Mesh, Refusals), TransportError> {
        let cfg = &self.config;
        if peers.len() != cfg.world as usize {
            return Err(TransportError::Config(format!(
                "{} peer addresses for world {}",
                peers.len(),
                cfg.world
            )));
        }
        let refusals = Refusals::default();
        let policy = Policy {
            local: cfg.rank,
            world: cfg.world,
            token: &cfg.token,
        };
        self.listener
            .set_nonblocking(true)
            .map_err(io_err("setting the listener non-blocking"))?;
        let start = Instant::now();
        let deadline = start + Duration::from_millis(cfg.connect_timeout_ms);
        let mut connected: Vec<Option<(TcpStream, Decoder)>> =
            (0..cfg.world).map(|_| None).collect();
        let mut outgoing: Vec<Outgoing> = (0..cfg.rank)
            .map(|_| Outgoing::Idle {
                next_attempt: start,
                last_error: "no attempt yet".into(),
            })
            .collect();
        let mut incoming: Vec<Incoming> = Vec::new();
        let mut scratch = vec![0u8; 4096];
        let missing = |connected: &[Option<(TcpStream, Decoder)>]| {
            (0..cfg.world)
                .filter(|&r| {
                    r != cfg.rank && connected.get(r as usize).is_some_and(Option::is_none)
                })
                .count()
        };

        while missing(&connected) > 0 {
            let now = Instant::now();
            if now >= deadline {
                let peers = (0..cfg.world)
                    .filter(|&r| r != cfg.rank && connected[r as usize].is_none())
                    .map(|r| UnreachablePeer {
                        rank: r,
                        addr: peers[r as usize],
                        last_error: match outgoing.get(r as usize) {
                            Some(Outgoing::Idle { last_error, .. }) => last_error.clone(),
                            Some(Outgoing::AwaitAck { .. }) => "no answer to our hello".into(),
                            _ => "never connected to us".into(),
                        },
                    })
                    .collect();
                return Err(TransportError::Unreachable {
                    peers,
                    timeout_ms: cfg.connect_timeout_ms,
                });
            }
            let mut progress = false;

            // Accept whoever knocks.
            loop {
                match self.listener.accept() {
                    Ok((stream, addr)) => {
                        progress = true;
                        if incoming.len() >= MAX_PENDING_HANDSHAKES {
                            refusals.record(
                                cfg.rank,
                                Refusal {
                                    addr,
                                    claimed_rank: None,
                                    error: HandshakeError::Refused(RefuseReason::Busy),
                                },
                            );
                            continue;
                        }
                        if stream.set_nonblocking(true).is_err() {
                            continue;
                        }
                        let _ = stream.set_nodelay(true);
                        incoming.push(Incoming {
                            stream,
                            addr,
                            decoder: Decoder::with_max_payload(MAX_HANDSHAKE_PAYLOAD_BYTES),
                            deadline: now + Duration::from_millis(cfg.handshake_timeout_ms),
                            bytes_seen: 0,
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::debug!(node = cfg.rank, "accept failed: {e}");
                        break;
                    }
                }
            }

            // Advance handshakes of incoming connections.
            let mut i = 0;
            while i < incoming.len() {
                let inc = &mut incoming[i];
                let outcome: Option<Result<NodeId, (Option<NodeId>, HandshakeError)>> =
                    match read_available(&mut inc.stream, &mut inc.decoder, &mut scratch) {
                        Err(e) => Some(Err((None, HandshakeError::Io(e.to_string())))),
                        Ok(read) => {
                            if let Some(n) = read {
                                inc.bytes_seen += n as u64;
                                progress |= n > 0;
                            }
                            match inc.decoder.next_frame() {
                                Ok(Some(Frame::Hello(h))) => Some(match policy.check(&h) {
                                    Ok(r)
                                        if connected
                                            .get(r as usize)
                                            .is_none_or(Option::is_some) =>
                                    {
                                        Err((
                                            Some(r),
                                            HandshakeError::Refused(
                                                RefuseReason::AlreadyConnected { rank: r },
                                            ),
                                        ))
                                    }
                                    Ok(r) => Ok(r),
                                    Err(reason) => {
                                        Err((Some(h.rank), HandshakeError::Refused(reason)))
                                    }
                                }),
                                Ok(Some(other)) => Some(Err((
                                    None,
                                    HandshakeError::NotHello {
                                        kind: other.kind().name(),
                                    },
                                ))),
                                Err(e) => Some(Err((None, HandshakeError::Wire(e)))),
                                Ok(None) if read.is_none() => Some(Err((
                                    None,
                                    HandshakeError::Closed {
                                        after_bytes: inc.bytes_seen,
                                    },
                                ))),
                                Ok(None) if now >= inc.deadline => Some(Err((
                                    None,
                                    HandshakeError::Timeout {
                                        waited_ms: cfg.handshake_timeout_ms,
                                    },
                                ))),
                                Ok(None) => None,
                            }
                        }
                    };
                match outcome {
                    None => i += 1,
                    Some(result) => {
                        progress = true;
                        let mut inc = incoming.swap_remove(i);
                        match result {
                            Ok(rank) => {
                                let ack = Frame::HelloAck {
                                    protocol_version: PROTOCOL_VERSION,
                                    rank: cfg.rank,
                                    world: cfg.world,
                                };
                                match write_frame(&mut inc.stream, &ack) {
                                    Ok(()) => {
                                        tracing::debug!(node = cfg.rank, peer = rank, addr = %inc.addr, "peer connected");
                                        inc.decoder.set_max_payload(MAX_PAYLOAD_BYTES);
                                        if let Some(slot) = connected.get_mut(rank as usize) {
                                            *slot = Some((inc.stream, inc.decoder));
                                        }
                                    }
                                    Err(e) => refusals.record(
                                        cfg.rank,
                                        Refusal {
                                            addr: inc.addr,
                                            claimed_rank: Some(rank),
                                            error: HandshakeError::Io(e.to_string()),
                                        },
                                    ),
                                }
                            }
                            Err((claimed_rank, error)) => {
                                if let Some(reason) = error.refuse_reason() {
                                    let _ = write_frame(&mut inc.stream, &Frame::Refuse(reason));
                                }
                                refusals.record(
                                    cfg.rank,
                                    Refusal {
                                        addr: inc.addr,
                                        claimed_rank,
                                        error,
                                    },
                                );
                            }
                        }
                    }
                }
            }

            // Connect to lower ranks.
            for (r, out) in outgoing.iter_mut().enumerate() {
                let addr = peers[r];
                let next = match std::mem::replace(out, Outgoing::Done) {
                    Outgoing::Idle {
                        next_attempt,
                        last_error: _,
                    } if now >= next_attempt => {
                        progress = true;
                        let attempt = deadline
                            .saturating_duration_since(now)
                            .min(Duration::from_millis(200))
                            .max(Duration::from_millis(1));
                        let hello = Frame::Hello(policy.hello());
                        let connected_stream =
                            TcpStream::connect_timeout(&addr, attempt).and_then(|mut s| {
                                s.set_nodelay(true)?;
                                s.set_nonblocking(true)?;
                                write_frame(&mut s, &hello)?;
                                Ok(s)
                            });
                        match connected_stream {
                            Ok(stream) => Outgoing::AwaitAck {
                                stream,
                                decoder: Decoder::new(),
                            },
                            Err(e) => Outgoing::Idle {
                                next_attempt: Instant::now() + Duration::from_millis(20),
                                last_error: e.to_string(),
                            },
                        }
                    }
                    Outgoing::AwaitAck {
                        mut stream,
                        mut decoder,
                    } => {
                        let retry = |why: String| Outgoing::Idle {
                            next_attempt: Instant::now() + Duration::from_millis(20),
                            last_error: why,
                        };
                        match read_available(&mut stream, &mut decoder, &mut scratch) {
                            Err(e) => retry(format!("reading the hello answer: {e}")),
                            Ok(read) => match decoder.next_frame() {
                                Ok(Some(Frame::HelloAck {
                                    protocol_version,
                                    rank,
                                    world,
                                })) if protocol_version == PROTOCOL_VERSION
                                    && rank as usize == r
                                    && world == cfg.world =>
                                {
                                    progress = true;
                                    tracing::debug!(node = cfg.rank, peer = r, %addr, "connected to peer");
                                    connected[r] = Some((stream, decoder));
                                    Outgoing::Done
                                }
                                Ok(Some(Frame::Refuse(reason))) => {
                                    return Err(TransportError::RefusedBy {
                                        peer: r as NodeId,
                                        addr,
                                        reason,
                                    });
                                }
                                Ok(Some(other)) => retry(format!(
                                    "answered our hello with an unexpected {} frame",
                                    other.kind()
                                )),
                                Err(e) => retry(format!("bad answer to our hello: {e}")),
                                Ok(None) if read.is_none() => {
                                    retry("closed before answering our hello".into())
                                }
                                Ok(None) => Outgoing::AwaitAck { stream, decoder },
                            },
                        }
                    }
                    other => other,
                };
                *out = next;
            }

            if !progress {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // Handshakes still running when the mesh completed are abandoned: every rank is taken.
        for inc in incoming {
            refusals.record(
                cfg.rank,
                Refusal {
                    addr: inc.addr,
                    claimed_rank: None,
                    error: HandshakeError::Abandoned {
                        after_bytes: inc.bytes_seen,
                    },
                },
            );
        }
        Ok((connected, refusals))
    }

    fn start(
        self,
        peer_addrs: Vec<SocketAddr>,
        connected: Vec<Option<(TcpStream, Decoder)>>,
        refusals: Refusals,
    ) -> Result<TcpTransport, TransportError> {
        let cfg = self.config;
        let ring = IoUring::builder()
            .build(cfg.ring_entries)
            .map_err(io_err("creating the io_uring"))?;
        if !ring.params().is_feature_ext_arg() {
            return Err(TransportError::Config(
                "the kernel's io_uring lacks EXT_ARG (Linux 5.11+ needed)".into(),
            ));
        }
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(io_err("probing io_uring opcodes"))?;
        for (code, name) in [
            (opcode::Accept::CODE, "ACCEPT"),
            (opcode::Recv::CODE, "RECV"),
            (opcode::Send::CODE, "SEND"),
            (opcode::Read::CODE, "READ"),
        ] {
            if !probe.is_supported(code) {
                return Err(TransportError::Config(format!(
                    "the kernel's io_uring lacks {name}"
                )));
            }
        }
        let send_zc = cfg.zero_copy != ZeroCopy::Off && probe.is_supported(opcode::SendZc::CODE);
        let memlock = uring::memlock_limit_bytes();
        // The buffer ring pins one page; take it only when the limit leaves room for it twice
        // over, since other rings of the process share the same limit.
        let bufring = if !cfg.multishot_recv {
            None
        } else if memlock.is_some_and(|l| l < 4 * BUF_RING_PINNED_BYTES) {
            tracing::info!(
                node = cfg.rank,
                memlock_limit_bytes = memlock,
                "RLIMIT_MEMLOCK too small to pin a receive buffer ring; using single-shot receives"
            );
            None
        } else {
            match BufRing::register(&ring, RECV_BUFFERS, RECV_BUFFER_BYTES) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::info!(
                        node = cfg.rank,
                        "no provided-buffer ring ({e}); using single-shot receives"
                    );
                    None
                }
            }
        };
        let features = UringFeatures {
            multishot_recv: bufring.is_some(),
            send_zc,
            memlock_limit_bytes: memlock,
            pinned_bytes: if bufring.is_some() {
                BUF_RING_PINNED_BYTES
            } else {
                0
            },
        };
        tracing::info!(node = cfg.rank, ?features, "io_uring transport starting");
        let eventfd = EventFd::new().map_err(io_err("creating the wake eventfd"))?;
        let shared = Arc::new(Shared {
            rank: cfg.rank,
            local_addr: self.local_addr,
            world: cfg.world,
            peers: peer_addrs
                .iter()
                .map(|&addr| PeerShared {
                    addr,
                    out: Mutex::new(OutQueue::default()),
                    out_cv: Condvar::new(),
                    state: AtomicU8::new(LIVE),
                    messages_sent: AtomicU64::new(0),
                    bytes_sent: AtomicU64::new(0),
                    messages_received: AtomicU64::new(0),
                    bytes_received: AtomicU64::new(0),
                })
                .collect(),
            inbox: Mutex::new(Inbox::default()),
            inbox_cv: Condvar::new(),
            eventfd,
            wake_pending: AtomicBool::new(false),
            stop: AtomicU8::new(RUN),
            rx_paused: AtomicBool::new(false),
            next_request: AtomicU64::new(1),
            refusals,
            features,
            max_queue_bytes: cfg.max_queue_bytes,
            send_timeout: Duration::from_millis(cfg.send_timeout_ms),
            max_inbound_bytes: cfg.max_inbound_bytes,
        });
        let now = Instant::now();
        let mut conns = Vec::with_capacity(connected.len());
        for (rank, c) in connected.into_iter().enumerate() {
            conns.push(match c {
                Some((stream, decoder)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(io_err("handing a socket to the ring"))?;
                    let loopback = stream.peer_addr().is_ok_and(|a| a.ip().is_loopback());
                    let zero_copy = send_zc
                        && (cfg.zero_copy == ZeroCopy::Always
                            || (cfg.zero_copy == ZeroCopy::RemoteOnly && !loopback));
                    Some(Conn {
                        zero_copy,
                        rank: rank as NodeId,
                        addr: peer_addrs[rank],
                        stream,
                        decoder,
                        ended: false,
                        recv_armed: false,
                        recv_buf: Vec::new(),
                        sending: Vec::new(),
                        send_off: 0,
                        send_inflight: false,
                        zc_notif_pending: false,
                        last_rx: now,
                        last_tx: now,
                    })
                }
                None => None,
            });
        }
        self.listener
            .set_nonblocking(false)
            .map_err(io_err("handing the listener to the ring"))?;
        let mut io = IoThread {
            ring,
            bufring,
            shared: Arc::clone(&shared),
            listener: self.listener,
            conns,
            pending: (0..MAX_PENDING_HANDSHAKES).map(|_| None).collect(),
            wake_buf: Box::new([0u8; 8]),
            wake_armed: false,
            accept_armed: false,
            accept_retry_at: None,
            ops: 0,
            multishot: features.multishot_recv,
            zc: send_zc,
            paused: false,
            fin_sent: false,
            next_gen: 1,
            heartbeat: Duration::from_millis(cfg.heartbeat_ms),
            peer_timeout: Duration::from_millis(cfg.peer_timeout_ms),
            handshake_timeout: Duration::from_millis(cfg.handshake_timeout_ms),
            token: cfg.token.clone(),
            spare: Vec::new(),
        };
        let rank = cfg.rank;
        let thread = std::thread::Builder::new()
            .name(format!("dvm-tcp-io-{rank}"))
            .spawn(move || io.run())
            .map_err(io_err("spawning the I/O thread"))?;
        Ok(TcpTransport {
            shared,
            thread: Some(thread),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The I/O thread

const OP_WAKE: u64 = 1;
const OP_ACCEPT: u64 = 2;
const OP_RECV: u64 = 3;
const OP_SEND: u64 = 4;
const OP_PRECV: u64 = 5;
const OP_PSEND: u64 = 6;
const OP_CANCEL: u64 = 7;

fn user_data(op: u64, slot: usize, gen: u32) -> u64 {
    (op << 56) | ((slot as u64 & 0xff_ffff) << 32) | u64::from(gen)
}

fn split_user_data(ud: u64) -> (u64, usize, u32) {
    (ud >> 56, ((ud >> 32) & 0xff_ffff) as usize, ud as u32)
}

/// A connected peer, as the I/O thread sees it.
struct Conn {
    rank: NodeId,
    addr: SocketAddr,
    stream: TcpStream,
    decoder: Decoder,
    /// PeerLeft or PeerLost was reported; the socket is shut down.
    ended: bool,
    recv_armed: bool,
    /// Single-shot receive buffer, allocated only when multishot is unavailable.
    recv_buf: Vec<u8>,
    /// The batch being sent; the kernel may read it until the send's final completion.
    sending: Vec<u8>,
    send_off: usize,
    send_inflight: bool,
    /// Large batches to this peer go out with SEND_ZC.
    zero_copy: bool,
    zc_notif_pending: bool,
    last_rx: Instant,
    last_tx: Instant,
}

enum PendingState {
    Reading,
    Refusing,
    Closing,
}

/// An incoming connection after establish, in handshake. Every one is refused (the mesh is
/// complete), but with the precise reason.
struct PendingConn {
    stream: TcpStream,
    addr: SocketAddr,
    decoder: Decoder,
    buf: Box<[u8; 1024]>,
    out: Vec<u8>,
    gen: u32,
    deadline: Instant,
    bytes_seen: u64,
    ops: u32,
    state: PendingState,
}

struct IoThread {
    // Dropped first: the kernel lets go of every buffer below before they are freed.
    ring: IoUring,
    bufring: Option<BufRing>,
    shared: Arc<Shared>,
    listener: TcpListener,
    conns: Vec<Option<Conn>>,
    pending: Vec<Option<PendingConn>>,
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
    accept_armed: bool,
    /// After a failed accept (out of descriptors, say), wait before trying again.
    accept_retry_at: Option<Instant>,
    /// Operations in flight on the ring.
    ops: u64,
    multishot: bool,
    zc: bool,
    paused: bool,
    /// Graceful close: our side of every connection is half-closed.
    fin_sent: bool,
    next_gen: u32,
    heartbeat: Duration,
    peer_timeout: Duration,
    handshake_timeout: Duration,
    token: Vec<u8>,
    /// A reusable batch buffer, swapped with a peer's pending queue.
    spare: Vec<u8>,
}

impl IoThread {
    fn run(&mut self) {
        if let Err(e) = self.event_loop() {
            tracing::error!(node = self.shared.rank, "I/O thread failed: {e}");
            let mut events = Vec::new();
            for rank in 0..self.conns.len() {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                let reason = LossReason::Io { op: "ring", errno };
                self.end_conn(rank, Some(reason), &mut events);
            }
            self.shared.push_events(&mut events);
        }
        self.teardown();
    }

    /// Queue an SQE and count it in flight.
    fn push(&mut self, entry: io_uring::squeue::Entry) -> io::Result<()> {
        // SAFETY: every entry built in this module points only at memory owned by `self` (conn
        // buffers, pending buffers, `wake_buf`, the buffer ring) or at sockets owned by `self`;
        // none of those is freed or moved while its operation is in flight: a conn's receive
        // buffer and batch are replaced only when no operation uses them (`recv_armed`,
        // `send_inflight`, `zc_notif_pending` false), conns live until `teardown`, pending
        // connections are dropped only when their `ops` count is 0, and `teardown` drains every
        // operation (or leaks the owners) before `self` is dropped.
        unsafe { uring::push_sqe(&mut self.ring, &entry)? };
        self.ops += 1;
        Ok(())
    }

    fn event_loop(&mut self) -> io::Result<()> {
        let tick = (self.heartbeat / 2).clamp(Duration::from_millis(5), Duration::from_millis(100));
        let mut next_tick = Instant::now() + tick;
        let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(256);
        let mut drain_deadline: Option<Instant> = None;
        loop {
            let stop = self.shared.stop.load(Ordering::Acquire);
            if stop == STOP_ABORT {
                return Ok(());
            }
            if stop == STOP_GRACEFUL {
                // Two phases: send everything, then half-close and wait for each peer's end of
                // stream, so no socket is closed with unread bytes (which would reset it and
                // could destroy the Goodbye before the peer reads it).
                let now = Instant::now();
                let d = *drain_deadline
                    .get_or_insert_with(|| now + Duration::from_millis(CLOSE_DRAIN_MS));
                if !self.fin_sent && (self.all_sent() || now >= d) {
                    self.fin_sent = true;
                    for c in self.conns.iter().flatten().filter(|c| !c.ended) {
                        uring::shutdown(c.stream.as_raw_fd(), libc::SHUT_WR);
                    }
                }
                if self.fin_sent && (self.conns.iter().flatten().all(|c| c.ended) || now >= d) {
                    return Ok(());
                }
            }
            self.arm()?;
            self.pump_sends()?;

            let wait = next_tick.saturating_duration_since(Instant::now());
            let ts = types::Timespec::new()
                .sec(wait.as_secs())
                .nsec(wait.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                    ) => {}
                Err(e) => return Err(e),
            }
            cqes.clear();
            cqes.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            let mut events = Vec::new();
            for &(ud, res, flags) in &cqes {
                if !cqueue::more(flags) {
                    self.ops = self.ops.saturating_sub(1);
                }
                self.complete(ud, res, flags, &mut events)?;
            }
            self.shared.push_events(&mut events);
            self.flow_control()?;
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + tick;
                self.timers(now);
            }
            self.reap();
        }
    }

    /// Everything queued (the Goodbye included, queued before the stop flag was set) left.
    fn all_sent(&self) -> bool {
        self.conns.iter().flatten().all(|c| {
            c.ended
                || (!c.send_inflight
                    && !c.zc_notif_pending
                    && c.send_off >= c.sending.len()
                    && self
                        .shared
                        .peers
                        .get(c.rank as usize)
                        .is_none_or(|p| lock(&p.out).pending.is_empty()))
        })
    }

    fn arm(&mut self) -> io::Result<()> {
        if !self.wake_armed {
            let e = opcode::Read::new(
                types::Fd(self.shared.eventfd.raw()),
                self.wake_buf.as_mut_ptr(),
                8,
            )
            .build()
            .user_data(user_data(OP_WAKE, 0, 0));
            self.push(e)?;
            self.wake_armed = true;
        }
        if !self.accept_armed
            && self.shared.stop.load(Ordering::Acquire) == RUN
            && self.accept_retry_at.is_none_or(|t| Instant::now() >= t)
        {
            let e = opcode::Accept::new(
                types::Fd(self.listener.as_raw_fd()),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(OP_ACCEPT, 0, 0));
            self.push(e)?;
            self.accept_armed = true;
        }
        if self.paused {
            return Ok(());
        }
        for rank in 0..self.conns.len() {
            let entry = match &mut self.conns[rank] {
                Some(c) if !c.ended && !c.recv_armed => {
                    c.recv_armed = true;
                    let fd = types::Fd(c.stream.as_raw_fd());
                    let ud = user_data(OP_RECV, rank, 0);
                    if self.multishot {
                        opcode::RecvMulti::new(fd, RECV_BGID).build().user_data(ud)
                    } else {
                        if c.recv_buf.is_empty() {
                            c.recv_buf = vec![0u8; RECV_BUFFER_BYTES as usize];
                        }
                        opcode::Recv::new(fd, c.recv_buf.as_mut_ptr(), c.recv_buf.len() as u32)
                            .build()
                            .user_data(ud)
                    }
                }
                _ => continue,
            };
            self.push(entry)?;
        }
        Ok(())
    }

    /// Start a send for every peer with queued bytes and none in flight.
    fn pump_sends(&mut self) -> io::Result<()> {
        for rank in 0..self.conns.len() {
            let zc = self.zc;
            let entry = {
                let Some(c) = self.conns[rank].as_mut() else {
                    continue;
                };
                if c.ended || c.send_inflight || c.zc_notif_pending {
                    continue;
                }
                if c.send_off >= c.sending.len() {
                    let Some(peer) = self.shared.peers.get(rank) else {
                        continue;
                    };
                    let mut q = lock(&peer.out);
                    if !c.sending.is_empty() {
                        // The previous batch is fully written: account for it.
                        q.written_total += c.sending.len() as u64;
                        c.sending.clear();
                        c.send_off = 0;
                        peer.out_cv.notify_all();
                    }
                    if q.pending.is_empty() {
                        continue;
                    }
                    std::mem::swap(&mut q.pending, &mut self.spare);
                    drop(q);
                    std::mem::swap(&mut c.sending, &mut self.spare);
                    // `spare` now holds the old (empty) sending buffer for the next swap; one
                    // burst must not pin its peak size for the life of the transport.
                    self.spare.clear();
                    if self.spare.capacity() > SPARE_KEEP_BYTES {
                        self.spare = Vec::new();
                    }
                }
                let rest = c.sending.get(c.send_off..).unwrap_or(&[]);
                let len = rest.len().min(u32::MAX as usize) as u32;
                let fd = types::Fd(c.stream.as_raw_fd());
                let ud = user_data(OP_SEND, rank, 0);
                c.send_inflight = true;
                c.last_tx = Instant::now();
                if zc && c.zero_copy && rest.len() >= ZC_MIN_BYTES {
                    opcode::SendZc::new(fd, rest.as_ptr(), len)
                        .flags(libc::MSG_NOSIGNAL)
                        .build()
                        .user_data(ud)
                } else {
                    opcode::Send::new(fd, rest.as_ptr(), len)
                        .flags(libc::MSG_NOSIGNAL)
                        .build()
                        .user_data(ud)
                }
            };
            self.push(entry)?;
        }
        Ok(())
    }

    fn complete(
        &mut self,
        ud: u64,
        res: i32,
        flags: u32,
        events: &mut Vec<Event>,
    ) -> io::Result<()> {
        let (op, slot, gen) = split_user_data(ud);
        let more = cqueue::more(flags);
        match op {
            OP_WAKE => {
                self.wake_armed = false;
                self.shared.wake_pending.store(false, Ordering::Release);
            }
            OP_ACCEPT => {
                self.accept_armed = false;
                if res >= 0 {
                    self.accepted(res);
                } else if res != -libc::ECANCELED {
                    tracing::warn!(
                        node = self.shared.rank,
                        "accept failed: errno {}; retrying in 100 ms",
                        -res
                    );
                    self.accept_retry_at = Some(Instant::now() + Duration::from_millis(100));
                }
            }
            OP_RECV => {
                if let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) {
                    if !more {
                        c.recv_armed = false;
                    }
                }
                self.received(slot, res, flags, events);
            }
            OP_SEND => self.sent(slot, res, flags, events),
            OP_PRECV | OP_PSEND => self.pending_done(op, slot, gen, res, more),
            _ => {}
        }
        Ok(())
    }

    fn received(&mut self, rank: usize, res: i32, flags: u32, events: &mut Vec<Event>) {
        let multishot_buf = cqueue::buffer_select(flags);
        let Some(c) = self.conns.get_mut(rank).and_then(Option::as_mut) else {
            return;
        };
        if res > 0 {
            let len = res as usize;
            match multishot_buf {
                Some(bid) => {
                    if let Some(bytes) = self.bufring.as_ref().and_then(|b| b.filled(bid, len)) {
                        if !c.ended {
                            c.decoder.feed(bytes);
                        }
                    }
                    if let Some(b) = self.bufring.as_mut() {
                        b.recycle(bid);
                    }
                }
                None => {
                    if !c.ended {
                        c.decoder.feed(c.recv_buf.get(..len).unwrap_or(&[]));
                    }
                }
            }
            if c.ended {
                return;
            }
            c.last_rx = Instant::now();
            self.decode(rank, events);
            return;
        }
        if c.ended {
            return;
        }
        let reason = match -res {
            0 => LossReason::Closed {
                offset: c.decoder.offset() + c.decoder.buffered_bytes() as u64,
            },
            libc::ENOBUFS | libc::ECANCELED => return,
            libc::EINVAL if self.multishot => {
                tracing::info!(
                    node = self.shared.rank,
                    "multishot receive refused by the kernel; using single-shot receives"
                );
                self.multishot = false;
                return;
            }
            errno => LossReason::Io { op: "recv", errno },
        };
        self.end_conn(rank, Some(reason), events);
    }

    fn decode(&mut self, rank: usize, events: &mut Vec<Event>) {
        let Some(c) = self.conns.get_mut(rank).and_then(Option::as_mut) else {
            return;
        };
        let Some(peer) = self.shared.peers.get(rank) else {
            return;
        };
        let from = rank as NodeId;
        let mut end: Option<Option<LossReason>> = None;
        loop {
            let offset = c.decoder.offset();
            let frame = match c.decoder.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(node = self.shared.rank, peer = rank, addr = %c.addr, "dropping peer: {e}");
                    end = Some(Some(LossReason::Protocol(e)));
                    break;
                }
            };
            let kind = frame.kind();
            if kind.is_data() {
                peer.messages_received.fetch_add(1, Ordering::Relaxed);
                peer.bytes_received
                    .fetch_add(c.decoder.offset() - offset, Ordering::Relaxed);
            }
            match frame {
                Frame::Message(payload) => events.push(Event::Message { from, payload }),
                Frame::Request { id, payload } => events.push(Event::Request {
                    from,
                    id: RequestId(id),
                    payload,
                }),
                Frame::Response { id, payload } => events.push(Event::Response {
                    from,
                    id: RequestId(id),
                    payload,
                }),
                Frame::ReadPage {
                    id,
                    page,
                    snapshot_ts,
                } => events.push(Event::ReadPage {
                    from,
                    id: RequestId(id),
                    page,
                    snapshot_ts,
                }),
                Frame::PageData { id, version } => events.push(Event::PageData {
                    from,
                    id: RequestId(id),
                    version,
                }),
                Frame::PushPages(pages) => events.push(Event::Pages { from, pages }),
                Frame::Ping => {}
                Frame::Goodbye => {
                    end = Some(None);
                    break;
                }
                Frame::Hello(_) | Frame::HelloAck { .. } | Frame::Refuse(_) => {
                    tracing::warn!(node = self.shared.rank, peer = rank, addr = %c.addr, "dropping peer: {kind} frame after the handshake");
                    end = Some(Some(LossReason::UnexpectedFrame {
                        kind: kind.name(),
                        offset,
                    }));
                    break;
                }
            }
        }
        if let Some(reason) = end {
            self.end_conn(rank, reason, events);
        }
    }

    fn sent(&mut self, rank: usize, res: i32, flags: u32, events: &mut Vec<Event>) {
        let more = cqueue::more(flags);
        let Some(c) = self.conns.get_mut(rank).and_then(Option::as_mut) else {
            return;
        };
        if cqueue::notif(flags) {
            c.zc_notif_pending = false;
            return;
        }
        c.send_inflight = false;
        if more {
            c.zc_notif_pending = true;
        }
        if c.ended {
            return;
        }
        if res >= 0 {
            c.send_off += res as usize;
            return;
        }
        match -res {
            libc::EOPNOTSUPP | libc::EINVAL if self.zc => {
                tracing::debug!(
                    node = self.shared.rank,
                    "SEND_ZC refused (errno {}); using SEND",
                    -res
                );
                self.zc = false;
            }
            libc::EINTR | libc::EAGAIN => {}
            errno => self.end_conn(rank, Some(LossReason::Io { op: "send", errno }), events),
        }
    }

    /// Report the end of a peer once (`None` = it said Goodbye) and shut its socket down so its
    /// operations complete.
    fn end_conn(&mut self, rank: usize, reason: Option<LossReason>, events: &mut Vec<Event>) {
        let Some(c) = self.conns.get_mut(rank).and_then(Option::as_mut) else {
            return;
        };
        if c.ended {
            return;
        }
        c.ended = true;
        uring::shutdown(c.stream.as_raw_fd(), libc::SHUT_RDWR);
        let Some(peer) = self.shared.peers.get(rank) else {
            return;
        };
        // Once this node is closing, peers ending is the expected outcome, not news.
        let running = self.shared.stop.load(Ordering::Acquire) == RUN;
        let peer_id = rank as NodeId;
        let event = match reason {
            None => {
                tracing::info!(node = self.shared.rank, peer = rank, addr = %c.addr, "peer left");
                peer.state.store(LEFT, Ordering::Release);
                Event::PeerLeft { peer: peer_id }
            }
            Some(reason) => {
                if running {
                    tracing::warn!(node = self.shared.rank, peer = rank, addr = %c.addr, "peer lost: {reason}");
                }
                peer.state.store(LOST, Ordering::Release);
                Event::PeerLost {
                    peer: peer_id,
                    reason,
                }
            }
        };
        {
            let mut q = lock(&peer.out);
            // What was queued will never leave: count it as gone so flush and senders stop
            // waiting.
            q.pending.clear();
            q.written_total = q.enqueued_total;
        }
        peer.out_cv.notify_all();
        if running {
            events.push(event);
        }
    }

    fn accepted(&mut self, fd: i32) {
        use std::os::fd::FromRawFd;
        // SAFETY: a successful ACCEPT returns a new descriptor that nothing else owns.
        let stream = unsafe { TcpStream::from_raw_fd(fd) };
        let addr = stream
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let Some(slot) = self.pending.iter().position(Option::is_none) else {
            self.shared.refusals.record(
                self.shared.rank,
                Refusal {
                    addr,
                    claimed_rank: None,
                    error: HandshakeError::Refused(RefuseReason::Busy),
                },
            );
            return;
        };
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        self.pending[slot] = Some(PendingConn {
            stream,
            addr,
            decoder: Decoder::with_max_payload(MAX_HANDSHAKE_PAYLOAD_BYTES),
            buf: Box::new([0u8; 1024]),
            out: Vec::new(),
            gen,
            deadline: Instant::now() + self.handshake_timeout,
            bytes_seen: 0,
            ops: 0,
            state: PendingState::Reading,
        });
        self.pending_recv(slot);
    }

    fn pending_recv(&mut self, slot: usize) {
        let Some(p) = self.pending.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        p.ops += 1;
        let e = opcode::Recv::new(
            types::Fd(p.stream.as_raw_fd()),
            p.buf.as_mut_ptr(),
            p.buf.len() as u32,
        )
        .build()
        .user_data(user_data(OP_PRECV, slot, p.gen));
        if self.push(e).is_err() {
            if let Some(p) = self.pending.get_mut(slot).and_then(Option::as_mut) {
                p.ops -= 1;
                p.state = PendingState::Closing;
            }
        }
    }

    fn pending_done(&mut self, op: u64, slot: usize, gen: u32, res: i32, more: bool) {
        let Some(p) = self.pending.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if p.gen != gen {
            return;
        }
        if !more {
            p.ops = p.ops.saturating_sub(1);
        }
        if op == OP_PSEND {
            // The refusal is out (or failed): close.
            uring::shutdown(p.stream.as_raw_fd(), libc::SHUT_RDWR);
            p.state = PendingState::Closing;
            return;
        }
        if !matches!(p.state, PendingState::Reading) {
            return;
        }
        let outcome: Option<(Option<NodeId>, HandshakeError)> = if res > 0 {
            let n = res as usize;
            p.bytes_seen += n as u64;
            p.decoder.feed(p.buf.get(..n).unwrap_or(&[]));
            match p.decoder.next_frame() {
                Ok(None) => None,
                Ok(Some(Frame::Hello(h))) => {
                    let policy = Policy {
                        local: self.shared.rank,
                        world: self.shared.world,
                        token: &self.token,
                    };
                    let reason = match policy.check(&h) {
                        Ok(r) => match self.conns.get(r as usize).and_then(Option::as_ref) {
                            Some(c) if !c.ended => RefuseReason::AlreadyConnected { rank: r },
                            // Reconnection after a loss is not supported: the job restarts.
                            _ => RefuseReason::Unexpected { rank: r },
                        },
                        Err(reason) => reason,
                    };
                    Some((Some(h.rank), HandshakeError::Refused(reason)))
                }
                Ok(Some(other)) => Some((
                    None,
                    HandshakeError::NotHello {
                        kind: other.kind().name(),
                    },
                )),
                Err(e) => Some((None, HandshakeError::Wire(e))),
            }
        } else if res == 0 {
            Some((
                None,
                HandshakeError::Closed {
                    after_bytes: p.bytes_seen,
                },
            ))
        } else {
            Some((
                None,
                HandshakeError::Io(io::Error::from_raw_os_error(-res).to_string()),
            ))
        };
        match outcome {
            None => self.pending_recv(slot),
            Some((claimed_rank, error)) => self.refuse_pending(slot, claimed_rank, error),
        }
    }

    fn refuse_pending(&mut self, slot: usize, claimed_rank: Option<NodeId>, error: HandshakeError) {
        let Some(p) = self.pending.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let reason = error.refuse_reason();
        self.shared.refusals.record(
            self.shared.rank,
            Refusal {
                addr: p.addr,
                claimed_rank,
                error,
            },
        );
        let bytes = reason.and_then(|r| Frame::Refuse(r).to_bytes().ok());
        match bytes {
            Some(bytes) => {
                p.out = bytes;
                p.state = PendingState::Refusing;
                p.ops += 1;
                let e = opcode::Send::new(
                    types::Fd(p.stream.as_raw_fd()),
                    p.out.as_ptr(),
                    p.out.len() as u32,
                )
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data(user_data(OP_PSEND, slot, p.gen));
                if self.push(e).is_err() {
                    if let Some(p) = self.pending.get_mut(slot).and_then(Option::as_mut) {
                        p.ops -= 1;
                        uring::shutdown(p.stream.as_raw_fd(), libc::SHUT_RDWR);
                        p.state = PendingState::Closing;
                    }
                }
            }
            None => {
                uring::shutdown(p.stream.as_raw_fd(), libc::SHUT_RDWR);
                p.state = PendingState::Closing;
            }
        }
    }

    /// Pause receiving while undelivered events exceed the limit; resume below half of it.
    fn flow_control(&mut self) -> io::Result<()> {
        if self.shared.rx_paused.load(Ordering::Acquire)
            && lock(&self.shared.inbox).bytes <= self.shared.max_inbound_bytes / 2
        {
            self.shared.rx_paused.store(false, Ordering::Release);
        }
        let want_pause = self.shared.rx_paused.load(Ordering::Acquire);
        if !want_pause && self.paused {
            self.paused = false;
            let now = Instant::now();
            for c in self.conns.iter_mut().flatten() {
                // Peers were not read while paused; their silence is ours.
                c.last_rx = now;
            }
        }
        if want_pause && !self.paused {
            self.paused = true;
            tracing::debug!(
                node = self.shared.rank,
                "pausing receives until events are polled"
            );
            for rank in 0..self.conns.len() {
                if self.conns[rank]
                    .as_ref()
                    .is_some_and(|c| c.recv_armed && !c.ended)
                {
                    let e = opcode::AsyncCancel::new(user_data(OP_RECV, rank, 0))
                        .build()
                        .user_data(user_data(OP_CANCEL, rank, 0));
                    self.push(e)?;
                }
            }
        }
        Ok(())
    }

    fn timers(&mut self, now: Instant) {
        let mut events = Vec::new();
        let running = self.shared.stop.load(Ordering::Acquire) == RUN;
        for rank in 0..self.conns.len() {
            let Some(c) = self.conns[rank].as_ref() else {
                continue;
            };
            if c.ended {
                continue;
            }
            let silent = now.saturating_duration_since(c.last_rx);
            if !self.paused && silent >= self.peer_timeout {
                let reason = LossReason::Timeout {
                    silent_ms: silent.as_millis() as u64,
                };
                self.end_conn(rank, Some(reason), &mut events);
                continue;
            }
            if running && now.saturating_duration_since(c.last_tx) >= self.heartbeat {
                if let Some(peer) = self.shared.peers.get(rank) {
                    let mut q = lock(&peer.out);
                    if q.pending.is_empty() && !c.send_inflight {
                        if let Ok(n) = Frame::Ping.encode(&mut q.pending) {
                            q.enqueued_total += n as u64;
                        }
                    }
                }
            }
        }
        self.shared.push_events(&mut events);
        for slot in 0..self.pending.len() {
            let expired = self.pending[slot]
                .as_ref()
                .is_some_and(|p| matches!(p.state, PendingState::Reading) && now >= p.deadline);
            if expired {
                let waited_ms = self.handshake_timeout.as_millis() as u64;
                self.refuse_pending(slot, None, HandshakeError::Timeout { waited_ms });
            }
        }
    }

    /// Free handshake slots whose operations are all done.
    fn reap(&mut self) {
        for p in self.pending.iter_mut() {
            if p.as_ref()
                .is_some_and(|p| matches!(p.state, PendingState::Closing) && p.ops == 0)
            {
                *p = None;
            }
        }
    }

    /// Shut every socket down and wait (bounded) for every operation to complete, so no buffer
    /// is freed while the kernel may still use it.
    fn teardown(&mut self) {
        for rank in 0..self.conns.len() {
            self.end_conn(rank, Some(LossReason::LocalAbort), &mut Vec::new());
        }
        for p in self.pending.iter().flatten() {
            uring::shutdown(p.stream.as_raw_fd(), libc::SHUT_RDWR);
        }
        uring::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR);
        for ud in [user_data(OP_ACCEPT, 0, 0), user_data(OP_WAKE, 0, 0)] {
            let e = opcode::AsyncCancel::new(ud)
                .build()
                .user_data(user_data(OP_CANCEL, 0, 0));
            let _ = self.push(e);
        }
        self.shared.eventfd.signal();
        let deadline = Instant::now() + Duration::from_millis(2000);
        while self.ops > 0 && Instant::now() < deadline {
            let ts = types::Timespec::new().nsec(10_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            let done: Vec<u32> = self.ring.completion().map(|c| c.flags()).collect();
            for flags in done {
                if !cqueue::more(flags) {
                    self.ops = self.ops.saturating_sub(1);
                }
            }
        }
        if self.ops > 0 {
            // Cannot happen with shut-down sockets; if it does, leak rather than free memory
            // the kernel may still write.
            tracing::error!(
                node = self.shared.rank,
                ops = self.ops,
                "operations still in flight at close; leaking their buffers"
            );
            let conns = std::mem::take(&mut self.conns);
            let pending = std::mem::take(&mut self.pending);
            std::mem::forget(conns);
            std::mem::forget(pending);
            std::mem::forget(self.bufring.take());
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new([0u8; 8])));
        }
        self.shared.inbox_cv.notify_all();
    }
}

// ---------------------------------------------------------------------------------------------
// The public face

impl TcpTransport {
    /// The listener's address (where late or bad peers knock).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// What the kernel's io_uring offered.
    pub fn features(&self) -> UringFeatures {
        self.shared.features
    }

    /// The most recent refused connections (at most 64), oldest first.
    pub fn refusals(&self) -> Vec<Refusal> {
        self.shared.refusals.recent()
    }

    /// Leave gracefully: queue a Goodbye to every live peer, wait (bounded) for everything
    /// queued to leave, and join the I/O thread. Peers see [`Event::PeerLeft`].
    pub fn close(mut self) {
        self.stop(false);
    }

    /// Leave abruptly, as a crash would: sockets are shut down without a Goodbye and queued
    /// frames are dropped. Peers see [`Event::PeerLost`].
    pub fn abort(mut self) {
        self.stop(true);
    }

    fn stop(&mut self, abort: bool) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        if abort {
            self.shared.stop.store(STOP_ABORT, Ordering::Release);
        } else {
            for (rank, peer) in self.shared.peers.iter().enumerate() {
                if rank as NodeId == self.shared.rank || peer.state.load(Ordering::Acquire) != LIVE
                {
                    continue;
                }
                let mut q = lock(&peer.out);
                if let Ok(n) = Frame::Goodbye.encode(&mut q.pending) {
                    q.enqueued_total += n as u64;
                }
            }
            self.shared.stop.store(STOP_GRACEFUL, Ordering::Release);
        }
        self.shared.eventfd.signal();
        if thread.join().is_err() {
            tracing::error!(node = self.shared.rank, "the I/O thread panicked");
        }
        // Wake pollers and senders so none waits for a thread that is gone.
        self.shared.inbox_cv.notify_all();
        for p in &self.shared.peers {
            p.out_cv.notify_all();
        }
    }

    fn check_running(&self) -> Result<(), TransportError> {
        if self.shared.stop.load(Ordering::Acquire) != RUN {
            return Err(TransportError::Closed);
        }
        Ok(())
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.stop(false);
    }
}

impl Transport for TcpTransport {
    fn local(&self) -> NodeId {
        self.shared.rank
    }

    fn world(&self) -> u32 {
        self.shared.world
    }

    fn name(&self) -> &'static str {
        "io_uring-tcp"
    }

    fn send(&self, to: NodeId, payload: &[u8]) -> Result<(), TransportError> {
        self.shared.enqueue(to, |out| {
            Ok((wire::encode_data(out, FrameKind::Message, 0, payload)?, 1))
        })
    }

    fn request(&self, to: NodeId, payload: &[u8]) -> Result<RequestId, TransportError> {
        let id = self.shared.next_id();
        self.shared.enqueue(to, |out| {
            Ok((wire::encode_data(out, FrameKind::Request, id, payload)?, 1))
        })?;
        Ok(RequestId(id))
    }

    fn respond(&self, to: NodeId, id: RequestId, payload: &[u8]) -> Result<(), TransportError> {
        self.shared.enqueue(to, |out| {
            Ok((
                wire::encode_data(out, FrameKind::Response, id.0, payload)?,
                1,
            ))
        })
    }

    fn read_page(
        &self,
        home: NodeId,
        page: u64,
        snapshot_ts: u64,
    ) -> Result<RequestId, TransportError> {
        let id = self.shared.next_id();
        self.shared.enqueue(home, |out| {
            Ok((wire::encode_read_page(out, id, page, snapshot_ts)?, 1))
        })?;
        Ok(RequestId(id))
    }

    fn respond_page(
        &self,
        to: NodeId,
        id: RequestId,
        version: PageVersionRef<'_>,
    ) -> Result<(), TransportError> {
        self.shared.enqueue(to, |out| {
            Ok((wire::encode_page_data(out, id.0, &version)?, 1))
        })
    }

    fn push_pages(&self, to: NodeId, pages: &[PageVersionRef<'_>]) -> Result<(), TransportError> {
        // One queue slot per frame so a large push does not monopolise the queue.
        for chunk in pages.chunks(wire::MAX_PAGES_PER_FRAME) {
            self.shared
                .enqueue(to, |out| Ok((wire::encode_push_pages(out, chunk)?, 1)))?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), TransportError> {
        self.check_running()?;
        self.shared.wake();
        let deadline = Instant::now() + self.shared.send_timeout;
        for (rank, peer) in self.shared.peers.iter().enumerate() {
            if rank as NodeId == self.shared.rank {
                continue;
            }
            let mut q = lock(&peer.out);
            let target = q.enqueued_total;
            while q.written_total < target && peer.state.load(Ordering::Acquire) == LIVE {
                let now = Instant::now();
                if now >= deadline || self.shared.stop.load(Ordering::Acquire) != RUN {
                    return Err(TransportError::FlushTimeout {
                        peer: rank as NodeId,
                        addr: peer.addr,
                        pending_bytes: target - q.written_total,
                        waited_ms: self.shared.send_timeout.as_millis() as u64,
                    });
                }
                q = peer
                    .out_cv
                    .wait_timeout(q, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        Ok(())
    }

    fn poll(&self, events: &mut Vec<Event>, timeout: Duration) -> Result<(), TransportError> {
        let deadline = Instant::now() + timeout;
        let mut inbox = lock(&self.shared.inbox);
        while inbox.events.is_empty() {
            if self.shared.stop.load(Ordering::Acquire) != RUN {
                return Err(TransportError::Closed);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            inbox = self
                .shared
                .inbox_cv
                .wait_timeout(inbox, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        events.extend(inbox.events.drain(..));
        inbox.bytes = 0;
        drop(inbox);
        if self.shared.rx_paused.load(Ordering::Acquire) {
            self.shared.wake();
        }
        Ok(())
    }

    fn counters(&self) -> Vec<PeerCounters> {
        self.shared
            .peers
            .iter()
            .enumerate()
            .filter(|(r, _)| *r as NodeId != self.shared.rank)
            .map(|(r, p)| {
                let q = lock(&p.out);
                PeerCounters {
                    peer: r as NodeId,
                    messages_sent: p.messages_sent.load(Ordering::Relaxed),
                    bytes_sent: p.bytes_sent.load(Ordering::Relaxed),
                    messages_received: p.messages_received.load(Ordering::Relaxed),
                    bytes_received: p.bytes_received.load(Ordering::Relaxed),
                    queue_depth_bytes: q.enqueued_total - q.written_total,
                    queue_max_bytes: q.max_depth,
                }
            })
            .collect()
    }
}
