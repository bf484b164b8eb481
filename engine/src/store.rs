//! The page store: every committed version of every shared page this node homes, the intents
//! of commits in flight, and snapshots.
//!
//! A snapshot is a commit timestamp `S`; reading page `P` under `S` returns the newest version of
//! `P` whose timestamp is `<= S` (or zeros). Readers go through [`PageRead`], so a runner's view
//! does not care whether a page comes from this store, a remote home or a cache of one.
//!
//! A commit is two steps, the shape a two-phase commit across page homes needs:
//! - **prepare** (`prepare`): for every page the committer stored to, check that no version
//!   committed after its snapshot and no *intent* of another commit in flight stored a byte it
//!   also stored, and leave an intent (its stored-byte mask) on the page. Of two commits that
//!   store to a common byte, the later-prepared fails (byte-granular write–write conflicts);
//! - **commit** (`commit`) at a timestamp chosen after every prepare succeeded, which installs
//!   the new versions and removes the intents; or **abort** (`abort`), which only removes them.
//!
//! No lock spans a commit: each page is checked and marked under its shard's lock, one page at
//! a time. Commits therefore install in any order; the caller publishes timestamps in order
//! (`advance_watermark`, driven by `order::CommitOrder`), and a snapshot is only ever taken at
//! or below the watermark, below which every version is installed.
//!
//! Invariants:
//! - versions of a page are in strictly increasing timestamp order;
//! - every version with `ts <= watermark` is fully installed (the caller's contract: it
//!   advances the watermark to `T` only after every commit with a timestamp `<= T` installed);
//! - a version's contents are the previous version's with its committer's stored bytes laid
//!   over. A commit installing below an already installed newer version (out-of-order
//!   installation) lays its bytes over that newer version too, except bytes the newer one
//!   stored itself. No reader can hold such a newer version: it is above the watermark;
//! - two intents on one page never share a byte;
//! - a version is dropped only when no registered snapshot can read it: pruning keeps, for each
//!   page, every version newer than the oldest registered snapshot plus the newest one at or
//!   before it. Snapshots register under the registry lock, which pruning also takes.
//!
//! Reclamation: readers never walk a version chain without the shard lock; they clone the
//! `Arc` of the one version they need and use it lock-free afterwards, so dropping a version
//! from a chain never frees memory a reader uses.

