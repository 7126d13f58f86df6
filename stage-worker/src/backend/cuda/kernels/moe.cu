// moe.cu: the mixture of experts (reference §3.7) over MXFP4 weights, in four kernels:
//   moe_prep_x:         xq = the GEMV input form of x (below), once per token;
//   moe_gate_up_swiglu: act[s, j] = swiglu(gate_up_e . bf16(x[t]) + bias) for each route slot
//                       s = t*top_k + i (expert e = ids[s]), written in the input form;
//   moe_down:           routed[s, d] = down_e . bf16(act[s]) + bias;
//   moe_combine:        residual[t, d] += sum_i weights[t, i] * routed[t*top_k + i, d], i
//                       ascending (routes are sorted by expert id, so: ascending expert id).
//
// One work-group of MOE_LANES lanes per (tile of MOE_ROWS rows, route slot): a slot's bits
// depend on its token's row and its expert only, never on which other tokens chose that expert.
//
// Weights: the host's repack (backend/gpu/mxfp4_repack.rs) keeps the checkpoint's order of
// rows and 32-element blocks, 16 bytes per block, and one E8M0 scale byte per block (at most
// MXFP4_MAX_SCALE); within a block, word q (of 4) holds elements 8q..8q+7 with their bits
// placed so that mxfp4_word turns each into an f32 with 2 to 4 integer operations (20 per word): the
// E2M1 code's exponent bits become the f32 exponent field's low bits and its mantissa bit the
// f32 mantissa's top bit, so the f32 is exactly value * 2^-126 (code 0.5 a subnormal, 0 a zero).
//
// Input form: xq = bf16(x) * 2^64 (exact for |x| < 2^64; beyond, inf: no activation of a working
// model comes near), stored per block in 8 chunks of 4: chunk q of
// block g (elements 32g+4q..32g+4q+3) is f32x4 number q * blocks + g, so the 32 lanes of a
// work-group read consecutive chunks.
//
// Order of a row's dot product: lane l takes blocks l, l + MOE_LANES, ... ascending; in a
// block it sums the 32 products in ascending element order into p by fma (each product
// xq * w is exact: 8 x 2 significant bits), then acc = fma(p, 2^(s-65), acc) (the block's
// scale, with the 2^64 of xq and the 2^-126 of the code taken out: exact up to rounding of
// the sum); the lanes' acc are summed by the fixed tree, then the bias is added.

#define MOE_LANES 32
#define MOE_ROWS 4
#define SWIGLU_ALPHA 1.702f
// The largest E8M0 scale byte the kernels take (2^65): 2^(s-65) must be a normal f32.
#define MXFP4_MAX_SCALE 192u
// The f32 exponent-and-sign mask the decoded codes land in: sign 31, exponent 24..23, mantissa 22.
#define MXFP4_MASK 0x81C00000u

// xq's scale factor, 2^64.
#define XQ_SCALE (bits_f32(0x5f800000u))

// The index (in floats) of element k of a row of xq with k_dim elements.
DEVICE int xq_index(int k, int k_dim) {
    int g = k >> 5;
    int w = k & 31;
    return (((w >> 2) * (k_dim >> 5) + g) << 2) + (w & 3);
}

// p += the 8 products of one repacked word's elements with xq[0..8) (two chunks), ascending.
DEVICE float mxfp4_word(u32 w, f32x4 a, f32x4 b, float p) {
    p = FMAF(a.x, bits_f32((w << 22) & MXFP4_MASK), p);
    p = FMAF(a.y, bits_f32((w << 19) & MXFP4_MASK), p);
    p = FMAF(a.z, bits_f32((w << 16) & MXFP4_MASK), p);
    p = FMAF(a.w, bits_f32((w << 6) & MXFP4_MASK), p);
    p = FMAF(b.x, bits_f32((w << 2) & MXFP4_MASK), p);
    p = FMAF(b.y, bits_f32(((w << 12) & 0x80C00000u) | (w & 0x01000000u)), p);
    p = FMAF(b.z, bits_f32(((w << 9) & 0x00C00000u) | ((w << 1) & 0x81000000u)), p);
    p = FMAF(b.w, bits_f32(((w >> 4) & 0x01C00000u) | (w & 0x80000000u)), p);
    return p;
}

