//! The page store: every committed version of every shared page, snapshots, and the commit.
//!
//! A snapshot is a commit timestamp `S`; reading page `P` under `S` returns the newest version of
//! `P` whose timestamp is `<= S` (or zeros). A commit presents the pages it stored to, each with
//! the mask of bytes it stored; it **fails** if a version committed after its snapshot stored a
//! byte it also stored (write–write conflict, first committer wins, byte granular). Otherwise
//! each page's new version is the newest version with the committer's stored bytes laid over it,
//! so writers of disjoint bytes of one page both succeed.
//!
//! Shape, chosen for the cluster that shards this store by page home: `commit` is written as a
//! prepare step (conflict check of every page, no mutation) followed by an install step at one
//! new timestamp. On one node both run under one commit lock, which also orders the side effects
//! the VM attaches to a commit (watcher activation, output); the timestamps, versions and masks
//! are exactly what a two-phase commit across page homes needs.
//!
//! Invariants:
//! - versions of a page are in strictly increasing timestamp order;
//! - `committed_ts` only grows, and every version with `ts <= committed_ts` is fully installed;
//! - a version is dropped only when no registered snapshot can read it: pruning keeps, for each
//!   page, every version newer than the oldest registered snapshot plus the newest one at or
//!   before it. Snapshots register under the registry lock, which pruning also takes, so a
//!   snapshot can never be registered at a timestamp whose version was just pruned.
//!
//! Reclamation: readers never walk a version chain without the shard lock; they clone the
//! `Arc` of the one version they need and use it lock-free afterwards. Dropping a version from
//! the chain therefore never frees memory a reader uses — the `Arc` does that when the last
//! reader lets go. This is why epoch-based reclamation is not needed here: the only lock-free
//! access is to immutable page contents, and reference counting covers it.

use crate::page::{first_overlap, merge_masked, Mask, Page, PageHash, PageSource, PAGE_BYTES};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// Canonical page number: canonical address >> 12 (see `view::canonical`).
pub type PageKey = u64;

const SHARDS: usize = 64;

/// Version chains of the pages hashed to one shard, oldest version first.
type Shard = RwLock<HashMap<PageKey, Vec<Version>, PageHash>>;

#[derive(Debug)]
struct Version {
    ts: u64,
    data: Arc<Page>,
    /// Bytes the committing runner stored (all ones for initial contents).
    stored: Box<Mask>,
}

/// A page write presented for commit.
pub struct PageWrite {
    pub key: PageKey,
    /// The runner's copy: its snapshot's contents with its stores applied.
    pub data: Page,
    /// Bytes the runner stored.
    pub stored: Box<Mask>,
}

/// Why a commit failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub key: PageKey,
    /// Byte offset within the page of the first byte both stored.
    pub offset: usize,
    /// Timestamp of the commit that stored it first.
    pub other_ts: u64,
}

/// What a successful commit changed: for each page, the bytes stored (watchers test these).
pub struct Committed {
    pub ts: u64,
    pub changes: Vec<(PageKey, Box<Mask>)>,
}

pub struct PageStore {
    shards: Box<[Shard]>,
    committed_ts: AtomicU64,
    commit_lock: Mutex<()>,
    /// Active snapshots: timestamp -> how many runners (queued or running) hold it.
    snapshots: Mutex<BTreeMap<u64, usize>>,
    versions_pruned: AtomicU64,
}

/// Held while committing; commits are totally ordered by it.
pub struct CommitGuard<'a> {
    _guard: MutexGuard<'a, ()>,
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

