//! The frame format and an incremental stream decoder.
//!
//! Every frame is a fixed 24-byte little-endian header followed by a typed payload:
//!
//! | bytes  | field                                                           |
//! |--------|-----------------------------------------------------------------|
//! | 0..4   | magic `b"DVMT"`                                                 |
//! | 4..6   | wire format version ([`WIRE_VERSION`])                          |
//! | 6      | frame kind ([`FrameKind`])                                      |
//! | 7      | flags (reserved, must be 0)                                     |
//! | 8..16  | request id (0 = one-way; required non-zero for request kinds)   |
//! | 16..20 | payload length in bytes, at most the decoder's limit            |
//! | 20..24 | CRC-32C of header bytes 0..20 followed by the payload           |
//!
//! Invariants: the decoder never allocates for a payload before its header passed every check
//! (an oversized length is refused from the header alone); it never panics or indexes past what
//! it holds; every error names the stream byte offset where the offending frame or field starts
//! and what was found there. After an error the decoder stays failed: a byte stream has no
//! resynchronisation point, so the connection must be dropped.

use crate::{crc32c, PageVersion, PageVersionRef, MASK_BYTES, MASK_WORDS, PAGE_BYTES};

pub const MAGIC: [u8; 4] = *b"DVMT";
/// Version of the framing itself. The protocol version proper travels in [`Hello`].
pub const WIRE_VERSION: u16 = 1;
pub const HEADER_BYTES: usize = 24;
/// Largest payload of any frame: bounds every allocation a peer can cause.
pub const MAX_PAYLOAD_BYTES: usize = 4 << 20;
/// Largest job token in a Hello.
pub const MAX_TOKEN_BYTES: usize = 256;
/// Largest software version string in a Hello.
pub const MAX_SOFTWARE_VERSION_BYTES: usize = 128;
/// Bytes of one page version on the wire: key, ts, data, mask.
pub const PAGE_RECORD_BYTES: usize = 8 + 8 + PAGE_BYTES + MASK_BYTES;
/// Most page versions in one PushPages frame.
pub const MAX_PAGES_PER_FRAME: usize = (MAX_PAYLOAD_BYTES - 4) / PAGE_RECORD_BYTES;
/// Largest payload of a Message, Request or Response.
pub const MAX_MESSAGE_BYTES: usize = MAX_PAYLOAD_BYTES;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    Hello = 1,
    HelloAck = 2,
    Refuse = 3,
    Message = 4,
    Request = 5,
    Response = 6,
    ReadPage = 7,
    PageData = 8,
    PushPages = 9,
    Ping = 10,
    Goodbye = 11,
}

