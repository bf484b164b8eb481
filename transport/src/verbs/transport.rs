//! The cluster [`Transport`] over RDMA verbs ("rdma-verbs").
//!
//! Bootstrap: the TCP transport's listener and mesh ([`crate::tcp::Bound`]) connect one socket
//! per pair of ranks and check the job token with the same Hello handshake. Over each socket the
//! two sides exchange their endpoints' [`PeerInfo`] (as a Message frame), bring their RC queue
//! pairs to RTS, and confirm with a Ping, so neither SENDs before the other can receive. The
//! socket then stays open as the liveness channel: Pings on it are the heartbeats, its closing is
//! a lost peer.
//!
//! Data: frames are encoded exactly as over TCP and form one byte stream per peer, carried in
//! SENDs of at most one receive slot each, or, when more than a SEND's worth is waiting (a
//! prepare with its page deltas, a page answer, a copy of a page's history), in RDMA WRITEs
//! with immediate of up to a quarter of the peer's write ring. Each piece is `[credits
//! returned: u32 LE][ring bytes returned: u32 LE][stream bytes]`; the receiver feeds the bytes
//! to the same incremental decoder as TCP, so a frame of any size is fragmented and
//! reassembled, and per-peer FIFO follows from the RC queue pair's ordering (a WRITE with
//! immediate consumes a posted receive like a SEND, and receives complete in order). The
//! Goodbye travels in the stream too, after everything queued before it.
//!
//! The write ring: each side's data region holds a ring of `write_ring_bytes` that only its
//! peer writes into (its size travels with the table information at bootstrap). Both sides
//! walk it the same way: a piece goes at the current position, or at 0 when it would not fit
//! before the end (the rest of the lap is skipped). The receiver learns a piece's length from
//! its receive completion, copies it out and returns its bytes (and any skipped ones) in its
//! next piece's header; the sender writes only into bytes returned to it, from a staging ring
//! of the same size in its own region, so neither ring is overwritten while in use.
//!
//! Flow control: the receiver keeps `receive_slots` receives posted; a sender starts with that
//! many credits and spends one per piece (a SEND, or a WRITE with immediate, which consumes a
//! receive too). The receiver reposts a slot when it has decoded it and
//! returns the credit piggybacked on its next SEND, or in a credit-only SEND (no stream bytes)
//! once half the ring is owed and nothing else flows. A data SEND needs two credits and a
//! credit-only SEND one, so the last credit is kept for returning credits: the two sides can
//! never both wait for credits the other holds. A sender without credits leaves frames in its
//! bounded outbound queue; callers block (bounded) on a full queue and then get `QueueFull`.
//! While undelivered events exceed `max_inbound_bytes`, received slots are not decoded, so no
//! credits return and the peer's queue fills: back-pressure reaches the sending caller.
//!
//! Completions: SENDs are signalled every `signal_every`-th one (and the last before a Goodbye);
//! on an RC queue pair a completion means every earlier SEND completed, which frees their send
//! slots. One I/O thread owns every endpoint: it drains the completion queues, then arms them
//! (`ibv_req_notify_cq`) and sleeps in epoll on their completion channels, the bootstrap sockets
//! and a wake eventfd, until the next heartbeat is due. It never spins while idle. The thread
//! (rather than the caller of `poll`) does this so that heartbeats and credit returns flow while
//! the cluster code is busy elsewhere, as the TCP transport's I/O thread does.
//!
//! Page reads: each node may publish a table of page versions ([`published`]), registered
//! once, in the protection domain every peer's endpoint shares ([`Domain`]), for remote READ;
//! its address, rkey and slot count follow the queue pair information over the bootstrap
//! socket. [`VerbsTransport::read_published`] queues one RDMA READ of a slot; the I/O
//! thread posts it (signalled, into one of
//! `READ_TARGETS` parts of the peer endpoint's region, counted against the send queue like a
//! SEND) and hands the bytes back when the READ's completion (or a later one) passes it.
//!
//! Loss: a closed bootstrap socket without a Goodbye in the stream (after a short grace for the
//! stream's last SENDs to be reaped), a completion in error (the queue pair is then in the error
//! state), a protocol error in the stream, or silence past `peer_timeout_ms` yields exactly one
//! [`Event::PeerLost`]; a Goodbye yields [`Event::PeerLeft`]. The peer's verbs objects are
//! destroyed at once on either.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::published::{self, PublishedTable, SLOT_BYTES};
use super::{
    ChunkRegistration, Domain, Endpoint, EndpointConfig, Incoming, PeerInfo, ReadPiece,
    RemoteRegion, TableRegistration, VerbsError,
};
use crate::tcp::Bound;
use crate::uring::EventFd;
use crate::wire::{self, Decoder, Frame, FrameKind};
use crate::{
    Event, LossReason, NodeId, PageVersionRef, PeerCounters, RequestId, Transport, TransportError,
    PAGE_BYTES,
};
use dvm_numa::PageBox;

const RUN: u8 = 0;
const STOP_GRACEFUL: u8 = 1;
const STOP_ABORT: u8 = 2;

const LIVE: u8 = 0;
const GONE: u8 = 1;

/// Bytes of the header of every piece (SEND or WRITE): credits and write-ring bytes returned.
const CREDIT_BYTES: usize = 8;
/// How long a closed bootstrap socket waits for the Goodbye still in the verbs stream.
const EOF_GRACE: Duration = Duration::from_millis(500);
/// How long a graceful close waits for queued frames and the Goodbye to complete.
const CLOSE_DRAIN: Duration = Duration::from_millis(2000);
/// Rough per-event overhead counted against `max_inbound_bytes`.
const EVENT_OVERHEAD_BYTES: u64 = 64;
/// Largest bootstrap frame (a PeerInfo in a Message).
const MAX_BOOTSTRAP_PAYLOAD_BYTES: usize = 1024;
/// RDMA READs of published slots in flight per peer (each lands in its own part of the
/// endpoint's data region).
const READ_TARGETS: usize = 8;
/// Bytes of the bootstrap frame that says where a node's published table is.
const TABLE_INFO_BYTES: usize = 40;
/// Where the peer's WRITEs land in a data region: after the READ targets.
pub const WRITE_RING_OFFSET: usize = READ_TARGETS * SLOT_BYTES;

/// One slot's bytes as an RDMA READ returned them.
pub type SlotBytes = Box<[u8; SLOT_BYTES]>;

/// What one RDMA READ of a published slot brought (see [`VerbsTransport::read_published`]).
pub struct SlotRead {
    /// The slot as read; its page bytes too, unless `page` holds them.
    pub bytes: SlotBytes,
    /// The pool page lent to the READ, given back holding the slot's page bytes (judge with
    /// [`published::judge_in_place`]); `bytes`' page part is then meaningless.
    pub page: Option<PageBox>,
    /// Whether the page bytes landed in `page` directly (its chunk is registered), rather
    /// than in the data region and copied.
    pub landed: bool,
}

/// A READ of a peer's published slot, waiting for the I/O thread.
struct ReadJob {
    slot: usize,
    /// The page the slot's page bytes go to: lent to the device while the READ is in flight
    /// when its chunk is registered, so it must not be freed before the queue pair is gone.
    landing: Option<PageBox>,
    reply: SyncSender<SlotRead>,
}

/// Where a peer's published table is: its region and its number of slots.
#[derive(Clone, Copy, Debug)]
struct PeerTable {
    region: RemoteRegion,
    slots: usize,
}

fn encode_table_info(table: Option<(RemoteRegion, usize)>, ring_bytes: usize) -> Vec<u8> {
    let (region, slots) = table.unwrap_or((
        RemoteRegion {
            addr: 0,
            rkey: 0,
            len: 0,
        },
        0,
    ));
    let mut out = Vec::with_capacity(TABLE_INFO_BYTES);
    out.extend_from_slice(&region.addr.to_le_bytes());
    out.extend_from_slice(&u64::from(region.rkey).to_le_bytes());
    out.extend_from_slice(&region.len.to_le_bytes());
    out.extend_from_slice(&(slots as u64).to_le_bytes());
    out.extend_from_slice(&(ring_bytes as u64).to_le_bytes());
    out
}

