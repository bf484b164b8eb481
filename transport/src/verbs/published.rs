//! The published-page table: where a home lays out the newest version of each page it homes so
//! that a reader can fetch it with one RDMA READ and validate it without the home's CPU.
//!
//! The table is one page-aligned buffer, registered once in the transport's protection domain
//! (never per page, nor per peer). It is direct-mapped: `slot_of(page)` picks the one slot a page can be in, so two
//! pages that hash alike evict each other (a reader of the evicted one asks the home instead).
//! A slot is
//!
//! ```text
//! [seq: u64][page: u64][version ts: u64][4096 bytes][previous ts: u64][undo: 256 bytes]
//! [seq again: u64][crc32c: u32][flags: u32]
//! ```
//!
//! little-endian. The crc32c covers everything but itself. Flag `ABSENT`: the home holds no
//! version of the page (it reads as zeros, and the 4096 bytes are zeros). Flag `VACANT` (page
//! `VACANT_PAGE`, which no page number is): written once into every slot still untouched after
//! the home published its loaded pages, it says that no page of the slot has a version there;
//! the first publication of a page of the slot replaces it. Flag `PREVIOUS`: the slot also
//! describes the version before the newest, at `previous ts`: the newest bytes with the undo
//! runs (`[count: u16]` then `[offset: u16][len: u16][bytes]` each, the older version's bytes
//! where the two differ) put back, or zeros with flag `PREVIOUS_ABSENT` (the newest is the
//! page's first version). A reader whose snapshot lies between the two uses it. The home is the only writer and
//! writes a slot under the table's lock: it marks the slot busy (first `seq` odd), writes the
//! rest with the final `seq` (even) in the second place and the check word, then sets the first
//! `seq` to the final value. A READ may sample the bytes in any order while this happens, so a
//! reader accepts a slot only when both `seq`s are equal and even and the crc32c matches (see
//! [`judge`]); anything else is a torn read. `seq` 0 is never written, so an untouched (zeroed)
//! slot never validates: it is reported as empty rather than torn, so nobody READs it twice.
//!
//! What a valid slot may be used for (the snapshot rule) is the caller's: see
//! `docs/CLUSTER.md`, "One-sided page reads".

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};
use std::sync::Mutex;

use crate::crc32c;
use crate::PAGE_BYTES;

const OFF_SEQ: usize = 0;
const OFF_PAGE: usize = 8;
const OFF_TS: usize = 16;
const OFF_DATA: usize = 24;
const OFF_PREV_TS: usize = OFF_DATA + PAGE_BYTES;
const OFF_UNDO: usize = OFF_PREV_TS + 8;
/// Bytes of a slot's undo area: the difference to the previous version must fit.
pub const UNDO_BYTES: usize = 256;
const OFF_SEQ_END: usize = OFF_UNDO + UNDO_BYTES;
const OFF_CHECK: usize = OFF_SEQ_END + 8;
const OFF_FLAGS: usize = OFF_CHECK + 4;
/// Where a slot's page bytes lie in it: from the first offset up to the second.
pub const PAGE_PART: (usize, usize) = (OFF_DATA, OFF_PREV_TS);
/// Bytes of one slot (a multiple of 8).
pub const SLOT_BYTES: usize = OFF_FLAGS + 4;
const ABSENT: u32 = 1;
const VACANT: u32 = 2;
const PREVIOUS: u32 = 4;
const PREVIOUS_ABSENT: u32 = 8;
/// The page field of a vacant slot: above every page number (addresses have 64 bits, pages 52).
const VACANT_PAGE: u64 = u64::MAX;
/// Slots of a table unless configured otherwise (about 69 MiB).
pub const DEFAULT_SLOTS: usize = 16 * 1024;

/// The slot `page` is published in, of `slots`.
pub fn slot_of(page: u64, slots: usize) -> usize {
    // Pages of one chunk are neighbours; a multiplicative hash spreads them over the table.
    let hash = page.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 20;
    (hash % slots.max(1) as u64) as usize
}

/// Byte offset of slot `slot` in the table.
pub fn slot_offset(slot: usize) -> u64 {
    (slot * SLOT_BYTES) as u64
}

fn word(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(raw)
}