impl FrameKind {
    pub fn from_u8(b: u8) -> Option<FrameKind> {
        use FrameKind::*;
        Some(match b {
            1 => Hello,
            2 => HelloAck,
            3 => Refuse,
            4 => Message,
            5 => Request,
            6 => Response,
            7 => ReadPage,
            8 => PageData,
            9 => PushPages,
            10 => Ping,
            11 => Goodbye,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        use FrameKind::*;
        match self {
            Hello => "hello",
            HelloAck => "hello-ack",
            Refuse => "refuse",
            Message => "message",
            Request => "request",
            Response => "response",
            ReadPage => "read-page",
            PageData => "page-data",
            PushPages => "push-pages",
            Ping => "ping",
            Goodbye => "goodbye",
        }
    }

    /// Kinds that correlate with a request and so carry a non-zero id.
    fn needs_id(self) -> bool {
        matches!(
            self,
            FrameKind::Request | FrameKind::Response | FrameKind::ReadPage | FrameKind::PageData
        )
    }

    /// Data frames count in [`crate::PeerCounters`]; control frames do not.
    pub fn is_data(self) -> bool {
        matches!(
            self,
            FrameKind::Message
                | FrameKind::Request
                | FrameKind::Response
                | FrameKind::ReadPage
                | FrameKind::PageData
                | FrameKind::PushPages
        )
    }
}

impl std::fmt::Display for FrameKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// First frame of every connection, from the connecting side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u16,
    pub software_version: String,
    pub token: Vec<u8>,
    pub rank: u32,
    pub world: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    HelloAck {
        protocol_version: u16,
        rank: u32,
        world: u32,
    },
    Refuse(RefuseReason),
    Message(Vec<u8>),
    Request {
        id: u64,
        payload: Vec<u8>,
    },
    Response {
        id: u64,
        payload: Vec<u8>,
    },
    ReadPage {
        id: u64,
        page: u64,
        snapshot_ts: u64,
    },
    PageData {
        id: u64,
        version: PageVersion,
    },
    PushPages(Vec<PageVersion>),
    Ping,
    Goodbye,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad magic {found:02x?} at stream byte {offset} (expected \"DVMT\")")]
    BadMagic { offset: u64, found: [u8; 4] },
    #[error("unsupported wire version {found} at stream byte {offset} (this build speaks {WIRE_VERSION})")]
    UnsupportedVersion { offset: u64, found: u16 },
    #[error("unknown frame kind {found} at stream byte {offset}")]
    UnknownKind { offset: u64, found: u8 },
    #[error("reserved flags {found:#04x} set in the {kind} frame at stream byte {offset}")]
    BadFlags {
        offset: u64,
        kind: FrameKind,
        found: u8,
    },
    #[error("{kind} frame at stream byte {offset} announces {len_bytes} payload bytes, more than the limit of {max_bytes}")]
    TooLarge {
        offset: u64,
        kind: FrameKind,
        len_bytes: u64,
        max_bytes: u64,
    },
    #[error("checksum mismatch in the {kind} frame at stream byte {offset}: header says {expected:#010x}, bytes give {found:#010x}")]
    Checksum {
        offset: u64,
        kind: FrameKind,
        expected: u32,
        found: u32,
    },
    #[error("request id {id} in the {kind} frame at stream byte {offset} ({why})")]
    BadRequestId {
        offset: u64,
        kind: FrameKind,
        id: u64,
        why: &'static str,
    },
    #[error("malformed {kind} payload at stream byte {offset}: {what}")]
    Malformed {
        offset: u64,
        kind: FrameKind,
        what: &'static str,
    },
    #[error("cannot encode a {kind} frame of {len_bytes} payload bytes (limit {max_bytes})")]
    EncodeTooLarge {
        kind: FrameKind,
        len_bytes: u64,
        max_bytes: u64,
    },
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Append a complete frame whose payload is produced by `body`. The checksum is patched in after
/// the payload is written; on an oversized payload `out` is restored and nothing is appended.
fn encode_with(
    out: &mut Vec<u8>,
    kind: FrameKind,
    id: u64,
    body: impl FnOnce(&mut Vec<u8>),
) -> Result<usize, WireError> {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&WIRE_VERSION.to_le_bytes());
    out.push(kind as u8);
    out.push(0);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&[0u8; 8]); // length and checksum, patched below
    body(out);
    let len = out.len() - start - HEADER_BYTES;
    if len > MAX_PAYLOAD_BYTES {
        out.truncate(start);
        return Err(WireError::EncodeTooLarge {
            kind,
            len_bytes: len as u64,
            max_bytes: MAX_PAYLOAD_BYTES as u64,
        });
    }
    let frame = &mut out[start..];
    frame[16..20].copy_from_slice(&(len as u32).to_le_bytes());
    let crc = crc32c::update(crc32c::checksum(&frame[..20]), &frame[HEADER_BYTES..]);
    frame[20..24].copy_from_slice(&crc.to_le_bytes());
    Ok(HEADER_BYTES + len)
}

