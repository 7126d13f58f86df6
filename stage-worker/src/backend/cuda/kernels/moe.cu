// moe.cu: the mixture of experts (reference §3.7) over MXFP4 weights, in three kernels:
//   moe_gate_up_swiglu: act[s, j] = swiglu(gate_up_e . bf16(x[t]) + bias) for each route slot
//                       s = t*top_k + i (expert e = ids[s]);
//   moe_down:           routed[s, d] = down_e . bf16(act[s]) + bias;
//   moe_combine:        residual[t, d] += sum_i weights[t, i] * routed[t*top_k + i, d], i
//                       ascending (routes are sorted by expert id, so: ascending expert id).
//
// The products keep matmul.cu's order (MOE_LANES lanes striding k, a fixed tree, the bias)
// with one work-group per (tile of MOE_ROWS rows, route slot): a slot's bits depend on its
// token's row and its expert only, never on which other tokens chose that expert.
//
// MXFP4 (layout: gptossd_shared::mxfp4): row r of an expert holds k_dim/32 blocks of 16 bytes;
// byte b of block g has element 32g+2b in its low nibble, 32g+2b+1 in its high one; one E8M0
// scale byte per block. Decoded exactly: E2M1 value * 2^(s-127) (s = 0: 2^-127, subnormal).

#define MOE_LANES 32
#define MOE_ROWS 4
#define SWIGLU_ALPHA 1.702f

// The E2M1 value of a nibble (bit 3 the sign): exact.
DEVICE float fp4_value(u32 nib) {
    u32 e = (nib >> 1) & 3u;
    float m = (float)(nib & 1u);
    float mag = e == 0u ? 0.5f * m : (2.0f + m) * 0.25f * (float)(1u << e);
    return (nib & 8u) ? -mag : mag;
}

// The E8M0 scale byte as 2^(s-127).
DEVICE float e8m0_value(u32 s) {
    return s == 0u ? bits_f32(0x00400000u) : bits_f32(s << 23);
}

// Element k of row `row` (counted over all experts) of an MXFP4 matrix with k_dim columns.
DEVICE float mxfp4_weight(GLOBAL const u8* blocks, GLOBAL const u8* scales, i64 row, int k_dim,
                          int k) {
    u32 byte = blocks[row * (k_dim / 2) + k / 2];
    u32 nib = (k & 1) ? (byte >> 4) : (byte & 15u);
    u32 s = scales[row * (k_dim / 32) + k / 32];
    return fp4_value(nib) * e8m0_value(s);
}

// Partial dot products of MOE_ROWS rows (row0.., of expert e of a [experts, rows, k_dim]
// matrix) with bf16(x), reduced by the fixed tree into sh[r * MOE_LANES]. Rows past `rows`
// read row rows - 1 (their result is not used).
DEVICE void mxfp4_tile(GLOBAL const float* x, GLOBAL const u8* blocks, GLOBAL const u8* scales,
                       int e, int rows, int k_dim, int row0, LOCAL float* sh) {
    int lane = LOCAL_ID();
    float acc[MOE_ROWS];
    for (int r = 0; r < MOE_ROWS; r++) {
        acc[r] = 0.0f;
    }
    for (int k = lane; k < k_dim; k += MOE_LANES) {
        float xv = round_bf16(x[k]);
        for (int r = 0; r < MOE_ROWS; r++) {
            int row = row0 + r < rows ? row0 + r : rows - 1;
            acc[r] = acc[r] + xv * mxfp4_weight(blocks, scales, (i64)e * rows + row, k_dim, k);
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

// Grid: (ceil(2*inter / MOE_ROWS), slots). gate_up rows are interleaved: 2j gate, 2j+1 up.
EXTERN_KERNEL void moe_gate_up_swiglu(GLOBAL const float* x, int hidden, GLOBAL const int* ids,
                                      int top_k, GLOBAL const u8* blocks,
                                      GLOBAL const u8* scales, GLOBAL const u16* bias,
                                      int inter, float limit, GLOBAL float* act) {
    SHARED float sh[MOE_ROWS * MOE_LANES];
    int lane = LOCAL_ID();
    int slot = GROUP_ID(1);
    int e = ids[slot];
    int rows = 2 * inter;
    int row0 = GROUP_ID(0) * MOE_ROWS;
    mxfp4_tile(x + (i64)(slot / top_k) * hidden, blocks, scales, e, rows, hidden, row0, sh);
    int j = row0 / 2 + lane;
    if (lane < MOE_ROWS / 2 && j < inter) {
        float gate = sh[(2 * lane) * MOE_LANES] + bf16_to_f32(bias[(i64)e * rows + 2 * j]);
        float up = sh[(2 * lane + 1) * MOE_LANES] + bf16_to_f32(bias[(i64)e * rows + 2 * j + 1]);
        gate = MINF(gate, limit);
        up = MINF(MAXF(up, -limit), limit);
        float glu = gate * (1.0f / (1.0f + EXPF(-(gate * SWIGLU_ALPHA))));
        act[(i64)slot * inter + j] = (up + 1.0f) * glu;
    }
}

// Grid: (ceil(hidden / MOE_ROWS), slots).
EXTERN_KERNEL void moe_down(GLOBAL const float* act, int inter, GLOBAL const int* ids,
                            GLOBAL const u8* blocks, GLOBAL const u8* scales,
                            GLOBAL const u16* bias, int hidden, GLOBAL float* routed) {
    SHARED float sh[MOE_ROWS * MOE_LANES];
    int lane = LOCAL_ID();
    int slot = GROUP_ID(1);
    int e = ids[slot];
    int row0 = GROUP_ID(0) * MOE_ROWS;
    mxfp4_tile(act + (i64)slot * inter, blocks, scales, e, hidden, inter, row0, sh);
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
