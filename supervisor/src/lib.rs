//! gptossd supervisor library.

pub mod chat;
pub mod scheduler;
