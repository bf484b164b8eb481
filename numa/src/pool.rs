//! A pool of 4 KiB pages bound to one NUMA node: the engine's snapshot memory.
//!
//! # What it owns
//!
//! A [`PagePool`] reserves memory in chunks of `chunk_bytes` ([`NodeMemory`], bound to the
//! pool's node when hwloc can bind, else unbound with the reason in
//! [`PagePool::binding_note`]) and hands their pages out one at a time as [`PageBox`]es. A
//! `PageBox` behaves like a `Box<[u8; PAGE_BYTES]>`: it owns its page, is `Send + Sync`, gives
//! safe `&`/`&mut` access, and on drop (on whichever thread) returns the page to the pool's
//! free list. The engine is `#![forbid(unsafe_code)]`; all the unsafety of handing out pieces
//! of a mapping lives here.
//!
//! The chunks belong to the pool's shared inner state, which the `PagePool` and every live
//! `PageBox` hold an `Arc` to: chunks stay mapped while any page lives, even after the
//! `PagePool` is dropped, and are unmapped when the last of them goes.
//!
//! # Invariants
//!
//! - A page is named by a 32-bit index: page `index % pages_per_chunk` of chunk
//!   `index / pages_per_chunk`. Chunks are appended (under the growth mutex) and never removed
//!   before the inner state is dropped, so an index, once carved, names the same bytes forever.
//! - Every page is in exactly one state: *untouched* (`index >= carved`: never handed out,
//!   still mmap's zero fill, usually not even resident), *owned* by exactly one `PageBox`, or
//!   *free* (on the free list). Transitions: untouched -> owned by bumping `carved` under the
//!   growth mutex; free -> owned by the pop whose compare-exchange removed it from the list
//!   (exactly one thread wins it); owned -> free only in `PageBox::drop`, which pushes it as
//!   the `PageBox`'s last act. Hence no two `PageBox`es ever alias, and the free list never
//!   holds a page a `PageBox` owns.
//! - The pool never makes a reference to a chunk's bytes after the chunk is created (binding,
//!   inside `NodeMemory::allocate`, is the only one): the only references into page memory
//!   are those a `PageBox` lends out.
//! - `alloc_zeroed` returns zeros without touching untouched pages (they are zero from mmap,
//!   and writing zeros would only fault them in early); recycled pages are zeroed on the way
//!   out. Pages on the free list keep their old bytes.
//! - A second free list holds pages known to hold zeros: an owner that wrote a few known
//!   bytes of a zeroed page and cleared them frees it there ([`PageBox::set_free_as_zeros`]),
//!   and `alloc_zeroed` takes those first and writes nothing. Such a page then costs the
//!   cache lines its owners write, not a 4 KiB `memset` of cold memory each time it is
//!   reused. `alloc_zeroed_recycled_first` prefers the other list, for a caller whose pages
//!   are written whole anyway and freed with their bytes (a runner's scratch page): a page
//!   freed a moment ago is still in cache, so zeroing it is cheap, and the list of zeros is
//!   left to the callers it helps. Both lists share the links (a free page is on exactly one
//!   of them); either serves any allocation when the other is empty, so neither makes the
//!   pool grow.
//!
//! # Why this shape
//!
//! - Pages are allocated on one worker and very often dropped on another (a page version dies
//!   with the last `Arc` to it), so the free list is shared by all threads and lock-free: a
//!   Treiber stack of page indexes with a tagged head (see [`FreeList`]). Its links live in a
//!   side array of `AtomicU32`, one per page, not in the free pages themselves, so reading a
//!   link never races with a page owner's plain writes, and the tag makes the stack ABA-safe
//!   without epoch-based reclamation (nothing is ever reclaimed: indexes stay valid).
//! - Growing is rare (once per chunk) and slow anyway (mmap + mbind, then page faults), so it
//!   takes a mutex; carving a never-used page also takes it, which costs little next to the
//!   page fault the caller takes on its first write to such a page. Before carving, the
//!   mutex holder retries the free list, so a page freed meanwhile is reused rather than a
//!   fresh one carved, and a new chunk is mapped only when, under the mutex, the free list
//!   was empty and every page of every chunk had been carved.
//! - The chunk table (chunk index -> chunk) must be readable without a lock on every pop and
//!   push. It is a fixed array of 33 lazily allocated segments, segment `s` holding `2^s`
//!   chunks in `OnceLock`s: lookups are a few loads, publication is safe code, and it covers
//!   every 32-bit chunk index without reallocating.
//! - Each `PageBox` holds an `Arc` to the inner state (so chunks outlive the pool handle) and
//!   the page's address (so deref is a plain pointer, no lookup).
//!
//! # Limitations
//!
//! - Memory is never given back to the OS: a pool's reservation only grows, chunk by chunk,
//!   up to its peak use, and is released only when the pool and all its pages are dropped.
//!   Free pages keep their (stale) contents and stay resident.
//! - One pool holds at most `2^32 - 1` pages (16 TiB); beyond that allocation fails with
//!   [`NumaError::PoolFull`].
//! - Binding is per chunk and best effort, as for [`NodeMemory`]; `bound_to_node` is false as
//!   soon as one chunk could not be bound.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use crate::error::NumaError;
use crate::memory::{area_placement, NodeMemory, Placement};
use crate::topology::Topology;

