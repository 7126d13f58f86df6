//! gptossd supervisor library.

pub mod chat;
