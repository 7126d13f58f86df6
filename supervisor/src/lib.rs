//! gptossd supervisor library.

pub mod chat;
pub mod config;
pub mod scheduler;
pub mod split;
