//! The per-stage KV memory: keys and values of this stage's layers, indexed by block id.
//!
//! The supervisor owns the block tables and the allocator; a stage only stores what it is told
//! to, where it is told to. Position `p` of a sequence lives in block `table[p / block_size]`,
//! slot `p % block_size`. Layout: `[layer][block][slot][kv_heads × head_dim]`, f32, for K and V
//! separately. Memory is zero-initialised lazily by the OS (calloc), so an unused pool costs
//! nothing resident.

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

/// A KV pool for `layers` layers of width `kv_dim`.
pub struct KvPool {
    cfg: KvConfig,
    layers: usize,
    kv_dim: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl KvPool {
    pub fn new(cfg: KvConfig, layers: usize, kv_dim: usize) -> Self {
        let n = layers * cfg.num_blocks * cfg.block_size * kv_dim;
        Self {
            cfg,
            layers,
            kv_dim,
            k: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    pub fn config(&self) -> KvConfig {
        self.cfg
    }

    /// Bytes of K and V memory the pool spans.
    pub fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * 4
    }

    /// Offset of (layer, block, slot) in the flat arrays. Callers have checked the block id.
    fn offset(&self, layer: usize, block: u32, slot: usize) -> usize {
        ((layer * self.cfg.num_blocks + block as usize) * self.cfg.block_size + slot) * self.kv_dim
    }

    /// Where position `pos` of a sequence with `table` lives; `None` if the table is too short.
    pub fn locate(&self, table: &[u32], pos: usize) -> Option<(u32, usize)> {
        let block = *table.get(pos / self.cfg.block_size)?;
        Some((block, pos % self.cfg.block_size))
    }

    /// Stores the key and value of one position of local layer `layer`.
    pub fn store(&mut self, layer: usize, block: u32, slot: usize, k: &[f32], v: &[f32]) {
        debug_assert!(layer < self.layers);
        let o = self.offset(layer, block, slot);
        self.k[o..o + self.kv_dim].copy_from_slice(k);
        self.v[o..o + self.kv_dim].copy_from_slice(v);
    }

    /// The key row (all KV heads) of one position.
    pub fn key(&self, layer: usize, block: u32, slot: usize) -> &[f32] {
        let o = self.offset(layer, block, slot);
        &self.k[o..o + self.kv_dim]
    }

    /// The value row (all KV heads) of one position.
    pub fn value(&self, layer: usize, block: u32, slot: usize) -> &[f32] {
        let o = self.offset(layer, block, slot);
        &self.v[o..o + self.kv_dim]
    }
}
