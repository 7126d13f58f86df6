// rope.cu: the epilogue of the q/k/v projection. qkv holds, per token, [q | k | v] (widths
// q_dim, kv_dim, kv_dim) with biases added; this rotates q and k by RoPE (reference §3.4,
// half-split pairs i and i + head_dim/2 of each head) in f32 with the host's cos/sin rows of the
// token's position (`cos_rows`, `sin_rows`: [token][head_dim/2], concentration included),
// writes q, and stores k and v as bf16 into the KV pool at row kv_row[t] (no store if < 0).
//
// One work-group of ROPE_LANES lanes per token; each output element is computed once, from
// its own token's values only: x1 * c - x2 * s and x2 * c + x1 * s, as the CPU backend does.

#define ROPE_LANES 64

EXTERN_KERNEL void rope_store(GLOBAL const float* qkv, int q_dim, int kv_dim, int head_dim,
                              GLOBAL const float* cos_rows, GLOBAL const float* sin_rows,
                              GLOBAL const i64* kv_row, GLOBAL float* q,
                              GLOBAL u16* k_cache, GLOBAL u16* v_cache) {
    int lane = LOCAL_ID();
    i64 t = GROUP_ID(0);
    int half_d = head_dim / 2;
    GLOBAL const float* src = qkv + t * (q_dim + 2 * kv_dim);
    GLOBAL const float* c = cos_rows + t * half_d;
    GLOBAL const float* s = sin_rows + t * half_d;
    i64 row = kv_row[t];
    for (int i = lane; i < q_dim / 2; i += ROPE_LANES) {
        int base = (i / half_d) * head_dim + i % half_d;
        float x1 = src[base];
        float x2 = src[base + half_d];
        float cv = c[i % half_d];
        float sv = s[i % half_d];
        q[t * q_dim + base] = x1 * cv - x2 * sv;
        q[t * q_dim + base + half_d] = x2 * cv + x1 * sv;
    }
    if (row < 0) {
        return;
    }
    GLOBAL const float* k = src + q_dim;
    GLOBAL const float* v = src + q_dim + kv_dim;
    for (int i = lane; i < kv_dim / 2; i += ROPE_LANES) {
        int base = (i / half_d) * head_dim + i % half_d;
        float x1 = k[base];
        float x2 = k[base + half_d];
        float cv = c[i % half_d];
        float sv = s[i % half_d];
        k_cache[row * kv_dim + base] = f32_to_bf16(x1 * cv - x2 * sv);
        k_cache[row * kv_dim + base + half_d] = f32_to_bf16(x2 * cv + x1 * sv);
    }
    for (int i = lane; i < kv_dim; i += ROPE_LANES) {
        v_cache[row * kv_dim + i] = f32_to_bf16(v[i]);
    }
}