fn put_page(out: &mut Vec<u8>, v: &PageVersionRef<'_>) {
    out.extend_from_slice(&v.page.to_le_bytes());
    out.extend_from_slice(&v.ts.to_le_bytes());
    out.extend_from_slice(&v.data[..]);
    for w in v.mask.iter() {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// Append a Message, Request or Response frame (`id` 0 for a Message). Returns its wire length.
pub fn encode_data(
    out: &mut Vec<u8>,
    kind: FrameKind,
    id: u64,
    payload: &[u8],
) -> Result<usize, WireError> {
    if payload.len() > MAX_MESSAGE_BYTES {
        return Err(WireError::EncodeTooLarge {
            kind,
            len_bytes: payload.len() as u64,
            max_bytes: MAX_MESSAGE_BYTES as u64,
        });
    }
    encode_with(out, kind, id, |o| o.extend_from_slice(payload))
}

/// Append a ReadPage frame.
pub fn encode_read_page(
    out: &mut Vec<u8>,
    id: u64,
    page: u64,
    snapshot_ts: u64,
) -> Result<usize, WireError> {
    encode_with(out, FrameKind::ReadPage, id, |o| {
        o.extend_from_slice(&page.to_le_bytes());
        o.extend_from_slice(&snapshot_ts.to_le_bytes());
    })
}

/// Append a PageData frame.
pub fn encode_page_data(
    out: &mut Vec<u8>,
    id: u64,
    version: &PageVersionRef<'_>,
) -> Result<usize, WireError> {
    encode_with(out, FrameKind::PageData, id, |o| put_page(o, version))
}

/// Append one PushPages frame; at most [`MAX_PAGES_PER_FRAME`] pages.
pub fn encode_push_pages(
    out: &mut Vec<u8>,
    pages: &[PageVersionRef<'_>],
) -> Result<usize, WireError> {
    if pages.len() > MAX_PAGES_PER_FRAME {
        return Err(WireError::EncodeTooLarge {
            kind: FrameKind::PushPages,
            len_bytes: (4 + pages.len() * PAGE_RECORD_BYTES) as u64,
            max_bytes: MAX_PAYLOAD_BYTES as u64,
        });
    }
    encode_with(out, FrameKind::PushPages, 0, |o| {
        o.extend_from_slice(&(pages.len() as u32).to_le_bytes());
        for p in pages {
            put_page(o, p);
        }
    })
}

impl Frame {
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Hello(_) => FrameKind::Hello,
            Frame::HelloAck { .. } => FrameKind::HelloAck,
            Frame::Refuse(_) => FrameKind::Refuse,
            Frame::Message(_) => FrameKind::Message,
            Frame::Request { .. } => FrameKind::Request,
            Frame::Response { .. } => FrameKind::Response,
            Frame::ReadPage { .. } => FrameKind::ReadPage,
            Frame::PageData { .. } => FrameKind::PageData,
            Frame::PushPages(_) => FrameKind::PushPages,
            Frame::Ping => FrameKind::Ping,
            Frame::Goodbye => FrameKind::Goodbye,
        }
    }

    /// Append this frame to `out`; returns its wire length.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<usize, WireError> {
        match self {
            Frame::Hello(h) => {
                let token_len = h.token.len().min(MAX_TOKEN_BYTES);
                let sw = h.software_version.as_bytes();
                let sw_len = sw.len().min(MAX_SOFTWARE_VERSION_BYTES);
                if token_len != h.token.len() || sw_len != sw.len() {
                    return Err(WireError::EncodeTooLarge {
                        kind: FrameKind::Hello,
                        len_bytes: (h.token.len() + sw.len()) as u64,
                        max_bytes: (MAX_TOKEN_BYTES + MAX_SOFTWARE_VERSION_BYTES) as u64,
                    });
                }
                encode_with(out, FrameKind::Hello, 0, |o| {
                    o.extend_from_slice(&h.protocol_version.to_le_bytes());
                    o.extend_from_slice(&h.rank.to_le_bytes());
                    o.extend_from_slice(&h.world.to_le_bytes());
                    o.extend_from_slice(&(token_len as u16).to_le_bytes());
                    o.extend_from_slice(&h.token);
                    o.extend_from_slice(&(sw_len as u16).to_le_bytes());
                    o.extend_from_slice(sw);
                })
            }
            Frame::HelloAck {
                protocol_version,
                rank,
                world,
            } => encode_with(out, FrameKind::HelloAck, 0, |o| {
                o.extend_from_slice(&protocol_version.to_le_bytes());
                o.extend_from_slice(&rank.to_le_bytes());
                o.extend_from_slice(&world.to_le_bytes());
            }),
            Frame::Refuse(reason) => {
                let (code, a, b) = reason.to_wire();
                encode_with(out, FrameKind::Refuse, 0, |o| {
                    o.push(code);
                    o.extend_from_slice(&a.to_le_bytes());
                    o.extend_from_slice(&b.to_le_bytes());
                })
            }
            Frame::Message(p) => encode_data(out, FrameKind::Message, 0, p),
            Frame::Request { id, payload } => encode_data(out, FrameKind::Request, *id, payload),
            Frame::Response { id, payload } => encode_data(out, FrameKind::Response, *id, payload),
            Frame::ReadPage {
                id,
                page,
                snapshot_ts,
            } => encode_read_page(out, *id, *page, *snapshot_ts),
            Frame::PageData { id, version } => encode_page_data(out, *id, &version.as_ref()),
            Frame::PushPages(pages) => {
                let refs: Vec<PageVersionRef<'_>> = pages.iter().map(|p| p.as_ref()).collect();
                encode_push_pages(out, &refs)
            }
            Frame::Ping => encode_with(out, FrameKind::Ping, 0, |_| {}),
            Frame::Goodbye => encode_with(out, FrameKind::Goodbye, 0, |_| {}),
        }
    }

    /// The frame's bytes, for tests and one-off control frames.
    pub fn to_bytes(&self) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::new();
        self.encode(&mut out)?;
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// Reads a payload whose stream offset is known, failing with that offset on a short read.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    base: u64,
    kind: FrameKind,
}

