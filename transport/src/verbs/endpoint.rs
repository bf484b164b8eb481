//! One reliable-connected (RC) queue pair and the verbs objects it needs, connected to a peer by
//! exchanging its address over a TCP socket.
//!
//! Ownership is the destruction order: a queue pair holds `Arc`s of its protection domain and
//! completion queue, a memory region holds its protection domain, and those hold the device
//! context. Dropping an [`Endpoint`] therefore destroys QP, then MRs, CQ, and, with the last
//! endpoint or registration of its [`Domain`] (the context and protection domain endpoints may
//! share), the PD, closing the context last, on every path (including a failed `create` or
//! `connect`).
//!
//! Memory regions are registered once for a whole buffer. The peer's NIC may write into a region
//! at any time while it is registered, so DVM never hands out Rust references into one: data moves
//! in and out by copies ([`Endpoint::copy_in`], [`Endpoint::copy_out`]).
//!
//! One completion queue serves sends and receives. The blocking operations (`send`, `recv`,
//! `read`, `write`) reap completions by polling on the caller's thread with a deadline: a short
//! spin, then sleeps (no thread per queue pair, no unbounded busy wait). The verbs transport
//! instead posts without waiting (`post_message`, `try_recv`) and sleeps on the completion
//! channel an endpoint can be created with (`arm`, `channel_fd`, `take_channel_events`).

use std::alloc::Layout;
use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::raw::{c_int, c_uint};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dvm_numa::ChunkLease;
use rdma_sys as sys;

use super::device::{errno_of, mtu_bytes, DeviceList, Gid, RawContext};
use super::published::PublishedTable;
use super::{NoRdma, VerbsError};

/// Scatter entries a work request may have: an RDMA READ of a published slot lands in three
/// pieces (its head and tail in the data region, its page in a pool page).
pub const MAX_SCATTER: usize = 3;

/// A work request for the send queue, before it is posted.
#[derive(Clone, Copy, Debug)]
struct SendRequest {
    wr_id: u64,
    send_flags: c_uint,
    opcode: sys::ibv_wr_opcode::Type,
    /// Address, length and lkey of each scatter entry (the first `pieces`).
    local: [(u64, u32, u32); MAX_SCATTER],
    pieces: usize,
    /// Remote address and rkey (one-sided operations).
    remote: Option<(u64, u32)>,
}

/// What a completed receive brought.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A SEND's bytes.
    Message(Vec<u8>),
    /// An RDMA WRITE with immediate of `bytes` bytes into the local data region: where is the
    /// caller's protocol (the peer and this side agree on it).
    Written { bytes: u32 },
}

/// Settings of an [`Endpoint`]. The defaults work under soft-RoCE (rxe) on loopback.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    /// Device name; `None`: the first device with an ACTIVE port.
    pub device: Option<String>,
    /// Port number (from 1); `None`: the first ACTIVE port of the device.
    pub port: Option<u8>,
    /// GID index; `None`: the first IPv4-mapped GID found by scanning the table.
    pub gid_index: Option<u32>,
    /// Largest path MTU to use, in bytes (the port's active MTU caps it).
    pub max_mtu: u32,
    /// Bytes of the region peers READ and WRITE (registered once, whole).
    pub region_bytes: usize,
    /// Bytes of one message slot (the largest SEND).
    pub message_bytes: usize,
    /// Receives kept posted.
    pub receive_slots: u32,
    /// How long one operation (or the connection exchange) may take.
    pub timeout: Duration,
    /// Send slots for [`Endpoint::post_message`] (pipelined SENDs; [`Endpoint::send`] uses the
    /// first).
    pub send_slots: u32,
    /// Inline data to ask the queue pair for (`IBV_SEND_INLINE`); 0 for none. A device that
    /// refuses the size gets a queue pair without inline sends.
    pub max_inline: u32,
    /// Attach a completion channel to the completion queue, so that a thread can sleep on its
    /// descriptor ([`Endpoint::channel_fd`]) instead of polling.
    pub completion_channel: bool,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            device: None,
            port: None,
            gid_index: None,
            max_mtu: 1024,
            region_bytes: 1 << 20,
            message_bytes: 4096,
            receive_slots: 16,
            timeout: Duration::from_secs(20),
            send_slots: 1,
            max_inline: 0,
            completion_channel: false,
        }
    }
}

/// Where a peer's registered region is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteRegion {
    pub addr: u64,
    pub rkey: u32,
    pub len: u64,
}

/// What a peer needs to connect its queue pair to ours (sent over the TCP bootstrap socket).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub qpn: u32,
    pub psn: u32,
    pub lid: u16,
    pub gid: Gid,
    pub region: RemoteRegion,
}

const INFO_MAGIC: u32 = u32::from_le_bytes(*b"DVMv");
const INFO_BYTES: usize = 56;
const READY: u8 = b'R';

impl PeerInfo {
    pub fn encode(&self) -> [u8; INFO_BYTES] {
        let mut out = [0u8; INFO_BYTES];
        out[0..4].copy_from_slice(&INFO_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&self.qpn.to_le_bytes());
        out[8..12].copy_from_slice(&self.psn.to_le_bytes());
        out[12..14].copy_from_slice(&self.lid.to_le_bytes());
        out[16..32].copy_from_slice(&self.gid.0);
        out[32..36].copy_from_slice(&self.region.rkey.to_le_bytes());
        out[40..48].copy_from_slice(&self.region.addr.to_le_bytes());
        out[48..56].copy_from_slice(&self.region.len.to_le_bytes());
        out
    }

    /// Decodes and checks what a peer sent; nothing in it is trusted beyond these checks.
    pub fn decode(bytes: &[u8; INFO_BYTES]) -> Result<PeerInfo, VerbsError> {
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        if u32_at(0) != INFO_MAGIC {
            return Err(VerbsError::BadPeerInfo(
                "not a DVM verbs endpoint (bad magic)".into(),
            ));
        }
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&bytes[16..32]);
        let info = PeerInfo {
            qpn: u32_at(4),
            psn: u32_at(8),
            lid: u16::from_le_bytes([bytes[12], bytes[13]]),
            gid: Gid(gid),
            region: RemoteRegion {
                rkey: u32_at(32),
                addr: u64_at(40),
                len: u64_at(48),
            },
        };
        // Queue pair numbers and packet sequence numbers are 24-bit on the wire.
        if info.qpn > 0xff_ffff || info.qpn == 0 {
            return Err(VerbsError::BadPeerInfo(format!(
                "queue pair number {:#x}",
                info.qpn
            )));
        }
        if info.psn > 0xff_ffff {
            return Err(VerbsError::BadPeerInfo(format!(
                "packet sequence number {:#x}",
                info.psn
            )));
        }
        if info.gid.is_zero() {
            return Err(VerbsError::BadPeerInfo("zero GID".into()));
        }
        if info.region.addr.checked_add(info.region.len).is_none() {
            return Err(VerbsError::BadPeerInfo(
                "region wraps the address space".into(),
            ));
        }
        Ok(info)
    }
}

/// The operation a completion (or an error) belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionKind {
    Write,
    Read,
    Send,
    Recv,
}

impl CompletionKind {
    const fn tag(self) -> u64 {
        match self {
            CompletionKind::Write => 1,
            CompletionKind::Read => 2,
            CompletionKind::Send => 3,
            CompletionKind::Recv => 4,
        }
    }

    fn from_wr_id(wr_id: u64) -> Option<CompletionKind> {
        match wr_id >> 56 {
            1 => Some(CompletionKind::Write),
            2 => Some(CompletionKind::Read),
            3 => Some(CompletionKind::Send),
            4 => Some(CompletionKind::Recv),
            _ => None,
        }
    }

    fn wr_id(self, low: u64) -> u64 {
        (self.tag() << 56) | (low & ((1 << 56) - 1))
    }
}

/// A successful completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub kind: CompletionKind,
    pub wr_id: u64,
    pub bytes: u32,
}

/// Queue pair states, as `ibv_qp_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QpState {
    Reset,
    Init,
    ReadyToReceive,
    ReadyToSend,
    SendQueueDrain,
    SendQueueError,
    Error,
    Unknown(u32),
}

