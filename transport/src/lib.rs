//! DVM's cluster transport: framed messages, request/response, remote page reads and page pushes
//! between the nodes of one job, behind the [`Transport`] trait.
//!
//! This module owns the vocabulary the cluster layer programs against (node ids, request ids,
//! page versions, events, errors, counters). Invariants every implementation keeps:
//! - frames to one peer are delivered in the order they were queued (per-peer FIFO);
//! - a peer that goes away yields exactly one [`Event::PeerLost`] or [`Event::PeerLeft`];
//! - nothing a peer sends can panic the transport: malformed input ends that peer's connection
//!   (or is refused at the handshake) and the other peers keep working;
//! - every queue is bounded (frame size, per-peer outbound bytes, inbound event bytes).
//!
//! Implementations: [`tcp::TcpTransport`] (io_uring over TCP) and [`verbs::VerbsTransport`]
//! (SEND/RECV over RDMA verbs RC queue pairs, bootstrapped over the same TCP mesh); [`verbs`]
//! also holds device discovery and the transport choice. `sim` is not an implementation of the
//! trait: it is the deterministic simulated network that protocol simulations drive step by
//! step.

pub mod crc32c;
pub mod handshake;
pub mod sim;
pub mod tcp;
mod uring;
pub mod verbs;
pub mod wire;

use std::net::SocketAddr;
use std::time::Duration;

pub use handshake::{HandshakeError, RefuseReason};
pub use wire::WireError;

/// A node of the job: its rank, `0..world`.
pub type NodeId = u32;

/// Bytes in one page: the page pool's (pages land in pool pages by RDMA READ).
pub const PAGE_BYTES: usize = dvm_numa::PAGE_BYTES;
/// Words of a page's store mask: one bit per byte of the page (4096 bits, 512 bytes).
pub const MASK_WORDS: usize = PAGE_BYTES / 64;
/// Bytes of a store mask on the wire.
pub const MASK_BYTES: usize = MASK_WORDS * 8;

/// Names one outstanding request (or page read) of this node. Never 0: 0 marks one-way frames on
/// the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// A borrowed page version, as the engine holds it: the page key, the commit timestamp of the
/// version, the 4096 bytes and the store mask (bit `i` set = byte `i` was written).
#[derive(Clone, Copy, Debug)]
pub struct PageVersionRef<'a> {
    pub page: u64,
    pub ts: u64,
    pub data: &'a [u8; PAGE_BYTES],
    pub mask: &'a [u64; MASK_WORDS],
}

/// An owned page version, as received from a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageVersion {
    pub page: u64,
    pub ts: u64,
    pub data: Box<[u8; PAGE_BYTES]>,
    pub mask: Box<[u64; MASK_WORDS]>,
}

impl PageVersion {
    pub fn as_ref(&self) -> PageVersionRef<'_> {
        PageVersionRef {
            page: self.page,
            ts: self.ts,
            data: &self.data,
            mask: &self.mask,
        }
    }
}

impl From<PageVersionRef<'_>> for PageVersion {
    fn from(v: PageVersionRef<'_>) -> Self {
        PageVersion {
            page: v.page,
            ts: v.ts,
            data: Box::new(*v.data),
            mask: Box::new(*v.mask),
        }
    }
}

/// Why a peer's connection ended without a Goodbye.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LossReason {
    #[error("nothing received for {silent_ms} ms (peer timeout)")]
    Timeout { silent_ms: u64 },
    #[error("connection closed by the peer at stream byte {offset} without a goodbye")]
    Closed { offset: u64 },
    #[error("socket error {errno} during {op}")]
    Io { op: &'static str, errno: i32 },
    #[error("protocol error: {0}")]
    Protocol(#[from] WireError),
    #[error("unexpected {kind} frame at stream byte {offset} after the handshake")]
    UnexpectedFrame { kind: &'static str, offset: u64 },
    /// The RDMA path to the peer failed: a completion in error (its queue pair is then in the
    /// error state), a failed post, or a malformed SEND.
    #[error("RDMA: {0}")]
    Rdma(String),
    /// This node closed the connection itself. Recorded when the transport shuts down; no
    /// event is delivered for it, since nobody polls a closed transport.
    #[error("closed by this node")]
    LocalAbort,
}

/// What [`Transport::poll`] delivers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A one-way message.
    Message { from: NodeId, payload: Vec<u8> },
    /// A request; answer it with [`Transport::respond`] using the same `id`.
    Request {
        from: NodeId,
        id: RequestId,
        payload: Vec<u8>,
    },
    /// The answer to one of our requests.
    Response {
        from: NodeId,
        id: RequestId,
        payload: Vec<u8>,
    },
    /// A peer asks this node (the page's home) for the version of `page` visible at
    /// `snapshot_ts`; answer with [`Transport::respond_page`].
    ReadPage {
        from: NodeId,
        id: RequestId,
        page: u64,
        snapshot_ts: u64,
    },
    /// The answer to one of our [`Transport::read_page`] calls.
    PageData {
        from: NodeId,
        id: RequestId,
        version: PageVersion,
    },
    /// Page versions pushed to this node.
    Pages {
        from: NodeId,
        pages: Vec<PageVersion>,
    },
    /// The peer said Goodbye: a clean departure.
    PeerLeft { peer: NodeId },
    /// The peer is gone without a Goodbye. Reported once per peer.
    PeerLost { peer: NodeId, reason: LossReason },
}

/// Per-peer traffic. "Messages" are data frames (message, request, response, page read, page
/// data, page push); heartbeats and handshake frames are not counted. Bytes are wire bytes of
/// those frames (header included). Sent counts are taken when a frame is queued.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerCounters {
    pub peer: NodeId,
    pub messages_sent: u64,
    pub bytes_sent: u64,
    pub messages_received: u64,
    pub bytes_received: u64,
    /// Bytes queued for this peer and not yet accepted by the kernel.
    pub queue_depth_bytes: u64,
    /// Highest `queue_depth_bytes` seen.
    pub queue_max_bytes: u64,
}

