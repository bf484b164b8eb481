//! The page store: every committed version of every shared page this node homes, the intents
//! of commits in flight, and the registry of live snapshots.
//!
//! A snapshot is a commit timestamp `S`; reading page `P` under `S` returns the contents of the
//! newest version of `P` whose timestamp is `<= S` (or zeros). Readers go through [`PageRead`],
//! so a runner's view does not care whether a page comes from this store, a remote home or a
//! cache of one.
//!
//! A commit is two steps, the shape a two-phase commit across page homes needs:
//! - **prepare** (`prepare`): for every page the committer stored to, check that no version
//!   committed after its snapshot and no *intent* of another commit in flight stored a byte it
//!   also stored, and leave an intent (its stored bytes) on the page. Of two commits that
//!   store to a common byte, the later-prepared fails (byte-granular write–write conflicts);
//! - **commit** (`commit`) at a timestamp chosen after every prepare succeeded, which installs
//!   the new versions and removes the intents; or **abort** (`abort`), which only removes them.
//!
//! No lock spans a commit: each page is checked and marked under its shard's lock, one page at
//! a time. Commits therefore install in any order; the caller publishes timestamps in order
//! (`advance_watermark`, driven by `order::CommitOrder`), and a snapshot is only ever taken at
//! or below the watermark, below which every version is installed.
//!
//! Versions come in two shapes. A **full** version holds a whole page (`Arc<Page>`). A
//! **delta** holds only the bytes its committer stored (at most `DELTA_MAX_BYTES`, in a few
//! runs): its contents are the version just below's with those bytes laid over, so a one-word
//! commit or an exit record's status word costs a few dozen bytes, not 4.5 KiB. Reading a delta
//! materialises a page (the nearest full version below, or zeros, plus the deltas up to it);
//! nothing is cached, so a finished runner's exit record, read once by its joiner, keeps no
//! page. A run of deltas is at most `DELTA_MAX_DEPTH` long: the next version is full.
//! `read_snapshot` answers a chain of deltas over zeros holding at most `SPARSE_MAX_RUNS`
//! runs (`SparsePage`) with those bytes and builds no page at all: a view serves loads of an
//! exit record or of a child's frame from them.
//! Every version, either shape, knows exactly which bytes it stored (`Stored`: runs, or a mask
//! when they are scattered), so conflict checks stay byte-exact.
//!
//! Reclamation, per page. Pruning keeps the *contents* of:
//! - every version above the **floor** (the watermark before its latest advance) and the newest
//!   at or below it: snapshots taken later are taken at the watermark, and a child's snapshot,
//!   registered while its parent's ending takes effect, lies above the previous watermark;
//! - for each registered snapshot whose runner may access the page (its `Scope`: everything for
//!   the root, its ranges otherwise), the newest version at or below it;
//! - the version below each delta kept (a delta never loses its base).
//!
//! Any other version loses its contents; if some covering snapshot is older than it, its
//! timestamp and stored bytes stay (`Chain::stripped`) for that snapshot's conflict checks, and
//! go once no covering snapshot is older. So a long-running runner pins the contents of at most
//! one version of each page it may access, and nothing of pages it may not.
//!
//! Pruning is amortised: a chain is pruned when its versions with contents reach twice what its
//! last prune kept (at least `PRUNE_MIN_VERSIONS`), costing one pass over the chain and one over
//! the registry. Ranges a runner is granted while it runs (children's stacks, `malloc` memory)
//! are not in its scope: they must be fresh at its snapshot (the allocators hand out memory no
//! version exists of at or below it).
//!
//! Invariants:
//! - versions of a page (with contents or stripped) are in strictly increasing timestamp order;
//! - every version with `ts <= watermark` is fully installed (the caller's contract: it
//!   advances the watermark to `T` only after every commit with a timestamp `<= T` installed);
//! - a version's contents are the previous version's with its committer's stored bytes laid
//!   over. A commit installing below an already installed newer version (out-of-order
//!   installation) lays its bytes over the newer full versions too, except bytes they or a
//!   version between stored themselves; newer deltas see them through their base. No reader
//!   can hold such a newer version: it is above the watermark;
//! - a delta's base, the version just below it, has contents; a delta with no version below
//!   it was installed over zeros;
//! - two intents on one page never share a byte;
//! - every registered snapshot reads exactly the commits at or below it, on every page its scope
//!   covers, and conflicts with exactly the versions above it there.
//!
//! Readers never walk a version chain without the shard lock; they clone the `Arc` of the one
//! full version they need (or get a fresh materialised page) and use it lock-free afterwards, so
//! dropping a version never frees memory a reader uses.
//!
//! Read path, measured (callgrind, k-means N=20000 D=8 K=16 I=3 P=2, 2 workers): the 53,611
//! `PageStore::read` calls (shard read lock, hash lookup, `Arc` clone) cost 5.0 M of 10.7 G
//! instructions (0.05%, ~94 per fill); TLB fills are rare next to the arithmetic. Callgrind
//! runs threads one at a time, so it cannot show the line bouncing between cores, but at one
//! fill per 200,000 instructions the bouncing cannot matter either. `crossbeam-epoch` would need
//! `unsafe` dereferences in a `forbid(unsafe_code)` crate for no measurable gain: the lock and
//! `Arc` stay.

use crate::chains::{block_of, ChainMap};
use crate::page::{
    first_overlap, is_empty, mark, merge_masked, Mask, MemoryLimit, Page, PageSource, EMPTY_MASK,
    PAGE_BYTES,
};
use smallvec::SmallVec;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

/// Canonical page number: canonical address >> 12 (see `view::canonical`).
pub type PageKey = u64;

/// Identifies a commit in flight (its intents). Unique among commits in flight.
pub type TxnId = u64;

const SHARDS: usize = 64;

/// A version storing at most this many bytes, in at most `DELTA_MAX_RUNS` runs, is a delta.
const DELTA_MAX_BYTES: usize = 256;
const DELTA_MAX_RUNS: usize = 16;
/// Deltas a read applies at most: the version over a run this long is full.
const DELTA_MAX_DEPTH: usize = 32;
/// Stored sets of at most this many runs are kept as runs (4 bytes each), larger ones as a mask.
const STORED_MAX_RUNS: usize = 32;
/// A chain is pruned when it holds this many versions with contents, or twice what its last
/// prune kept.
const PRUNE_MIN_VERSIONS: usize = 16;

/// Where a runner's view reads committed pages from.
pub trait PageRead: Send + Sync {
    /// The contents of `key` visible at snapshot `snapshot_ts`; `None` means zeros. A reader
    /// that must copy the page (from a remote home, or to materialise a delta) can run out of
    /// page memory.
    fn read(&self, key: PageKey, snapshot_ts: u64) -> Result<Option<Arc<Page>>, MemoryLimit>;

    /// `read`, except that a page holding only a few bytes over zeros may come back as those
    /// bytes (`SnapshotPage::Sparse`) rather than as a page built for this read: an exit
    /// record read once by its joiner, a child's frame read once by the child. A reader with
    /// nothing cheaper to offer answers with `read`.
    fn read_snapshot(&self, key: PageKey, snapshot_ts: u64) -> Result<SnapshotPage, MemoryLimit> {
        Ok(match self.read(key, snapshot_ts)? {
            Some(page) => SnapshotPage::Page(page),
            None => SnapshotPage::Zero,
        })
    }
}

/// What `PageRead::read_snapshot` found.
#[derive(Debug)]
pub enum SnapshotPage {
    Zero,
    Page(Arc<Page>),
    Sparse(SparsePage),
}

/// Runs a sparse page may hold (over all the deltas it was made from), and their bytes.
const SPARSE_MAX_RUNS: usize = 4;
const SPARSE_MAX_BYTES: usize = 64;

/// A page that is zeros except for a few runs of bytes: the deltas of a chain with no full
/// version, in installation order (a later run overrides an earlier one where they overlap).
#[derive(Clone, Debug, Default)]
pub struct SparsePage {
    runs: SmallVec<[Run; 2]>,
    /// The runs' bytes, one run after the other.
    bytes: SmallVec<[u8; 24]>,
}

impl SparsePage {
    /// `bytes` at `offset`, over zeros; `None` when they do not fit in the page or are too
    /// many.
    pub fn new(offset: usize, bytes: &[u8]) -> Option<SparsePage> {
        let mut page = SparsePage::default();
        page.push(offset, bytes).then_some(page)
    }

    /// Lays `bytes` at `offset` over the page; `false` (and nothing changed) when they do not
    /// fit in the page or would make it more than a sparse page holds.
    pub fn push(&mut self, offset: usize, bytes: &[u8]) -> bool {
        let fits = offset
            .checked_add(bytes.len())
            .is_some_and(|end| end <= PAGE_BYTES);
        if !fits || bytes.is_empty() {
            return false;
        }
        // Runs the new one covers whole are dropped (it overrides them): a frame or a status
        // word written again by each owner of a reused stack or id stays one run, and the page
        // stays sparse however often it was written.
        let new = offset..offset + bytes.len();
        let covered = |run: &Run| new.start <= run.bytes().start && run.bytes().end <= new.end;
        let (dropped_runs, dropped_bytes) = self
            .runs
            .iter()
            .filter(|run| covered(run))
            .fold((0, 0), |(runs, len), run| {
                (runs + 1, len + run.bytes().len())
            });
        if self.runs.len() - dropped_runs == SPARSE_MAX_RUNS
            || self.bytes.len() - dropped_bytes + bytes.len() > SPARSE_MAX_BYTES
        {
            return false;
        }
        if dropped_runs > 0 {
            let mut kept = SparsePage::default();
            let mut next = 0;
            for run in &self.runs {
                let len = run.bytes().len();
                if !covered(run) {
                    kept.runs.push(*run);
                    kept.bytes
                        .extend_from_slice(self.bytes.get(next..next + len).unwrap_or(&[]));
                }
                next += len;
            }
            *self = kept;
        }
        self.runs.push(Run {
            offset: offset as u16,
            len: bytes.len() as u16,
        });
        self.bytes.extend_from_slice(bytes);
        true
    }

    /// `len` (1..=8) bytes at `offset` (inside the page), little-endian, zero-extended.
    pub fn load(&self, offset: usize, len: usize) -> u64 {
        let mut out = [0u8; 8];
        let len = len.min(8);
        let wanted = offset..offset + len;
        let mut next = 0;
        for run in &self.runs {
            let bytes = run.bytes();
            let start = bytes.start.max(wanted.start);
            let end = bytes.end.min(wanted.end);
            if start < end {
                let from = next + (start - bytes.start);
                if let Some(source) = self.bytes.get(from..from + (end - start)) {
                    out[start - offset..end - offset].copy_from_slice(source);
                }
            }
            next += bytes.len();
        }
        u64::from_le_bytes(out)
    }

    /// The byte ranges of the runs (they may overlap).
    pub fn byte_runs(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        self.runs.iter().map(|run| run.bytes())
    }

    /// Writes the runs into `page` (which holds zeros, or the bytes to lay them over).
    pub fn write_into(&self, page: &mut [u8; PAGE_BYTES]) {
        let mut next = 0;
        for run in &self.runs {
            let bytes = run.bytes();
            let len = bytes.len();
            if let Some(source) = self.bytes.get(next..next + len) {
                page[bytes].copy_from_slice(source);
            }
            next += len;
        }
    }