impl QpState {
    fn from_raw(raw: u32) -> QpState {
        use sys::ibv_qp_state::*;
        match raw {
            IBV_QPS_RESET => QpState::Reset,
            IBV_QPS_INIT => QpState::Init,
            IBV_QPS_RTR => QpState::ReadyToReceive,
            IBV_QPS_RTS => QpState::ReadyToSend,
            IBV_QPS_SQD => QpState::SendQueueDrain,
            IBV_QPS_SQE => QpState::SendQueueError,
            IBV_QPS_ERR => QpState::Error,
            other => QpState::Unknown(other),
        }
    }
}

fn call_error(call: &'static str, rc: c_int) -> VerbsError {
    VerbsError::Call {
        call,
        errno: errno_of(rc),
    }
}

fn null_error(call: &'static str) -> VerbsError {
    VerbsError::Call {
        call,
        errno: std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO),
    }
}

/// A protection domain; deallocated on drop.
struct ProtectionDomain {
    pd: NonNull<sys::ibv_pd>,
    _ctx: Arc<RawContext>,
}

// SAFETY: verbs objects may be used from any thread (libibverbs locks its own state); the
// pointer is only used through calls the library makes thread-safe.
unsafe impl Send for ProtectionDomain {}
// SAFETY: as above.
unsafe impl Sync for ProtectionDomain {}

impl ProtectionDomain {
    fn new(ctx: &Arc<RawContext>) -> Result<Arc<ProtectionDomain>, VerbsError> {
        // SAFETY: the context is open (the Arc keeps it so); NULL with errno on failure.
        let pd = unsafe { sys::ibv_alloc_pd(ctx.ctx.as_ptr()) };
        let pd = NonNull::new(pd).ok_or_else(|| null_error("ibv_alloc_pd"))?;
        Ok(Arc::new(ProtectionDomain {
            pd,
            _ctx: Arc::clone(ctx),
        }))
    }
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: allocated by ibv_alloc_pd, freed once; every QP and MR of it holds an Arc of
        // it and is therefore gone already.
        let rc = unsafe { sys::ibv_dealloc_pd(self.pd.as_ptr()) };
        warn_teardown("ibv_dealloc_pd", rc);
    }
}

/// A teardown call that failed cannot be retried or reported to anyone but the log (it runs in
/// `Drop`): say which and why.
fn warn_teardown(call: &str, rc: c_int) {
    if rc != 0 {
        tracing::warn!(
            "{call}: {}",
            std::io::Error::from_raw_os_error(errno_of(rc))
        );
    }
}

/// A completion channel: a descriptor that becomes readable when an armed completion queue
/// gets a completion. Destroyed on drop, after the completion queue using it (which holds an
/// `Arc` of it).
struct CompletionChannel {
    channel: NonNull<sys::ibv_comp_channel>,
    _ctx: Arc<RawContext>,
}

// SAFETY: as for ProtectionDomain: the channel is used through thread-safe verbs calls, and its
// descriptor through non-blocking reads made by the endpoint's owner.
unsafe impl Send for CompletionChannel {}
// SAFETY: as above.
unsafe impl Sync for CompletionChannel {}

impl CompletionChannel {
    fn new(ctx: &Arc<RawContext>) -> Result<Arc<CompletionChannel>, VerbsError> {
        // SAFETY: the context is open (the Arc keeps it so); NULL with errno on failure.
        let channel = unsafe { sys::ibv_create_comp_channel(ctx.ctx.as_ptr()) };
        let channel = NonNull::new(channel).ok_or_else(|| null_error("ibv_create_comp_channel"))?;
        let channel = Arc::new(CompletionChannel {
            channel,
            _ctx: Arc::clone(ctx),
        });
        // The owner drains events after its sleep ends; a blocking read there could hang it.
        let fd = channel.fd();
        // SAFETY: plain fcntl calls on the channel's descriptor, which lives as long as `channel`.
        let rc = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 {
                flags
            } else {
                libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)
            }
        };
        if rc < 0 {
            return Err(null_error("fcntl(completion channel, O_NONBLOCK)"));
        }
        Ok(channel)
    }

    fn fd(&self) -> c_int {
        // SAFETY: the channel is alive; `fd` is fixed at creation.
        unsafe { (*self.channel.as_ptr()).fd }
    }
}

impl Drop for CompletionChannel {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_comp_channel and destroyed once; the CQ attached to it
        // holds an Arc of it and is destroyed already.
        let rc = unsafe { sys::ibv_destroy_comp_channel(self.channel.as_ptr()) };
        warn_teardown("ibv_destroy_comp_channel", rc);
    }
}

/// A completion queue; destroyed on drop.
struct CompletionQueue {
    cq: NonNull<sys::ibv_cq>,
    /// Declared after `cq` but destroyed after it in any case: `Drop` destroys the CQ before the
    /// fields are dropped.
    channel: Option<Arc<CompletionChannel>>,
    _ctx: Arc<RawContext>,
}

// SAFETY: as for ProtectionDomain; polling is done through `&mut Endpoint` only.
unsafe impl Send for CompletionQueue {}
// SAFETY: as above.
unsafe impl Sync for CompletionQueue {}

impl CompletionQueue {
    fn new(
        ctx: &Arc<RawContext>,
        depth: u32,
        channel: Option<Arc<CompletionChannel>>,
    ) -> Result<Arc<CompletionQueue>, VerbsError> {
        let depth = c_int::try_from(depth).unwrap_or(c_int::MAX);
        let raw_channel = channel
            .as_ref()
            .map_or(std::ptr::null_mut(), |c| c.channel.as_ptr());
        // SAFETY: the context is open; the channel, if any, is alive and outlives the CQ (the
        // CQ holds its Arc); vector 0; NULL with errno on failure.
        let cq = unsafe {
            sys::ibv_create_cq(
                ctx.ctx.as_ptr(),
                depth,
                std::ptr::null_mut(),
                raw_channel,
                0,
            )
        };
        let cq = NonNull::new(cq).ok_or_else(|| null_error("ibv_create_cq"))?;
        Ok(Arc::new(CompletionQueue {
            cq,
            channel,
            _ctx: Arc::clone(ctx),
        }))
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_cq, destroyed once; the QPs using it hold an Arc of it
        // and are destroyed already; every channel event taken for it was acknowledged when it
        // was taken (ibv_destroy_cq waits for unacknowledged ones).
        let rc = unsafe { sys::ibv_destroy_cq(self.cq.as_ptr()) };
        warn_teardown("ibv_destroy_cq", rc);
    }
}

/// Who owns the memory of a [`MemoryRegion`].
enum Owner {
    /// The region itself: allocated with `layout` when registered, freed after deregistration.
    Region,
    /// A published-page table: the table owns the buffer (and outlives the registration
    /// through this `Arc`), so drop only deregisters.
    Table { _table: Arc<PublishedTable> },
    /// A page pool's chunk: the pool owns the memory, the lease keeps it mapped until after
    /// deregistration, so drop only deregisters.
    Chunk(ChunkLease),
}

/// A page-aligned buffer registered as one memory region; deregistered (then freed, if the
/// region owns it) on drop.
struct MemoryRegion {
    mr: NonNull<sys::ibv_mr>,
    buf: NonNull<u8>,
    layout: Layout,
    _pd: Arc<ProtectionDomain>,
    owner: Owner,
}

// SAFETY: the buffer is owned by this value or kept alive by its owner; the pointers are used
// through verbs calls (thread-safe) and copies made under `&mut Endpoint`.
unsafe impl Send for MemoryRegion {}

fn region_layout(bytes: usize, call: &'static str) -> Result<Layout, VerbsError> {
    Layout::from_size_align(bytes.max(1), 4096).map_err(|_| VerbsError::Call {
        call,
        errno: libc::EINVAL,
    })
}

impl MemoryRegion {
    /// A zeroed buffer of `bytes` registered for local writes, and for the peer's READs and
    /// WRITEs when `remote`.
    fn new(
        pd: &Arc<ProtectionDomain>,
        bytes: usize,
        remote: bool,
    ) -> Result<MemoryRegion, VerbsError> {
        let layout = region_layout(bytes, "region layout")?;
        // SAFETY: the layout has a non-zero size.
        let buf = unsafe { std::alloc::alloc_zeroed(layout) };
        let buf = NonNull::new(buf).ok_or(VerbsError::Call {
            call: "allocating a region",
            errno: libc::ENOMEM,
        })?;
        let mut access = sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE;
        if remote {
            access = access
                | sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ
                | sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
        }
        MemoryRegion::register(pd, buf, layout, access, Owner::Region).inspect_err(|_| {
            // SAFETY: allocated above with this layout and not registered.
            unsafe { std::alloc::dealloc(buf.as_ptr(), layout) };
        })
    }