/// `None` for a peer without a table; an error for a table that does not hold its slots.
/// The peer's published table, if any, and the bytes of its write ring (0: none).
fn decode_table_info(bytes: &[u8]) -> Result<(Option<PeerTable>, usize), String> {
    if bytes.len() != TABLE_INFO_BYTES {
        return Err(format!(
            "published-table information of {} bytes",
            bytes.len()
        ));
    }
    let w = |i: usize| {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
        u64::from_le_bytes(raw)
    };
    let (addr, rkey, len, slots, ring) = (w(0), w(1), w(2), w(3), w(4));
    if ring > MAX_WRITE_RING_BYTES as u64 {
        return Err(format!("a write ring of {ring} bytes"));
    }
    let ring = ring as usize;
    if slots == 0 {
        return Ok((None, ring));
    }
    let rkey = u32::try_from(rkey).map_err(|_| format!("table rkey {rkey}"))?;
    if slots
        .checked_mul(SLOT_BYTES as u64)
        .is_none_or(|need| need > len)
    {
        return Err(format!("a table of {slots} slots in {len} bytes"));
    }
    let table = PeerTable {
        region: RemoteRegion { addr, rkey, len },
        slots: usize::try_from(slots).map_err(|_| format!("{slots} slots"))?,
    };
    Ok((Some(table), ring))
}

/// Settings of the verbs transport beyond the bootstrap's [`crate::tcp::TcpConfig`].
#[derive(Clone, Debug)]
pub struct VerbsConfig {
    /// Device, port, GID and the sizes of each peer's endpoint. `message_bytes` is one SEND
    /// (credit header included), `receive_slots` the receives kept posted (the credits a peer
    /// starts with), `send_slots` the SENDs in flight at most.
    pub endpoint: EndpointConfig,
    /// Every this many SENDs one is signalled; divides `send_slots`.
    pub signal_every: u32,
    /// Slots of this node's published-page table (see [`published`]); 0: no table, peers ask
    /// this node's CPU for every page.
    pub published_slots: usize,
    /// Bytes of the ring each peer WRITEs stream pieces into (and of this side's staging ring
    /// per peer); 0: SENDs only.
    pub write_ring_bytes: usize,
    /// Register page pool chunks (once each) so that READs land in the readers' pool pages;
    /// false: READs land in the data region and are copied into them, as they are when the
    /// locked-memory limit refuses a chunk.
    pub land_in_pool: bool,
}

/// Largest write ring a peer may announce.
pub const MAX_WRITE_RING_BYTES: usize = 1 << 28;

impl Default for VerbsConfig {
    fn default() -> Self {
        VerbsConfig {
            endpoint: EndpointConfig {
                // A floor: `data_region_bytes` makes room for the READ targets and both rings.
                region_bytes: 4096,
                message_bytes: 16 * 1024,
                receive_slots: 32,
                send_slots: 32,
                max_inline: 128,
                completion_channel: true,
                ..EndpointConfig::default()
            },
            signal_every: 8,
            published_slots: published::DEFAULT_SLOTS,
            write_ring_bytes: 1 << 20,
            land_in_pool: true,
        }
    }
}

impl VerbsConfig {
    /// Bytes of each endpoint's data region: the READ targets, the ring the peer WRITEs into,
    /// this side's staging ring for its WRITEs.
    pub fn data_region_bytes(&self) -> usize {
        self.endpoint
            .region_bytes
            .max(WRITE_RING_OFFSET + 2 * self.write_ring_bytes)
    }

