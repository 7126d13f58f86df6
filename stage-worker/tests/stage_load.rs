//! Loading a stage at the process edge (`stage.rs`): the device decides the backend, and the
//! loaded stage reports what the supervisor sizes its KV pool and its health output from.

mod common;

use common::tiny_weights;
use gptossd_shared::device::{BackendKind, Device};
use gptossd_stage::backend::cuda::probe;
use gptossd_stage::backend::BackendError;
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

/// Without a CUDA driver (CI), a `cuda:N` stage fails to load with the probe's typed reason,
/// naming the library that is missing.
#[test]
fn without_a_driver_a_cuda_device_fails_to_load_saying_why() {
    if probe::driver_present() {
        println!("skipped: this machine has a CUDA driver (the GPU tests below run instead)");
        return;
    }
    let (cfg, weights) = tiny_weights(None);
    let Err(e) = Stage::load(&device("cuda:1"), 2, cfg, &weights, KvConfig::default()) else {
        panic!("a CUDA stage loaded without a CUDA driver");
    };
    assert!(matches!(e, BackendError::Unavailable { .. }), "{e:?}");
    let message = e.to_string();
    assert!(
        message.starts_with("device cuda:1: no CUDA driver library: libcuda.so.1"),
        "{message}"
    );
}

/// With a driver: a GPU that is not there is refused with the count of those that are.
#[test]
fn a_cuda_ordinal_past_the_gpus_fails_to_load_saying_how_many_there_are() {
    if !probe::driver_present() {
        println!("skipped: no CUDA driver on this machine");
        return;
    }
    let (cfg, weights) = tiny_weights(None);
    let Err(e) = Stage::load(&device("cuda:4095"), 2, cfg, &weights, KvConfig::default()) else {
        panic!("cuda:4095 loaded");
    };
    let message = e.to_string();
    assert!(message.contains("cuda:4095 but "), "{message}");
    assert!(message.contains("visible"), "{message}");
}

/// With a GPU: the stage loads on cuda:0 and reports a CUDA backend, the device, the blocks it
/// holds (all asked for: the tiny model's KV is small) and the weights it copied.
#[test]
fn a_cuda_stage_reports_its_gpu_and_the_blocks_it_holds() {
    if !probe::driver_present() {
        println!("skipped: no CUDA driver on this machine");
        return;
    }
    let (cfg, weights) = tiny_weights(None);
    let kv = KvConfig {
        num_blocks: 12,
        block_size: 16,
    };
    let stage = Stage::load(&device("cuda:0"), 2, cfg, &weights, kv).expect("load on cuda:0");
    let report = stage.report();
    assert_eq!(report.backend, BackendKind::Cuda);
    assert_eq!(report.kv_blocks, 12);
    assert_eq!(stage.kv_config(), kv);
    assert!(report.detail.contains(" SMs, "), "{}", report.detail);
    // bf16 K and V: 2 × layers × blocks × block size × kv_dim × 2 bytes.
    let (layers, kv_dim) = (stage.config().num_hidden_layers, stage.config().kv_dim());
    assert_eq!(report.kv_bytes, (2 * layers * 12 * 16 * kv_dim * 2) as u64);
    // The weights were copied to the device (the MXFP4 experts as they are: as many bytes).
    assert!(
        report.memory_bytes >= report.kv_bytes + weights.bytes() as u64 / 2,
        "{report:?}"
    );
}