fn check_word(image: &[u8; SLOT_BYTES]) -> u32 {
    crc32c::update(crc32c::checksum(&image[..OFF_CHECK]), &image[OFF_FLAGS..])
}

/// The final image of a slot holding version `ts` of `page` (`None`: the home holds no version)
/// as write number `seq` (even, not 0).
pub fn encode_slot(
    seq: u64,
    page: u64,
    ts: u64,
    data: Option<&[u8; PAGE_BYTES]>,
) -> Box<[u8; SLOT_BYTES]> {
    encode_slot_with(seq, page, ts, data, &Previous::Unknown)
}

/// The version before the newest, as a slot may describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Previous {
    /// Not described (too different, or not asked for): readers below the newest ask.
    Unknown,
    /// The newest is the page's first version: below it the page reads as zeros.
    NoVersion,
    /// The version at `ts`: the newest bytes with these runs (offset, older bytes) put back.
    Undo { ts: u64, runs: Vec<(u16, Vec<u8>)> },
}

impl Previous {
    /// `older` (version `ts`) as undo runs against `newer`, or `Unknown` when they do not fit
    /// a slot's undo area.
    pub fn between(ts: u64, older: &[u8; PAGE_BYTES], newer: &[u8; PAGE_BYTES]) -> Previous {
        let mut runs: Vec<(u16, Vec<u8>)> = Vec::new();
        let mut used = 2;
        let mut at = 0;
        while at < PAGE_BYTES {
            if older[at] == newer[at] {
                at += 1;
                continue;
            }
            let start = at;
            while at < PAGE_BYTES && older[at] != newer[at] {
                at += 1;
            }
            used += 4 + (at - start);
            if used > UNDO_BYTES {
                return Previous::Unknown;
            }
            runs.push((start as u16, older[start..at].to_vec()));
        }
        Previous::Undo { ts, runs }
    }
}

/// [`encode_slot`] that also describes the version before the newest.
pub fn encode_slot_with(
    seq: u64,
    page: u64,
    ts: u64,
    data: Option<&[u8; PAGE_BYTES]>,
    previous: &Previous,
) -> Box<[u8; SLOT_BYTES]> {
    let mut flags = if data.is_some() { 0 } else { ABSENT };
    let mut undo = [0u8; UNDO_BYTES + 8];
    match previous {
        Previous::Unknown => {}
        Previous::NoVersion => flags |= PREVIOUS | PREVIOUS_ABSENT,
        Previous::Undo { ts: prev_ts, runs } => {
            let mut at = 10;
            let fits = runs.iter().all(|(offset, bytes)| {
                let end = at + 4 + bytes.len();
                let ok = end <= undo.len() && usize::from(*offset) + bytes.len() <= PAGE_BYTES;
                if ok {
                    undo[at..at + 2].copy_from_slice(&offset.to_le_bytes());
                    undo[at + 2..at + 4].copy_from_slice(&(bytes.len() as u16).to_le_bytes());
                    undo[at + 4..end].copy_from_slice(bytes);
                    at = end;
                }
                ok
            });
            if fits && *prev_ts < ts {
                flags |= PREVIOUS;
                undo[..8].copy_from_slice(&prev_ts.to_le_bytes());
                undo[8..10].copy_from_slice(&(runs.len() as u16).to_le_bytes());
            } else {
                undo = [0u8; UNDO_BYTES + 8];
            }
        }
    }
    encode_image(seq, page, ts, data, flags, &undo)
}

/// The final image of a vacant slot as write number `seq` (even, not 0).
pub fn encode_vacant(seq: u64) -> Box<[u8; SLOT_BYTES]> {
    encode_image(seq, VACANT_PAGE, 0, None, VACANT, &[0u8; UNDO_BYTES + 8])
}

