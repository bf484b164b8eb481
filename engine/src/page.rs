//! Pages of simulated memory, and the accounting that enforces `--max-memory`.
//!
//! Every 4 KiB page the engine holds — committed versions, copy-on-write copies, private pages —
//! is a `Page`. Its bytes come from a NUMA-node-local pool (`dvm_numa::PagePool`) chosen by the
//! worker that allocates it, and it is counted in a `MemoryAccount` for its whole life, so the
//! memory limit and the peak-memory statistic see exactly what exists.
//!
//! Invariant: `MemoryAccount::live_pages` equals the number of `Page` values alive plus the
//! pages' worth reserved with `reserve_pages` and not released.

use dvm_numa::{PageBox, PagePool};
use smallvec::SmallVec;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub const PAGE_BYTES: usize = 4096;
pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_OFFSET_MASK: u64 = (PAGE_BYTES as u64) - 1;

/// One bit per byte of a page: which bytes a runner or a commit stored.
pub type Mask = [u64; PAGE_BYTES / 64];

pub const EMPTY_MASK: Mask = [0; PAGE_BYTES / 64];
pub const FULL_MASK: Mask = [u64::MAX; PAGE_BYTES / 64];

/// A page of zeros, shared by every read of memory nobody wrote.
pub static ZERO_PAGE: [u8; PAGE_BYTES] = [0; PAGE_BYTES];

/// Marks bytes `offset .. offset + len` (within one page) in `mask`.
#[inline(always)]
pub fn mark(mask: &mut Mask, offset: usize, len: usize) {
    debug_assert!(offset + len <= PAGE_BYTES);
    let mut byte = offset;
    let end = offset + len;
    while byte < end {
        let word = byte / 64;
        let bit = byte % 64;
        let take = (64 - bit).min(end - byte);
        let bits = if take == 64 {
            u64::MAX
        } else {
            ((1u64 << take) - 1) << bit
        };
        mask[word] |= bits;
        byte += take;
    }
}

/// The first byte offset set in both masks.
pub fn first_overlap(a: &Mask, b: &Mask) -> Option<usize> {
    a.iter()
        .zip(b.iter())
        .enumerate()
        .find_map(|(word, (x, y))| {
            let both = x & y;
            (both != 0).then(|| word * 64 + both.trailing_zeros() as usize)
        })
}

pub fn is_empty(mask: &Mask) -> bool {
    mask.iter().all(|word| *word == 0)
}

/// Copies the bytes selected by `mask` from `from` into `to`.
pub fn merge_masked(to: &mut [u8; PAGE_BYTES], from: &[u8; PAGE_BYTES], mask: &Mask) {
    for (word_index, word) in mask.iter().enumerate() {
        if *word == 0 {
            continue;
        }
        let base = word_index * 64;
        if *word == u64::MAX {
            to[base..base + 64].copy_from_slice(&from[base..base + 64]);
            continue;
        }
        let mut bits = *word;
        while bits != 0 {
            let bit = bits.trailing_zeros() as usize;
            to[base + bit] = from[base + bit];
            bits &= bits - 1;
        }
    }
}

/// Hasher for maps keyed by page numbers: one multiply and a fold. Page numbers are not
/// attacker-chosen hash-flooding input in any way that matters here (a program can only slow
/// itself down), and SipHash showed up at 9% of a k-means profile.
///
/// The fold matters: the low bits of a product depend only on the low bits of the key, and
/// the maps index buckets by the low bits. Runtime stacks are 64 pages apart, so without it
/// every stack page landed in 1/64 of the buckets and each lookup walked a long probe run.
#[derive(Default, Clone, Copy)]
pub struct PageHasher(u64);

impl std::hash::Hasher for PageHasher {
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*byte)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0 ^ value).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

pub type PageHash = std::hash::BuildHasherDefault<PageHasher>;

/// Counts live pages against the run's memory limit.
#[derive(Debug)]
pub struct MemoryAccount {
    live_pages: AtomicU64,
    peak_pages: AtomicU64,
    allocated_total: AtomicU64,
    copied_total: AtomicU64,
    limit_pages: u64,
}

impl MemoryAccount {
    pub fn new(limit_bytes: u64) -> Arc<MemoryAccount> {
        Arc::new(MemoryAccount {
            live_pages: AtomicU64::new(0),
            peak_pages: AtomicU64::new(0),
            allocated_total: AtomicU64::new(0),
            copied_total: AtomicU64::new(0),
            limit_pages: (limit_bytes / PAGE_BYTES as u64).max(1),
        })
    }

