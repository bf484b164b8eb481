//! The messages of the cluster protocol (`docs/CLUSTER.md`) and their byte encoding.
//!
//! These bytes are the payload of a transport frame (or of a simulated one): the transport
//! delimits and checksums frames, this module gives them meaning. Decoding treats every byte as
//! hostile: explicit little-endian fields, a tag per message, counts bounded before anything is
//! allocated, and a typed error that names the offset. A page delta carries only the bytes its
//! committer stored (a mask and those bytes), never the whole page.

use dvm_engine::page::{Mask, EMPTY_MASK, PAGE_BYTES};
use dvm_engine::report::{decode_conflict, encode_conflict, ReportDecodeError};
use dvm_engine::store::{Conflict, PageHistory, TxnId};

/// Most page deltas in one `Prepare` (a runner that stored to more pages commits in parts
/// of the protocol that do not exist yet; the engine's `--max-memory` bounds it long before).
pub const MAX_DELTAS: usize = 1 << 16;
/// Most timestamp requests or grants in one message.
pub const MAX_BATCH: usize = 1 << 16;
/// Largest opaque payload (an ending's effects with its console output, a task, a report):
/// the engine's output limit plus room for the rest.
/// A node's profile samples travel in chunks of at most this (well under `MAX_BLOB_BYTES`).
pub const MAX_PROFILE_CHUNK_BYTES: usize = 8 << 20;
pub const MAX_BLOB_BYTES: usize = (64 << 20) + (1 << 20);
/// Most pages in one `SeedPages` (a home sends its pages' histories in batches of about
/// `SEED_BATCH_BYTES`, each acknowledged).
pub const MAX_SEED_PAGES: usize = 4096;
/// Most versions of one page in a history (a home keeps only those a snapshot may read).
pub const MAX_HISTORY_VERSIONS: usize = 1 << 16;

/// The bytes one commit stored on one page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageDelta {
    pub page: u64,
    pub mask: Box<Mask>,
    /// The stored bytes, in address order: exactly one per bit set in `mask`.
    pub bytes: Vec<u8>,
}

impl PageDelta {
    /// The delta of `mask` over the page contents `data`.
    pub fn from_page(page: u64, data: &[u8; PAGE_BYTES], mask: &Mask) -> PageDelta {
        let mut bytes = Vec::new();
        for_each_set(mask, |offset| bytes.push(data[offset]));
        PageDelta {
            page,
            mask: Box::new(*mask),
            bytes,
        }
    }

    /// A page with the stored bytes in place and zeros elsewhere.
    pub fn to_page(&self, out: &mut [u8; PAGE_BYTES]) {
        let mut next = self.bytes.iter();
        for_each_set(&self.mask, |offset| {
            if let Some(byte) = next.next() {
                out[offset] = *byte;
            }
        });
    }
}

fn for_each_set(mask: &Mask, mut f: impl FnMut(usize)) {
    for (word_index, word) in mask.iter().enumerate() {
        let mut bits = *word;
        while bits != 0 {
            f(word_index * 64 + bits.trailing_zeros() as usize);
            bits &= bits - 1;
        }
    }
}

