//! Unit tests of the kernel backend's host side: the launch shapes it uses are the ones the
//! kernel sources were written for, and the sources are complete in both dialects (the
//! operations themselves are tested in `tests/backend_ops.rs`).

use super::runtime::*;
use crate::backend::cuda::kernels::{cuda_source, opencl_source, Kernel, ALL};

fn source(name: &str) -> &'static Kernel {
    ALL.iter()
        .find(|k| k.name == name)
        .unwrap_or_else(|| panic!("no kernel source {name}"))
}

/// The value of `#define NAME value` in a kernel body.
fn define(k: &Kernel, name: &str) -> usize {
    let prefix = format!("#define {name} ");
    let line = k
        .body
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{}: no #define {name}", k.name));
    line.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: #define {name} {line}: {e}", k.name))
}

#[test]
fn launch_shapes_match_the_kernel_sources() {
    let cases = [
        ("norm", "NORM_LANES", NORM_LANES),
        ("matmul", "MM_LANES", MM_LANES),
        ("matmul", "MM_ROWS", MM_ROWS),
        ("rope", "ROPE_LANES", ROPE_LANES),
        ("attention", "ATTN_LANES", ATTN_LANES),
        ("attention", "ATTN_MAX_HEAD_DIM", ATTN_MAX_HEAD_DIM),
        ("router", "ROUTER_MAX_TOP_K", ROUTER_MAX_TOP_K),
        ("moe", "MOE_LANES", MOE_LANES),
        ("moe", "MOE_ROWS", MOE_ROWS),
    ];
    for (file, name, host) in cases {
        assert_eq!(define(source(file), name), host, "{file}: {name}");
    }
    // The attention tile is one key per lane; the tree reductions need powers of two.
    assert_eq!(define(source("attention"), "ATTN_TILE"), ATTN_LANES);
    for lanes in [NORM_LANES, MM_LANES, ATTN_LANES, MOE_LANES] {
        assert!(lanes.is_power_of_two());
    }
}

/// The MXFP4 constants the host's repack and the kernels share.
#[test]
fn mxfp4_constants_match_the_repack() {
    let moe = source("moe").body;
    let max = super::mxfp4_repack::MAX_SCALE;
    assert!(moe.contains(&format!("#define MXFP4_MAX_SCALE {max}u\n")));
    assert!(moe.contains("#define MXFP4_MASK 0x81C00000u\n"));
    // 2^(s-65) for the largest scale is the largest finite power of two.
    assert_eq!(super::mxfp4_repack::block_factor(max), 2f32.powi(127));
    assert_eq!(super::mxfp4_repack::block_factor(0), 2f32.powi(-65));
}

#[test]
fn sources_are_header_free_and_name_their_dialect() {
    for k in ALL {
        assert!(!k.body.contains("#include"), "{} includes a header", k.name);
        assert!(cuda_source(k).starts_with("#define GPTOSSD_CUDA\n"));
        let cl = opencl_source(k);
        assert!(cl.starts_with("#define GPTOSSD_OPENCL\n#pragma OPENCL FP_CONTRACT OFF\n"));
        assert!(cl.contains("EXTERN_KERNEL"), "{} has no kernel", k.name);
    }
}
