//! A runner's view of memory: its snapshot of shared memory plus its own writes, its private
//! region, the access rule, and a software TLB in front of all of it.
//!
//! Reads of shared memory go to the version visible at the snapshot (`PageRead::read`); the
//! first store to a shared page copies it (copy-on-write) and every store marks the bytes it
//! touched in that page's mask — the masks, not a diff, are what the commit checks for
//! conflicts. Private memory is a sparse set of zero-initialised pages owned by the view.
//!
//! The TLB (`crate::tlb`) caches, per page, pointers to its bytes, so the hot path of a load is
//! a tag compare, a bound check and a load. What may be cached, and how (invariants kept here):
//! - a TLB entry's tag is the page of the *raw* address (space bits included), so two spaces'
//!   pages never share an entry even when they alias (AMR, private memory) — aliasing is
//!   resolved at fill time, and when a page changes place (an untouched private page gets its
//!   own page, a clean AMR page gets a dirty copy) while an alias of it may be cached, the whole
//!   TLB is invalidated (one generation increment);
//! - only wholly allowed pages get entries: a partially allowed page is checked against the
//!   ranges on every access in the slow path, so widening the ranges (`allow`) never leaves a
//!   wrong entry behind and needs no TLB scan;
//! - the page holding the console words never gets an entry (they are device registers), and a
//!   page with read-only image bytes or a clean snapshot page gets no write pointer, so those
//!   stores take the slow path, which checks and copies.

use crate::abi;
use crate::page::PageHash;
use crate::page::{MemoryLimit, PageSource, PAGE_BYTES, PAGE_OFFSET_MASK, PAGE_SHIFT};
use crate::store::{PageKey, PageRead, PageWrite, Scope, SnapshotPage, SparsePage};
use crate::tlb::{Frame, Tlb};
use std::collections::HashMap;
use std::sync::Arc;

const SPACE_OFFSET_MASK: u64 = (1u64 << abi::SPACE_SHIFT) - 1;

/// Half-open byte range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    pub fn new(start: u64, len: u64) -> Option<Range> {
        let end = start.checked_add(len)?;
        (len > 0).then_some(Range { start, end })
    }

    pub fn contains(&self, start: u64, len: u64) -> bool {
        start >= self.start && start.checked_add(len).is_some_and(|end| end <= self.end)
    }

    pub fn overlaps(&self, other: &Range) -> bool {
        self.start < other.end && other.start < self.end
    }
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}+{:#x}", self.start, self.end - self.start)
    }
}

/// Sorted, disjoint, merged ranges of canonical shared addresses.
#[derive(Clone, Debug, Default)]
pub struct RangeSet {
    ranges: Vec<Range>,
}

impl RangeSet {
    pub fn insert(&mut self, range: Range) {
        let range = Range {
            start: canonical(range.start),
            end: canonical(range.start) + (range.end - range.start),
        };
        let index = self.ranges.partition_point(|r| r.end < range.start);
        let mut merged = range;
        let mut remove_to = index;
        while remove_to < self.ranges.len() && self.ranges[remove_to].start <= merged.end {
            merged.start = merged.start.min(self.ranges[remove_to].start);
            merged.end = merged.end.max(self.ranges[remove_to].end);
            remove_to += 1;
        }
        self.ranges.splice(index..remove_to, [merged]);
    }

    /// The set of `base` and `more`, built with one sort and one merge pass: a runner's access
    /// rule is built per runner, and inserting its ranges one by one shifted the vector each time.
    pub fn union_of(base: &RangeSet, more: impl IntoIterator<Item = Range>) -> RangeSet {
        let more = more.into_iter();
        let mut ranges = Vec::with_capacity(base.ranges.len() + more.size_hint().0);
        ranges.extend_from_slice(&base.ranges);
        ranges.extend(more.map(|range| {
            let start = canonical(range.start);
            Range {
                start,
                end: start + (range.end - range.start),
            }
        }));
        ranges.sort_unstable_by_key(|range| range.start);
        // Merged in place: one allocation per runner's rule, not two.
        ranges.dedup_by(|range, last| {
            // Adjacent ranges merge too, as `insert` merges them.
            let merges = range.start <= last.end;
            if merges {
                last.end = last.end.max(range.end);
            }
            merges
        });
        RangeSet { ranges }
    }

    pub fn covers(&self, start: u64, len: u64) -> bool {
        let start = canonical(start);
        let index = self.ranges.partition_point(|r| r.end <= start);
        self.ranges
            .get(index)
            .is_some_and(|r| r.contains(start, len))
    }

    pub fn touches(&self, start: u64, len: u64) -> bool {
        let Some(probe) = Range::new(canonical(start), len) else {
            return false;
        };
        let index = self.ranges.partition_point(|r| r.end <= probe.start);
        self.ranges.get(index).is_some_and(|r| r.overlaps(&probe))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Range> {
        self.ranges.iter()
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// Canonical shared address: AMR offsets are the same memory in every space, so they map to
/// space 0; everything else keeps its space.
#[inline]
pub fn canonical(addr: u64) -> u64 {
    let offset = addr & SPACE_OFFSET_MASK;
    if (abi::AMR_BASE..abi::AMR_END).contains(&offset) {
        offset
    } else {
        addr
    }
}

#[inline]
fn in_amr(addr: u64) -> bool {
    (abi::AMR_BASE..abi::AMR_END).contains(&(addr & SPACE_OFFSET_MASK))
}

#[inline]
pub fn page_key(addr: u64) -> PageKey {
    canonical(addr) >> PAGE_SHIFT
}

/// What an address is, by its offset within its space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Region {
    Private,
    Shared,
    Unmapped,
}

#[inline]
pub fn region_of(addr: u64) -> Region {
    if addr >> abi::SPACE_SHIFT >= abi::SPACE_COUNT {
        return Region::Unmapped;
    }
    let offset = addr & SPACE_OFFSET_MASK;
    if (abi::PRIVATE_BASE..abi::PRIVATE_END).contains(&offset) {
        Region::Private
    } else if (abi::SHARED_BASE..abi::SHARED_END).contains(&offset) {
        Region::Shared
    } else {
        Region::Unmapped
    }
}

/// Why an access was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessError {
    Unmapped {
        addr: u64,
    },
    NotAllowed {
        addr: u64,
        len: u64,
    },
    ReadOnly {
        addr: u64,
    },
    /// No page memory left for the page of `addr`.
    Memory {
        addr: u64,
        limit: MemoryLimit,
    },
}

/// Entries a view's map keeps room for from one runner to the next.
const KEPT_MAP_CAPACITY: usize = 64;

/// Empties one of a view's maps for the next runner. Clearing costs the map's capacity (its
/// control bytes are reset), not its length: after a runner that touched a thousand pages (a
/// spawner writing its children's frames), each of the next thousand runners would reset
/// kilobytes for their few pages. A map grown past `KEPT_MAP_CAPACITY` is dropped instead.
fn clear_kept_small<V>(map: &mut HashMap<PageKey, V, PageHash>) {
    if map.capacity() > KEPT_MAP_CAPACITY {
        *map = HashMap::default();
    } else {
        map.clear();
    }
}

/// Which shared memory a runner may use.
#[derive(Clone, Debug)]
pub struct Access {
    /// The root runner may use the whole shared region.
    pub everything: bool,
    pub allowed: RangeSet,
}

impl Access {
    /// The pages this access rule lets a runner read: what pruning keeps for its snapshot (the
    /// rule's ranges are canonical).
    pub fn scope(&self) -> Scope {
        if self.everything {
            return Scope::Everything;
        }
        Scope::pages(
            self.allowed
                .iter()
                .filter(|r| r.end > r.start)
                .map(|r| (r.start >> PAGE_SHIFT)..((r.end - 1) >> PAGE_SHIFT) + 1),
        )
    }

