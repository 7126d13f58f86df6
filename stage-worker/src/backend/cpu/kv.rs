//! The CPU backend's KV memory: keys and values of this stage's layers, indexed by block id.
//!
//! Layout: `[layer][block][slot][kv_heads × head_dim]`, f32, for K and V separately. Where a
//! position lives is [`KvConfig::locate`]'s business; block ids were checked against the pool
//! before any step computes. Memory is zero-initialised lazily by the OS (calloc), so an unused
//! pool costs nothing resident.

use crate::kv::KvConfig;

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
        self.cfg.locate(table, pos)
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
