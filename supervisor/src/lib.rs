//! gptossd supervisor library.
