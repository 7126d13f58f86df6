//! Opening the GPU of a `cuda:N` stage: each way it can fail as a typed error that says what is
//! missing and what to do, never a panic, and a [`DeviceInfo`] for the worker's `Loaded` report.
//!
//! The checks run in this order, each before anything that needs it: the driver library is
//! present (without it cudarc panics on the first driver call), the driver initialises, the
//! ordinal names a visible GPU, the NVRTC library is present, then the context is created and
//! the device described. A panic inside cudarc (it panics when a library lacks a symbol it
//! binds, i.e. a driver older than the bindings) is caught at this one boundary and reported as
//! [`ProbeError::DriverUnusable`].
//!
//! What it must not know: kernels, weights, the KV pool; it only opens and describes.

use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::result as driver;
use cudarc::driver::sys;
use cudarc::driver::CudaContext;

use super::nvrtc::{self, Arch, CompileError, CudaVersion, NO_NVRTC_HELP};

/// What to do when no driver library is found.
pub const NO_DRIVER_HELP: &str = "no CUDA driver library: libcuda.so.1 was not found by the \
    dynamic loader (LD_LIBRARY_PATH, the ld.so cache); install the NVIDIA driver (580 or newer, \
    for CUDA 13; `nvidia-smi` must work) or run this stage on the CPU (device \"cpu\")";

const GIB: f64 = (1u64 << 30) as f64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("{NO_DRIVER_HELP}")]
    NoDriver,
    #[error(
        "the CUDA driver failed to initialise (cuInit: {reason}); check that `nvidia-smi` works"
    )]
    DriverInit { reason: String },
    #[error(
        "the CUDA driver library is unusable ({reason}); it may be older than CUDA 13 (driver 580)"
    )]
    DriverUnusable { reason: String },
    #[error("cuda:{ordinal} but {} visible{}", gpus(*count), visible_note(visible))]
    OrdinalOutOfRange {
        ordinal: u32,
        count: u32,
        /// `CUDA_VISIBLE_DEVICES` when it was set: it decides which GPUs are visible.
        visible: Option<String>,
    },
    #[error("{NO_NVRTC_HELP}")]
    NoNvrtc,
    #[error("cuda:{ordinal}: {call} failed: {reason}")]
    Query {
        ordinal: u32,
        call: &'static str,
        reason: String,
    },
    #[error("cuda:{ordinal} needs {:.1} GiB, {:.1} GiB free", *need as f64 / GIB, *free as f64 / GIB)]
    OutOfMemory { ordinal: u32, need: u64, free: u64 },
}

fn gpus(count: u32) -> String {
    match count {
        1 => "1 GPU is".to_string(),
        n => format!("{n} GPUs are"),
    }
}

fn visible_note(visible: &Option<String>) -> String {
    match visible {
        Some(v) => format!(" (CUDA_VISIBLE_DEVICES={v})"),
        None => String::new(),
    }
}

/// A GPU as a loaded stage reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: u32,
    pub name: String,
    /// (major, minor): 9.0 for an H100 or H200.
    pub compute_capability: (u32, u32),
    pub total_bytes: u64,
    /// Free when the device was opened.
    pub free_bytes: u64,
    pub sm_count: u32,
    /// The newest CUDA version the driver supports.
    pub driver_version: CudaVersion,
    pub nvrtc_version: CudaVersion,
}

impl DeviceInfo {
    /// The architecture the kernels are compiled for.
    pub fn arch(&self) -> Arch {
        Arch::from_compute_capability(self.compute_capability.0, self.compute_capability.1)
    }

    /// Fails with "needs X GiB, Y GiB free" unless `need` bytes fit in what was free.
    pub fn check_fits(&self, need: u64) -> Result<(), ProbeError> {
        check_fits(self.ordinal, need, self.free_bytes)
    }
}

/// One line: `NVIDIA H200 (sm_90, 132 SMs, 139.8 GiB, 139.2 free; driver 13.0, NVRTC 13.0)`.
impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}, {} SMs, {:.1} GiB, {:.1} free; driver {}, NVRTC {})",
            self.name,
            self.arch(),
            self.sm_count,
            self.total_bytes as f64 / GIB,
            self.free_bytes as f64 / GIB,
            self.driver_version,
            self.nvrtc_version,
        )
    }
}

/// Fails with "cuda:N needs X GiB, Y GiB free" unless `need` bytes fit in `free`.
pub fn check_fits(ordinal: u32, need: u64, free: u64) -> Result<(), ProbeError> {
    if need > free {
        return Err(ProbeError::OutOfMemory {
            ordinal,
            need,
            free,
        });
    }
    Ok(())
}

/// An opened GPU: its primary context (current on the calling thread) and its description.
/// Nothing is allocated on it yet: the backend that owns the context decides its streams (one
/// per worker) and disables cudarc's event tracking before its first allocation.
pub struct Gpu {
    pub context: Arc<CudaContext>,
    pub info: DeviceInfo,
}

/// Whether the CUDA driver library can be opened.
pub fn driver_present() -> bool {
    // SAFETY: `is_culib_present` only tries `dlopen` on the candidate names and closes what it
    // opened; it runs no library code besides the library's own initialisers.
    unsafe { sys::is_culib_present() }
}

