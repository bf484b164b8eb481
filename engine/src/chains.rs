//! `ChainMap`: the page store's map from page number to a page's chain, in two levels.
//!
//! Pages are grouped in blocks of `BLOCK_PAGES` (see `block_of`). A hash map holds one small entry
//! per block (a presence bitmap and the block's chains in place order, in one vector); a chain
//! is found by a lookup in that map, a bit test and a population count. Why two levels: the
//! store of a run with many runners holds hundreds of thousands of chains (an exit record per
//! runner, every page it wrote), and runner ids, stacks and allocations are handed out in
//! address order, so a run touches its pages mostly block by block. A one-level map of 128-byte
//! entries was a cache miss (often a TLB miss) per lookup, a longer probe for every absent
//! page as the table filled, and at each doubling a move of every entry into fresh memory that
//! the kernel had to fault in. Here the block map stays small enough to stay in cache (one
//! 40-byte entry per 64 pages), a block's chains are neighbours in memory, and growing a block
//! moves at most 64 chains.
//!
//! Invariants: a block's `chains.len()` is the number of bits set in `present`, and its chains
//! are in place order (bit `i` set means the page `key_of(block, i)` has the chain at the index
//! of the bits below `i`); a block in the map has at least one chain; chains are never
//! removed (a page's chain, once made, lives as long as the store).

use std::collections::HashMap;

/// Pages per block: the bits of the presence word.
const BLOCK_PAGES: u64 = 64;

/// A block is 8 runs of 8 neighbouring pages, the runs 64 pages apart: page number bits 0-2
/// and 6-8 are the place in the block, the others the block. Why not 64 neighbours: runtime
/// stacks are 64 pages (256 KiB) each, and most runners only ever touch the first page of
/// theirs, so with 64 neighbours every stack was a block of one chain (tens of thousands of
/// them in a run of many runners: a block map too big for the cache). Here 8 stacks share a
/// block, and a dense region still fills whole blocks, 8 pages side by side.
const RUN_BITS: u32 = 3;
const STRIDE_SHIFT: u32 = 6;

/// The block of page `key`.
pub fn block_of(key: u64) -> u64 {
    let run = (key >> RUN_BITS) & ((1 << (STRIDE_SHIFT - RUN_BITS)) - 1);
    let high = key >> (STRIDE_SHIFT + RUN_BITS);
    (high << (STRIDE_SHIFT - RUN_BITS)) | run
}

/// The place of page `key` in its block.
fn slot_of(key: u64) -> u64 {
    let low = key & ((1 << RUN_BITS) - 1);
    let stride = (key >> STRIDE_SHIFT) & ((1 << RUN_BITS) - 1);
    low | (stride << RUN_BITS)
}

/// The page at `slot` of `block` (the inverse of `block_of` and `slot_of`).
fn key_of(block: u64, slot: u64) -> u64 {
    let run = block & ((1 << (STRIDE_SHIFT - RUN_BITS)) - 1);
    let high = block >> (STRIDE_SHIFT - RUN_BITS);
    let low = slot & ((1 << RUN_BITS) - 1);
    let stride = slot >> RUN_BITS;
    (high << (STRIDE_SHIFT + RUN_BITS)) | (stride << STRIDE_SHIFT) | (run << RUN_BITS) | low
}

/// A block's chains, in place order.
#[derive(Debug)]
struct Block<C> {
    /// Bit `i`: page `i` of the block has a chain.
    present: u64,
    chains: Vec<C>,
}

/// Chains of one shard of the store, by page number.
#[derive(Debug)]
pub struct ChainMap<C> {
    blocks: HashMap<u64, Block<C>, BlockHash>,
}

impl<C> Default for ChainMap<C> {
    fn default() -> Self {
        ChainMap {
            blocks: HashMap::default(),
        }
    }
}

/// The bit of `key` in its block's presence word, and the block's number.
fn place(key: u64) -> (u64, u64) {
    let slot = slot_of(key);
    debug_assert!(slot < BLOCK_PAGES);
    (block_of(key), 1u64 << slot)
}

/// Index in a block's `chains` of the page whose bit is `bit`.
fn index_of(present: u64, bit: u64) -> usize {
    (present & (bit - 1)).count_ones() as usize
}

impl<C: Default> ChainMap<C> {
    pub fn get(&self, key: u64) -> Option<&C> {
        let (block, bit) = place(key);
        let block = self.blocks.get(&block)?;
        if block.present & bit == 0 {
            return None;
        }
        block.chains.get(index_of(block.present, bit))
    }

    pub fn get_mut(&mut self, key: u64) -> Option<&mut C> {
        let (block, bit) = place(key);
        let block = self.blocks.get_mut(&block)?;
        if block.present & bit == 0 {
            return None;
        }
        block.chains.get_mut(index_of(block.present, bit))
    }