    pub fn everything() -> Access {
        Access {
            everything: true,
            allowed: RangeSet::default(),
        }
    }
}

/// A runner's memory.
pub struct View {
    /// Committed pages: the local store, or (on a cluster) a reader of remote homes.
    store: Arc<dyn PageRead>,
    snapshot_ts: u64,
    pages: PageSource,
    access: Access,
    /// Image pages that may not be written (canonical page numbers, sorted ranges).
    read_only: Arc<RangeSet>,
    /// The TLB and every page it may point into.
    tlb: Tlb,
    dirty_index: HashMap<PageKey, u32, PageHash>,
    /// Snapshot pages read so far: `Frame::Clean` or `Frame::Zero` (never written).
    clean_index: HashMap<PageKey, Frame, PageHash>,
    private_index: HashMap<u64, u32, PageHash>,
    /// Some entry may map an untouched private page to zeros (an alias that must not survive
    /// the page's first store).
    zero_private_cached: bool,
    /// Some entry may map a clean AMR page (an alias that must not survive its first store).
    clean_amr_cached: bool,
    /// The ABI words of the private region (`abi::PR_STACK_BASE`, `PR_STACK_SIZE`,
    /// `PR_RUNNER_ID`) while their page does not exist: loads of that page are answered from
    /// here and its first store makes the page with them in it. Most runners never write that
    /// page (only spawns and system calls do), and a zeroed page per runner just for three
    /// words was a measurable part of starting an empty runner.
    abi_words: Option<[u64; 3]>,
    /// Snapshot pages held that were made for this view alone (a version the store keeps as
    /// a delta, rebuilt on read): bounded by `MAX_MADE_FRAMES`.
    made_frames: usize,
    /// Snapshot pages the store answered as a few bytes over zeros (exit records, a child's
    /// frame), with the loads they served. Loads of them take the slow path (they have no
    /// TLB entry, so no alias of them is ever cached); a page loaded more than
    /// `SPARSE_MAX_LOADS` times is made a page, so a loop over it gets the fast path.
    sparse: HashMap<PageKey, (SparsePage, u32), PageHash>,
}

/// Loads a sparse snapshot page answers before it is made a page: a joiner reads one word of
/// each exit record, a child its few frame words, and a page built for them was most of their
/// reading cost.
const SPARSE_MAX_LOADS: u32 = 32;

/// Sparse snapshot pages a view keeps at once (a joiner reading 10^5 exit records must not
/// keep them all); past this they are forgotten and read again when next used.
const MAX_SPARSE_PAGES: usize = 1024;

/// Where `locate` found a page.
enum Located {
    Frame(Frame),
    /// A sparse snapshot page of the view's `sparse` map (reads only).
    Sparse(PageKey),
}

/// What `clean_frame` found.
enum Clean {
    Frame(Frame),
    /// In the view's `sparse` map.
    Sparse,
}

/// Snapshot pages made for one runner (rebuilt deltas, such as exit records) it may hold at
/// once: a joiner that reads 10^5 exit records must not hold 10^5 rebuilt pages. Past this,
/// every snapshot frame is dropped and read again when next used.
const MAX_MADE_FRAMES: usize = 256;

/// The raw page of the console words: never cached.
const CONSOLE_PAGE: u64 = abi::PR_CONSOLE_IN >> PAGE_SHIFT;

/// The offset page of the ABI words (`View::abi_words`).
const ABI_PAGE: u64 = (abi::PR_STACK_BASE & SPACE_OFFSET_MASK) >> PAGE_SHIFT;

/// `len` bytes at `offset` of the ABI words' page holding only `words`, little-endian.
fn abi_bytes(words: [u64; 3], offset: usize, len: usize) -> u64 {
    let addrs = [abi::PR_STACK_BASE, abi::PR_STACK_SIZE, abi::PR_RUNNER_ID];
    let mut value = 0u64;
    for index in 0..len {
        let at = (offset + index) as u64;
        let byte = addrs
            .iter()
            .zip(words)
            .find_map(|(addr, word)| {
                let start = addr & PAGE_OFFSET_MASK;
                (start..start + 8)
                    .contains(&at)
                    .then(|| (word >> (8 * (at - start))) & 0xff)
            })
            .unwrap_or(0);
        value |= byte << (8 * index);
    }
    value
}

impl View {
    pub fn new(
        store: Arc<dyn PageRead>,
        snapshot_ts: u64,
        pages: PageSource,
        access: Access,
        read_only: Arc<RangeSet>,
    ) -> View {
        View {
            store,
            snapshot_ts,
            pages,
            access,
            read_only,
            tlb: Tlb::new(),
            dirty_index: HashMap::default(),
            clean_index: HashMap::default(),
            private_index: HashMap::default(),
            zero_private_cached: false,
            clean_amr_cached: false,
            made_frames: 0,
            abi_words: None,
            sparse: HashMap::default(),
        }
    }

