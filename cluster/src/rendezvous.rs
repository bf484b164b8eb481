//! Start-up rendezvous: every rank learns every rank's data address, through rank 0.
//!
//! Rank 0 listens on the coordinator port; every other rank connects (retrying until the
//! deadline, since rank 0 may start last), sends one hello and waits for one reply: the table
//! of all data addresses, or a refusal with its reason. A rank advertises the local IP of its
//! socket connected to the coordinator (the address its peers can reach it at, even on a
//! multi-homed host or in a network namespace) with the port of its data listener, unless that
//! listener is bound to a specific IP, which then wins.
//!
//! Rank 0 refuses, logs (tracing warn) and keeps waiting past: garbage and truncated input, a
//! wrong token (a stray process of another job), another protocol or software version, a rank
//! out of range or already taken. It fails at once, telling every rank that joined, when a peer
//! with the right token disagrees on the world size: the job itself is misconfigured (e.g.
//! `srun` started several one-process jobs instead of one job of several processes).
//!
//! Invariants: blocking `std::net`, used once at start-up; every wait is bounded by the caller's
//! deadline (and a hello by `HELLO_TIMEOUT_MS` on top, so a silent peer cannot stall rank 0 for
//! long); every message is length-prefixed and bounded; decoding never panics and rejects
//! trailing bytes; the token is compared in constant time and never logged.
//!
//! Wire format, integers big-endian. Frame: `u32 length`, then the body. Body: `b"DVMR"`,
//! `u16 protocol version`, `u8 kind`, then by kind:
//! - 1 hello: `u8 len` + software version, `u16 len` + token, `u32 rank`, `u32 world`, address;
//! - 2 table: `u32 world`, then `world` addresses, in rank order;
//! - 3 refused: `u16 len` + reason (UTF-8).
//!
//! Address: `u8 family` (4 or 6), 4 or 16 address bytes, `u16 port`.

use crate::launch::{Launch, MAX_TOKEN_BYTES, MAX_WORLD};
use dvm_transport::verbs::Chosen;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};
use thiserror::Error;
use tracing::{info, warn};

const MAGIC: &[u8; 4] = b"DVMR";
/// Also versions the cluster messages (`msg`): ranks of different versions never mesh.
pub const PROTOCOL_VERSION: u16 = 5;
/// Sent in the hello so that ranks running different builds are refused by name.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");

const KIND_HELLO: u8 = 1;
const KIND_TABLE: u8 = 2;
const KIND_REFUSED: u8 = 3;

const MAX_VERSION_BYTES: usize = 64;
/// Longest host name and transport reason in a hello's preflight.
const MAX_HOST_BYTES: usize = 255;
const MAX_TRANSPORT_REASON_BYTES: usize = 512;
const MAX_PROBLEM_BYTES: usize = 1024;
const MAX_REASON_BYTES: usize = 1024;
/// Largest encoded address: family, IPv6, port.
const MAX_ADDR_BYTES: usize = 1 + 16 + 2;
/// Header: magic, version, kind.
const HEADER_BYTES: usize = 4 + 2 + 1;
pub const MAX_HELLO_BYTES: usize = HEADER_BYTES
    + 1
    + MAX_VERSION_BYTES
    + 2
    + MAX_TOKEN_BYTES
    + 4
    + 4
    + MAX_ADDR_BYTES
    + 1
    + 1
    + MAX_HOST_BYTES
    + 2
    + MAX_TRANSPORT_REASON_BYTES
    + 2
    + MAX_PROBLEM_BYTES;
pub const MAX_REPLY_BYTES: usize = HEADER_BYTES + 4 + MAX_WORLD as usize * MAX_ADDR_BYTES;

/// How long rank 0 waits for the hello of a peer that connected.
pub const HELLO_TIMEOUT_MS: u64 = 1_000;
/// How long rank 0 may take to hand one rank its table.
const REPLY_TIMEOUT_MS: u64 = 5_000;
/// Refusals kept to explain a timeout.
const MAX_REFUSALS_KEPT: usize = 8;

/// Malformed bytes on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    #[error("truncated: {field} needs {needed} more bytes at offset {offset}")]
    Truncated {
        field: &'static str,
        needed: usize,
        offset: usize,
    },
    #[error("bad magic {found:02x?} (not a DVM rendezvous message)")]
    BadMagic { found: Vec<u8> },
    #[error("protocol version {found}, expected {PROTOCOL_VERSION}")]
    Version { found: u16 },
    #[error("message kind {found}, expected {expected}")]
    Kind { found: u8, expected: &'static str },
    #[error("{field} of {len} bytes exceeds {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("frame of {len} bytes exceeds {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("{extra} bytes after the end of the message")]
    Trailing { extra: usize },
    #[error("address family {found}, expected 4 or 6")]
    Family { found: u8 },
    #[error("transport {found}, expected 0 (TCP) or 1 (RDMA)")]
    Transport { found: u8 },
    #[error("{field} is not UTF-8")]
    NotUtf8 { field: &'static str },
}

/// What a rank tells rank 0.
#[derive(Clone, PartialEq, Eq)]
pub struct Hello {
    pub software_version: String,
    pub token: Vec<u8>,
    pub rank: u32,
    pub world: u32,
    pub data_addr: SocketAddr,
    pub preflight: Preflight,
}

/// What a rank decided about itself before joining, which every rank must agree on: checked by
/// rank 0 before any work, so a job whose hosts differ fails at once, naming them, instead of
/// hanging in a mesh whose two ends speak different transports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preflight {
    /// The host the rank runs on (for the message).
    pub host: String,
    /// The transport it will use, and why (`dvm_transport::verbs::choose`'s reason).
    pub transport: Chosen,
    pub transport_reason: String,
    /// What this rank found wrong with itself that makes the job impossible (e.g. a
    /// locked-memory limit below what RDMA registration needs), in words that say what to
    /// change; empty when nothing.
    pub problem: String,
}

impl Preflight {
    /// A rank that uses TCP (tests; callers that never consider RDMA).
    pub fn tcp() -> Preflight {
        Preflight {
            host: local_host_name(),
            transport: Chosen::Tcp,
            transport_reason: String::new(),
            problem: String::new(),
        }
    }
}

/// This host's name, as the kernel has it (`/proc/sys/kernel/hostname`), or "?".
pub fn local_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "?".to_string())
}

fn transport_name(transport: Chosen) -> &'static str {
    match transport {
        Chosen::Tcp => "TCP",
        Chosen::Rdma => "RDMA",
    }
}

