//! The software TLB and the page frames it points into: the engine's only `unsafe` code.
//!
//! A view's hot path is a load or store through a TLB entry: a tag compare, a bound check and
//! one memory access through a pointer the entry carries. The entries are `#[repr(C)]`
//! (`tag`, read pointer, write pointer, store-mask pointer) so generated code can probe them
//! the same way. This module owns both the entries and every page they may point into
//! (`Frames`), which is what makes handing out those pointers sound.
//!
//! Invariants (each `unsafe` block relies on one of them):
//! 1. An entry whose tag matches the current generation points only into memory that lives as
//!    long as the `Frames` it was filled from: `ZERO_PAGE` (static), a clean `Arc<Page>` held in
//!    `Frames::clean`, or a private or dirty page in `Frames::private` / `Frames::dirty`. The
//!    bytes of a `Page` live in a pool chunk, not in the `Page` value, so moving the value
//!    (a `Vec` growing) does not move them; a dirty page's mask is a leaked `Box` freed only by
//!    `DirtyFrame::drop` or returned by `take_dirty`.
//! 2. Frames are removed only by `take_dirty`, `clear_clean` and `clear`, which all invalidate every entry
//!    first (a generation bump), so no live entry points at a removed frame.
//! 3. Pointers into private and dirty pages are derived once, when the frame is created, and
//!    the page is not borrowed again until its frame is removed: every access to those bytes
//!    goes through the stored pointers, so they are never invalidated by a newer borrow.
//! 4. A read pointer covers `PAGE_BYTES` bytes and a non-null mask pointer `PAGE_BYTES / 64` words;
//!    every access checks `offset + len <= PAGE_BYTES` (`len <= 8`) before it dereferences.
//! 5. A write pointer is non-null only for memory this view owns exclusively (a private page or
//!    its own dirty copy); clean pages and `ZERO_PAGE` get a null write pointer.
//!
//! Tags carry a generation in their top bits, so invalidating the whole TLB (a new runner on a
//! reused view, a page that changed place while aliases may be cached) is one increment.
#![allow(unsafe_code)]

use crate::page::{Mask, Page, EMPTY_MASK, PAGE_BYTES, PAGE_OFFSET_MASK, PAGE_SHIFT, ZERO_PAGE};
use crate::store::PageKey;
use std::ptr::{self, NonNull};
use std::sync::Arc;

/// Sets of two ways each: 256 entries, 1 MiB of working set.
pub const TLB_SETS: usize = 128;
/// `set_of`'s shift and multiplier (generated code computes the set the same way).
pub const SET_SHIFT: u32 = 64 - TLB_SETS.trailing_zeros();
pub const SET_HASH: u64 = 0x9e37_79b9_7f4a_7c15;
/// Page numbers of 64-bit addresses fit in 52 bits; the generation takes the 12 above.
const GEN_SHIFT: u32 = 64 - PAGE_SHIFT;
const GEN_LIMIT: u64 = 1 << PAGE_SHIFT;

/// One TLB entry, laid out for generated code: `tag` at 0, `read` at 8, `write` at 16,
/// `mask` at 24.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TlbEntry {
    /// `page | generation << 52`; 0 never matches (generations start at 1).
    pub tag: u64,
    /// The page's bytes, for loads.
    pub read: *const u8,
    /// The page's bytes for stores, or null: stores take the slow path.
    pub write: *mut u8,
    /// The page's store mask (one bit per byte), or null for a private page (never committed,
    /// so nobody reads which bytes were stored).
    pub mask: *mut u64,
}

const EMPTY_ENTRY: TlbEntry = TlbEntry {
    tag: 0,
    read: ptr::null(),
    write: ptr::null_mut(),
    mask: ptr::null_mut(),
};

/// Where a page's bytes are, as the view resolves it on a miss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Reads as zeros (never written in the snapshot, or an untouched private page).
    Zero,
    /// Index into the clean snapshot pages.
    Clean(u32),
    /// Index into the private pages.
    Private(u32),
    /// Index into the dirty (copy-on-write) pages.
    Dirty(u32),
}

struct PrivateFrame {
    /// Owns the bytes `data` points to; not borrowed while the frame exists (invariant 3).
    _page: Page,
    data: NonNull<u8>,
}