/// Bytes in one page handed out by a [`PagePool`].
pub const PAGE_BYTES: usize = 4096;

/// The free list's "no page": page indexes are `0..NIL`.
const NIL: u32 = u32::MAX;

/// Most pages one pool can reserve: every index below [`NIL`].
const MAX_PAGES: u64 = NIL as u64;

/// Chunk-table segments: segment `s` holds `2^s` chunks, so 33 cover all `2^32` chunk indexes.
const SEGMENTS: usize = 33;

/// A pool of 4 KiB pages bound to one NUMA node. Shared as `Arc<PagePool>`; see the module
/// documentation.
pub struct PagePool {
    inner: Arc<PoolInner>,
}

/// One page from a [`PagePool`], owned like a `Box<[u8; PAGE_BYTES]>`; dropping it returns
/// the page to its pool.
pub struct PageBox {
    /// The page's bytes, inside a chunk owned by `pool`.
    page: NonNull<[u8; PAGE_BYTES]>,
    /// The page's index in `pool` (for the free list).
    index: u32,
    /// Keeps the chunk holding `page` mapped.
    pool: Arc<PoolInner>,
    /// Set by `set_free_as_zeros`: the drop puts the page on the list of zeros.
    free_as_zeros: bool,
}

/// One chunk of a pool, kept mapped while this lease lives (it holds the pool's shared
/// state, as a [`PageBox`] does): its address range, for registering with a device. The
/// lease gives no access to the bytes; those belong to the pages' owners.
pub struct ChunkLease {
    start: NonNull<u8>,
    len: usize,
    _pool: Arc<PoolInner>,
}

// SAFETY: the lease only names an address range and keeps the mapping alive through an
// `Arc`; it never reads or writes the bytes, so sharing or sending it cannot race with the
// pages' owners.
unsafe impl Send for ChunkLease {}
// SAFETY: as for Send: no method touches the memory.
unsafe impl Sync for ChunkLease {}

impl ChunkLease {
    /// First byte of the chunk (the mapping's start, page-aligned).
    pub fn start(&self) -> *mut u8 {
        self.start.as_ptr()
    }

    /// Bytes of the chunk.
    pub fn len_bytes(&self) -> usize {
        self.len
    }

    /// Whether `len` bytes at `addr` lie inside this chunk.
    pub fn contains(&self, addr: usize, len: usize) -> bool {
        let start = self.start.as_ptr() as usize;
        addr >= start
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= start + self.len)
    }
}

impl fmt::Debug for ChunkLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkLease")
            .field("start", &self.start)
            .field("len", &self.len)
            .finish()
    }
}

/// A snapshot of a pool's use. Exact when no thread is allocating or dropping pages of the
/// pool; otherwise each number was true at some moment during the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStats {
    /// Pages owned by live [`PageBox`]es.
    pub pages_in_use: u64,
    /// Pages of the reserved chunks not in use: recycled ones on the free list plus never-used
    /// ones. `pages_in_use + pages_free` is every page of every chunk.
    pub pages_free: u64,
    /// The part of `pages_free` never handed out yet (zero and usually not resident).
    pub pages_never_used: u64,
    /// Chunks reserved so far.
    pub chunks: u64,
    /// Bytes reserved so far (`chunks * chunk_bytes`).
    pub reserved_bytes: u64,
    /// Whether every chunk is bound to the pool's node (for a pool without chunks: whether
    /// the topology can bind memory at all). [`PagePool::binding_note`] says why not.
    pub bound_to_node: bool,
}