    /// The page as a delta chain's runs, or `None` when they are too many for a sparse page.
    fn of_deltas(versions: &[Version]) -> Option<SparsePage> {
        let mut page = SparsePage::default();
        for version in versions {
            let Body::Delta(bytes) = &version.body else {
                return None;
            };
            let mut next = 0;
            let mut fits = true;
            version.stored.for_each_run(|run| {
                let len = run.len();
                fits = fits
                    && bytes
                        .get(next..next + len)
                        .is_some_and(|source| page.push(run.start, source));
                next += len;
            });
            if !fits {
                return None;
            }
        }
        Some(page)
    }
}

/// Bytes `offset .. offset + len` of a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    offset: u16,
    len: u16,
}

impl Run {
    fn bytes(self) -> std::ops::Range<usize> {
        let start = usize::from(self.offset);
        start..start + usize::from(self.len)
    }
}

/// Which bytes of a page a version or an intent stored: one run (most commits store one word
/// or one contiguous stretch, and an exit record's status is one word: no allocation), a few
/// runs, or a mask when they are scattered. Made by `of_mask` (or as one run, or at most
/// `DELTA_MAX_RUNS` runs), so a set of bytes has one representation and `==` compares sets.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Stored {
    One(Run),
    /// Sorted, disjoint, not adjacent; never exactly one.
    /// Thin-boxed, so a `Stored` is 16 bytes (it is in every version and intent, inline in
    /// every chain).
    Runs(Box<Box<[Run]>>),
    Mask(Box<Mask>),
}

impl Stored {
    fn of_mask(mask: &Mask) -> Stored {
        // Two scans of 64 words beat building a `Vec` for the common single run.
        if let Some((start, end)) = next_run(mask, 0) {
            if next_run(mask, end).is_none() {
                return Stored::One(Run {
                    offset: start as u16,
                    len: (end - start) as u16,
                });
            }
        }
        match runs_of(mask, STORED_MAX_RUNS) {
            Some(runs) => Stored::Runs(Box::new(runs.into_boxed_slice())),
            None => Stored::Mask(Box::new(*mask)),
        }
    }

    fn whole_page() -> Stored {
        Stored::One(Run {
            offset: 0,
            len: PAGE_BYTES as u16,
        })
    }

    /// The runs, unless this is a mask.
    fn runs(&self) -> Option<&[Run]> {
        match self {
            Stored::One(run) => Some(std::slice::from_ref(run)),
            Stored::Runs(runs) => Some(&runs[..]),
            Stored::Mask(_) => None,
        }
    }

    /// Small enough to be a delta.
    fn is_small(&self) -> bool {
        self.runs().is_some_and(|runs| {
            runs.len() <= DELTA_MAX_RUNS
                && runs.iter().map(|run| usize::from(run.len)).sum::<usize>() <= DELTA_MAX_BYTES
        })
    }

    fn for_each_run(&self, mut f: impl FnMut(std::ops::Range<usize>)) {
        match self {
            Stored::One(run) => f(run.bytes()),
            Stored::Runs(runs) => runs.iter().for_each(|run| f(run.bytes())),
            Stored::Mask(mask) => {
                let mut from = 0;
                while let Some((start, end)) = next_run(mask, from) {
                    f(start..end);
                    from = end;
                }
            }
        }
    }

    /// The first byte stored both here and in `mask`.
    fn first_overlap(&self, mask: &Mask) -> Option<usize> {
        match self {
            Stored::Mask(own) => first_overlap(own, mask),
            Stored::One(run) => {
                let bytes = run.bytes();
                Some(next_bit(mask, bytes.start, true)).filter(|at| *at < bytes.end)
            }
            Stored::Runs(runs) => runs.iter().find_map(|run| {
                let bytes = run.bytes();
                Some(next_bit(mask, bytes.start, true)).filter(|at| *at < bytes.end)
            }),
        }
    }

    fn to_mask(&self) -> Box<Mask> {
        match self {
            Stored::Mask(mask) => mask.clone(),
            Stored::One(_) | Stored::Runs(_) => {
                let mut mask = Box::new(EMPTY_MASK);
                self.for_each_run(|bytes| mark(&mut mask, bytes.start, bytes.len()));
                mask
            }
        }
    }

    /// Clears in `mask` the bytes stored here.
    fn clear_in(&self, mask: &mut Mask) {
        let own = self.to_mask();
        for (bits, theirs) in mask.iter_mut().zip(own.iter()) {
            *bits &= !theirs;
        }
    }
}

/// A delta's bytes: up to `INLINE_BYTES` (a word, a status) without an allocation.
#[derive(Clone, Debug)]
enum SmallBytes {
    Inline { len: u8, bytes: [u8; INLINE_BYTES] },
    Heap(Box<[u8]>),
}

const INLINE_BYTES: usize = 22;

impl SmallBytes {
    fn new(from: &[u8]) -> SmallBytes {
        if from.len() <= INLINE_BYTES {
            let mut bytes = [0u8; INLINE_BYTES];
            bytes[..from.len()].copy_from_slice(from);
            SmallBytes::Inline {
                len: from.len() as u8,
                bytes,
            }
        } else {
            SmallBytes::Heap(from.into())
        }
    }
}

impl std::ops::Deref for SmallBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            SmallBytes::Inline { len, bytes } => &bytes[..usize::from(*len)],
            SmallBytes::Heap(bytes) => bytes,
        }
    }
}

/// The first offset at or after `from` whose bit is `set`, or `PAGE_BYTES`.
fn next_bit(mask: &Mask, from: usize, set: bool) -> usize {
    let words = mask.len();
    let mut word = from / 64;
    if word >= words {
        return PAGE_BYTES;
    }
    let load = |word: usize| if set { mask[word] } else { !mask[word] };
    let mut bits = load(word) & (u64::MAX << (from % 64));
    loop {
        if bits != 0 {
            return word * 64 + bits.trailing_zeros() as usize;
        }
        word += 1;
        if set {
            // Most masks are a few bytes of a page: skip zero words eight at a time.
            while let Some(chunk) = mask.get(word..word + 8) {
                if chunk.iter().fold(0, |any, w| any | w) != 0 {
                    break;
                }
                word += 8;
            }
        }
        if word == words {
            return PAGE_BYTES;
        }
        bits = load(word);
    }
}

/// The first run of set bits at or after `from`: `(start, end)`.
fn next_run(mask: &Mask, from: usize) -> Option<(usize, usize)> {
    let start = next_bit(mask, from, true);
    (start < PAGE_BYTES).then(|| (start, next_bit(mask, start, false)))
}

/// The runs of `mask`, if there are at most `limit`.
fn runs_of(mask: &Mask, limit: usize) -> Option<Vec<Run>> {
    let mut runs = Vec::new();
    let mut from = 0;
    while let Some((start, end)) = next_run(mask, from) {
        if runs.len() == limit {
            return None;
        }
        runs.push(Run {
            offset: start as u16,
            len: (end - start) as u16,
        });
        from = end;
    }
    Some(runs)
}

/// A version's contents.
#[derive(Debug)]
enum Body {
    Full(Arc<Page>),
    /// The stored bytes, in address order, over the version just below.
    Delta(SmallBytes),
}

#[derive(Debug)]
struct Version {
    ts: u64,
    stored: Stored,
    body: Body,
}

#[derive(Debug)]
struct Intent {
    txn: TxnId,
    stored: Stored,
}

/// One page: its versions, oldest first, and the intents of commits in flight.
#[derive(Debug, Default)]
struct Chain {
    /// Versions with contents. Most pages (exit records, a runner's own pages) only ever have
    /// one: it lives in the chain itself, so a lookup touches one run of cache lines, not
    /// two, and the page costs no allocation of its own.
    versions: SmallVec<[Version; 1]>,
    /// Versions whose contents no snapshot can read any more, for the conflict checks of the
    /// covering snapshots older than them: timestamp -> stored bytes.
    stripped: Stripped,
    /// Rarely more than one at once: inline, so a commit allocates nothing for its intent.
    intents: SmallVec<[Intent; 1]>,
    /// `versions.len()` at which the next prune runs (at least `PRUNE_MIN_VERSIONS`).
    prune_at: u32,
}

/// A chain's stripped versions: timestamp -> stored bytes. Boxed, since few chains ever have
/// one, and chains lie inline in their block's vector (`chains::ChainMap`): a chain's size is
/// what every lookup (cache lines) and every growth of a block (bytes moved) pays. With it and
/// `prune_at` in 32 bits, a chain is at most 120 bytes, not 136.
// The box is the point: 8 bytes in the entry where an empty `BTreeMap` takes 24.
#[allow(clippy::box_collection)]
#[derive(Debug, Default)]
struct Stripped(Option<Box<BTreeMap<u64, Stored>>>);

impl Stripped {
    /// Those with a timestamp in `range`, oldest first.
    fn range(
        &self,
        range: (Bound<u64>, Bound<u64>),
    ) -> impl DoubleEndedIterator<Item = (&u64, &Stored)> + '_ {
        self.0.iter().flat_map(move |map| map.range(range))
    }

    fn insert(&mut self, ts: u64, stored: Stored) {
        self.0.get_or_insert_with(Box::default).insert(ts, stored);
    }

    fn clear(&mut self) {
        self.0 = None;
    }

    /// Drops those at or below `ts`.
    fn drop_through(&mut self, ts: u64) {
        if let Some(map) = &mut self.0 {
            if map.first_key_value().is_some_and(|(first, _)| *first <= ts) {
                **map = map.split_off(&ts.saturating_add(1));
            }
            if map.is_empty() {
                self.0 = None;
            }
        }
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |map| map.len())
    }
}

type Shard = RwLock<ChainMap<Chain>>;

/// A page write presented for commit.
pub struct PageWrite {
    pub key: PageKey,
    /// The runner's copy: its snapshot's contents with its stores applied.
    pub data: Page,
    /// Bytes the runner stored.
    pub stored: Box<Mask>,
}

/// A few bytes of one page, with no page behind them: an exit record's status word, or a
/// remote publication's stored bytes.
#[derive(Debug)]
pub struct PageBytes {
    pub key: PageKey,
    stored: Stored,
    /// In address order.
    bytes: SmallBytes,
}

impl PageBytes {
    /// `bytes` at `offset`; `None` when they do not fit in the page.
    pub fn new(key: PageKey, offset: usize, bytes: &[u8]) -> Option<PageBytes> {
        let end = offset.checked_add(bytes.len())?;
        (!bytes.is_empty() && end <= PAGE_BYTES).then(|| PageBytes {
            key,
            stored: Stored::One(Run {
                offset: offset as u16,
                len: bytes.len() as u16,
            }),
            bytes: SmallBytes::new(bytes),
        })
    }

    /// The bytes `mask` selects, `bytes` holding one per set bit in address order; `None`
    /// when they are too many or too scattered to go without a page (or do not match `mask`).
    pub fn from_mask(key: PageKey, mask: &Mask, bytes: &[u8]) -> Option<PageBytes> {
        let runs = runs_of(mask, DELTA_MAX_RUNS)?;
        let stored = match runs[..] {
            [run] => Stored::One(run),
            _ => Stored::Runs(Box::new(runs.into_boxed_slice())),
        };
        let count: usize = mask.iter().map(|word| word.count_ones() as usize).sum();
        (stored.is_small() && count == bytes.len() && count > 0).then(|| PageBytes {
            key,
            stored,
            bytes: SmallBytes::new(bytes),
        })
    }

    pub fn mask(&self) -> Box<Mask> {
        self.stored.to_mask()
    }

