//! gptossd stage worker library: the GPT-OSS layer math on a backend, the per-stage KV pool.

pub mod backend;
pub mod kv;
pub mod model;
pub mod sampler;
pub mod worker;