/// What the pool and every [`PageBox`] share.
struct PoolInner {
    free: FreeList,
    node: usize,
    chunk_bytes: usize,
    pages_per_chunk: u32,
    chunks: ChunkTable,
    growth: Mutex<Growth>,
    /// The first reason some memory of this pool is not bound, if any.
    binding_note: OnceLock<String>,
    /// To allocate further chunks (cheap to clone: hwloc's part is shared).
    topology: Topology,
}

/// Where pages come from: how many chunks there are and how many pages have ever been
/// handed out. Pages `carved..chunks * pages_per_chunk` are untouched.
struct Growth {
    chunks: u32,
    carved: u64,
}

/// One chunk: its memory, and the free-list link of each of its pages.
struct Chunk {
    memory: NodeMemory,
    /// `next[p]`: the page below page `p` on the free list while `p` is free; meaningless
    /// otherwise. Outside the page so that reading it never races with the page's owner.
    next: Box<[AtomicU32]>,
}

/// Chunk index -> chunk, readable without locks; written only by the growth mutex holder.
struct ChunkTable {
    segments: [OnceLock<Box<[OnceLock<Chunk>]>>; SEGMENTS],
}

/// Where a page handed out by the pool comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// From the free list: holds its previous owner's bytes.
    Recycled,
    /// Never used: still zero from mmap.
    Untouched,
    /// From the list of zeros: freed holding zeros.
    Zeros,
}

/// The free list: a Treiber stack of page indexes, and the in-use count (on the same cache
/// line, since both change on every allocation and drop).
///
/// `head` packs the top page's index (low 32 bits, [`NIL`] when empty) with a tag (high 32
/// bits) that every successful compare-exchange increments. The link below a free page `p`
/// is `next[p]` in its chunk.
///
/// **Push** (page `p`, only from `PageBox::drop`): load `head`; store `next[p] = top`
/// (Relaxed); compare-exchange `head` from `(top, tag)` to `(p, tag + 1)` with Release,
/// retrying from the value found on failure. Release makes everything the dropping thread
/// did before the push (its writes to the page, and `next[p]`) visible to the thread that
/// pops `p`.
///
/// **Pop**: load `head` with Acquire; if not empty, read `n = next[top]` (Relaxed) and
/// compare-exchange `head` from `(top, tag)` to `(n, tag + 1)` with Acquire (on failure too,
/// since we then read the link of the new top). Every write to `head` is a read-modify-write,
/// so an Acquire read of any value synchronises with the push that put that top there: the
/// popper sees `next[top]` as that push wrote it, or newer; and the winner of the
/// compare-exchange sees the previous owner's writes to the page before touching it.
///
/// **ABA**: between our load of `(top, tag)` and our compare-exchange, other threads may pop
/// `top`, pop `n`, and push `top` back; `next[top]` is then stale and installing `n` would put
/// an owned page on the list. Because every successful compare-exchange increments the tag,
/// `head` can equal `(top, tag)` again only after `2^32` of them, so our compare-exchange
/// fails and we retry. (A thread would have to stall between two adjacent instructions while
/// others do over four billion pool operations, i.e. for tens of seconds; we accept that, as
/// tagged-pointer stacks do.) Likewise, reading a `next[top]` newer than the one written by
/// the push we synchronised with implies `top` was popped and pushed again since, which moved
/// the tag. Reading `next[top]` of a page that
/// another thread owns by then is harmless: links are atomics outside the page and the value
/// is discarded when the compare-exchange fails.
///
/// Chunks are never freed while the inner state lives, so any index read from `head` or a
/// link names mapped memory; the chunk was published (under the growth mutex, through a
/// `OnceLock`) before its first page was carved, which happens before any push of it.
#[repr(align(64))]
struct FreeList {
    head: AtomicU64,
    /// The list of pages holding zeros (same protocol as `head`).
    zeros: AtomicU64,
    /// Pages owned by `PageBox`es. Relaxed: a statistic, not a synchronisation point.
    in_use: AtomicU64,
}

const fn pack(top: u32, tag: u32) -> u64 {
    ((tag as u64) << 32) | top as u64
}

const fn top_of(head: u64) -> u32 {
    head as u32
}