impl<'a> Reader<'a> {
    fn err(&self, what: &'static str) -> WireError {
        WireError::Malformed {
            offset: self.base + self.pos as u64,
            kind: self.kind,
            what,
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).ok_or_else(|| self.err(what))?;
        let s = self
            .bytes
            .get(self.pos..end)
            .ok_or_else(|| self.err(what))?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn page(&mut self) -> Result<PageVersion, WireError> {
        let page = self.u64("page key")?;
        let ts = self.u64("page timestamp")?;
        let mut data = Box::new([0u8; PAGE_BYTES]);
        data.copy_from_slice(self.take(PAGE_BYTES, "page data")?);
        let mut mask = Box::new([0u64; MASK_WORDS]);
        for w in mask.iter_mut() {
            *w = self.u64("page mask")?;
        }
        Ok(PageVersion {
            page,
            ts,
            data,
            mask,
        })
    }

    fn finish(&self) -> Result<(), WireError> {
        if self.pos == self.bytes.len() {
            Ok(())
        } else {
            Err(self.err("trailing bytes after the payload"))
        }
    }
}

fn parse_payload(kind: FrameKind, id: u64, payload: &[u8], base: u64) -> Result<Frame, WireError> {
    let mut r = Reader {
        bytes: payload,
        pos: 0,
        base,
        kind,
    };
    let frame = match kind {
        FrameKind::Hello => {
            let protocol_version = r.u16("protocol version")?;
            let rank = r.u32("rank")?;
            let world = r.u32("world size")?;
            let token_len = usize::from(r.u16("token length")?);
            if token_len > MAX_TOKEN_BYTES {
                return Err(r.err("token longer than 256 bytes"));
            }
            let token = r.take(token_len, "token")?.to_vec();
            let sw_len = usize::from(r.u16("software version length")?);
            if sw_len > MAX_SOFTWARE_VERSION_BYTES {
                return Err(r.err("software version longer than 128 bytes"));
            }
            let sw = r.take(sw_len, "software version")?;
            let software_version = std::str::from_utf8(sw)
                .map_err(|_| r.err("software version is not UTF-8"))?
                .to_owned();
            Frame::Hello(Hello {
                protocol_version,
                software_version,
                token,
                rank,
                world,
            })
        }
        FrameKind::HelloAck => Frame::HelloAck {
            protocol_version: r.u16("protocol version")?,
            rank: r.u32("rank")?,
            world: r.u32("world size")?,
        },
        FrameKind::Refuse => {
            let code = r.u8("reason code")?;
            let a = r.u32("reason argument")?;
            let b = r.u32("reason argument")?;
            Frame::Refuse(RefuseReason::from_wire(code, a, b))
        }
        FrameKind::Message => Frame::Message(r.take(payload.len(), "payload")?.to_vec()),
        FrameKind::Request => Frame::Request {
            id,
            payload: r.take(payload.len(), "payload")?.to_vec(),
        },
        FrameKind::Response => Frame::Response {
            id,
            payload: r.take(payload.len(), "payload")?.to_vec(),
        },
        FrameKind::ReadPage => Frame::ReadPage {
            id,
            page: r.u64("page key")?,
            snapshot_ts: r.u64("snapshot timestamp")?,
        },
        FrameKind::PageData => Frame::PageData {
            id,
            version: r.page()?,
        },
        FrameKind::PushPages => {
            let count_at = r.base;
            let count = r.u32("page count")? as usize;
            // Checked against the payload length before allocating for `count` pages.
            if count > MAX_PAGES_PER_FRAME
                || payload.len() != 4 + count.saturating_mul(PAGE_RECORD_BYTES)
            {
                return Err(WireError::Malformed {
                    offset: count_at,
                    kind,
                    what: "page count does not match the payload length",
                });
            }
            let mut pages = Vec::with_capacity(count);
            for _ in 0..count {
                pages.push(r.page()?);
            }
            Frame::PushPages(pages)
        }
        FrameKind::Ping => Frame::Ping,
        FrameKind::Goodbye => Frame::Goodbye,
    };
    r.finish()?;
    Ok(frame)
}

/// Incremental decoder of one byte stream: [`Decoder::feed`] what arrives, then call
/// [`Decoder::next_frame`] until it returns `Ok(None)`.
///
/// Memory: the decoder holds at most one incomplete frame plus what the caller fed beyond it, so
/// a caller that drains frames after every feed of `n` bytes holds at most
/// `HEADER_BYTES + max_payload + n` bytes.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Index in `buf` of the first undecoded byte.
    start: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
    max_payload_bytes: usize,
    failed: Option<WireError>,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::with_max_payload(MAX_PAYLOAD_BYTES)
    }

    /// A decoder refusing payloads above `max_payload_bytes` (capped at [`MAX_PAYLOAD_BYTES`]):
    /// a handshake expects only a small Hello.
    pub fn with_max_payload(max_payload_bytes: usize) -> Decoder {
        Decoder {
            buf: Vec::new(),
            start: 0,
            base: 0,
            max_payload_bytes: max_payload_bytes.min(MAX_PAYLOAD_BYTES),
            failed: None,
        }
    }

    pub fn set_max_payload(&mut self, max_payload_bytes: usize) {
        self.max_payload_bytes = max_payload_bytes.min(MAX_PAYLOAD_BYTES);
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.start > 0 && (self.start == self.buf.len() || self.start >= self.buf.len() / 2) {
            self.buf.drain(..self.start);
            self.base += self.start as u64;
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Stream offset of the next byte to decode.
    pub fn offset(&self) -> u64 {
        self.base + self.start as u64
    }

    /// Bytes fed and not yet decoded.
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len() - self.start
    }

    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.decode_one() {
            Ok(f) => Ok(f),
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    fn decode_one(&mut self) -> Result<Option<Frame>, WireError> {
        let offset = self.offset();
        let avail = self.buf.get(self.start..).unwrap_or(&[]);
        // Magic is checked byte by byte so garbage is refused as soon as it arrives.
        let magic_seen = avail.len().min(4);
        if avail.get(..magic_seen) != MAGIC.get(..magic_seen) {
            let mut found = [0u8; 4];
            found[..magic_seen].copy_from_slice(&avail[..magic_seen]);
            return Err(WireError::BadMagic { offset, found });
        }
        let Some(h) = avail.get(..HEADER_BYTES) else {
            return Ok(None);
        };
        let version = u16::from_le_bytes([h[4], h[5]]);
        if version != WIRE_VERSION {
            return Err(WireError::UnsupportedVersion {
                offset,
                found: version,
            });
        }
        let kind = FrameKind::from_u8(h[6]).ok_or(WireError::UnknownKind {
            offset,
            found: h[6],
        })?;
        if h[7] != 0 {
            return Err(WireError::BadFlags {
                offset,
                kind,
                found: h[7],
            });
        }
        let id = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        if kind.needs_id() && id == 0 {
            return Err(WireError::BadRequestId {
                offset,
                kind,
                id,
                why: "this kind needs a non-zero id",
            });
        }
        if !kind.needs_id() && id != 0 {
            return Err(WireError::BadRequestId {
                offset,
                kind,
                id,
                why: "this kind is one-way and must carry 0",
            });
        }
        let len = u32::from_le_bytes([h[16], h[17], h[18], h[19]]) as usize;
        if len > self.max_payload_bytes {
            return Err(WireError::TooLarge {
                offset,
                kind,
                len_bytes: len as u64,
                max_bytes: self.max_payload_bytes as u64,
            });
        }
        let expected = u32::from_le_bytes([h[20], h[21], h[22], h[23]]);
        let Some(payload) = avail.get(HEADER_BYTES..HEADER_BYTES + len) else {
            // The header passed every check: make room for the whole frame once, rather than
            // growing (and copying) the buffer chunk by chunk as the payload arrives.
            let missing = HEADER_BYTES + len - avail.len();
            self.buf.reserve(missing);
            return Ok(None);
        };
        let found = crc32c::update(crc32c::checksum(&h[..20]), payload);
        if found != expected {
            return Err(WireError::Checksum {
                offset,
                kind,
                expected,
                found,
            });
        }
        let frame = parse_payload(kind, id, payload, offset + HEADER_BYTES as u64)?;
        self.start += HEADER_BYTES + len;
        Ok(Some(frame))
    }
}

/// Why a Hello was refused (`handshake` decides it). Travels in the Refuse frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RefuseReason {
    #[error("wrong job token")]
    BadToken,
    #[error("protocol version {theirs} (we speak {ours})")]
    ProtocolVersion { ours: u16, theirs: u16 },
    #[error("world size {theirs} (ours is {ours})")]
    WorldSize { ours: u32, theirs: u32 },
    #[error("rank {rank} out of range for world {world}")]
    RankOutOfRange { rank: u32, world: u32 },
    #[error("rank {rank} is already connected")]
    AlreadyConnected { rank: u32 },
    #[error("rank {rank} is not expected to connect to this node")]
    Unexpected { rank: u32 },
    #[error("malformed or missing hello")]
    Malformed,
    #[error("too many handshakes in progress")]
    Busy,
    #[error("unknown refusal code {code}")]
    Other { code: u8 },
}

