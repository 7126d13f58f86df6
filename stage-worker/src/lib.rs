//! gptossd stage worker library: the GPT-OSS dataflow (`model`) written once over the backend
//! seam (`backend`: the trait and its CPU implementation), the step and its checks (`step`),
//! the stage as the process edge sees it (`stage`), the sampler, and the three things the
//! `gptossd-stage` binary runs: the worker loop (`worker`), the in-process generator
//! (`generate`) and the single-process bench (`bench`).

pub mod backend;
pub mod bench;
pub mod generate;
pub mod kv;
pub mod model;
pub mod rope;
pub mod sampler;
pub mod stage;
pub mod step;
pub mod worker;
