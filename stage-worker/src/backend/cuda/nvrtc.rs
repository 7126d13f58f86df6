//! Compiling one embedded kernel source with NVRTC into a cubin for one GPU architecture, with
//! the project's fixed options, and reading ptxas's resource report (registers, spills, stack,
//! shared memory per kernel) from the program log.
//!
//! cudarc's safe NVRTC layer returns PTX only; a cubin needs `nvrtcGetCUBINSize` and
//! `nvrtcGetCUBIN` from its `sys` bindings, which this module wraps (the program is destroyed on
//! every path by a guard).
//!
//! Invariants: every kernel is compiled with [`OPTIONS`] and nothing else but the architecture,
//! so the same source gives the same code in every worker (batch invariance needs one set of
//! compile flags: `--fmad=false` keeps each `a * b + c` two rounded operations, as written).
//! Sources are header-free: no include path is passed. Nothing here runs before
//! [`library_present`] said yes: without libnvrtc, cudarc panics instead of failing.

use std::ffi::CString;
use std::fmt;
use std::str::FromStr;

use cudarc::nvrtc::{result, sys};

/// What to do when no NVRTC library is found, for every error that says so.
pub const NO_NVRTC_HELP: &str = "no NVRTC library: libnvrtc.so.13 was not found by the dynamic \
    loader; install NVRTC 13.0 (the cuda-nvrtc-13-0 package of NVIDIA's repository, or `pip \
    install nvidia-cuda-nvrtc==13.0.88`) and put its lib directory, which must also hold \
    libnvrtc-builtins.so.13.0, on LD_LIBRARY_PATH";

/// The options every kernel is compiled with, besides `--gpu-architecture`:
/// - `--fmad=false`: no contraction of a multiply and an add into an FMA (one rounding fewer),
///   so the arithmetic is the one written, on every architecture (the OpenCL twin of the
///   kernels runs with `FP_CONTRACT OFF` for the same reason);
/// - `-default-device`: functions without an execution-space annotation are device functions;
/// - `--std=c++17`: the language the sources are written in;
/// - `--ptxas-options=-v`: ptxas reports each kernel's resources in the program log.
pub const OPTIONS: &[&str] = &[
    "--fmad=false",
    "-default-device",
    "--std=c++17",
    "--ptxas-options=-v",
];

/// Whether the NVRTC library can be opened. Call it before anything else in this module.
pub fn library_present() -> bool {
    // SAFETY: `is_culib_present` only tries `dlopen` on the candidate names and closes what it
    // opened; it runs no library code besides the library's own initialisers.
    unsafe { sys::is_culib_present() }
}

/// A CUDA version as the libraries report it: NVRTC as (major, minor), the driver as
/// `1000·major + 10·minor` (13000 = 13.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CudaVersion {
    pub major: u32,
    pub minor: u32,
}

impl CudaVersion {
    /// Decodes the driver's encoding (`cuDriverGetVersion`): 13000 → 13.0, 12080 → 12.8.
    pub fn from_driver_code(code: u32) -> CudaVersion {
        CudaVersion {
            major: code / 1000,
            minor: (code % 1000) / 10,
        }
    }
}

impl fmt::Display for CudaVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The NVRTC library's version. Errors with [`CompileError::NoLibrary`] when it is missing.
pub fn version() -> Result<CudaVersion, CompileError> {
    if !library_present() {
        return Err(CompileError::NoLibrary);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); `nvrtcVersion` writes two ints through
    // pointers to locals that outlive the call.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| CompileError::Version {
            reason: e.to_string(),
        })?;
    Ok(CudaVersion {
        major: u32::try_from(major).unwrap_or(0),
        minor: u32::try_from(minor).unwrap_or(0),
    })
}

/// A real GPU architecture NVRTC compiles a cubin for: `sm_90`, or `sm_90a` for the
/// architecture-specific features of exactly that GPU family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Arch {
    pub major: u32,
    pub minor: u32,
    pub specific: bool,
}

impl Arch {
    /// The architecture of a device with this compute capability (9.0 → `sm_90`).
    pub fn from_compute_capability(major: u32, minor: u32) -> Arch {
        Arch {
            major,
            minor,
            specific: false,
        }
    }

    /// The option that selects it: `--gpu-architecture=sm_90`.
    pub fn option(&self) -> String {
        format!("--gpu-architecture={self}")
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let suffix = if self.specific { "a" } else { "" };
        // `pad` so that widths in format strings (`{arch:<7}`) apply.
        f.pad(&format!("sm_{}{}{suffix}", self.major, self.minor))
    }
}

/// `sm_<major><minor>[a]`, the minor one digit: `sm_80`, `sm_90a`, `sm_120`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a GPU architecture (expected sm_<major><minor>, e.g. sm_90 or sm_90a)")]
pub struct ArchError(String);

impl FromStr for Arch {
    type Err = ArchError;