    /// Registers a published-page table for remote READs only (peers never write it).
    fn over_table(
        pd: &Arc<ProtectionDomain>,
        table: &Arc<PublishedTable>,
    ) -> Result<MemoryRegion, VerbsError> {
        let (ptr, len) = table.raw();
        let buf = NonNull::new(ptr).ok_or(VerbsError::Call {
            call: "registering the published table",
            errno: libc::EINVAL,
        })?;
        let layout = region_layout(len, "table layout")?;
        let access = sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ;
        MemoryRegion::register(
            pd,
            buf,
            layout,
            access,
            Owner::Table {
                _table: Arc::clone(table),
            },
        )
    }

    /// Registers a page pool's chunk for local writes only: RDMA READs land in its pages.
    fn over_chunk(
        pd: &Arc<ProtectionDomain>,
        chunk: ChunkLease,
    ) -> Result<MemoryRegion, VerbsError> {
        let buf = NonNull::new(chunk.start()).ok_or(VerbsError::Call {
            call: "registering a page pool chunk",
            errno: libc::EINVAL,
        })?;
        let layout = region_layout(chunk.len_bytes(), "chunk layout")?;
        let access = sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE;
        MemoryRegion::register(pd, buf, layout, access, Owner::Chunk(chunk))
    }

    /// Registers `layout.size()` bytes at `buf`, which `owner` keeps allocated (or mapped)
    /// until after deregistration.
    fn register(
        pd: &Arc<ProtectionDomain>,
        buf: NonNull<u8>,
        layout: Layout,
        access: sys::ibv_access_flags,
        owner: Owner,
    ) -> Result<MemoryRegion, VerbsError> {
        // SAFETY: the PD is alive (Arc); `buf` points to `layout.size()` bytes that stay
        // allocated until after the MR is deregistered: the region's own allocation is freed
        // only after deregistration (Drop below), a table's buffer and a pool chunk live as
        // long as the `owner` this region holds. Registering pins the pages and lets this
        // PD's queue pairs (and, with remote access, the peers') reach them through work
        // requests; no Rust reference is made. NULL with errno on failure.
        let mr = unsafe {
            sys::ibv_reg_mr(
                pd.pd.as_ptr(),
                buf.as_ptr().cast(),
                layout.size(),
                access.0 as c_int,
            )
        };
        let mr = NonNull::new(mr).ok_or_else(|| null_error("ibv_reg_mr"))?;
        Ok(MemoryRegion {
            mr,
            buf,
            layout,
            _pd: Arc::clone(pd),
            owner,
        })
    }

    /// The pool chunk this region registers, if it registers one.
    fn chunk(&self) -> Option<&ChunkLease> {
        match &self.owner {
            Owner::Chunk(chunk) => Some(chunk),
            _ => None,
        }
    }

    fn len(&self) -> usize {
        self.layout.size()
    }

    fn addr(&self) -> u64 {
        self.buf.as_ptr() as u64
    }

    fn lkey(&self) -> u32 {
        // SAFETY: the MR is registered for as long as `self` lives; lkey is set at registration.
        unsafe { (*self.mr.as_ptr()).lkey }
    }

    fn rkey(&self) -> u32 {
        // SAFETY: as for lkey.
        unsafe { (*self.mr.as_ptr()).rkey }
    }

    fn check(&self, what: &'static str, offset: usize, len: usize) -> Result<(), VerbsError> {
        if offset.checked_add(len).is_none_or(|end| end > self.len()) {
            return Err(VerbsError::OutOfBounds {
                what,
                offset: offset as u64,
                len: len as u64,
                size: self.len() as u64,
            });
        }
        Ok(())
    }

    fn copy_in(&mut self, offset: usize, bytes: &[u8]) -> Result<(), VerbsError> {
        self.check("copy into the local region", offset, bytes.len())?;
        // SAFETY: bounds checked above; the source is a Rust slice that cannot overlap our
        // allocation (we never hand out references into it). A concurrent remote write into the
        // same bytes would be a protocol error of the peer, not a Rust reference being aliased.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.buf.as_ptr().add(offset),
                bytes.len(),
            )
        };
        Ok(())
    }

    fn copy_out(&self, offset: usize, out: &mut [u8]) -> Result<(), VerbsError> {
        self.check("copy out of the local region", offset, out.len())?;
        // SAFETY: bounds checked above; `out` is a distinct Rust slice.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.buf.as_ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            )
        };
        Ok(())
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: registered by ibv_reg_mr, deregistered once; the QP that could target it is
        // destroyed first (the Endpoint declares it first).
        let rc = unsafe { sys::ibv_dereg_mr(self.mr.as_ptr()) };
        warn_teardown("ibv_dereg_mr", rc);
        let owner = std::mem::replace(&mut self.owner, Owner::Region);
        if rc != 0 {
            // The NIC may still reach the buffer: leaking it (and what keeps it alive) is the
            // only safe choice.
            std::mem::forget(owner);
            return;
        }
        if let Owner::Region = owner {
            // SAFETY: allocated with this layout in `new`; no longer registered, so nothing
            // else can reach it.
            unsafe { std::alloc::dealloc(self.buf.as_ptr(), self.layout) };
        }
        // A table's buffer and a pool chunk are freed by their owners when their last holder
        // (perhaps `owner`, dropped here) goes.
    }
}

/// An RC queue pair; destroyed on drop.
struct QueuePair {
    qp: NonNull<sys::ibv_qp>,
    _cq: Arc<CompletionQueue>,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: as for ProtectionDomain; posting is done through `&mut Endpoint` only.
unsafe impl Send for QueuePair {}

impl QueuePair {
    fn new(
        pd: &Arc<ProtectionDomain>,
        cq: &Arc<CompletionQueue>,
        send_wr: u32,
        recv_wr: u32,
        max_inline: u32,
        max_scatter: u32,
    ) -> Result<(QueuePair, u32, u32), VerbsError> {
        // SAFETY: a plain C struct of pointers and integers; all zeros (NULL, 0) is valid.
        let mut init: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq.cq.as_ptr();
        init.recv_cq = cq.cq.as_ptr();
        init.cap.max_send_wr = send_wr;
        init.cap.max_recv_wr = recv_wr;
        init.cap.max_send_sge = max_scatter;
        init.cap.max_recv_sge = 1;
        init.cap.max_inline_data = max_inline;
        init.qp_type = sys::ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        // SAFETY: PD and CQ are alive (Arcs kept by the QP); `init` is a live struct the call
        // reads and updates (granted capacities). NULL with errno on failure.
        let qp = unsafe { sys::ibv_create_qp(pd.pd.as_ptr(), &mut init) };
        let qp = NonNull::new(qp).ok_or_else(|| null_error("ibv_create_qp"))?;
        Ok((
            QueuePair {
                qp,
                _cq: Arc::clone(cq),
                _pd: Arc::clone(pd),
            },
            init.cap.max_inline_data,
            init.cap.max_send_sge,
        ))
    }

    fn qpn(&self) -> u32 {
        // SAFETY: the QP is alive; qp_num is fixed at creation.
        unsafe { (*self.qp.as_ptr()).qp_num }
    }

    fn modify(
        &self,
        attr: &mut sys::ibv_qp_attr,
        mask: sys::ibv_qp_attr_mask,
        call: &'static str,
    ) -> Result<(), VerbsError> {
        // SAFETY: the QP is alive; `attr` is a live struct, read for the fields `mask` names.
        // ibv_modify_qp returns the error number directly.
        let rc = unsafe { sys::ibv_modify_qp(self.qp.as_ptr(), attr, mask.0 as c_int) };
        if rc != 0 {
            return Err(call_error(call, rc));
        }
        Ok(())
    }

