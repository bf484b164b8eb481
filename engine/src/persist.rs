//! The persistent range on disk (`dvm run --persist DIR`).
//!
//! File `DIR/persistent.dvm`: the magic `DVMPERS1`, a u64 page count, then per page its
//! canonical page number (u64) and 4096 bytes, then an FNV-1a 64 checksum of everything before
//! it. All-zero pages are not stored (memory reads as zero anyway).
//!
//! Always a committed state: the run's newest committed pages are written to
//! `persistent.dvm.new`, synced, renamed over `persistent.dvm`, and the directory is synced, so
//! a crash at any point leaves either the old store or the new one, never a torn one. A store
//! that fails validation is refused with the file and the offset — never half-loaded.

use crate::abi;
use crate::page::{PAGE_BYTES, PAGE_SHIFT};
use crate::store::{PageKey, PageStore};
use std::io::Write;
use std::path::Path;

const MAGIC: &[u8; 8] = b"DVMPERS1";
const FILE_NAME: &str = "persistent.dvm";
const RECORD_BYTES: usize = 8 + PAGE_BYTES;

/// Pages of the persistent range, for `PageKey` comparisons.
fn key_range() -> std::ops::Range<PageKey> {
    (abi::PERSIST_BASE >> PAGE_SHIFT)..(abi::PERSIST_END >> PAGE_SHIFT)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Pages read from a store: canonical page number and contents.
pub type StoredPages = Vec<(PageKey, Box<[u8; PAGE_BYTES]>)>;

/// Reads the store in `dir`; an absent store is an empty one.
pub fn load(dir: &Path) -> Result<StoredPages, String> {
    let path = dir.join(FILE_NAME);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(format!("cannot read {}: {err}", path.display())),
    };
    let bad = |offset: usize, what: &str| {
        format!(
            "{} is damaged at byte offset {offset}: {what}",
            path.display()
        )
    };
    if bytes.len() < 8 + 8 + 8 || &bytes[..8] != MAGIC {
        return Err(bad(
            0,
            "not a DVM persistent store (bad magic or too short)",
        ));
    }
    let body_len = bytes.len() - 8;
    let stored_sum = u64::from_le_bytes(
        bytes[body_len..]
            .try_into()
            .map_err(|_| bad(body_len, "no checksum"))?,
    );
    if fnv1a(&bytes[..body_len]) != stored_sum {
        return Err(bad(body_len, "checksum mismatch"));
    }
    let count = u64::from_le_bytes(
        bytes[8..16]
            .try_into()
            .map_err(|_| bad(8, "no page count"))?,
    );
    let expected = 16u64.checked_add(
        count
            .checked_mul(RECORD_BYTES as u64)
            .ok_or_else(|| bad(8, "page count overflows"))?,
    );
    if expected != Some(body_len as u64) {
        return Err(bad(
            8,
            &format!("page count {count} does not match the file size"),
        ));
    }
    let mut pages = Vec::with_capacity(count as usize);
    let range = key_range();
    for index in 0..count as usize {
        let at = 16 + index * RECORD_BYTES;
        let key = u64::from_le_bytes(
            bytes[at..at + 8]
                .try_into()
                .map_err(|_| bad(at, "short record"))?,
        );
        if !range.contains(&key) {
            return Err(bad(
                at,
                &format!(
                    "page {:#x} is outside the persistent range",
                    key << PAGE_SHIFT
                ),
            ));
        }
        let mut page = Box::new([0u8; PAGE_BYTES]);
        page.copy_from_slice(&bytes[at + 8..at + RECORD_BYTES]);
        pages.push((key, page));
    }
    Ok(pages)
}

/// Writes the newest committed persistent pages to `dir`, atomically.
pub fn save(dir: &Path, store: &PageStore) -> Result<(), String> {
    std::fs::create_dir_all(dir)
        .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    let pages: Vec<_> = store
        .newest_pages_in(key_range())
        .into_iter()
        .filter(|(_, page)| page.iter().any(|byte| *byte != 0))
        .collect();
    let mut body = Vec::with_capacity(16 + pages.len() * RECORD_BYTES);
    body.extend_from_slice(MAGIC);
    body.extend_from_slice(&(pages.len() as u64).to_le_bytes());
    for (key, page) in &pages {
        body.extend_from_slice(&key.to_le_bytes());
        body.extend_from_slice(&page[..]);
    }
    let sum = fnv1a(&body);
    body.extend_from_slice(&sum.to_le_bytes());
    let final_path = dir.join(FILE_NAME);
    let new_path = dir.join(format!("{FILE_NAME}.new"));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&new_path)?;
        file.write_all(&body)?;
        file.sync_all()?;
        std::fs::rename(&new_path, &final_path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|err| format!("cannot save {}: {err}", final_path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damaged_stores_are_refused_with_offsets() {
        let dir = std::env::temp_dir().join(format!("dvm-persist-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        assert_eq!(load(&dir).expect("absent store").len(), 0);
        let mut body = Vec::new();
        body.extend_from_slice(MAGIC);
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&(abi::PERSIST_BASE >> PAGE_SHIFT).to_le_bytes());
        body.extend_from_slice(&[7u8; PAGE_BYTES]);
        let sum = fnv1a(&body);
        body.extend_from_slice(&sum.to_le_bytes());
        std::fs::write(dir.join(FILE_NAME), &body).expect("write");
        let pages = load(&dir).expect("valid store");
        assert_eq!(pages.len(), 1);
        assert_eq!(pages[0].1[100], 7);
        body[30] ^= 1;
        std::fs::write(dir.join(FILE_NAME), &body).expect("write");
        let err = load(&dir).expect_err("flipped bit");
        assert!(err.contains("checksum mismatch"), "{err}");
        std::fs::write(dir.join(FILE_NAME), b"garbage").expect("write");
        assert!(load(&dir).expect_err("garbage").contains("byte offset 0"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