const fn tag_of(head: u64) -> u32 {
    (head >> 32) as u32
}

impl PagePool {
    /// A pool handing out pages of NUMA node `node` of `topology`, reserving memory
    /// `chunk_bytes` at a time (a non-zero multiple of [`PAGE_BYTES`], e.g. 2 MiB). Nothing is
    /// reserved until the first allocation.
    ///
    /// Never fails because of binding: if memory cannot be bound to the node, chunks are
    /// unbound and [`binding_note`](Self::binding_note) and
    /// [`PoolStats::bound_to_node`] say so.
    ///
    /// # Errors
    /// [`NumaError::UnknownNode`] if `node` is not a node of `topology`,
    /// [`NumaError::InvalidChunkSize`] if `chunk_bytes` is 0, not a multiple of
    /// [`PAGE_BYTES`], or `2^32` pages or more.
    pub fn new(
        topology: &Topology,
        node: usize,
        chunk_bytes: usize,
    ) -> Result<Arc<PagePool>, NumaError> {
        let node_count = topology.nodes().len();
        if node >= node_count {
            return Err(NumaError::UnknownNode { node, node_count });
        }
        let invalid = || NumaError::InvalidChunkSize {
            node,
            chunk_bytes,
            page_bytes: PAGE_BYTES,
        };
        if chunk_bytes == 0 || chunk_bytes % PAGE_BYTES != 0 {
            return Err(invalid());
        }
        let pages_per_chunk = u32::try_from(chunk_bytes / PAGE_BYTES).map_err(|_| invalid())?;
        let binding_note = OnceLock::new();
        if let Some(reason) = topology.memory_binding_note() {
            // A fresh OnceLock: this set cannot find it already set.
            let _ = binding_note.set(format!(
                "memory for NUMA node {node} is not bound: {reason}"
            ));
        }
        Ok(Arc::new(PagePool {
            inner: Arc::new(PoolInner {
                free: FreeList {
                    head: AtomicU64::new(pack(NIL, 0)),
                    zeros: AtomicU64::new(pack(NIL, 0)),
                    in_use: AtomicU64::new(0),
                },
                node,
                chunk_bytes,
                pages_per_chunk,
                chunks: ChunkTable::new(),
                growth: Mutex::new(Growth {
                    chunks: 0,
                    carved: 0,
                }),
                binding_note,
                topology: topology.clone(),
            }),
        }))
    }

    /// A page of zeros: a free page if there is one (zeroed now), else a never-used page
    /// (already zero), else the first page of a newly reserved chunk.
    ///
    /// # Errors
    /// [`NumaError::Mmap`] if a new chunk was needed and the kernel refused it,
    /// [`NumaError::PoolFull`] if the pool already holds the most pages it can index.
    pub fn alloc_zeroed(self: &Arc<Self>) -> Result<PageBox, NumaError> {
        let (mut page, origin) = self.inner.take_page(true)?;
        if origin == Origin::Recycled {
            page.fill(0);
        }
        Ok(page)
    }

    /// `alloc_zeroed`, taking a page from the list of recycled pages before the list of
    /// zeros (see the module documentation).
    ///
    /// # Errors
    /// As [`alloc_zeroed`](Self::alloc_zeroed).
    pub fn alloc_zeroed_recycled_first(self: &Arc<Self>) -> Result<PageBox, NumaError> {
        let (mut page, origin) = self.inner.take_page(false)?;
        if origin == Origin::Recycled {
            page.fill(0);
        }
        Ok(page)
    }

    /// A page holding a copy of `from`.
    ///
    /// # Errors
    /// As [`alloc_zeroed`](Self::alloc_zeroed).
    pub fn alloc_copy(self: &Arc<Self>, from: &[u8; PAGE_BYTES]) -> Result<PageBox, NumaError> {
        let (mut page, _) = self.inner.take_page(false)?;
        page.copy_from_slice(from);
        Ok(page)
    }

