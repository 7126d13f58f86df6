//! Loading a stage at the process edge (`stage.rs`): the device decides the backend, and the
//! loaded stage reports what the supervisor sizes its KV pool and its health output from.

mod common;

use common::tiny_weights;
use gptossd_shared::device::{BackendKind, Device};
use gptossd_stage::kv::KvConfig;
use gptossd_stage::stage::Stage;

fn device(s: &str) -> Device {
    s.parse().expect("a device")
}

#[test]
fn a_cpu_stage_reports_its_backend_and_the_blocks_it_holds() {
    let (cfg, weights) = tiny_weights(None);
    let kv = KvConfig {
        num_blocks: 12,
        block_size: 16,
    };
    let stage = Stage::load(&device("cpu"), 2, cfg, &weights, kv).expect("load");
    let report = stage.report();
    assert_eq!(report.backend, BackendKind::Cpu);
    assert_eq!(report.kv_blocks, 12);
    assert_eq!(stage.kv_config(), kv);
    assert_eq!(report.threads, 2);
    assert!(
        report.detail.ends_with(" kernels, 2 threads"),
        "{}",
        report.detail
    );
    assert_eq!(report.weight_bytes, weights.bytes() as u64);
    assert!(report.kv_bytes > 0, "{report:?}");
    // The CPU computes on the checkpoint's mapping: it holds its KV memory and nothing else.
    assert_eq!(report.memory_bytes, report.kv_bytes);
}

#[test]
fn a_cuda_device_fails_to_load_saying_why() {
    let (cfg, weights) = tiny_weights(None);
    let Err(e) = Stage::load(&device("cuda:1"), 2, cfg, &weights, KvConfig::default()) else {
        panic!("a CUDA stage loaded without a CUDA backend");
    };
    let message = e.to_string();
    assert!(
        message.starts_with("device cuda:1: the CUDA backend is not built in yet"),
        "{message}"
    );
}