impl fmt::Debug for Hello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hello")
            .field("software_version", &self.software_version)
            .field("token", &format_args!("<{} bytes>", self.token.len()))
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("data_addr", &self.data_addr)
            .field("preflight", &self.preflight)
            .finish()
    }
}

/// What rank 0 answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Table(Vec<SocketAddr>),
    Refused(String),
}

#[derive(Debug, Error)]
pub enum RendezvousError {
    #[error("the coordinator address {coordinator} does not resolve: {why}")]
    Resolve { coordinator: String, why: String },
    #[error("rank 0 cannot listen on {addr} (the coordinator address {coordinator}): {source}; set DVM_COORD=host:port on every rank to choose another")]
    Bind {
        addr: SocketAddr,
        coordinator: String,
        #[source]
        source: io::Error,
    },
    #[error("rank {rank} could not reach the coordinator {coordinator} within {waited_ms} ms (last error: {last_error}); is rank 0 running, and is the address right?")]
    Unreachable {
        rank: u32,
        coordinator: String,
        waited_ms: u64,
        last_error: String,
    },
    #[error("the coordinator {coordinator} took rank {rank}'s hello but never answered within {waited_ms} ms (are all {world} ranks started?)")]
    NoAnswer {
        rank: u32,
        world: u32,
        coordinator: String,
        waited_ms: u64,
    },
    #[error("the coordinator {coordinator} refused rank {rank}: {reason}")]
    Refused {
        rank: u32,
        coordinator: String,
        reason: String,
    },
    #[error("rank {rank} lost the coordinator {coordinator}: {source}")]
    Lost {
        rank: u32,
        coordinator: String,
        #[source]
        source: io::Error,
    },
    #[error("the coordinator {coordinator} sent a bad reply: {source}")]
    BadReply {
        coordinator: String,
        #[source]
        source: WireError,
    },
    #[error("the coordinator {coordinator} sent a table of {got} addresses to a job of {world}")]
    TableSize {
        coordinator: String,
        got: usize,
        world: u32,
    },
    #[error("rank 0 expects a world of {expected} but a peer at {peer} says {said}")]
    WorldMismatch {
        expected: u32,
        peer: SocketAddr,
        said: u32,
    },
    #[error("rank {rank} on host {host} cannot take part: {problem}")]
    Preflight {
        rank: u32,
        host: String,
        problem: String,
    },
    #[error("rank {rank} on host {host} would use {} ({reason}), but rank 0 on host {host0} uses {} ({reason0}): every node of a job uses one transport; give every rank --transport tcp, or make RDMA usable on {host}", transport_name(*.transport), transport_name(*.transport0))]
    TransportMismatch {
        rank: u32,
        host: String,
        transport: Chosen,
        reason: String,
        host0: String,
        transport0: Chosen,
        reason0: String,
    },
    #[error("rank 0 waited {waited_ms} ms but {} never joined{}", list_ranks(.missing), list_refusals(.refused))]
    Timeout {
        waited_ms: u64,
        missing: Vec<u32>,
        refused: Vec<String>,
    },
    #[error("rank 0 could not send the table to rank {rank} at {peer}: {source}")]
    SendTable {
        rank: u32,
        peer: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("rank {rank}'s hello is invalid: {source}")]
    BadHello {
        rank: u32,
        #[source]
        source: WireError,
    },
}

fn list_ranks(missing: &[u32]) -> String {
    const SHOWN: usize = 16;
    let shown: Vec<String> = missing.iter().take(SHOWN).map(u32::to_string).collect();
    let more = missing.len().saturating_sub(SHOWN);
    let noun = if missing.len() == 1 { "rank" } else { "ranks" };
    if more > 0 {
        format!("{noun} {} and {more} more", shown.join(", "))
    } else {
        format!("{noun} {}", shown.join(", "))
    }
}

fn list_refusals(refused: &[String]) -> String {
    if refused.is_empty() {
        String::new()
    } else {
        format!("; refused meanwhile: {}", refused.join("; "))
    }
}

// ---- encoding ----

fn header(kind: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    out.push(kind);
    out
}

fn put_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

/// Encodes a hello body. Fields over their limits are an error, not truncated.
pub fn encode_hello(hello: &Hello) -> Result<Vec<u8>, WireError> {
    let version = hello.software_version.as_bytes();
    let version_len = u8::try_from(version.len())
        .ok()
        .filter(|l| usize::from(*l) <= MAX_VERSION_BYTES)
        .ok_or(WireError::TooLong {
            field: "software version",
            len: version.len(),
            max: MAX_VERSION_BYTES,
        })?;
    let token_len = u16::try_from(hello.token.len())
        .ok()
        .filter(|l| usize::from(*l) <= MAX_TOKEN_BYTES)
        .ok_or(WireError::TooLong {
            field: "token",
            len: hello.token.len(),
            max: MAX_TOKEN_BYTES,
        })?;
    let mut out = header(KIND_HELLO);
    out.push(version_len);
    out.extend_from_slice(version);
    out.extend_from_slice(&token_len.to_be_bytes());
    out.extend_from_slice(&hello.token);
    out.extend_from_slice(&hello.rank.to_be_bytes());
    out.extend_from_slice(&hello.world.to_be_bytes());
    put_addr(&mut out, hello.data_addr);
    let pre = &hello.preflight;
    out.push(match pre.transport {
        Chosen::Tcp => 0,
        Chosen::Rdma => 1,
    });
    // Words for a person: shortened rather than refused.
    let host = shortened(&pre.host, MAX_HOST_BYTES);
    out.push(host.len() as u8);
    out.extend_from_slice(host.as_bytes());
    let reason = shortened(&pre.transport_reason, MAX_TRANSPORT_REASON_BYTES);
    out.extend_from_slice(&(reason.len() as u16).to_be_bytes());
    out.extend_from_slice(reason.as_bytes());
    let problem = shortened(&pre.problem, MAX_PROBLEM_BYTES);
    out.extend_from_slice(&(problem.len() as u16).to_be_bytes());
    out.extend_from_slice(problem.as_bytes());
    Ok(out)
}

