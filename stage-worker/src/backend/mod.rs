//! The backends the model's dataflow runs on, one folder each (`cpu/` today).
pub mod cpu;