/// Opens GPU `ordinal` (nvidia-smi's numbering when `CUDA_DEVICE_ORDER=PCI_BUS_ID`).
pub fn open(ordinal: u32) -> Result<Gpu, ProbeError> {
    if !driver_present() {
        return Err(ProbeError::NoDriver);
    }
    // cudarc panics (rather than failing) when a symbol it binds is missing from the library
    // it found; this is the one place that turns such a panic into an error.
    panic::catch_unwind(AssertUnwindSafe(|| open_with_driver(ordinal))).unwrap_or_else(|payload| {
        let reason = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("a panic inside cudarc")
            .to_string();
        Err(ProbeError::DriverUnusable { reason })
    })
}

fn open_with_driver(ordinal: u32) -> Result<Gpu, ProbeError> {
    driver::init().map_err(|e| ProbeError::DriverInit {
        reason: e.to_string(),
    })?;
    let query = |call: &'static str| {
        move |e: driver::DriverError| ProbeError::Query {
            ordinal,
            call,
            reason: e.to_string(),
        }
    };
    let count = driver::device::get_count().map_err(query("cuDeviceGetCount"))?;
    let count = u32::try_from(count).unwrap_or(0);
    if ordinal >= count {
        return Err(ProbeError::OrdinalOutOfRange {
            ordinal,
            count,
            visible: std::env::var("CUDA_VISIBLE_DEVICES").ok(),
        });
    }
    let nvrtc_version = nvrtc::version().map_err(|e| match e {
        CompileError::NoLibrary => ProbeError::NoNvrtc,
        other => ProbeError::Query {
            ordinal,
            call: "nvrtcVersion",
            reason: other.to_string(),
        },
    })?;

    let mut driver_code = 0;
    // SAFETY: the driver library is present and initialised; the call writes one int through
    // a pointer to a local that outlives it.
    unsafe { sys::cuDriverGetVersion(&mut driver_code) }
        .result()
        .map_err(query("cuDriverGetVersion"))?;
    let context = CudaContext::new(ordinal as usize).map_err(query("cuDevicePrimaryCtxRetain"))?;
    let (major, minor) = context
        .compute_capability()
        .map_err(query("cuDeviceGetAttribute(compute capability)"))?;
    let sm_count = context
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(query("cuDeviceGetAttribute(multiprocessor count)"))?;
    let (free, total) = context.mem_get_info().map_err(query("cuMemGetInfo"))?;
    let info = DeviceInfo {
        ordinal,
        name: context.name().map_err(query("cuDeviceGetName"))?,
        compute_capability: (non_negative(major), non_negative(minor)),
        total_bytes: total as u64,
        free_bytes: free as u64,
        sm_count: non_negative(sm_count),
        driver_version: CudaVersion::from_driver_code(non_negative(driver_code)),
        nvrtc_version,
    };
    Ok(Gpu { context, info })
}

fn non_negative(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The machines CI runs on have no NVIDIA driver: opening a GPU must answer the no-driver
    /// error, naming the library and what to install, and must not panic.
    #[test]
    fn without_a_driver_opening_cuda0_says_what_is_missing() {
        if driver_present() {
            eprintln!("skipped: this machine has a CUDA driver library");
            return;
        }
        let err = open(0).err().expect("no driver, yet cuda:0 opened");
        assert_eq!(err, ProbeError::NoDriver);
        let message = err.to_string();
        assert!(message.contains("libcuda.so.1"), "{message}");
        assert!(message.contains("install the NVIDIA driver"), "{message}");
    }

    #[test]
    fn errors_name_the_limit_and_the_value() {
        let err = ProbeError::OrdinalOutOfRange {
            ordinal: 3,
            count: 1,
            visible: None,
        };
        assert_eq!(err.to_string(), "cuda:3 but 1 GPU is visible");
        let err = ProbeError::OrdinalOutOfRange {
            ordinal: 4,
            count: 2,
            visible: Some("0,2".into()),
        };
        assert_eq!(
            err.to_string(),
            "cuda:4 but 2 GPUs are visible (CUDA_VISIBLE_DEVICES=0,2)"
        );
        assert!(ProbeError::NoNvrtc
            .to_string()
            .contains("libnvrtc-builtins.so.13.0"));
    }

    #[test]
    fn memory_check_says_need_and_free() {
        let gib = 1u64 << 30;
        assert_eq!(check_fits(0, 12 * gib, 12 * gib), Ok(()));
        let err = check_fits(1, 13 * gib + gib / 2, 12 * gib).unwrap_err();
        assert_eq!(err.to_string(), "cuda:1 needs 13.5 GiB, 12.0 GiB free");
    }

    #[test]
    fn device_info_reads_as_one_line() {
        let info = DeviceInfo {
            ordinal: 0,
            name: "NVIDIA H200".into(),
            compute_capability: (9, 0),
            total_bytes: 150_094_512_128,
            free_bytes: 149_500_000_000,
            sm_count: 132,
            driver_version: CudaVersion::from_driver_code(13000),
            nvrtc_version: CudaVersion {
                major: 13,
                minor: 0,
            },
        };
        assert_eq!(info.arch().to_string(), "sm_90");
        assert_eq!(
            info.to_string(),
            "NVIDIA H200 (sm_90, 132 SMs, 139.8 GiB, 139.2 free; driver 13.0, NVRTC 13.0)"
        );
        assert!(info.check_fits(160_000_000_000).is_err());
    }
}