    fn state(&self) -> Result<QpState, VerbsError> {
        // SAFETY: plain C structs; all zeros is valid.
        let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut init: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the QP is alive; both structs are live and writable.
        let rc = unsafe {
            sys::ibv_query_qp(
                self.qp.as_ptr(),
                &mut attr,
                sys::ibv_qp_attr_mask::IBV_QP_STATE.0 as c_int,
                &mut init,
            )
        };
        if rc != 0 {
            return Err(call_error("ibv_query_qp", rc));
        }
        Ok(QpState::from_raw(attr.qp_state))
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_qp and destroyed once; outstanding work requests are
        // flushed by the library and nothing polls for them afterwards.
        let rc = unsafe { sys::ibv_destroy_qp(self.qp.as_ptr()) };
        warn_teardown("ibv_destroy_qp", rc);
    }
}

/// A connected RC queue pair with one registered data region (peers READ and WRITE it), message
/// slots for SEND/RECV with receives kept posted, and one completion queue.
pub struct Endpoint {
    // Field order is drop order: the QP first, then the regions, then CQ/PD/context (which the
    // Arcs would keep alive anyway).
    qp: QueuePair,
    data: MemoryRegion,
    messages: MemoryRegion,
    /// This node's published-page table, registered in this endpoint's protection domain.
    published: Option<MemoryRegion>,
    cq: Arc<CompletionQueue>,
    domain: Arc<Domain>,
    config: EndpointConfig,
    psn: u32,
    peer: Option<PeerInfo>,
    /// Completed receives not yet taken: (slot, bytes, whether an RDMA WRITE with immediate
    /// consumed it rather than a SEND).
    received: VecDeque<(u32, u32, bool)>,
    /// Work requests queued between `begin_chain` and `flush_chain`.
    chain: Option<Vec<SendRequest>>,
    next_wr: u64,
    broken: bool,
    /// Inline bytes the queue pair granted.
    max_inline: u32,
    /// Scatter entries per send-queue work request the queue pair granted (1..=MAX_SCATTER).
    max_scatter: usize,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("device", &self.domain.ctx.name)
            .field("port", &self.domain.port)
            .field("gid_index", &self.domain.gid_index)
            .field("qpn", &self.qp.qpn())
            .field("peer", &self.peer)
            .field("broken", &self.broken)
            .finish()
    }
}

fn open_device(
    want: Option<&str>,
    want_port: Option<u8>,
) -> Result<(Arc<RawContext>, u8), VerbsError> {
    let list = DeviceList::get()?;
    if list.len() == 0 {
        return Err(NoRdma::NoDevices.into());
    }
    let mut inactive = Vec::new();
    for index in 0..list.len() {
        let (dev, name) = list.device(index);
        if want.is_some_and(|w| w != name) {
            continue;
        }
        let ctx = RawContext::open(dev, name.clone()).map_err(|_| null_error("ibv_open_device"))?;
        let ports = match want_port {
            Some(p) => vec![p],
            None => {
                let attr = ctx.query_device().map_err(|errno| VerbsError::Call {
                    call: "ibv_query_device",
                    errno,
                })?;
                (1..=attr.phys_port_cnt).collect()
            }
        };
        for port in ports {
            match ctx.query_port(port) {
                Ok(attr) if attr.state == sys::ibv_port_state::IBV_PORT_ACTIVE => {
                    return Ok((Arc::new(ctx), port));
                }
                Ok(_) => inactive.push(format!("{name} port {port}")),
                Err(errno) => {
                    return Err(VerbsError::Call {
                        call: "ibv_query_port",
                        errno,
                    })
                }
            }
        }
    }
    match want {
        Some(name) if inactive.is_empty() => Err(VerbsError::NoSuchDevice(name.into())),
        _ => Err(NoRdma::NoActivePort(inactive.join(", ")).into()),
    }
}

/// An opened RDMA device with one protection domain, its port and addressing. Endpoints
/// created in one domain ([`Endpoint::create_in`]) share the protection domain, so a region
/// registered in it once (the published table) serves every peer: the kernel counts it once
/// against the locked-memory limit.
pub struct Domain {
    pd: Arc<ProtectionDomain>,
    ctx: Arc<RawContext>,
    port: u8,
    gid_index: u32,
    gid: Gid,
    lid: u16,
    path_mtu: u32,
    max_rd_atomic: u8,
}

impl std::fmt::Debug for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domain")
            .field("device", &self.ctx.name)
            .field("port", &self.port)
            .field("gid_index", &self.gid_index)
            .finish()
    }
}

impl Domain {
    /// Opens the device and port `config` names (or the first with an ACTIVE port), finds the
    /// GID to address peers with, and allocates the protection domain.
    pub fn open(config: &EndpointConfig) -> Result<Arc<Domain>, VerbsError> {
        let (ctx, port) = open_device(config.device.as_deref(), config.port)?;
        let port_attr = ctx.query_port(port).map_err(|errno| VerbsError::Call {
            call: "ibv_query_port",
            errno,
        })?;
        let device_attr = ctx.query_device().map_err(|errno| VerbsError::Call {
            call: "ibv_query_device",
            errno,
        })?;
        let (gid_index, gid) = match config.gid_index {
            Some(index) => (
                index,
                ctx.query_gid(port, index)
                    .map_err(|errno| VerbsError::Call {
                        call: "ibv_query_gid",
                        errno,
                    })?,
            ),
            None => {
                let table = u32::try_from(port_attr.gid_tbl_len).unwrap_or(0);
                // Stops at the first match: the table can be long (1024 under rxe).
                (0..table)
                    .find_map(|i| {
                        ctx.query_gid(port, i)
                            .ok()
                            .filter(Gid::is_ipv4_mapped)
                            .map(|g| (i, g))
                    })
                    .ok_or_else(|| VerbsError::NoUsableGid {
                        device: ctx.name.clone(),
                        port,
                    })?
            }
        };
        let path_mtu = config.max_mtu.min(mtu_bytes(port_attr.active_mtu)).max(256);
        let max_rd_atomic = u8::try_from(device_attr.max_qp_rd_atom.clamp(1, 16)).unwrap_or(1);
        let pd = ProtectionDomain::new(&ctx)?;
        Ok(Arc::new(Domain {
            pd,
            ctx,
            port,
            gid_index,
            gid,
            lid: port_attr.lid,
            path_mtu,
            max_rd_atomic,
        }))
    }

    /// Registers `table` once in this protection domain for remote READ: every endpoint of
    /// the domain's peers can READ it with the returned region's rkey.
    pub fn register_table(
        &self,
        table: &Arc<PublishedTable>,
    ) -> Result<TableRegistration, VerbsError> {
        Ok(TableRegistration {
            region: MemoryRegion::over_table(&self.pd, table)?,
        })
    }

    /// Registers a page pool's chunk once in this protection domain, so that RDMA READs of
    /// any endpoint of the domain can land in its pages ([`Endpoint::post_read_scattered`]).
    pub fn register_chunk(&self, chunk: ChunkLease) -> Result<ChunkRegistration, VerbsError> {
        Ok(ChunkRegistration {
            region: MemoryRegion::over_chunk(&self.pd, chunk)?,
        })
    }

    pub fn device_name(&self) -> &str {
        &self.ctx.name
    }
}

/// A page pool chunk registered in a [`Domain`] for local writes; deregistered when dropped
/// (the region holds the protection domain and the chunk's mapping alive until then). Drop
/// it only once no queue pair has a READ into it in flight.
pub struct ChunkRegistration {
    region: MemoryRegion,
}

impl ChunkRegistration {
    /// The scatter entry of `len` bytes at `addr`, if they lie inside the chunk.
    fn piece(&self, addr: usize, len: usize) -> Option<(u64, u32, u32)> {
        let inside = self.region.chunk().is_some_and(|c| c.contains(addr, len));
        let len = u32::try_from(len).ok()?;
        inside.then(|| (addr as u64, len, self.region.lkey()))
    }
}

impl std::fmt::Debug for ChunkRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkRegistration")
            .field("start", &self.region.addr())
            .field("len", &self.region.len())
            .finish()
    }
}

/// One piece of the local end of [`Endpoint::post_read_scattered`].
#[derive(Clone, Copy, Debug)]
pub enum ReadPiece<'a> {
    /// `len` bytes at `offset` of the endpoint's data region.
    Region { offset: usize, len: usize },
    /// `len` bytes at `addr`, inside a registered pool chunk (a page lent to the READ).
    Chunk {
        registration: &'a ChunkRegistration,
        addr: usize,
        len: usize,
    },
}

/// A published table registered in a [`Domain`]; deregistered when dropped (the region
/// holds the domain's protection domain and the table alive until then).
pub struct TableRegistration {
    region: MemoryRegion,
}

impl TableRegistration {
    /// Where peers READ the table.
    pub fn remote(&self) -> RemoteRegion {
        RemoteRegion {
            addr: self.region.addr(),
            rkey: self.region.rkey(),
            len: self.region.len() as u64,
        }
    }
}

