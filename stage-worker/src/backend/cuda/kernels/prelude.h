// prelude.h: the one header every kernel of gptossd's CUDA backend is compiled with, so that
// the same source is CUDA C++ for NVRTC (`GPTOSSD_CUDA`) and OpenCL C for PoCL in CI
// (`GPTOSSD_OPENCL`). It owns the mapping of: the kernel decorator, address-space qualifiers,
// work-group (block) and work-item (thread) indices, shared memory, barriers, bit casts, the f32
// math the kernels use (`FMAF`: one rounding, IEEE fma in both dialects), 4-wide vectors
// (`u32x4`, `f32x4`: `.x .y .z .w`), and the bf16 <-> f32 conversions.
//
// Invariants:
// - No system header is included (NVRTC needs no include path; OpenCL C has none).
// - Both forms compile without contraction: NVRTC with `--fmad=false`, OpenCL with
//   `#pragma OPENCL FP_CONTRACT OFF` (added by `opencl_source`), so `a * b + c` rounds twice on
//   both and a kernel's arithmetic is what its source says.
// - Only 1-D work-groups are used; grids may be 2-D (GROUP_ID(0), GROUP_ID(1)).
// - Reductions go through shared memory in fixed trees (no warp shuffles, no float atomics), so
//   nothing here depends on the warp width of the device.

#if defined(GPTOSSD_CUDA)

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define EXTERN_KERNEL extern "C" __global__
#define DEVICE static __device__ __forceinline__
#define GLOBAL
#define LOCAL
#define SHARED __shared__
#define BARRIER() __syncthreads()
#define LOCAL_ID() ((int)threadIdx.x)
#define LOCAL_SIZE() ((int)blockDim.x)
#define GROUP_ID(d) ((int)((d) == 0 ? blockIdx.x : blockIdx.y))
#define GLOBAL_ID() ((int)(blockIdx.x * blockDim.x + threadIdx.x))

DEVICE float bits_f32(u32 b) { return __uint_as_float(b); }
DEVICE u32 f32_bits(float f) { return __float_as_uint(f); }
typedef uint4 u32x4;
typedef float4 f32x4;
#define EXPF(x) expf(x)
#define FMAF(a, b, c) fmaf((a), (b), (c))
#define SQRTF(x) sqrtf(x)
#define MAXF(a, b) fmaxf((a), (b))
#define MINF(a, b) fminf((a), (b))

#elif defined(GPTOSSD_OPENCL)

typedef uchar u8;
typedef ushort u16;
typedef uint u32;
typedef long i64;

#define EXTERN_KERNEL __kernel
#define DEVICE static inline
#define GLOBAL __global
#define LOCAL __local
#define SHARED __local
#define BARRIER() barrier(CLK_LOCAL_MEM_FENCE | CLK_GLOBAL_MEM_FENCE)
#define LOCAL_ID() ((int)get_local_id(0))
#define LOCAL_SIZE() ((int)get_local_size(0))
#define GROUP_ID(d) ((int)get_group_id(d))
#define GLOBAL_ID() ((int)get_global_id(0))

DEVICE float bits_f32(u32 b) { return as_float(b); }
DEVICE u32 f32_bits(float f) { return as_uint(f); }
typedef uint4 u32x4;
typedef float4 f32x4;
#define EXPF(x) exp(x)
#define FMAF(a, b, c) fma((a), (b), (c))
#define SQRTF(x) sqrt(x)
#define MAXF(a, b) fmax((a), (b))
#define MINF(a, b) fmin((a), (b))

#else
#error "define GPTOSSD_CUDA or GPTOSSD_OPENCL"
#endif

#define NEG_INF_F32 (bits_f32(0xff800000u))

// A bf16 value (raw bits) as f32: exact.
DEVICE float bf16_to_f32(u16 b) { return bits_f32(((u32)b) << 16); }

// f32 -> bf16 bits, round to nearest even; a NaN stays a (quiet) NaN.
DEVICE u16 f32_to_bf16(float f) {
    u32 b = f32_bits(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((b >> 16) | 0x40u);
    }
    b += 0x7fffu + ((b >> 16) & 1u);
    return (u16)(b >> 16);
}

// f32 rounded to the nearest bf16 (ties to even), as f32: how activations enter a product.
DEVICE float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

// sh[0] = sh[0] + ... + sh[n-1] by a fixed tree (n a power of two, n <= LOCAL_SIZE()): at each
// level lane i < s adds sh[i + s]. Every lane of the work-group must call it (it has barriers);
// sh[0] is visible to all lanes on return.
DEVICE void tree_sum(LOCAL float* sh, int n) {
    int lane = LOCAL_ID();
    for (int s = n / 2; s > 0; s >>= 1) {
        if (lane < s) {
            sh[lane] = sh[lane] + sh[lane + s];
        }
        BARRIER();
    }
}

// As tree_sum, with max.
DEVICE void tree_max(LOCAL float* sh, int n) {
    int lane = LOCAL_ID();
    for (int s = n / 2; s > 0; s >>= 1) {
        if (lane < s) {
            sh[lane] = MAXF(sh[lane], sh[lane + s]);
        }
        BARRIER();
    }
}