    fn validate(&self) -> Result<(), TransportError> {
        let e = &self.endpoint;
        let bad = |s: String| Err(TransportError::Config(s));
        if e.message_bytes <= CREDIT_BYTES || e.message_bytes > 1 << 24 {
            return bad(format!(
                "message_bytes {} outside 5..=16 MiB",
                e.message_bytes
            ));
        }
        if e.receive_slots < 4 {
            return bad(format!("receive_slots {} below 4", e.receive_slots));
        }
        if self.signal_every == 0 || e.send_slots == 0 || e.send_slots % self.signal_every != 0 {
            return bad(format!(
                "send_slots {} is not a multiple of signal_every {}",
                e.send_slots, self.signal_every
            ));
        }
        let ring = self.write_ring_bytes;
        if ring != 0 && (ring < 4 * e.message_bytes || ring > MAX_WRITE_RING_BYTES) {
            return bad(format!(
                "write_ring_bytes {ring}: 0, or 4 message slots ({}) up to {MAX_WRITE_RING_BYTES}",
                4 * e.message_bytes
            ));
        }
        if !e.completion_channel {
            return bad(
                "the transport sleeps on completion channels: completion_channel must be set"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Verbs work counted over the transport's life (all peers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerbsCounters {
    /// Work requests posted to send queues (SENDs, RDMA READs and WRITEs).
    pub work_requests_posted: u64,
    /// SENDs posted inline.
    pub inline_sends: u64,
    /// SENDs carrying only returned credits.
    pub credit_messages: u64,
    /// Signalled send completions reaped.
    pub signalled_completions: u64,
    /// RDMA READs posted.
    pub rdma_reads: u64,
    /// Those whose page bytes landed in a pool page directly (a scatter list into a
    /// registered chunk), with no copy.
    pub reads_landed: u64,
    /// Page pool chunks registered for READs to land in.
    pub chunks_registered: u64,
    /// Turns of the I/O work that did something, taken by callers of
    /// [`VerbsTransport::progress`] (idle workers, waiting readers) rather than the I/O thread.
    pub caller_turns: u64,
    /// RDMA WRITEs with immediate posted (stream pieces larger than a SEND).
    pub rdma_writes: u64,
    /// `ibv_post_send` calls that posted stream pieces: each a chain of every piece one turn
    /// of the I/O thread had for a peer.
    pub send_chains: u64,
    /// Stream bytes carried by those WRITEs (headers excluded).
    pub bytes_written: u64,
    /// Receive completions taken (each reposted).
    pub receives: u64,
}

#[derive(Default)]
struct OutQueue {
    /// Encoded frames not yet taken by the I/O thread.
    pending: Vec<u8>,
    enqueued_total: u64,
    /// Bytes posted in SENDs.
    posted_total: u64,
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
    table: Option<PeerTable>,
    reads: Mutex<ReadQueue>,
}

#[derive(Default)]
struct Inbox {
    events: VecDeque<Event>,
    bytes: u64,
}

#[derive(Default)]
struct AtomicCounters {
    posted: AtomicU64,
    inline: AtomicU64,
    credit: AtomicU64,
    signalled: AtomicU64,
    reads: AtomicU64,
    caller_turns: AtomicU64,
    landed: AtomicU64,
    chunks: AtomicU64,
    chains: AtomicU64,
    writes: AtomicU64,
    written: AtomicU64,
    receives: AtomicU64,
}

/// Per peer: READs of its published table waiting to be posted.
#[derive(Default)]
struct ReadQueue {
    jobs: VecDeque<ReadJob>,
    /// Set (under the lock) when the peer's link ends: no job is queued after that.
    closed: bool,
}

struct Shared {
    rank: NodeId,
    world: u32,
    peers: Vec<PeerShared>,
    inbox: Mutex<Inbox>,
    inbox_cv: Condvar,
    eventfd: EventFd,
    stop: AtomicU8,
    rx_paused: AtomicBool,
    next_request: AtomicU64,
    max_queue_bytes: u64,
    send_timeout: Duration,
    max_inbound_bytes: u64,
    verbs: AtomicCounters,
    table: Option<Arc<PublishedTable>>,
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

    /// Append frames to `to`'s queue, blocking (bounded) while it is full; as the TCP transport.
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
            let depth = q.enqueued_total - q.posted_total;
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
        let depth = q.enqueued_total - q.posted_total;
        q.max_depth = q.max_depth.max(depth);
        drop(q);
        if frames > 0 {
            peer.messages_sent.fetch_add(frames, Ordering::Relaxed);
            peer.bytes_sent.fetch_add(len as u64, Ordering::Relaxed);
        }
        self.eventfd.signal();
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
        // Starts at 1; 0 stays reserved for one-way frames.
        self.next_request.fetch_add(1, Ordering::Relaxed)
    }
}

/// The RDMA verbs transport. Dropping it closes it gracefully (see [`VerbsTransport::close`]).
pub struct VerbsTransport {
    shared: Arc<Shared>,
    /// The I/O thread's state: the thread takes it for each turn and lets go while it
    /// sleeps, so that a caller with nothing better to do can take a turn itself
    /// ([`VerbsTransport::progress`]).
    io: Arc<Mutex<IoThread>>,
    thread: Option<JoinHandle<()>>,
    device: String,
}

fn verbs_err(what: &'static str) -> impl FnOnce(VerbsError) -> TransportError {
    move |e| TransportError::Io {
        what,
        source: io::Error::other(e.to_string()),
    }
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> TransportError {
    move |source| TransportError::Io { what, source }
}

/// Reads from a blocking socket (with a read timeout set) until `decoder` yields a frame.
fn read_frame(stream: &mut TcpStream, decoder: &mut Decoder) -> io::Result<Frame> {
    let mut buf = [0u8; 512];
    loop {
        match decoder.next_frame() {
            Ok(Some(frame)) => return Ok(frame),
            Ok(None) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the bootstrap connection",
            ));
        }
        decoder.feed(buf.get(..n).unwrap_or(&[]));
    }
}

fn write_frame(stream: &mut TcpStream, frame: &Frame) -> io::Result<()> {
    let bytes = frame
        .to_bytes()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    stream.write_all(&bytes)
}

impl VerbsTransport {
    /// Builds the mesh over the bootstrap listener `bound` (see [`Bound::establish`] for `peers`
    /// and the handshake), then one connected queue pair per peer, and starts the I/O thread.
    pub fn establish(
        bound: Bound,
        peers: Vec<SocketAddr>,
        config: VerbsConfig,
    ) -> Result<VerbsTransport, TransportError> {
        config.validate()?;
        let tcp = bound.config().clone();
        let (connected, _refusals) = bound.mesh(&peers)?;
        // The listener closes here: no rank joins later, and late Hellos are refused by the
        // kernel instead.
        drop(bound);
        let timeout = Duration::from_millis(tcp.connect_timeout_ms.max(1000));
        let mut endpoint_config = config.endpoint.clone();
        endpoint_config.timeout = timeout;
        endpoint_config.region_bytes = config.data_region_bytes();
        let table = match config.published_slots {
            0 => None,
            slots => Some(Arc::new(PublishedTable::new(slots).ok_or_else(|| {
                TransportError::Config(format!("a published table of {slots} slots"))
            })?)),
        };

        // One device context and protection domain for every peer: the table is registered
        // once, not once per peer.
        let domain = Domain::open(&endpoint_config).map_err(verbs_err("opening the device"))?;
        let registration = match &table {
            Some(t) => Some(
                domain
                    .register_table(t)
                    .map_err(verbs_err("registering the published table"))?,
            ),
            None => None,
        };

        struct Boot {
            rank: usize,
            stream: TcpStream,
            decoder: Decoder,
            endpoint: Endpoint,
            peer_table: Option<PeerTable>,
            peer_ring: usize,
        }
        let mut boots = Vec::new();
        for (rank, c) in connected.into_iter().enumerate() {
            let Some((mut stream, mut decoder)) = c else {
                continue;
            };
            stream
                .set_nonblocking(false)
                .map_err(io_err("bootstrap socket to blocking"))?;
            stream
                .set_read_timeout(Some(timeout))
                .map_err(io_err("bootstrap socket read timeout"))?;
            stream
                .set_write_timeout(Some(timeout))
                .map_err(io_err("bootstrap socket write timeout"))?;
            decoder.set_max_payload(MAX_BOOTSTRAP_PAYLOAD_BYTES);
            let endpoint = Endpoint::create_in(&domain, endpoint_config.clone())
                .map_err(verbs_err("creating a queue pair"))?;
            let local_table = registration
                .as_ref()
                .zip(table.as_ref())
                .map(|(r, t)| (r.remote(), t.slots()));
            // Every side writes before it reads, in each phase: the small frames fit the socket
            // buffers, so the order of peers cannot deadlock.
            write_frame(
                &mut stream,
                &Frame::Message(endpoint.local_info().encode().to_vec()),
            )
            .map_err(io_err("sending queue pair information"))?;
            let info = encode_table_info(local_table, config.write_ring_bytes);
            write_frame(&mut stream, &Frame::Message(info))
                .map_err(io_err("sending published-table information"))?;
            boots.push(Boot {
                rank,
                stream,
                decoder,
                endpoint,
                peer_table: None,
                peer_ring: 0,
            });
        }
        for b in &mut boots {
            let info = match read_frame(&mut b.stream, &mut b.decoder)
                .map_err(io_err("receiving queue pair information"))?
            {
                Frame::Message(bytes) => {
                    let bytes: [u8; 56] = bytes.as_slice().try_into().map_err(|_| {
                        TransportError::Config(format!(
                            "rank {}: queue pair information of {} bytes",
                            b.rank,
                            bytes.len()
                        ))
                    })?;
                    PeerInfo::decode(&bytes).map_err(verbs_err("the peer's queue pair"))?
                }
                other => {
                    return Err(TransportError::Config(format!(
                        "rank {}: a {} frame instead of queue pair information",
                        b.rank,
                        other.kind()
                    )))
                }
            };
            (b.peer_table, b.peer_ring) = match read_frame(&mut b.stream, &mut b.decoder)
                .map_err(io_err("receiving published-table information"))?
            {
                Frame::Message(bytes) => decode_table_info(&bytes)
                    .map_err(|e| TransportError::Config(format!("rank {}: {e}", b.rank)))?,
                other => {
                    return Err(TransportError::Config(format!(
                        "rank {}: a {} frame instead of published-table information",
                        b.rank,
                        other.kind()
                    )))
                }
            };
            if b.peer_ring > 0 && (info.region.len as usize) < WRITE_RING_OFFSET + 2 * b.peer_ring {
                return Err(TransportError::Config(format!(
                    "rank {}: a write ring of {} bytes in a region of {}",
                    b.rank, b.peer_ring, info.region.len
                )));
            }
            b.endpoint
                .connect(&info)
                .map_err(verbs_err("connecting a queue pair"))?;
            write_frame(&mut b.stream, &Frame::Ping)
                .map_err(io_err("confirming the queue pair"))?;
        }
        for b in &mut boots {
            match read_frame(&mut b.stream, &mut b.decoder)
                .map_err(io_err("waiting for the peer's queue pair"))?
            {
                Frame::Ping => {}
                other => {
                    return Err(TransportError::Config(format!(
                        "rank {}: a {} frame instead of the queue pair confirmation",
                        b.rank,
                        other.kind()
                    )))
                }
            }
            b.stream
                .set_nonblocking(true)
                .map_err(io_err("bootstrap socket to non-blocking"))?;
        }
        let device = domain.device_name().to_string();

        let mut peer_tables: Vec<Option<PeerTable>> = peers.iter().map(|_| None).collect();
        for b in &boots {
            if let Some(slot) = peer_tables.get_mut(b.rank) {
                *slot = b.peer_table;
            }
        }
        let eventfd = EventFd::new().map_err(io_err("creating the wake eventfd"))?;
        let shared = Arc::new(Shared {
            rank: tcp.rank,
            world: tcp.world,
            peers: peers
                .iter()
                .zip(peer_tables)
                .map(|(&addr, table)| PeerShared {
                    addr,
                    out: Mutex::new(OutQueue::default()),
                    out_cv: Condvar::new(),
                    state: AtomicU8::new(LIVE),
                    messages_sent: AtomicU64::new(0),
                    bytes_sent: AtomicU64::new(0),
                    messages_received: AtomicU64::new(0),
                    bytes_received: AtomicU64::new(0),
                    table,
                    reads: Mutex::new(ReadQueue::default()),
                })
                .collect(),
            inbox: Mutex::new(Inbox::default()),
            inbox_cv: Condvar::new(),
            eventfd,
            stop: AtomicU8::new(RUN),
            rx_paused: AtomicBool::new(false),
            next_request: AtomicU64::new(1),
            max_queue_bytes: tcp.max_queue_bytes,
            send_timeout: Duration::from_millis(tcp.send_timeout_ms),
            max_inbound_bytes: tcp.max_inbound_bytes,
            verbs: AtomicCounters::default(),
            table,
        });
        let epoll = Epoll::new().map_err(io_err("creating the epoll set"))?;
        epoll
            .add(shared.eventfd.raw(), token(TOKEN_WAKE, 0))
            .map_err(io_err("watching the wake eventfd"))?;
        let now = Instant::now();
        let mut links: Vec<Option<Link>> = (0..tcp.world).map(|_| None).collect();
        for b in boots {
            let fd = b.endpoint.channel_fd().ok_or_else(|| {
                TransportError::Config("an endpoint without a completion channel".into())
            })?;
            epoll
                .add(fd, token(TOKEN_CHANNEL, b.rank))
                .map_err(io_err("watching a completion channel"))?;
            epoll
                .add(b.stream.as_raw_fd(), token(TOKEN_SOCKET, b.rank))
                .map_err(io_err("watching a bootstrap socket"))?;
            let mut tcp_decoder = b.decoder;
            tcp_decoder.set_max_payload(MAX_BOOTSTRAP_PAYLOAD_BYTES);
            let rank = b.rank;
            links[rank] = Some(Link {
                rank,
                endpoint: b.endpoint,
                stream: b.stream,
                tcp_decoder,
                tcp_offset_eof: None,
                stream_decoder: Decoder::new(),
                sending: Vec::new(),
                send_off: 0,
                credits: config.endpoint.receive_slots,
                to_return: 0,
                next_seq: 0,
                done_seq: 0,
                last_rx: now,
                last_tx: now,
                goodbye_queued: false,
                reads_in_flight: Vec::new(),
                ring: WriteRing::new(b.peer_ring, config.write_ring_bytes),
            });
        }
        let epoll = Arc::new(epoll);
        let io = IoThread {
            shared: Arc::clone(&shared),
            epoll: Arc::clone(&epoll),
            links,
            _registration: registration,
            chunks: LandingChunks {
                enabled: config.land_in_pool,
                ..LandingChunks::default()
            },
            receive_slots: config.endpoint.receive_slots,
            send_slots: config.endpoint.send_slots,
            signal_every: u64::from(config.signal_every),
            heartbeat: Duration::from_millis(tcp.heartbeat_ms.max(1)),
            peer_timeout: Duration::from_millis(tcp.peer_timeout_ms.max(1)),
            message_bytes: config.endpoint.message_bytes,
        };
        let io = Arc::new(Mutex::new(io));
        let thread = {
            let io = Arc::clone(&io);
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("dvm-verbs-io-{}", tcp.rank))
                .spawn(move || run_io(&io, &epoll, &shared))
                .map_err(io_err("spawning the I/O thread"))?
        };
        tracing::info!(node = tcp.rank, %device, "rdma-verbs transport connected");
        Ok(VerbsTransport {
            shared,
            io,
            thread: Some(thread),
            device,
        })
    }