    /// The stored bytes in address order.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// What the runtime publishes without a conflict check (an exit record).
pub enum Publication {
    /// A page the runner wrote; `base_ts` is the snapshot its copy was made from (`None`: only
    /// its stored bytes count).
    Page {
        write: PageWrite,
        base_ts: Option<u64>,
    },
    /// Only a few bytes: no page is allocated for them.
    Bytes(PageBytes),
}

impl Publication {
    pub fn key(&self) -> PageKey {
        match self {
            Publication::Page { write, .. } => write.key,
            Publication::Bytes(bytes) => bytes.key,
        }
    }

    /// The bytes it changes (watchers test these).
    pub fn change(&self) -> Change {
        match self {
            Publication::Page { write, .. } => (write.key, Changed::of_mask(&write.stored)),
            Publication::Bytes(bytes) => (bytes.key, Changed(bytes.stored.clone())),
        }
    }
}

/// What an install receives.
enum Incoming {
    Page {
        data: Page,
        stored: Box<Mask>,
        /// `stored` as runs, when the caller has them (its intent's).
        runs: Option<Stored>,
        base_ts: Option<u64>,
    },
    Bytes {
        stored: Stored,
        bytes: SmallBytes,
    },
}

/// What a commit collided with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConflictWith {
    /// A commit installed after the committer's snapshot, at this timestamp.
    Committed { ts: u64 },
    /// A commit in flight that prepared this byte first.
    Prepared { txn: TxnId },
}

/// Why a commit failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub key: PageKey,
    /// Byte offset within the page of the first byte both stored.
    pub offset: usize,
    pub with: ConflictWith,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addr = (self.key << crate::page::PAGE_SHIFT) + self.offset as u64;
        match self.with {
            ConflictWith::Committed { ts } => {
                write!(
                    f,
                    "another runner's commit (ts {ts}) stored to {addr:#x} too"
                )
            }
            ConflictWith::Prepared { .. } => {
                write!(
                    f,
                    "another runner committing at the same time stored to {addr:#x} too"
                )
            }
        }
    }
}

/// One page's history as a holder hands it to a node that becomes a holder of it (a cluster's
/// new backup, after a holder died): every version with contents, oldest first, and the
/// stripped ones, so the copy answers reads at every snapshot and conflict checks exactly as
/// the original does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageHistory {
    /// Timestamp, the bytes that version stored, and the page's contents as of it.
    pub versions: Vec<(u64, Box<Mask>, Box<[u8; PAGE_BYTES]>)>,
    /// Timestamp and stored bytes of versions no snapshot reads any more.
    pub stripped: Vec<(u64, Box<Mask>)>,
}

impl PageHistory {
    /// The newest timestamp the history knows of.
    pub fn newest_ts(&self) -> Option<u64> {
        let versions = self.versions.iter().map(|(ts, _, _)| *ts);
        versions
            .chain(self.stripped.iter().map(|(ts, _)| *ts))
            .max()
    }
}

/// What `read_version` found.
#[derive(Debug, Default)]
pub struct VersionRead {
    /// The newest version at or below the snapshot: its timestamp and contents (`None`: zeros).
    pub version: Option<(u64, Box<[u8; PAGE_BYTES]>)>,
    /// The timestamp of the oldest version above the snapshot, if one is installed.
    pub next_ts: Option<u64>,
}

/// The bytes one commit changed on one page (watchers test these).
pub type Change = (PageKey, Changed);

/// Which bytes of a page a commit changed: runs (no allocation for one run, the common case:
/// a word, an exit record's status), or a mask when they are scattered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Changed(Stored);

impl Changed {
    pub fn of_mask(mask: &Mask) -> Changed {
        Changed(Stored::of_mask(mask))
    }

    pub fn to_mask(&self) -> Box<Mask> {
        self.0.to_mask()
    }

    /// Whether a byte of `bytes` (offsets within the page) changed.
    pub fn touches(&self, bytes: std::ops::Range<usize>) -> bool {
        if bytes.start >= bytes.end {
            return false;
        }
        match &self.0 {
            Stored::Mask(mask) => next_bit(mask, bytes.start, true) < bytes.end,
            Stored::One(_) | Stored::Runs(_) => self.0.runs().is_some_and(|runs| {
                runs.iter().any(|run| {
                    let own = run.bytes();
                    own.start < bytes.end && bytes.start < own.end
                })
            }),
        }
    }
}

/// The pages a snapshot's runner may read: what pruning keeps for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    Everything,
    /// Sorted, disjoint, not adjacent ranges of page keys.
    Pages(Box<[std::ops::Range<PageKey>]>),
}

impl Scope {
    /// The scope of these page-key ranges (in any order, possibly overlapping).
    pub fn pages(ranges: impl IntoIterator<Item = std::ops::Range<PageKey>>) -> Scope {
        let mut ranges: Vec<_> = ranges.into_iter().filter(|r| r.end > r.start).collect();
        ranges.sort_unstable_by_key(|r| r.start);
        ranges.dedup_by(|range, last| {
            let merges = range.start <= last.end;
            if merges {
                last.end = last.end.max(range.end);
            }
            merges
        });
        Scope::Pages(ranges.into_boxed_slice())
    }

    pub fn covers(&self, key: PageKey) -> bool {
        match self {
            Scope::Everything => true,
            Scope::Pages(ranges) => {
                let index = ranges.partition_point(|r| r.end <= key);
                ranges.get(index).is_some_and(|r| r.start <= key)
            }
        }
    }
}

/// Live snapshots: (timestamp, holder) -> the holder's scope and how often it registered it.
type Registry = BTreeMap<(u64, u64), (Scope, usize)>;

pub struct PageStore {
    shards: Box<[Shard]>,
    /// Every commit with a timestamp at or below this is installed; snapshots are taken here.
    watermark: AtomicU64,
    /// The watermark before its latest advance: nothing registers a snapshot below it.
    floor: AtomicU64,
    snapshots: Mutex<Registry>,
    versions_pruned: AtomicU64,
    /// Where materialised deltas come from: the first page source a commit brought (the run's
    /// account). A delta exists only after such a commit.
    pages: OnceLock<PageSource>,
}

fn shard_of(key: PageKey) -> usize {
    // A block's pages share a shard (they share an entry of its `ChainMap`); blocks spread
    // over shards by a multiplicative hash, so shards do not line up with strided access
    // patterns. Not the map's own hash: its buckets would then be alike within a shard.
    (block_of(key).wrapping_mul(0xd6e8_feb8_6659_fd93) >> 58) as usize % SHARDS
}

impl Default for PageStore {
    fn default() -> Self {
        PageStore::new()
    }
}

impl PageRead for PageStore {
    fn read(&self, key: PageKey, snapshot_ts: u64) -> Result<Option<Arc<Page>>, MemoryLimit> {
        PageStore::read(self, key, snapshot_ts)
    }

    fn read_snapshot(&self, key: PageKey, snapshot_ts: u64) -> Result<SnapshotPage, MemoryLimit> {
        PageStore::read_snapshot(self, key, snapshot_ts)
    }
}