/// The remote (address, rkey) of `len` bytes at `offset` of `remote`, checked to lie inside.
fn remote_piece(remote: RemoteRegion, offset: u64, len: usize) -> Result<(u64, u32), VerbsError> {
    if offset
        .checked_add(len as u64)
        .is_none_or(|end| end > remote.len)
    {
        return Err(VerbsError::OutOfBounds {
            what: "the peer's region",
            offset,
            len: len as u64,
            size: remote.len,
        });
    }
    Ok((remote.addr + offset, remote.rkey))
}

fn random_psn() -> u32 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    (hasher.finish() as u32) & 0xff_ffff
}

impl Endpoint {
    /// Opens the device, creates PD, CQ, regions and an RC queue pair in INIT with every
    /// receive posted. Not connected yet: see [`Endpoint::connect`] and [`Endpoint::connect_over`].
    pub fn create(config: EndpointConfig) -> Result<Endpoint, VerbsError> {
        let domain = Domain::open(&config)?;
        Endpoint::create_in(&domain, config)
    }

    /// [`Endpoint::create`] in an opened device and protection domain, which endpoints share
    /// (and with it what is registered there once, such as the published table).
    pub fn create_in(domain: &Arc<Domain>, config: EndpointConfig) -> Result<Endpoint, VerbsError> {
        let ctx = &domain.ctx;
        let pd = Arc::clone(&domain.pd);
        // Every send slot may be in flight at once, plus a few RDMA READs/WRITEs.
        let send_slots = config.send_slots.max(1);
        let send_wr = (send_slots + 8).max(16);
        let channel = if config.completion_channel {
            Some(CompletionChannel::new(ctx)?)
        } else {
            None
        };
        let cq = CompletionQueue::new(ctx, send_wr + config.receive_slots + 16, channel)?;
        let data = MemoryRegion::new(&pd, config.region_bytes, true)?;
        // Receive slots, then the slots of messages being sent.
        let slots = config.receive_slots as usize + send_slots as usize;
        let messages = MemoryRegion::new(&pd, config.message_bytes.max(1) * slots, false)?;
        let recv_wr = config.receive_slots.max(1);
        // Inline sends and scatter lists are optimisations: a device refusing them still
        // serves, with plain sends and READs that land in the data region.
        let scatter = MAX_SCATTER as u32;
        let (qp, max_inline, max_scatter) =
            match QueuePair::new(&pd, &cq, send_wr, recv_wr, config.max_inline, scatter) {
                Ok(granted) => granted,
                Err(_) => QueuePair::new(&pd, &cq, send_wr, recv_wr, 0, 1)?,
            };
        let max_scatter = (max_scatter as usize).clamp(1, MAX_SCATTER);
        let mut endpoint = Endpoint {
            qp,
            data,
            messages,
            published: None,
            cq,
            domain: Arc::clone(domain),
            psn: random_psn(),
            peer: None,
            received: VecDeque::new(),
            chain: None,
            next_wr: 0,
            broken: false,
            max_inline,
            max_scatter,
            config,
        };
        endpoint.move_to_init()?;
        for slot in 0..endpoint.config.receive_slots {
            endpoint.post_recv(slot)?;
        }
        Ok(endpoint)
    }

    /// Creates an endpoint and connects it to the one the peer creates at the other end of
    /// `stream`: both sides send their [`PeerInfo`], bring their queue pairs to RTS, and confirm
    /// over the socket, so that neither sends before the other can receive.
    pub fn connect_over(
        stream: &mut TcpStream,
        config: EndpointConfig,
    ) -> Result<Endpoint, VerbsError> {
        stream.set_read_timeout(Some(config.timeout))?;
        stream.set_write_timeout(Some(config.timeout))?;
        let mut endpoint = Endpoint::create(config)?;
        stream.write_all(&endpoint.local_info().encode())?;
        let mut bytes = [0u8; INFO_BYTES];
        stream.read_exact(&mut bytes)?;
        let peer = PeerInfo::decode(&bytes)?;
        endpoint.connect(&peer)?;
        stream.write_all(&[READY])?;
        let mut ready = [0u8; 1];
        stream.read_exact(&mut ready)?;
        if ready[0] != READY {
            return Err(VerbsError::BadPeerInfo(
                "the peer did not confirm the connection".into(),
            ));
        }
        Ok(endpoint)
    }

    /// What the peer needs to connect to this endpoint.
    pub fn local_info(&self) -> PeerInfo {
        PeerInfo {
            qpn: self.qp.qpn(),
            psn: self.psn,
            lid: self.domain.lid,
            gid: self.domain.gid,
            region: self.local_region(),
        }
    }

    /// This endpoint's data region, as a peer addresses it.
    pub fn local_region(&self) -> RemoteRegion {
        RemoteRegion {
            addr: self.data.addr(),
            rkey: self.data.rkey(),
            len: self.data.len() as u64,
        }
    }

    /// Registers `table` (once for this endpoint) so the peer can READ it; where it is, for
    /// the peer.
    pub fn register_table(
        &mut self,
        table: &Arc<PublishedTable>,
    ) -> Result<RemoteRegion, VerbsError> {
        let region = MemoryRegion::over_table(&self.domain.pd, table)?;
        let remote = RemoteRegion {
            addr: region.addr(),
            rkey: region.rkey(),
            len: region.len() as u64,
        };
        self.published = Some(region);
        Ok(remote)
    }

    /// Posts a signalled RDMA READ of `len` bytes at `remote_offset` of `remote` into
    /// `local_offset` of the data region, without waiting; its completion carries `wr_id` from
    /// `tag` (as [`Endpoint::post_message`]'s, so on an RC queue pair it also completes every
    /// earlier send).
    pub fn post_read(
        &mut self,
        remote: RemoteRegion,
        local_offset: usize,
        remote_offset: u64,
        len: usize,
        tag: u64,
    ) -> Result<u64, VerbsError> {
        let (local, remote) =
            self.one_sided("RDMA READ into", remote, local_offset, remote_offset, len)?;
        let wr_id = CompletionKind::Send.wr_id(tag);
        self.post_send_raw(
            wr_id,
            sys::ibv_send_flags::IBV_SEND_SIGNALED.0 as c_uint,
            sys::ibv_wr_opcode::IBV_WR_RDMA_READ,
            &[local],
            Some(remote),
        )?;
        Ok(wr_id)
    }