// Partial dot products of MOE_ROWS rows (row0.., of expert e of a [experts, rows, k_dim]
// matrix) with xq (one token's input form), reduced by the fixed tree into sh[r * MOE_LANES].
// Rows past `rows` read row rows - 1 (their result is not used).
DEVICE void mxfp4_tile(GLOBAL const f32x4* xq, GLOBAL const u32x4* blocks,
                       GLOBAL const u8* scales, int e, int rows, int k_dim, int row0,
                       LOCAL float* sh) {
    int lane = LOCAL_ID();
    int nblk = k_dim >> 5;
    float acc[MOE_ROWS];
    i64 base[MOE_ROWS];
    for (int r = 0; r < MOE_ROWS; r++) {
        acc[r] = 0.0f;
        int row = row0 + r < rows ? row0 + r : rows - 1;
        base[r] = ((i64)e * rows + row) * nblk;
    }
    for (int g = lane; g < nblk; g += MOE_LANES) {
        f32x4 x0 = xq[g];
        f32x4 x1 = xq[nblk + g];
        f32x4 x2 = xq[2 * nblk + g];
        f32x4 x3 = xq[3 * nblk + g];
        f32x4 x4 = xq[4 * nblk + g];
        f32x4 x5 = xq[5 * nblk + g];
        f32x4 x6 = xq[6 * nblk + g];
        f32x4 x7 = xq[7 * nblk + g];
        for (int r = 0; r < MOE_ROWS; r++) {
            u32x4 w = blocks[base[r] + g];
            u32 s = scales[base[r] + g];
            float p = mxfp4_word(w.x, x0, x1, 0.0f);
            p = mxfp4_word(w.y, x2, x3, p);
            p = mxfp4_word(w.z, x4, x5, p);
            p = mxfp4_word(w.w, x6, x7, p);
            acc[r] = FMAF(p, bits_f32((s + 62u) << 23), acc[r]);
        }
    }
    for (int r = 0; r < MOE_ROWS; r++) {
        sh[r * MOE_LANES + lane] = acc[r];
    }
    BARRIER();
    for (int s = MOE_LANES / 2; s > 0; s >>= 1) {
        if (lane < s) {
            for (int r = 0; r < MOE_ROWS; r++) {
                sh[r * MOE_LANES + lane] = sh[r * MOE_LANES + lane] + sh[r * MOE_LANES + lane + s];
            }
        }
        BARRIER();
    }
}

// One thread per element of x [n, k_dim]: xq = its input form.
EXTERN_KERNEL void moe_prep_x(GLOBAL const float* x, int k_dim, int total, GLOBAL float* xq) {
    int i = GLOBAL_ID();
    if (i >= total) {
        return;
    }
    int t = i / k_dim;
    int k = i - t * k_dim;
    xq[(i64)t * k_dim + xq_index(k, k_dim)] = round_bf16(x[i]) * XQ_SCALE;
}

// Grid: (ceil(2*inter / MOE_ROWS), slots). gate_up rows are interleaved: 2j gate, 2j+1 up.
// xq: the input form of x [n, hidden]; act: the input form of the activations [slots, inter].
EXTERN_KERNEL void moe_gate_up_swiglu(GLOBAL const float* xq, int hidden, GLOBAL const int* ids,
                                      int top_k, GLOBAL const u32* blocks,
                                      GLOBAL const u8* scales, GLOBAL const u16* bias,
                                      int inter, float limit, GLOBAL float* act) {
    SHARED float sh[MOE_ROWS * MOE_LANES];
    int lane = LOCAL_ID();
    int slot = GROUP_ID(1);
    int e = ids[slot];
    int rows = 2 * inter;
    int row0 = GROUP_ID(0) * MOE_ROWS;
    mxfp4_tile((GLOBAL const f32x4*)(xq + (i64)(slot / top_k) * hidden),
               (GLOBAL const u32x4*)blocks, scales, e, rows, hidden, row0, sh);
    int j = row0 / 2 + lane;
    if (lane < MOE_ROWS / 2 && j < inter) {
        float gate = sh[(2 * lane) * MOE_LANES] + bf16_to_f32(bias[(i64)e * rows + 2 * j]);
        float up = sh[(2 * lane + 1) * MOE_LANES] + bf16_to_f32(bias[(i64)e * rows + 2 * j + 1]);
        gate = MINF(gate, limit);
        up = MINF(MAXF(up, -limit), limit);
        float glu = gate * (1.0f / (1.0f + EXPF(-(gate * SWIGLU_ALPHA))));
        float a = (up + 1.0f) * glu;
        act[(i64)slot * inter + xq_index(j, inter)] = round_bf16(a) * XQ_SCALE;
    }
}

// Grid: (ceil(hidden / MOE_ROWS), slots). act: the input form of the activations.
EXTERN_KERNEL void moe_down(GLOBAL const float* act, int inter, GLOBAL const int* ids,
                            GLOBAL const u32* blocks, GLOBAL const u8* scales,
                            GLOBAL const u16* bias, int hidden, GLOBAL float* routed) {
    SHARED float sh[MOE_ROWS * MOE_LANES];
    int lane = LOCAL_ID();
    int slot = GROUP_ID(1);
    int e = ids[slot];
    int row0 = GROUP_ID(0) * MOE_ROWS;
    mxfp4_tile((GLOBAL const f32x4*)(act + (i64)slot * inter), (GLOBAL const u32x4*)blocks,
               scales, e, hidden, inter, row0, sh);
    int d = row0 + lane;
    if (lane < MOE_ROWS && d < hidden) {
        routed[(i64)slot * hidden + d] = sh[lane * MOE_LANES] + bf16_to_f32(bias[(i64)e * hidden + d]);
    }
}

// One thread per residual element.
EXTERN_KERNEL void moe_combine(GLOBAL const float* routed, GLOBAL const float* weights,
                               int top_k, int hidden, int total, GLOBAL float* residual) {
    int i = GLOBAL_ID();
    if (i >= total) {
        return;
    }
    i64 t = i / hidden;
    int d = i - (int)t * hidden;
    float acc = 0.0f;
    for (int j = 0; j < top_k; j++) {
        i64 slot = t * top_k + j;
        acc = acc + weights[slot] * routed[slot * hidden + d];
    }
    residual[i] = residual[i] + acc;
}