pub fn encode_reply(reply: &Reply) -> Result<Vec<u8>, WireError> {
    match reply {
        Reply::Table(addrs) => {
            let world = u32::try_from(addrs.len())
                .ok()
                .filter(|w| *w <= MAX_WORLD)
                .ok_or(WireError::TooLong {
                    field: "table",
                    len: addrs.len(),
                    max: MAX_WORLD as usize,
                })?;
            let mut out = header(KIND_TABLE);
            out.extend_from_slice(&world.to_be_bytes());
            for addr in addrs {
                put_addr(&mut out, *addr);
            }
            Ok(out)
        }
        Reply::Refused(reason) => {
            // Reasons are ours; shorten rather than fail.
            let text = shortened(reason, MAX_REASON_BYTES).as_bytes();
            let mut out = header(KIND_REFUSED);
            out.extend_from_slice(&(text.len() as u16).to_be_bytes());
            out.extend_from_slice(text);
            Ok(out)
        }
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn shortened(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or_default()
}

// ---- decoding ----

struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        let rest = self.bytes.get(self.offset..).unwrap_or_default();
        let taken = rest.get(..n).ok_or_else(|| WireError::Truncated {
            field,
            needed: n.saturating_sub(rest.len()),
            offset: self.offset,
        })?;
        self.offset += n;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn bytes_with_len(
        &mut self,
        len: usize,
        max: usize,
        field: &'static str,
    ) -> Result<&'a [u8], WireError> {
        if len > max {
            return Err(WireError::TooLong { field, len, max });
        }
        self.take(len, field)
    }

    fn text(&mut self, len: usize, max: usize, field: &'static str) -> Result<String, WireError> {
        let bytes = self.bytes_with_len(len, max, field)?;
        std::str::from_utf8(bytes)
            .map(str::to_string)
            .map_err(|_| WireError::NotUtf8 { field })
    }

    fn addr(&mut self) -> Result<SocketAddr, WireError> {
        let ip = match self.u8("address family")? {
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>("IPv4 address")?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>("IPv6 address")?)),
            found => return Err(WireError::Family { found }),
        };
        Ok(SocketAddr::new(ip, self.u16("port")?))
    }

    /// Magic and version, then the kind.
    fn header(&mut self) -> Result<u8, WireError> {
        let magic = self.take(MAGIC.len(), "magic")?;
        if magic != MAGIC {
            return Err(WireError::BadMagic {
                found: magic.to_vec(),
            });
        }
        let version = self.u16("protocol version")?;
        if version != PROTOCOL_VERSION {
            return Err(WireError::Version { found: version });
        }
        self.u8("kind")
    }

    fn finish(&self) -> Result<(), WireError> {
        match self.bytes.len().saturating_sub(self.offset) {
            0 => Ok(()),
            extra => Err(WireError::Trailing { extra }),
        }
    }
}

pub fn decode_hello(bytes: &[u8]) -> Result<Hello, WireError> {
    let mut r = Reader { bytes, offset: 0 };
    let kind = r.header()?;
    if kind != KIND_HELLO {
        return Err(WireError::Kind {
            found: kind,
            expected: "hello",
        });
    }
    let version_len = usize::from(r.u8("software version length")?);
    let version = r.bytes_with_len(version_len, MAX_VERSION_BYTES, "software version")?;
    let software_version = std::str::from_utf8(version)
        .map_err(|_| WireError::NotUtf8 {
            field: "software version",
        })?
        .to_string();
    let token_len = usize::from(r.u16("token length")?);
    let token = r
        .bytes_with_len(token_len, MAX_TOKEN_BYTES, "token")?
        .to_vec();
    let rank = r.u32("rank")?;
    let world = r.u32("world")?;
    let data_addr = r.addr()?;
    let transport = match r.u8("transport")? {
        0 => Chosen::Tcp,
        1 => Chosen::Rdma,
        found => return Err(WireError::Transport { found }),
    };
    let host_len = usize::from(r.u8("host name length")?);
    let host = r.text(host_len, MAX_HOST_BYTES, "host name")?;
    let reason_len = usize::from(r.u16("transport reason length")?);
    let transport_reason = r.text(reason_len, MAX_TRANSPORT_REASON_BYTES, "transport reason")?;
    let problem_len = usize::from(r.u16("problem length")?);
    let problem = r.text(problem_len, MAX_PROBLEM_BYTES, "problem")?;
    r.finish()?;
    Ok(Hello {
        software_version,
        token,
        rank,
        world,
        data_addr,
        preflight: Preflight {
            host,
            transport,
            transport_reason,
            problem,
        },
    })
}

pub fn decode_reply(bytes: &[u8]) -> Result<Reply, WireError> {
    let mut r = Reader { bytes, offset: 0 };
    let reply = match r.header()? {
        KIND_TABLE => {
            let world = r.u32("table size")?;
            if world > MAX_WORLD {
                return Err(WireError::TooLong {
                    field: "table",
                    len: world as usize,
                    max: MAX_WORLD as usize,
                });
            }
            let mut addrs = Vec::new();
            for _ in 0..world {
                addrs.push(r.addr()?);
            }
            Reply::Table(addrs)
        }
        KIND_REFUSED => {
            let len = usize::from(r.u16("reason length")?);
            Reply::Refused(r.text(len, MAX_REASON_BYTES, "reason")?)
        }
        found => {
            return Err(WireError::Kind {
                found,
                expected: "table or refusal",
            })
        }
    };
    r.finish()?;
    Ok(reply)
}

// ---- framing ----

/// Why a frame could not be read: the connection, or what came over it.
#[derive(Debug)]
enum FrameError {
    Io(io::Error),
    Wire(WireError),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Io(e) => write!(f, "{e}"),
            FrameError::Wire(e) => write!(f, "{e}"),
        }
    }
}

fn read_frame(stream: &mut TcpStream, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).map_err(FrameError::Io)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::Wire(WireError::FrameTooLarge { len, max }));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).map_err(FrameError::Io)?;
    Ok(body)
}

fn write_frame(stream: &mut TcpStream, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame over 4 GiB"))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(body);
    stream.write_all(&frame)?;
    stream.flush()
}

// ---- the rendezvous ----

/// Equal without an early exit, so the time taken does not tell how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// A socket timeout of at least 1 ms (zero means "no timeout" to the OS).
fn timeout(d: Duration) -> Option<Duration> {
    Some(d.max(Duration::from_millis(1)))
}