fn mask_bits(mask: &Mask) -> usize {
    mask.iter().map(|word| word.count_ones() as usize).sum()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Read `page` as of `snapshot_ts` from its home.
    Read {
        req: u64,
        page: u64,
        snapshot_ts: u64,
    },
    /// The newest version at or below the snapshot (`None`: the page reads as zeros). It is
    /// also the version every snapshot from `version_ts` to `valid_to` sees, so a reader may
    /// cache it for those.
    ReadReply {
        req: u64,
        page: u64,
        version_ts: u64,
        valid_to: u64,
        data: Option<Box<[u8; PAGE_BYTES]>>,
    },
    /// To every holder of the pages: check and hold (the home) or keep (a backup) these
    /// deltas. Handled only by a node whose view is `epoch` (`crate::view`).
    Prepare {
        txn: TxnId,
        epoch: u64,
        snapshot_ts: u64,
        deltas: Vec<PageDelta>,
    },
    Prepared {
        txn: TxnId,
    },
    Refused {
        txn: TxnId,
        conflict: Conflict,
    },
    /// From node 0, to every holder of `txn`'s pages: install its prepared deltas at `first`
    /// and `forced` (its exit record, never conflict-checked) at `last`.
    Commit {
        txn: TxnId,
        first: u64,
        last: u64,
        forced: Vec<PageDelta>,
    },
    Installed {
        txn: TxnId,
    },
    Abort {
        txn: TxnId,
    },
    Aborted {
        txn: TxnId,
    },
    /// To node 0: commit these prepared transactions (node 0 decides, then drives the
    /// installs).
    TsRequest {
        txns: Vec<TsItem>,
    },
    /// From node 0: the first of each transaction's timestamps.
    TsGrant {
        grants: Vec<(TxnId, u64)>,
    },
    /// From node 0: `txn` is installed at every live holder and counted for the watermark.
    CompleteAck {
        txn: TxnId,
    },
    /// From the sequencer: every timestamp at or below `ts` is installed at every live holder
    /// of view `epoch` (ignored by a node that has not adopted that view yet).
    Watermark {
        ts: u64,
        epoch: u64,
    },
    /// To node 0, every tick: this node is alive, in view `epoch`.
    Heartbeat {
        epoch: u64,
    },
    /// From node 0: view `epoch`, with these nodes dead (to a node in an older view, or one
    /// declared dead: it then knows it is fenced). `granted`: the transactions of dead
    /// coordinators that node 0 granted and is still installing; a holder releases every
    /// other transaction of a dead coordinator as it adopts the view (none can commit).
    ///
    /// `settled`: the dead set whose rings are fully copied (`crate::view`).
    View {
        epoch: u64,
        dead: Vec<u64>,
        settled: Vec<u64>,
        granted: Vec<TxnId>,
    },
    /// From node 0, once every commit granted before view `epoch` is installed and no other
    /// is granted: copy the pages you are home of to their new holders, then answer `Seeded`.
    Seed {
        epoch: u64,
    },
    /// From a home to a new holder: these pages' histories, batch `batch` of view `epoch`'s
    /// copies; answered by `SeedAck`.
    SeedPages {
        epoch: u64,
        batch: u64,
        pages: Vec<(u64, PageHistory)>,
    },
    SeedAck {
        epoch: u64,
        batch: u64,
    },
    /// To node 0: every new holder of this node's pages acknowledged its copies for `epoch`.
    Seeded {
        epoch: u64,
    },
    /// From node 0: these transactions were prepared in a view before their pages' rings
    /// gained members; send their deltas to the new holders, then ask again.
    Reprepare {
        txns: Vec<TxnId>,
    },
    /// To node 0 (runtime): this node lost its connection to `node`; node 0 declares it dead
    /// (if the run can go on without it), so that the rest go on without it.
    Suspect {
        node: u64,
    },
    /// To node 0, every tick, from a node that started again without its state: the node it
    /// was is gone (node 0 declares it dead; the new one is not admitted, only fenced).
    Rejoin,
    /// From node 0: run this runner (an engine task, encoded by the engine).
    RunTask {
        task: Vec<u8>,
    },
    /// To node 0: a runtime service (runner ids, stacks, heap, console input).
    Control {
        req: u64,
        op: Vec<u8>,
    },
    ControlReply {
        req: u64,
        reply: Vec<u8>,
    },
    /// From node 0: the run is over; answer with `NodeReport`.
    Shutdown,
    /// To node 0: this node's counters at the end of the run.
    NodeReport {
        report: Vec<u8>,
    },
    /// To node 0, before `NodeReport`: some of this node's profile samples
    /// (`dvm_perf::profile::encode`), at most `MAX_PROFILE_CHUNK_BYTES` at a time.
    ProfileSamples {
        samples: Vec<u8>,
    },
    /// From node 0, in order: every ending up to timestamp `upto` took effect, and these pages
    /// changed since the previous notice (lets a node keep using cached page versions); no
    /// live snapshot is older than `horizon` (lets a home drop versions nobody can read).
    Changes {
        upto: u64,
        horizon: u64,
        pages: Vec<u64>,
    },
}