impl PageStore {
    pub fn new() -> PageStore {
        PageStore {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(ChainMap::default()))
                .collect(),
            watermark: AtomicU64::new(0),
            floor: AtomicU64::new(0),
            snapshots: Mutex::new(BTreeMap::new()),
            versions_pruned: AtomicU64::new(0),
            pages: OnceLock::new(),
        }
    }

    /// The contents of `key` visible at snapshot `snapshot_ts`; `None` means zeros. The
    /// snapshot must be registered with a scope covering `key` (or at or above the floor).
    pub fn read(&self, key: PageKey, snapshot_ts: u64) -> Result<Option<Arc<Page>>, MemoryLimit> {
        let shard = read_lock(&self.shards[shard_of(key)]);
        let Some(chain) = shard.get(key) else {
            return Ok(None);
        };
        let Some(index) = chain.visible(snapshot_ts) else {
            return Ok(None);
        };
        match &chain.versions[index].body {
            Body::Full(page) => Ok(Some(Arc::clone(page))),
            Body::Delta(_) => {
                let pages = self.pages.get().ok_or(MemoryLimit { limit_bytes: 0 })?;
                let base = chain.versions[..=index]
                    .iter()
                    .rposition(|version| matches!(version.body, Body::Full(_)));
                let mut page = match base.map(|base| &chain.versions[base].body) {
                    Some(Body::Full(full)) => pages.copy_of(full)?,
                    _ => pages.zeroed()?,
                };
                let from = base.map_or(0, |base| base + 1);
                for version in &chain.versions[from..=index] {
                    if let Body::Delta(bytes) = &version.body {
                        apply_delta(&mut page, &version.stored, bytes);
                    }
                }
                Ok(Some(Arc::new(page)))
            }
        }
    }

    /// `PageRead::read_snapshot`: a chain of deltas over zeros holding at most
    /// `SPARSE_MAX_RUNS` runs and `SPARSE_MAX_BYTES` bytes comes back as those bytes, with no
    /// page allocated, zeroed and freed for them.
    pub fn read_snapshot(
        &self,
        key: PageKey,
        snapshot_ts: u64,
    ) -> Result<SnapshotPage, MemoryLimit> {
        {
            let shard = read_lock(&self.shards[shard_of(key)]);
            let Some(chain) = shard.get(key) else {
                return Ok(SnapshotPage::Zero);
            };
            let Some(index) = chain.visible(snapshot_ts) else {
                return Ok(SnapshotPage::Zero);
            };
            match &chain.versions[index].body {
                Body::Full(page) => return Ok(SnapshotPage::Page(Arc::clone(page))),
                Body::Delta(_) => {
                    // Deltas with no full version below were installed over zeros (module
                    // comment: a delta with no version below it).
                    if let Some(sparse) = SparsePage::of_deltas(&chain.versions[..=index]) {
                        return Ok(SnapshotPage::Sparse(sparse));
                    }
                }
            }
        }
        Ok(match self.read(key, snapshot_ts)? {
            Some(page) => SnapshotPage::Page(page),
            None => SnapshotPage::Zero,
        })
    }

    /// Like `read`, with the timestamp of the version returned and of the next version after
    /// the snapshot, if one is installed: the answer holds for every snapshot from the first up
    /// to (excluding) the second. The contents are a copy (a remote home sends them).
    pub fn read_version(&self, key: PageKey, snapshot_ts: u64) -> VersionRead {
        let shard = read_lock(&self.shards[shard_of(key)]);
        let Some(chain) = shard.get(key) else {
            return VersionRead::default();
        };
        let index = chain
            .versions
            .partition_point(|version| version.ts <= snapshot_ts);
        let next_stripped = chain
            .stripped
            .range((Bound::Excluded(snapshot_ts), Bound::Unbounded))
            .next()
            .map(|(ts, _)| *ts);
        let next_kept = chain.versions.get(index).map(|version| version.ts);
        VersionRead {
            version: chain.visible(snapshot_ts).map(|index| {
                let mut page = Box::new([0u8; PAGE_BYTES]);
                materialise_into(&chain.versions, index, &mut page);
                (chain.versions[index].ts, page)
            }),
            next_ts: match (next_kept, next_stripped) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        }
    }

    /// The version just below `ts` (with contents or stripped): `Some(Some((its timestamp,
    /// contents)))`; `Some(None)` when `key` has no version below `ts`; `None` when the one
    /// below lost its contents (only snapshots that cannot read the page lie there).
    #[allow(clippy::type_complexity)]
    pub fn version_below(
        &self,
        key: PageKey,
        ts: u64,
    ) -> Option<Option<(u64, Box<[u8; PAGE_BYTES]>)>> {
        let shard = read_lock(&self.shards[shard_of(key)]);
        let Some(chain) = shard.get(key) else {
            return Some(None);
        };
        let below = chain.versions.partition_point(|version| version.ts < ts);
        let kept = below.checked_sub(1);
        let stripped = chain
            .stripped
            .range((Bound::Unbounded, Bound::Excluded(ts)))
            .next_back()
            .map(|(stripped_ts, _)| *stripped_ts);
        match (kept, stripped) {
            (Some(index), stripped) if stripped.is_none_or(|s| s < chain.versions[index].ts) => {
                let mut page = Box::new([0u8; PAGE_BYTES]);
                materialise_into(&chain.versions, index, &mut page);
                Some(Some((chain.versions[index].ts, page)))
            }
            (None, None) => Some(None),
            _ => None,
        }
    }

    /// Every commit at or below this timestamp is installed.
    pub fn watermark(&self) -> u64 {
        self.watermark.load(Ordering::Acquire)
    }

    /// Publishes `ts`: the caller guarantees every commit with a timestamp `<= ts` installed.
    /// Snapshots registered from now on lie above the watermark before this call.
    pub fn advance_watermark(&self, ts: u64) {
        let previous = self.watermark.fetch_max(ts, Ordering::AcqRel);
        debug_assert!(
            previous <= ts,
            "watermark moved back from {previous} to {ts}"
        );
        self.floor.fetch_max(previous, Ordering::AcqRel);
    }

    pub fn versions_pruned(&self) -> u64 {
        self.versions_pruned.load(Ordering::Relaxed)
    }

    /// Installs initial contents at timestamp 0 (the image, `--load` files, the persistent
    /// store), before any runner exists.
    pub fn install_initial(&self, key: PageKey, data: Page) {
        let mut shard = write_lock(&self.shards[shard_of(key)]);
        let chain = shard.get_or_default(key);
        chain.versions.clear();
        chain.stripped.clear();
        chain.versions.push(Version {
            ts: 0,
            stored: Stored::whole_page(),
            body: Body::Full(Arc::new(data)),
        });
    }

    /// Registers a snapshot at the watermark for `holder` (a runner id), which may read `scope`.
    pub fn begin_snapshot(&self, holder: u64, scope: Scope) -> u64 {
        let mut snapshots = lock(&self.snapshots);
        let ts = self.watermark.load(Ordering::Acquire);
        snapshots.entry((ts, holder)).or_insert((scope, 0)).1 += 1;
        ts
    }

    /// Registers `holder`'s snapshot `ts` (a child's: its parent's commit timestamp). Only
    /// valid before the watermark advances past the one `ts` was taken above: while the ending
    /// that created `ts` takes effect.
    pub fn register_snapshot(&self, ts: u64, holder: u64, scope: Scope) {
        let mut snapshots = lock(&self.snapshots);
        debug_assert!(
            ts > self.floor.load(Ordering::Acquire) || ts == 0,
            "snapshot {ts} registered below the floor: its versions may be pruned"
        );
        snapshots.entry((ts, holder)).or_insert((scope, 0)).1 += 1;
    }

    pub fn end_snapshot(&self, ts: u64, holder: u64) {
        let mut snapshots = lock(&self.snapshots);
        if let Some((_, count)) = snapshots.get_mut(&(ts, holder)) {
            *count -= 1;
            if *count == 0 {
                snapshots.remove(&(ts, holder));
            }
        } else {
            debug_assert!(false, "snapshot {ts} of {holder:#x} ended twice");
        }
    }

    /// The oldest timestamp a snapshot may still read at: versions at or below it other than
    /// the newest one are garbage. On a cluster, node 0 (which registers every snapshot) tells
    /// the other homes, which then `advance_watermark` to it and prune by it alone.
    pub fn prune_horizon(&self) -> u64 {
        let snapshots = lock(&self.snapshots);
        // With no snapshot registered, the next one is taken at the watermark or later.
        snapshots
            .keys()
            .next()
            .map(|(ts, _)| *ts)
            .unwrap_or_else(|| self.watermark.load(Ordering::Acquire))
    }

    /// The floor and the registered snapshots covering `key`, oldest first.
    fn keep_points(&self, key: PageKey) -> (u64, Vec<u64>) {
        let snapshots = lock(&self.snapshots);
        // Read under the registry lock: a snapshot registered after this is above the floor.
        let floor = self.floor.load(Ordering::Acquire);
        let mut covering: Vec<u64> = Vec::new();
        for ((ts, _), (scope, _)) in snapshots.iter() {
            if covering.last() != Some(ts) && scope.covers(key) {
                covering.push(*ts);
            }
        }
        (floor, covering)
    }

    /// Prepare: checks every page of `writes` against versions committed after
    /// `snapshot_ts` and against other commits' intents, leaving an intent of `txn` on each.
    /// On a conflict no intent of `txn` is left behind.
    pub fn prepare(
        &self,
        txn: TxnId,
        snapshot_ts: u64,
        writes: &[PageWrite],
    ) -> Result<(), Conflict> {
        for (done, write) in writes.iter().enumerate() {
            let mut shard = write_lock(&self.shards[shard_of(write.key)]);
            let chain = shard.get_or_default(write.key);
            if let Some(conflict) = conflict_in(chain, txn, snapshot_ts, write) {
                drop(shard);
                self.abort(txn, writes[..done].iter().map(|write| write.key));
                return Err(conflict);
            }
            chain.intents.push(Intent {
                txn,
                stored: Stored::of_mask(&write.stored),
            });
        }
        Ok(())
    }

    /// Removes the intents `txn` left on `keys`.
    pub fn abort(&self, txn: TxnId, keys: impl Iterator<Item = PageKey>) {
        for key in keys {
            let mut shard = write_lock(&self.shards[shard_of(key)]);
            if let Some(chain) = shard.get_mut(key) {
                take_intent(chain, txn);
            }
        }
    }

    /// Commit: the prepared `writes` of `txn` become versions at `ts`. `base_ts` is the
    /// snapshot the writes' copies were made from, or `None` when only their stored bytes are
    /// meaningful (a remote committer sends only those). What changed is the writes' stored
    /// bytes: the caller has them.
    pub fn commit(
        &self,
        txn: TxnId,
        base_ts: Option<u64>,
        ts: u64,
        writes: Vec<PageWrite>,
        pages: &PageSource,
    ) {
        self.pages.get_or_init(|| pages.clone());
        for write in writes {
            let mut shard = write_lock(&self.shards[shard_of(write.key)]);
            let chain = shard.get_or_default(write.key);
            let intent = take_intent(chain, txn);
            debug_assert!(intent.is_some(), "commit without prepare");
            let incoming = Incoming::Page {
                data: write.data,
                stored: write.stored,
                // The intent holds the same bytes as runs: no second pass over the mask.
                runs: intent.map(|intent| intent.stored),
                base_ts,
            };
            self.install(write.key, chain, ts, incoming, pages);
        }
    }

    /// Installs `publication` at `ts` without a conflict check or intent: the runtime's
    /// exit-record publication. What it changes is `publication.change()`, for a caller that
    /// needs it.
    pub fn publish(&self, ts: u64, publication: Publication, pages: &PageSource) {
        self.pages.get_or_init(|| pages.clone());
        let (key, incoming) = match publication {
            Publication::Page { write, base_ts } => (
                write.key,
                Incoming::Page {
                    data: write.data,
                    stored: write.stored,
                    runs: None,
                    base_ts,
                },
            ),
            Publication::Bytes(bytes) => (
                bytes.key,
                Incoming::Bytes {
                    stored: bytes.stored,
                    bytes: bytes.bytes,
                },
            ),
        };
        let mut shard = write_lock(&self.shards[shard_of(key)]);
        let chain = shard.get_or_default(key);
        self.install(key, chain, ts, incoming, pages);
    }

    fn install(
        &self,
        key: PageKey,
        chain: &mut Chain,
        ts: u64,
        incoming: Incoming,
        pages: &PageSource,
    ) {
        let at = chain.versions.partition_point(|version| version.ts < ts);
        debug_assert!(
            chain.versions.get(at).is_none_or(|v| v.ts > ts),
            "ts {ts} installed twice"
        );
        let below = &chain.versions[..at];
        let depth = below
            .iter()
            .rev()
            .take(DELTA_MAX_DEPTH)
            .take_while(|version| matches!(version.body, Body::Delta(_)))
            .count();
        let (stored, body) = match incoming {
            Incoming::Page {
                data,
                stored: mask,
                runs,
                base_ts,
            } => {
                let stored = runs.unwrap_or_else(|| Stored::of_mask(&mask));
                if stored.is_small() && depth < DELTA_MAX_DEPTH {
                    // The runner's page is freed here: its stored bytes are all a delta needs.
                    let bytes = gather(&data, &stored);
                    let mut runs: SmallVec<[std::ops::Range<usize>; 4]> = SmallVec::new();
                    stored.for_each_run(|run| runs.push(run));
                    data.free_clearing(runs);
                    (stored, Body::Delta(bytes))
                } else {
                    let data = full_contents(below, data, &mask, base_ts, pages);
                    (stored, Body::Full(Arc::new(data)))
                }
            }
            Incoming::Bytes { stored, bytes } => {
                let full = (depth >= DELTA_MAX_DEPTH)
                    .then(|| pages.zeroed().ok())
                    .flatten();
                match full {
                    Some(mut page) => {
                        if let Some(last) = below.len().checked_sub(1) {
                            materialise_into(below, last, &mut page);
                        }
                        apply_delta(&mut page, &stored, &bytes);
                        (stored, Body::Full(Arc::new(page)))
                    }
                    // Out of page memory: one delta more is still exact.
                    None => (stored, Body::Delta(bytes)),
                }
            }
        };
        if at < chain.versions.len() {
            lay_over_newer(&mut chain.versions[at..], &stored, &body, pages);
        }
        chain.versions.insert(at, Version { ts, stored, body });
        if chain.versions.len() >= (chain.prune_at as usize).max(PRUNE_MIN_VERSIONS) {
            self.prune(key, chain);
        }
    }

    /// Drops the contents of versions no snapshot can read (module comment: Reclamation).
    fn prune(&self, key: PageKey, chain: &mut Chain) {
        let (floor, covering) = self.keep_points(key);
        let versions = std::mem::take(&mut chain.versions);
        let mut keep = vec![false; versions.len()];
        let above = versions.partition_point(|version| version.ts <= floor);
        keep[above.saturating_sub(1)..].fill(true);
        for snapshot in &covering {
            let visible = versions.partition_point(|version| version.ts <= *snapshot);
            if let Some(index) = visible.checked_sub(1) {
                keep[index] = true;
            }
        }
        for index in (1..versions.len()).rev() {
            if keep[index] && matches!(versions[index].body, Body::Delta(_)) {
                keep[index - 1] = true;
            }
        }
        let oldest_covering = covering.first().copied();
        let mut dropped = 0u64;
        chain.versions = SmallVec::with_capacity(versions.len());
        for (version, keep) in versions.into_iter().zip(keep) {
            if keep {
                chain.versions.push(version);
                continue;
            }
            dropped += 1;
            if oldest_covering.is_some_and(|oldest| version.ts > oldest) {
                chain.stripped.insert(version.ts, version.stored);
            }
        }
        match oldest_covering {
            Some(oldest) => chain.stripped.drop_through(oldest),
            None => chain.stripped.clear(),
        }
        chain.prune_at = u32::try_from(2 * chain.versions.len()).unwrap_or(u32::MAX);
        if dropped > 0 {
            self.versions_pruned.fetch_add(dropped, Ordering::Relaxed);
        }
    }

    /// Every page with an installed version, in key order.
    pub fn keys(&self) -> Vec<PageKey> {
        let mut keys: Vec<PageKey> = Vec::new();
        for shard in self.shards.iter() {
            let shard = read_lock(shard);
            let held = shard.iter();
            keys.extend(
                held.filter(|(_, c)| !c.versions.is_empty())
                    .map(|(key, _)| key),
            );
        }
        keys.sort_unstable();
        keys
    }

    /// `key`'s whole history (`None`: nothing installed), for a node that becomes its holder.
    pub fn history(&self, key: PageKey) -> Option<PageHistory> {
        let shard = read_lock(&self.shards[shard_of(key)]);
        let chain = shard.get(key)?;
        if chain.versions.is_empty() {
            return None;
        }
        let versions = (0..chain.versions.len())
            .map(|index| {
                let mut page = Box::new([0u8; PAGE_BYTES]);
                materialise_into(&chain.versions, index, &mut page);
                let version = &chain.versions[index];
                (version.ts, version.stored.to_mask(), page)
            })
            .collect();
        let all = (Bound::Unbounded, Bound::Unbounded);
        let stripped = chain.stripped.range(all);
        let stripped = stripped
            .map(|(ts, stored)| (*ts, stored.to_mask()))
            .collect();
        Some(PageHistory { versions, stripped })
    }

    /// Installs `history` as `key`'s, unless what is here is as new (a copy sent again):
    /// `Ok(false)`. Intents held here stay. The caller guarantees no commit of `key` is being
    /// installed meanwhile.
    pub fn install_history(
        &self,
        key: PageKey,
        history: &PageHistory,
        pages: &PageSource,
    ) -> Result<bool, MemoryLimit> {
        let Some(newest) = history.newest_ts() else {
            return Ok(false);
        };
        let mut versions = SmallVec::new();
        for (ts, stored, data) in &history.versions {
            versions.push(Version {
                ts: *ts,
                stored: Stored::of_mask(stored),
                body: Body::Full(Arc::new(pages.copy_of(data)?)),
            });
        }
        let mut shard = write_lock(&self.shards[shard_of(key)]);
        let chain = shard.get_or_default(key);
        let here = chain.versions.last().map(|version| version.ts);
        let here = here.max(
            chain
                .stripped
                .range((Bound::Unbounded, Bound::Unbounded))
                .last()
                .map(|(ts, _)| *ts),
        );
        if here.is_some_and(|here| here >= newest) {
            return Ok(false);
        }
        chain.versions = versions;
        chain.stripped.clear();
        for (ts, stored) in &history.stripped {
            chain.stripped.insert(*ts, Stored::of_mask(stored));
        }
        chain.prune_at = u32::try_from(2 * chain.versions.len()).unwrap_or(u32::MAX);
        Ok(true)
    }

    /// Every page whose key is in `range`, newest version's contents, for persistence.
    pub fn newest_pages_in(
        &self,
        range: std::ops::Range<PageKey>,
    ) -> Vec<(PageKey, Box<[u8; PAGE_BYTES]>)> {
        let mut pages = Vec::new();
        for shard in self.shards.iter() {
            let shard = read_lock(shard);
            for (key, chain) in shard.iter() {
                if range.contains(&key) {
                    if let Some(newest) = chain.versions.len().checked_sub(1) {
                        let mut page = Box::new([0u8; PAGE_BYTES]);
                        materialise_into(&chain.versions, newest, &mut page);
                        pages.push((key, page));
                    }
                }
            }
        }
        pages.sort_by_key(|(key, _)| *key);
        pages
    }

    /// Number of versions with contents currently held (for tests and statistics).
    pub fn version_count(&self) -> usize {
        self.sum_over_chains(|chain| chain.versions.len())
    }

    /// Number of versions held only for conflict checks (for tests).
    pub fn stripped_count(&self) -> usize {
        self.sum_over_chains(|chain| chain.stripped.len())
    }

    /// Number of intents currently held (for tests: zero whenever no commit is in flight).
    pub fn intent_count(&self) -> usize {
        self.sum_over_chains(|chain| chain.intents.len())
    }

    fn sum_over_chains(&self, count: impl Fn(&Chain) -> usize) -> usize {
        self.shards
            .iter()
            .map(|shard| read_lock(shard).values().map(&count).sum::<usize>())
            .sum()
    }
}