fn elapsed_ms(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The address to advertise for a data listener at `listen`, given the local IP of a socket
/// that reaches the coordinator (or is reached by a peer).
fn advertised(listen: SocketAddr, local_ip: IpAddr) -> SocketAddr {
    if listen.ip().is_unspecified() {
        SocketAddr::new(local_ip, listen.port())
    } else {
        listen
    }
}

fn resolve(launch: &Launch) -> Result<Vec<SocketAddr>, RendezvousError> {
    let coordinator = launch.coordinator.to_string();
    let addrs: Vec<SocketAddr> = (launch.coordinator.host.as_str(), launch.coordinator.port)
        .to_socket_addrs()
        .map_err(|e| RendezvousError::Resolve {
            coordinator: coordinator.clone(),
            why: e.to_string(),
        })?
        .collect();
    if addrs.is_empty() {
        return Err(RendezvousError::Resolve {
            coordinator,
            why: "no addresses".to_string(),
        });
    }
    Ok(addrs)
}

/// Exchanges data addresses with every rank of `launch`'s job. `my_listen` is this rank's data
/// listener; the result holds every rank's data address, indexed by rank. Gives up at
/// `deadline_ms` from now.
pub fn rendezvous(
    launch: &Launch,
    my_listen: SocketAddr,
    deadline_ms: u64,
) -> Result<Vec<SocketAddr>, RendezvousError> {
    rendezvous_on(launch, my_listen, deadline_ms, None, &Preflight::tcp())
}

/// [`rendezvous`], with this rank's `preflight` (rank 0 refuses the job if the ranks disagree)
/// and with rank 0 accepting on `coordinator_socket` when given: a socket the launcher bound to
/// the coordinator address before starting the other ranks. Holding it from then on closes the
/// window in which another process could take a port that was chosen, released and bound
/// again (seen in CI with many jobs on one host).
pub fn rendezvous_on(
    launch: &Launch,
    my_listen: SocketAddr,
    deadline_ms: u64,
    coordinator_socket: Option<&TcpListener>,
    preflight: &Preflight,
) -> Result<Vec<SocketAddr>, RendezvousError> {
    let deadline = Instant::now() + Duration::from_millis(deadline_ms);
    if launch.world <= 1 {
        let ip = if my_listen.ip().is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            my_listen.ip()
        };
        return Ok(vec![SocketAddr::new(ip, my_listen.port())]);
    }
    if launch.rank == 0 {
        coordinate(launch, my_listen, deadline, coordinator_socket, preflight)
    } else {
        join(launch, my_listen, deadline, preflight)
    }
}

/// A rank other than 0: reach the coordinator, say hello, wait for the table.
fn join(
    launch: &Launch,
    my_listen: SocketAddr,
    deadline: Instant,
    preflight: &Preflight,
) -> Result<Vec<SocketAddr>, RendezvousError> {
    let start = Instant::now();
    let coordinator = launch.coordinator.to_string();
    let mut last_error = String::from("no attempt finished");
    let mut backoff = Duration::from_millis(20);
    let mut stream = loop {
        // Resolved on every attempt: the name may only become resolvable once rank 0's host is up.
        match resolve(launch) {
            Ok(addrs) => {
                let mut connected = None;
                for addr in addrs {
                    let left = remaining(deadline);
                    if left.is_zero() {
                        break;
                    }
                    match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(1))) {
                        Ok(s) => {
                            connected = Some(s);
                            break;
                        }
                        Err(e) => last_error = format!("{addr}: {e}"),
                    }
                }
                if let Some(s) = connected {
                    break s;
                }
            }
            Err(e) => last_error = e.to_string(),
        }
        let left = remaining(deadline);
        if left.is_zero() {
            return Err(RendezvousError::Unreachable {
                rank: launch.rank,
                coordinator,
                waited_ms: elapsed_ms(start),
                last_error,
            });
        }
        std::thread::sleep(backoff.min(left));
        backoff = (backoff * 2).min(Duration::from_millis(500));
    };
    let lost = |source| RendezvousError::Lost {
        rank: launch.rank,
        coordinator: coordinator.clone(),
        source,
    };
    let local_ip = stream.local_addr().map_err(lost)?.ip();
    let hello = Hello {
        software_version: SOFTWARE_VERSION.to_string(),
        token: launch.token.clone(),
        rank: launch.rank,
        world: launch.world,
        data_addr: advertised(my_listen, local_ip),
        preflight: preflight.clone(),
    };
    let body = encode_hello(&hello).map_err(|source| RendezvousError::BadHello {
        rank: launch.rank,
        source,
    })?;
    stream
        .set_write_timeout(timeout(remaining(deadline)))
        .map_err(lost)?;
    write_frame(&mut stream, &body).map_err(lost)?;
    stream
        .set_read_timeout(timeout(remaining(deadline)))
        .map_err(lost)?;
    let body = match read_frame(&mut stream, MAX_REPLY_BYTES) {
        Ok(body) => body,
        Err(FrameError::Io(e))
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Err(RendezvousError::NoAnswer {
                rank: launch.rank,
                world: launch.world,
                coordinator,
                waited_ms: elapsed_ms(start),
            })
        }
        Err(FrameError::Io(e)) => return Err(lost(e)),
        Err(FrameError::Wire(source)) => {
            return Err(RendezvousError::BadReply {
                coordinator,
                source,
            })
        }
    };
    match decode_reply(&body) {
        Ok(Reply::Table(table)) => {
            if table.len() != launch.world as usize {
                return Err(RendezvousError::TableSize {
                    coordinator,
                    got: table.len(),
                    world: launch.world,
                });
            }
            Ok(table)
        }
        Ok(Reply::Refused(reason)) => Err(RendezvousError::Refused {
            rank: launch.rank,
            coordinator,
            reason,
        }),
        Err(source) => Err(RendezvousError::BadReply {
            coordinator,
            source,
        }),
    }
}

/// A rank that said a valid hello and waits for the table.
struct Joined {
    stream: TcpStream,
    peer: SocketAddr,
    data_addr: SocketAddr,
    /// Local IP of rank 0's end of this connection: where this peer reached rank 0.
    local_ip: IpAddr,
}

/// What became of one connection to rank 0.
enum Outcome {
    /// Nothing worth answering (the peer went away or sent no complete hello); logged.
    Ignored,
    Accepted(u32, Box<Joined>),
    /// Refuse this peer, keep waiting for the legitimate ones.
    Refused(TcpStream, String),
    /// Refuse and give up: the job is misconfigured.
    Fatal(TcpStream, Box<RendezvousError>, String),
}

/// Why a hello with a readable body is not accepted.
enum Rejection {
    Refuse(String),
    Fatal(Box<RendezvousError>, String),
}