    fn from_str(s: &str) -> Result<Arch, ArchError> {
        let bad = || ArchError(s.to_string());
        let digits = s.strip_prefix("sm_").ok_or_else(bad)?;
        let (digits, specific) = match digits.strip_suffix('a') {
            Some(d) => (d, true),
            None => (digits, false),
        };
        if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let (major, minor) = digits.split_at(digits.len() - 1);
        Ok(Arch {
            major: major.parse().map_err(|_| bad())?,
            minor: minor.parse().map_err(|_| bad())?,
            specific,
        })
    }
}

/// One kernel's resources as ptxas reported them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KernelResources {
    /// The entry function's (unmangled, `extern "C"`) name.
    pub name: String,
    pub registers: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    pub stack_bytes: u32,
    /// Static shared memory (`__shared__` arrays); dynamic shared memory is a launch parameter.
    pub shared_bytes: u32,
}

/// `axpy: 10 registers, 0 B smem, 0 B spilled (stores 0, loads 0), 0 B stack`.
impl fmt::Display for KernelResources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} registers, {} B smem, {} B spilled (stores {}, loads {}), {} B stack",
            self.name,
            self.registers,
            self.shared_bytes,
            self.spill_store_bytes + self.spill_load_bytes,
            self.spill_store_bytes,
            self.spill_load_bytes,
            self.stack_bytes
        )
    }
}

/// A compiled kernel source: the cubin, the whole program log, and each kernel's resources.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
    pub kernels: Vec<KernelResources>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("{NO_NVRTC_HELP}")]
    NoLibrary,
    #[error("kernel source {program} contains a NUL byte")]
    SourceHasNul { program: String },
    #[error("kernel source {program} failed to compile for {arch} with NVRTC:\n{log}")]
    Compile {
        program: String,
        arch: Arch,
        log: String,
    },
    #[error(
        "NVRTC could not compile {program} for {arch}: libnvrtc-builtins.so.13.0 must be on \
         LD_LIBRARY_PATH beside libnvrtc.so.13 (NVRTC's log: {log})"
    )]
    NoBuiltins {
        program: String,
        arch: Arch,
        log: String,
    },
    #[error("NVRTC's nvrtcVersion failed: {reason}")]
    Version { reason: String },
    #[error("NVRTC's {call} failed for {program}: {reason}")]
    Nvrtc {
        program: String,
        call: &'static str,
        reason: String,
    },
}

/// Destroys the NVRTC program when dropped, on every path out of [`compile`].
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the handle came from `create_program` and is destroyed only here, once.
        // A failure to free it leaks a little host memory; there is nothing better to do.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

/// Compiles `source` (a complete, header-free `.cu` program; `program` names it in messages
/// and in NVRTC's log) for `arch` with [`OPTIONS`].
pub fn compile(program: &str, source: &str, arch: Arch) -> Result<Compiled, CompileError> {
    if !library_present() {
        return Err(CompileError::NoLibrary);
    }
    let nvrtc_err = |call: &'static str| {
        move |e: result::NvrtcError| CompileError::Nvrtc {
            program: program.to_string(),
            call,
            reason: e.to_string(),
        }
    };
    let nul = |_| CompileError::SourceHasNul {
        program: program.to_string(),
    };
    let source_c = CString::new(source).map_err(nul)?;
    let name_c = CString::new(format!("{program}.cu")).map_err(nul)?;
    let prog = Program(
        result::create_program(&source_c, Some(&name_c))
            .map_err(nvrtc_err("nvrtcCreateProgram"))?,
    );

    let mut options: Vec<String> = OPTIONS.iter().map(|o| o.to_string()).collect();
    options.push(arch.option());
    // SAFETY: `prog.0` is a live program (destroyed only by the guard's drop, after the last
    // use below); the options hold no NUL byte (they are ours), which `compile_program` needs.
    let compiled = unsafe { result::compile_program(prog.0, &options) };
    // SAFETY: as above, the program is live; the log is read whether or not compilation failed.
    let log =
        unsafe { result::get_program_log(prog.0) }.map_err(nvrtc_err("nvrtcGetProgramLog"))?;
    let log = log_text(&log);
    match compiled {
        Ok(()) => {}
        Err(result::NvrtcError(sys::nvrtcResult::NVRTC_ERROR_COMPILATION)) => {
            return Err(CompileError::Compile {
                program: program.to_string(),
                arch,
                log,
            });
        }
        Err(result::NvrtcError(sys::nvrtcResult::NVRTC_ERROR_BUILTIN_OPERATION_FAILURE)) => {
            return Err(CompileError::NoBuiltins {
                program: program.to_string(),
                arch,
                log,
            });
        }
        Err(e) => return Err(nvrtc_err("nvrtcCompileProgram")(e)),
    }

    let mut size = 0usize;
    // SAFETY: the program is live and compiled; `size` is a local the call writes.
    unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) }
        .result()
        .map_err(nvrtc_err("nvrtcGetCUBINSize"))?;
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` holds exactly the `size` bytes NVRTC said the cubin takes, and NVRTC
    // writes no more than that.
    unsafe { sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr().cast()) }
        .result()
        .map_err(nvrtc_err("nvrtcGetCUBIN"))?;
    let kernels = parse_ptxas_report(&log);
    Ok(Compiled {
        cubin,
        log,
        kernels,
    })
}

/// The log NVRTC wrote, as text (it is NUL-terminated C text).
fn log_text(raw: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = raw
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Reads ptxas's `-v` report from a program log: for each entry function, the lines
/// ```text
/// ptxas info    : Compiling entry function 'axpy' for 'sm_90'
/// ptxas info    : Function properties for axpy
///     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
/// ptxas info    : Used 12 registers, used 0 barriers, 1024 bytes smem, 368 bytes cmem[0]
/// ```
/// Properties of non-entry device functions (not inlined) are reported too; they are kept out:
/// only entry functions become [`KernelResources`], in the order ptxas compiled them.
pub fn parse_ptxas_report(log: &str) -> Vec<KernelResources> {
    let mut kernels: Vec<KernelResources> = Vec::new();
    // The kernel whose report is being read, once its "Compiling entry function" line is seen.
    let mut current: Option<KernelResources> = None;
    let mut in_entry_properties = false;
    for line in log.lines() {
        let line = line.trim();
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            kernels.extend(current.take());
            let name = rest.split('\'').next().unwrap_or_default();
            current = Some(KernelResources {
                name: name.to_string(),
                ..KernelResources::default()
            });
            in_entry_properties = false;
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            in_entry_properties = current.as_ref().is_some_and(|k| k.name == rest.trim());
        } else if line.contains("ptxas info") && line.contains("Used ") {
            // Checked before the stack line: newer ptxas repeats the stack frame here.
            if let Some(k) = current.as_mut() {
                k.registers = number_before(line, "registers");
                k.shared_bytes = number_before(line, "bytes smem");
            }
        } else if line.contains("bytes stack frame") {
            if let (true, Some(k)) = (in_entry_properties, current.as_mut()) {
                k.stack_bytes = number_before(line, "bytes stack frame");
                k.spill_store_bytes = number_before(line, "bytes spill stores");
                k.spill_load_bytes = number_before(line, "bytes spill loads");
            }
        }
    }
    kernels.extend(current);
    kernels
}