/// The image with its check word. `previous` is the previous ts and the undo area.
fn encode_image(
    seq: u64,
    page: u64,
    ts: u64,
    data: Option<&[u8; PAGE_BYTES]>,
    flags: u32,
    previous: &[u8; UNDO_BYTES + 8],
) -> Box<[u8; SLOT_BYTES]> {
    let mut out = Box::new([0u8; SLOT_BYTES]);
    out[OFF_SEQ..OFF_SEQ + 8].copy_from_slice(&seq.to_le_bytes());
    out[OFF_PAGE..OFF_PAGE + 8].copy_from_slice(&page.to_le_bytes());
    out[OFF_TS..OFF_TS + 8].copy_from_slice(&ts.to_le_bytes());
    if let Some(data) = data {
        out[OFF_DATA..OFF_PREV_TS].copy_from_slice(data);
    }
    out[OFF_PREV_TS..OFF_SEQ_END].copy_from_slice(previous);
    out[OFF_SEQ_END..OFF_CHECK].copy_from_slice(&seq.to_le_bytes());
    out[OFF_FLAGS..].copy_from_slice(&flags.to_le_bytes());
    let check = check_word(&out);
    out[OFF_CHECK..OFF_FLAGS].copy_from_slice(&check.to_le_bytes());
    out
}

/// What a reader may do with the bytes one READ of a slot returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Judgement {
    /// A consistent slot holding the version of the page visible at the snapshot (given the
    /// snapshot rule): its timestamp and contents (`None`: the home holds no version; zeros).
    Accept {
        version_ts: u64,
        data: Option<Box<[u8; PAGE_BYTES]>>,
    },
    /// Nothing was ever published in the slot (both sequence words 0, which no write leaves):
    /// ask the home, no second READ.
    Empty,
    /// A consistent vacant slot: when the home wrote it, no page of the slot had a version
    /// there, and every later publication of one replaced it. Whether that makes the page
    /// zeros at the snapshot is the caller's (it must know the home held every version).
    Vacant,
    /// The sequence words differ or are odd, or the check word does not match: the READ saw a
    /// write in progress. Read again.
    Torn,
    /// A consistent slot of another page (a collision): ask the home.
    OtherPage,
    /// A consistent slot of this page whose newest version is newer than the snapshot and
    /// whose previous version is at or below it: that version (`data` as for `Accept`), which
    /// holds for snapshots below `newer_ts` only.
    AcceptPrevious {
        version_ts: u64,
        data: Option<Box<[u8; PAGE_BYTES]>>,
        newer_ts: u64,
    },
    /// A consistent slot of this page whose version is newer than the snapshot (and no
    /// previous version that serves it): ask the home.
    Newer,
}

/// Validates `bytes` (one READ of the slot of `page`) for a reader at `snapshot_ts`: as
/// [`judge_in_place`], with the page bytes in the slot image and the contents given back in a
/// box.
pub fn judge(bytes: &[u8; SLOT_BYTES], page: u64, snapshot_ts: u64) -> Judgement {
    let mut data = Box::new([0u8; PAGE_BYTES]);
    data.copy_from_slice(&bytes[OFF_DATA..OFF_PREV_TS]);
    let contents = |zeros: bool, data: Box<[u8; PAGE_BYTES]>| (!zeros).then_some(data);
    match judge_in_place(bytes, &mut data, page, snapshot_ts) {
        Verdict::Accept { version_ts, zeros } => Judgement::Accept {
            version_ts,
            data: contents(zeros, data),
        },
        Verdict::AcceptPrevious {
            version_ts,
            zeros,
            newer_ts,
        } => Judgement::AcceptPrevious {
            version_ts,
            data: contents(zeros, data),
            newer_ts,
        },
        Verdict::Empty => Judgement::Empty,
        Verdict::Vacant => Judgement::Vacant,
        Verdict::Torn => Judgement::Torn,
        Verdict::OtherPage => Judgement::OtherPage,
        Verdict::Newer => Judgement::Newer,
    }
}

/// [`Judgement`] for a READ whose page bytes landed apart from the rest of the slot (in a
/// pool page): the contents are left in that page, rebuilt there for a previous version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// As [`Judgement::Accept`]; `zeros`: the home holds no version (the page's bytes are
    /// meaningless), else the page holds the version.
    Accept {
        version_ts: u64,
        zeros: bool,
    },
    /// As [`Judgement::AcceptPrevious`]; the page holds that version unless `zeros`.
    AcceptPrevious {
        version_ts: u64,
        zeros: bool,
        newer_ts: u64,
    },
    Empty,
    Vacant,
    Torn,
    OtherPage,
    Newer,
}