impl RefuseReason {
    pub(crate) fn to_wire(self) -> (u8, u32, u32) {
        match self {
            RefuseReason::BadToken => (1, 0, 0),
            RefuseReason::ProtocolVersion { ours, theirs } => {
                (2, u32::from(ours), u32::from(theirs))
            }
            RefuseReason::WorldSize { ours, theirs } => (3, ours, theirs),
            RefuseReason::RankOutOfRange { rank, world } => (4, rank, world),
            RefuseReason::AlreadyConnected { rank } => (5, rank, 0),
            RefuseReason::Unexpected { rank } => (6, rank, 0),
            RefuseReason::Malformed => (7, 0, 0),
            RefuseReason::Busy => (8, 0, 0),
            RefuseReason::Other { code } => (code, 0, 0),
        }
    }

    pub(crate) fn from_wire(code: u8, a: u32, b: u32) -> RefuseReason {
        // Versions travel widened to u32; a value that does not fit is shown saturated.
        let v = |x: u32| u16::try_from(x).unwrap_or(u16::MAX);
        match code {
            1 => RefuseReason::BadToken,
            2 => RefuseReason::ProtocolVersion {
                ours: v(a),
                theirs: v(b),
            },
            3 => RefuseReason::WorldSize { ours: a, theirs: b },
            4 => RefuseReason::RankOutOfRange { rank: a, world: b },
            5 => RefuseReason::AlreadyConnected { rank: a },
            6 => RefuseReason::Unexpected { rank: a },
            7 => RefuseReason::Malformed,
            8 => RefuseReason::Busy,
            code => RefuseReason::Other { code },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seed: u8) -> PageVersion {
        let mut data = Box::new([0u8; PAGE_BYTES]);
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
        }
        let mut mask = Box::new([0u64; MASK_WORDS]);
        for (i, w) in mask.iter_mut().enumerate() {
            *w = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(seed);
        }
        PageVersion {
            page: 0x1000 + u64::from(seed),
            ts: 77 + u64::from(seed),
            data,
            mask,
        }
    }

