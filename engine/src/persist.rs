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
use std::path::{Path, PathBuf};

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

/// Why the store's directory or file cannot be used. Paths and OS reasons as text, so the
/// error is plain data a node can report to another.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PersistError {
    #[error("cannot use {dir} for the persistent store: {reason}")]
    Unusable { dir: PathBuf, reason: String },
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path} is damaged at byte offset {offset}: {what}")]
    Damaged {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    #[error("cannot save {path}: {reason}")]
    Save { path: PathBuf, reason: String },
}

/// Name of the probe file `check_dir` writes and removes.
const PROBE_NAME: &str = "persistent.dvm.probe";

/// Makes sure `dir` can hold the store, before the program runs rather than when its results
/// are to be saved: creates it if needed, then writes, syncs and removes a probe file there
/// (the same steps `save` takes). The error names the directory and the OS reason.
pub fn check_dir(dir: &Path) -> Result<(), PersistError> {
    let unusable = |what: &str, err: std::io::Error| PersistError::Unusable {
        dir: dir.to_path_buf(),
        reason: format!("{what}: {err}"),
    };
    std::fs::create_dir_all(dir).map_err(|err| unusable("cannot create it", err))?;
    let probe = dir.join(PROBE_NAME);
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&probe)?;
        file.write_all(MAGIC)?;
        file.sync_all()
    };
    // Removed even when the write failed half-way; that error is the one reported.
    let written = write();
    let removed = std::fs::remove_file(&probe);
    written.map_err(|err| unusable("cannot write a file in it", err))?;
    removed.map_err(|err| unusable("cannot remove a file from it", err))
}

/// Reads the store in `dir`; an absent store is an empty one.
pub fn load(dir: &Path) -> Result<StoredPages, PersistError> {
    let path = dir.join(FILE_NAME);
    match std::fs::read(&path) {
        Ok(bytes) => parse(&path, &bytes),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(err) => Err(PersistError::Read {
            path,
            reason: err.to_string(),
        }),
    }
}

/// Validates and decodes a store's bytes (`path` names it in errors). Untrusted input: every
/// structural fault — bad magic, a checksum, page count or length that does not match, a page
/// outside the persistent range, the same page twice — is an error naming the offset, never
/// a panic.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<StoredPages, PersistError> {
    let bad = |offset: usize, what: String| PersistError::Damaged {
        path: path.to_path_buf(),
        offset: offset as u64,
        what,
    };
    if bytes.len() < 8 + 8 + 8 || &bytes[..8] != MAGIC {
        return Err(bad(
            0,
            "not a DVM persistent store (bad magic or too short)".into(),
        ));
    }
    let body_len = bytes.len() - 8;
    let word = |at: usize| -> Option<u64> {
        let raw: [u8; 8] = bytes.get(at..at.checked_add(8)?)?.try_into().ok()?;
        Some(u64::from_le_bytes(raw))
    };
    let stored_sum = word(body_len).ok_or_else(|| bad(body_len, "no checksum".into()))?;
    if fnv1a(&bytes[..body_len]) != stored_sum {
        return Err(bad(body_len, "checksum mismatch".into()));
    }
    let count = word(8).ok_or_else(|| bad(8, "no page count".into()))?;
    let expected = count
        .checked_mul(RECORD_BYTES as u64)
        .and_then(|records| records.checked_add(16));
    if expected != Some(body_len as u64) {
        return Err(bad(
            8,
            format!(
                "page count {count} does not match the file size ({} bytes of records, {} each)",
                body_len.saturating_sub(16),
                RECORD_BYTES
            ),
        ));
    }
    // `count` records fit in the file, so the count and every offset below fit in a usize.
    let count = body_len.saturating_sub(16) / RECORD_BYTES;
    let mut pages = Vec::with_capacity(count);
    let mut first_seen = std::collections::HashMap::with_capacity(count);
    let range = key_range();
    for index in 0..count {
        let at = 16 + index * RECORD_BYTES;
        let key = word(at).ok_or_else(|| bad(at, "short record".into()))?;
        if !range.contains(&key) {
            return Err(bad(
                at,
                format!(
                    "page {:#x} is outside the persistent range",
                    key.wrapping_shl(PAGE_SHIFT)
                ),
            ));
        }
        // A page stored twice has no one committed state: which copy won is unknowable.
        if let Some(earlier) = first_seen.insert(key, at) {
            return Err(bad(
                at,
                format!(
                    "page {:#x} is stored twice (first at byte offset {earlier})",
                    key << PAGE_SHIFT
                ),
            ));
        }
        let contents = bytes
            .get(at + 8..at + RECORD_BYTES)
            .ok_or_else(|| bad(at, "short record".into()))?;
        let mut page = Box::new([0u8; PAGE_BYTES]);
        page.copy_from_slice(contents);
        pages.push((key, page));
    }
    Ok(pages)
}

