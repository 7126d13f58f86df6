//! The CUDA backend's kernel sources, written once for two compilers: NVRTC (CUDA C++, on a
//! GPU) and OpenCL C (PoCL on the CPU in CI, through the OpenCL test backend), so the logic a
//! GPU runs is the logic CI tests.
//!
//! What this module owns: `prelude.h` (the macros that map the two dialects: kernel decorator,
//! address spaces, indices, shared memory, barriers, bit casts, bf16 conversions, fixed-tree
//! reductions), one `.cu` file per operation family, and the two ways of turning a [`Kernel`]
//! into a complete source ([`cuda_source`], [`opencl_source`]).
//!
//! Invariants every kernel keeps (cuda-notes §3, §5; the `Backend` contract):
//! - Batch invariance by construction: every output element is reduced by one work-group (or
//!   one thread) in an order fixed by its own row and the weights, never by the number of rows
//!   or tokens; no float atomics; reductions are fixed trees in shared memory.
//! - Numerics: matrix inputs rounded to bf16 (round to nearest even), f32 accumulation, f32
//!   bias; norms, RoPE, softmax, router, SwiGLU in f32; the KV pool bf16; MXFP4 decoded
//!   exactly; attention over key tiles aligned to absolute positions, merged in ascending
//!   order, the sink last, one code path for decode and prefill; experts summed in ascending
//!   expert id.
//! - No contraction: NVRTC is run with `--fmad=false`, OpenCL with `FP_CONTRACT OFF`.
//! - Header-free: no `#include` of a system header, so NVRTC needs no include path.
//!
//! Launch shapes (work-group sizes, rows per tile) are `#define`s at the top of each `.cu` file
//! (`NORM_LANES`, `MM_LANES`, ...); a host that launches them must use the same values.

/// One kernel source file: its name and its body (without the prelude).
#[derive(Debug, Clone, Copy)]
pub struct Kernel {
    pub name: &'static str,
    pub body: &'static str,
}

/// The dialect-mapping header, prepended to every body.
const PRELUDE: &str = include_str!("prelude.h");

/// Every kernel source of the backend, one per operation family.
pub const ALL: &[Kernel] = &[
    Kernel {
        name: "embed",
        body: include_str!("embed.cu"),
    },
    Kernel {
        name: "norm",
        body: include_str!("norm.cu"),
    },
    Kernel {
        name: "matmul",
        body: include_str!("matmul.cu"),
    },
    Kernel {
        name: "rope",
        body: include_str!("rope.cu"),
    },
    Kernel {
        name: "attention",
        body: include_str!("attention.cu"),
    },
    Kernel {
        name: "router",
        body: include_str!("router.cu"),
    },
    Kernel {
        name: "moe",
        body: include_str!("moe.cu"),
    },
];

/// The complete NVRTC source of `k`: CUDA dialect, prelude, body (no include needed).
pub fn cuda_source(k: &Kernel) -> String {
    format!("#define GPTOSSD_CUDA\n{PRELUDE}\n{}", k.body)
}

/// The complete OpenCL C source of `k`: OpenCL dialect, no contraction, prelude, body.
pub fn opencl_source(k: &Kernel) -> String {
    format!(
        "#define GPTOSSD_OPENCL\n#pragma OPENCL FP_CONTRACT OFF\n{PRELUDE}\n{}",
        k.body
    )
}
