//! The KV block allocator and the prefix cache.
//!
//! Owns: the reference count of every block id `0..num_blocks`, the free list, the LRU list of
//! idle cached blocks, and the prefix-cache index. It does not know sequences: the scheduler
//! holds the block tables and calls [`BlockPool::retain`] / [`BlockPool::release`]. It never
//! sees K/V memory either — the stages own that, indexed by the ids handed out here.
//!
//! Every block is in exactly one of three places:
//! - **free**: reference count 0, not in the cache;
//! - **idle cached**: reference count 0, its contents still indexed by the prefix cache, on the
//!   LRU list; [`BlockPool::allocate`] evicts the least recently released one when the free list
//!   is empty, so idle cached blocks count as available;
//! - **in use**: reference count > 0 (cached or not).
//!
//! The prefix cache identifies a full block of tokens by a hash chain: FNV-1a 64 of the parent
//! block's chain hash followed by this block's token ids (little-endian), with fixed constants so
//! the hash is the same in every process and run. The hash only finds a bucket: a lookup also
//! compares the block's tokens and the identity of its parent entry, so a hash collision can
//! never hand a sequence somebody else's K/V. Entry identities are never reused: when a parent
//! is evicted, its children become unreachable (and are evicted in turn by the LRU) instead of
//! being attached to whatever later reuses the parent's block id.

use std::collections::{BTreeMap, HashMap};

/// A KV block id, as the stages index their memory.
pub type BlockId = u32;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Chain hash of a full block: FNV-1a 64 over the parent's chain hash and the block's tokens.
pub fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = FNV_OFFSET;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(FNV_PRIME);
        }
    };
    eat(&parent.to_le_bytes());
    for t in tokens {
        eat(&t.to_le_bytes());
    }
    h
}

/// Where a sequence's chain of cached blocks ends: the chain hash and the cache entry of its
/// last registered block. [`ChainLink::ROOT`] is the link before the first block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainLink {
    hash: u64,
    entry: u64,
}

impl ChainLink {
    /// The link before a sequence's first block (entry 0 is never a real entry).
    pub const ROOT: ChainLink = ChainLink {
        hash: FNV_OFFSET,
        entry: 0,
    };
}

/// What the cache knows about one block's contents.
#[derive(Debug)]
struct Entry {
    /// Unique for the life of the pool; never reused.
    id: u64,
    hash: u64,
    /// Entry id of the previous block of the chain (0 for the first block).
    parent: u64,
    tokens: Box<[u32]>,
}

/// Reference-counted KV blocks with a prefix cache. See the module docs for the invariants.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    refcount: Vec<u32>,
    /// Free, uncached blocks; popped from the end (initially in ascending id order).
    free: Vec<BlockId>,
    /// Idle cached blocks by release tick, oldest first.
    lru: BTreeMap<u64, BlockId>,
    /// `Some(tick)` while the block is on the LRU list.
    lru_tick: Vec<Option<u64>>,
    tick: u64,
    /// The cache entry of each block, if its contents are indexed.
    entries: Vec<Option<Entry>>,
    /// Chain hash → blocks whose entry has that hash (almost always one).
    index: HashMap<u64, Vec<BlockId>>,
    next_entry: u64,
}

impl BlockPool {
    /// A pool of `num_blocks` blocks of `block_size` positions. The caller has checked that
    /// `num_blocks` fits in a [`BlockId`] and that `block_size > 0`.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        let top = BlockId::try_from(num_blocks).unwrap_or(BlockId::MAX);
        Self {
            block_size,
            refcount: vec![0; num_blocks],
            free: (0..top).rev().collect(),
            lru: BTreeMap::new(),
            lru_tick: vec![None; num_blocks],
            tick: 0,
            entries: (0..num_blocks).map(|_| None).collect(),
            index: HashMap::new(),
            next_entry: 1,
        }
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Number of blocks in the pool.
    pub fn total(&self) -> usize {
        self.refcount.len()
    }

    /// Blocks that [`BlockPool::allocate`] can hand out now (free + idle cached).
    pub fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Blocks with a reference count above zero.
    pub fn in_use(&self) -> usize {
        self.total() - self.available()
    }