struct DirtyFrame {
    key: PageKey,
    /// `Some` until `take_dirty` moves it out; not borrowed while the frame exists.
    page: Option<Page>,
    data: NonNull<u8>,
    /// A leaked `Box<Mask>` (invariant 1).
    mask: NonNull<Mask>,
}

impl DirtyFrame {
    /// The frame's page and its mask, owned: the frame is gone without its `Drop`. The caller
    /// invalidated every entry that pointed into it.
    fn into_parts(self) -> (PageKey, Option<Page>, Box<Mask>) {
        let mut frame = std::mem::ManuallyDrop::new(self);
        let page = frame.page.take();
        // SAFETY: `mask` came from `Box::leak` in `add_dirty` and is turned back into a `Box`
        // only here or in `drop`; the frame is never dropped (`ManuallyDrop`), so this is its
        // only owner. Its other fields own nothing (`page` was moved out above).
        let mask = unsafe { Box::from_raw(frame.mask.as_ptr()) };
        (frame.key, page, mask)
    }
}

impl Drop for DirtyFrame {
    fn drop(&mut self) {
        // SAFETY: `mask` came from `Box::leak` in `add_dirty` and is turned back into a `Box`
        // only here or in `into_parts`, which consumes the frame without dropping it; so this
        // is its only owner.
        drop(unsafe { Box::from_raw(self.mask.as_ptr()) });
    }
}

/// A dirty page handed back for commit.
pub struct TakenPage {
    pub key: PageKey,
    pub data: Page,
    pub stored: Box<Mask>,
}

/// The TLB and the frames its entries point into.
pub struct Tlb {
    sets: Box<[[TlbEntry; 2]; TLB_SETS]>,
    /// The current generation, already shifted into tag position.
    gen_tag: u64,
    clean: Vec<Arc<Page>>,
    private: Vec<PrivateFrame>,
    dirty: Vec<DirtyFrame>,
}

// SAFETY: the raw pointers in `Tlb` point into `ZERO_PAGE` (immutable static) or into pages and
// masks owned by this same `Tlb` (invariant 1), which are `Send`; moving the `Tlb` to another
// thread moves their only owner with it, and `&Tlb` only reads through them.
unsafe impl Send for Tlb {}

#[inline(always)]
fn set_of(page: u64) -> usize {
    // A multiplicative hash, not the low bits: region bases are aligned to large powers of two,
    // so their first pages would otherwise share a set.
    (page.wrapping_mul(SET_HASH) >> SET_SHIFT) as usize
}

/// Marks bytes `offset .. offset + len` (`len <= 8`, inside the page) in the mask at `mask`.
///
/// # Safety
/// `mask` points to `PAGE_BYTES / 64` writable words and `offset + len <= PAGE_BYTES`.
#[inline(always)]
unsafe fn mark(mask: *mut u64, offset: usize, len: usize) {
    let word = offset >> 6;
    let bit = offset & 63;
    let bits = (1u64 << len) - 1;
    // SAFETY: `word < PAGE_BYTES / 64` because `offset < PAGE_BYTES`; the caller guarantees
    // the mask's size.
    unsafe { *mask.add(word) |= bits << bit };
    if bit + len > 64 {
        // SAFETY: the access crosses into the next word, which exists because the access ends
        // inside the page (`offset + len <= PAGE_BYTES`).
        unsafe { *mask.add(word + 1) |= bits >> (64 - bit) };
    }
}

/// Reads `len` bytes (1, 4 or 8; others byte by byte) little-endian at `at`.
///
/// # Safety
/// `at .. at + len` is readable.
#[inline(always)]
unsafe fn read_le(at: *const u8, len: usize) -> u64 {
    // SAFETY (all arms): the caller guarantees `len` readable bytes at `at`; unaligned reads
    // are allowed by `read_unaligned`.
    unsafe {
        match len {
            8 => u64::from_le(ptr::read_unaligned(at as *const u64)),
            4 => u64::from(u32::from_le(ptr::read_unaligned(at as *const u32))),
            1 => u64::from(*at),
            _ => {
                let mut raw = [0u8; 8];
                ptr::copy_nonoverlapping(at, raw.as_mut_ptr(), len);
                u64::from_le_bytes(raw)
            }
        }
    }
}