impl PageStore {
    pub fn new() -> PageStore {
        PageStore {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(HashMap::default()))
                .collect(),
            committed_ts: AtomicU64::new(0),
            commit_lock: Mutex::new(()),
            snapshots: Mutex::new(BTreeMap::new()),
            versions_pruned: AtomicU64::new(0),
        }
    }

    pub fn committed_ts(&self) -> u64 {
        self.committed_ts.load(Ordering::Acquire)
    }

    pub fn versions_pruned(&self) -> u64 {
        self.versions_pruned.load(Ordering::Relaxed)
    }

    /// Installs initial contents at timestamp 0 (the image, `--load` files, the persistent
    /// store), before any runner exists.
    pub fn install_initial(&self, key: PageKey, data: Page) {
        let mut shard = write_lock(&self.shards[shard_of(key)]);
        let chain = shard.entry(key).or_default();
        chain.clear();
        chain.push(Version {
            ts: 0,
            data: Arc::new(data),
            stored: Box::new(crate::page::FULL_MASK),
        });
    }

    /// The contents of `key` visible at snapshot `ts`; `None` means zeros.
    pub fn read(&self, key: PageKey, ts: u64) -> Option<Arc<Page>> {
        let shard = read_lock(&self.shards[shard_of(key)]);
        let chain = shard.get(&key)?;
        let index = chain.partition_point(|version| version.ts <= ts);
        index
            .checked_sub(1)
            .map(|index| Arc::clone(&chain[index].data))
    }

    /// Registers a snapshot at the newest committed state.
    pub fn begin_snapshot(&self) -> u64 {
        let mut snapshots = lock(&self.snapshots);
        let ts = self.committed_ts.load(Ordering::Acquire);
        *snapshots.entry(ts).or_insert(0) += 1;
        ts
    }

    /// Registers another holder of snapshot `ts`. Only valid while the caller holds the commit
    /// lock right after the commit that produced `ts` (children of that commit), or while the
    /// snapshot is already registered: either way no pruning can have passed it.
    pub fn register_snapshot(&self, ts: u64, _proof: &CommitGuard<'_>) {
        let mut snapshots = lock(&self.snapshots);
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

    pub fn lock_commits(&self) -> CommitGuard<'_> {
        CommitGuard {
            _guard: lock(&self.commit_lock),
        }
    }

    /// Prepare: the first conflict of `writes` with commits after `snapshot_ts`, if any.
    pub fn check(
        &self,
        snapshot_ts: u64,
        writes: &[PageWrite],
        _proof: &CommitGuard<'_>,
    ) -> Option<Conflict> {
        for write in writes {
            let shard = read_lock(&self.shards[shard_of(write.key)]);
            let Some(chain) = shard.get(&write.key) else {
                continue;
            };
            let newer = chain.partition_point(|version| version.ts <= snapshot_ts);
            for version in &chain[newer..] {
                if let Some(offset) = first_overlap(&version.stored, &write.stored) {
                    return Some(Conflict {
                        key: write.key,
                        offset,
                        other_ts: version.ts,
                    });
                }
            }
        }
        None
    }

    /// Install: the writes become the newest versions at a new timestamp. `forced` writes skip
    /// the conflict check (the runtime's exit-record publication); the caller has checked the
    /// others with `check` under the same guard.
    pub fn install(
        &self,
        snapshot_ts: u64,
        writes: Vec<PageWrite>,
        pages: &PageSource,
        _proof: &CommitGuard<'_>,
    ) -> Committed {
        let ts = self.committed_ts.load(Ordering::Acquire) + 1;
        let oldest_snapshot = {
            let snapshots = lock(&self.snapshots);
            snapshots.keys().next().copied().unwrap_or(ts)
        };
        let mut changes = Vec::with_capacity(writes.len());
        for write in writes {
            let PageWrite {
                key,
                mut data,
                stored,
            } = write;
            let mut shard = write_lock(&self.shards[shard_of(key)]);
            let chain = shard.entry(key).or_default();
            // If nothing was committed to this page after the writer's snapshot, its copy is
            // exactly the new contents; otherwise lay its stored bytes over the newest version.
            if let Some(newest) = chain.last() {
                if newest.ts > snapshot_ts {
                    match pages.copy_of(&newest.data) {
                        Ok(mut merged) => {
                            merge_masked(&mut merged, &data, &stored);
                            data = merged;
                        }
                        Err(_) => {
                            // Out of page memory: merge in place instead (the writer's copy is
                            // ours to overwrite), so a commit never fails for lack of memory.
                            let mut merged = [0u8; PAGE_BYTES];
                            merged.copy_from_slice(&newest.data[..]);
                            merge_masked(&mut merged, &data, &stored);
                            data.copy_from_slice(&merged);
                        }
                    }
                }
            }
            debug_assert!(chain.last().is_none_or(|newest| newest.ts < ts));
            changes.push((key, stored.clone()));
            chain.push(Version {
                ts,
                data: Arc::new(data),
                stored,
            });
            let pruned = prune(chain, oldest_snapshot);
            if pruned > 0 {
                self.versions_pruned
                    .fetch_add(pruned as u64, Ordering::Relaxed);
            }
        }
        // Publish only after every page is installed: a snapshot at `ts` sees all of it.
        self.committed_ts.store(ts, Ordering::Release);
        Committed { ts, changes }
    }

    /// Every page whose key is in `range`, newest version, for persistence.
    pub fn newest_pages_in(&self, range: std::ops::Range<PageKey>) -> Vec<(PageKey, Arc<Page>)> {
        let mut pages = Vec::new();
        for shard in self.shards.iter() {
            let shard = read_lock(shard);
            for (key, chain) in shard.iter() {
                if range.contains(key) {
                    if let Some(newest) = chain.last() {
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
            .map(|shard| read_lock(shard).values().map(Vec::len).sum::<usize>())
            .sum()
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

    fn commit(
        store: &PageStore,
        pages: &PageSource,
        snapshot: u64,
        writes: Vec<PageWrite>,
    ) -> Result<u64, Conflict> {
        let guard = store.lock_commits();
        if let Some(conflict) = store.check(snapshot, &writes, &guard) {
            return Err(conflict);
        }
        Ok(store.install(snapshot, writes, pages, &guard).ts)
    }

    #[test]
    fn disjoint_bytes_merge_and_same_byte_conflicts() {
        let store = PageStore::new();
        let pages = source();
        let s = store.begin_snapshot();
        let a = write(&pages, 7, None, 0, &[1]);
        let b = write(&pages, 7, None, 1, &[2]);
        let c = write(&pages, 7, None, 1, &[2]);
        assert_eq!(commit(&store, &pages, s, vec![a]), Ok(1));
        assert_eq!(commit(&store, &pages, s, vec![b]), Ok(2));
        let conflict = commit(&store, &pages, s, vec![c]).expect_err("same byte, same value");
        assert_eq!(
            (conflict.key, conflict.offset, conflict.other_ts),
            (7, 1, 2)
        );
        let page = store.read(7, store.committed_ts()).expect("written");
        assert_eq!(&page[..3], &[1, 2, 0]);
        assert!(
            store.read(7, s).is_none(),
            "the old snapshot still sees zeros"
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
            commit(&store, &pages, s, vec![w]).expect("no conflict");
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
        commit(&store, &pages, s, vec![w]).expect("no conflict");
        store.end_snapshot(s);
        assert_eq!(
            store.version_count(),
            2,
            "only the version of the oldest snapshot and the newest"
        );
        assert_eq!(store.read(9, store.committed_ts()).expect("page")[0], 9);
    }
}