impl Chain {
    /// The index of the version a snapshot reads, if any.
    fn visible(&self, snapshot_ts: u64) -> Option<usize> {
        let index = self
            .versions
            .partition_point(|version| version.ts <= snapshot_ts)
            .checked_sub(1)?;
        debug_assert!(
            self.stripped
                .range((
                    Bound::Excluded(self.versions[index].ts),
                    Bound::Included(snapshot_ts)
                ))
                .next()
                .is_none(),
            "snapshot {snapshot_ts} reads a page its scope does not cover"
        );
        Some(index)
    }
}

/// The contents of `versions[index]` into `out`.
fn materialise_into(versions: &[Version], index: usize, out: &mut [u8; PAGE_BYTES]) {
    let base = versions[..=index]
        .iter()
        .rposition(|version| matches!(version.body, Body::Full(_)));
    match base.map(|base| &versions[base].body) {
        Some(Body::Full(page)) => out.copy_from_slice(&page[..]),
        _ => out.fill(0),
    }
    for version in &versions[base.map_or(0, |base| base + 1)..=index] {
        if let Body::Delta(bytes) = &version.body {
            apply_delta(out, &version.stored, bytes);
        }
    }
}

/// Lays a delta's bytes (in address order) over `page`.
fn apply_delta(page: &mut [u8; PAGE_BYTES], stored: &Stored, bytes: &[u8]) {
    let mut next = 0;
    stored.for_each_run(|run| {
        let len = run.len();
        if let Some(source) = bytes.get(next..next + len) {
            page[run].copy_from_slice(source);
        }
        next += len;
    });
}

/// The bytes `stored` selects from `page`, in address order.
fn gather(page: &[u8; PAGE_BYTES], stored: &Stored) -> SmallBytes {
    if let Stored::One(run) = stored {
        return SmallBytes::new(&page[run.bytes()]);
    }
    let mut bytes = Vec::new();
    stored.for_each_run(|run| bytes.extend_from_slice(&page[run]));
    SmallBytes::new(&bytes)
}

/// Removes `txn`'s intent from `chain` and returns it, if there was one.
fn take_intent(chain: &mut Chain, txn: TxnId) -> Option<Intent> {
    // A commit leaves at most one intent on a page; `remove` keeps the others in prepare order.
    let at = chain.intents.iter().position(|intent| intent.txn == txn)?;
    let intent = chain.intents.remove(at);
    if chain.intents.is_empty() {
        // Back inline: a page that once had two intents at once keeps no buffer.
        chain.intents = SmallVec::new();
    }
    Some(intent)
}

/// The contents of a full version made from a runner's copy `data` that stored `mask`, over
/// the versions `below` it.
fn full_contents(
    below: &[Version],
    data: Page,
    mask: &Mask,
    base_ts: Option<u64>,
    pages: &PageSource,
) -> Page {
    match below.last() {
        // The writer's copy is exact when nothing was installed between its snapshot and `ts`;
        // otherwise its stored bytes go over the version just below `ts`.
        Some(last) if base_ts.is_none_or(|base| last.ts > base) => match &last.body {
            Body::Full(page) => merged_over(page, data, mask, pages),
            Body::Delta(_) => {
                let mut base = [0u8; PAGE_BYTES];
                materialise_into(below, below.len() - 1, &mut base);
                merged_over(&base, data, mask, pages)
            }
        },
        Some(_) => data,
        None if base_ts.is_none() => {
            // Nothing below: the page read as zeros, so only the stored bytes may be non-zero.
            let mut data = data;
            let mut zeros = [0u8; PAGE_BYTES];
            merge_masked(&mut zeros, &data, mask);
            data.copy_from_slice(&zeros);
            data
        }
        None => data,
    }
}

/// Out-of-order installation: the versions `newer` (installed above the new one) get its
/// bytes, except those they or a version between stored themselves. Deltas see them through
/// their base; full versions get them laid over.
fn lay_over_newer(newer: &mut [Version], stored: &Stored, body: &Body, pages: &PageSource) {
    let mut scratch = [0u8; PAGE_BYTES];
    let ours: &[u8; PAGE_BYTES] = match body {
        Body::Full(page) => page,
        Body::Delta(bytes) => {
            apply_delta(&mut scratch, stored, bytes);
            &scratch
        }
    };
    let mut remaining = stored.to_mask();
    for version in newer {
        version.stored.clear_in(&mut remaining);
        if is_empty(&remaining) {
            break;
        }
        if let Body::Full(page) = &mut version.body {
            lay_over(page, ours, &remaining, pages);
        }
    }
}

/// The first byte `write` stored that a version after `snapshot_ts` or another commit's intent
/// stored too.
fn conflict_in(chain: &Chain, txn: TxnId, snapshot_ts: u64, write: &PageWrite) -> Option<Conflict> {
    let newer = chain
        .versions
        .partition_point(|version| version.ts <= snapshot_ts);
    let kept = chain.versions[newer..].iter().find_map(|version| {
        version
            .stored
            .first_overlap(&write.stored)
            .map(|offset| (version.ts, offset))
    });
    let stripped = chain
        .stripped
        .range((Bound::Excluded(snapshot_ts), Bound::Unbounded))
        .find_map(|(ts, stored)| {
            stored
                .first_overlap(&write.stored)
                .map(|offset| (*ts, offset))
        });
    // The oldest colliding version, as if every version were still there.
    let committed = match (kept, stripped) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
    .map(|(ts, offset)| (offset, ConflictWith::Committed { ts }));
    let prepared = || {
        chain
            .intents
            .iter()
            .filter(|intent| intent.txn != txn)
            .find_map(|intent| {
                intent
                    .stored
                    .first_overlap(&write.stored)
                    .map(|offset| (offset, ConflictWith::Prepared { txn: intent.txn }))
            })
    };
    committed.or_else(prepared).map(|(offset, with)| Conflict {
        key: write.key,
        offset,
        with,
    })
}

/// `base` with the bytes `mask` selects taken from `ours`.
fn merged_over(base: &[u8; PAGE_BYTES], mut ours: Page, mask: &Mask, pages: &PageSource) -> Page {
    match pages.copy_of(base) {
        Ok(mut merged) => {
            merge_masked(&mut merged, &ours, mask);
            merged
        }
        Err(_) => {
            // Out of page memory: merge through a stack copy back into our own page (ours to
            // overwrite), so a commit never fails for lack of memory.
            let mut merged = [0u8; PAGE_BYTES];
            merged.copy_from_slice(&base[..]);
            merge_masked(&mut merged, &ours, mask);
            ours.copy_from_slice(&merged);
            ours
        }
    }
}

/// Lays the bytes `mask` selects from `ours` over an installed version above the watermark.
fn lay_over(version: &mut Arc<Page>, ours: &[u8; PAGE_BYTES], mask: &Mask, pages: &PageSource) {
    // No reader holds a version above the watermark, so the store's `Arc` is the only one.
    if let Some(page) = Arc::get_mut(version) {
        merge_masked(page, ours, mask);
        return;
    }
    debug_assert!(false, "a version above the watermark is shared");
    match pages.copy_of(version) {
        Ok(mut copy) => {
            merge_masked(&mut copy, ours, mask);
            *version = Arc::new(copy);
        }
        Err(_) => tracing::error!("out of page memory while merging an out-of-order commit"),
    }
}

