//! gptossd stage worker library: the GPT-OSS layer math, the KV pool, the stage loop.

pub mod cpu;