/// The number written just before `unit` in `line` (`"12 registers"` → 12); 0 when absent.
fn number_before(line: &str, unit: &str) -> u32 {
    line.split(unit)
        .next()
        .filter(|_| line.contains(unit))
        .and_then(|before| before.split([' ', ',', ':']).rfind(|w| !w.is_empty()))
        .and_then(|w| w.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_parses_and_prints() {
        for s in [
            "sm_80", "sm_86", "sm_89", "sm_90", "sm_90a", "sm_120", "sm_100a",
        ] {
            let arch: Arch = s.parse().expect(s);
            assert_eq!(arch.to_string(), s);
        }
        assert_eq!(
            "sm_120".parse::<Arch>(),
            Ok(Arch {
                major: 12,
                minor: 0,
                specific: false
            })
        );
        assert_eq!(
            Arch::from_compute_capability(8, 9).option(),
            "--gpu-architecture=sm_89"
        );
        for bad in ["", "sm_", "sm_9", "compute_90", "sm_9x", "sm_90b", "sm_a"] {
            assert!(bad.parse::<Arch>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn driver_version_code_decodes() {
        assert_eq!(CudaVersion::from_driver_code(13000).to_string(), "13.0");
        assert_eq!(CudaVersion::from_driver_code(12080).to_string(), "12.8");
        assert_eq!(CudaVersion::from_driver_code(11040).to_string(), "11.4");
    }

    /// A log as NVRTC 13.0.88 writes it with `--ptxas-options=-v` (copied from a real run),
    /// with spills, stack and a non-inlined device function added to the first kernel.
    const LOG: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'tile_sum' for 'sm_90'
ptxas info    : Function properties for tile_sum
ptxas         .     16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 16 bytes stack frame, 4096 bytes smem, 368 bytes cmem[0]
ptxas info    : Function properties for helper
ptxas         .     32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compile time = 10.073 ms
ptxas info    : Compiling entry function 'axpy' for 'sm_90'
ptxas info    : Function properties for axpy
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers
ptxas info    : Compile time = 1.469 ms
";

    #[test]
    fn ptxas_report_is_read_per_entry_function() {
        let kernels = parse_ptxas_report(LOG);
        assert_eq!(
            kernels,
            vec![
                KernelResources {
                    name: "tile_sum".into(),
                    registers: 40,
                    spill_store_bytes: 8,
                    spill_load_bytes: 4,
                    stack_bytes: 16,
                    shared_bytes: 4096,
                },
                KernelResources {
                    name: "axpy".into(),
                    registers: 10,
                    ..KernelResources::default()
                },
            ]
        );
    }

    #[test]
    fn number_before_reads_the_word_before_the_unit() {
        assert_eq!(
            number_before("Used 12 registers, 4 bytes smem", "registers"),
            12
        );
        assert_eq!(
            number_before("Used 12 registers, 4 bytes smem", "bytes smem"),
            4
        );
        assert_eq!(number_before("Used 12 registers", "bytes smem"), 0);
    }
}