/// A peer we could not reach while establishing the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnreachablePeer {
    pub rank: NodeId,
    pub addr: SocketAddr,
    pub last_error: String,
}

fn list_unreachable(peers: &[UnreachablePeer]) -> String {
    peers
        .iter()
        .map(|p| format!("rank {} at {} ({})", p.rank, p.addr, p.last_error))
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("peer {peer} is not a rank of this job (world {world})")]
    UnknownPeer { peer: NodeId, world: u32 },
    #[error("cannot send to the local node {0}: the cluster layer serves local pages itself")]
    ToSelf(NodeId),
    #[error("peer {peer} at {addr} is no longer connected")]
    PeerGone { peer: NodeId, addr: SocketAddr },
    #[error("queue to peer {peer} at {addr} stayed full ({queued_bytes} of {limit_bytes} bytes) for {waited_ms} ms")]
    QueueFull {
        peer: NodeId,
        addr: SocketAddr,
        queued_bytes: u64,
        limit_bytes: u64,
        waited_ms: u64,
    },
    #[error("flush to peer {peer} at {addr} not done after {waited_ms} ms ({pending_bytes} bytes pending)")]
    FlushTimeout {
        peer: NodeId,
        addr: SocketAddr,
        pending_bytes: u64,
        waited_ms: u64,
    },
    #[error("frame encoding failed: {0}")]
    Wire(#[from] WireError),
    #[error("unreachable within {timeout_ms} ms: {}", list_unreachable(.peers))]
    Unreachable {
        peers: Vec<UnreachablePeer>,
        timeout_ms: u64,
    },
    #[error("peer {peer} at {addr} refused our hello: {reason}")]
    RefusedBy {
        peer: NodeId,
        addr: SocketAddr,
        reason: RefuseReason,
    },
    #[error("the transport is closed")]
    Closed,
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What the cluster layer needs from the network. All methods take `&self`: any thread may send
/// while another polls.
///
/// Sends are queued per peer and coalesced: several small frames to one peer leave in one socket
/// write. Frames to one peer arrive in the order they were queued; there is no order between
/// peers.
pub trait Transport: Send + Sync {
    /// This node's rank.
    fn local(&self) -> NodeId;
    /// Number of nodes in the job.
    fn world(&self) -> u32;
    /// The implementation, for logs: "io_uring-tcp" or "rdma-verbs".
    fn name(&self) -> &'static str;

    /// Queue a one-way message. When the peer's outbound queue is full (a bounded number of
    /// bytes), the call blocks for a bounded time waiting for room, then fails with
    /// [`TransportError::QueueFull`]; the same holds for every other queuing method.
    fn send(&self, to: NodeId, payload: &[u8]) -> Result<(), TransportError>;
    /// Queue a request; the answer arrives as [`Event::Response`] with the returned id.
    fn request(&self, to: NodeId, payload: &[u8]) -> Result<RequestId, TransportError>;
    /// Answer a request received as [`Event::Request`].
    fn respond(&self, to: NodeId, id: RequestId, payload: &[u8]) -> Result<(), TransportError>;

    /// Ask `home` for the version of `page` visible at `snapshot_ts`; the answer arrives as
    /// [`Event::PageData`] with the returned id. Over TCP the home's CPU answers (it receives
    /// [`Event::ReadPage`] and calls [`Transport::respond_page`]); an RDMA implementation reads
    /// the registered page pool one-sided instead, without involving the home's CPU.
    fn read_page(
        &self,
        home: NodeId,
        page: u64,
        snapshot_ts: u64,
    ) -> Result<RequestId, TransportError>;
    /// The home's answer to [`Event::ReadPage`].
    fn respond_page(
        &self,
        to: NodeId,
        id: RequestId,
        version: PageVersionRef<'_>,
    ) -> Result<(), TransportError>;
    /// Push page versions (replicas, committed diffs) to a node; it receives [`Event::Pages`]
    /// (possibly split into several batches).
    fn push_pages(&self, to: NodeId, pages: &[PageVersionRef<'_>]) -> Result<(), TransportError>;

    /// Wait until everything queued before the call has been handed to the kernel (bounded).
    fn flush(&self) -> Result<(), TransportError>;
    /// Append the events that arrived to `events`, waiting up to `timeout` for the first one.
    fn poll(&self, events: &mut Vec<Event>, timeout: Duration) -> Result<(), TransportError>;
    /// Traffic per peer (every rank but the local one).
    fn counters(&self) -> Vec<PeerCounters>;
}