/// # Safety
/// `at .. at + len` is writable and not borrowed elsewhere.
#[inline(always)]
unsafe fn write_le(at: *mut u8, len: usize, value: u64) {
    // SAFETY (all arms): the caller guarantees `len` writable bytes at `at`.
    unsafe {
        match len {
            8 => ptr::write_unaligned(at as *mut u64, value.to_le()),
            4 => ptr::write_unaligned(at as *mut u32, (value as u32).to_le()),
            1 => *at = value as u8,
            _ => ptr::copy_nonoverlapping(value.to_le_bytes().as_ptr(), at, len),
        }
    }
}

impl Default for Tlb {
    fn default() -> Self {
        Tlb::new()
    }
}

impl Tlb {
    pub fn new() -> Tlb {
        Tlb {
            sets: Box::new([[EMPTY_ENTRY; 2]; TLB_SETS]),
            gen_tag: 1 << GEN_SHIFT,
            clean: Vec::new(),
            private: Vec::new(),
            dirty: Vec::new(),
        }
    }

    /// The entries (`TLB_SETS` sets of two) and the current generation's tag, for generated
    /// code that probes like `probe`. The pointer is valid, and the entries unchanged, until
    /// the next `&mut self` call.
    pub fn raw_parts(&self) -> (*const TlbEntry, u64) {
        (self.sets.as_ptr() as *const TlbEntry, self.gen_tag)
    }

    /// The entry for `addr`'s page, if cached in this generation.
    #[inline(always)]
    fn probe(&self, addr: u64) -> Option<&TlbEntry> {
        let page = addr >> PAGE_SHIFT;
        let key = page | self.gen_tag;
        let set = &self.sets[set_of(page)];
        if set[0].tag == key {
            Some(&set[0])
        } else if set[1].tag == key {
            Some(&set[1])
        } else {
            None
        }
    }

    /// Loads `len` (1..=8) bytes at `addr` on a hit; `None`: take the slow path.
    #[inline(always)]
    pub fn load(&self, addr: u64, len: usize) -> Option<u64> {
        debug_assert!((1..=8).contains(&len));
        let offset = (addr & PAGE_OFFSET_MASK) as usize;
        if offset + len > PAGE_BYTES {
            return None;
        }
        let entry = self.probe(addr)?;
        // SAFETY: a matching entry's read pointer covers the page (invariants 1, 2, 4) and the
        // access is inside it (checked above).
        Some(unsafe { read_le(entry.read.add(offset), len) })
    }

    /// Stores on a hit with a write pointer; `false`: take the slow path.
    #[inline(always)]
    pub fn store(&mut self, addr: u64, len: usize, value: u64) -> bool {
        debug_assert!((1..=8).contains(&len));
        let offset = (addr & PAGE_OFFSET_MASK) as usize;
        if offset + len > PAGE_BYTES {
            return false;
        }
        let Some(entry) = self.probe(addr) else {
            return false;
        };
        if entry.write.is_null() {
            return false;
        }
        // SAFETY: a non-null write pointer of a matching entry covers a page this view owns
        // exclusively, and its mask pointer, if not null, a whole mask (invariants 1, 2, 4, 5);
        // the access is inside the page.
        unsafe {
            write_le(entry.write.add(offset), len, value);
            if !entry.mask.is_null() {
                mark(entry.mask, offset, len);
            }
        }
        true
    }

    /// Read-modify-write of an 8-byte word with one probe; `None`: take the slow path.
    #[inline(always)]
    pub fn update_u64(&mut self, addr: u64, f: impl FnOnce(u64) -> u64) -> Option<u64> {
        let offset = (addr & PAGE_OFFSET_MASK) as usize;
        if offset + 8 > PAGE_BYTES {
            return None;
        }
        let entry = self.probe(addr)?;
        if entry.write.is_null() {
            return None;
        }
        // SAFETY: as in `store`; the read and write pointers of a writable entry are the same
        // page.
        unsafe {
            let at = entry.write.add(offset);
            let value = f(read_le(at, 8));
            write_le(at, 8, value);
            if !entry.mask.is_null() {
                mark(entry.mask, offset, 8);
            }
            Some(value)
        }
    }

