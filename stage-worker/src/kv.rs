//! The shape of a stage's KV memory and where a position of a sequence lives in it; the memory
//! itself belongs to the backend (`Backend::Kv`: f32 on the CPU, its own layout on a GPU).
//!
//! The supervisor owns the block tables and the allocator; a stage only stores what it is told
//! to, where it is told to. Position `p` of a sequence lives in block `table[p / block_size]`,
//! slot `p % block_size`, the same on every backend, so block ids mean the same everywhere.

/// Sizes of a stage's KV pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvConfig {
    /// Number of blocks (shared by all sequences of the stage).
    pub num_blocks: usize,
    /// Positions per block.
    pub block_size: usize,
}

impl Default for KvConfig {
    fn default() -> Self {
        Self {
            num_blocks: 1024,
            block_size: 16,
        }
    }
}

impl KvConfig {
    /// Where position `pos` of a sequence with block table `table` lives: `(block id, slot)`;
    /// `None` if the table is too short. The block id is not checked against the pool here
    /// (the step checks do that before any computation).
    pub fn locate(&self, table: &[u32], pos: usize) -> Option<(u32, usize)> {
        let block = *table.get(pos / self.block_size)?;
        Some((block, pos % self.block_size))
    }
}

#[cfg(test)]
mod tests {
    use super::KvConfig;

    #[test]
    fn positions_map_to_block_and_slot() {
        let kv = KvConfig {
            num_blocks: 8,
            block_size: 4,
        };
        let table = [5, 2, 7];
        assert_eq!(kv.locate(&table, 0), Some((5, 0)));
        assert_eq!(kv.locate(&table, 3), Some((5, 3)));
        assert_eq!(kv.locate(&table, 4), Some((2, 0)));
        assert_eq!(kv.locate(&table, 11), Some((7, 3)));
        assert_eq!(kv.locate(&table, 12), None, "past the table");
    }
}