    /// Starts a new runner on this view: a new snapshot, access rule and store reader. Pages
    /// of the previous runner are released (drain its writes first with `drain_writes`); the
    /// TLB is invalidated by a generation increment and the maps and vectors keep their
    /// capacity, so a worker can run runner after runner without allocating a view each time.
    pub fn reset(
        &mut self,
        store: Arc<dyn PageRead>,
        snapshot_ts: u64,
        pages: PageSource,
        access: Access,
        read_only: Arc<RangeSet>,
    ) {
        self.release();
        self.store = store;
        self.snapshot_ts = snapshot_ts;
        self.pages = pages;
        self.access = access;
        self.read_only = read_only;
    }

    /// Frees every page the view holds (private pages, copies not drained, its references to
    /// snapshot pages) as dropping it would, but keeps the view, its TLB allocation and its
    /// maps' capacity for `reset`.
    pub fn release(&mut self) {
        self.tlb.clear();
        clear_kept_small(&mut self.dirty_index);
        clear_kept_small(&mut self.clean_index);
        clear_kept_small(&mut self.private_index);
        self.zero_private_cached = false;
        self.clean_amr_cached = false;
        self.made_frames = 0;
        self.abi_words = None;
        clear_kept_small(&mut self.sparse);
    }

    /// Sets the ABI words a runner starts with (after `new` or `reset`). No page is made
    /// until the runner stores to their page, so this cannot fail.
    pub fn set_abi_words(&mut self, stack_base: u64, stack_size: u64, runner_id: u64) {
        self.abi_words = Some([stack_base, stack_size, runner_id]);
    }

    /// The ABI words' page (an offset page: private memory is the same in every space) while
    /// the words are held outside it.
    #[inline]
    fn pending_abi_page(&self, addr: u64) -> Option<[u64; 3]> {
        let words = self.abi_words?;
        let same_page = region_of(addr) == Region::Private
            && (addr & SPACE_OFFSET_MASK) >> PAGE_SHIFT == ABI_PAGE
            && !self.private_index.contains_key(&ABI_PAGE);
        same_page.then_some(words)
    }

    /// Writes the pending ABI words into their page, just made (zeroed) at `index`.
    fn write_abi_words(&mut self, index: u32, words: [u64; 3]) {
        let addrs = [abi::PR_STACK_BASE, abi::PR_STACK_SIZE, abi::PR_RUNNER_ID];
        for (addr, word) in addrs.into_iter().zip(words) {
            let offset = (addr & PAGE_OFFSET_MASK) as usize;
            let written = self.tlb.write_frame(Frame::Private(index), offset, 8, word);
            debug_assert!(written, "a private page is writable");
        }
        self.abi_words = None;
    }

    pub fn snapshot_ts(&self) -> u64 {
        self.snapshot_ts
    }

    pub fn access(&self) -> &Access {
        &self.access
    }

    /// Lets the runner use `range` from now on (its children's stacks, its `malloc` memory).
    /// Partially allowed pages have no TLB entries, so nothing cached can be wrong.
    pub fn allow(&mut self, range: Range) {
        if !self.access.everything {
            self.access.allowed.insert(range);
        }
    }

    /// Loads `len` (1..=8) bytes, little-endian, zero-extended.
    #[inline(always)]
    pub fn load(&mut self, addr: u64, len: usize) -> Result<u64, AccessError> {
        match self.try_load(addr, len) {
            Some(value) => Ok(value),
            None => self.load_slow(addr, len),
        }
    }

    /// Lends the TLB to native code for as long as the view stays borrowed.
    pub fn tlb_access(&mut self) -> crate::native::TlbAccess<'_> {
        let (entries, gen_tag) = self.tlb.raw_parts();
        crate::native::TlbAccess::new(entries, gen_tag)
    }

    /// The load fast path: a TLB hit, the access inside the page. `None` means "take the slow
    /// path" (miss, page crossing, uncached page), never an error.
    #[inline(always)]
    pub fn try_load(&self, addr: u64, len: usize) -> Option<u64> {
        self.tlb.load(addr, len)
    }

    /// The load slow path (public so the interpreter can call it after `try_load`).
    #[inline(never)]
    pub fn load_slow(&mut self, addr: u64, len: usize) -> Result<u64, AccessError> {
        let offset = (addr & PAGE_OFFSET_MASK) as usize;
        if offset + len > PAGE_BYTES {
            return self.load_split(addr, len);
        }
        if let Some(words) = self.pending_abi_page(addr) {
            // Not cached in the TLB (in any space): the page is still to be made.
            return Ok(abi_bytes(words, offset, len));
        }
        match self.locate(addr, false, len)? {
            Located::Frame(frame) => Ok(self.tlb.read_frame(frame, offset, len)),
            Located::Sparse(key) => Ok(self
                .sparse
                .get(&key)
                .map_or(0, |(page, _)| page.load(offset, len))),
        }
    }

    /// Stores the low `len` (1..=8) bytes of `value`, little-endian.
    #[inline(always)]
    pub fn store(&mut self, addr: u64, len: usize, value: u64) -> Result<(), AccessError> {
        if self.try_store(addr, len, value) {
            return Ok(());
        }
        self.store_slow(addr, len, value)
    }

    /// The store fast path: a TLB hit on a page writable here (private, or dirty and free of
    /// image bytes), the access inside the page. `false`: take the slow path.
    #[inline(always)]
    pub fn try_store(&mut self, addr: u64, len: usize, value: u64) -> bool {
        self.tlb.store(addr, len, value)
    }

    /// `word = f(word)` for the 8-byte word at `addr` with one TLB probe; `None`: take the slow
    /// path (nothing was changed).
    #[inline(always)]
    pub fn try_update_u64(&mut self, addr: u64, f: impl FnOnce(u64) -> u64) -> Option<u64> {
        self.tlb.update_u64(addr, f)
    }