    pub fn limit_bytes(&self) -> u64 {
        self.limit_pages * PAGE_BYTES as u64
    }

    pub fn live_bytes(&self) -> u64 {
        self.live_pages.load(Ordering::Relaxed) * PAGE_BYTES as u64
    }

    pub fn peak_bytes(&self) -> u64 {
        self.peak_pages.load(Ordering::Relaxed) * PAGE_BYTES as u64
    }

    pub fn pages_allocated(&self) -> u64 {
        self.allocated_total.load(Ordering::Relaxed)
    }

    pub fn pages_copied(&self) -> u64 {
        self.copied_total.load(Ordering::Relaxed)
    }

    /// Reserves `count` pages' worth of the limit for memory that is not a page (console
    /// output waiting for a slow reader), or says the limit would be passed. The holder gives
    /// it back with `release_reserved`.
    pub fn reserve_pages(&self, count: u64) -> Result<(), MemoryLimit> {
        let live = self.live_pages.fetch_add(count, Ordering::Relaxed) + count;
        if live > self.limit_pages {
            self.live_pages.fetch_sub(count, Ordering::Relaxed);
            return Err(MemoryLimit {
                limit_bytes: self.limit_bytes(),
            });
        }
        self.peak_pages.fetch_max(live, Ordering::Relaxed);
        Ok(())
    }

    pub fn release_reserved(&self, count: u64) {
        self.live_pages.fetch_sub(count, Ordering::Relaxed);
    }

    /// Reserves one page, or says the limit is reached.
    fn reserve(&self) -> Result<(), MemoryLimit> {
        // Relaxed is enough: the count is a budget, not a synchronisation point; the limit may
        // be overshot by at most one page per concurrently allocating worker.
        let live = self.live_pages.fetch_add(1, Ordering::Relaxed) + 1;
        if live > self.limit_pages {
            self.live_pages.fetch_sub(1, Ordering::Relaxed);
            return Err(MemoryLimit {
                limit_bytes: self.limit_bytes(),
            });
        }
        self.peak_pages.fetch_max(live, Ordering::Relaxed);
        self.allocated_total.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The run's page memory is used up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryLimit {
    pub limit_bytes: u64,
}

/// Where a worker gets pages: its NUMA node's pool, counted in the run's account.
#[derive(Clone)]
pub struct PageSource {
    pool: Arc<PagePool>,
    account: Arc<MemoryAccount>,
}

impl PageSource {
    pub fn new(pool: Arc<PagePool>, account: Arc<MemoryAccount>) -> PageSource {
        PageSource { pool, account }
    }

    pub fn account(&self) -> &Arc<MemoryAccount> {
        &self.account
    }

    pub fn zeroed(&self) -> Result<Page, MemoryLimit> {
        self.account.reserve()?;
        self.counted(self.pool.alloc_zeroed())
    }

    /// `zeroed`, for a page that will be written at will and freed with its bytes (a
    /// runner's scratch page): a recently freed page, cheap to zero while it is in cache,
    /// rather than one from the pool's list of zeros (see `dvm_numa::pool`).
    pub fn zeroed_scratch(&self) -> Result<Page, MemoryLimit> {
        self.account.reserve()?;
        self.counted(self.pool.alloc_zeroed_recycled_first())
    }

    pub fn copy_of(&self, from: &[u8; PAGE_BYTES]) -> Result<Page, MemoryLimit> {
        self.account.reserve()?;
        self.account.copied_total.fetch_add(1, Ordering::Relaxed);
        self.counted(self.pool.alloc_copy(from))
    }

    /// A page lent to a device to fill (an RDMA READ of a remote version lands in it),
    /// counted from now: [`Reserved::adopt`] makes it a [`Page`] once it holds a version worth
    /// keeping; dropping the reservation without adopting gives the count back. Its bytes
    /// are whatever the pool had (the device overwrites them all).
    pub fn lend(&self) -> Result<(PageBox, Reserved), MemoryLimit> {
        self.account.reserve()?;
        let reserved = Reserved {
            account: Arc::clone(&self.account),
            adopted: false,
        };
        match self.pool.alloc_zeroed_recycled_first() {
            Ok(bytes) => Ok((bytes, reserved)),
            Err(_) => Err(MemoryLimit {
                limit_bytes: self.account.limit_bytes(),
            }),
        }
    }