/// Validates one READ of the slot of `page` for a reader at `snapshot_ts`: `edges` holds the
/// slot as read except its page bytes (that part of it is ignored), which are in `data`. The
/// check word covers both, so a page that landed torn is caught like a torn head. The slot
/// always holds the newest version its home had installed when it was written; accepting it
/// for `snapshot_ts` needs only `version_ts <= snapshot_ts` because every version at or below
/// a snapshot was published before the snapshot existed (the caller's argument, in the docs).
/// A previous version is rebuilt in `data` (its undo runs applied), so `data` holds what the
/// verdict says only when it accepts.
pub fn judge_in_place(
    edges: &[u8; SLOT_BYTES],
    data: &mut [u8; PAGE_BYTES],
    page: u64,
    snapshot_ts: u64,
) -> Verdict {
    let seq = word(edges, OFF_SEQ);
    let seq_end = word(edges, OFF_SEQ_END);
    if seq == 0 && seq_end == 0 {
        return Verdict::Empty;
    }
    if seq == 0 || seq % 2 != 0 || seq_end != seq {
        return Verdict::Torn;
    }
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&edges[OFF_CHECK..OFF_FLAGS]);
    let check = crc32c::update(
        crc32c::update(
            crc32c::update(crc32c::checksum(&edges[..OFF_DATA]), &data[..]),
            &edges[OFF_PREV_TS..OFF_CHECK],
        ),
        &edges[OFF_FLAGS..],
    );
    if check != u32::from_le_bytes(raw) {
        return Verdict::Torn;
    }
    raw.copy_from_slice(&edges[OFF_FLAGS..]);
    let flags = u32::from_le_bytes(raw);
    if flags & VACANT != 0 {
        return Verdict::Vacant;
    }
    if word(edges, OFF_PAGE) != page {
        return Verdict::OtherPage;
    }
    let version_ts = word(edges, OFF_TS);
    if version_ts > snapshot_ts {
        return previous(edges, data, flags, version_ts, snapshot_ts);
    }
    Verdict::Accept {
        version_ts,
        zeros: flags & ABSENT != 0,
    }
}

/// The previous version a validated slot describes, for a snapshot below its newest, rebuilt
/// in `data` (which holds the newest).
fn previous(
    edges: &[u8; SLOT_BYTES],
    data: &mut [u8; PAGE_BYTES],
    flags: u32,
    newer_ts: u64,
    snapshot_ts: u64,
) -> Verdict {
    if flags & PREVIOUS == 0 {
        return Verdict::Newer;
    }
    if flags & PREVIOUS_ABSENT != 0 {
        return Verdict::AcceptPrevious {
            version_ts: 0,
            zeros: true,
            newer_ts,
        };
    }
    let version_ts = word(edges, OFF_PREV_TS);
    if version_ts > snapshot_ts || version_ts >= newer_ts || flags & ABSENT != 0 {
        return Verdict::Newer;
    }
    let undo = &edges[OFF_UNDO..OFF_SEQ_END];
    let count = usize::from(u16::from_le_bytes([undo[0], undo[1]]));
    // Every run is checked before any is applied: a refused slot leaves `data` as it came.
    let mut runs = Vec::with_capacity(count);
    let mut at = 2;
    for _ in 0..count {
        let Some(head) = undo.get(at..at + 4) else {
            return Verdict::Newer;
        };
        let offset = usize::from(u16::from_le_bytes([head[0], head[1]]));
        let len = usize::from(u16::from_le_bytes([head[2], head[3]]));
        match undo.get(at + 4..at + 4 + len) {
            Some(run) if offset + len <= PAGE_BYTES => runs.push((offset, run)),
            _ => return Verdict::Newer,
        }
        at += 4 + len;
    }
    for (offset, run) in runs {
        data[offset..offset + run.len()].copy_from_slice(run);
    }
    Verdict::AcceptPrevious {
        version_ts,
        zeros: false,
        newer_ts,
    }
}

/// A home's table. Writes go through [`PublishedTable::publish`]; peers' NICs read it.
pub struct PublishedTable {
    buf: NonNull<u8>,
    layout: Layout,
    slots: usize,
    /// Serialises writers; a slot's write is then never interleaved with another.
    writer: Mutex<()>,
}