    /// The store slow path (public so the interpreter can call it after `try_store`).
    #[inline(never)]
    pub fn store_slow(&mut self, addr: u64, len: usize, value: u64) -> Result<(), AccessError> {
        let offset = (addr & PAGE_OFFSET_MASK) as usize;
        if offset + len > PAGE_BYTES {
            return self.store_split(addr, len, value);
        }
        let frame = self.locate_write(addr, len)?;
        let written = self.tlb.write_frame(frame, offset, len, value);
        debug_assert!(written, "locate() returns a writable frame for stores");
        Ok(())
    }

    /// Reads `out.len()` bytes (any length, any alignment).
    pub fn read_bytes(&mut self, addr: u64, out: &mut [u8]) -> Result<(), AccessError> {
        for (index, byte) in out.iter_mut().enumerate() {
            *byte = self.load(addr.wrapping_add(index as u64), 1)? as u8;
        }
        Ok(())
    }

    /// Writes `bytes` at `addr`, page by page.
    pub fn write_bytes(&mut self, addr: u64, bytes: &[u8]) -> Result<(), AccessError> {
        for (index, byte) in bytes.iter().enumerate() {
            self.store(addr.wrapping_add(index as u64), 1, u64::from(*byte))?;
        }
        Ok(())
    }

    fn load_split(&mut self, addr: u64, len: usize) -> Result<u64, AccessError> {
        let mut value = 0u64;
        for index in 0..len {
            let byte = self.load(addr.wrapping_add(index as u64), 1)?;
            value |= byte << (8 * index);
        }
        Ok(value)
    }

    fn store_split(&mut self, addr: u64, len: usize, value: u64) -> Result<(), AccessError> {
        // Check every byte first, so a refused store changes nothing.
        for index in 0..len {
            self.locate_write(addr.wrapping_add(index as u64), 1)?;
        }
        for index in 0..len {
            self.store(addr.wrapping_add(index as u64), 1, value >> (8 * index))?;
        }
        Ok(())
    }

    fn invalidate_all(&mut self) {
        self.tlb.invalidate_all();
        self.zero_private_cached = false;
        self.clean_amr_cached = false;
    }

    /// `locate` for a store: always a frame.
    fn locate_write(&mut self, addr: u64, len: usize) -> Result<Frame, AccessError> {
        match self.locate(addr, true, len)? {
            Located::Frame(frame) => Ok(frame),
            Located::Sparse(_) => {
                debug_assert!(false, "a store located sparse bytes");
                Err(AccessError::Unmapped { addr })
            }
        }
    }

    /// Where the bytes of `addr`'s page are, checking the access rule; for a store, a page
    /// this view may write (created on first store). Caches the page in the TLB when it may be.
    fn locate(&mut self, addr: u64, write: bool, len: usize) -> Result<Located, AccessError> {
        match region_of(addr) {
            Region::Unmapped => Err(AccessError::Unmapped { addr }),
            Region::Private => {
                let private_page = (addr & SPACE_OFFSET_MASK) >> PAGE_SHIFT;
                let frame = match self.private_index.get(&private_page) {
                    Some(index) => Frame::Private(*index),
                    None if write => {
                        let pending = self.pending_abi_page(addr);
                        let page = self
                            .pages
                            .zeroed_scratch()
                            .map_err(|limit| AccessError::Memory { addr, limit })?;
                        let index = self.tlb.add_private(page);
                        self.private_index.insert(private_page, index);
                        if let Some(words) = pending {
                            self.write_abi_words(index, words);
                        }
                        if self.zero_private_cached {
                            // Another space's address of this page may be cached as zeros.
                            self.invalidate_all();
                        }
                        Frame::Private(index)
                    }
                    None => Frame::Zero,
                };
                // A read of the ABI words' page while they are pending never gets here
                // (`load_slow` answers it), and neither does a cached entry for it.
                if addr >> PAGE_SHIFT != CONSOLE_PAGE {
                    if frame == Frame::Zero {
                        self.zero_private_cached = true;
                    }
                    self.tlb.fill(addr, frame, true);
                }
                Ok(Located::Frame(frame))
            }
            Region::Shared => {
                let key = page_key(addr);
                let page_start = key << PAGE_SHIFT;
                let whole_page = self.access.everything
                    || self.access.allowed.covers(page_start, PAGE_BYTES as u64);
                if !whole_page && !self.access.allowed.covers(addr, len as u64) {
                    return Err(AccessError::NotAllowed {
                        addr,
                        len: len as u64,
                    });
                }
                let writable = !self.read_only.touches(page_start, PAGE_BYTES as u64);
                if write && !writable && self.read_only.touches(addr, len as u64) {
                    return Err(AccessError::ReadOnly { addr });
                }
                let amr = in_amr(addr);
                let frame = match self.dirty_index.get(&key) {
                    Some(index) => Frame::Dirty(*index),
                    None => {
                        let clean = self.clean_frame(key, addr, !write)?;
                        if write {
                            let copy = match clean {
                                Clean::Frame(Frame::Clean(index)) => {
                                    match self.tlb.clean_page(index) {
                                        Some(page) => self.pages.copy_of(page),
                                        None => self.pages.zeroed(),
                                    }
                                }
                                Clean::Sparse => {
                                    let sparse = self.sparse.remove(&key);
                                    self.pages.zeroed().map(|mut page| {
                                        if let Some((sparse, _)) = sparse {
                                            sparse.write_into(&mut page);
                                            // Freed as zeros, like a copy of zeros (below).
                                            page.set_zeros_but_stored_and(sparse.byte_runs());
                                        }
                                        page
                                    })
                                }
                                // Every store to the copy marks its mask: it stays zeros
                                // but for the stored bytes.
                                Clean::Frame(Frame::Zero) => self.pages.zeroed().map(|mut page| {
                                    page.set_zeros_but_stored();
                                    page
                                }),
                                Clean::Frame(_) => self.pages.zeroed(),
                            }
                            .map_err(|limit| AccessError::Memory { addr, limit })?;
                            let index = self.tlb.add_dirty(key, copy);
                            self.dirty_index.insert(key, index);
                            if amr && self.clean_amr_cached {
                                // Another space's address of this page may be cached clean.
                                self.invalidate_all();
                            }
                            Frame::Dirty(index)
                        } else {
                            match clean {
                                Clean::Frame(frame) => frame,
                                // Never in the TLB: each load asks the view.
                                Clean::Sparse => return Ok(Located::Sparse(key)),
                            }
                        }
                    }
                };
                if whole_page {
                    if amr && !matches!(frame, Frame::Dirty(_)) {
                        self.clean_amr_cached = true;
                    }
                    self.tlb.fill(addr, frame, writable);
                }
                Ok(Located::Frame(frame))
            }
        }
    }

