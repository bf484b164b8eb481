//! A runner's view of memory: its snapshot of shared memory plus its own writes, its private
//! region, the access rule, and a software TLB in front of all of it.
//!
//! Reads of shared memory go to the version visible at the snapshot (`PageRead::read`); the
//! first store to a shared page copies it (copy-on-write) and every store marks the bytes it
//! touched in that page's mask — the masks, not a diff, are what the commit checks for
//! conflicts. Private memory is a sparse set of zero-initialised pages owned by the view.
//!
//! The TLB caches, per page, where its bytes are and what the runner may do there, so the hot
//! path of a load is a tag compare and a slice read. Invariants:
//! - a TLB entry's tag is the page of the *raw* address (space bits included), so two spaces'
//!   pages never share an entry even when they alias (AMR) — aliasing is resolved at fill time;
//! - an entry for a shared page the runner has stored to always points at its dirty copy;
//! - `Clean` entries hold the `Arc` of the snapshot version, which cannot change underneath;
//! - entries are only filled after the access rule allowed the page (wholly, or partly with
//!   `partial` set so each access is checked against the ranges).

use crate::abi;
use crate::page::PageHash;
use crate::page::{
    mark, Mask, MemoryLimit, Page, PageSource, EMPTY_MASK, PAGE_BYTES, PAGE_OFFSET_MASK,
    PAGE_SHIFT, ZERO_PAGE,
};
use crate::store::{PageKey, PageRead, PageWrite};
use std::collections::HashMap;
use std::sync::Arc;

/// TLB size (a power of two). 256 entries cover 1 MiB of working set.
const TLB_ENTRIES: usize = 256;
const TLB_INDEX_SHIFT: u32 = 64 - TLB_ENTRIES.trailing_zeros();

/// TLB slot of a page tag. A multiplicative hash, not the low bits: region bases (private
/// scratch, inputs, results) are all aligned to large powers of two, so their first pages
/// would otherwise collide in one slot and evict each other on every access.
#[inline(always)]
fn tlb_index(tag: u64) -> usize {
    (tag.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> TLB_INDEX_SHIFT) as usize
}
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

/// Reads `len` bytes at `offset` (the access fits in the page). The common widths get
/// fixed-size copies: a variable-length copy would be a `memcpy` call on every access.
#[inline(always)]
fn read_le(bytes: &[u8; PAGE_BYTES], offset: usize, len: usize) -> u64 {
    match len {
        8 => u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap_or([0; 8])),
        4 => u64::from(u32::from_le_bytes(
            bytes[offset..offset + 4].try_into().unwrap_or([0; 4]),
        )),
        1 => u64::from(bytes[offset]),
        _ => {
            let mut raw = [0u8; 8];
            raw[..len].copy_from_slice(&bytes[offset..offset + len]);
            u64::from_le_bytes(raw)
        }
    }
}