    /// Posts a signalled RDMA READ of the bytes at `remote_offset` of `remote` into `pieces`,
    /// one after the other (a scatter list: up to [`Endpoint::max_scatter`] pieces), without
    /// waiting; completes as [`Endpoint::post_read`] does. Every piece is checked to lie in the
    /// data region or in its registered chunk.
    ///
    /// # Safety
    /// The device writes every `Chunk` piece until the READ completes: until its completion
    /// is reaped (or this endpoint's queue pair is destroyed), nothing may read, write or free
    /// that memory, nor deregister its chunk. (The data region pieces need no promise: the
    /// region is only ever reached by copies.)
    pub unsafe fn post_read_scattered(
        &mut self,
        remote: RemoteRegion,
        remote_offset: u64,
        pieces: &[ReadPiece<'_>],
        tag: u64,
    ) -> Result<u64, VerbsError> {
        if pieces.is_empty() || pieces.len() > self.max_scatter {
            return Err(VerbsError::TooManyPieces {
                pieces: pieces.len(),
                max: self.max_scatter,
            });
        }
        let mut local = [(0u64, 0u32, 0u32); MAX_SCATTER];
        let mut total = 0usize;
        for (entry, piece) in local.iter_mut().zip(pieces) {
            *entry = match *piece {
                ReadPiece::Region { offset, len } => {
                    total += len;
                    self.local_piece("RDMA READ into", offset, len)?
                }
                ReadPiece::Chunk {
                    registration,
                    addr,
                    len,
                } => {
                    total += len;
                    registration
                        .piece(addr, len)
                        .ok_or(VerbsError::OutOfBounds {
                            what: "RDMA READ into a pool chunk",
                            offset: addr as u64,
                            len: len as u64,
                            size: registration.region.len() as u64,
                        })?
                }
            };
        }
        let remote = remote_piece(remote, remote_offset, total)?;
        let wr_id = CompletionKind::Send.wr_id(tag);
        self.post_send_raw(
            wr_id,
            sys::ibv_send_flags::IBV_SEND_SIGNALED.0 as c_uint,
            sys::ibv_wr_opcode::IBV_WR_RDMA_READ,
            &local[..pieces.len()],
            Some(remote),
        )?;
        Ok(wr_id)
    }

    /// The device context and protection domain this endpoint lives in.
    pub fn domain(&self) -> &Arc<Domain> {
        &self.domain
    }

    /// Scatter entries a work request of this endpoint may have.
    pub fn max_scatter(&self) -> usize {
        self.max_scatter
    }

    /// The local (address, length, lkey) and remote (address, rkey) ends of a one-sided
    /// operation of `len` bytes between `local_offset` of the data region and `remote_offset`
    /// of `remote`, both checked to lie inside their regions.
    #[allow(clippy::type_complexity)]
    fn one_sided(
        &self,
        what: &'static str,
        remote: RemoteRegion,
        local_offset: usize,
        remote_offset: u64,
        len: usize,
    ) -> Result<((u64, u32, u32), (u64, u32)), VerbsError> {
        let local = self.local_piece(what, local_offset, len)?;
        Ok((local, remote_piece(remote, remote_offset, len)?))
    }

    /// The scatter entry of `len` bytes at `offset` of the data region, checked to lie inside.
    fn local_piece(
        &self,
        what: &'static str,
        offset: usize,
        len: usize,
    ) -> Result<(u64, u32, u32), VerbsError> {
        self.data.check(what, offset, len)?;
        let len32 = u32::try_from(len).map_err(|_| VerbsError::OutOfBounds {
            what,
            offset: offset as u64,
            len: len as u64,
            size: u64::from(u32::MAX),
        })?;
        Ok((self.data.addr() + offset as u64, len32, self.data.lkey()))
    }

    /// Posts an RDMA WRITE with immediate of `len` bytes at `local_offset` of the local data
    /// region to `remote_offset` of the connected peer's, without waiting. It consumes one of
    /// the peer's posted receives, whose completion tells the peer the bytes are in place
    /// ([`Incoming::Written`]); on the sender it completes (when `signalled`) as a SEND tagged
    /// `tag` would, in order with the SENDs. The local bytes must stay unchanged until the
    /// peer has taken them.
    pub fn post_write_imm(
        &mut self,
        local_offset: usize,
        remote_offset: u64,
        len: usize,
        signalled: bool,
        tag: u64,
    ) -> Result<u64, VerbsError> {
        let peer = self.connected_peer()?;
        let (local, remote) =
            self.one_sided("RDMA WRITE from", peer, local_offset, remote_offset, len)?;
        let flags = if signalled {
            sys::ibv_send_flags::IBV_SEND_SIGNALED.0
        } else {
            0
        };
        let wr_id = CompletionKind::Send.wr_id(tag);
        self.post_send_raw(
            wr_id,
            flags as c_uint,
            sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM,
            &[local],
            Some(remote),
        )?;
        Ok(wr_id)
    }

    /// The connected peer's data region.
    pub fn peer_region(&self) -> Option<RemoteRegion> {
        self.peer.map(|p| p.region)
    }

    pub fn device_name(&self) -> &str {
        &self.domain.ctx.name
    }

    pub fn gid_index(&self) -> u32 {
        self.domain.gid_index
    }

    pub fn path_mtu(&self) -> u32 {
        self.domain.path_mtu
    }

    /// Bytes of the local data region.
    pub fn region_len(&self) -> usize {
        self.data.len()
    }

    /// The queue pair's state as the device reports it.
    pub fn qp_state(&self) -> Result<QpState, VerbsError> {
        self.qp.state()
    }

    fn move_to_init(&mut self) -> Result<(), VerbsError> {
        use sys::ibv_qp_attr_mask as m;
        // SAFETY: a plain C struct; all zeros is valid.
        let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = sys::ibv_qp_state::IBV_QPS_INIT;
        attr.pkey_index = 0;
        attr.port_num = self.domain.port;
        attr.qp_access_flags = (sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ
            | sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE)
            .0 as c_uint;
        self.qp.modify(
            &mut attr,
            m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS,
            "ibv_modify_qp(INIT)",
        )
    }

    /// Brings the queue pair to RTR then RTS towards `peer`.
    pub fn connect(&mut self, peer: &PeerInfo) -> Result<(), VerbsError> {
        use sys::ibv_qp_attr_mask as m;
        let mtu = match self.domain.path_mtu {
            4096.. => sys::ibv_mtu::IBV_MTU_4096,
            2048.. => sys::ibv_mtu::IBV_MTU_2048,
            1024.. => sys::ibv_mtu::IBV_MTU_1024,
            512.. => sys::ibv_mtu::IBV_MTU_512,
            _ => sys::ibv_mtu::IBV_MTU_256,
        };
        // SAFETY: a plain C struct; all zeros is valid.
        let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = sys::ibv_qp_state::IBV_QPS_RTR;
        attr.path_mtu = mtu;
        attr.dest_qp_num = peer.qpn;
        attr.rq_psn = peer.psn;
        attr.max_dest_rd_atomic = self.domain.max_rd_atomic;
        attr.min_rnr_timer = 12;
        // RoCE (and rxe) route by GID: a global route header is required (is_global = 0 makes
        // RTR fail with EINVAL), from the IPv4-mapped GID (the link-local one fails with
        // ENETUNREACH on loopback).
        attr.ah_attr.is_global = 1;
        attr.ah_attr.grh.dgid = sys::ibv_gid { raw: peer.gid.0 };
        attr.ah_attr.grh.sgid_index =
            u8::try_from(self.domain.gid_index).map_err(|_| VerbsError::NoUsableGid {
                device: self.domain.ctx.name.clone(),
                port: self.domain.port,
            })?;
        attr.ah_attr.grh.hop_limit = 1;
        attr.ah_attr.dlid = peer.lid;
        attr.ah_attr.sl = 0;
        attr.ah_attr.src_path_bits = 0;
        attr.ah_attr.port_num = self.domain.port;
        self.qp.modify(
            &mut attr,
            m::IBV_QP_STATE
                | m::IBV_QP_AV
                | m::IBV_QP_PATH_MTU
                | m::IBV_QP_DEST_QPN
                | m::IBV_QP_RQ_PSN
                | m::IBV_QP_MAX_DEST_RD_ATOMIC
                | m::IBV_QP_MIN_RNR_TIMER,
            "ibv_modify_qp(RTR)",
        )?;
        // SAFETY: as above.
        let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = sys::ibv_qp_state::IBV_QPS_RTS;
        attr.timeout = 14;
        attr.retry_cnt = 7;
        // 7 = retry forever while the peer has no receive posted; our deadline bounds the wait.
        attr.rnr_retry = 7;
        attr.sq_psn = self.psn;
        attr.max_rd_atomic = self.domain.max_rd_atomic;
        self.qp.modify(
            &mut attr,
            m::IBV_QP_STATE
                | m::IBV_QP_TIMEOUT
                | m::IBV_QP_RETRY_CNT
                | m::IBV_QP_RNR_RETRY
                | m::IBV_QP_SQ_PSN
                | m::IBV_QP_MAX_QP_RD_ATOMIC,
            "ibv_modify_qp(RTS)",
        )?;
        self.peer = Some(*peer);
        Ok(())
    }

    /// Copies `bytes` into the local data region at `offset`.
    pub fn copy_in(&mut self, offset: usize, bytes: &[u8]) -> Result<(), VerbsError> {
        self.data.copy_in(offset, bytes)
    }

    /// Copies from the local data region at `offset` into `out`.
    pub fn copy_out(&self, offset: usize, out: &mut [u8]) -> Result<(), VerbsError> {
        self.data.copy_out(offset, out)
    }

    fn post_recv(&mut self, slot: u32) -> Result<(), VerbsError> {
        let size = self.config.message_bytes;
        let mut sge = sys::ibv_sge {
            addr: self.messages.addr() + (slot as u64) * size as u64,
            length: u32::try_from(size).unwrap_or(u32::MAX),
            lkey: self.messages.lkey(),
        };
        let mut wr = sys::ibv_recv_wr {
            wr_id: CompletionKind::Recv.wr_id(u64::from(slot)),
            next: std::ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad: *mut sys::ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: the QP is alive; `wr` and `sge` live across the call (the library copies
        // them into the queue); the slot lies inside the registered message region.
        let rc = unsafe { sys::ibv_post_recv(self.qp.qp.as_ptr(), &mut wr, &mut bad) };
        if rc != 0 {
            return Err(call_error("ibv_post_recv", rc));
        }
        Ok(())
    }

    fn post_send(
        &mut self,
        kind: CompletionKind,
        opcode: sys::ibv_wr_opcode::Type,
        local: (u64, u32, u32),
        remote: Option<(u64, u32)>,
    ) -> Result<u64, VerbsError> {
        self.next_wr += 1;
        let wr_id = kind.wr_id(self.next_wr);
        let flags = sys::ibv_send_flags::IBV_SEND_SIGNALED.0 as c_uint;
        self.post_send_raw(wr_id, flags, opcode, &[local], remote)?;
        Ok(wr_id)
    }

    fn post_send_raw(
        &mut self,
        wr_id: u64,
        send_flags: c_uint,
        opcode: sys::ibv_wr_opcode::Type,
        local: &[(u64, u32, u32)],
        remote: Option<(u64, u32)>,
    ) -> Result<(), VerbsError> {
        if self.broken {
            return Err(VerbsError::QpInError);
        }
        let mut request = SendRequest {
            wr_id,
            send_flags,
            opcode,
            local: [(0, 0, 0); MAX_SCATTER],
            pieces: local.len().min(MAX_SCATTER),
            remote,
        };
        if local.is_empty() || local.len() > self.max_scatter {
            return Err(VerbsError::TooManyPieces {
                pieces: local.len(),
                max: self.max_scatter,
            });
        }
        request.local[..local.len()].copy_from_slice(local);
        match &mut self.chain {
            Some(chain) => chain.push(request),
            None => self.post_requests(&[request])?,
        }
        Ok(())
    }

    /// From here until [`Endpoint::flush_chain`], `post_message`, `post_write_imm` and
    /// `post_read` queue their work requests instead of posting them, so that the flush hands
    /// them to the queue pair in one `ibv_post_send` (one doorbell), in the same order. The
    /// caller keeps their buffers unchanged until then, as it must until completion anyway.
    /// The blocking operations (`send`, `read`, `write`) must not be used meanwhile: they
    /// would wait for a request still in the chain.
    pub fn begin_chain(&mut self) {
        self.chain.get_or_insert_with(Vec::new);
    }

    /// Posts the work requests queued since [`Endpoint::begin_chain`] as one linked list and
    /// ends the chain; how many.
    pub fn flush_chain(&mut self) -> Result<usize, VerbsError> {
        let chain = self.chain.take().unwrap_or_default();
        if chain.is_empty() {
            return Ok(0);
        }
        if self.broken {
            return Err(VerbsError::QpInError);
        }
        self.post_requests(&chain)?;
        Ok(chain.len())
    }

    /// One `ibv_post_send` of `requests`, linked in order.
    fn post_requests(&mut self, requests: &[SendRequest]) -> Result<(), VerbsError> {
        let mut sges: Vec<sys::ibv_sge> = requests
            .iter()
            .flat_map(|r| &r.local[..r.pieces])
            .map(|&(addr, length, lkey)| sys::ibv_sge { addr, length, lkey })
            .collect();
        let mut wrs: Vec<sys::ibv_send_wr> = requests
            .iter()
            .map(|r| {
                // SAFETY: ibv_send_wr is a C struct of integers, pointers and unions of those;
                // all zeros is valid (NULL next, no immediate).
                let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
                wr.wr_id = r.wr_id;
                wr.num_sge = r.pieces as c_int;
                wr.opcode = r.opcode;
                wr.send_flags = r.send_flags;
                if let Some((remote_addr, rkey)) = r.remote {
                    wr.wr.rdma = sys::rdma_t { remote_addr, rkey };
                }
                wr
            })
            .collect();
        // Both vectors are complete: their elements do not move any more, so pointers into
        // them stay valid across the call below.
        let sge_base = sges.as_mut_ptr();
        let wr_base = wrs.as_mut_ptr();
        let mut first_sge = 0;
        for (i, wr) in wrs.iter_mut().enumerate() {
            // SAFETY: the requests' scatter entries lie in `sges` one request after the other,
            // `pieces` each, so `first_sge + pieces <= sges.len()`: the pointer stays inside
            // the vector.
            wr.sg_list = unsafe { sge_base.add(first_sge) };
            first_sge += requests[i].pieces;
            if i + 1 < requests.len() {
                // SAFETY: `i + 1 < wrs.len()`: the next request of the same vector.
                wr.next = unsafe { wr_base.add(i + 1) };
            }
        }
        let mut bad: *mut sys::ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the QP is alive; the linked requests and their scatter entries live in
        // `wrs` and `sges` across the call (the provider copies them into its queue, and
        // inline data out of the buffers); every local range was checked to lie in a
        // registered region. ibv_post_send returns the error number directly; on an error
        // the requests from `bad` on were not posted, and the endpoint is abandoned (a lost
        // peer) by every caller.
        let rc = unsafe { sys::ibv_post_send(self.qp.qp.as_ptr(), wr_base, &mut bad) };
        if rc != 0 {
            return Err(call_error("ibv_post_send", rc));
        }
        Ok(())
    }

    /// Reaps whatever completions are ready, without waiting. Receive completions are queued for
    /// [`Endpoint::recv`]; others are appended to `out`. A failed completion puts the endpoint in
    /// the error state and is returned as [`VerbsError::Completion`].
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> Result<usize, VerbsError> {
        const BATCH: usize = 16;
        // SAFETY: ibv_wc is a C struct of integers and a union of integers; all zeros is valid.
        let mut wcs: [sys::ibv_wc; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: the CQ is alive; `wcs` has room for BATCH entries, which is what we pass.
        let n = unsafe { sys::ibv_poll_cq(self.cq.cq.as_ptr(), BATCH as c_int, wcs.as_mut_ptr()) };
        if n < 0 {
            return Err(call_error("ibv_poll_cq", n));
        }
        let mut failure = None;
        let before = out.len();
        for wc in &wcs[..n as usize] {
            let kind = CompletionKind::from_wr_id(wc.wr_id).unwrap_or(CompletionKind::Send);
            if wc.status != sys::ibv_wc_status::IBV_WC_SUCCESS {
                self.broken = true;
                if failure.is_none() {
                    // SAFETY: ibv_wc_status_str returns a static NUL-terminated string for any
                    // status value.
                    let text =
                        unsafe { std::ffi::CStr::from_ptr(sys::ibv_wc_status_str(wc.status)) }
                            .to_string_lossy()
                            .into_owned();
                    failure = Some(VerbsError::Completion {
                        op: kind,
                        status: wc.status,
                        status_text: text,
                        vendor_err: wc.vendor_err,
                    });
                }
                continue;
            }
            if kind == CompletionKind::Recv {
                let written = wc.opcode == sys::ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM;
                self.received
                    .push_back(((wc.wr_id & 0xffff_ffff) as u32, wc.byte_len, written));
            } else {
                out.push(Completion {
                    kind,
                    wr_id: wc.wr_id,
                    bytes: wc.byte_len,
                });
            }
        }
        match failure {
            Some(err) => Err(err),
            None => Ok(out.len() - before),
        }
    }

    /// Polls until `done` says so or the deadline passes: spins briefly (completions under load
    /// arrive within microseconds), then sleeps between polls.
    fn wait(
        &mut self,
        op: CompletionKind,
        mut done: impl FnMut(&mut Self, &[Completion]) -> bool,
    ) -> Result<(), VerbsError> {
        let start = Instant::now();
        let mut spins = 0u32;
        let mut seen = Vec::new();
        loop {
            seen.clear();
            self.poll(&mut seen)?;
            if done(self, &seen) {
                return Ok(());
            }
            if start.elapsed() > self.config.timeout {
                return Err(VerbsError::Timeout {
                    op,
                    after: self.config.timeout,
                });
            }
            spins += 1;
            if spins < 256 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    fn wait_for(&mut self, op: CompletionKind, wr_id: u64) -> Result<(), VerbsError> {
        self.wait(op, |_, seen| seen.iter().any(|c| c.wr_id == wr_id))
    }

    fn rdma(
        &mut self,
        kind: CompletionKind,
        opcode: sys::ibv_wr_opcode::Type,
        remote: RemoteRegion,
        local_offset: usize,
        remote_offset: u64,
        len: usize,
    ) -> Result<(), VerbsError> {
        let what = if kind == CompletionKind::Read {
            "RDMA READ into"
        } else {
            "RDMA WRITE from"
        };
        let (local, remote) = self.one_sided(what, remote, local_offset, remote_offset, len)?;
        let wr_id = self.post_send(kind, opcode, local, Some(remote))?;
        self.wait_for(kind, wr_id)
    }

    fn connected_peer(&self) -> Result<RemoteRegion, VerbsError> {
        self.peer_region()
            .ok_or_else(|| VerbsError::BadPeerInfo("the endpoint is not connected".into()))
    }

    /// RDMA WRITE of `len` bytes at `local_offset` of the local region to `remote_offset` of the
    /// peer's, waiting for its completion (the peer's NIC has placed the data).
    pub fn write(
        &mut self,
        local_offset: usize,
        remote_offset: u64,
        len: usize,
    ) -> Result<(), VerbsError> {
        let remote = self.connected_peer()?;
        self.write_to(remote, local_offset, remote_offset, len)
    }

    /// RDMA WRITE to any region of the peer (`remote` as the peer published it).
    pub fn write_to(
        &mut self,
        remote: RemoteRegion,
        local_offset: usize,
        remote_offset: u64,
        len: usize,
    ) -> Result<(), VerbsError> {
        self.rdma(
            CompletionKind::Write,
            sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE,
            remote,
            local_offset,
            remote_offset,
            len,
        )
    }

    /// RDMA READ of `len` bytes at `remote_offset` of the peer's region into `local_offset` of the
    /// local one, waiting for its completion. The peer's CPU takes no part.
    pub fn read(
        &mut self,
        local_offset: usize,
        remote_offset: u64,
        len: usize,
    ) -> Result<(), VerbsError> {
        let remote = self.connected_peer()?;
        self.read_from(remote, local_offset, remote_offset, len)
    }

    /// RDMA READ from any region of the peer.
    pub fn read_from(
        &mut self,
        remote: RemoteRegion,
        local_offset: usize,
        remote_offset: u64,
        len: usize,
    ) -> Result<(), VerbsError> {
        self.rdma(
            CompletionKind::Read,
            sys::ibv_wr_opcode::IBV_WR_RDMA_READ,
            remote,
            local_offset,
            remote_offset,
            len,
        )
    }

    /// Sends one message (at most `message_bytes`) into one of the peer's posted receives,
    /// waiting for its completion (the peer's NIC acknowledged it).
    pub fn send(&mut self, message: &[u8]) -> Result<(), VerbsError> {
        let size = self.config.message_bytes;
        if message.len() > size {
            return Err(VerbsError::MessageTooLarge {
                len: message.len(),
                max: size,
            });
        }
        let slot = self.config.receive_slots as usize * size;
        self.messages.copy_in(slot, message)?;
        let local = (
            self.messages.addr() + slot as u64,
            message.len() as u32,
            self.messages.lkey(),
        );
        let wr_id = self.post_send(
            CompletionKind::Send,
            sys::ibv_wr_opcode::IBV_WR_SEND,
            local,
            None,
        )?;
        self.wait_for(CompletionKind::Send, wr_id)
    }

    /// The next received message, waiting up to the configured timeout. Its receive is posted
    /// again before this returns, so the peer always finds `receive_slots` receives.
    pub fn recv(&mut self) -> Result<Vec<u8>, VerbsError> {
        if self.broken {
            return Err(VerbsError::QpInError);
        }
        if self.received.is_empty() {
            self.wait(CompletionKind::Recv, |this, _| !this.received.is_empty())?;
        }
        let Some((slot, bytes, written)) = self.received.pop_front() else {
            return Err(VerbsError::Timeout {
                op: CompletionKind::Recv,
                after: self.config.timeout,
            });
        };
        if written {
            self.post_recv(slot)?;
            return Err(VerbsError::UnexpectedWrite { bytes });
        }
        let size = self.config.message_bytes;
        let mut message = vec![0u8; (bytes as usize).min(size)];
        self.messages.copy_out(slot as usize * size, &mut message)?;
        self.post_recv(slot)?;
        Ok(message)
    }

    /// Inline bytes the queue pair accepts (0: no inline sends).
    pub fn max_inline(&self) -> u32 {
        self.max_inline
    }

    /// Bytes of one message slot.
    pub fn message_bytes(&self) -> usize {
        self.config.message_bytes
    }

    /// Whether a failed completion put the queue pair in the error state.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The completion channel's descriptor (readable after [`Endpoint::arm`] once a completion
    /// arrives), when the endpoint was created with one.
    pub fn channel_fd(&self) -> Option<c_int> {
        self.cq.channel.as_ref().map(|c| c.fd())
    }

    /// Asks for one channel event at the next completion (`ibv_req_notify_cq`). Poll the queue
    /// once more after arming: a completion that arrived just before is not signalled.
    pub fn arm(&mut self) -> Result<(), VerbsError> {
        // SAFETY: the CQ is alive; any completion (not only solicited ones).
        let rc = unsafe { sys::ibv_req_notify_cq(self.cq.cq.as_ptr(), 0) };
        if rc != 0 {
            return Err(call_error("ibv_req_notify_cq", rc));
        }
        Ok(())
    }

    /// Takes and acknowledges every pending channel event without blocking; returns how many.
    pub fn take_channel_events(&mut self) -> Result<u32, VerbsError> {
        let Some(channel) = self.cq.channel.clone() else {
            return Ok(0);
        };
        let mut taken = 0;
        loop {
            let mut cq: *mut sys::ibv_cq = std::ptr::null_mut();
            let mut context: *mut std::ffi::c_void = std::ptr::null_mut();
            // SAFETY: the channel is alive and non-blocking; both out-pointers are live locals.
            let rc =
                unsafe { sys::ibv_get_cq_event(channel.channel.as_ptr(), &mut cq, &mut context) };
            if rc != 0 {
                let err = std::io::Error::last_os_error();
                return match err.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(taken),
                    Some(errno) => Err(VerbsError::Call {
                        call: "ibv_get_cq_event",
                        errno,
                    }),
                    None => Ok(taken),
                };
            }
            // SAFETY: the event names our CQ (the only one on this channel); acknowledging it
            // at once keeps ibv_destroy_cq from waiting on it.
            unsafe { sys::ibv_ack_cq_events(cq, 1) };
            taken += 1;
        }
    }

    /// Posts one SEND of `message` from send slot `slot` without waiting. Messages up to
    /// [`Endpoint::max_inline`] bytes go inline. Only a `signalled` send produces a completion
    /// (with `wr_id` from `tag`); on an RC queue pair, its completion means every earlier send
    /// completed too, so their slots are free again.
    pub fn post_message(
        &mut self,
        slot: u32,
        message: &[u8],
        signalled: bool,
        tag: u64,
    ) -> Result<u64, VerbsError> {
        let size = self.config.message_bytes;
        if message.len() > size {
            return Err(VerbsError::MessageTooLarge {
                len: message.len(),
                max: size,
            });
        }
        if slot >= self.config.send_slots.max(1) {
            return Err(VerbsError::OutOfBounds {
                what: "send slot",
                offset: u64::from(slot),
                len: 1,
                size: u64::from(self.config.send_slots.max(1)),
            });
        }
        let offset = (self.config.receive_slots as usize + slot as usize) * size;
        let mut flags = 0;
        if signalled {
            flags |= sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
        }
        if !message.is_empty() && message.len() <= self.max_inline as usize {
            flags |= sys::ibv_send_flags::IBV_SEND_INLINE.0;
        }
        self.messages.copy_in(offset, message)?;
        let local = (
            self.messages.addr() + offset as u64,
            message.len() as u32,
            self.messages.lkey(),
        );
        let wr_id = CompletionKind::Send.wr_id(tag);
        self.post_send_raw(
            wr_id,
            flags as c_uint,
            sys::ibv_wr_opcode::IBV_WR_SEND,
            &[local],
            None,
        )?;
        Ok(wr_id)
    }

    /// The next received message if one has completed (see [`Endpoint::poll`]), without
    /// waiting. Its receive is posted again before this returns.
    pub fn try_recv(&mut self) -> Result<Option<Incoming>, VerbsError> {
        if self.broken {
            return Err(VerbsError::QpInError);
        }
        let Some((slot, bytes, written)) = self.received.pop_front() else {
            return Ok(None);
        };
        if written {
            self.post_recv(slot)?;
            return Ok(Some(Incoming::Written { bytes }));
        }
        let size = self.config.message_bytes;
        let mut message = vec![0u8; (bytes as usize).min(size)];
        self.messages.copy_out(slot as usize * size, &mut message)?;
        self.post_recv(slot)?;
        Ok(Some(Incoming::Message(message)))
    }

    /// Receives completed and not yet taken.
    pub fn received_len(&self) -> usize {
        self.received.len()
    }
}