    #[test]
    fn header_layout_is_fixed() {
        let bytes = Frame::Request {
            id: 0x0102_0304_0506_0708,
            payload: vec![9, 9, 9],
        }
        .to_bytes()
        .expect("encodes");
        assert_eq!(&bytes[0..4], b"DVMT");
        assert_eq!(&bytes[4..6], &[1, 0]);
        assert_eq!(bytes[6], FrameKind::Request as u8);
        assert_eq!(bytes[7], 0);
        assert_eq!(&bytes[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&bytes[16..20], &[3, 0, 0, 0]);
        assert_eq!(bytes.len(), HEADER_BYTES + 3);
    }

    #[test]
    fn pages_round_trip_with_exact_bytes() {
        let pages = vec![page(1), page(2), page(3)];
        let bytes = Frame::PushPages(pages.clone()).to_bytes().expect("encodes");
        assert_eq!(bytes.len(), HEADER_BYTES + 4 + 3 * PAGE_RECORD_BYTES);
        let mut d = Decoder::new();
        d.feed(&bytes);
        assert_eq!(d.next_frame(), Ok(Some(Frame::PushPages(pages))));
        assert_eq!(d.next_frame(), Ok(None));
    }

    #[test]
    fn errors_name_offset_and_what_was_found() {
        let ping = Frame::Ping.to_bytes().expect("encodes");
        // A good frame, then garbage: the error points at the garbage's stream offset.
        let mut d = Decoder::new();
        d.feed(&ping);
        d.feed(b"GET / HTTP/1.1\r\n");
        assert_eq!(d.next_frame(), Ok(Some(Frame::Ping)));
        assert_eq!(
            d.next_frame(),
            Err(WireError::BadMagic {
                offset: ping.len() as u64,
                found: *b"GET "
            })
        );
        // Stays failed.
        assert!(d.next_frame().is_err());

        // Oversized length is refused from the header alone, before the payload arrives.
        let mut big = Frame::Message(vec![]).to_bytes().expect("encodes");
        big[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut d = Decoder::new();
        d.feed(&big[..HEADER_BYTES]);
        assert_eq!(
            d.next_frame(),
            Err(WireError::TooLarge {
                offset: 0,
                kind: FrameKind::Message,
                len_bytes: u64::from(u32::MAX),
                max_bytes: MAX_PAYLOAD_BYTES as u64
            })
        );

        // Flipped payload bit: checksum error.
        let mut msg = Frame::Message(b"hello".to_vec())
            .to_bytes()
            .expect("encodes");
        msg[HEADER_BYTES + 1] ^= 1;
        let mut d = Decoder::new();
        d.feed(&msg);
        assert!(matches!(
            d.next_frame(),
            Err(WireError::Checksum { offset: 0, .. })
        ));

        // Unknown kind.
        let mut k = Frame::Ping.to_bytes().expect("encodes");
        k[6] = 200;
        let mut d = Decoder::new();
        d.feed(&k);
        assert_eq!(
            d.next_frame(),
            Err(WireError::UnknownKind {
                offset: 0,
                found: 200
            })
        );
    }

    #[test]
    fn truncated_frame_waits_for_more() {
        let bytes = Frame::Message(vec![5; 1000]).to_bytes().expect("encodes");
        let mut d = Decoder::new();
        d.feed(&bytes[..HEADER_BYTES + 10]);
        assert_eq!(d.next_frame(), Ok(None));
        d.feed(&bytes[HEADER_BYTES + 10..]);
        assert_eq!(d.next_frame(), Ok(Some(Frame::Message(vec![5; 1000]))));
        assert_eq!(d.offset(), bytes.len() as u64);
    }

    #[test]
    fn push_count_must_match_length() {
        let mut out = Vec::new();
        encode_with(&mut out, FrameKind::PushPages, 0, |o| {
            o.extend_from_slice(&u32::MAX.to_le_bytes());
        })
        .expect("encodes");
        let mut d = Decoder::new();
        d.feed(&out);
        assert!(matches!(
            d.next_frame(),
            Err(WireError::Malformed {
                offset: 24,
                kind: FrameKind::PushPages,
                ..
            })
        ));
    }

    #[test]
    fn encode_refuses_oversized() {
        let mut out = vec![1, 2, 3];
        let big = vec![0u8; MAX_PAYLOAD_BYTES + 1];
        assert!(encode_data(&mut out, FrameKind::Message, 0, &big).is_err());
        assert_eq!(out, vec![1, 2, 3]);
        let p = page(0);
        let refs = vec![p.as_ref(); MAX_PAGES_PER_FRAME + 1];
        assert!(encode_push_pages(&mut out, &refs).is_err());
        assert!(encode_push_pages(&mut out, &refs[..MAX_PAGES_PER_FRAME]).is_ok());
    }
}