// SAFETY: the buffer is owned by the table; Rust code touches it only through raw-pointer
// copies made under `writer` (writes) or of whole words the writer alone changes; remote NICs
// only read it.
unsafe impl Send for PublishedTable {}
// SAFETY: as above: shared access never creates references into the buffer.
unsafe impl Sync for PublishedTable {}

impl PublishedTable {
    /// A zeroed table of `slots` slots (no slot valid).
    pub fn new(slots: usize) -> Option<PublishedTable> {
        let bytes = slots.checked_mul(SLOT_BYTES)?.max(4096);
        let layout = Layout::from_size_align(bytes, 4096).ok()?;
        // SAFETY: the layout has a non-zero size.
        let buf = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some(PublishedTable {
            buf,
            layout,
            slots: slots.max(1),
            writer: Mutex::new(()),
        })
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Start and length of the buffer, for registering it.
    pub fn raw(&self) -> (*mut u8, usize) {
        (self.buf.as_ptr(), self.layout.size())
    }

    /// Writes version `ts` of `page` into its slot, under the table's lock. `contents` is
    /// called under that lock, so a caller that reads the newest version there publishes the
    /// newest one even when several threads publish the same page: the last writer read last.
    /// It returns the version's timestamp and bytes (`None`: the home holds no version), or
    /// `None` to leave the slot as it is.
    pub fn publish_with(
        &self,
        page: u64,
        contents: impl FnOnce() -> Option<(u64, Option<Box<[u8; PAGE_BYTES]>>)>,
    ) {
        let _guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let Some((ts, data)) = contents() else {
            return;
        };
        self.write_slot(page, ts, data.as_deref(), &Previous::Unknown);
    }

    /// [`PublishedTable::publish_with`] whose `contents` also describes the version before
    /// the newest (read under the same lock, so it is the one below the newest in that store).
    pub fn publish_with_previous(
        &self,
        page: u64,
        contents: impl FnOnce() -> Option<(u64, Option<Box<[u8; PAGE_BYTES]>>, Previous)>,
    ) {
        let _guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let Some((ts, data, previous)) = contents() else {
            return;
        };
        self.write_slot(page, ts, data.as_deref(), &previous);
    }

    /// Writes one slot's image; the caller holds `writer`.
    fn write_slot(&self, page: u64, ts: u64, data: Option<&[u8; PAGE_BYTES]>, previous: &Previous) {
        let slot = slot_of(page, self.slots);
        // SAFETY: `slot < slots`, so the slot lies inside the buffer; the buffer's pointer is
        // 4096-aligned and SLOT_BYTES a multiple of 8, so the word is aligned; only writers
        // (serialised by `writer`, which the caller holds) change it.
        let at = unsafe { self.buf.as_ptr().add(slot * SLOT_BYTES) };
        // SAFETY: as above.
        let old = unsafe { std::ptr::read_volatile(at.cast::<u64>()) };
        let seq = (old | 1) + 1;
        let image = encode_slot_with(seq, page, ts, data, previous);
        // SAFETY: the slot lies in the buffer (above); the image is a distinct allocation.
        unsafe {
            std::ptr::write_volatile(at.cast::<u64>(), old | 1);
            fence(Ordering::SeqCst);
            std::ptr::copy_nonoverlapping(image.as_ptr().add(8), at.add(8), SLOT_BYTES - 8);
            fence(Ordering::SeqCst);
            std::ptr::write_volatile(at.cast::<u64>(), seq);
        }
    }

    /// Marks every slot nothing was published in yet as vacant (`Judgement::Vacant`), under
    /// the table's lock. Called once, after the home published the pages it loaded and
    /// before it installs anything else: from then on every slot holds a page or the word
    /// that none of its pages has a version, and only an empty slot is unknown.
    pub fn fill_vacant(&self) {
        let _guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let image = encode_vacant(2);
        for slot in 0..self.slots {
            // SAFETY: `slot < slots`: inside the buffer, its first word aligned (see
            // `publish_with`); only writers, serialised by `writer`, change it.
            let at = unsafe { self.buf.as_ptr().add(slot * SLOT_BYTES) };
            // SAFETY: as above.
            if unsafe { std::ptr::read_volatile(at.cast::<u64>()) } != 0 {
                continue;
            }
            // SAFETY: as above. An untouched slot is all zeros (the buffer starts zeroed and
            // nothing wrote it), as is the vacant image's body: only its header and trailer
            // are written, busy mark first and final `seq` last, as in `publish_with`.
            unsafe {
                std::ptr::write_volatile(at.cast::<u64>(), 1);
                fence(Ordering::SeqCst);
                std::ptr::copy_nonoverlapping(image.as_ptr().add(8), at.add(8), OFF_DATA - 8);
                std::ptr::copy_nonoverlapping(
                    image.as_ptr().add(OFF_SEQ_END),
                    at.add(OFF_SEQ_END),
                    SLOT_BYTES - OFF_SEQ_END,
                );
                fence(Ordering::SeqCst);
                std::ptr::write_volatile(at.cast::<u64>(), 2);
            }
        }
    }

    /// A copy of slot `slot` (tests and local checks).
    pub fn copy_slot(&self, slot: usize) -> Option<Box<[u8; SLOT_BYTES]>> {
        if slot >= self.slots {
            return None;
        }
        let mut out = Box::new([0u8; SLOT_BYTES]);
        let _guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the slot lies in the buffer; `out` is distinct.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.buf.as_ptr().add(slot * SLOT_BYTES),
                out.as_mut_ptr(),
                SLOT_BYTES,
            )
        };
        Some(out)
    }
}