use crate::page::{
    first_overlap, merge_masked, Mask, MemoryLimit, Page, PageHash, PageSource, PAGE_BYTES,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// Canonical page number: canonical address >> 12 (see `view::canonical`).
pub type PageKey = u64;

/// Identifies a commit in flight (its intents). Unique among commits in flight.
pub type TxnId = u64;

const SHARDS: usize = 64;

/// Where a runner's view reads committed pages from.
pub trait PageRead: Send + Sync {
    /// The contents of `key` visible at snapshot `snapshot_ts`; `None` means zeros. A reader
    /// that must copy the page (from a remote home) can run out of page memory.
    fn read(&self, key: PageKey, snapshot_ts: u64) -> Result<Option<Arc<Page>>, MemoryLimit>;
}

#[derive(Debug)]
struct Version {
    ts: u64,
    data: Arc<Page>,
    /// Bytes the committing runner stored (all ones for initial contents).
    stored: Box<Mask>,
}

#[derive(Debug)]
struct Intent {
    txn: TxnId,
    stored: Box<Mask>,
}

/// One page: its versions, oldest first, and the intents of commits in flight.
#[derive(Debug, Default)]
struct Chain {
    versions: Vec<Version>,
    intents: Vec<Intent>,
}

type Shard = RwLock<HashMap<PageKey, Chain, PageHash>>;

/// A page write presented for commit.
pub struct PageWrite {
    pub key: PageKey,
    /// The runner's copy: its snapshot's contents with its stores applied.
    pub data: Page,
    /// Bytes the runner stored.
    pub stored: Box<Mask>,
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

/// What `read_version` found.
#[derive(Debug, Default)]
pub struct VersionRead {
    /// The newest version at or below the snapshot: its timestamp and contents (`None`: zeros).
    pub version: Option<(u64, Arc<Page>)>,
    /// The timestamp of the oldest version above the snapshot, if one is installed.
    pub next_ts: Option<u64>,
}

/// The bytes one commit changed on one page (watchers test these).
pub type Change = (PageKey, Box<Mask>);

pub struct PageStore {
    shards: Box<[Shard]>,
    /// Every commit with a timestamp at or below this is installed; snapshots are taken here.
    watermark: AtomicU64,
    /// Active snapshots: timestamp -> how many runners (queued or running) hold it.
    snapshots: Mutex<BTreeMap<u64, usize>>,
    versions_pruned: AtomicU64,
}

fn shard_of(key: PageKey) -> usize {
    // Pages of one 2 MiB chunk spread over shards; a multiplicative hash avoids the shards
    // lining up with strided access patterns.
    (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) as usize % SHARDS
}

impl Default for PageStore {
    fn default() -> Self {
        PageStore::new()
    }
}

impl PageRead for PageStore {
    fn read(&self, key: PageKey, snapshot_ts: u64) -> Result<Option<Arc<Page>>, MemoryLimit> {
        Ok(PageStore::read(self, key, snapshot_ts))
    }
}

impl PageStore {
    /// The contents of `key` visible at snapshot `snapshot_ts`; `None` means zeros.
    pub fn read(&self, key: PageKey, snapshot_ts: u64) -> Option<Arc<Page>> {
        let shard = read_lock(&self.shards[shard_of(key)]);
        let versions = &shard.get(&key)?.versions;
        let index = versions.partition_point(|version| version.ts <= snapshot_ts);
        index
            .checked_sub(1)
            .map(|index| Arc::clone(&versions[index].data))
    }
}

impl PageStore {
    /// Like `PageRead::read`, with the timestamp of the version returned and of the next
    /// version after the snapshot, if one is installed: the answer holds for every snapshot from
    /// the first up to (excluding) the second.
    pub fn read_version(&self, key: PageKey, snapshot_ts: u64) -> VersionRead {
        let shard = read_lock(&self.shards[shard_of(key)]);
        let Some(chain) = shard.get(&key) else {
            return VersionRead::default();
        };
        let index = chain
            .versions
            .partition_point(|version| version.ts <= snapshot_ts);
        VersionRead {
            version: index.checked_sub(1).map(|index| {
                (
                    chain.versions[index].ts,
                    Arc::clone(&chain.versions[index].data),
                )
            }),
            next_ts: chain.versions.get(index).map(|version| version.ts),
        }
    }

    pub fn new() -> PageStore {
        PageStore {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(HashMap::default()))
                .collect(),
            watermark: AtomicU64::new(0),
            snapshots: Mutex::new(BTreeMap::new()),
            versions_pruned: AtomicU64::new(0),
        }
    }

    /// Every commit at or below this timestamp is installed.
    pub fn watermark(&self) -> u64 {
        self.watermark.load(Ordering::Acquire)
    }

    /// Publishes `ts`: the caller guarantees every commit with a timestamp `<= ts` installed.
    pub fn advance_watermark(&self, ts: u64) {
        let previous = self.watermark.fetch_max(ts, Ordering::AcqRel);
        debug_assert!(
            previous <= ts,
            "watermark moved back from {previous} to {ts}"
        );
    }

    pub fn versions_pruned(&self) -> u64 {
        self.versions_pruned.load(Ordering::Relaxed)
    }

    /// Installs initial contents at timestamp 0 (the image, `--load` files, the persistent
    /// store), before any runner exists.
    pub fn install_initial(&self, key: PageKey, data: Page) {
        let mut shard = write_lock(&self.shards[shard_of(key)]);
        let chain = shard.entry(key).or_default();
        chain.versions.clear();
        chain.versions.push(Version {
            ts: 0,
            data: Arc::new(data),
            stored: Box::new(crate::page::FULL_MASK),
        });
    }

    /// Registers a snapshot at the watermark.
    pub fn begin_snapshot(&self) -> u64 {
        let mut snapshots = lock(&self.snapshots);
        let ts = self.watermark.load(Ordering::Acquire);
        *snapshots.entry(ts).or_insert(0) += 1;
        ts
    }

    /// Registers another holder of snapshot `ts`. Only valid while the caller holds a
    /// registered snapshot at or below `ts` (a parent registering its children's snapshot, its
    /// commit timestamp): pruning keeps everything visible above the oldest registered snapshot.
    pub fn register_snapshot(&self, ts: u64) {
        let mut snapshots = lock(&self.snapshots);
        debug_assert!(
            snapshots.keys().next().is_some_and(|oldest| *oldest <= ts),
            "snapshot {ts} registered with no older snapshot holding its versions"
        );
        *snapshots.entry(ts).or_insert(0) += 1;
    }

    pub fn end_snapshot(&self, ts: u64) {
        let mut snapshots = lock(&self.snapshots);
        if let Some(count) = snapshots.get_mut(&ts) {
            *count -= 1;
            if *count == 0 {
                snapshots.remove(&ts);
            }
        } else {
            debug_assert!(false, "snapshot {ts} ended twice");
        }
    }

    /// The oldest timestamp a snapshot may still read at: versions at or below it other than
    /// the newest one are garbage. On a cluster, node 0 (which registers every snapshot) tells
    /// the other homes, which then `advance_watermark` to it.
    pub fn prune_horizon(&self) -> u64 {
        let snapshots = lock(&self.snapshots);
        // With no snapshot registered, the next one is taken at the watermark or later.
        snapshots
            .keys()
            .next()
            .copied()
            .unwrap_or_else(|| self.watermark.load(Ordering::Acquire))
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
            let chain = shard.entry(write.key).or_default();
            if let Some(conflict) = conflict_in(chain, txn, snapshot_ts, write) {
                drop(shard);
                self.abort(txn, writes[..done].iter().map(|write| write.key));
                return Err(conflict);
            }
            chain.intents.push(Intent {
                txn,
                stored: write.stored.clone(),
            });
        }
        Ok(())
    }

    /// Removes the intents `txn` left on `keys`.
    pub fn abort(&self, txn: TxnId, keys: impl Iterator<Item = PageKey>) {
        for key in keys {
            let mut shard = write_lock(&self.shards[shard_of(key)]);
            if let Some(chain) = shard.get_mut(&key) {
                chain.intents.retain(|intent| intent.txn != txn);
            }
        }
    }

    /// Commit: the prepared `writes` of `txn` become versions at `ts`; returns what changed.
    /// `base_ts` is the snapshot the writes' copies were made from, or `None` when only their
    /// stored bytes are meaningful (a remote committer sends only those).
    pub fn commit(
        &self,
        txn: TxnId,
        base_ts: Option<u64>,
        ts: u64,
        writes: Vec<PageWrite>,
        pages: &PageSource,
    ) -> Vec<Change> {
        let horizon = self.prune_horizon();
        let mut changes = Vec::with_capacity(writes.len());
        for write in writes {
            let mut shard = write_lock(&self.shards[shard_of(write.key)]);
            let chain = shard.entry(write.key).or_default();
            let before = chain.intents.len();
            chain.intents.retain(|intent| intent.txn != txn);
            debug_assert_eq!(before, chain.intents.len() + 1, "commit without prepare");
            changes.push((write.key, write.stored.clone()));
            self.install(chain, ts, base_ts, write, pages, horizon);
        }
        changes
    }

    /// Installs `write` at `ts` without a conflict check or intent: the runtime's exit-record
    /// publication. `base_ts` is the snapshot the write's copy was made from, or `None` when
    /// only its stored bytes are meaningful.
    pub fn publish(
        &self,
        ts: u64,
        base_ts: Option<u64>,
        write: PageWrite,
        pages: &PageSource,
    ) -> Change {
        let horizon = self.prune_horizon();
        let mut shard = write_lock(&self.shards[shard_of(write.key)]);
        let chain = shard.entry(write.key).or_default();
        let change = (write.key, write.stored.clone());
        self.install(chain, ts, base_ts, write, pages, horizon);
        change
    }

    fn install(
        &self,
        chain: &mut Chain,
        ts: u64,
        base_ts: Option<u64>,
        write: PageWrite,
        pages: &PageSource,
        horizon: u64,
    ) {
        let PageWrite {
            mut data, stored, ..
        } = write;
        let at = chain.versions.partition_point(|version| version.ts < ts);
        debug_assert!(
            chain.versions.get(at).is_none_or(|v| v.ts > ts),
            "ts {ts} installed twice"
        );
        // The writer's copy is exact when nothing was installed between its snapshot and `ts`;
        // otherwise its stored bytes go over the version just below `ts`.
        if let Some(below) = at.checked_sub(1).map(|index| &chain.versions[index]) {
            if base_ts.is_none_or(|base| below.ts > base) {
                data = merged_over(&below.data, data, &stored, pages);
            }
        } else if base_ts.is_none() {
            // Nothing below: the page read as zeros, so only the stored bytes may be non-zero.
            let mut zeros = [0u8; PAGE_BYTES];
            merge_masked(&mut zeros, &data, &stored);
            data.copy_from_slice(&zeros);
        }
        // Versions installed above `ts` already (out-of-order installation) get our bytes,
        // except those they or a version between stored themselves.
        let mut remaining: Box<Mask> = stored.clone();
        for newer in &mut chain.versions[at..] {
            for (bits, theirs) in remaining.iter_mut().zip(newer.stored.iter()) {
                *bits &= !theirs;
            }
            if crate::page::is_empty(&remaining) {
                break;
            }
            lay_over(&mut newer.data, &data, &remaining, pages);
        }
        chain.versions.insert(
            at,
            Version {
                ts,
                data: Arc::new(data),
                stored,
            },
        );
        let pruned = prune(&mut chain.versions, horizon);
        if pruned > 0 {
            self.versions_pruned
                .fetch_add(pruned as u64, Ordering::Relaxed);
        }
    }

    /// Every page whose key is in `range`, newest version, for persistence.
    pub fn newest_pages_in(&self, range: std::ops::Range<PageKey>) -> Vec<(PageKey, Arc<Page>)> {
        let mut pages = Vec::new();
        for shard in self.shards.iter() {
            let shard = read_lock(shard);
            for (key, chain) in shard.iter() {
                if range.contains(key) {
                    if let Some(newest) = chain.versions.last() {
                        pages.push((*key, Arc::clone(&newest.data)));
                    }
                }
            }
        }
        pages.sort_by_key(|(key, _)| *key);
        pages
    }

    /// Number of versions currently held (for tests and statistics).
    pub fn version_count(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                read_lock(shard)
                    .values()
                    .map(|chain| chain.versions.len())
                    .sum::<usize>()
            })
            .sum()
    }

    /// Number of intents currently held (for tests: zero whenever no commit is in flight).
    pub fn intent_count(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                read_lock(shard)
                    .values()
                    .map(|chain| chain.intents.len())
                    .sum::<usize>()
            })
            .sum()
    }
}