    /// How much of the pool is in use, free and reserved. Takes the growth mutex briefly.
    pub fn stats(&self) -> PoolStats {
        let inner = &self.inner;
        let (chunks, carved) = {
            let growth = inner.lock_growth();
            (u64::from(growth.chunks), growth.carved)
        };
        let capacity = chunks * u64::from(inner.pages_per_chunk);
        // Pages in use are carved pages, but pages carved after `carved` was read may already
        // be counted in `in_use`, hence the clamp (which also keeps the subtractions exact).
        let in_use = inner.free.in_use.load(Ordering::Relaxed).min(carved);
        PoolStats {
            pages_in_use: in_use,
            pages_free: capacity - in_use,
            pages_never_used: capacity - carved,
            chunks,
            reserved_bytes: chunks.saturating_mul(inner.chunk_bytes as u64),
            bound_to_node: inner.binding_note.get().is_none(),
        }
    }

    /// Dense index of the node this pool's pages are for.
    pub fn node(&self) -> usize {
        self.inner.node
    }

    /// Bytes reserved per chunk.
    pub fn chunk_bytes(&self) -> usize {
        self.inner.chunk_bytes
    }

    /// Why some of this pool's memory is not bound to its node (the first reason met), or
    /// `None` if all of it is.
    pub fn binding_note(&self) -> Option<&str> {
        self.inner.binding_note.get().map(String::as_str)
    }
}

impl fmt::Debug for PagePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PagePool")
            .field("node", &self.inner.node)
            .field("chunk_bytes", &self.inner.chunk_bytes)
            .field("stats", &self.stats())
            .field("binding_note", &self.binding_note())
            .finish()
    }
}