    /// Invalidates every entry (one increment; a full clear once per 4095 generations).
    pub fn invalidate_all(&mut self) {
        self.gen_tag = self.gen_tag.wrapping_add(1 << GEN_SHIFT);
        if self.gen_tag >> GEN_SHIFT == 0 || self.gen_tag >> GEN_SHIFT >= GEN_LIMIT {
            for set in self.sets.iter_mut() {
                *set = [EMPTY_ENTRY; 2];
            }
            self.gen_tag = 1 << GEN_SHIFT;
        }
    }

    /// Caches `frame` for the page of `addr` (replacing any entry for that page); `writable`:
    /// stores may use the fast path (ignored for frames that cannot be written).
    pub fn fill(&mut self, addr: u64, frame: Frame, writable: bool) {
        let (read, write, mask) = self.pointers(frame);
        let write = if writable { write } else { ptr::null_mut() };
        let page = addr >> PAGE_SHIFT;
        let key = page | self.gen_tag;
        let entry = TlbEntry {
            tag: key,
            read,
            write,
            mask,
        };
        let set = &mut self.sets[set_of(page)];
        if set[1].tag == key {
            set[1] = entry;
        } else {
            // Most recent in way 0; the previous way 0 becomes the victim in way 1.
            if set[0].tag != key {
                set[1] = set[0];
            }
            set[0] = entry;
        }
    }

    /// Drops the entry for `addr`'s page, if any.
    pub fn invalidate(&mut self, addr: u64) {
        let page = addr >> PAGE_SHIFT;
        let key = page | self.gen_tag;
        for entry in self.sets[set_of(page)].iter_mut() {
            if entry.tag == key {
                *entry = EMPTY_ENTRY;
            }
        }
    }

    fn pointers(&mut self, frame: Frame) -> (*const u8, *mut u8, *mut u64) {
        match frame {
            Frame::Zero => (ZERO_PAGE.as_ptr(), ptr::null_mut(), ptr::null_mut()),
            Frame::Clean(index) => match self.clean.get(index as usize) {
                Some(page) => (page.as_ptr(), ptr::null_mut(), ptr::null_mut()),
                None => (ZERO_PAGE.as_ptr(), ptr::null_mut(), ptr::null_mut()),
            },
            Frame::Private(index) => match self.private.get(index as usize) {
                Some(f) => (
                    f.data.as_ptr() as *const u8,
                    f.data.as_ptr(),
                    ptr::null_mut(),
                ),
                None => (ZERO_PAGE.as_ptr(), ptr::null_mut(), ptr::null_mut()),
            },
            Frame::Dirty(index) => match self.dirty.get(index as usize) {
                Some(f) => (
                    f.data.as_ptr() as *const u8,
                    f.data.as_ptr(),
                    f.mask.as_ptr() as *mut u64,
                ),
                None => (ZERO_PAGE.as_ptr(), ptr::null_mut(), ptr::null_mut()),
            },
        }
    }

    /// Reads through a frame (the slow path; the access is inside one page).
    pub fn read_frame(&mut self, frame: Frame, offset: usize, len: usize) -> u64 {
        assert!(offset + len <= PAGE_BYTES && (1..=8).contains(&len));
        let (read, _, _) = self.pointers(frame);
        // SAFETY: `pointers` gives a pointer to a whole live page (invariants 1, 4); the
        // access is inside it (asserted).
        unsafe { read_le(read.add(offset), len) }
    }

    /// Writes through a writable frame (private or dirty); `false` for one that is not.
    pub fn write_frame(&mut self, frame: Frame, offset: usize, len: usize, value: u64) -> bool {
        assert!(offset + len <= PAGE_BYTES && (1..=8).contains(&len));
        let (_, write, mask) = self.pointers(frame);
        if write.is_null() {
            return false;
        }
        // SAFETY: a non-null write pointer from `pointers` is a page this view owns
        // exclusively, with a whole mask (invariants 1, 4, 5); the access is inside it.
        unsafe {
            write_le(write.add(offset), len, value);
            if !mask.is_null() {
                mark(mask, offset, len);
            }
        }
        true
    }