/// Rank 0: listen, collect a hello from every other rank, send everyone the table.
fn coordinate(
    launch: &Launch,
    my_listen: SocketAddr,
    deadline: Instant,
    bound: Option<&TcpListener>,
    mine: &Preflight,
) -> Result<Vec<SocketAddr>, RendezvousError> {
    let start = Instant::now();
    let coordinator = launch.coordinator.to_string();
    let resolved = resolve(launch)?;
    // Bind the coordinator address itself when it is loopback (tests, single-host jobs);
    // otherwise every interface, since the name may resolve differently here (e.g. Debian maps
    // its own host name to 127.0.1.1) than on the other hosts.
    let bind_addr = match resolved.iter().find(|a| a.ip().is_loopback()) {
        Some(a) => *a,
        None => match resolved.first() {
            Some(SocketAddr::V6(_)) => {
                SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), launch.coordinator.port)
            }
            _ => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), launch.coordinator.port),
        },
    };
    let bind_err = |source| RendezvousError::Bind {
        addr: bind_addr,
        coordinator: coordinator.clone(),
        source,
    };
    let own;
    let listener = match bound {
        Some(listener) => listener,
        None => {
            own = TcpListener::bind(bind_addr).map_err(bind_err)?;
            &own
        }
    };
    // Non-blocking accept, so the deadline is checked between connections.
    listener.set_nonblocking(true).map_err(bind_err)?;
    let world = launch.world as usize;
    let mut joined: Vec<Option<Joined>> = (0..world).map(|_| None).collect();
    let mut count = 1; // rank 0 itself
    let mut refused: Vec<String> = Vec::new();
    while count < world {
        let left = remaining(deadline);
        if left.is_zero() {
            let missing: Vec<u32> = (1..launch.world)
                .filter(|r| joined.get(*r as usize).is_some_and(Option::is_none))
                .collect();
            let reason = format!("rank 0 gave up waiting for {}", list_ranks(&missing));
            abort_all(&mut joined, &reason);
            return Err(RendezvousError::Timeout {
                waited_ms: elapsed_ms(start),
                missing,
                refused,
            });
        }
        let (stream, peer) = match listener.accept() {
            Ok(conn) => conn,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(left.min(Duration::from_millis(5)));
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of file descriptors, a connection reset before accept and the like: wait
                // a little, as a server would; the deadline bounds the retries.
                warn!(error = %e, "rendezvous accept failed");
                std::thread::sleep(left.min(Duration::from_millis(50)));
                continue;
            }
        };
        match examine(launch, mine, &joined, stream, peer, deadline) {
            Outcome::Ignored => {}
            Outcome::Accepted(rank, j) => {
                if let Some(slot) = joined.get_mut(rank as usize) {
                    *slot = Some(*j);
                    count += 1;
                }
            }
            Outcome::Refused(mut stream, reason) => {
                warn!(%peer, %reason, "rendezvous refused a peer");
                let _ = send_reply(&mut stream, &Reply::Refused(reason.clone()));
                if refused.len() < MAX_REFUSALS_KEPT {
                    refused.push(format!("{peer}: {reason}"));
                }
            }
            Outcome::Fatal(mut stream, error, reason) => {
                warn!(%peer, %reason, "rendezvous failed");
                let _ = send_reply(&mut stream, &Reply::Refused(reason.clone()));
                abort_all(&mut joined, &format!("rank 0 gave up: {reason}"));
                return Err(*error);
            }
        }
    }
    // Rank 0's own address: where the peers reached it, as they do for theirs.
    let my_ip = joined
        .iter()
        .flatten()
        .map(|j| j.local_ip)
        .next()
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let mut table = vec![advertised(my_listen, my_ip)];
    table.extend(joined.iter().skip(1).flatten().map(|j| j.data_addr));
    let reply = Reply::Table(table.clone());
    for (rank, slot) in joined.iter_mut().enumerate() {
        if let Some(j) = slot {
            send_reply(&mut j.stream, &reply).map_err(|source| RendezvousError::SendTable {
                rank: rank as u32,
                peer: j.peer,
                source,
            })?;
        }
    }
    info!(world = launch.world, "rendezvous complete");
    Ok(table)
}

fn send_reply(stream: &mut TcpStream, reply: &Reply) -> io::Result<()> {
    let body = encode_reply(reply).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    stream.set_write_timeout(timeout(Duration::from_millis(REPLY_TIMEOUT_MS)))?;
    write_frame(stream, &body)
}

/// Tells every rank that joined that the rendezvous failed, so none waits for its deadline.
fn abort_all(joined: &mut [Option<Joined>], reason: &str) {
    for j in joined.iter_mut().flatten() {
        let _ = send_reply(&mut j.stream, &Reply::Refused(reason.to_string()));
    }
}

/// Reads and judges one peer's hello.
fn examine(
    launch: &Launch,
    mine: &Preflight,
    joined: &[Option<Joined>],
    mut stream: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
) -> Outcome {
    let hello_wait = remaining(deadline).min(Duration::from_millis(HELLO_TIMEOUT_MS));
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(timeout(hello_wait)));
    if let Err(e) = setup {
        warn!(%peer, error = %e, "rendezvous connection unusable");
        return Outcome::Ignored;
    }
    let body = match read_frame(&mut stream, MAX_HELLO_BYTES) {
        Ok(body) => body,
        Err(FrameError::Wire(e)) => return Outcome::Refused(stream, format!("bad hello: {e}")),
        Err(FrameError::Io(e)) => {
            warn!(%peer, error = %e, "rendezvous peer sent no complete hello");
            return Outcome::Ignored;
        }
    };
    let hello = match decode_hello(&body) {
        Ok(h) => h,
        Err(e) => return Outcome::Refused(stream, format!("bad hello: {e}")),
    };
    match judge(launch, mine, joined, &hello, peer) {
        Err(Rejection::Refuse(reason)) => Outcome::Refused(stream, reason),
        Err(Rejection::Fatal(error, reason)) => Outcome::Fatal(stream, error, reason),
        Ok(()) => match stream.local_addr() {
            Ok(local) => Outcome::Accepted(
                hello.rank,
                Box::new(Joined {
                    stream,
                    peer,
                    data_addr: hello.data_addr,
                    local_ip: local.ip(),
                }),
            ),
            Err(e) => {
                warn!(%peer, error = %e, "rendezvous connection unusable");
                Outcome::Ignored
            }
        },
    }
}