/// One prepared transaction a coordinator asks node 0 to commit: everything node 0 needs to
/// finish it without its coordinator (`docs/CLUSTER.md`, "The commit").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TsItem {
    pub txn: TxnId,
    /// The view its prepares were last sent in.
    pub epoch: u64,
    /// Timestamps it takes: 2 (commit, exit record) or 1 (exit record only).
    pub count: u64,
    /// The pages it prepared (their holders install its deltas).
    pub pages: Vec<u64>,
    /// Installed at the last timestamp without a check (the exit record).
    pub forced: Vec<PageDelta>,
    /// The ending's effects, handed out at node 0 in timestamp order (opaque here).
    pub effects: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MsgDecodeError {
    #[error("message truncated at byte {offset}")]
    Truncated { offset: usize },
    #[error("unknown message tag {tag}")]
    UnknownTag { tag: u8 },
    #[error("{what} count {count} at byte {offset} exceeds {limit}")]
    TooMany {
        what: &'static str,
        count: u64,
        limit: usize,
        offset: usize,
    },
    #[error("page delta at byte {offset}: mask selects {expected} bytes but {found} follow")]
    DeltaLength {
        offset: usize,
        expected: usize,
        found: u64,
    },
    #[error("conflict at byte {offset}: {source}")]
    Conflict {
        offset: usize,
        source: ReportDecodeError,
    },
    #[error("{extra} bytes after the message")]
    Trailing { extra: usize },
    #[error("page segment at byte {offset} is empty, out of order or outside the page")]
    BadSegment { offset: usize },
}

struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl Reader<'_> {
    fn take(&mut self, len: usize) -> Result<&[u8], MsgDecodeError> {
        let end = self
            .offset
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or(MsgDecodeError::Truncated {
                offset: self.offset,
            })?;
        let slice = &self.bytes[self.offset..end];
        self.offset = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, MsgDecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, MsgDecodeError> {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(raw))
    }

    fn count(&mut self, what: &'static str, limit: usize) -> Result<usize, MsgDecodeError> {
        let offset = self.offset;
        let count = self.u64()?;
        usize::try_from(count)
            .ok()
            .filter(|count| *count <= limit)
            .ok_or(MsgDecodeError::TooMany {
                what,
                count,
                limit,
                offset,
            })
    }

    fn mask(&mut self) -> Result<Box<Mask>, MsgDecodeError> {
        let mut mask = Box::new(EMPTY_MASK);
        for word in mask.iter_mut() {
            *word = self.u64()?;
        }
        Ok(mask)
    }

    fn page(&mut self) -> Result<Box<[u8; PAGE_BYTES]>, MsgDecodeError> {
        let mut page = Box::new([0u8; PAGE_BYTES]);
        page.copy_from_slice(self.take(PAGE_BYTES)?);
        Ok(page)
    }

    /// A page sent as its non-zero runs: segments in increasing order, inside the page.
    fn sparse_page(&mut self) -> Result<Box<[u8; PAGE_BYTES]>, MsgDecodeError> {
        let mut page = Box::new([0u8; PAGE_BYTES]);
        let count = self.u16()?;
        let mut end = 0usize;
        for _ in 0..count {
            let at = self.offset;
            let (offset, len) = (usize::from(self.u16()?), usize::from(self.u16()?));
            if offset < end || offset + len > PAGE_BYTES || len == 0 {
                return Err(MsgDecodeError::BadSegment { offset: at });
            }
            page[offset..offset + len].copy_from_slice(self.take(len)?);
            end = offset + len;
        }
        Ok(page)
    }

    fn u16(&mut self) -> Result<u16, MsgDecodeError> {
        let mut raw = [0u8; 2];
        raw.copy_from_slice(self.take(2)?);
        Ok(u16::from_le_bytes(raw))
    }

    fn pairs(&mut self, what: &'static str) -> Result<Vec<(u64, u64)>, MsgDecodeError> {
        let count = self.count(what, MAX_BATCH)?;
        // Each pair is 16 bytes: refuse counts the message cannot hold before allocating.
        if self.bytes.len() - self.offset < count * 16 {
            return Err(MsgDecodeError::Truncated {
                offset: self.offset,
            });
        }
        (0..count).map(|_| Ok((self.u64()?, self.u64()?))).collect()
    }

    fn words(&mut self, what: &'static str, limit: usize) -> Result<Vec<u64>, MsgDecodeError> {
        let count = self.count(what, limit)?;
        // Refuse counts the message cannot hold before allocating.
        if self.bytes.len() - self.offset < count * 8 {
            return Err(MsgDecodeError::Truncated {
                offset: self.offset,
            });
        }
        (0..count).map(|_| self.u64()).collect()
    }

    fn ts_items(&mut self) -> Result<Vec<TsItem>, MsgDecodeError> {
        let count = self.count("timestamp request", MAX_BATCH)?;
        // An item is at least 48 bytes.
        if self.bytes.len() - self.offset < count * 48 {
            return Err(MsgDecodeError::Truncated {
                offset: self.offset,
            });
        }
        (0..count)
            .map(|_| {
                Ok(TsItem {
                    txn: self.u64()?,
                    epoch: self.u64()?,
                    count: self.u64()?,
                    pages: self.words("prepared page", MAX_DELTAS)?,
                    forced: self.deltas()?,
                    effects: self.blob("effects")?,
                })
            })
            .collect()
    }

    /// A page's contents as `put_page` wrote them.
    fn tagged_page(&mut self) -> Result<Box<[u8; PAGE_BYTES]>, MsgDecodeError> {
        match self.u8()? {
            1 => self.page(),
            2 => self.sparse_page(),
            tag => Err(MsgDecodeError::UnknownTag { tag }),
        }
    }

    fn seed_pages(&mut self) -> Result<Vec<(u64, PageHistory)>, MsgDecodeError> {
        let count = self.count("seeded page", MAX_SEED_PAGES)?;
        let mut pages = Vec::with_capacity(count.min(64));
        for _ in 0..count {
            let page = self.u64()?;
            // A version is at least 8 + 512 + 3 bytes, a stripped one 520: refuse counts the
            // message cannot hold before allocating.
            let versions = self.count("page version", MAX_HISTORY_VERSIONS)?;
            if (self.bytes.len() - self.offset) / 523 < versions {
                return Err(MsgDecodeError::Truncated {
                    offset: self.offset,
                });
            }
            let versions = (0..versions)
                .map(|_| Ok((self.u64()?, self.mask()?, self.tagged_page()?)))
                .collect::<Result<_, MsgDecodeError>>()?;
            let stripped = self.count("stripped version", MAX_HISTORY_VERSIONS)?;
            if (self.bytes.len() - self.offset) / 520 < stripped {
                return Err(MsgDecodeError::Truncated {
                    offset: self.offset,
                });
            }
            let stripped = (0..stripped)
                .map(|_| Ok((self.u64()?, self.mask()?)))
                .collect::<Result<_, MsgDecodeError>>()?;
            pages.push((page, PageHistory { versions, stripped }));
        }
        Ok(pages)
    }

    fn blob(&mut self, what: &'static str) -> Result<Vec<u8>, MsgDecodeError> {
        let len = self.count(what, MAX_BLOB_BYTES)?;
        Ok(self.take(len)?.to_vec())
    }

    fn deltas(&mut self) -> Result<Vec<PageDelta>, MsgDecodeError> {
        let count = self.count("page delta", MAX_DELTAS)?;
        let mut deltas = Vec::with_capacity(count.min(64));
        for _ in 0..count {
            deltas.push(self.delta()?);
        }
        Ok(deltas)
    }

    fn delta(&mut self) -> Result<PageDelta, MsgDecodeError> {
        let page = self.u64()?;
        let mask = self.mask()?;
        let offset = self.offset;
        let found = self.u64()?;
        let expected = mask_bits(&mask);
        if found != expected as u64 {
            return Err(MsgDecodeError::DeltaLength {
                offset,
                expected,
                found,
            });
        }
        let bytes = self.take(expected)?.to_vec();
        Ok(PageDelta { page, mask, bytes })
    }
}