    pub fn add_clean(&mut self, page: Arc<Page>) -> u32 {
        self.clean.push(page);
        (self.clean.len() - 1) as u32
    }

    pub fn add_private(&mut self, mut page: Page) -> u32 {
        // The one borrow of the page's bytes while its frame exists (invariant 3).
        let data = NonNull::from(&mut *page).cast::<u8>();
        self.private.push(PrivateFrame { _page: page, data });
        (self.private.len() - 1) as u32
    }

    pub fn add_dirty(&mut self, key: PageKey, mut page: Page) -> u32 {
        let data = NonNull::from(&mut *page).cast::<u8>();
        let mask = NonNull::from(Box::leak(Box::new(EMPTY_MASK)));
        self.dirty.push(DirtyFrame {
            key,
            page: Some(page),
            data,
            mask,
        });
        (self.dirty.len() - 1) as u32
    }

    /// The bytes of a clean page (for copy-on-write).
    pub fn clean_page(&self, index: u32) -> Option<&Arc<Page>> {
        self.clean.get(index as usize)
    }

    pub fn dirty_count(&self) -> usize {
        self.dirty.len()
    }

    /// Moves the dirty pages out (for commit). Invalidates the TLB first (invariant 2).
    pub fn take_dirty(&mut self) -> Vec<TakenPage> {
        self.invalidate_all();
        let mut taken = Vec::with_capacity(self.dirty.len());
        for frame in self.dirty.drain(..) {
            let (key, page, stored) = frame.into_parts();
            if let Some(data) = page {
                taken.push(TakenPage { key, data, stored });
            }
        }
        taken
    }

    /// Drops every frame (keeping the vectors' capacity) after invalidating the TLB.
    /// Drops the snapshot-page frames (the runner read more pages made for it alone than it
    /// may keep). Invalidates the TLB first (invariant 2); private and dirty frames stay.
    pub fn clear_clean(&mut self) {
        self.invalidate_all();
        self.clean.clear();
    }

    pub fn clean_count(&self) -> usize {
        self.clean.len()
    }

    pub fn clear(&mut self) {
        self.invalidate_all();
        self.clean.clear();
        self.private.clear();
        self.dirty.clear();
    }

    /// Stale-pointer check for tests: every live entry points at a frame still held.
    #[cfg(test)]
    pub fn entries_point_at_frames(&self) -> bool {
        self.sets.iter().flatten().all(|entry| {
            if entry.tag >> GEN_SHIFT != self.gen_tag >> GEN_SHIFT || entry.tag == 0 {
                return true;
            }
            let read = entry.read;
            read == ZERO_PAGE.as_ptr()
                || self.clean.iter().any(|page| page.as_ptr() == read)
                || self
                    .private
                    .iter()
                    .any(|f| std::ptr::eq(f.data.as_ptr(), read))
                || self
                    .dirty
                    .iter()
                    .any(|f| std::ptr::eq(f.data.as_ptr(), read))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_marks_across_words() {
        let mut mask = EMPTY_MASK;
        // SAFETY: a whole mask; the accesses are inside the page.
        unsafe {
            mark(mask.as_mut_ptr(), 60, 8);
            mark(mask.as_mut_ptr(), PAGE_BYTES - 8, 8);
        }
        assert_eq!(mask[0], 0xf << 60);
        assert_eq!(mask[1], 0xf);
        assert_eq!(mask[63], 0xff << 56);
    }

    #[test]
    fn generations_invalidate_and_wrap() {
        let mut tlb = Tlb::new();
        tlb.fill(0x2_0000_0000, Frame::Zero, false);
        assert_eq!(tlb.load(0x2_0000_0008, 8), Some(0));
        tlb.invalidate_all();
        assert_eq!(tlb.load(0x2_0000_0008, 8), None, "a new generation misses");
        for _ in 0..GEN_LIMIT + 3 {
            tlb.invalidate_all();
        }
        assert_eq!(
            tlb.load(0x2_0000_0008, 8),
            None,
            "wrapping clears the entries"
        );
        // An address whose page number is as large as it gets never hits a stale entry.
        assert_eq!(tlb.load(u64::MAX - 7, 8), None);
    }
}