/// The first byte `write` stored that a version after `snapshot_ts` or another commit's intent
/// stored too.
fn conflict_in(chain: &Chain, txn: TxnId, snapshot_ts: u64, write: &PageWrite) -> Option<Conflict> {
    let newer = chain
        .versions
        .partition_point(|version| version.ts <= snapshot_ts);
    let committed = chain.versions[newer..].iter().find_map(|version| {
        first_overlap(&version.stored, &write.stored)
            .map(|offset| (offset, ConflictWith::Committed { ts: version.ts }))
    });
    let prepared = || {
        chain
            .intents
            .iter()
            .filter(|intent| intent.txn != txn)
            .find_map(|intent| {
                first_overlap(&intent.stored, &write.stored)
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
fn merged_over(base: &Page, mut ours: Page, mask: &Mask, pages: &PageSource) -> Page {
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
fn lay_over(version: &mut Arc<Page>, ours: &Page, mask: &Mask, pages: &PageSource) {
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

/// Drops versions no snapshot can read; returns how many.
fn prune(chain: &mut Vec<Version>, oldest_snapshot: u64) -> usize {
    // Keep the newest version at or before the oldest snapshot, and everything after it.
    let visible = chain.partition_point(|version| version.ts <= oldest_snapshot);
    let keep_from = visible.saturating_sub(1);
    if keep_from > 0 {
        chain.drain(..keep_from);
    }
    keep_from
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
        let s = store.begin_snapshot();
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
        let page = store.read(7, store.watermark()).expect("written");
        assert_eq!(&page[..3], &[1, 2, 0]);
        assert!(
            store.read(7, s).is_none(),
            "the old snapshot still sees zeros"
        );
        store.end_snapshot(s);
    }

    #[test]
    fn the_later_prepared_of_two_commits_in_flight_fails() {
        let store = PageStore::new();
        let pages = source();
        let s = store.begin_snapshot();
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
        store.end_snapshot(s);
    }

    #[test]
    fn out_of_order_installation_gives_every_version_every_earlier_byte() {
        let store = PageStore::new();
        let pages = source();
        let s = store.begin_snapshot();
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
        assert_eq!(&store.read(9, 1).expect("ts 1")[..5], &[1, 1, 0, 0, 0]);
        assert_eq!(&store.read(9, 2).expect("ts 2")[..5], &[1, 1, 2, 2, 0]);
        store.end_snapshot(s);
    }

    #[test]
    fn an_exit_record_publication_merges_over_the_newest_version() {
        let store = PageStore::new();
        let pages = source();
        let s = store.begin_snapshot();
        commit(&store, &pages, s, 1, vec![write(&pages, 2, None, 0, &[7])]).expect("commit");
        let status = write(&pages, 2, None, 8, &[9]);
        store.publish(2, None, status, &pages);
        store.advance_watermark(2);
        assert_eq!(
            &store.read(2, 2).expect("page")[..9],
            &[7, 0, 0, 0, 0, 0, 0, 0, 9]
        );
        store.end_snapshot(s);
    }

    #[test]
    fn versions_are_pruned_when_no_snapshot_needs_them() {
        let store = PageStore::new();
        let pages = source();
        let old = store.begin_snapshot();
        for round in 0..5u8 {
            let s = store.begin_snapshot();
            let base = store.read(9, s);
            let w = write(&pages, 9, base.as_ref(), 0, &[round]);
            commit(&store, &pages, s, u64::from(round) + 1, vec![w]).expect("no conflict");
            store.end_snapshot(s);
        }
        assert_eq!(
            store.version_count(),
            5,
            "snapshot 0 pins nothing (page absent then), all newer kept"
        );
        store.end_snapshot(old);
        let s = store.begin_snapshot();
        let base = store.read(9, s);
        let w = write(&pages, 9, base.as_ref(), 0, &[9]);
        commit(&store, &pages, s, 6, vec![w]).expect("no conflict");
        store.end_snapshot(s);
        assert_eq!(
            store.version_count(),
            2,
            "only the version of the oldest snapshot and the newest"
        );
        assert_eq!(store.read(9, store.watermark()).expect("page")[0], 9);
    }
}