    /// The RDMA device the queue pairs use.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Whether this node has a published-page table (peers READ it).
    pub fn publishes(&self) -> bool {
        self.shared.table.is_some()
    }

    /// This node's published-page table, for the home code that writes it (see
    /// [`PublishedTable::publish_with`]); `None` when it has none.
    pub fn table(&self) -> Option<Arc<PublishedTable>> {
        self.shared.table.clone()
    }

    /// Starts one RDMA READ of the slot of `page` in `home`'s published table; the slot's bytes
    /// arrive on the returned channel (judge them with [`published::judge`]). With a
    /// `landing` page, the slot's page bytes arrive in it, by the READ itself when its pool
    /// chunk is registered (it is, on first use, once per chunk), else copied (judge with
    /// [`published::judge_in_place`]). `Ok(None)`: the home publishes no table. The channel
    /// closes without an answer if the peer goes away.
    pub fn read_published(
        &self,
        home: NodeId,
        page: u64,
        landing: Option<PageBox>,
    ) -> Result<Option<Receiver<SlotRead>>, TransportError> {
        self.check_running()?;
        let peer = self.shared.peer(home)?;
        let Some(table) = peer.table else {
            return Ok(None);
        };
        let (reply, receiver) = sync_channel(1);
        {
            let mut q = lock(&peer.reads);
            if q.closed || peer.state.load(Ordering::Acquire) != LIVE {
                return Err(TransportError::PeerGone {
                    peer: home,
                    addr: peer.addr,
                });
            }
            q.jobs.push_back(ReadJob {
                slot: published::slot_of(page, table.slots),
                landing,
                reply,
            });
        }
        self.shared.eventfd.signal();
        Ok(Some(receiver))
    }

    /// Verbs work so far.
    pub fn verbs_counters(&self) -> VerbsCounters {
        let v = &self.shared.verbs;
        VerbsCounters {
            work_requests_posted: v.posted.load(Ordering::Relaxed),
            inline_sends: v.inline.load(Ordering::Relaxed),
            credit_messages: v.credit.load(Ordering::Relaxed),
            signalled_completions: v.signalled.load(Ordering::Relaxed),
            rdma_reads: v.reads.load(Ordering::Relaxed),
            reads_landed: v.landed.load(Ordering::Relaxed),
            chunks_registered: v.chunks.load(Ordering::Relaxed),
            caller_turns: v.caller_turns.load(Ordering::Relaxed),
            rdma_writes: v.writes.load(Ordering::Relaxed),
            send_chains: v.chains.load(Ordering::Relaxed),
            bytes_written: v.written.load(Ordering::Relaxed),
            receives: v.receives.load(Ordering::Relaxed),
        }
    }

    /// Takes one turn of the I/O thread's work on the caller's thread (completions, READs
    /// finished and posted, receives, sends) unless the I/O thread is in one: what a worker
    /// with nothing to run, or a reader waiting for its READ, does instead of waiting for the
    /// I/O thread to wake on a completion channel. Never blocks; `true` if it did anything.
    pub fn progress(&self) -> bool {
        if self.shared.stop.load(Ordering::Acquire) != RUN {
            return false;
        }
        let Ok(mut io) = self.io.try_lock() else {
            return false;
        };
        let mut events = Vec::new();
        let busy = io.turn(&mut events);
        // Delivered before the lock goes: the next turn's events (the I/O thread's, or
        // another caller's) come after these, so each peer's frames stay in stream order.
        self.shared.push_events(&mut events);
        drop(io);
        if busy {
            self.shared
                .verbs
                .caller_turns
                .fetch_add(1, Ordering::Relaxed);
        }
        busy
    }

    /// Leave gracefully: queue a Goodbye to every live peer, wait (bounded) until everything
    /// queued has completed, destroy every verbs object and join the I/O thread.
    pub fn close(mut self) {
        self.stop(false);
    }

    /// Leave abruptly, as a crash would: no Goodbye, queued frames dropped.
    pub fn abort(mut self) {
        self.stop(true);
    }

    fn stop(&mut self, abort: bool) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.stop.store(
            if abort { STOP_ABORT } else { STOP_GRACEFUL },
            Ordering::Release,
        );
        self.shared.eventfd.signal();
        if thread.join().is_err() {
            tracing::error!(node = self.shared.rank, "the verbs I/O thread panicked");
        }
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

impl Drop for VerbsTransport {
    fn drop(&mut self) {
        self.stop(false);
    }
}

impl Transport for VerbsTransport {
    fn local(&self) -> NodeId {
        self.shared.rank
    }

    fn world(&self) -> u32 {
        self.shared.world
    }

    fn name(&self) -> &'static str {
        "rdma-verbs"
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
        // The home's CPU answers, as over TCP. The one-sided fetch is `read_published`: it
        // needs the snapshot rule of the cluster layer to judge what it read, which this
        // trait's answer (a version, no validity) cannot carry.
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
        for chunk in pages.chunks(wire::MAX_PAGES_PER_FRAME) {
            self.shared
                .enqueue(to, |out| Ok((wire::encode_push_pages(out, chunk)?, 1)))?;
        }
        Ok(())
    }