    /// Idle cached blocks (reference count 0, contents still reusable).
    pub fn idle_cached(&self) -> usize {
        self.lru.len()
    }

    /// Reference count of `block` (0 for an id outside the pool).
    pub fn refcount(&self, block: BlockId) -> u32 {
        self.refcount.get(block as usize).copied().unwrap_or(0)
    }

    /// True if `block` is idle but cached: retaining it takes it off the available count.
    pub fn is_idle_cached(&self, block: BlockId) -> bool {
        self.lru_tick
            .get(block as usize)
            .is_some_and(|t| t.is_some())
    }

    /// Takes a block with reference count 1: a free one, else the least recently released idle
    /// cached one (its cache entry is dropped). `None` when every block is in use.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let block = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.lru.pop_first()?;
                self.lru_tick[b as usize] = None;
                self.uncache(b);
                b
            }
        };
        self.refcount[block as usize] = 1;
        Some(block)
    }

    /// Adds a reference to `block` (a prefix-cache hit or a block already held).
    pub fn retain(&mut self, block: BlockId) {
        let i = block as usize;
        if self.refcount[i] == 0 {
            if let Some(t) = self.lru_tick[i].take() {
                self.lru.remove(&t);
            } else {
                debug_assert!(false, "retain of free block {block}");
                self.free.retain(|&b| b != block);
            }
        }
        self.refcount[i] += 1;
    }

    /// Drops a reference to `block`. At zero a cached block goes to the LRU list (most recently
    /// released last), an uncached one to the free list.
    pub fn release(&mut self, block: BlockId) {
        let i = block as usize;
        debug_assert!(self.refcount[i] > 0, "release of unheld block {block}");
        if self.refcount[i] == 0 {
            return;
        }
        self.refcount[i] -= 1;
        if self.refcount[i] == 0 {
            if self.entries[i].is_some() {
                self.tick += 1;
                self.lru.insert(self.tick, block);
                self.lru_tick[i] = Some(self.tick);
            } else {
                self.free.push(block);
            }
        }
    }

    /// The longest chain of cached blocks matching the full blocks of `tokens`, at most
    /// `max_blocks` long, each with the link a sequence holding it continues from.
    pub fn lookup(&self, tokens: &[u32], max_blocks: usize) -> Vec<(BlockId, ChainLink)> {
        let mut found = Vec::new();
        let mut link = ChainLink::ROOT;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let hash = chain_hash(link.hash, chunk);
            let Some((block, entry)) = self.find(hash, link.entry, chunk) else {
                break;
            };
            link = ChainLink { hash, entry };
            found.push((block, link));
        }
        found
    }

    /// Registers the contents of `held`, a full block whose K/V the caller has computed and
    /// holds one reference to, as the block after `parent` with `tokens`. If the cache already
    /// has a block with the same chain (computed by another sequence meanwhile), the caller's
    /// reference moves to that block and `held` is released: the returned id is the one the
    /// caller's block table must hold from now on.
    pub fn register(
        &mut self,
        held: BlockId,
        parent: ChainLink,
        tokens: &[u32],
    ) -> (BlockId, ChainLink) {
        debug_assert_eq!(tokens.len(), self.block_size);
        let hash = chain_hash(parent.hash, tokens);
        if let Some((block, entry)) = self.find(hash, parent.entry, tokens) {
            if block != held {
                self.retain(block);
                self.release(held);
            }
            return (block, ChainLink { hash, entry });
        }
        if let Some(old) = self.entries[held as usize].as_ref() {
            // Already cached under another chain (cannot happen for a block the caller
            // computed itself); keep the old identity rather than corrupt the index.
            debug_assert!(false, "block {held} registered twice");
            return (
                held,
                ChainLink {
                    hash: old.hash,
                    entry: old.id,
                },
            );
        }
        let id = self.next_entry;
        self.next_entry += 1;
        self.entries[held as usize] = Some(Entry {
            id,
            hash,
            parent: parent.entry,
            tokens: tokens.into(),
        });
        self.index.entry(hash).or_default().push(held);
        (held, ChainLink { hash, entry: id })
    }

    /// Forgets every cached block (the stages lost their K/V): idle cached blocks become free,
    /// blocks in use stay in use but uncached.
    pub fn clear_cache(&mut self) {
        for (_, block) in std::mem::take(&mut self.lru) {
            self.lru_tick[block as usize] = None;
            self.free.push(block);
        }
        for e in &mut self.entries {
            *e = None;
        }
        self.index.clear();
    }

    fn find(&self, hash: u64, parent: u64, tokens: &[u32]) -> Option<(BlockId, u64)> {
        self.index.get(&hash)?.iter().find_map(|&b| {
            let e = self.entries[b as usize].as_ref()?;
            (e.parent == parent && *e.tokens == *tokens).then_some((b, e.id))
        })
    }

    fn uncache(&mut self, block: BlockId) {
        let Some(e) = self.entries[block as usize].take() else {
            return;
        };
        if let Some(bucket) = self.index.get_mut(&e.hash) {
            bucket.retain(|&b| b != block);
            if bucket.is_empty() {
                self.index.remove(&e.hash);
            }
        }
    }

    /// Checks the partition free / idle cached / in use and the index; `Err` names the first
    /// broken invariant.
    #[cfg(test)]
    pub fn check(&self) -> Result<(), String> {
        let n = self.total();
        let mut seen = vec![0u8; n];
        for &b in &self.free {
            let i = b as usize;
            if self.refcount[i] != 0 || self.entries[i].is_some() || self.lru_tick[i].is_some() {
                return Err(format!("free block {b} is held, cached or on the LRU"));
            }
            seen[i] += 1;
        }
        for (&t, &b) in &self.lru {
            let i = b as usize;
            if self.refcount[i] != 0 || self.entries[i].is_none() || self.lru_tick[i] != Some(t) {
                return Err(format!("LRU block {b} is held, uncached or mis-ticked"));
            }
            seen[i] += 1;
        }
        for (i, &listed) in seen.iter().enumerate() {
            let expect = u8::from(self.refcount[i] == 0);
            if listed != expect {
                return Err(format!(
                    "block {i}: refcount {} but listed {listed} times as free/idle",
                    self.refcount[i]
                ));
            }
            if self.refcount[i] > 0 && self.lru_tick[i].is_some() {
                return Err(format!("block {i} held but on the LRU"));
            }
            if let Some(e) = &self.entries[i] {
                let listed = self
                    .index
                    .get(&e.hash)
                    .is_some_and(|bucket| bucket.iter().filter(|&&b| b as usize == i).count() == 1);
                if !listed {
                    return Err(format!("cached block {i} missing from the index"));
                }
            }
        }
        let indexed: usize = self.index.values().map(Vec::len).sum();
        let cached = self.entries.iter().filter(|e| e.is_some()).count();
        if indexed != cached {
            return Err(format!("index lists {indexed} blocks, {cached} are cached"));
        }
        Ok(())
    }

    /// Whether `block`'s contents are indexed by the prefix cache.
    #[cfg(test)]
    pub fn is_cached(&self, block: BlockId) -> bool {
        self.entries
            .get(block as usize)
            .is_some_and(|e| e.is_some())
    }

    /// Test hook: files `block` under a foreign hash bucket, as a hash collision would.
    #[cfg(test)]
    fn force_collision(&mut self, block: BlockId, hash: u64) {
        self.index.entry(hash).or_default().push(block);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(start: u32, n: usize) -> Vec<u32> {
        (start..start + n as u32).collect()
    }

    #[test]
    fn allocate_hands_out_ascending_ids_then_runs_dry() {
        let mut p = BlockPool::new(3, 4);
        assert_eq!(p.allocate(), Some(0));
        assert_eq!(p.allocate(), Some(1));
        assert_eq!(p.allocate(), Some(2));
        assert_eq!(p.allocate(), None);
        assert_eq!(p.in_use(), 3);
        p.release(1);
        assert_eq!(p.available(), 1);
        assert_eq!(p.allocate(), Some(1));
        p.check().unwrap();
    }

    #[test]
    fn cached_chain_is_found_and_shared() {
        let mut p = BlockPool::new(8, 4);
        let t = toks(100, 12);
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        let (a2, l1) = p.register(a, ChainLink::ROOT, &t[0..4]);
        let (b2, l2) = p.register(b, l1, &t[4..8]);
        assert_eq!((a2, b2), (a, b));
        let hits = p.lookup(&t, 3);
        assert_eq!(hits, vec![(a, l1), (b, l2)]);
        // A different second block stops the chain after the first.
        let mut other = t.clone();
        other[5] = 7;
        assert_eq!(p.lookup(&other, 3), vec![(a, l1)]);
        // The cap is honoured.
        assert_eq!(p.lookup(&t, 1).len(), 1);
        p.check().unwrap();
    }

    #[test]
    fn released_cached_blocks_stay_reusable_until_evicted_lru_first() {
        let mut p = BlockPool::new(2, 2);
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        let (_, la) = p.register(a, ChainLink::ROOT, &[1, 2]);
        p.register(b, ChainLink::ROOT, &[3, 4]);
        p.release(b);
        p.release(a);
        assert_eq!(p.available(), 2);
        assert_eq!(p.idle_cached(), 2);
        assert_eq!(p.lookup(&[1, 2, 9], 1), vec![(a, la)]);
        // b was released first, so it is evicted first.
        assert_eq!(p.allocate(), Some(b));
        assert!(p.lookup(&[3, 4, 9], 1).is_empty());
        assert_eq!(p.lookup(&[1, 2, 9], 1).len(), 1);
        // Retaining the idle cached block takes it off the LRU.
        p.retain(a);
        assert_eq!(p.available(), 0);
        assert_eq!(p.refcount(a), 1);
        p.check().unwrap();
    }

    #[test]
    fn duplicate_registration_moves_the_reference_to_the_cached_block() {
        let mut p = BlockPool::new(4, 2);
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        p.register(a, ChainLink::ROOT, &[5, 6]);
        let (kept, _) = p.register(b, ChainLink::ROOT, &[5, 6]);
        assert_eq!(kept, a);
        assert_eq!(p.refcount(a), 2);
        assert_eq!(p.refcount(b), 0);
        assert_eq!(p.in_use(), 1);
        p.check().unwrap();
    }

    #[test]
    fn hash_collision_does_not_match_other_tokens() {
        let mut p = BlockPool::new(4, 2);
        let a = p.allocate().unwrap();
        p.register(a, ChainLink::ROOT, &[1, 2]);
        // Pretend [3, 4] collides with [1, 2].
        let h = chain_hash(ChainLink::ROOT.hash, &[3, 4]);
        p.force_collision(a, h);
        assert!(p.lookup(&[3, 4, 0], 1).is_empty());
        assert_eq!(p.lookup(&[1, 2, 0], 1).len(), 1);
    }

    #[test]
    fn evicted_parent_orphans_its_children() {
        let mut p = BlockPool::new(3, 2);
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        let (_, la) = p.register(a, ChainLink::ROOT, &[1, 2]);
        p.register(b, la, &[3, 4]);
        p.release(a); // a is older on the LRU than b
        p.release(b);
        let c = p.allocate().unwrap(); // the free block
        let d = p.allocate().unwrap(); // evicts a
        assert_eq!(d, a);
        // Recompute [1, 2] into d: a new entry id, so b's old chain is not reattached.
        let (_, ld) = p.register(d, ChainLink::ROOT, &[1, 2]);
        assert_ne!(ld, la);
        assert_eq!(p.lookup(&[1, 2, 3, 4, 0], 2), vec![(d, ld)]);
        p.release(c);
        p.check().unwrap();
    }

    #[test]
    fn clear_cache_frees_idle_and_uncaches_held() {
        let mut p = BlockPool::new(3, 2);
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        p.register(a, ChainLink::ROOT, &[1, 2]);
        p.register(b, ChainLink::ROOT, &[3, 4]);
        p.release(a);
        p.clear_cache();
        assert_eq!(p.idle_cached(), 0);
        assert!(p.lookup(&[3, 4, 0], 1).is_empty());
        p.release(b);
        assert_eq!(p.available(), 3);
        p.check().unwrap();
    }
}
