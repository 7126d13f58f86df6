//! Compiles every embedded CUDA kernel with NVRTC for one architecture and prints ptxas's
//! resource table; on a machine with a GPU (`--device N`) it takes the architecture from the
//! device, loads every cubin and kernel into a context (the driver accepts what NVRTC made),
//! and times a cold compile into an empty cubin cache against a load from it. With
//! `--cuobjdump PATH` it also runs the SASS lint (`backend::cuda::sass`) on every cubin.
//! The GPU check script's phase 1 runs it (`bench/gpu/check.sh`); it needs no GPU with
//! `--arch`.
//!
//! Output: one line per (arch, kernel), then `compile: ...` timing lines; exit status 0 when
//! everything compiled (and loaded), 1 otherwise.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use cudarc::nvrtc::Ptx;
use gptossd_stage::backend::cuda::cache::{Fetched, KernelCache};
use gptossd_stage::backend::cuda::nvrtc::{self, Arch};
use gptossd_stage::backend::cuda::{kernels, probe, sass};

#[derive(Parser)]
#[command(about = "Compile the CUDA kernels with NVRTC and report their resources")]
struct Args {
    /// The architecture to compile for (sm_80, sm_90, sm_90a, sm_120, ...); default: the
    /// device's, with --device.
    #[arg(long)]
    arch: Option<Arch>,
    /// Open GPU N: compile for its architecture and load every cubin and kernel.
    #[arg(long)]
    device: Option<u32>,
    /// Also time a cold compile into this (emptied) cache directory and a load from it.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Lint each cubin's SASS with this cuobjdump (nvdisasm must be on PATH).
    #[arg(long)]
    cuobjdump: Option<PathBuf>,
}

/// The sources, as (program name, complete NVRTC source): every kernel source of the backend.
fn sources() -> Vec<(String, String)> {
    kernels::ALL
        .iter()
        .map(|k| (k.name.to_string(), kernels::cuda_source(k)))
        .collect()
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kernel_report: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let gpu = match args.device {
        Some(ordinal) => {
            let gpu = probe::open(ordinal).map_err(|e| e.to_string())?;
            println!("device: cuda:{ordinal} {}", gpu.info);
            Some(gpu)
        }
        None => None,
    };
    let arch = match (args.arch, &gpu) {
        (Some(arch), _) => arch,
        (None, Some(gpu)) => gpu.info.arch(),
        (None, None) => return Err("give --arch sm_XX or --device N".to_string()),
    };
    let version = nvrtc::version().map_err(|e| e.to_string())?;
    println!(
        "NVRTC {version}, {arch}, options {}",
        nvrtc::OPTIONS.join(" ")
    );

    let sources = sources();
    let mut failed = false;
    let started = Instant::now();
    for (name, source) in &sources {
        let began = Instant::now();
        let compiled = match nvrtc::compile(name, source, arch) {
            Ok(c) => c,
            Err(e) => {
                println!("FAILED {e}");
                failed = true;
                continue;
            }
        };
        let ms = began.elapsed().as_secs_f64() * 1e3;
        for k in &compiled.kernels {
            let clean = k.spill_store_bytes + k.spill_load_bytes + k.stack_bytes == 0;
            println!(
                "{arch:<7} {k}{}",
                if clean { "" } else { "  <- SPILLS/STACK" }
            );
            failed |= !clean;
        }
        println!(
            "compile: {name} {} B cubin in {ms:.0} ms",
            compiled.cubin.len()
        );
        if let Some(tool) = &args.cuobjdump {
            let path = std::env::temp_dir().join(format!("gptossd-{name}.{arch}.cubin"));
            std::fs::write(&path, &compiled.cubin)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let listing = sass::dump(tool, &path);
            let _ = std::fs::remove_file(&path);
            let findings = sass::lint(&listing.map_err(|e| e.to_string())?);
            for f in &findings {
                println!("sass: {arch} {f}");
            }
            println!("sass: {name} {} findings", findings.len());
            failed |= !findings.is_empty();
        }
        if let Some(gpu) = &gpu {
            let module = gpu
                .context
                .load_module(Ptx::from_binary(compiled.cubin.clone()))
                .map_err(|e| format!("cuModuleLoadData({name}): {e}"))?;
            for k in &compiled.kernels {
                module
                    .load_function(&k.name)
                    .map_err(|e| format!("cuModuleGetFunction({}): {e}", k.name))?;
            }
            println!("loaded: {name}, {} kernels", compiled.kernels.len());
        }
    }
    println!(
        "compile: all sources in {:.2} s",
        started.elapsed().as_secs_f64()
    );

    if let Some(dir) = args.cache {
        time_cache(&sources, arch, version, dir)?;
    }
    if failed {
        return Err("some kernels failed (above)".to_string());
    }
    Ok(())
}

/// Cold: compile everything into an empty cache; cached: read everything back from it.
fn time_cache(
    sources: &[(String, String)],
    arch: Arch,
    version: nvrtc::CudaVersion,
    dir: PathBuf,
) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(&dir);
    let cache = KernelCache::new(dir);
    for pass in ["cold", "cached"] {
        let began = Instant::now();
        for (name, source) in sources {
            let (_, fetched) = cache
                .cubin(name, source, arch, version)
                .map_err(|e| e.to_string())?;
            match (pass, fetched) {
                ("cached", Fetched::Compiled { .. }) => {
                    return Err(format!("{name}: compiled again, not read from the cache"))
                }
                (_, Fetched::Compiled { stored: Err(e) }) => return Err(e.to_string()),
                _ => {}
            }
        }
        let seconds = began.elapsed().as_secs_f64();
        println!("cache: {pass} {seconds:.3} s for {} sources", sources.len());
    }
    Ok(())
}