#[inline(always)]
fn write_le(bytes: &mut [u8; PAGE_BYTES], offset: usize, len: usize, value: u64) {
    match len {
        8 => bytes[offset..offset + 8].copy_from_slice(&value.to_le_bytes()),
        4 => bytes[offset..offset + 4].copy_from_slice(&(value as u32).to_le_bytes()),
        1 => bytes[offset] = value as u8,
        _ => bytes[offset..offset + len].copy_from_slice(&value.to_le_bytes()[..len]),
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
    Unmapped { addr: u64 },
    NotAllowed { addr: u64, len: u64 },
    ReadOnly { addr: u64 },
    Memory(MemoryLimit),
}

/// Which shared memory a runner may use.
#[derive(Clone, Debug)]
pub struct Access {
    /// The root runner may use the whole shared region.
    pub everything: bool,
    pub allowed: RangeSet,
}

impl Access {
    pub fn everything() -> Access {
        Access {
            everything: true,
            allowed: RangeSet::default(),
        }
    }
}

#[derive(Clone)]
enum Where {
    Empty,
    /// Shared page as of the snapshot (`None`: never written, reads as zeros).
    Clean(Option<Arc<Page>>),
    /// Shared page this runner stored to: index into `dirty`.
    Dirty(u32),
    /// Private page: index into `private` (`u32::MAX`: untouched, reads as zeros).
    Private(u32),
}

#[derive(Clone)]
struct TlbEntry {
    tag: u64,
    place: Where,
    /// False when some byte of the page is read-only image memory.
    writable: bool,
    /// Only part of the page is allowed: check every access against the ranges.
    partial: bool,
}

const NO_TAG: u64 = u64::MAX;
const UNTOUCHED: u32 = u32::MAX;

struct DirtyPage {
    key: PageKey,
    data: Page,
    stored: Box<Mask>,
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
    tlb: Vec<TlbEntry>,
    dirty: Vec<DirtyPage>,
    dirty_index: HashMap<PageKey, u32, PageHash>,
    private: Vec<Page>,
    private_index: HashMap<u64, u32, PageHash>,
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
            tlb: vec![
                TlbEntry {
                    tag: NO_TAG,
                    place: Where::Empty,
                    writable: false,
                    partial: false,
                };
                TLB_ENTRIES
            ],
            dirty: Vec::new(),
            dirty_index: HashMap::default(),
            private: Vec::new(),
            private_index: HashMap::default(),
        }
    }

    pub fn snapshot_ts(&self) -> u64 {
        self.snapshot_ts
    }

    pub fn access(&self) -> &Access {
        &self.access
    }

    /// Lets the runner use `range` from now on (its children's stacks, its `malloc` memory).
    pub fn allow(&mut self, range: Range) {
        if !self.access.everything {
            self.access.allowed.insert(range);
            // Only pages the runner could already use have entries; of those, a partial one
            // may now be wholly allowed. Refused pages never got an entry, so nothing else in
            // the TLB can be wrong.
            for entry in &mut self.tlb {
                if entry.partial {
                    entry.tag = NO_TAG;
                    entry.place = Where::Empty;
                }
            }
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

    /// The load fast path: a TLB hit on a wholly allowed page, the access inside the page.
    /// `None` means "take the slow path" (miss, page crossing, partial page), never an error:
    /// returning an `Option` keeps the hot path in registers.
    #[inline(always)]
    pub fn try_load(&self, addr: u64, len: usize) -> Option<u64> {
        debug_assert!((1..=8).contains(&len));
        let offset = (addr & PAGE_OFFSET_MASK) as usize;
        let tag = addr >> PAGE_SHIFT;
        let entry = &self.tlb[tlb_index(tag)];
        if entry.tag != tag || entry.partial || offset + len > PAGE_BYTES {
            return None;
        }
        let bytes: &[u8; PAGE_BYTES] = match &entry.place {
            Where::Clean(Some(page)) => page,
            Where::Dirty(index) => &self.dirty.get(*index as usize)?.data,
            Where::Private(index) if *index != UNTOUCHED => self.private.get(*index as usize)?,
            _ => &ZERO_PAGE,
        };
        Some(read_le(bytes, offset, len))
    }

    /// The load slow path (public so the interpreter can call it after `try_load`).
    #[inline(never)]
    pub fn load_slow(&mut self, addr: u64, len: usize) -> Result<u64, AccessError> {
        let offset = (addr & PAGE_OFFSET_MASK) as usize;
        if offset + len > PAGE_BYTES {
            return self.load_split(addr, len);
        }
        let slot = self.slot(addr, false, len)?;
        Ok(read_le(self.page_bytes(slot), offset, len))
    }

    /// Stores the low `len` (1..=8) bytes of `value`, little-endian.
    #[inline(always)]
    pub fn store(&mut self, addr: u64, len: usize, value: u64) -> Result<(), AccessError> {
        if self.try_store(addr, len, value) {
            return Ok(());
        }
        self.store_slow(addr, len, value)
    }

    /// The store fast path: a TLB hit on a page already writable here (private, or dirty and
    /// free of image bytes), wholly allowed, the access inside the page. `false`: take the
    /// slow path.
    #[inline(always)]
    pub fn try_store(&mut self, addr: u64, len: usize, value: u64) -> bool {
        debug_assert!((1..=8).contains(&len));
        let offset = (addr & PAGE_OFFSET_MASK) as usize;
        let tag = addr >> PAGE_SHIFT;
        let entry = &self.tlb[tlb_index(tag)];
        if entry.tag != tag || entry.partial || !entry.writable || offset + len > PAGE_BYTES {
            return false;
        }
        match entry.place {
            Where::Private(index) if index != UNTOUCHED => {
                match self.private.get_mut(index as usize) {
                    Some(page) => {
                        write_le(page, offset, len, value);
                        true
                    }
                    None => false,
                }
            }
            Where::Dirty(index) => match self.dirty.get_mut(index as usize) {
                Some(page) => {
                    write_le(&mut page.data, offset, len, value);
                    mark(&mut page.stored, offset, len);
                    true
                }
                None => false,
            },
            _ => false,
        }
    }

    /// The store slow path (public so the interpreter can call it after `try_store`).
    #[inline(never)]
    pub fn store_slow(&mut self, addr: u64, len: usize, value: u64) -> Result<(), AccessError> {
        let offset = (addr & PAGE_OFFSET_MASK) as usize;
        if offset + len > PAGE_BYTES {
            return self.store_split(addr, len, value);
        }
        let slot = self.slot(addr, true, len)?;
        match self.tlb[slot].place {
            Where::Dirty(index) => {
                let page = &mut self.dirty[index as usize];
                write_le(&mut page.data, offset, len, value);
                mark(&mut page.stored, offset, len);
            }
            Where::Private(index) => {
                write_le(&mut self.private[index as usize], offset, len, value);
            }
            Where::Clean(_) | Where::Empty => {
                debug_assert!(false, "slot() returns a writable place for stores");
            }
        }
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
            self.slot(addr.wrapping_add(index as u64), true, 1)?;
        }
        for index in 0..len {
            self.store(addr.wrapping_add(index as u64), 1, value >> (8 * index))?;
        }
        Ok(())
    }

    #[inline]
    fn page_bytes(&self, slot: usize) -> &[u8; PAGE_BYTES] {
        match &self.tlb[slot].place {
            Where::Clean(Some(page)) => page,
            Where::Dirty(index) => &self.dirty[*index as usize].data,
            Where::Private(index) if *index != UNTOUCHED => &self.private[*index as usize],
            Where::Clean(None) | Where::Private(_) | Where::Empty => &ZERO_PAGE,
        }
    }

    /// The TLB slot for `addr`, filled and made writable if `write`; checks the access rule.
    #[inline]
    fn slot(&mut self, addr: u64, write: bool, len: usize) -> Result<usize, AccessError> {
        let tag = addr >> PAGE_SHIFT;
        let slot = tlb_index(tag);
        let entry = &self.tlb[slot];
        if entry.tag == tag {
            let ready = !write
                || matches!(entry.place, Where::Dirty(_))
                || matches!(entry.place, Where::Private(index) if index != UNTOUCHED);
            if entry.partial && !self.access.allowed.covers(addr, len as u64) {
                return Err(AccessError::NotAllowed {
                    addr,
                    len: len as u64,
                });
            }
            // A page holding some image bytes: check each store against the read-only ranges.
            if write && !entry.writable && self.read_only.touches(addr, len as u64) {
                return Err(AccessError::ReadOnly { addr });
            }
            if ready {
                return Ok(slot);
            }
        }
        self.fill(slot, addr, write, len)?;
        Ok(slot)
    }

    /// Drops entries that may alias a page whose place just changed. Tags are raw page numbers
    /// (cheap to compute on every access), but a private page is the same under every space's
    /// address and an AMR page likewise, so a new private or dirty page can leave another
    /// entry for the same bytes pointing at the old place.
    fn drop_aliases(&mut self, stale: fn(&Where) -> bool) {
        for entry in &mut self.tlb {
            if stale(&entry.place) {
                entry.tag = NO_TAG;
                entry.place = Where::Empty;
            }
        }
    }

    fn fill(&mut self, slot: usize, addr: u64, write: bool, len: usize) -> Result<(), AccessError> {
        let tag = addr >> PAGE_SHIFT;
        match region_of(addr) {
            Region::Unmapped => Err(AccessError::Unmapped { addr }),
            Region::Private => {
                let private_page = (addr & SPACE_OFFSET_MASK) >> PAGE_SHIFT;
                let mut index = self
                    .private_index
                    .get(&private_page)
                    .copied()
                    .unwrap_or(UNTOUCHED);
                if write && index == UNTOUCHED {
                    let page = self.pages.zeroed().map_err(AccessError::Memory)?;
                    index = self.private.len() as u32;
                    self.private.push(page);
                    self.private_index.insert(private_page, index);
                    self.drop_aliases(|place| matches!(place, Where::Private(UNTOUCHED)));
                }
                self.tlb[slot] = TlbEntry {
                    tag,
                    place: Where::Private(index),
                    writable: true,
                    partial: false,
                };
                Ok(())
            }
            Region::Shared => {
                let key = page_key(addr);
                let page_start = key << PAGE_SHIFT;
                let whole_page = self.access.everything
                    || self.access.allowed.covers(page_start, PAGE_BYTES as u64);
                let partial = if whole_page {
                    false
                } else if self.access.allowed.covers(addr, len as u64) {
                    true
                } else {
                    return Err(AccessError::NotAllowed {
                        addr,
                        len: len as u64,
                    });
                };
                let writable = !self.read_only.touches(page_start, PAGE_BYTES as u64);
                if write && !writable && self.read_only.touches(addr, len as u64) {
                    return Err(AccessError::ReadOnly { addr });
                }
                let place = match self.dirty_index.get(&key) {
                    Some(index) => Where::Dirty(*index),
                    None if write => {
                        let base = self
                            .store
                            .read(key, self.snapshot_ts)
                            .map_err(AccessError::Memory)?;
                        let copy = match &base {
                            Some(page) => self.pages.copy_of(page),
                            None => self.pages.zeroed(),
                        }
                        .map_err(AccessError::Memory)?;
                        let index = self.dirty.len() as u32;
                        self.dirty.push(DirtyPage {
                            key,
                            data: copy,
                            stored: Box::new(EMPTY_MASK),
                        });
                        self.dirty_index.insert(key, index);
                        if in_amr(addr) {
                            // An AMR page is the same bytes under every space's address, and
                            // another alias of it may be cached clean.
                            self.drop_aliases(|place| matches!(place, Where::Clean(_)));
                        }
                        Where::Dirty(index)
                    }
                    None => Where::Clean(
                        self.store
                            .read(key, self.snapshot_ts)
                            .map_err(AccessError::Memory)?,
                    ),
                };
                self.tlb[slot] = TlbEntry {
                    tag,
                    place,
                    writable,
                    partial,
                };
                Ok(())
            }
        }
    }

    /// Number of shared pages this runner stored to.
    pub fn dirty_pages(&self) -> usize {
        self.dirty.len()
    }

    /// Consumes the view: the shared pages it stored to, split into the ordinary writes and the
    /// writes to `exit_page` (published separately, whatever the outcome).
    pub fn into_writes(self, exit_page: Option<PageKey>) -> (Vec<PageWrite>, Option<PageWrite>) {
        let mut writes = Vec::with_capacity(self.dirty.len());
        let mut exit_write = None;
        for page in self.dirty {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::MemoryAccount;
    use crate::store::PageStore;

    fn view(access: Access, store: Arc<PageStore>) -> View {
        let topology = dvm_numa::Topology::detect();
        let pool = dvm_numa::PagePool::new(&topology, 0, 1 << 20).expect("pool");
        let pages = PageSource::new(pool, MemoryAccount::new(1 << 30));
        let snapshot = store.begin_snapshot(0, crate::store::Scope::Everything);
        let mut read_only = RangeSet::default();
        read_only.insert(Range::new(abi::CODE_BASE, 0x1000).expect("range"));
        View::new(store, snapshot, pages, access, Arc::new(read_only))
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