    /// Wraps a page the account has reserved; gives the reservation back if the OS refused
    /// the memory (reported as the memory limit: the run cannot have more).
    fn counted(&self, bytes: Result<PageBox, dvm_numa::NumaError>) -> Result<Page, MemoryLimit> {
        match bytes {
            Ok(bytes) => Ok(Page {
                bytes,
                account: Arc::clone(&self.account),
                zeros_but: None,
            }),
            Err(_) => {
                self.account.live_pages.fetch_sub(1, Ordering::Relaxed);
                Err(MemoryLimit {
                    limit_bytes: self.account.limit_bytes(),
                })
            }
        }
    }
}

/// One page counted in a run's account before it is a [`Page`] (see [`PageSource::lend`]).
pub struct Reserved {
    account: Arc<MemoryAccount>,
    /// Set by `adopt`: the count then belongs to the page.
    adopted: bool,
}

impl Reserved {
    /// `bytes` (a page of the pool this reservation's source lent) as a counted page.
    pub fn adopt(mut self, bytes: PageBox) -> Page {
        self.adopted = true;
        Page {
            bytes,
            account: Arc::clone(&self.account),
            zeros_but: None,
        }
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if !self.adopted {
            self.account.live_pages.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One page of memory, counted while it lives.
pub struct Page {
    bytes: PageBox,
    account: Arc<MemoryAccount>,
    /// `Some`: zeros but for the bytes its owner's mask records and these byte ranges
    /// (`set_zeros_but_stored`, `set_zeros_but_stored_and`).
    zeros_but: Option<SmallVec<[(u16, u16); 2]>>,
}

impl Page {
    /// Declares that every byte of this page that its owner's mask will not record as stored
    /// is zero: the view's copy of a page nobody wrote, every store to which marks its mask.
    pub fn set_zeros_but_stored(&mut self) {
        self.zeros_but = Some(SmallVec::new());
    }

    /// `set_zeros_but_stored`, for a copy of a page that was `runs` of bytes over zeros (a
    /// reused stack's frame, a reused id's exit record): the runs are cleared too when it is
    /// freed. A page with too many runs to list stays a page of unknown bytes.
    pub fn set_zeros_but_stored_and(&mut self, runs: impl Iterator<Item = std::ops::Range<usize>>) {
        let mut listed = SmallVec::new();
        for run in runs {
            match (u16::try_from(run.start), u16::try_from(run.end)) {
                (Ok(start), Ok(end)) => listed.push((start, end)),
                _ => return,
            }
        }
        self.zeros_but = Some(listed);
    }

    /// Frees the page, given the bytes its mask recorded: a page declared
    /// `set_zeros_but_stored` has them cleared and goes to the pool's list of zeros, so a
    /// later `zeroed` page costs the cache lines its owner writes, not a 4 KiB `memset` of
    /// cold memory (a spawner's copy of each child's stack page, to write its frame).
    pub fn free_clearing(mut self, stored: impl IntoIterator<Item = std::ops::Range<usize>>) {
        let Some(listed) = self.zeros_but.take() else {
            return;
        };
        let listed = listed
            .iter()
            .map(|&(start, end)| usize::from(start)..usize::from(end));
        for bytes in stored.into_iter().chain(listed) {
            if let Some(bytes) = self.bytes.get_mut(bytes) {
                bytes.fill(0);
            }
        }
        self.bytes.set_free_as_zeros();
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        self.account.live_pages.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Deref for Page {
    type Target = [u8; PAGE_BYTES];
    fn deref(&self) -> &Self::Target {
        &self.bytes
    }
}

impl DerefMut for Page {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.bytes
    }
}

impl std::fmt::Debug for Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Page")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_sets_exact_bits_across_words() {
        let mut mask = EMPTY_MASK;
        mark(&mut mask, 60, 8);
        assert_eq!(mask[0], 0xF << 60);
        assert_eq!(mask[1], 0xF);
        mark(&mut mask, 128, 64);
        assert_eq!(mask[2], u64::MAX);
        let mut other = EMPTY_MASK;
        mark(&mut other, 67, 1);
        assert_eq!(first_overlap(&mask, &other), Some(67));
        let mut disjoint = EMPTY_MASK;
        mark(&mut disjoint, 68, 4);
        assert_eq!(first_overlap(&other, &disjoint), None);
    }

    #[test]
    fn merge_copies_only_masked_bytes() {
        let mut to = [1u8; PAGE_BYTES];
        let from = [2u8; PAGE_BYTES];
        let mut mask = EMPTY_MASK;
        mark(&mut mask, 10, 3);
        mark(&mut mask, 64, 64);
        merge_masked(&mut to, &from, &mask);
        assert_eq!(&to[9..14], &[1, 2, 2, 2, 1]);
        assert!(to[64..128].iter().all(|b| *b == 2));
        assert_eq!(to[128], 1);
    }
}