impl Drop for PublishedTable {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; every memory region registered over it
        // holds an `Arc` of the table, so none is registered any more.
        unsafe { std::alloc::dealloc(self.buf.as_ptr(), self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_of(fill: u8) -> Box<[u8; PAGE_BYTES]> {
        Box::new([fill; PAGE_BYTES])
    }

    #[test]
    fn a_written_slot_validates_and_holds_its_version() {
        let image = encode_slot(2, 77, 5, Some(&page_of(9)));
        assert_eq!(
            judge(&image, 77, 5),
            Judgement::Accept {
                version_ts: 5,
                data: Some(page_of(9))
            }
        );
        assert!(matches!(judge(&image, 77, 100), Judgement::Accept { .. }));
        assert_eq!(judge(&image, 77, 4), Judgement::Newer);
        assert_eq!(judge(&image, 78, 5), Judgement::OtherPage);
    }

    #[test]
    fn a_page_the_home_holds_no_version_of_reads_as_absent() {
        let image = encode_slot(2, 40, 0, None);
        assert_eq!(
            judge(&image, 40, 0),
            Judgement::Accept {
                version_ts: 0,
                data: None
            }
        );
        // The flag is covered by the check word: a present page never turns absent.
        let mut flipped = encode_slot(2, 40, 0, Some(&page_of(0)));
        flipped[OFF_FLAGS] = 1;
        assert_eq!(judge(&flipped, 40, 0), Judgement::Torn);
    }

    #[test]
    fn an_untouched_slot_never_validates() {
        assert_eq!(judge(&Box::new([0u8; SLOT_BYTES]), 0, 0), Judgement::Empty);
        // The first write to a slot, caught half way: torn, not empty.
        let first = encode_slot(2, 5, 1, Some(&page_of(3)));
        let mut half = Box::new([0u8; SLOT_BYTES]);
        half[OFF_DATA..].copy_from_slice(&first[OFF_DATA..]);
        assert_eq!(judge(&half, 5, 1), Judgement::Torn);
    }

    #[test]
    fn vacant_slots_are_filled_once_and_give_way_to_the_first_publication() {
        let table = PublishedTable::new(64).expect("table");
        let loaded = 1234;
        table.publish_with(loaded, || Some((0, Some(page_of(7)))));
        table.fill_vacant();
        let loaded_slot = slot_of(loaded, 64);
        let image = table.copy_slot(loaded_slot).expect("slot");
        // The loaded page's slot keeps it; every other slot is vacant, for any page.
        assert!(matches!(judge(&image, loaded, 0), Judgement::Accept { .. }));
        let other = (0..)
            .find(|p| slot_of(*p, 64) != loaded_slot)
            .expect("page");
        let vacant = table.copy_slot(slot_of(other, 64)).expect("slot");
        assert_eq!(judge(&vacant, other, 0), Judgement::Vacant);
        assert_eq!(judge(&vacant, other + 7, 9), Judgement::Vacant);
        assert_eq!(vacant, encode_vacant(2));
        // The first version of a page of a vacant slot replaces the mark.
        table.publish_with(other, || Some((5, Some(page_of(1)))));
        let now = table.copy_slot(slot_of(other, 64)).expect("slot");
        assert_eq!(judge(&now, other, 4), Judgement::Newer);
        assert!(matches!(judge(&now, other, 5), Judgement::Accept { .. }));
        // A second fill leaves written slots alone.
        table.fill_vacant();
        assert_eq!(table.copy_slot(slot_of(other, 64)).expect("slot"), now);
        // The mark is covered by the check word: a vacant slot never turns into a page, nor
        // a page's slot into a vacant one.
        let mut flipped = encode_vacant(2);
        flipped[OFF_FLAGS] = 0;
        assert_eq!(judge(&flipped, VACANT_PAGE, 0), Judgement::Torn);
        let mut flipped = encode_slot(2, 40, 0, Some(&page_of(0)));
        flipped[OFF_FLAGS] = VACANT as u8;
        assert_eq!(judge(&flipped, 40, 0), Judgement::Torn);
    }

    #[test]
    fn a_slot_describes_the_version_before_its_newest_for_older_snapshots() {
        let older = page_of(1);
        let mut newer = page_of(1);
        newer[100..108].copy_from_slice(&[9; 8]);
        newer[4095] = 7;
        let previous = Previous::between(3, &older, &newer);
        assert!(matches!(&previous, Previous::Undo { ts: 3, runs } if runs.len() == 2));
        let table = PublishedTable::new(8).expect("table");
        table.publish_with_previous(77, || Some((8, Some(newer.clone()), previous.clone())));
        let image = table.copy_slot(slot_of(77, 8)).expect("slot");
        assert_eq!(
            judge(&image, 77, 8),
            Judgement::Accept {
                version_ts: 8,
                data: Some(newer.clone())
            }
        );
        for snapshot in [3, 5, 7] {
            assert_eq!(
                judge(&image, 77, snapshot),
                Judgement::AcceptPrevious {
                    version_ts: 3,
                    data: Some(older.clone()),
                    newer_ts: 8
                }
            );
        }
        assert_eq!(judge(&image, 77, 2), Judgement::Newer);
        // The newest is the first version: below it, zeros.
        let first = encode_slot_with(2, 77, 8, Some(&newer), &Previous::NoVersion);
        assert_eq!(
            judge(&first, 77, 2),
            Judgement::AcceptPrevious {
                version_ts: 0,
                data: None,
                newer_ts: 8
            }
        );
        // Too different to fit, not described, or not below the newest: ask the home.
        assert_eq!(
            Previous::between(3, &page_of(1), &page_of(2)),
            Previous::Unknown
        );
        let unknown = encode_slot_with(2, 77, 8, Some(&newer), &Previous::Unknown);
        assert_eq!(judge(&unknown, 77, 5), Judgement::Newer);
        let not_below = Previous::Undo {
            ts: 8,
            runs: Vec::new(),
        };
        let odd = encode_slot_with(2, 77, 8, Some(&newer), &not_below);
        assert_eq!(judge(&odd, 77, 5), Judgement::Newer);
        // The undo runs are covered by the check word.
        let mut flipped = encode_slot_with(2, 77, 8, Some(&newer), &previous);
        flipped[OFF_UNDO + 7] ^= 1;
        assert_eq!(judge(&flipped, 77, 5), Judgement::Torn);
    }

    #[test]
    fn a_page_that_landed_apart_from_its_slot_is_judged_and_rebuilt_in_place() {
        let older = page_of(1);
        let mut newer = page_of(1);
        newer[200..204].copy_from_slice(&[5; 4]);
        let previous = Previous::between(3, &older, &newer);
        let image = encode_slot_with(2, 77, 8, Some(&newer), &previous);
        // The edges as a scattered READ leaves them: the page part of the image is whatever
        // the target held; only the landed page counts.
        let mut edges = image.clone();
        edges[OFF_DATA..OFF_PREV_TS].fill(0xee);
        let landed = |bytes: &[u8]| {
            let mut page = Box::new([0u8; PAGE_BYTES]);
            page.copy_from_slice(bytes);
            page
        };
        let mut page = landed(&image[OFF_DATA..OFF_PREV_TS]);
        assert_eq!(
            judge_in_place(&edges, &mut page, 77, 9),
            Verdict::Accept {
                version_ts: 8,
                zeros: false
            }
        );
        assert_eq!(page, newer);
        assert_eq!(
            judge_in_place(&edges, &mut page, 77, 4),
            Verdict::AcceptPrevious {
                version_ts: 3,
                zeros: false,
                newer_ts: 8
            }
        );
        assert_eq!(
            page, older,
            "the previous version is rebuilt in the landed page"
        );
        // A byte of the landed page from another write: torn, as if the image were.
        let mut page = landed(&image[OFF_DATA..OFF_PREV_TS]);
        page[4000] ^= 0x10;
        assert_eq!(judge_in_place(&edges, &mut page, 77, 9), Verdict::Torn);
        // A refused previous version leaves the page as it landed.
        let mut page = landed(&image[OFF_DATA..OFF_PREV_TS]);
        assert_eq!(judge_in_place(&edges, &mut page, 77, 2), Verdict::Newer);
        assert_eq!(page, newer);
    }

    #[test]
    fn any_mix_of_two_writes_or_a_flipped_byte_is_torn() {
        let old = encode_slot(2, 77, 5, Some(&page_of(1)));
        let new = encode_slot(4, 77, 6, Some(&page_of(2)));
        // A READ that sampled part of the slot before a write and the rest after it.
        for cut in (0..SLOT_BYTES).step_by(8).skip(1) {
            let mut mixed = old.clone();
            mixed[cut..].copy_from_slice(&new[cut..]);
            assert_eq!(judge(&mixed, 77, 10), Judgement::Torn, "cut at {cut}");
            let mut mixed = new.clone();
            mixed[cut..].copy_from_slice(&old[cut..]);
            assert_eq!(judge(&mixed, 77, 10), Judgement::Torn, "cut at {cut}");
        }
        // The writer's busy mark: odd first word, everything else already final.
        let mut busy = new.clone();
        busy[0..8].copy_from_slice(&3u64.to_le_bytes());
        assert_eq!(judge(&busy, 77, 10), Judgement::Torn);
        for at in [0, 9, 17, 100, OFF_SEQ_END + 1, OFF_CHECK, OFF_FLAGS] {
            let mut flipped = new.clone();
            flipped[at] ^= 0x10;
            assert_eq!(judge(&flipped, 77, 10), Judgement::Torn, "byte {at}");
        }
    }

    #[test]
    fn the_table_publishes_into_the_page_slot_with_growing_even_sequence_numbers() {
        let table = PublishedTable::new(64).expect("table");
        let slot = slot_of(1234, 64);
        table.publish_with(1234, || Some((3, Some(page_of(7)))));
        let first = table.copy_slot(slot).expect("slot");
        assert_eq!(
            judge(&first, 1234, 3),
            Judgement::Accept {
                version_ts: 3,
                data: Some(page_of(7))
            }
        );
        table.publish_with(1234, || Some((8, Some(page_of(8)))));
        let second = table.copy_slot(slot).expect("slot");
        assert!(word(&second[..], 0) > word(&first[..], 0));
        assert_eq!(word(&second[..], 0) % 2, 0);
        assert_eq!(judge(&second, 1234, 7), Judgement::Newer);
        // Nothing to publish leaves the slot as it was.
        table.publish_with(1234, || None);
        assert_eq!(table.copy_slot(slot), Some(second));
        assert_eq!(table.copy_slot(64), None);
    }

    #[test]
    fn slots_spread_a_chunk_of_pages() {
        let slots = 1024;
        let used: std::collections::HashSet<usize> =
            (0..512u64).map(|p| slot_of((7 << 9) + p, slots)).collect();
        assert!(used.len() > 300, "{} distinct slots", used.len());
        assert!(used.iter().all(|s| *s < slots));
    }
}
