//! gptossd supervisor library.

pub mod api;
pub mod chat;
pub mod config;
pub mod metrics;
pub mod scheduler;
pub mod split;