/// Writes the newest committed persistent pages to `dir`, atomically.
pub fn save(dir: &Path, store: &PageStore) -> Result<(), PersistError> {
    std::fs::create_dir_all(dir).map_err(|err| PersistError::Unusable {
        dir: dir.to_path_buf(),
        reason: format!("cannot create it: {err}"),
    })?;
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
    write().map_err(|err| PersistError::Save {
        path: final_path.clone(),
        reason: err.to_string(),
    })
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
        let err = load(&dir).expect_err("flipped bit").to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
        std::fs::write(dir.join(FILE_NAME), b"garbage").expect("write");
        assert!(load(&dir)
            .expect_err("garbage")
            .to_string()
            .contains("byte offset 0"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A store's bytes from records `(page number, fill byte)`, with a correct checksum.
    fn store_bytes(count: u64, records: &[(u64, u8)]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(MAGIC);
        body.extend_from_slice(&count.to_le_bytes());
        for (key, fill) in records {
            body.extend_from_slice(&key.to_le_bytes());
            body.extend_from_slice(&[*fill; PAGE_BYTES]);
        }
        let sum = fnv1a(&body);
        body.extend_from_slice(&sum.to_le_bytes());
        body
    }

    #[test]
    fn structurally_damaged_stores_are_refused_without_panicking() {
        let path = Path::new("dir/persistent.dvm");
        let first = abi::PERSIST_BASE >> PAGE_SHIFT;
        let damaged = |bytes: &[u8]| match parse(path, bytes) {
            Err(PersistError::Damaged { offset, what, .. }) => (offset, what),
            other => panic!("not refused as damaged: {other:?}"),
        };
        assert_eq!(
            parse(path, &store_bytes(2, &[(first, 1), (first + 1, 2)]))
                .expect("valid")
                .len(),
            2
        );
        // The same page twice: refused at the second record, naming the page.
        let (offset, what) = damaged(&store_bytes(3, &[(first, 1), (first + 5, 2), (first, 3)]));
        assert_eq!(offset, (16 + 2 * RECORD_BYTES) as u64);
        assert!(
            what.contains(&format!("page {:#x} is stored twice", abi::PERSIST_BASE))
                && what.contains("first at byte offset 16"),
            "{what}"
        );
        let err = parse(path, &store_bytes(2, &[(first, 1), (first, 1)])).expect_err("duplicate");
        assert!(
            err.to_string().starts_with("dir/persistent.dvm is damaged"),
            "{err}"
        );
        // Counts that do not match the records (also ones whose byte count overflows).
        for count in [0, 1, 3, u64::MAX, u64::MAX / RECORD_BYTES as u64 + 1] {
            let (offset, what) = damaged(&store_bytes(count, &[(first, 1), (first + 1, 2)]));
            assert_eq!(offset, 8);
            assert!(what.contains("does not match the file size"), "{what}");
        }
        // A truncated record (the checksum recomputed, so only the length is wrong).
        let mut short = store_bytes(1, &[(first, 1)]);
        short.truncate(short.len() - 8 - 100);
        let sum = fnv1a(&short);
        short.extend_from_slice(&sum.to_le_bytes());
        assert_eq!(damaged(&short).0, 8);
        // Pages outside the persistent range.
        for key in [first - 1, abi::PERSIST_END >> PAGE_SHIFT, u64::MAX] {
            let (offset, what) = damaged(&store_bytes(1, &[(key, 1)]));
            assert_eq!(offset, 16);
            assert!(what.contains("outside the persistent range"), "{what}");
        }
        // Every prefix of a valid store is refused, none panics.
        let valid = store_bytes(2, &[(first, 1), (first + 1, 2)]);
        for len in 0..valid.len() {
            assert!(parse(path, &valid[..len]).is_err(), "prefix of {len} bytes");
        }
    }

    #[test]
    fn the_directory_is_checked_by_creating_writing_and_removing_a_probe() {
        let base = std::env::temp_dir().join(format!("dvm-persist-dir-{}", std::process::id()));
        let dir = base.join("new").join("store");
        check_dir(&dir).expect("a creatable directory");
        assert!(dir.is_dir(), "created");
        assert!(!dir.join(PROBE_NAME).exists(), "the probe is removed");
        // A directory that cannot be created (a file is in the way): named, with the OS reason.
        let file = base.join("file");
        std::fs::write(&file, b"x").expect("write");
        let err = check_dir(&file.join("store")).expect_err("under a file");
        let text = err.to_string();
        assert!(
            text.contains(&file.join("store").display().to_string())
                && text.contains("cannot create it")
                && text.contains("os error"),
            "{text}"
        );
        // A directory where no file can be made.
        let err = check_dir(Path::new("/proc/self")).expect_err("/proc/self");
        assert!(
            err.to_string().contains("cannot write a file in it"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&base);
    }
}