// Lock helpers: a poisoned lock means a worker panicked while holding it; the data it guards
// (maps of immutable versions) is still consistent, so continuing is sound and keeps the VM up.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::{mark, MemoryAccount, EMPTY_MASK};

    fn source() -> PageSource {
        let topology = dvm_numa::Topology::detect();
        let pool = dvm_numa::PagePool::new(&topology, 0, 1 << 20).expect("pool");
        PageSource::new(pool, MemoryAccount::new(1 << 30))
    }

    /// The version just below a timestamp, for a published slot's previous version.
    #[test]
    fn version_below_is_the_one_before_or_none() {
        let store = PageStore::new();
        let pages = source();
        let publish = |ts: u64, offset: usize, bytes: &[u8]| {
            let bytes = PageBytes::new(7, offset, bytes).expect("fits");
            store.publish(ts, Publication::Bytes(bytes), &pages);
        };
        publish(2, 0x10, &[5]);
        publish(4, 0x20, &[6]);
        assert!(matches!(store.version_below(7, 2), Some(None)));
        assert!(matches!(store.version_below(8, 9), Some(None)));
        let Some(Some((ts, below))) = store.version_below(7, 4) else {
            panic!("version 2 lies below 4");
        };
        assert_eq!((ts, below[0x10], below[0x20]), (2, 5, 0));
        let Some(Some((ts, below))) = store.version_below(7, 9) else {
            panic!("version 4 lies below 9");
        };
        assert_eq!((ts, below[0x10], below[0x20]), (4, 5, 6));
    }

    /// Deltas over zeros come back as their bytes, with no page allocated; a later byte
    /// overrides an earlier one; a full version, or more runs than a sparse page holds, comes
    /// back as a page.
    #[test]
    fn read_snapshot_answers_deltas_over_zeros_without_a_page() {
        let store = PageStore::new();
        let pages = source();
        let publish = |ts: u64, offset: usize, bytes: &[u8]| {
            let bytes = PageBytes::new(7, offset, bytes).expect("fits");
            store.publish(ts, Publication::Bytes(bytes), &pages);
        };
        publish(1, 0xff8, &1u64.to_le_bytes());
        publish(2, 0xffc, &[9, 9]);
        store.advance_watermark(2);
        let live = pages.account().live_bytes();
        let SnapshotPage::Sparse(sparse) = store.read_snapshot(7, 2).expect("read") else {
            panic!("two small deltas over zeros are sparse");
        };
        assert_eq!(pages.account().live_bytes(), live, "no page made");
        assert_eq!(sparse.load(0xff8, 8), 0x0000_0909_0000_0001);
        assert_eq!(sparse.load(0xffb, 2), 0x0900);
        assert_eq!(sparse.load(0x100, 8), 0);
        let SnapshotPage::Sparse(older) = store.read_snapshot(7, 1).expect("read") else {
            panic!("one delta is sparse");
        };
        assert_eq!(older.load(0xff8, 8), 1);
        assert!(matches!(store.read_snapshot(7, 0), Ok(SnapshotPage::Zero)));
        assert!(matches!(store.read_snapshot(8, 2), Ok(SnapshotPage::Zero)));

        // More runs than a sparse page holds: a page, read as `read` reads it.
        for (index, ts) in (3..3 + SPARSE_MAX_RUNS as u64).enumerate() {
            publish(ts, 64 * index, &[ts as u8]);
        }
        let last = 2 + SPARSE_MAX_RUNS as u64;
        store.advance_watermark(last);
        let Ok(SnapshotPage::Page(page)) = store.read_snapshot(7, last) else {
            panic!("too many runs for a sparse page");
        };
        let read = store.read(7, last).expect("read").expect("a page");
        assert_eq!(**page, **read);

        // A full version below: a page.
        let mut data = pages.zeroed().expect("page");
        data[5] = 5;
        store.install_initial(9, data);
        let Ok(SnapshotPage::Page(page)) = store.read_snapshot(9, last) else {
            panic!("a full version is a page");
        };
        assert_eq!(page[5], 5);
    }

    /// A change kept as runs or as a mask answers "was a byte of this window changed" as the
    /// mask would, and one set of bytes has one representation.
    #[test]
    fn changed_bytes_answer_like_their_mask() {
        let mut one = EMPTY_MASK;
        mark(&mut one, 0xff8, 8);
        let mut few = EMPTY_MASK;
        mark(&mut few, 10, 3);
        mark(&mut few, 200, 70);
        let mut scattered = EMPTY_MASK;
        for offset in (0..PAGE_BYTES).step_by(97) {
            mark(&mut scattered, offset, 1);
        }
        for mask in [one, few, scattered, EMPTY_MASK] {
            let changed = Changed::of_mask(&mask);
            assert_eq!(*changed.to_mask(), mask);
            assert_eq!(changed, Changed::of_mask(&changed.to_mask()));
            for (from, to) in [
                (0, 10),
                (9, 11),
                (12, 13),
                (13, 200),
                (269, 270),
                (270, 4096),
                (0xff0, 0xff9),
                (5, 5),
            ] {
                let mut window = EMPTY_MASK;
                if to > from {
                    mark(&mut window, from, to - from);
                }
                assert_eq!(
                    changed.touches(from..to),
                    first_overlap(&window, &mask).is_some(),
                    "{from:#x}..{to:#x} of {changed:?}"
                );
            }
        }
        assert_ne!(Changed::of_mask(&one), Changed::of_mask(&few));
    }

    /// A chain stays within 120 bytes (see `Stripped`), or less where another crate of the
    /// build turns on smallvec's `union` feature.
    #[test]
    fn a_chain_is_at_most_120_bytes() {
        let size = std::mem::size_of::<Chain>();
        assert!(size <= 120, "a chain is {size} bytes");
    }

    #[test]
    fn sparse_page_refuses_what_does_not_fit() {
        assert!(SparsePage::new(PAGE_BYTES - 1, &[1, 2]).is_none());
        assert!(SparsePage::new(0, &[]).is_none());
        assert!(SparsePage::new(0, &[0; SPARSE_MAX_BYTES + 1]).is_none());
        let mut page = SparsePage::new(PAGE_BYTES - 8, &[1; 8]).expect("fits");
        assert_eq!(page.load(PAGE_BYTES - 4, 4), 0x0101_0101);
        for run in 1..SPARSE_MAX_RUNS {
            assert!(page.push(run * 8, &[2]), "run {run} fits");
        }
        assert!(!page.push(0x100, &[3]), "one run too many");
        assert_eq!(page.load(0x100, 1), 0, "a refused push changes nothing");
    }

    /// A run written again and again (a reused stack's frame) stays one run; runs a push
    /// covers whole give way to it, runs it only overlaps stay under it.
    #[test]
    fn sparse_page_runs_covered_by_a_push_give_way() {
        let mut page = SparsePage::new(0, &[1; 16]).expect("fits");
        for round in 2..100u8 {
            assert!(page.push(0, &[round; 16]), "round {round}");
        }
        assert_eq!(page.runs.len(), 1);
        assert_eq!(page.load(8, 8), u64::from_le_bytes([99; 8]));
        assert!(page.push(4, &[7; 2]));
        assert!(
            page.push(2, &[8; 8]),
            "covers the run at 4, overlaps the one at 0"
        );
        assert_eq!(page.runs.len(), 2);
        assert_eq!(
            page.load(0, 8),
            u64::from_le_bytes([99, 99, 8, 8, 8, 8, 8, 8])
        );
        assert_eq!(
            page.load(8, 8),
            u64::from_le_bytes([8, 8, 99, 99, 99, 99, 99, 99])
        );
        // A push refused for size leaves the runs it would have dropped.
        assert!(!page.push(0, &[5; SPARSE_MAX_BYTES + 1]));
        assert_eq!(page.load(2, 1), 8);
        let mut written = Box::new([0u8; PAGE_BYTES]);
        page.write_into(&mut written);
        assert_eq!(&written[..12], &[99, 99, 8, 8, 8, 8, 8, 8, 8, 8, 99, 99]);
        assert_eq!(page.byte_runs().collect::<Vec<_>>(), vec![0..16, 2..10]);
    }

    fn write(
        pages: &PageSource,
        key: PageKey,
        snapshot: Option<&Arc<Page>>,
        offset: usize,
        bytes: &[u8],
    ) -> PageWrite {
        let mut data = match snapshot {
            Some(page) => pages.copy_of(page).expect("page"),
            None => pages.zeroed().expect("page"),
        };
        data[offset..offset + bytes.len()].copy_from_slice(bytes);
        let mut stored = Box::new(EMPTY_MASK);
        mark(&mut stored, offset, bytes.len());
        PageWrite { key, data, stored }
    }

    /// Prepare and commit at `ts` (also the transaction id), then publish `ts`.
    fn commit(
        store: &PageStore,
        pages: &PageSource,
        snapshot: u64,
        ts: u64,
        writes: Vec<PageWrite>,
    ) -> Result<u64, Conflict> {
        store.prepare(ts, snapshot, &writes)?;
        store.commit(ts, Some(snapshot), ts, writes, pages);
        store.advance_watermark(ts);
        Ok(ts)
    }

    #[test]
    fn disjoint_bytes_merge_and_same_byte_conflicts() {
        let store = PageStore::new();
        let pages = source();
        let s = store.begin_snapshot(0, Scope::Everything);
        let a = write(&pages, 7, None, 0, &[1]);
        let b = write(&pages, 7, None, 1, &[2]);
        let c = write(&pages, 7, None, 1, &[2]);
        assert_eq!(commit(&store, &pages, s, 1, vec![a]), Ok(1));
        assert_eq!(commit(&store, &pages, s, 2, vec![b]), Ok(2));
        let conflict = commit(&store, &pages, s, 3, vec![c]).expect_err("same byte, same value");
        assert_eq!(
            (conflict.key, conflict.offset, conflict.with),
            (7, 1, ConflictWith::Committed { ts: 2 })
        );
        assert_eq!(store.intent_count(), 0, "a failed prepare leaves no intent");
        let page = store
            .read(7, store.watermark())
            .expect("read")
            .expect("written");
        assert_eq!(&page[..3], &[1, 2, 0]);
        assert!(
            store.read(7, s).expect("read").is_none(),
            "the old snapshot still sees zeros"
        );
        store.end_snapshot(s, 0);
    }

    #[test]
    fn the_later_prepared_of_two_commits_in_flight_fails() {
        let store = PageStore::new();
        let pages = source();
        let s = store.begin_snapshot(0, Scope::Everything);
        let first = vec![
            write(&pages, 3, None, 8, &[1, 1]),
            write(&pages, 4, None, 0, &[1]),
        ];
        let second = vec![
            write(&pages, 5, None, 0, &[2]),
            write(&pages, 3, None, 9, &[2]),
        ];
        store.prepare(10, s, &first).expect("first prepares");
        let conflict = store
            .prepare(11, s, &second)
            .expect_err("byte 9 of page 3 is taken");
        assert_eq!(
            (conflict.key, conflict.offset, conflict.with),
            (3, 9, ConflictWith::Prepared { txn: 10 })
        );
        assert_eq!(
            store.intent_count(),
            2,
            "the loser's intent on page 5 is gone"
        );
        store.abort(10, first.iter().map(|w| w.key));
        assert_eq!(store.intent_count(), 0);
        let retry = vec![write(&pages, 3, None, 9, &[2])];
        assert_eq!(
            commit(&store, &pages, s, 1, retry),
            Ok(1),
            "free after the abort"
        );
        store.end_snapshot(s, 0);
    }

    #[test]
    fn intents_of_every_shape_conflict_at_exactly_the_first_shared_byte() {
        let store = PageStore::new();
        let pages = source();
        let s = store.begin_snapshot(0, Scope::Everything);
        // One run, three runs, and 40 scattered bytes (kept as a mask), on pages 1, 2, 3.
        let mut scattered = write(&pages, 3, None, 0, &[1]);
        for byte in (0..40).map(|i| 100 + 3 * i) {
            mark(&mut scattered.stored, byte, 1);
        }
        let mut runs = write(&pages, 2, None, 10, &[1; 4]);
        mark(&mut runs.stored, 50, 2);
        mark(&mut runs.stored, 90, 8);
        store
            .prepare(
                10,
                s,
                &[write(&pages, 1, None, 16, &[1; 8]), runs, scattered],
            )
            .expect("prepares");
        let probe = |key: PageKey, offset: usize, len: usize| {
            let result = store.prepare(11, s, &[write(&pages, key, None, offset, &vec![2; len])]);
            if result.is_ok() {
                store.abort(11, std::iter::once(key));
            }
            result
                .err()
                .map(|conflict| (conflict.key, conflict.offset, conflict.with))
        };
        let theirs = ConflictWith::Prepared { txn: 10 };
        assert_eq!(probe(1, 8, 8), None, "ends just before the run");
        assert_eq!(probe(1, 24, 8), None, "starts just after it");
        assert_eq!(probe(1, 12, 8), Some((1, 16, theirs)));
        assert_eq!(probe(2, 14, 36), None, "between the runs");
        assert_eq!(
            probe(2, 40, 60),
            Some((2, 50, theirs)),
            "the first of two runs it covers"
        );
        assert_eq!(probe(3, 101, 2), None, "between scattered bytes");
        assert_eq!(probe(3, 101, 20), Some((3, 103, theirs)));
        assert_eq!(store.intent_count(), 3, "only the first commit's intents");
        store.abort(10, [1, 2, 3].into_iter());
        assert_eq!(store.intent_count(), 0);
        assert_eq!(probe(3, 0, 4096), None, "free after the abort");
        store.end_snapshot(s, 0);
    }

    #[test]
    fn out_of_order_installation_gives_every_version_every_earlier_byte() {
        let store = PageStore::new();
        let pages = source();
        let s = store.begin_snapshot(0, Scope::Everything);
        let early = vec![write(&pages, 9, None, 0, &[1, 1])];
        let late = vec![write(&pages, 9, None, 1, &[2, 2])];
        store.prepare(100, s, &early).expect("prepare early");
        store.prepare(101, s, &late).expect_err("byte 1 overlaps");
        let late = vec![write(&pages, 9, None, 2, &[2, 2])];
        store.prepare(101, s, &late).expect("disjoint bytes");
        // ts 2 installs before ts 1.
        store.commit(101, Some(s), 2, late, &pages);
        store.commit(100, None, 1, early, &pages);
        store.advance_watermark(2);
        assert_eq!(
            &store.read(9, 1).expect("read").expect("ts 1")[..5],
            &[1, 1, 0, 0, 0]
        );
        assert_eq!(
            &store.read(9, 2).expect("read").expect("ts 2")[..5],
            &[1, 1, 2, 2, 0]
        );
        store.end_snapshot(s, 0);
    }

    #[test]
    fn an_exit_record_publication_merges_over_the_newest_version() {
        let store = PageStore::new();
        let pages = source();
        let s = store.begin_snapshot(0, Scope::Everything);
        commit(&store, &pages, s, 1, vec![write(&pages, 2, None, 0, &[7])]).expect("commit");
        let status = write(&pages, 2, None, 8, &[9]);
        store.publish(
            2,
            Publication::Page {
                write: status,
                base_ts: None,
            },
            &pages,
        );
        store.advance_watermark(2);
        assert_eq!(
            &store.read(2, 2).expect("read").expect("page")[..9],
            &[7, 0, 0, 0, 0, 0, 0, 0, 9]
        );
        store.end_snapshot(s, 0);
    }

    /// A full-page write of `value` to `key` (every byte stored): a full version.
    fn whole_page(pages: &PageSource, key: PageKey, value: u8) -> PageWrite {
        let mut data = pages.zeroed().expect("page");
        data.fill(value);
        PageWrite {
            key,
            data,
            stored: Box::new(crate::page::FULL_MASK),
        }
    }

    fn live_pages(pages: &PageSource) -> u64 {
        pages.account().live_bytes() / PAGE_BYTES as u64
    }

    #[test]
    fn only_versions_a_covering_snapshot_reads_keep_their_contents() {
        let store = PageStore::new();
        let pages = source();
        let old = store.begin_snapshot(1, Scope::pages(std::iter::once(9..10)));
        for round in 1..=40u8 {
            let s = store.begin_snapshot(2, Scope::Everything);
            let w = whole_page(&pages, 9, round);
            commit(&store, &pages, s, u64::from(round), vec![w]).expect("no conflict");
            store.end_snapshot(s, 2);
        }
        assert!(
            store.version_count() < PRUNE_MIN_VERSIONS,
            "{} versions with contents",
            store.version_count()
        );
        assert!(store.versions_pruned() > 0);
        assert!(
            store.read(9, old).expect("read").is_none(),
            "the old snapshot still reads zeros"
        );
        assert_eq!(store.read(9, 40).expect("read").expect("page")[0], 40);
        // The old snapshot still conflicts with the first commit after it, exactly.
        let late = write(&pages, 9, None, 5, &[1]);
        assert_eq!(
            store.prepare(99, old, &[late]),
            Err(Conflict {
                key: 9,
                offset: 5,
                with: ConflictWith::Committed { ts: 1 }
            })
        );
        store.end_snapshot(old, 1);
        for round in 41..=60u8 {
            let s = store.begin_snapshot(2, Scope::Everything);
            let w = whole_page(&pages, 9, round);
            commit(&store, &pages, s, u64::from(round), vec![w]).expect("no conflict");
            store.end_snapshot(s, 2);
        }
        assert_eq!(
            store.stripped_count(),
            0,
            "with no covering snapshot left, no stripped version is kept"
        );
    }

    #[test]
    fn commits_next_to_a_long_lived_unrelated_snapshot_keep_page_memory_flat() {
        let store = PageStore::new();
        let pages = source();
        // A runner that runs the whole time, using a range far from the page committed to.
        let spinner = store.begin_snapshot(1, Scope::pages(std::iter::once(1000..1010)));
        let mut peak_after_warmup = 0;
        for ts in 1..=100_000u64 {
            let s = store.watermark();
            let w = whole_page(&pages, 7, ts as u8);
            store
                .prepare(ts, s, std::slice::from_ref(&w))
                .expect("no conflict");
            store.commit(ts, Some(s), ts, vec![w], &pages);
            store.advance_watermark(ts);
            if ts >= 1_000 {
                peak_after_warmup = peak_after_warmup.max(live_pages(&pages));
            }
        }
        assert!(
            peak_after_warmup <= 2 * PRUNE_MIN_VERSIONS as u64,
            "{peak_after_warmup} pages live"
        );
        assert_eq!(store.stripped_count(), 0, "nothing kept for conflicts");
        assert_eq!(
            store
                .read(7, store.watermark())
                .expect("read")
                .expect("page")[9],
            0xa0
        );
        store.end_snapshot(spinner, 1);
    }

    #[test]
    fn a_covering_long_lived_snapshot_pins_one_version_and_conflict_records_only() {
        let store = PageStore::new();
        let pages = source();
        commit(&store, &pages, 0, 1, vec![whole_page(&pages, 7, 1)]).expect("commit");
        let spinner = store.begin_snapshot(1, Scope::pages(std::iter::once(7..8)));
        for ts in 2..=20_000u64 {
            let s = store.watermark();
            let w = whole_page(&pages, 7, ts as u8);
            commit(&store, &pages, s, ts, vec![w]).expect("no conflict");
        }
        assert!(
            live_pages(&pages) <= 2 * PRUNE_MIN_VERSIONS as u64,
            "{} pages live",
            live_pages(&pages)
        );
        assert_eq!(store.read(7, spinner).expect("read").expect("page")[0], 1);
        let late = write(&pages, 7, None, 4095, &[1]);
        assert_eq!(
            store.prepare(1 << 40, spinner, &[late]),
            Err(Conflict {
                key: 7,
                offset: 4095,
                with: ConflictWith::Committed { ts: 2 }
            })
        );
        store.end_snapshot(spinner, 1);
    }

    #[test]
    fn a_copied_history_reads_and_conflicts_like_the_original() {
        let store = PageStore::new();
        let pages = source();
        commit(&store, &pages, 0, 1, vec![whole_page(&pages, 7, 1)]).expect("commit");
        let old = store.begin_snapshot(1, Scope::pages(std::iter::once(7..8)));
        for ts in 2..=100u64 {
            let w = write(&pages, 7, None, (ts as usize * 8) % 4000, &[ts as u8]);
            commit(&store, &pages, store.watermark(), ts, vec![w]).expect("no conflict");
        }
        let history = store.history(7).expect("a history");
        assert!(
            !history.stripped.is_empty(),
            "pruned versions travel as conflict records"
        );
        let copy = PageStore::new();
        assert_eq!(copy.history(7), None);
        assert_eq!(copy.install_history(7, &history, &pages), Ok(true));
        assert_eq!(copy.history(7).as_ref(), Some(&history));
        assert_eq!(
            copy.install_history(7, &history, &pages),
            Ok(false),
            "sent again"
        );
        for ts in [old, 100] {
            let original = store.read(7, ts).expect("read").expect("page");
            let copied = copy.read(7, ts).expect("read").expect("page");
            assert_eq!(original[..], copied[..], "at {ts}");
        }
        let late = |pages: &PageSource| write(pages, 7, None, 16, &[9]);
        let expected = store.prepare(1 << 40, old, &[late(&pages)]);
        assert!(expected.is_err());
        assert_eq!(copy.prepare(1 << 40, old, &[late(&pages)]), expected);
        assert_eq!(copy.keys(), vec![7]);
        store.end_snapshot(old, 1);
    }

    #[test]
    fn an_exit_record_of_a_runner_that_wrote_none_allocates_no_page() {
        let store = PageStore::new();
        let pages = source();
        commit(
            &store,
            &pages,
            0,
            1,
            vec![write(&pages, 3, None, 100, &[5])],
        )
        .expect("commit");
        let allocated = pages.account().pages_allocated();
        let status = PageBytes::new(3, 8, &7u64.to_le_bytes()).expect("fits");
        let publication = Publication::Bytes(status);
        let change = publication.change();
        store.publish(2, publication, &pages);
        store.advance_watermark(2);
        assert_eq!(
            pages.account().pages_allocated(),
            allocated,
            "no page allocated for a status word"
        );
        assert_eq!(live_pages(&pages), 0, "nor kept");
        let mut expected = EMPTY_MASK;
        mark(&mut expected, 8, 8);
        assert_eq!(change, (3, Changed::of_mask(&expected)));
        let page = store.read(3, 2).expect("read").expect("page");
        assert_eq!(&page[8..16], &7u64.to_le_bytes());
        assert_eq!(page[100], 5, "over the version below");
        assert!(page
            .iter()
            .enumerate()
            .all(|(i, b)| *b == 0 || i == 100 || i == 8));
        drop(page);
        assert_eq!(live_pages(&pages), 0, "a materialised read is not kept");
        assert!(PageBytes::new(3, PAGE_BYTES - 4, &[0; 8]).is_none());
    }

    #[test]
    fn a_one_word_commit_keeps_no_page_and_a_small_version() {
        let store = PageStore::new();
        let pages = source();
        commit(
            &store,
            &pages,
            0,
            1,
            vec![write(&pages, 3, None, 64, &[1; 8])],
        )
        .expect("commit");
        assert_eq!(live_pages(&pages), 0, "the runner's copy is freed");
        // The version itself: the struct, its one run and its eight bytes.
        let all_in = std::mem::size_of::<Version>()
            + std::mem::size_of::<Run>()
            + 8
            + std::mem::size_of::<Chain>();
        assert!(all_in < 256, "{all_in} bytes");
    }

    #[test]
    fn a_blocks_pages_share_a_shard_and_blocks_spread() {
        let base = 0x3d1_ffc4_a000u64 >> 12; // a runner-id page
        for key in base..base + 4096 {
            if block_of(key) == block_of(base) {
                assert_eq!(shard_of(key), shard_of(base));
            }
        }
        // Blocks (also regions aligned to large powers of two) spread over shards.
        let mut per_shard = [0usize; SHARDS];
        for block in 0..(SHARDS as u64 * 64) {
            let key = (block << 24) | (base % 8);
            per_shard[shard_of(key)] += 1;
        }
        assert!(
            per_shard.iter().all(|n| (16..=160).contains(n)),
            "{per_shard:?}"
        );
    }

    #[test]
    fn out_of_order_deltas_and_full_versions_see_every_earlier_byte() {
        let store = PageStore::new();
        let pages = source();
        commit(&store, &pages, 0, 1, vec![whole_page(&pages, 4, 9)]).expect("commit");
        let s = store.watermark();
        let base = store.read(4, s).expect("read");
        let small = vec![write(&pages, 4, base.as_ref(), 0, &[1])];
        let mut big = write(&pages, 4, base.as_ref(), 1, &[2; 1000]);
        big.data[2000] = 3;
        mark(&mut big.stored, 2000, 1);
        let big = vec![big];
        let tiny = vec![write(&pages, 4, base.as_ref(), 3000, &[4])];
        store.prepare(10, s, &small).expect("prepare");
        store.prepare(11, s, &big).expect("prepare");
        store.prepare(12, s, &tiny).expect("prepare");
        // ts 4 (delta), then ts 3 (full), then ts 2 (delta): each below the ones installed.
        store.commit(12, Some(s), 4, tiny, &pages);
        store.commit(11, Some(s), 3, big, &pages);
        store.commit(10, Some(s), 2, small, &pages);
        store.advance_watermark(4);
        let at = |ts| store.read(4, ts).expect("read").expect("page");
        assert_eq!((at(2)[0], at(2)[1], at(2)[2000], at(2)[3000]), (1, 9, 9, 9));
        assert_eq!((at(3)[0], at(3)[1], at(3)[2000], at(3)[3000]), (1, 2, 3, 9));
        assert_eq!((at(4)[0], at(4)[1], at(4)[2000], at(4)[3000]), (1, 2, 3, 4));
    }

    /// One commit in the reference: its timestamp, page and (offset, byte) stores.
    type ModelCommit = (u64, PageKey, Vec<(usize, u8)>);

    /// Full-page semantics, the reference: every commit's stored bytes, in timestamp order.
    #[derive(Default)]
    struct Model {
        commits: Vec<ModelCommit>,
    }

    impl Model {
        fn page(&self, key: PageKey, snapshot: u64) -> [u8; PAGE_BYTES] {
            let mut page = [0u8; PAGE_BYTES];
            let mut commits: Vec<_> = self
                .commits
                .iter()
                .filter(|(ts, k, _)| *k == key && *ts <= snapshot)
                .collect();
            commits.sort_by_key(|(ts, _, _)| *ts);
            for (_, _, bytes) in commits {
                for (offset, byte) in bytes {
                    page[*offset] = *byte;
                }
            }
            page
        }

        fn conflict(&self, key: PageKey, snapshot: u64, mask: &Mask) -> Option<(u64, usize)> {
            let mut commits: Vec<_> = self
                .commits
                .iter()
                .filter(|(ts, k, _)| *k == key && *ts > snapshot)
                .collect();
            commits.sort_by_key(|(ts, _, _)| *ts);
            commits.iter().find_map(|(ts, _, bytes)| {
                let mut theirs = EMPTY_MASK;
                for (offset, _) in bytes {
                    mark(&mut theirs, *offset, 1);
                }
                first_overlap(&theirs, mask).map(|offset| (*ts, offset))
            })
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// A commit to `key` at the snapshot of live holder `snapshot % live` (or the
        /// watermark), storing `len` bytes at each offset.
        Commit {
            key: PageKey,
            snapshot: usize,
            offsets: Vec<usize>,
            len: usize,
            value: u8,
        },
        /// Two disjoint commits installed in reverse timestamp order.
        Reversed {
            key: PageKey,
            first: usize,
            second: usize,
            value: u8,
        },
        Begin {
            scope: Vec<PageKey>,
        },
        End {
            holder: usize,
        },
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0..3u64, 0..8usize, proptest::collection::vec(0..PAGE_BYTES, 1..4),
                prop_oneof![3 => 1..9usize, 1 => 200..600usize, 1 => Just(PAGE_BYTES)], any::<u8>())
                .prop_map(|(key, snapshot, offsets, len, value)| Op::Commit { key, snapshot, offsets, len, value }),
            1 => (0..3u64, 0..2000usize, 2100..4000usize, any::<u8>())
                .prop_map(|(key, first, second, value)| Op::Reversed { key, first, second, value }),
            1 => proptest::collection::vec(0..3u64, 0..3).prop_map(|scope| Op::Begin { scope }),
            1 => (0..8usize).prop_map(|holder| Op::End { holder }),
        ]
    }

    /// The page `read_snapshot` describes, whichever shape it came in.
    fn snapshot_bytes(store: &PageStore, key: PageKey, snapshot: u64) -> [u8; PAGE_BYTES] {
        match store.read_snapshot(key, snapshot).expect("read") {
            SnapshotPage::Zero => [0; PAGE_BYTES],
            SnapshotPage::Page(page) => **page,
            SnapshotPage::Sparse(sparse) => {
                let mut page = [0; PAGE_BYTES];
                sparse.write_into(&mut page);
                // Every load answers what the page holds.
                for offset in (0..PAGE_BYTES).step_by(8) {
                    let word = u64::from_le_bytes(page[offset..offset + 8].try_into().expect("8"));
                    assert_eq!(sparse.load(offset, 8), word, "word at {offset}");
                }
                page
            }
        }
    }

    fn check_reads(store: &PageStore, model: &Model, live: &[(u64, u64, Vec<PageKey>)]) {
        let watermark = store.watermark();
        for key in 0..3 {
            let got = store.read(key, watermark).expect("read");
            let want = model.page(key, watermark);
            assert_eq!(
                got.map_or([0; PAGE_BYTES], |page| **page),
                want,
                "key {key} at the watermark"
            );
            assert_eq!(
                snapshot_bytes(store, key, watermark),
                want,
                "read_snapshot of {key}"
            );
        }
        for (snapshot, _, scope) in live {
            for key in scope {
                let got = store.read(*key, *snapshot).expect("read");
                let want = model.page(*key, *snapshot);
                assert_eq!(
                    got.map_or([0; PAGE_BYTES], |page| **page),
                    want,
                    "key {key} at {snapshot}"
                );
                assert_eq!(snapshot_bytes(store, *key, *snapshot), want);
                let remote = store.read_version(*key, *snapshot);
                assert_eq!(
                    remote.version.map_or([0; PAGE_BYTES], |(_, page)| *page),
                    want
                );
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        #[test]
        fn deltas_and_pruning_read_and_conflict_like_full_pages(ops in proptest::collection::vec(op(), 1..160)) {
            let store = PageStore::new();
            let pages = source();
            let mut model = Model::default();
            // (snapshot, holder, scope)
            let mut live: Vec<(u64, u64, Vec<PageKey>)> = Vec::new();
            let mut next_holder = 100u64;
            let mut ts = 0u64;
            for op in ops {
                match op {
                    Op::Begin { scope } => {
                        next_holder += 1;
                        let s = store.begin_snapshot(next_holder, Scope::pages(scope.iter().map(|k| *k..*k + 1)));
                        live.push((s, next_holder, scope));
                    }
                    Op::End { holder } => {
                        if !live.is_empty() {
                            let (s, holder, _) = live.remove(holder % live.len());
                            store.end_snapshot(s, holder);
                        }
                    }
                    Op::Commit { key, snapshot, offsets, len, value } => {
                        // A snapshot whose scope covers the page, or the watermark.
                        let covering: Vec<u64> = live.iter().filter(|(_, _, scope)| scope.contains(&key)).map(|(s, _, _)| *s).collect();
                        let s = if covering.is_empty() || snapshot >= covering.len() { store.watermark() } else { covering[snapshot] };
                        let base = store.read(key, s).expect("read");
                        let mut data = match &base { Some(page) => pages.copy_of(page).expect("page"), None => pages.zeroed().expect("page") };
                        let mut stored = Box::new(EMPTY_MASK);
                        let mut bytes = Vec::new();
                        for (i, offset) in offsets.iter().enumerate() {
                            let len = len.min(PAGE_BYTES - offset);
                            mark(&mut stored, *offset, len);
                            for at in *offset..offset + len {
                                data[at] = value.wrapping_add(i as u8).wrapping_add(at as u8);
                            }
                        }
                        for at in 0..PAGE_BYTES {
                            if stored[at / 64] >> (at % 64) & 1 == 1 {
                                bytes.push((at, data[at]));
                            }
                        }
                        let expected = model.conflict(key, s, &stored);
                        let w = PageWrite { key, data, stored };
                        match store.prepare(ts + 1, s, std::slice::from_ref(&w)) {
                            Err(conflict) => {
                                let (with_ts, offset) = expected.expect("a conflict the model has too");
                                proptest::prop_assert_eq!(conflict, Conflict { key, offset, with: ConflictWith::Committed { ts: with_ts } });
                            }
                            Ok(()) => {
                                proptest::prop_assert!(expected.is_none(), "missed conflict {:?}", expected);
                                ts += 1;
                                store.commit(ts, Some(s), ts, vec![w], &pages);
                                store.advance_watermark(ts);
                                model.commits.push((ts, key, bytes));
                            }
                        }
                    }
                    Op::Reversed { key, first, second, value } => {
                        let s = store.watermark();
                        let a = write(&pages, key, None, first, &[value; 3]);
                        let b = write(&pages, key, None, second, &[value.wrapping_add(1); 2]);
                        store.prepare(ts + 1, s, std::slice::from_ref(&a)).expect("nothing after the watermark");
                        store.prepare(ts + 2, s, std::slice::from_ref(&b)).expect("disjoint");
                        store.commit(ts + 2, None, ts + 2, vec![b], &pages);
                        store.commit(ts + 1, None, ts + 1, vec![a], &pages);
                        model.commits.push((ts + 1, key, (first..first + 3).map(|at| (at, value)).collect()));
                        model.commits.push((ts + 2, key, (second..second + 2).map(|at| (at, value.wrapping_add(1))).collect()));
                        ts += 2;
                        store.advance_watermark(ts);
                    }
                }
                check_reads(&store, &model, &live);
            }
            for (s, holder, _) in live.drain(..) {
                store.end_snapshot(s, holder);
            }
            proptest::prop_assert_eq!(store.intent_count(), 0);
        }
    }
}