impl PoolInner {
    fn lock_growth(&self) -> std::sync::MutexGuard<'_, Growth> {
        // `Growth` is only assigned after all fallible work, so it is consistent even if a
        // holder panicked (which nothing under the lock is expected to do).
        self.growth.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A page to own: recycled if a free list has one (the list of zeros first when
    /// `zeros_first`, last otherwise), else untouched (carving, and reserving a chunk if
    /// needed). Counts it in use.
    fn take_page(self: &Arc<Self>, zeros_first: bool) -> Result<(PageBox, Origin), NumaError> {
        let (index, page, origin) = match self.pop_any(zeros_first) {
            Some(found) => found,
            None => self.carve()?,
        };
        self.free.in_use.fetch_add(1, Ordering::Relaxed);
        Ok((
            PageBox {
                page,
                index,
                pool: Arc::clone(self),
                free_as_zeros: false,
            },
            origin,
        ))
    }

    /// Chunk and page-in-chunk of a carved page index.
    fn slot(&self, index: u32) -> (&Chunk, usize) {
        let chunk_index = index / self.pages_per_chunk;
        let page = (index % self.pages_per_chunk) as usize;
        match self.chunks.get(chunk_index) {
            Some(chunk) => (chunk, page),
            // Indexes only come from carving (below `carved`, whose chunk is published first)
            // or from the free list (which only holds carved indexes).
            None => unreachable!(
                "page pool of NUMA node {}: page {index} is in no published chunk",
                self.node
            ),
        }
    }

    /// Take the top page off the free list (see [`FreeList`] for the orderings).
    /// A free page from either list, the list of zeros first when `zeros_first`.
    fn pop_any(&self, zeros_first: bool) -> Option<(u32, NonNull<[u8; PAGE_BYTES]>, Origin)> {
        let zeros = |(index, page)| (index, page, Origin::Zeros);
        let recycled = |(index, page)| (index, page, Origin::Recycled);
        if zeros_first {
            self.pop(&self.free.zeros)
                .map(zeros)
                .or_else(|| self.pop(&self.free.head).map(recycled))
        } else {
            self.pop(&self.free.head)
                .map(recycled)
                .or_else(|| self.pop(&self.free.zeros).map(zeros))
        }
    }

    /// Pops the top of the list whose head is `list` (`free.head` or `free.zeros`).
    fn pop(&self, list: &AtomicU64) -> Option<(u32, NonNull<[u8; PAGE_BYTES]>)> {
        let mut head = list.load(Ordering::Acquire);
        loop {
            let top = top_of(head);
            if top == NIL {
                return None;
            }
            let (chunk, page) = self.slot(top);
            let next = chunk.next[page].load(Ordering::Relaxed);
            match list.compare_exchange_weak(
                head,
                pack(next, tag_of(head).wrapping_add(1)),
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some((top, chunk.page(page))),
                Err(actual) => head = actual,
            }
        }
    }

    /// Put page `index`, which the caller owned and no longer uses, on the free list (see
    /// [`FreeList`] for the orderings).
    fn push(&self, list: &AtomicU64, index: u32) {
        let (chunk, page) = self.slot(index);
        let link = &chunk.next[page];
        let mut head = list.load(Ordering::Relaxed);
        loop {
            link.store(top_of(head), Ordering::Relaxed);
            match list.compare_exchange_weak(
                head,
                pack(index, tag_of(head).wrapping_add(1)),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => head = actual,
            }
        }
    }

    /// The slow path, under the growth mutex: a page freed meanwhile, else the next untouched
    /// page, reserving a new chunk when all are carved.
    fn carve(&self) -> Result<(u32, NonNull<[u8; PAGE_BYTES]>, Origin), NumaError> {
        let mut growth = self.lock_growth();
        // A page freed while we came here (or waited for the lock) is reused first.
        if let Some(found) = self.pop_any(false) {
            return Ok(found);
        }
        let pages_per_chunk = u64::from(self.pages_per_chunk);
        let capacity = u64::from(growth.chunks) * pages_per_chunk;
        if growth.carved == capacity {
            if capacity + pages_per_chunk > MAX_PAGES {
                return Err(NumaError::PoolFull {
                    node: self.node,
                    pages: capacity,
                });
            }
            let memory = NodeMemory::allocate(&self.topology, self.node, self.chunk_bytes)?;
            if let Some(note) = memory.binding_note() {
                // Keeps the first reason; later ones are almost surely the same.
                let _ = self.binding_note.set(note.to_owned());
            }
            let next = (0..self.pages_per_chunk)
                .map(|_| AtomicU32::new(NIL))
                .collect();
            self.chunks.publish(growth.chunks, Chunk { memory, next });
            growth.chunks += 1;
        }
        // carved < capacity <= MAX_PAGES = u32::MAX, so this cannot fail.
        let index = u32::try_from(growth.carved).map_err(|_| NumaError::PoolFull {
            node: self.node,
            pages: capacity,
        })?;
        growth.carved += 1;
        drop(growth);
        let (chunk, page) = self.slot(index);
        Ok((index, chunk.page(page), Origin::Untouched))
    }
}

impl Chunk {
    /// Page `page` (< pages per chunk) of this chunk.
    fn page(&self, page: usize) -> NonNull<[u8; PAGE_BYTES]> {
        debug_assert!(page < self.next.len());
        // SAFETY: `page < pages_per_chunk` (it comes from `index % pages_per_chunk`) and the
        // mapping is `pages_per_chunk * PAGE_BYTES` bytes, so the offset and the whole page
        // are inside the one allocation `base` points to; the offset is below `isize::MAX`
        // because the mapping itself exists. `base` has the mapping's provenance.
        unsafe { self.memory.base().add(page * PAGE_BYTES) }.cast::<[u8; PAGE_BYTES]>()
    }
}

impl ChunkTable {
    fn new() -> ChunkTable {
        ChunkTable {
            segments: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    /// Segment and offset of chunk `index`: chunk 0 | 1 2 | 3 4 5 6 | 7 ...
    fn position(index: u32) -> (usize, usize) {
        let slot = u64::from(index) + 1;
        let segment = slot.ilog2();
        (segment as usize, (slot - (1u64 << segment)) as usize)
    }

    fn get(&self, index: u32) -> Option<&Chunk> {
        let (segment, offset) = Self::position(index);
        self.segments.get(segment)?.get()?.get(offset)?.get()
    }

    /// Install chunk `index`. Only the growth mutex holder calls this, with consecutive
    /// indexes from 0, so the slot is always empty.
    fn publish(&self, index: u32, chunk: Chunk) {
        let (segment, offset) = Self::position(index);
        // `segment <= 32 < SEGMENTS` for every u32 index.
        let slots = self.segments[segment]
            .get_or_init(|| (0..1usize << segment).map(|_| OnceLock::new()).collect());
        let published = slots
            .get(offset)
            .is_some_and(|slot| slot.set(chunk).is_ok());
        // Carrying on would hand out pages of whatever chunk holds this index already, which
        // are carved: two owners of one page.
        assert!(
            published,
            "page pool chunk {index} was already published: growth invariant broken"
        );
    }
}

impl PageBox {
    /// Says the page holds only zeros and will not be written again: dropping it puts it on
    /// the list of zeros, which `alloc_zeroed` hands out without writing. (A page holding
    /// other bytes by then would give them to `alloc_zeroed`'s caller; debug builds check.)
    pub fn set_free_as_zeros(&mut self) {
        self.free_as_zeros = true;
    }

    /// Dense index of the node of the pool this page comes from.
    pub fn node(&self) -> usize {
        self.pool.node
    }

    /// Address of the page (4096-aligned), for diagnostics such as `/proc/self/numa_maps`.
    pub fn as_ptr(&self) -> *const u8 {
        self.page.as_ptr().cast::<u8>().cast_const()
    }

    /// Start of the chunk (mapping) this page lies in: a key for what is registered per
    /// chunk, such as an RDMA memory region.
    pub fn chunk_start(&self) -> usize {
        let (chunk, _) = self.pool.slot(self.index);
        chunk.memory.base().as_ptr() as usize
    }

    /// The chunk this page lies in, kept mapped while the lease lives: what a device
    /// registers once (an RDMA memory region) so that any page of the chunk can be the target
    /// of its DMA while a `PageBox` lends it.
    pub fn chunk(&self) -> ChunkLease {
        let (chunk, _) = self.pool.slot(self.index);
        ChunkLease {
            start: chunk.memory.base(),
            len: chunk.memory.len_bytes(),
            _pool: Arc::clone(&self.pool),
        }
    }

    /// Address of the page's first byte, for a device to write into (an RDMA READ landing in
    /// it). Writing through it is sound only while this `PageBox` is exclusively borrowed or
    /// owned by the writer and no reference to its bytes is live.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.page.as_ptr().cast::<u8>()
    }

    /// Ask hwloc how this page is bound and where it is resident (see
    /// [`NodeMemory::placement`]); `topology` should be the one its pool was made with.
    ///
    /// # Errors
    /// As [`NodeMemory::placement`].
    pub fn placement(&self, topology: &Topology) -> Result<Placement, NumaError> {
        area_placement(topology, &self[..])
    }
}

impl Deref for PageBox {
    type Target = [u8; PAGE_BYTES];