    /// The snapshot's version of shared page `key` (needed for `addr`), read from the store
    /// once per view. A page the store answers as a few bytes stays those bytes (in `sparse`)
    /// for a load (`sparse_load`) until it has served `SPARSE_MAX_LOADS` of them, and for a
    /// store (which makes the dirty copy from them); otherwise it becomes a frame.
    fn clean_frame(
        &mut self,
        key: PageKey,
        addr: u64,
        sparse_load: bool,
    ) -> Result<Clean, AccessError> {
        if let Some(frame) = self.clean_index.get(&key) {
            return Ok(Clean::Frame(*frame));
        }
        let (read, from_store) = match self.sparse.get_mut(&key) {
            Some((_, loads)) if !sparse_load || *loads < SPARSE_MAX_LOADS => {
                *loads += 1;
                return Ok(Clean::Sparse);
            }
            // Loaded often: made a page below.
            Some(_) => match self.sparse.remove(&key) {
                Some((sparse, _)) => (SnapshotPage::Sparse(sparse), false),
                None => (SnapshotPage::Zero, false),
            },
            None => (
                self.store
                    .read_snapshot(key, self.snapshot_ts)
                    .map_err(|limit| AccessError::Memory { addr, limit })?,
                true,
            ),
        };
        let page = match read {
            SnapshotPage::Zero => None,
            SnapshotPage::Page(page) => Some(page),
            SnapshotPage::Sparse(sparse) if from_store => {
                if self.sparse.len() >= MAX_SPARSE_PAGES {
                    self.sparse.clear();
                }
                self.sparse.insert(key, (sparse, 1));
                return Ok(Clean::Sparse);
            }
            SnapshotPage::Sparse(sparse) => {
                let mut page = self
                    .pages
                    .zeroed()
                    .map_err(|limit| AccessError::Memory { addr, limit })?;
                sparse.write_into(&mut page);
                Some(Arc::new(page))
            }
        };
        let frame = match page {
            Some(page) => {
                // Nobody else holds it: the store made it for this read.
                if Arc::strong_count(&page) == 1 {
                    if self.made_frames >= MAX_MADE_FRAMES {
                        self.drop_clean_frames();
                    }
                    self.made_frames += 1;
                }
                Frame::Clean(self.tlb.add_clean(page))
            }
            None => Frame::Zero,
        };
        self.clean_index.insert(key, frame);
        Ok(Clean::Frame(frame))
    }

    /// Forgets every snapshot page read so far (they are read again when used).
    fn drop_clean_frames(&mut self) {
        self.tlb.clear_clean();
        self.clean_index
            .retain(|_, frame| !matches!(frame, Frame::Clean(_)));
        self.made_frames = 0;
        // The TLB was invalidated: no alias is cached any more.
        self.clean_amr_cached = false;
        self.zero_private_cached = false;
    }

    /// Number of shared pages this runner stored to.
    pub fn dirty_pages(&self) -> usize {
        self.tlb.dirty_count()
    }

    /// Consumes the view: the shared pages it stored to, split into the ordinary writes and the
    /// writes to `exit_page` (published separately, whatever the outcome).
    pub fn into_writes(
        mut self,
        exit_page: Option<PageKey>,
    ) -> (Vec<PageWrite>, Option<PageWrite>) {
        self.drain_writes(exit_page)
    }

    /// `into_writes` that keeps the view for `reset`: the dirty pages move out, and the view
    /// no longer holds any (its TLB is invalidated).
    pub fn drain_writes(
        &mut self,
        exit_page: Option<PageKey>,
    ) -> (Vec<PageWrite>, Option<PageWrite>) {
        clear_kept_small(&mut self.dirty_index);
        self.zero_private_cached = false;
        self.clean_amr_cached = false;
        let taken = self.tlb.take_dirty();
        let mut writes = Vec::with_capacity(taken.len());
        let mut exit_write = None;
        for page in taken {
            let write = PageWrite {
                key: page.key,
                data: page.data,
                stored: page.stored,
            };
            if Some(write.key) == exit_page {
                exit_write = Some(write);
            } else if !crate::page::is_empty(&write.stored) {
                writes.push(write);
            }
        }
        (writes, exit_write)
    }