fn put(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

/// Zero bytes between two non-zero runs that still start a new segment (a segment costs 4).
const SEGMENT_GAP: usize = 8;

/// A page: whole (tag 1), or as its non-zero runs (tag 2) when that is smaller — result
/// pages, stacks and exit records are mostly zeros.
fn put_page(out: &mut Vec<u8>, page: &[u8; PAGE_BYTES]) {
    let mut segments: Vec<(usize, usize)> = Vec::new();
    let mut at = 0;
    while at < PAGE_BYTES {
        if page[at] == 0 {
            at += 1;
            continue;
        }
        let start = at;
        let mut end = at + 1;
        let mut zeros = 0;
        while end + zeros < PAGE_BYTES && zeros < SEGMENT_GAP {
            if page[end + zeros] == 0 {
                zeros += 1;
            } else {
                end += zeros + 1;
                zeros = 0;
            }
        }
        segments.push((start, end - start));
        at = end;
    }
    let sparse_bytes = 2 + segments.iter().map(|(_, len)| 4 + len).sum::<usize>();
    if sparse_bytes >= PAGE_BYTES {
        out.push(1);
        out.extend_from_slice(&page[..]);
        return;
    }
    out.push(2);
    out.extend_from_slice(&(segments.len() as u16).to_le_bytes());
    for (offset, len) in segments {
        out.extend_from_slice(&(offset as u16).to_le_bytes());
        out.extend_from_slice(&(len as u16).to_le_bytes());
        out.extend_from_slice(&page[offset..offset + len]);
    }
}

fn put_mask(out: &mut Vec<u8>, mask: &Mask) {
    for word in mask.iter() {
        put(out, *word);
    }
}

fn put_seed_pages(out: &mut Vec<u8>, pages: &[(u64, PageHistory)]) {
    put(out, pages.len() as u64);
    for (page, history) in pages {
        put(out, *page);
        put(out, history.versions.len() as u64);
        for (ts, stored, data) in &history.versions {
            put(out, *ts);
            put_mask(out, stored);
            put_page(out, data);
        }
        put(out, history.stripped.len() as u64);
        for (ts, stored) in &history.stripped {
            put(out, *ts);
            put_mask(out, stored);
        }
    }
}

fn put_blob(out: &mut Vec<u8>, blob: &[u8]) {
    put(out, blob.len() as u64);
    out.extend_from_slice(blob);
}

fn put_deltas(out: &mut Vec<u8>, deltas: &[PageDelta]) {
    put(out, deltas.len() as u64);
    for delta in deltas {
        put(out, delta.page);
        put_mask(out, &delta.mask);
        put(out, delta.bytes.len() as u64);
        out.extend_from_slice(&delta.bytes);
    }
}

fn put_words(out: &mut Vec<u8>, words: &[u64]) {
    put(out, words.len() as u64);
    for word in words {
        put(out, *word);
    }
}

fn put_pairs(out: &mut Vec<u8>, pairs: &[(u64, u64)]) {
    put(out, pairs.len() as u64);
    for (a, b) in pairs {
        put(out, *a);
        put(out, *b);
    }
}

impl Msg {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        match self {
            Msg::Read {
                req,
                page,
                snapshot_ts,
            } => {
                out.push(1);
                put(&mut out, *req);
                put(&mut out, *page);
                put(&mut out, *snapshot_ts);
            }
            Msg::ReadReply {
                req,
                page,
                version_ts,
                valid_to,
                data,
            } => {
                out.push(2);
                put(&mut out, *req);
                put(&mut out, *page);
                put(&mut out, *version_ts);
                put(&mut out, *valid_to);
                match data {
                    None => out.push(0),
                    Some(data) => put_page(&mut out, data),
                }
            }
            Msg::Prepare {
                txn,
                epoch,
                snapshot_ts,
                deltas,
            } => {
                out.push(3);
                put(&mut out, *txn);
                put(&mut out, *epoch);
                put(&mut out, *snapshot_ts);
                put_deltas(&mut out, deltas);
            }
            Msg::Prepared { txn } => {
                out.push(4);
                put(&mut out, *txn);
            }
            Msg::Refused { txn, conflict } => {
                out.push(5);
                put(&mut out, *txn);
                encode_conflict(conflict, &mut out);
            }
            Msg::Commit {
                txn,
                first,
                last,
                forced,
            } => {
                out.push(6);
                put(&mut out, *txn);
                put(&mut out, *first);
                put(&mut out, *last);
                put_deltas(&mut out, forced);
            }
            Msg::Installed { txn } => {
                out.push(7);
                put(&mut out, *txn);
            }
            Msg::Abort { txn } => {
                out.push(8);
                put(&mut out, *txn);
            }
            Msg::Aborted { txn } => {
                out.push(9);
                put(&mut out, *txn);
            }
            Msg::TsRequest { txns } => {
                out.push(10);
                put(&mut out, txns.len() as u64);
                for item in txns {
                    put(&mut out, item.txn);
                    put(&mut out, item.epoch);
                    put(&mut out, item.count);
                    put_words(&mut out, &item.pages);
                    put_deltas(&mut out, &item.forced);
                    put_blob(&mut out, &item.effects);
                }
            }
            Msg::TsGrant { grants } => {
                out.push(11);
                put_pairs(&mut out, grants);
            }
            Msg::CompleteAck { txn } => {
                out.push(13);
                put(&mut out, *txn);
            }
            Msg::Watermark { ts, epoch } => {
                out.push(14);
                put(&mut out, *ts);
                put(&mut out, *epoch);
            }
            Msg::Heartbeat { epoch } => {
                out.push(22);
                put(&mut out, *epoch);
            }
            Msg::View {
                epoch,
                dead,
                settled,
                granted,
            } => {
                out.push(23);
                put(&mut out, *epoch);
                put_words(&mut out, dead);
                put_words(&mut out, settled);
                put_words(&mut out, granted);
            }
            Msg::Seed { epoch } => {
                out.push(27);
                put(&mut out, *epoch);
            }
            Msg::SeedPages {
                epoch,
                batch,
                pages,
            } => {
                out.push(28);
                put(&mut out, *epoch);
                put(&mut out, *batch);
                put_seed_pages(&mut out, pages);
            }
            Msg::SeedAck { epoch, batch } => {
                out.push(29);
                put(&mut out, *epoch);
                put(&mut out, *batch);
            }
            Msg::Seeded { epoch } => {
                out.push(30);
                put(&mut out, *epoch);
            }
            Msg::Reprepare { txns } => {
                out.push(31);
                put_words(&mut out, txns);
            }
            Msg::Rejoin => out.push(25),
            Msg::Suspect { node } => {
                out.push(26);
                put(&mut out, *node);
            }
            Msg::RunTask { task } => {
                out.push(15);
                put_blob(&mut out, task);
            }
            Msg::Control { req, op } => {
                out.push(16);
                put(&mut out, *req);
                put_blob(&mut out, op);
            }
            Msg::ControlReply { req, reply } => {
                out.push(17);
                put(&mut out, *req);
                put_blob(&mut out, reply);
            }
            Msg::Shutdown => out.push(18),
            Msg::NodeReport { report } => {
                out.push(19);
                put_blob(&mut out, report);
            }
            Msg::ProfileSamples { samples } => {
                out.push(21);
                put_blob(&mut out, samples);
            }
            Msg::Changes {
                upto,
                horizon,
                pages,
            } => {
                out.push(20);
                put(&mut out, *upto);
                put(&mut out, *horizon);
                put(&mut out, pages.len() as u64);
                for page in pages {
                    put(&mut out, *page);
                }
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Msg, MsgDecodeError> {
        let mut r = Reader { bytes, offset: 0 };
        let msg = match r.u8()? {
            1 => Msg::Read {
                req: r.u64()?,
                page: r.u64()?,
                snapshot_ts: r.u64()?,
            },
            2 => Msg::ReadReply {
                req: r.u64()?,
                page: r.u64()?,
                version_ts: r.u64()?,
                valid_to: r.u64()?,
                data: match r.u8()? {
                    0 => None,
                    1 => Some(r.page()?),
                    2 => Some(r.sparse_page()?),
                    tag => return Err(MsgDecodeError::UnknownTag { tag }),
                },
            },
            3 => {
                let txn = r.u64()?;
                let epoch = r.u64()?;
                let snapshot_ts = r.u64()?;
                let deltas = r.deltas()?;
                Msg::Prepare {
                    txn,
                    epoch,
                    snapshot_ts,
                    deltas,
                }
            }
            4 => Msg::Prepared { txn: r.u64()? },
            5 => {
                let txn = r.u64()?;
                let offset = r.offset;
                let (conflict, used) = decode_conflict(&bytes[offset..])
                    .map_err(|source| MsgDecodeError::Conflict { offset, source })?;
                r.offset += used;
                Msg::Refused { txn, conflict }
            }
            6 => Msg::Commit {
                txn: r.u64()?,
                first: r.u64()?,
                last: r.u64()?,
                forced: r.deltas()?,
            },
            7 => Msg::Installed { txn: r.u64()? },
            8 => Msg::Abort { txn: r.u64()? },
            9 => Msg::Aborted { txn: r.u64()? },
            10 => Msg::TsRequest {
                txns: r.ts_items()?,
            },
            11 => Msg::TsGrant {
                grants: r.pairs("timestamp grant")?,
            },
            13 => Msg::CompleteAck { txn: r.u64()? },
            14 => Msg::Watermark {
                ts: r.u64()?,
                epoch: r.u64()?,
            },
            22 => Msg::Heartbeat { epoch: r.u64()? },
            23 => Msg::View {
                epoch: r.u64()?,
                dead: r.words("dead node", MAX_BATCH)?,
                settled: r.words("settled node", MAX_BATCH)?,
                granted: r.words("granted transaction", MAX_BATCH)?,
            },
            27 => Msg::Seed { epoch: r.u64()? },
            28 => Msg::SeedPages {
                epoch: r.u64()?,
                batch: r.u64()?,
                pages: r.seed_pages()?,
            },
            29 => Msg::SeedAck {
                epoch: r.u64()?,
                batch: r.u64()?,
            },
            30 => Msg::Seeded { epoch: r.u64()? },
            31 => Msg::Reprepare {
                txns: r.words("transaction", MAX_BATCH)?,
            },
            25 => Msg::Rejoin,
            26 => Msg::Suspect { node: r.u64()? },
            15 => Msg::RunTask {
                task: r.blob("task")?,
            },
            16 => Msg::Control {
                req: r.u64()?,
                op: r.blob("control request")?,
            },
            17 => Msg::ControlReply {
                req: r.u64()?,
                reply: r.blob("control reply")?,
            },
            18 => Msg::Shutdown,
            19 => Msg::NodeReport {
                report: r.blob("node report")?,
            },
            21 => Msg::ProfileSamples {
                samples: r.blob("profile samples")?,
            },
            20 => {
                let upto = r.u64()?;
                let horizon = r.u64()?;
                let count = r.count("changed page", MAX_BATCH * 16)?;
                if r.bytes.len() - r.offset < count * 8 {
                    return Err(MsgDecodeError::Truncated { offset: r.offset });
                }
                let pages = (0..count).map(|_| r.u64()).collect::<Result<_, _>>()?;
                Msg::Changes {
                    upto,
                    horizon,
                    pages,
                }
            }
            tag => return Err(MsgDecodeError::UnknownTag { tag }),
        };
        match bytes.len() - r.offset {
            0 => Ok(msg),
            extra => Err(MsgDecodeError::Trailing { extra }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dvm_engine::page::mark;
    use dvm_engine::store::ConflictWith;
    use proptest::prelude::*;

    fn delta(page: u64, offset: usize, len: usize, fill: u8) -> PageDelta {
        let mut data = [0u8; PAGE_BYTES];
        data[offset..offset + len].fill(fill);
        let mut mask = EMPTY_MASK;
        mark(&mut mask, offset, len);
        PageDelta::from_page(page, &data, &mask)
    }

    fn samples() -> Vec<Msg> {
        let conflict = Conflict {
            key: 9,
            offset: 17,
            with: ConflictWith::Prepared { txn: 4 },
        };
        vec![
            Msg::Read {
                req: 1,
                page: 2,
                snapshot_ts: 3,
            },
            Msg::ReadReply {
                req: 1,
                page: 2,
                version_ts: 0,
                valid_to: 3,
                data: None,
            },
            Msg::ReadReply {
                req: 1,
                page: 2,
                version_ts: 7,
                valid_to: 9,
                data: Some(Box::new([5u8; PAGE_BYTES])),
            },
            Msg::Prepare {
                txn: 8,
                epoch: 1,
                snapshot_ts: 2,
                deltas: vec![delta(3, 0, 8, 1), delta(4, 4000, 96, 2)],
            },
            Msg::Prepared { txn: 8 },
            Msg::Refused { txn: 8, conflict },
            Msg::Commit {
                txn: 8,
                first: 12,
                last: 13,
                forced: vec![delta(5, 4088, 8, 1)],
            },
            Msg::Installed { txn: 8 },
            Msg::Abort { txn: 8 },
            Msg::Aborted { txn: 8 },
            Msg::TsRequest {
                txns: vec![
                    TsItem {
                        txn: 8,
                        epoch: 3,
                        count: 2,
                        pages: vec![3, 4],
                        forced: vec![delta(5, 4088, 8, 1)],
                        effects: vec![1, 2, 3],
                    },
                    TsItem {
                        txn: 9,
                        epoch: 0,
                        count: 1,
                        pages: vec![],
                        forced: vec![],
                        effects: vec![],
                    },
                ],
            },
            Msg::TsGrant {
                grants: vec![(8, 12)],
            },
            Msg::CompleteAck { txn: 8 },
            Msg::Watermark { ts: 13, epoch: 2 },
            Msg::Heartbeat { epoch: 2 },
            Msg::View {
                epoch: 2,
                dead: vec![1, 3],
                settled: vec![1],
                granted: vec![8, 9],
            },
            Msg::Seed { epoch: 4 },
            Msg::SeedPages {
                epoch: 4,
                batch: 2,
                pages: vec![
                    (
                        7,
                        PageHistory {
                            versions: vec![
                                (0, Box::new([u64::MAX; 64]), Box::new([3u8; PAGE_BYTES])),
                                (9, delta(7, 8, 8, 1).mask, {
                                    let mut page = Box::new([0u8; PAGE_BYTES]);
                                    page[8] = 1;
                                    page
                                }),
                            ],
                            stripped: vec![(5, delta(7, 0, 4, 1).mask)],
                        },
                    ),
                    (
                        8,
                        PageHistory {
                            versions: vec![],
                            stripped: vec![],
                        },
                    ),
                ],
            },
            Msg::SeedAck { epoch: 4, batch: 2 },
            Msg::Seeded { epoch: 4 },
            Msg::Reprepare {
                txns: vec![8, 1 << 41],
            },
            Msg::Rejoin,
            Msg::RunTask { task: vec![4; 40] },
            Msg::Control {
                req: 3,
                op: vec![1],
            },
            Msg::ControlReply {
                req: 3,
                reply: vec![],
            },
            Msg::Shutdown,
            Msg::NodeReport { report: vec![9; 8] },
            Msg::ProfileSamples {
                samples: vec![1, 2, 3],
            },
            Msg::Changes {
                upto: 40,
                horizon: 30,
                pages: vec![1, 2, 3],
            },
        ]
    }

    #[test]
    fn every_message_round_trips_and_every_truncation_is_refused() {
        for msg in samples() {
            let bytes = msg.encode();
            assert_eq!(Msg::decode(&bytes), Ok(msg.clone()));
            for cut in 0..bytes.len() {
                assert!(Msg::decode(&bytes[..cut]).is_err(), "{msg:?} cut at {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(
                Msg::decode(&longer),
                Err(MsgDecodeError::Trailing { extra: 1 })
            );
        }
    }

    #[test]
    fn mostly_zero_pages_travel_as_their_non_zero_runs() {
        let mut page = Box::new([0u8; PAGE_BYTES]);
        page[10..20].fill(7);
        page[25] = 1; // within the gap: the same segment
        page[4095] = 9;
        let msg = Msg::ReadReply {
            req: 1,
            page: 2,
            version_ts: 3,
            valid_to: 4,
            data: Some(page),
        };
        let bytes = msg.encode();
        assert!(
            bytes.len() < 100,
            "{} bytes for a page of 12 non-zero bytes",
            bytes.len()
        );
        assert_eq!(Msg::decode(&bytes), Ok(msg));
        let full = Msg::ReadReply {
            req: 1,
            page: 2,
            version_ts: 3,
            valid_to: 4,
            data: Some(Box::new([3u8; PAGE_BYTES])),
        };
        assert_eq!(full.encode().len(), 1 + 8 * 4 + 1 + PAGE_BYTES);
    }

    #[test]
    fn a_delta_carries_only_the_stored_bytes() {
        let d = delta(3, 10, 3, 0xab);
        assert_eq!(d.bytes, vec![0xab; 3]);
        let mut page = [0u8; PAGE_BYTES];
        d.to_page(&mut page);
        assert_eq!(&page[9..14], &[0, 0xab, 0xab, 0xab, 0]);
    }

    #[test]
    fn a_huge_count_is_refused_before_allocating() {
        let mut bytes = vec![10u8];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            Msg::decode(&bytes),
            Err(MsgDecodeError::TooMany { offset: 1, .. })
        ));
        let mut bytes = vec![11u8];
        bytes.extend_from_slice(&1000u64.to_le_bytes());
        assert_eq!(
            Msg::decode(&bytes),
            Err(MsgDecodeError::Truncated { offset: 9 })
        );
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Msg::decode(&bytes);
        }

        #[test]
        fn any_page_round_trips(runs in proptest::collection::vec((0usize..PAGE_BYTES, 1usize..64, any::<u8>()), 0..40)) {
            let mut page = Box::new([0u8; PAGE_BYTES]);
            for (at, len, byte) in runs {
                let end = (at + len).min(PAGE_BYTES);
                page[at..end].fill(byte);
            }
            let msg = Msg::ReadReply { req: 0, page: 0, version_ts: 0, valid_to: 0, data: Some(page) };
            prop_assert_eq!(Msg::decode(&msg.encode()), Ok(msg));
        }

        #[test]
        fn mutated_messages_never_panic(index in any::<usize>(), at in any::<usize>(), byte in any::<u8>()) {
            let samples = samples();
            let mut bytes = samples[index % samples.len()].encode();
            let at = at % bytes.len();
            bytes[at] = byte;
            let _ = Msg::decode(&bytes);
        }
    }
}