    fn deref(&self) -> &[u8; PAGE_BYTES] {
        // SAFETY: `page` is PAGE_BYTES readable, initialised bytes (zero from mmap or written
        // since) of a chunk owned by `self.pool`, which this `PageBox` keeps alive, so they stay
        // mapped for the borrow of `self`. This `PageBox` is the page's only owner (module
        // invariants: untouched, free, or owned by exactly one `PageBox`) and the pool never
        // references page bytes itself, so every reference to them comes from `self`: this
        // shared borrow can only coexist with other shared ones. A previous owner's accesses,
        // on any thread, happen before ours (its push was Release, our pop Acquire).
        unsafe { self.page.as_ref() }
    }
}

impl DerefMut for PageBox {
    fn deref_mut(&mut self) -> &mut [u8; PAGE_BYTES] {
        // SAFETY: as in `deref`; the mapping is writable, and `&mut self` makes this the only
        // reference to the page's bytes for its lifetime.
        unsafe { self.page.as_mut() }
    }
}

impl Drop for PageBox {
    fn drop(&mut self) {
        self.pool.free.in_use.fetch_sub(1, Ordering::Relaxed);
        let list = if self.free_as_zeros {
            debug_assert!(
                self.iter().all(|byte| *byte == 0),
                "a page freed as zeros holds other bytes"
            );
            &self.pool.free.zeros
        } else {
            &self.pool.free.head
        };
        // The last use of `page`: once pushed, another thread may own it. `pool` (and with it,
        // possibly, the chunks) is released after this, when the fields are dropped.
        self.pool.push(list, self.index);
    }
}

// SAFETY: a `PageBox` owns its page exclusively, like a `Box<[u8; PAGE_BYTES]>` (module
// invariants), and its other field is an `Arc` of `Send + Sync` state; so moving it to another
// thread, and dropping it there (a lock-free push), is as safe as moving a `Box`.
unsafe impl Send for PageBox {}
// SAFETY: `&PageBox` only gives `&[u8; PAGE_BYTES]` (plain bytes) and the page's address;
// mutation needs `&mut PageBox`. Sharing it is as safe as sharing `&Box<[u8; PAGE_BYTES]>`.
unsafe impl Sync for PageBox {}

impl fmt::Debug for PageBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageBox")
            .field("node", &self.pool.node)
            .field("index", &self.index)
            .field("address", &self.page)
            .finish()
    }
}