/// Whether a well-formed hello may join.
fn judge(
    launch: &Launch,
    mine: &Preflight,
    joined: &[Option<Joined>],
    hello: &Hello,
    peer: SocketAddr,
) -> Result<(), Rejection> {
    // The token first: nothing else a stranger says is worth acting on.
    if !constant_time_eq(&hello.token, &launch.token) {
        return Err(Rejection::Refuse(format!(
            "wrong job token from a peer at {peer} (a process of another job?)"
        )));
    }
    if hello.software_version != SOFTWARE_VERSION {
        return Err(Rejection::Refuse(format!(
            "rank {} at {peer} runs dvm {}, rank 0 runs {SOFTWARE_VERSION}",
            hello.rank, hello.software_version
        )));
    }
    if hello.world != launch.world {
        let error = RendezvousError::WorldMismatch {
            expected: launch.world,
            peer,
            said: hello.world,
        };
        let reason = error.to_string();
        return Err(Rejection::Fatal(Box::new(error), reason));
    }
    if hello.rank == 0 || hello.rank >= launch.world {
        return Err(Rejection::Refuse(format!(
            "a peer at {peer} says it is rank {}, not in 1..{}",
            hello.rank, launch.world
        )));
    }
    if let Some(Some(first)) = joined.get(hello.rank as usize) {
        return Err(Rejection::Refuse(format!(
            "rank {} already joined from {}; a second one came from {peer}",
            hello.rank, first.peer
        )));
    }
    // Last: a legitimate rank of this job that cannot take part, or whose host differs, is the
    // job's problem, not a stray to ignore. Rank 0's own problem is told to the first rank to
    // join, which ends the job for all.
    let theirs = &hello.preflight;
    for (rank, pre) in [(0, mine), (hello.rank, theirs)] {
        if !pre.problem.is_empty() {
            let error = RendezvousError::Preflight {
                rank,
                host: pre.host.clone(),
                problem: pre.problem.clone(),
            };
            let reason = error.to_string();
            return Err(Rejection::Fatal(Box::new(error), reason));
        }
    }
    if theirs.transport != mine.transport {
        let error = RendezvousError::TransportMismatch {
            rank: hello.rank,
            host: theirs.host.clone(),
            transport: theirs.transport,
            reason: theirs.transport_reason.clone(),
            host0: mine.host.clone(),
            transport0: mine.transport,
            reason0: mine.transport_reason.clone(),
        };
        let reason = error.to_string();
        return Err(Rejection::Fatal(Box::new(error), reason));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::{Endpoint, LaunchSource, TokenSource};
    use proptest::prelude::*;
    use std::thread::JoinHandle;

    const DEADLINE_MS: u64 = 10_000;

    /// A port free right now on 127.0.0.1 (the OS picks it; tiny race with other tests).
    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind an ephemeral loopback port")
            .port()
    }

    fn launch(port: u16, rank: u32, world: u32, token: &[u8]) -> Launch {
        Launch {
            rank,
            world,
            local_rank: rank,
            local_size: world,
            source: LaunchSource::Local,
            coordinator: Endpoint {
                host: "127.0.0.1".to_string(),
                port,
            },
            token: token.to_vec(),
            token_source: TokenSource::Env,
        }
    }

    fn data_addr(rank: u32) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 30_000 + rank as u16))
    }

    type Outcome = Result<Vec<SocketAddr>, RendezvousError>;

    fn spawn(l: Launch, listen: SocketAddr, deadline_ms: u64) -> JoinHandle<Outcome> {
        std::thread::spawn(move || rendezvous(&l, listen, deadline_ms))
    }

    fn spawn_rank(port: u16, rank: u32, world: u32, token: &[u8]) -> JoinHandle<Outcome> {
        spawn(
            launch(port, rank, world, token),
            data_addr(rank),
            DEADLINE_MS,
        )
    }

    fn finish(h: JoinHandle<Outcome>) -> Outcome {
        h.join().expect("rendezvous thread does not panic")
    }

    fn expected_table(world: u32) -> Vec<SocketAddr> {
        (0..world).map(data_addr).collect()
    }

    #[test]
    fn three_ranks_agree_on_the_table() {
        let port = free_port();
        // Peers first: they must retry until rank 0 listens.
        let r2 = spawn_rank(port, 2, 3, b"tok");
        let r1 = spawn_rank(port, 1, 3, b"tok");
        std::thread::sleep(Duration::from_millis(100));
        let r0 = spawn_rank(port, 0, 3, b"tok");
        let want = expected_table(3);
        for h in [r0, r1, r2] {
            assert_eq!(finish(h).expect("rendezvous succeeds"), want);
        }
    }

    #[test]
    fn rank_0_accepts_on_a_socket_its_launcher_holds() {
        // The launcher's socket holds the port, so binding it again fails...
        let held = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = held.local_addr().expect("addr").port();
        let again = rendezvous(&launch(port, 0, 2, b"t"), data_addr(0), 200);
        assert!(
            matches!(again, Err(RendezvousError::Bind { .. })),
            "{again:?}"
        );
        // ...and rank 0 uses it instead; a peer's hello waits in its backlog until then.
        let r1 = spawn_rank(port, 1, 2, b"t");
        std::thread::sleep(Duration::from_millis(100));
        let r0 = rendezvous_on(
            &launch(port, 0, 2, b"t"),
            data_addr(0),
            DEADLINE_MS,
            Some(&held),
            &Preflight::tcp(),
        );
        let want = expected_table(2);
        assert_eq!(r0.expect("rank 0"), want);
        assert_eq!(finish(r1).expect("rank 1"), want);
    }

    #[test]
    fn unspecified_listen_ip_advertises_the_connected_ip() {
        let port = free_port();
        let any = |p: u16| SocketAddr::from(([0, 0, 0, 0], p));
        let r0 = spawn(launch(port, 0, 2, b"t"), any(4000), DEADLINE_MS);
        let r1 = spawn(launch(port, 1, 2, b"t"), any(4001), DEADLINE_MS);
        let want = vec![
            SocketAddr::from(([127, 0, 0, 1], 4000)),
            SocketAddr::from(([127, 0, 0, 1], 4001)),
        ];
        assert_eq!(finish(r0).expect("rank 0"), want);
        assert_eq!(finish(r1).expect("rank 1"), want);
        // A job of one needs no network.
        let alone = rendezvous(&launch(port, 0, 1, b"t"), any(4002), 0).expect("world of 1");
        assert_eq!(alone, vec![SocketAddr::from(([127, 0, 0, 1], 4002))]);
    }

    #[test]
    fn wrong_token_is_refused_while_the_right_ranks_complete() {
        let port = free_port();
        let r0 = spawn_rank(port, 0, 3, b"right");
        let stray = finish(spawn_rank(port, 1, 3, b"wrong")).expect_err("stray refused");
        match &stray {
            RendezvousError::Refused { reason, .. } => {
                assert!(reason.contains("wrong job token"), "{reason}");
            }
            other => panic!("expected a refusal, got {other}"),
        }
        let r1 = spawn_rank(port, 1, 3, b"right");
        let r2 = spawn_rank(port, 2, 3, b"right");
        let want = expected_table(3);
        for h in [r0, r1, r2] {
            assert_eq!(finish(h).expect("legitimate ranks complete"), want);
        }
    }

    #[test]
    fn duplicate_and_out_of_range_ranks_are_refused() {
        let port = free_port();
        let r0 = spawn_rank(port, 0, 3, b"t");
        let r1 = spawn_rank(port, 1, 3, b"t");
        // A second rank 1: whichever of the two rank 1s reaches rank 0 second is refused (on a
        // loaded machine the order is not ours to choose), the other completes.
        std::thread::sleep(Duration::from_millis(300));
        let dup = spawn_rank(port, 1, 3, b"t");
        let zero = finish(spawn(launch(port, 0, 3, b"t"), data_addr(0), 0));
        // A second rank 0 cannot bind the coordinator port.
        assert!(
            matches!(zero, Err(RendezvousError::Bind { .. })),
            "{zero:?}"
        );
        // Rank 2 only once one rank 1 has its refusal: were rank 2 to complete the rendezvous
        // first, rank 0 would close its listener with the duplicate still in the accept backlog,
        // and the duplicate would see a reset instead of the refusal this test checks.
        let waited = Instant::now();
        while !(r1.is_finished() || dup.is_finished()) {
            assert!(
                waited.elapsed() < Duration::from_millis(DEADLINE_MS),
                "neither rank 1 was refused"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let r2 = spawn_rank(port, 2, 3, b"t");
        let want = expected_table(3);
        let ones = [finish(r1), finish(dup)];
        let refused: Vec<String> = ones
            .iter()
            .filter_map(|outcome| outcome.as_ref().err().map(ToString::to_string))
            .collect();
        assert_eq!(refused.len(), 1, "exactly one rank 1 is refused: {ones:?}");
        assert!(
            refused[0].contains("rank 1 already joined"),
            "{}",
            refused[0]
        );
        assert!(ones
            .iter()
            .any(|outcome| outcome.as_ref().ok() == Some(&want)));
        for h in [r0, r2] {
            assert_eq!(finish(h).expect("rendezvous succeeds"), want);
        }
    }

    #[test]
    fn world_mismatch_fails_on_both_sides() {
        let port = free_port();
        let r0 = spawn_rank(port, 0, 3, b"t");
        let r1 = spawn_rank(port, 1, 3, b"t");
        std::thread::sleep(Duration::from_millis(300));
        let odd = finish(spawn_rank(port, 1, 2, b"t")).expect_err("mismatch refused");
        let e0 = finish(r0).expect_err("rank 0 fails");
        let e1 = finish(r1).expect_err("the joined rank is told");
        let odd = odd.to_string();
        assert!(
            odd.contains("rank 0 expects a world of 3 but a peer at 127.0.0.1:")
                && odd.ends_with("says 2"),
            "{odd}"
        );
        assert!(
            matches!(
                e0,
                RendezvousError::WorldMismatch {
                    expected: 3,
                    said: 2,
                    ..
                }
            ),
            "{e0}"
        );
        assert!(e1.to_string().contains("rank 0 gave up"), "{e1}");
    }

    #[test]
    fn a_missing_rank_times_out_by_name() {
        let port = free_port();
        let r0 = spawn(launch(port, 0, 3, b"t"), data_addr(0), 1_500);
        let r1 = spawn(launch(port, 1, 3, b"t"), data_addr(1), 3_000);
        let e0 = finish(r0).expect_err("rank 2 never comes");
        match &e0 {
            RendezvousError::Timeout { missing, .. } => assert_eq!(missing, &[2]),
            other => panic!("expected a timeout, got {other}"),
        }
        assert!(e0.to_string().contains("rank 2 never joined"), "{e0}");
        let e1 = finish(r1).expect_err("rank 1 is told");
        assert!(
            e1.to_string().contains("rank 0 gave up waiting for rank 2"),
            "{e1}"
        );
    }

    #[test]
    fn an_unreachable_coordinator_is_named() {
        let port = free_port();
        let started = Instant::now();
        let e = rendezvous(&launch(port, 1, 2, b"t"), data_addr(1), 400).expect_err("no rank 0");
        assert!(started.elapsed() < Duration::from_secs(5));
        let text = e.to_string();
        assert!(
            text.starts_with(&format!(
                "rank 1 could not reach the coordinator 127.0.0.1:{port} within"
            )),
            "{text}"
        );
    }

    #[test]
    fn a_silent_coordinator_is_named() {
        // Something listens on the port but never answers.
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let e = rendezvous(&launch(port, 1, 2, b"t"), data_addr(1), 500).expect_err("no answer");
        assert!(
            e.to_string().starts_with(&format!(
                "the coordinator 127.0.0.1:{port} took rank 1's hello but never answered"
            )),
            "{e}"
        );
        drop(listener);
    }

    #[test]
    fn garbage_does_not_break_the_coordinator() {
        let port = free_port();
        let r0 = spawn_rank(port, 0, 2, b"t");
        let coord = SocketAddr::from(([127, 0, 0, 1], port));
        let connect = || {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match TcpStream::connect(coord) {
                    Ok(s) => return s,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => panic!("coordinator never listened: {e}"),
                }
            }
        };
        // An HTTP request: its first 4 bytes make an absurd length.
        let mut s = connect();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let refusal = read_frame(&mut s, MAX_REPLY_BYTES).expect("a refusal comes back");
        match decode_reply(&refusal).expect("well-formed refusal") {
            Reply::Refused(reason) => assert!(reason.contains("frame of"), "{reason}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        // A truncated frame, then the peer goes away.
        let mut s = connect();
        s.write_all(&[0, 0, 0, 50, b'D', b'V']).expect("write");
        drop(s);
        // A framed body that is not a hello.
        let mut s = connect();
        write_frame(&mut s, b"DVMR\x00\x01\x01\xff").expect("write");
        // Connect and close at once.
        drop(connect());
        let r1 = spawn_rank(port, 1, 2, b"t");
        let want = expected_table(2);
        assert_eq!(finish(r0).expect("rank 0 completes"), want);
        assert_eq!(finish(r1).expect("rank 1 completes"), want);
    }

    fn sample_hello() -> Hello {
        Hello {
            software_version: SOFTWARE_VERSION.to_string(),
            token: b"secret".to_vec(),
            rank: 3,
            world: 4,
            data_addr: "[fd00::7]:9000".parse().expect("valid address"),
            preflight: Preflight {
                host: "node-7.cluster".to_string(),
                transport: Chosen::Rdma,
                transport_reason: "mlx5_0 port 1 is ACTIVE — InfiniBand".to_string(),
                problem: "locked memory".to_string(),
            },
        }
    }

    #[test]
    fn messages_round_trip_and_every_truncation_is_refused() {
        let hello = sample_hello();
        let body = encode_hello(&hello).expect("encodes");
        assert_eq!(decode_hello(&body).expect("decodes"), hello);
        for cut in 0..body.len() {
            assert!(
                matches!(
                    decode_hello(body.get(..cut).expect("prefix")),
                    Err(WireError::Truncated { .. })
                ),
                "cut at {cut}"
            );
        }
        let mut long = body.clone();
        long.push(0);
        assert_eq!(decode_hello(&long), Err(WireError::Trailing { extra: 1 }));
        let table = Reply::Table(vec![data_addr(0), "[::1]:5".parse().expect("address")]);
        let bytes = encode_reply(&table).expect("encodes");
        assert_eq!(decode_reply(&bytes).expect("decodes"), table);
        let refusal = Reply::Refused("é".repeat(600));
        let bytes = encode_reply(&refusal).expect("encodes");
        assert!(bytes.len() <= HEADER_BYTES + 2 + MAX_REASON_BYTES);
        assert!(matches!(decode_reply(&bytes), Ok(Reply::Refused(r)) if r.len() == 1024));
        let mut other = body.clone();
        if let Some(v) = other.get_mut(5) {
            *v = 9;
        }
        assert_eq!(decode_hello(&other), Err(WireError::Version { found: 9 }));
        let too_long = Hello {
            token: vec![0; MAX_TOKEN_BYTES + 1],
            ..sample_hello()
        };
        assert!(matches!(
            encode_hello(&too_long),
            Err(WireError::TooLong { field: "token", .. })
        ));
        assert!(format!("{hello:?}").contains("<6 bytes>"));
        // Words for a person are shortened on a character boundary, not refused.
        let wordy = Hello {
            preflight: Preflight {
                host: "h".repeat(300),
                transport: Chosen::Tcp,
                transport_reason: "é".repeat(400),
                problem: "x".repeat(2000),
            },
            ..sample_hello()
        };
        let back = decode_hello(&encode_hello(&wordy).expect("encodes")).expect("decodes");
        assert_eq!(back.preflight.host.len(), MAX_HOST_BYTES);
        assert_eq!(
            back.preflight.transport_reason.len(),
            MAX_TRANSPORT_REASON_BYTES
        );
        assert_eq!(back.preflight.problem.len(), MAX_PROBLEM_BYTES);
        assert!(encode_hello(&wordy).expect("encodes").len() <= MAX_HELLO_BYTES);
    }

    #[test]
    fn a_rank_that_cannot_take_part_fails_the_job_naming_it() {
        let port = free_port();
        let l0 = launch(port, 0, 3, b"t");
        let r0 = std::thread::spawn(move || {
            rendezvous_on(&l0, data_addr(0), DEADLINE_MS, None, &Preflight::tcp())
        });
        let r1 = spawn_rank(port, 1, 3, b"t");
        // Rank 1 usually joins first and is then told by the abort; on a loaded machine it may
        // come after rank 0 gave up, and then fails to join at all.
        std::thread::sleep(Duration::from_millis(200));
        let broken = Preflight {
            host: "node-2".to_string(),
            problem: "RDMA needs 96.0 MiB of locked memory".to_string(),
            ..Preflight::tcp()
        };
        let l2 = launch(port, 2, 3, b"t");
        let r2 = std::thread::spawn(move || {
            rendezvous_on(&l2, data_addr(2), DEADLINE_MS, None, &broken)
        });
        let e0 = finish(r0).expect_err("rank 0 ends the job");
        assert!(
            matches!(&e0, RendezvousError::Preflight { rank: 2, .. }),
            "{e0}"
        );
        assert!(e0.to_string().contains("node-2") && e0.to_string().contains("locked memory"));
        // Rank 2 is told why; so is rank 1 when it had joined.
        match finish(r2).expect_err("told") {
            RendezvousError::Refused { reason, .. } => {
                assert!(reason.contains("locked memory"), "{reason}")
            }
            other => panic!("expected a refusal, got {other}"),
        }
        let e1 = finish(r1).expect_err("rank 1 cannot run either");
        if let RendezvousError::Refused { reason, .. } = &e1 {
            assert!(reason.contains("locked memory"), "{reason}");
        }
    }

    #[test]
    fn ranks_that_chose_different_transports_fail_the_job_naming_both() {
        let port = free_port();
        let pre = |host: &str, transport, reason: &str| Preflight {
            host: host.to_string(),
            transport,
            transport_reason: reason.to_string(),
            problem: String::new(),
        };
        let zero = pre("ib-01", Chosen::Rdma, "mlx5_0 port 1 ACTIVE");
        let one = pre("eth-02", Chosen::Tcp, "no RDMA device");
        let l0 = launch(port, 0, 2, b"t");
        let r0 =
            std::thread::spawn(move || rendezvous_on(&l0, data_addr(0), DEADLINE_MS, None, &zero));
        let l1 = launch(port, 1, 2, b"t");
        let r1 =
            std::thread::spawn(move || rendezvous_on(&l1, data_addr(1), DEADLINE_MS, None, &one));
        let e0 = finish(r0).expect_err("rank 0 refuses the job");
        assert!(
            matches!(&e0, RendezvousError::TransportMismatch { rank: 1, .. }),
            "{e0}"
        );
        let text = e0.to_string();
        for part in [
            "ib-01",
            "eth-02",
            "RDMA",
            "TCP",
            "no RDMA device",
            "--transport tcp",
        ] {
            assert!(text.contains(part), "{part:?} missing from: {text}");
        }
        match finish(r1).expect_err("rank 1 is told") {
            RendezvousError::Refused { reason, .. } => {
                assert!(reason.contains("eth-02"), "{reason}")
            }
            other => panic!("expected a refusal, got {other}"),
        }
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_hello(&bytes);
            let _ = decode_reply(&bytes);
        }

        #[test]
        fn random_bytes_after_a_valid_header_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..200), kind in 0u8..5) {
            let mut bytes = header(kind);
            bytes.extend_from_slice(&tail);
            let _ = decode_hello(&bytes);
            let _ = decode_reply(&bytes);
        }
    }
}