    /// Waits until everything queued before the call has been posted to the send queues.
    fn flush(&self) -> Result<(), TransportError> {
        self.check_running()?;
        self.shared.eventfd.signal();
        let deadline = Instant::now() + self.shared.send_timeout;
        for (rank, peer) in self.shared.peers.iter().enumerate() {
            if rank as NodeId == self.shared.rank {
                continue;
            }
            let mut q = lock(&peer.out);
            let target = q.enqueued_total;
            while q.posted_total < target && peer.state.load(Ordering::Acquire) == LIVE {
                let now = Instant::now();
                if now >= deadline || self.shared.stop.load(Ordering::Acquire) != RUN {
                    return Err(TransportError::FlushTimeout {
                        peer: rank as NodeId,
                        addr: peer.addr,
                        pending_bytes: target - q.posted_total,
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
        if self.shared.rx_paused.swap(false, Ordering::AcqRel) {
            self.shared.eventfd.signal();
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
                    queue_depth_bytes: q.enqueued_total - q.posted_total,
                    queue_max_bytes: q.max_depth,
                }
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// epoll

const TOKEN_WAKE: u64 = 1;
const TOKEN_CHANNEL: u64 = 2;
const TOKEN_SOCKET: u64 = 3;

fn token(kind: u64, rank: usize) -> u64 {
    (kind << 32) | rank as u64
}

struct Epoll(std::os::fd::OwnedFd);

impl Epoll {
    fn new() -> io::Result<Epoll> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(Epoll(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }

    fn ctl(&self, op: libc::c_int, fd: libc::c_int, data: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: data,
        };
        // SAFETY: `ev` is a live struct the call reads; both descriptors are open.
        let rc = unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn add(&self, fd: libc::c_int, data: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, data)
    }

    fn remove(&self, fd: libc::c_int) {
        // Removal fails only for a descriptor not in the set; nothing to undo then.
        let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0);
    }

    fn wait(&self, out: &mut [libc::epoll_event], timeout: Duration) -> io::Result<usize> {
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `out` is a live, writable array of `out.len()` events.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                out.as_mut_ptr(),
                libc::c_int::try_from(out.len()).unwrap_or(1),
                ms,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(err);
        }
        Ok(n as usize)
    }
}

// ---------------------------------------------------------------------------------------------
// The I/O thread

/// One live peer: its queue pair and its bootstrap socket.
struct Link {
    rank: usize,
    endpoint: Endpoint,
    stream: TcpStream,
    tcp_decoder: Decoder,
    /// Set when the bootstrap socket closed: (when, stream offset).
    tcp_offset_eof: Option<(Instant, u64)>,
    /// Decodes the frames of the verbs stream.
    stream_decoder: Decoder,
    /// Bytes taken from the outbound queue and not yet all posted.
    sending: Vec<u8>,
    send_off: usize,
    /// SENDs the peer has receives posted for.
    credits: u32,
    /// Receives reposted whose credits the peer has not been told about.
    to_return: u32,
    /// Sequence number of the next SEND; those below `done_seq` have completed.
    next_seq: u64,
    done_seq: u64,
    last_rx: Instant,
    last_tx: Instant,
    goodbye_queued: bool,
    /// Posted READs of the peer's table: (sequence number, target in the data region,
    /// whether the page lands in the job's page, job). Declared after `endpoint`: dropping a
    /// link destroys its queue pair before it frees the pages lent to READs.
    reads_in_flight: Vec<(u64, usize, bool, ReadJob)>,
    ring: WriteRing,
}

/// Both directions of a link's write rings (see the module comment): where this side's next
/// WRITE goes in the peer's ring and how much of it is free, and where the peer's next WRITE
/// is in this side's ring and how much of it is owed back.
struct WriteRing {
    /// Bytes of the peer's ring (0: no WRITEs to this peer).
    out_len: usize,
    out_at: usize,
    out_free: usize,
    /// Bytes of this side's ring (what the peer may WRITE).
    in_len: usize,
    in_at: usize,
    to_return: usize,
}

/// Where a piece of `len` bytes goes in a ring of `ring` bytes whose next piece is at `at`:
/// its offset, and the bytes skipped at the end of the lap.
fn ring_place(ring: usize, at: usize, len: usize) -> (usize, usize) {
    if at + len <= ring {
        (at, 0)
    } else {
        (0, ring - at)
    }
}

impl WriteRing {
    /// The rings of a link whose peer announced a ring of `peer_len` bytes, this side's being
    /// `own_len`. Both sides must place pieces alike, and the staging ring is `own_len` bytes:
    /// WRITEs go only to a peer whose ring is the same size (a job's nodes share one setting).
    fn new(peer_len: usize, own_len: usize) -> WriteRing {
        let out_len = if peer_len == own_len { peer_len } else { 0 };
        if out_len != peer_len {
            tracing::warn!(
                peer_ring_bytes = peer_len,
                own_ring_bytes = own_len,
                "write rings differ in size: SENDs only to this peer"
            );
        }
        let in_len = own_len;
        WriteRing {
            out_len,
            out_at: 0,
            out_free: out_len,
            in_len,
            in_at: 0,
            to_return: 0,
        }
    }

    /// The largest piece (header included) one WRITE carries.
    fn max_piece(&self) -> usize {
        self.out_len / 4
    }

    /// Reserves `len` bytes of the peer's ring: their offset, or `None` until more returns.
    fn reserve(&mut self, len: usize) -> Option<usize> {
        let (at, skipped) = ring_place(self.out_len, self.out_at, len);
        if len > self.max_piece() || self.out_free < skipped + len {
            return None;
        }
        self.out_free -= skipped + len;
        self.out_at = at + len;
        Some(at)
    }

    /// Takes `returned` bytes back from the peer.
    fn give_back(&mut self, returned: usize) -> Result<(), String> {
        if self.out_free + returned > self.out_len {
            return Err(format!(
                "{returned} write-ring bytes returned with {} of {} free",
                self.out_free, self.out_len
            ));
        }
        self.out_free += returned;
        Ok(())
    }

    /// Where the peer's WRITE of `len` bytes is in this side's ring; owes its bytes back.
    fn arrived(&mut self, len: usize) -> Result<usize, String> {
        if len < CREDIT_BYTES || len > self.in_len / 4 {
            return Err(format!(
                "an RDMA WRITE of {len} bytes into a write ring of {}",
                self.in_len
            ));
        }
        let (at, skipped) = ring_place(self.in_len, self.in_at, len);
        self.in_at = at + len;
        self.to_return += skipped + len;
        Ok(at)
    }
}

struct IoThread {
    shared: Arc<Shared>,
    epoll: Arc<Epoll>,
    links: Vec<Option<Link>>,
    /// The published table's registration, shared by every link's queue pair: dropped after
    /// the links (peers READ it until their queue pairs are gone).
    _registration: Option<TableRegistration>,
    /// The page pool chunks READs land in, registered once each: dropped after the links
    /// (whose queue pairs may have READs into them in flight).
    chunks: LandingChunks,
    receive_slots: u32,
    send_slots: u32,
    signal_every: u64,
    heartbeat: Duration,
    peer_timeout: Duration,
    message_bytes: usize,
}

/// What ends a link.
enum End {
    Left,
    Lost(LossReason),
}

/// The I/O thread: a turn of work under the state's lock (its events delivered before the
/// lock goes, as `progress` does, so that per-peer order holds whoever takes the turns),
/// then, unless busy, a sleep in
/// epoll (the lock let go, so callers of `progress` may take turns meanwhile) until a
/// completion channel, a socket or the wake eventfd fires or the next timer is due.
fn run_io(io: &Mutex<IoThread>, epoll: &Epoll, shared: &Shared) {
    let mut events = Vec::new();
    let mut ready = [libc::epoll_event { events: 0, u64: 0 }; 16];
    loop {
        let timeout = {
            let mut io = lock(io);
            match shared.stop.load(Ordering::Acquire) {
                RUN => {}
                STOP_GRACEFUL => {
                    io.close_gracefully();
                    break;
                }
                _ => break,
            }
            let busy = io.turn(&mut events);
            shared.push_events(&mut events);
            if busy {
                Duration::ZERO
            } else {
                io.next_timer()
            }
        };
        let n = match epoll.wait(&mut ready, timeout) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(node = shared.rank, "epoll_wait: {e}");
                std::thread::sleep(Duration::from_millis(10));
                0
            }
        };
        let mut io = lock(io);
        io.take_channel_events(&ready[..n], &mut events);
        shared.push_events(&mut events);
    }
    lock(io).finish();
}

fn rdma_loss(e: &VerbsError) -> LossReason {
    LossReason::Rdma(e.to_string())
}

impl IoThread {
    /// Destroys every link's verbs objects (Endpoint's drop order) and logs the counters.
    fn finish(&mut self) {
        for rank in 0..self.links.len() {
            if let Some(link) = self.links.get_mut(rank).and_then(Option::take) {
                self.forget(link);
            }
        }
        let v = &self.shared.verbs;
        tracing::info!(
            node = self.shared.rank,
            "rdma-verbs transport closed: work requests posted {}, inline sends {}, credit messages {}, signalled completions {}, receives {}, RDMA READs {} ({} into pool pages, {} pool chunks registered), RDMA WRITEs {} ({} bytes), posts of chained pieces {}, turns taken by callers {}",
            v.posted.load(Ordering::Relaxed),
            v.inline.load(Ordering::Relaxed),
            v.credit.load(Ordering::Relaxed),
            v.signalled.load(Ordering::Relaxed),
            v.receives.load(Ordering::Relaxed),
            v.reads.load(Ordering::Relaxed),
            v.landed.load(Ordering::Relaxed),
            v.chunks.load(Ordering::Relaxed),
            v.writes.load(Ordering::Relaxed),
            v.written.load(Ordering::Relaxed),
            v.chains.load(Ordering::Relaxed),
            v.caller_turns.load(Ordering::Relaxed),
        );
    }

    /// After an epoll wait: acknowledges the completion channels that fired.
    fn take_channel_events(&mut self, ready: &[libc::epoll_event], events: &mut Vec<Event>) {
        for ev in ready {
            let data = ev.u64;
            let rank = (data & 0xffff_ffff) as usize;
            match data >> 32 {
                TOKEN_WAKE => drain_eventfd(self.shared.eventfd.raw()),
                TOKEN_CHANNEL => {
                    if let Some(link) = self.links.get_mut(rank).and_then(Option::as_mut) {
                        if let Err(e) = link.endpoint.take_channel_events() {
                            let reason = rdma_loss(&e);
                            self.end_link(rank, End::Lost(reason), events);
                        }
                    }
                }
                // Sockets are read in every turn.
                _ => {}
            }
        }
    }

    /// Time until the next heartbeat or timeout check.
    fn next_timer(&self) -> Duration {
        let now = Instant::now();
        let mut next = self.heartbeat;
        for link in self.links.iter().flatten() {
            next = next.min((link.last_tx + self.heartbeat).saturating_duration_since(now));
            next = next.min((link.last_rx + self.peer_timeout).saturating_duration_since(now));
            if let Some((at, _)) = link.tcp_offset_eof {
                next = next.min((at + EOF_GRACE).saturating_duration_since(now));
            }
        }
        next.max(Duration::from_millis(1))
    }

    /// One pass over every link: completions, receives, sends, the socket, timers. Returns
    /// whether anything happened that may allow more work at once.
    fn turn(&mut self, events: &mut Vec<Event>) -> bool {
        let mut busy = false;
        for rank in 0..self.links.len() {
            if self.links.get(rank).is_none_or(Option::is_none) {
                continue;
            }
            match self.service(rank, events) {
                Ok(progress) => busy |= progress,
                Err(end) => self.end_link(rank, end, events),
            }
        }
        busy
    }

    fn service(&mut self, rank: usize, events: &mut Vec<Event>) -> Result<bool, End> {
        let paused = self.shared.rx_paused.load(Ordering::Acquire);
        let shared = Arc::clone(&self.shared);
        let (receive_slots, send_slots, signal_every, message_bytes) = (
            self.receive_slots,
            self.send_slots,
            self.signal_every,
            self.message_bytes,
        );
        let heartbeat = self.heartbeat;
        let peer_timeout = self.peer_timeout;
        let Some(link) = self.links.get_mut(rank).and_then(Option::as_mut) else {
            return Ok(false);
        };
        let peer = &shared.peers[rank];
        let mut progress = false;
        let now = Instant::now();

        // Completions: arm first, then poll, so a completion arriving in between still wakes
        // the thread (through the channel) or is seen by this poll.
        link.endpoint.arm().map_err(|e| End::Lost(rdma_loss(&e)))?;
        let mut done = Vec::new();
        link.endpoint
            .poll(&mut done)
            .map_err(|e| End::Lost(rdma_loss(&e)))?;
        for c in &done {
            let seq = c.wr_id & ((1 << 56) - 1);
            link.done_seq = link.done_seq.max(seq + 1);
            shared.verbs.signalled.fetch_add(1, Ordering::Relaxed);
            progress = true;
        }
        // READs complete in order with the sends on an RC queue pair: those below `done_seq`
        // have placed their bytes.
        if !link.reads_in_flight.is_empty() {
            let done_seq = link.done_seq;
            let mut i = 0;
            while i < link.reads_in_flight.len() {
                if link.reads_in_flight[i].0 >= done_seq {
                    i += 1;
                    continue;
                }
                let (_, target, landed, job) = link.reads_in_flight.swap_remove(i);
                let read = finish_read(&link.endpoint, target, landed, job.landing)
                    .map_err(|e| End::Lost(rdma_loss(&e)))?;
                // A reader that gave up has dropped its receiver; nothing to do then.
                let _ = job.reply.try_send(read);
            }
        }
        // New READs, while a target and a send-queue entry are free.
        if let Some(table) = peer.table {
            while link.reads_in_flight.len() < READ_TARGETS
                && link.next_seq - link.done_seq < u64::from(send_slots)
                && !link.goodbye_queued
            {
                let Some(mut job) = lock(&peer.reads).jobs.pop_front() else {
                    break;
                };
                let target = (0..READ_TARGETS)
                    .find(|t| link.reads_in_flight.iter().all(|(_, used, _, _)| used != t))
                    .unwrap_or(0);
                let registration = match job.landing.as_ref() {
                    Some(page) if link.endpoint.max_scatter() >= 3 => {
                        self.chunks.registration(&link.endpoint, page, &shared)
                    }
                    _ => None,
                };
                let landed = registration.is_some();
                post_slot_read(
                    &mut link.endpoint,
                    table,
                    job.slot,
                    target,
                    registration.zip(job.landing.as_mut()),
                    link.next_seq,
                )
                .map_err(|e| End::Lost(rdma_loss(&e)))?;
                if landed {
                    shared.verbs.landed.fetch_add(1, Ordering::Relaxed);
                }
                link.reads_in_flight
                    .push((link.next_seq, target, landed, job));
                link.next_seq += 1;
                shared.verbs.posted.fetch_add(1, Ordering::Relaxed);
                shared.verbs.reads.fetch_add(1, Ordering::Relaxed);
                progress = true;
            }
        }

        // Receives.
        if !paused {
            while let Some(incoming) = link
                .endpoint
                .try_recv()
                .map_err(|e| End::Lost(rdma_loss(&e)))?
            {
                progress = true;
                shared.verbs.receives.fetch_add(1, Ordering::Relaxed);
                link.last_rx = now;
                link.to_return += 1;
                let message = match incoming {
                    Incoming::Message(message) => message,
                    Incoming::Written { bytes } => {
                        let at = link
                            .ring
                            .arrived(bytes as usize)
                            .map_err(|why| End::Lost(LossReason::Rdma(why)))?;
                        let mut piece = vec![0u8; bytes as usize];
                        link.endpoint
                            .copy_out(WRITE_RING_OFFSET + at, &mut piece)
                            .map_err(|e| End::Lost(rdma_loss(&e)))?;
                        piece
                    }
                };
                let Some((head, bytes)) = message.split_first_chunk::<CREDIT_BYTES>() else {
                    return Err(End::Lost(LossReason::Rdma(format!(
                        "a SEND of {} bytes, shorter than its credit header",
                        message.len()
                    ))));
                };
                let returned = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
                let ring_returned = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
                if returned > receive_slots {
                    return Err(End::Lost(LossReason::Rdma(format!(
                        "{returned} credits returned at once (ring of {receive_slots})"
                    ))));
                }
                link.ring
                    .give_back(ring_returned as usize)
                    .map_err(|why| End::Lost(LossReason::Rdma(why)))?;
                link.credits = (link.credits + returned).min(receive_slots);
                if !bytes.is_empty() {
                    link.stream_decoder.feed(bytes);
                    if let Some(end) = decode_stream(link, peer, rank as NodeId, events) {
                        return Err(end);
                    }
                }
            }
        }

        // Sends: every piece of this turn (and a credit-only SEND) goes to the queue pair in
        // one chain of work requests, one doorbell.
        link.endpoint.begin_chain();
        let mut posted_bytes = 0u64;
        loop {
            if link.send_off >= link.sending.len() {
                link.sending.clear();
                link.send_off = 0;
                let mut q = lock(&peer.out);
                if q.pending.is_empty() {
                    break;
                }
                std::mem::swap(&mut link.sending, &mut q.pending);
            }
            let in_flight = link.next_seq - link.done_seq;
            if link.credits < 2 || in_flight >= u64::from(send_slots) {
                break;
            }
            let waiting = link.sending.len() - link.send_off;
            // More than a SEND's worth: one WRITE, when the peer's ring has room.
            let piece = waiting.min(link.ring.max_piece().saturating_sub(CREDIT_BYTES));
            let ring_at = if waiting > message_bytes - CREDIT_BYTES {
                link.ring.reserve(CREDIT_BYTES + piece)
            } else {
                None
            };
            let chunk = match ring_at {
                Some(_) => piece,
                None => waiting.min(message_bytes - CREDIT_BYTES),
            };
            let mut message = Vec::with_capacity(CREDIT_BYTES + chunk);
            message.extend_from_slice(&link.to_return.to_le_bytes());
            message.extend_from_slice(&(link.ring.to_return as u32).to_le_bytes());
            message.extend_from_slice(&link.sending[link.send_off..link.send_off + chunk]);
            let last = link.send_off + chunk == link.sending.len() && link.goodbye_queued;
            let signalled = (link.next_seq + 1) % signal_every == 0 || last;
            match ring_at {
                Some(at) => post_write(link, &shared, at, &message, signalled)?,
                None => post(link, &shared, &message, signalled, send_slots)?,
            }
            link.to_return = 0;
            link.ring.to_return = 0;
            link.credits -= 1;
            link.send_off += chunk;
            posted_bytes += chunk as u64;
            progress = true;
        }
        if posted_bytes > 0 {
            let mut q = lock(&peer.out);
            q.posted_total += posted_bytes;
            drop(q);
            peer.out_cv.notify_all();
        }
        // Credits owed and nothing to carry them: a credit-only SEND once half the ring is owed.
        // Not while closing: the last SEND before a Goodbye must be the signalled one.
        if (link.to_return >= receive_slots / 2
            || (link.ring.in_len > 0 && link.ring.to_return >= link.ring.in_len / 2))
            && !link.goodbye_queued
            && link.credits >= 1
            && link.next_seq - link.done_seq < u64::from(send_slots)
        {
            let mut message = [0u8; CREDIT_BYTES];
            message[..4].copy_from_slice(&link.to_return.to_le_bytes());
            message[4..].copy_from_slice(&(link.ring.to_return as u32).to_le_bytes());
            let signalled = (link.next_seq + 1) % signal_every == 0;
            post(link, &shared, &message, signalled, send_slots)?;
            shared.verbs.credit.fetch_add(1, Ordering::Relaxed);
            link.to_return = 0;
            link.ring.to_return = 0;
            link.credits -= 1;
            progress = true;
        }
        if link
            .endpoint
            .flush_chain()
            .map_err(|e| End::Lost(rdma_loss(&e)))?
            > 0
        {
            shared.verbs.chains.fetch_add(1, Ordering::Relaxed);
        }

        // The liveness channel.
        let mut buf = [0u8; 512];
        loop {
            match link.stream.read(&mut buf) {
                Ok(0) => {
                    if link.tcp_offset_eof.is_none() {
                        link.tcp_offset_eof = Some((now, link.tcp_decoder.offset()));
                        // A closed socket stays readable: unwatched, it cannot spin the thread
                        // through the grace (the timer ends it).
                        self.epoll.remove(link.stream.as_raw_fd());
                    }
                    break;
                }
                Ok(n) => {
                    link.last_rx = now;
                    link.tcp_decoder.feed(buf.get(..n).unwrap_or(&[]));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(End::Lost(LossReason::Io {
                        op: "reading the bootstrap socket",
                        errno: e.raw_os_error().unwrap_or(libc::EIO),
                    }))
                }
            }
        }
        loop {
            let offset = link.tcp_decoder.offset();
            match link.tcp_decoder.next_frame() {
                Ok(None) => break,
                Ok(Some(Frame::Ping)) => {}
                Ok(Some(other)) => {
                    return Err(End::Lost(LossReason::UnexpectedFrame {
                        kind: other.kind().name(),
                        offset,
                    }))
                }
                Err(e) => return Err(End::Lost(LossReason::Protocol(e))),
            }
        }
        if let Some((at, offset)) = link.tcp_offset_eof {
            // The Goodbye, if the peer sent one, is in the verbs stream; its SEND completed
            // before the peer closed the socket, so it is reaped within the grace.
            if now.duration_since(at) >= EOF_GRACE {
                return Err(End::Lost(LossReason::Closed { offset }));
            }
        }
        if now.duration_since(link.last_rx) >= peer_timeout {
            return Err(End::Lost(LossReason::Timeout {
                silent_ms: now.duration_since(link.last_rx).as_millis() as u64,
            }));
        }
        if now.duration_since(link.last_tx) >= heartbeat {
            // A full socket buffer means the peer is not reading; its own timeout judges it.
            if let Ok(bytes) = Frame::Ping.to_bytes() {
                let _ = link.stream.write(&bytes);
            }
            link.last_tx = now;
        }
        Ok(progress)
    }

    fn end_link(&mut self, rank: usize, end: End, events: &mut Vec<Event>) {
        let Some(link) = self.links.get_mut(rank).and_then(Option::take) else {
            return;
        };
        let peer = rank as NodeId;
        match end {
            End::Left => events.push(Event::PeerLeft { peer }),
            End::Lost(reason) => {
                tracing::warn!(node = self.shared.rank, peer, "peer lost: {reason}");
                events.push(Event::PeerLost { peer, reason });
            }
        }
        self.forget(link);
    }

    /// Stops watching a link, marks its peer gone (waking blocked senders) and destroys its
    /// verbs objects.
    fn forget(&mut self, link: Link) {
        if let Some(fd) = link.endpoint.channel_fd() {
            self.epoll.remove(fd);
        }
        self.epoll.remove(link.stream.as_raw_fd());
        if let Some(p) = self.shared.peers.get(link.rank) {
            // Queued READs are dropped: their readers see the channel close.
            let mut reads = lock(&p.reads);
            reads.closed = true;
            reads.jobs.clear();
            drop(reads);
            p.state.store(GONE, Ordering::Release);
            // Taking the lock orders the store before any sender's wait: none misses the wake.
            drop(lock(&p.out));
            p.out_cv.notify_all();
        }
        let _ = link.stream.shutdown(std::net::Shutdown::Both);
        drop(link);
    }

    /// Queues a Goodbye behind every live peer's frames, drives the links until all of it has
    /// completed (bounded by [`CLOSE_DRAIN`]), then closes the bootstrap sockets.
    fn close_gracefully(&mut self) {
        for (rank, link) in self.links.iter_mut().enumerate() {
            let Some(link) = link.as_mut() else { continue };
            let mut q = lock(&self.shared.peers[rank].out);
            if let Ok(n) = Frame::Goodbye.encode(&mut q.pending) {
                q.enqueued_total += n as u64;
            }
            link.goodbye_queued = true;
        }
        let deadline = Instant::now() + CLOSE_DRAIN;
        let mut events = Vec::new();
        while Instant::now() < deadline {
            self.turn(&mut events);
            let all_done = self.links.iter().enumerate().all(|(rank, l)| {
                l.as_ref().is_none_or(|l| {
                    l.send_off >= l.sending.len()
                        && l.next_seq == l.done_seq
                        && lock(&self.shared.peers[rank].out).pending.is_empty()
                })
            });
            if all_done {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        // Events of a closing transport have no reader: drop them.
    }
}

/// Posts one SEND from the next send slot.
fn post(
    link: &mut Link,
    shared: &Shared,
    message: &[u8],
    signalled: bool,
    send_slots: u32,
) -> Result<(), End> {
    let slot = (link.next_seq % u64::from(send_slots)) as u32;
    link.endpoint
        .post_message(slot, message, signalled, link.next_seq)
        .map_err(|e| End::Lost(rdma_loss(&e)))?;
    link.next_seq += 1;
    shared.verbs.posted.fetch_add(1, Ordering::Relaxed);
    if message.len() <= link.endpoint.max_inline() as usize {
        shared.verbs.inline.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Posts one stream piece (`message`: header and bytes) as an RDMA WRITE with immediate into
/// the peer's ring at `at` (reserved), from the same offset of this side's staging ring.
fn post_write(
    link: &mut Link,
    shared: &Shared,
    at: usize,
    message: &[u8],
    signalled: bool,
) -> Result<(), End> {
    // The staging ring follows this side's own ring, of the same size (`WriteRing::new`).
    let staging = WRITE_RING_OFFSET + link.ring.in_len + at;
    link.endpoint
        .copy_in(staging, message)
        .map_err(|e| End::Lost(rdma_loss(&e)))?;
    link.endpoint
        .post_write_imm(
            staging,
            (WRITE_RING_OFFSET + at) as u64,
            message.len(),
            signalled,
            link.next_seq,
        )
        .map_err(|e| End::Lost(rdma_loss(&e)))?;
    link.next_seq += 1;
    shared.verbs.posted.fetch_add(1, Ordering::Relaxed);
    shared.verbs.writes.fetch_add(1, Ordering::Relaxed);
    shared
        .verbs
        .written
        .fetch_add((message.len() - CREDIT_BYTES) as u64, Ordering::Relaxed);
    Ok(())
}

/// Turns the frames the stream decoder holds into events; returns how the link ends, if it does.
fn decode_stream(
    link: &mut Link,
    peer: &PeerShared,
    from: NodeId,
    events: &mut Vec<Event>,
) -> Option<End> {
    loop {
        let offset = link.stream_decoder.offset();
        let frame = match link.stream_decoder.next_frame() {
            Ok(Some(f)) => f,
            Ok(None) => return None,
            Err(e) => return Some(End::Lost(LossReason::Protocol(e))),
        };
        let kind = frame.kind();
        if kind.is_data() {
            peer.messages_received.fetch_add(1, Ordering::Relaxed);
            peer.bytes_received
                .fetch_add(link.stream_decoder.offset() - offset, Ordering::Relaxed);
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
            Frame::Goodbye => return Some(End::Left),
            Frame::Hello(_) | Frame::HelloAck { .. } | Frame::Refuse(_) => {
                return Some(End::Lost(LossReason::UnexpectedFrame {
                    kind: kind.name(),
                    offset,
                }))
            }
        }
    }
}

/// Posts the READ of `slot` of the peer's `table`: whole into READ target `target` of the data
/// region, or, with a registered landing page, its head and tail there and its page bytes
/// into the page (one work request, a scatter list of three).
fn post_slot_read(
    endpoint: &mut Endpoint,
    table: PeerTable,
    slot: usize,
    target: usize,
    landing: Option<(&ChunkRegistration, &mut PageBox)>,
    tag: u64,
) -> Result<u64, VerbsError> {
    let base = target * SLOT_BYTES;
    let remote = published::slot_offset(slot);
    let Some((registration, page)) = landing else {
        return endpoint.post_read(table.region, base, remote, SLOT_BYTES, tag);
    };
    let (data, tail) = published::PAGE_PART;
    // SAFETY: the page is the job's, which its link keeps in `reads_in_flight` untouched
    // until the READ's completion has been reaped, or drops only after the link's queue pair
    // is destroyed (`Link` declares `endpoint` first); the chunk registration lives in the
    // I/O state's `chunks`, dropped after every link.
    unsafe {
        endpoint.post_read_scattered(
            table.region,
            remote,
            &[
                ReadPiece::Region {
                    offset: base,
                    len: data,
                },
                ReadPiece::Chunk {
                    registration,
                    addr: page.as_mut_ptr() as usize,
                    len: PAGE_BYTES,
                },
                ReadPiece::Region {
                    offset: base + tail,
                    len: SLOT_BYTES - tail,
                },
            ],
            tag,
        )
    }
}

/// A completed READ from target `target`, as its reader takes it: the slot's bytes, and its
/// page bytes in the landing page (copied there unless they `landed` there).
fn finish_read(
    endpoint: &Endpoint,
    target: usize,
    landed: bool,
    landing: Option<PageBox>,
) -> Result<SlotRead, VerbsError> {
    let mut bytes = Box::new([0u8; SLOT_BYTES]);
    endpoint.copy_out(target * SLOT_BYTES, &mut bytes[..])?;
    let mut page = landing;
    if let (Some(page), false) = (page.as_mut(), landed) {
        let (data, tail) = published::PAGE_PART;
        page.copy_from_slice(&bytes[data..tail]);
    }
    Ok(SlotRead {
        bytes,
        page,
        landed,
    })
}

/// The page pool chunks registered for READs to land in (see [`ChunkRegistration`]), by
/// chunk start; `None`: registering failed (usually the locked-memory limit), and READs into
/// that chunk's pages land in the data region and are copied.
#[derive(Default)]
struct LandingChunks {
    by_start: std::collections::HashMap<usize, Option<ChunkRegistration>>,
    /// Set once a registration failed: said once in the log.
    refused: bool,
    /// [`VerbsConfig::land_in_pool`].
    enabled: bool,
}

impl LandingChunks {
    /// The registration of `page`'s chunk, registering it now if it is new.
    fn registration(
        &mut self,
        endpoint: &Endpoint,
        page: &PageBox,
        shared: &Shared,
    ) -> Option<&ChunkRegistration> {
        if !self.enabled {
            return None;
        }
        let start = page.chunk_start();
        let entry = self.by_start.entry(start).or_insert_with(|| {
            match endpoint.domain().register_chunk(page.chunk()) {
                Ok(registration) => {
                    shared.verbs.chunks.fetch_add(1, Ordering::Relaxed);
                    Some(registration)
                }
                Err(e) => {
                    if !self.refused {
                        tracing::warn!(
                            node = shared.rank,
                            "registering a page pool chunk for RDMA READs failed ({e}); \
                             READs into its pages are copied from the transport's region \
                             (raise the locked-memory limit, ulimit -l, to avoid the copy)"
                        );
                    }
                    self.refused = true;
                    None
                }
            }
        });
        entry.as_ref()
    }
}

fn drain_eventfd(fd: libc::c_int) {
    let mut value = 0u64;
    // SAFETY: reads 8 bytes into a live u64 from the eventfd this transport owns; the eventfd is
    // blocking but readable (epoll said so), and a failed read leaves nothing to undo.
    let _ = unsafe {
        libc::read(
            fd,
            std::ptr::addr_of_mut!(value).cast(),
            std::mem::size_of::<u64>(),
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ends_of_a_write_ring_place_pieces_alike_and_never_over_unreturned_bytes() {
        // Sender and receiver of one 256-byte ring (pieces up to 64 bytes), with the receiver
        // returning what it owes only every few pieces.
        let mut sender = WriteRing::new(256, 256);
        let mut receiver = WriteRing::new(256, 256);
        let mut in_use: VecDeque<(usize, usize)> = VecDeque::new();
        let mut x = 0x9e37_79b9_u64;
        for step in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = CREDIT_BYTES + (x % 57) as usize;
            match sender.reserve(len) {
                Some(at) => {
                    // Never over a piece the receiver has not returned.
                    for &(from, n) in &in_use {
                        assert!(at + len <= from || from + n <= at, "step {step}");
                    }
                    assert_eq!(receiver.arrived(len), Ok(at), "step {step}");
                    in_use.push_back((at, len));
                }
                None => {
                    // Full: the receiver returns everything it took.
                    assert!(
                        !in_use.is_empty(),
                        "a ring with nothing in use refused {len}"
                    );
                    sender.give_back(receiver.to_return).expect("returned");
                    receiver.to_return = 0;
                    in_use.clear();
                }
            }
        }
        assert!(sender.give_back(sender.out_len).is_err());
        assert!(receiver.arrived(CREDIT_BYTES - 1).is_err());
        assert!(receiver.arrived(65).is_err());
        // Rings of different sizes: no WRITEs to that peer, and none accepted from it.
        let mismatched = WriteRing::new(512, 256);
        assert_eq!((mismatched.max_piece(), mismatched.in_len), (0, 256));
        let mut none = WriteRing::new(0, 0);
        assert_eq!(none.reserve(CREDIT_BYTES), None);
        assert!(none.arrived(CREDIT_BYTES).is_err());
    }

    #[test]
    fn table_information_round_trips_and_a_table_too_small_for_its_slots_is_refused() {
        let region = RemoteRegion {
            addr: 0x7f00_1234_0000,
            rkey: 0xdead_beef,
            len: (64 * SLOT_BYTES) as u64,
        };
        let bytes = encode_table_info(Some((region, 64)), 1 << 20);
        assert_eq!(bytes.len(), TABLE_INFO_BYTES);
        let (table, ring) = decode_table_info(&bytes).expect("valid information");
        let table = table.expect("a table");
        assert_eq!((table.region, table.slots, ring), (region, 64, 1 << 20));
        assert_eq!(
            decode_table_info(&encode_table_info(None, 0))
                .expect("valid information")
                .0
                .map(|t| t.slots),
            None
        );
        assert!(decode_table_info(&encode_table_info(None, MAX_WRITE_RING_BYTES + 1)).is_err());
        let short = RemoteRegion {
            len: (64 * SLOT_BYTES - 1) as u64,
            ..region
        };
        assert!(decode_table_info(&encode_table_info(Some((short, 64)), 0)).is_err());
        assert!(decode_table_info(&bytes[..39]).is_err());
        let mut big_rkey = bytes.clone();
        big_rkey[12] = 1;
        assert!(decode_table_info(&big_rkey).is_err());
    }
}