    /// `key`'s chain, made empty (`C::default()`) if it has none.
    pub fn get_or_default(&mut self, key: u64) -> &mut C {
        let (block, bit) = place(key);
        let block = self.blocks.entry(block).or_insert_with(|| Block {
            present: 0,
            // Many blocks hold only a few chains (8 stacks share a block, and only their
            // first pages are written in most runs): room for one, grown by doubling.
            chains: Vec::with_capacity(1),
        });
        let index = index_of(block.present, bit);
        if block.present & bit == 0 {
            block.present |= bit;
            block.chains.insert(index, C::default());
        }
        debug_assert_eq!(block.chains.len(), block.present.count_ones() as usize);
        &mut block.chains[index]
    }

    /// Every chain with its page number, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &C)> + '_ {
        self.blocks.iter().flat_map(|(block, chains)| {
            pages_of(chains.present)
                .map(move |slot| key_of(*block, slot))
                .zip(chains.chains.iter())
        })
    }

    pub fn values(&self) -> impl Iterator<Item = &C> + '_ {
        self.blocks.values().flat_map(|block| block.chains.iter())
    }
}

/// The places of the bits set in `present`, lowest first.
fn pages_of(mut present: u64) -> impl Iterator<Item = u64> {
    std::iter::from_fn(move || {
        if present == 0 {
            return None;
        }
        let slot = u64::from(present.trailing_zeros());
        present &= present - 1;
        Some(slot)
    })
}

/// The block map's hash: splitmix64's finaliser, so every bit of a block number counts (a
/// plain product would keep a number's trailing zeros, and regions aligned to large powers of
/// two would share a few places).
#[derive(Default)]
pub struct BlockHasher(u64);

impl std::hash::Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(*byte));
        }
    }

    fn write_u64(&mut self, block: u64) {
        let mut x = block;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        self.0 = x ^ (x >> 31);
    }
}

type BlockHash = std::hash::BuildHasherDefault<BlockHasher>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Against a `BTreeMap` under a random mix of keys: dense runs, strays, block edges.
    #[test]
    fn answers_like_an_ordered_map() {
        let mut map: ChainMap<u64> = ChainMap::default();
        let mut model: BTreeMap<u64, u64> = BTreeMap::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for step in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = match x % 4 {
                0 => x >> 40,                          // strays
                1 => 0x3d1_ffc4a + (x >> 50),          // a dense run across blocks
                2 => key_of(x >> 58, BLOCK_PAGES - 1), // the last page of a block
                _ => step % 300,                       // pages in order
            };
            *map.get_or_default(key) += 1;
            *model.entry(key).or_default() += 1;
            if step % 997 == 0 {
                for (key, count) in &model {
                    assert_eq!(map.get(*key), Some(count), "key {key:#x}");
                }
            }
        }
        let mut all: Vec<(u64, u64)> = map.iter().map(|(k, c)| (k, *c)).collect();
        all.sort_unstable();
        let expected: Vec<(u64, u64)> = model.iter().map(|(k, c)| (*k, *c)).collect();
        assert_eq!(all, expected);
        assert_eq!(map.values().sum::<u64>(), 20_000);
        assert_eq!(map.get(u64::MAX), None);
        assert_eq!(map.get(301), None);
        if let Some(count) = map.get_mut(0) {
            *count = 7;
        }
        assert_eq!(map.get(0), Some(&7));
    }

    #[test]
    fn absent_pages_of_a_present_block_are_absent() {
        let mut map: ChainMap<u8> = ChainMap::default();
        let block = block_of(0x3d1_ffc4a);
        *map.get_or_default(key_of(block, 3)) = 1;
        for slot in 0..BLOCK_PAGES {
            let found = map.get(key_of(block, slot)).copied();
            assert_eq!(found, (slot == 3).then_some(1), "slot {slot}");
        }
        assert!(map.get_mut(key_of(block, 4)).is_none());
    }

    /// Every page has one place; 8 neighbours, and the first pages of 8 neighbouring 64-page
    /// stacks, share a block; a dense region of 512 pages fills 8 blocks.
    #[test]
    fn places_are_one_to_one_and_group_neighbours_and_stacks() {
        let base = 0x1800_0000_0000u64 >> 12;
        let mut blocks = std::collections::HashSet::new();
        for key in base..base + 512 {
            assert_eq!(key_of(block_of(key), slot_of(key)), key);
            assert!(slot_of(key) < BLOCK_PAGES);
            blocks.insert(block_of(key));
        }
        assert_eq!(blocks.len(), 8);
        for page in 0..8 {
            assert_eq!(block_of(base + page), block_of(base));
            assert_eq!(block_of(base + 64 * page), block_of(base));
        }
        assert_ne!(block_of(base + 8), block_of(base));
        for key in [0, 1, u64::MAX, u64::MAX - 63, 0x3d1_ffc4a] {
            assert_eq!(key_of(block_of(key), slot_of(key)), key, "{key:#x}");
        }
    }
}