    #[cfg(test)]
    fn tlb_is_consistent(&self) -> bool {
        self.tlb.entries_point_at_frames()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::MemoryAccount;
    use crate::store::PageStore;

    #[test]
    fn union_of_matches_inserting_one_by_one() {
        let amr = abi::AMR_BASE + (1 << abi::SPACE_SHIFT);
        let mut base = RangeSet::default();
        base.insert(Range::new(0x1000, 0x1000).expect("range"));
        base.insert(Range::new(0x8000, 0x100).expect("range"));
        // Overlapping, adjacent, disjoint, contained, and an AMR alias from another space.
        let more = [
            Range::new(0x1800, 0x1000),
            Range::new(0x2800, 0x800),
            Range::new(0x7000, 0x1000),
            Range::new(0x8010, 0x10),
            Range::new(0x20000, 0x10),
            Range::new(amr, 0x1000),
            Range::new(abi::AMR_BASE + 0x1000, 0x10),
        ]
        .map(|range| range.expect("range"));
        let mut expected = base.clone();
        for range in more {
            expected.insert(range);
        }
        let union = RangeSet::union_of(&base, more);
        assert_eq!(
            union.iter().collect::<Vec<_>>(),
            expected.iter().collect::<Vec<_>>()
        );
        assert_eq!(union.len(), 4);
    }

    fn view(access: Access, store: Arc<PageStore>) -> View {
        let topology = dvm_numa::Topology::detect();
        let pool = dvm_numa::PagePool::new(&topology, 0, 1 << 20).expect("pool");
        let pages = PageSource::new(pool, MemoryAccount::new(1 << 30));
        let snapshot = store.begin_snapshot(0, crate::store::Scope::Everything);
        let mut read_only = RangeSet::default();
        read_only.insert(Range::new(abi::CODE_BASE, 0x1000).expect("range"));
        View::new(store, snapshot, pages, access, Arc::new(read_only))
    }

    /// A runner reading many pages the store keeps as deltas (exit records) holds at most
    /// `MAX_MADE_FRAMES` rebuilt pages at once, and every read is still exact.
    #[test]
    fn rebuilt_snapshot_pages_are_bounded_per_view() {
        let store = Arc::new(PageStore::new());
        let topology = dvm_numa::Topology::detect();
        let pool = dvm_numa::PagePool::new(&topology, 0, 1 << 20).expect("pool");
        let account = MemoryAccount::new(1 << 30);
        let pages = PageSource::new(pool, Arc::clone(&account));
        let first_key = 0x3d0_0000_0000u64 >> PAGE_SHIFT;
        let records = 4 * MAX_MADE_FRAMES as u64;
        for index in 0..records {
            let status = (index + 1).to_le_bytes();
            let bytes = crate::store::PageBytes::new(first_key + index, 0xff8, &status)
                .expect("one word fits");
            store.publish(index + 1, crate::store::Publication::Bytes(bytes), &pages);
        }
        store.advance_watermark(records);
        let snapshot = store.begin_snapshot(0, crate::store::Scope::Everything);
        let mut v = View::new(
            Arc::clone(&store) as Arc<dyn PageRead>,
            snapshot,
            pages,
            Access::everything(),
            Arc::new(RangeSet::default()),
        );
        let mut peak_pages = 0;
        for round in 0..2 {
            for index in 0..records {
                let addr = ((first_key + index) << PAGE_SHIFT) + 0xff8;
                assert_eq!(
                    v.load(addr, 8),
                    Ok(index + 1),
                    "round {round}, record {index}"
                );
                peak_pages = peak_pages.max(account.live_bytes() / PAGE_BYTES as u64);
                assert!(v.tlb_is_consistent());
            }
        }
        assert!(
            peak_pages <= MAX_MADE_FRAMES as u64 + 1,
            "{peak_pages} rebuilt pages held at once"
        );
        // A store after the frames were dropped copies the right contents.
        let addr = (first_key << PAGE_SHIFT) + 0xff0;
        v.store(addr, 8, 7).expect("store");
        assert_eq!(v.load(addr + 8, 8), Ok(1));
    }

    /// A page the store answers as a few bytes (an exit record's status word) is read without
    /// a page; a page loaded often becomes one (and gets the fast path); a store to it copies
    /// exactly its contents; AMR aliases read the same bytes.
    #[test]
    fn sparse_snapshot_pages_are_read_without_a_page() {
        let store = Arc::new(PageStore::new());
        let topology = dvm_numa::Topology::detect();
        let pool = dvm_numa::PagePool::new(&topology, 0, 1 << 20).expect("pool");
        let account = MemoryAccount::new(1 << 30);
        let pages = PageSource::new(pool, Arc::clone(&account));
        let record = 0x3d0_0000_0000u64 >> PAGE_SHIFT;
        let amr = abi::AMR_BASE >> PAGE_SHIFT;
        for (ts, key) in [(1u64, record), (2, record + 1), (3, amr)] {
            let bytes = crate::store::PageBytes::new(key, 0xff8, &(ts * 0x0101).to_le_bytes())
                .expect("one word fits");
            store.publish(ts, crate::store::Publication::Bytes(bytes), &pages);
        }
        store.advance_watermark(3);
        let snapshot = store.begin_snapshot(0, crate::store::Scope::Everything);
        let mut v = View::new(
            Arc::clone(&store) as Arc<dyn PageRead>,
            snapshot,
            pages,
            Access::everything(),
            Arc::new(RangeSet::default()),
        );
        let addr = (record << PAGE_SHIFT) + 0xff8;
        assert_eq!(v.load(addr, 8), Ok(0x0101));
        assert_eq!(v.load(addr + 1, 2), Ok(0x01));
        assert_eq!(v.load(addr - 8, 8), Ok(0));
        assert_eq!(v.load(addr + 4, 8), Ok(0), "across the page's end");
        assert_eq!(account.live_bytes(), 0, "no page made for the reads");
        assert_eq!(v.try_load(addr, 8), None, "no TLB entry for sparse bytes");
        for _ in 0..SPARSE_MAX_LOADS {
            assert_eq!(v.load(addr, 8), Ok(0x0101));
        }
        assert_eq!(
            v.try_load(addr, 8),
            Some(0x0101),
            "loaded often: a page, cached"
        );
        assert_eq!(account.live_bytes(), PAGE_BYTES as u64);

        // A store to a sparse page makes its copy from those bytes.
        let other = ((record + 1) << PAGE_SHIFT) + 0xff8;
        assert_eq!(v.load(other, 8), Ok(0x0202));
        v.store(other - 8, 8, 5).expect("store");
        assert_eq!(v.load(other, 8), Ok(0x0202));
        assert_eq!(v.load(other - 8, 8), Ok(5));

        // AMR: the same bytes through another space's alias, before and after a store.
        let space1 = 1u64 << abi::SPACE_SHIFT;
        let amr_addr = (amr << PAGE_SHIFT) + 0xff8;
        assert_eq!(v.load(space1 + amr_addr, 8), Ok(0x0303));
        v.store(amr_addr, 8, 6).expect("store");
        assert_eq!(v.load(space1 + amr_addr, 8), Ok(6), "no stale alias");
        assert!(v.tlb_is_consistent());

        // The next runner on this view reads its own snapshot's bytes again.
        v.release();
        assert!(v.sparse.is_empty());
        assert_eq!(v.load(other, 8), Ok(0x0202));
    }

    /// A copy of a page nobody wrote, or of a page that was a few bytes over zeros (the
    /// first page from round 2 on), committed as a delta, goes back to the pool as zeros
    /// (debug builds check every such page as it is freed), and pages handed out afterwards
    /// are zeros; a copy of a written page is freed as an ordinary page.
    #[test]
    fn committed_copies_of_unwritten_pages_are_freed_as_zeros() {
        let store = Arc::new(PageStore::new());
        let topology = dvm_numa::Topology::detect();
        let pool = dvm_numa::PagePool::new(&topology, 0, 1 << 20).expect("pool");
        let pages = PageSource::new(pool, MemoryAccount::new(1 << 30));
        let snapshot = store.begin_snapshot(0, crate::store::Scope::Everything);
        let mut v = View::new(
            Arc::clone(&store) as Arc<dyn PageRead>,
            snapshot,
            pages.clone(),
            Access::everything(),
            Arc::new(RangeSet::default()),
        );
        for round in 0..3u64 {
            for page in 0..4u64 {
                let addr = 0x9_0000_0000 + (round * 4 + page) * 0x1000 + 8 * page;
                v.store(addr, 8, u64::MAX).expect("store");
                v.store(0x9_0000_0000 + 16, 8, round + 1).expect("store");
            }
            let (writes, _) = v.drain_writes(None);
            store
                .prepare(round, snapshot + round, &writes)
                .expect("no conflict");
            store.commit(
                round,
                Some(snapshot + round),
                snapshot + round + 1,
                writes,
                &pages,
            );
            store.advance_watermark(snapshot + round + 1);
            let fresh: Vec<_> = (0..8).map(|_| pages.zeroed().expect("page")).collect();
            assert!(fresh.iter().all(|page| page.iter().all(|byte| *byte == 0)));
            v.reset(
                Arc::clone(&store) as Arc<dyn PageRead>,
                snapshot + round + 1,
                pages.clone(),
                Access::everything(),
                Arc::new(RangeSet::default()),
            );
        }
        assert_eq!(v.load(0x9_0000_0000 + 16, 8), Ok(3));
        assert_eq!(v.load(0x9_0000_0000 + 11 * 0x1000 + 24, 8), Ok(u64::MAX));
    }

    #[test]
    fn private_and_shared_reads_and_writes() {
        let store = Arc::new(PageStore::new());
        let mut v = view(Access::everything(), Arc::clone(&store));
        assert_eq!(
            v.load(0x2_0000_0000, 8),
            Ok(0),
            "private memory starts zeroed"
        );
        v.store(0x2_0000_0000, 8, 0x1122_3344_5566_7788)
            .expect("store");
        assert_eq!(v.load(0x2_0000_0004, 4), Ok(0x1122_3344));
        // Shared, crossing a page boundary.
        let addr = 0x9_0000_0ffe;
        v.store(addr, 4, 0xaabb_ccdd).expect("split store");
        assert_eq!(v.load(addr, 4), Ok(0xaabb_ccdd));
        assert_eq!(v.dirty_pages(), 2);
        let (writes, _) = v.into_writes(None);
        assert_eq!(writes.len(), 2);
    }

    #[test]
    fn access_rule_and_read_only_and_unmapped() {
        let store = Arc::new(PageStore::new());
        let mut allowed = RangeSet::default();
        allowed.insert(Range::new(0x9_0000_0010, 8).expect("range"));
        let mut v = view(
            Access {
                everything: false,
                allowed,
            },
            store,
        );
        v.store(0x9_0000_0010, 8, 5).expect("inside the range");
        assert_eq!(v.load(0x9_0000_0010, 8), Ok(5));
        assert_eq!(
            v.load(0x9_0000_0018, 1),
            Err(AccessError::NotAllowed {
                addr: 0x9_0000_0018,
                len: 1
            })
        );
        assert_eq!(
            v.load(0x9_0000_000f, 2),
            Err(AccessError::NotAllowed {
                addr: 0x9_0000_000f,
                len: 2
            })
        );
        assert_eq!(v.load(0x10, 8), Err(AccessError::Unmapped { addr: 0x10 }));
        let mut root = view(Access::everything(), Arc::new(PageStore::new()));
        assert_eq!(
            root.store(abi::CODE_BASE + 8, 1, 0),
            Err(AccessError::ReadOnly {
                addr: abi::CODE_BASE + 8
            })
        );
        assert_eq!(root.load(abi::CODE_BASE + 8, 1), Ok(0));
    }

    #[test]
    fn allow_widens_a_partially_allowed_page() {
        let store = Arc::new(PageStore::new());
        let mut allowed = RangeSet::default();
        allowed.insert(Range::new(0x9_0000_0000, 8).expect("range"));
        let mut v = view(
            Access {
                everything: false,
                allowed,
            },
            store,
        );
        v.store(0x9_0000_0000, 8, 1).expect("allowed word");
        assert!(
            v.load(0x9_0000_0100, 8).is_err(),
            "rest of the page not allowed yet"
        );
        v.allow(Range::new(0x9_0000_0000, 0x1000).expect("range"));
        v.store(0x9_0000_0100, 8, 2).expect("now allowed");
        assert_eq!(
            v.load(0x9_0000_0000, 8),
            Ok(1),
            "earlier store still visible"
        );
        assert_eq!(v.load(0x9_0000_0100, 8), Ok(2));
    }

    #[test]
    fn amr_aliases_across_spaces() {
        let store = Arc::new(PageStore::new());
        let mut v = view(Access::everything(), store);
        let space1 = 1u64 << abi::SPACE_SHIFT;
        v.store(space1 + 0x208_0000_1000, 8, 77)
            .expect("store in space 1");
        assert_eq!(
            v.load(0x208_0000_1000, 8),
            Ok(77),
            "same AMR bytes in space 0"
        );
        // Read through one space, write through the other, read again through the first.
        assert_eq!(v.load(space1 + 0x208_0000_2000, 8), Ok(0));
        v.store(0x208_0000_2000, 8, 5).expect("store in space 0");
        assert_eq!(
            v.load(space1 + 0x208_0000_2000, 8),
            Ok(5),
            "no stale alias in the TLB"
        );
        assert_eq!(v.load(space1 + 0x2_0000_0000, 8), Ok(0));
        v.store(0x2_0000_0000, 8, 6).expect("private store");
        assert_eq!(
            v.load(space1 + 0x2_0000_0000, 8),
            Ok(6),
            "private memory is the same in every space"
        );
        v.store(space1 + 0x9_0000_0000, 8, 1).expect("store");
        assert_eq!(
            v.load(0x9_0000_0000, 8),
            Ok(0),
            "non-AMR shared memory is per space"
        );
    }

    #[test]
    fn entries_survive_frames_growing_and_aliases_stay_exact() {
        let store = Arc::new(PageStore::new());
        let mut v = view(Access::everything(), store);
        let space1 = 1u64 << abi::SPACE_SHIFT;
        // Cache one private page as zeros in space 1, then write it in space 0 while many other
        // private pages are created (the frame vector reallocates between accesses).
        assert_eq!(v.load(space1 + 0x3_0000_0000, 8), Ok(0));
        for page in 0..200u64 {
            v.store(0x3_0000_0000 + page * 0x1000, 8, page + 1)
                .expect("private store");
            assert!(v.tlb_is_consistent(), "an entry points at a dropped frame");
        }
        for page in 0..200u64 {
            assert_eq!(
                v.load(space1 + 0x3_0000_0000 + page * 0x1000, 8),
                Ok(page + 1)
            );
        }
        // Shared pages: clean, then dirty, read back through the fast path.
        for page in 0..300u64 {
            let addr = 0x9_0000_0000 + page * 0x1000;
            assert_eq!(v.load(addr, 8), Ok(0));
            v.store(addr, 8, page).expect("shared store");
        }
        for page in 0..300u64 {
            assert_eq!(v.load(0x9_0000_0000 + page * 0x1000, 8), Ok(page));
        }
        assert!(v.tlb_is_consistent());
    }

    #[test]
    fn abi_words_are_served_without_a_page_until_it_is_written() {
        let store = Arc::new(PageStore::new());
        let mut v = view(Access::everything(), store);
        v.set_abi_words(0x9_0000_0000, 0x1000, 0x3d0_0001_0000);
        let space1 = 1u64 << abi::SPACE_SHIFT;
        for base in [0, space1] {
            assert_eq!(v.load(base + abi::PR_STACK_BASE, 8), Ok(0x9_0000_0000));
            assert_eq!(v.load(base + abi::PR_STACK_SIZE, 8), Ok(0x1000));
            assert_eq!(v.load(base + abi::PR_RUNNER_ID, 8), Ok(0x3d0_0001_0000));
            assert_eq!(
                v.try_load(base + abi::PR_STACK_SIZE, 8),
                None,
                "no entry while the page is not made"
            );
        }
        // Partial and straddling loads see the same bytes a page would hold.
        assert_eq!(v.load(abi::PR_STACK_BASE + 4, 2), Ok(0x9));
        assert_eq!(v.load(abi::PR_STACK_BASE + 6, 4), Ok(0x1000 << 16));
        assert_eq!(v.load(abi::PR_STACK_SIZE + 8, 8), Ok(0));
        // The first store to the page (in another space) makes it, with the words in it.
        v.store(space1 + abi::PR_SPAWN_ID, 8, 77)
            .expect("private store");
        assert_eq!(v.load(abi::PR_SPAWN_ID, 8), Ok(77));
        assert_eq!(v.load(abi::PR_STACK_BASE, 8), Ok(0x9_0000_0000));
        assert_eq!(v.load(space1 + abi::PR_RUNNER_ID, 8), Ok(0x3d0_0001_0000));
        v.store(abi::PR_STACK_SIZE, 8, 5).expect("private store");
        assert_eq!(v.load(space1 + abi::PR_STACK_SIZE, 8), Ok(5));
        assert!(v.tlb_is_consistent());
        // A released view forgets them: the next runner's words are its own.
        v.release();
        assert_eq!(v.load(abi::PR_STACK_BASE, 8), Ok(0));
    }

    #[test]
    fn console_page_and_read_only_pages_take_the_slow_path() {
        let store = Arc::new(PageStore::new());
        let mut v = view(Access::everything(), store);
        v.store(abi::PR_STACK_BASE, 8, 9).expect("ABI word");
        assert_eq!(
            v.try_load(abi::PR_STACK_BASE, 8),
            None,
            "console page never cached"
        );
        assert_eq!(v.load(abi::PR_STACK_BASE, 8), Ok(9));
        assert_eq!(v.load(abi::CODE_BASE, 8), Ok(0));
        assert!(
            !v.try_store(abi::CODE_BASE + 0x10, 8, 1),
            "an image page has no write pointer"
        );
    }

    #[test]
    fn drained_view_resets_for_the_next_runner() {
        let store = Arc::new(PageStore::new());
        let mut v = view(Access::everything(), Arc::clone(&store));
        v.store(0x9_0000_0000, 8, 7).expect("store");
        v.store(0x2_0000_0000, 8, 8).expect("private store");
        let (writes, _) = v.drain_writes(None);
        assert_eq!(writes.len(), 1);
        assert_eq!(
            v.try_load(0x9_0000_0000, 8),
            None,
            "drained pages are not cached"
        );
        let topology = dvm_numa::Topology::detect();
        let pool = dvm_numa::PagePool::new(&topology, 0, 1 << 20).expect("pool");
        let pages = PageSource::new(pool, MemoryAccount::new(1 << 30));
        let mut allowed = RangeSet::default();
        allowed.insert(Range::new(0x9_0000_0000, 0x1000).expect("range"));
        v.reset(
            store.clone(),
            store.begin_snapshot(0, crate::store::Scope::Everything),
            pages,
            Access {
                everything: false,
                allowed,
            },
            Arc::new(RangeSet::default()),
        );
        assert_eq!(
            v.load(0x2_0000_0000, 8),
            Ok(0),
            "private memory starts zeroed again"
        );
        assert_eq!(
            v.load(0x9_0000_0000, 8),
            Ok(0),
            "nothing committed the write"
        );
        assert!(
            v.load(0x9_0000_1000, 8).is_err(),
            "the new access rule applies"
        );
        assert!(v.tlb_is_consistent());
    }

    #[test]
    fn range_set_merges() {
        let mut set = RangeSet::default();
        set.insert(Range::new(0x9_0000_0000, 0x10).expect("r"));
        set.insert(Range::new(0x9_0000_0020, 0x10).expect("r"));
        set.insert(Range::new(0x9_0000_0010, 0x10).expect("r"));
        assert_eq!(set.len(), 1);
        assert!(set.covers(0x9_0000_0000, 0x30));
        assert!(!set.covers(0x9_0000_0000, 0x31));
        assert!(set.touches(0x9_0000_002f, 10));
    }
}
