// router.cu: the router's top-k and softmax (reference §3.6) over f32 logits [n, experts]
// (the logits come from matmul_bf16 on f32 activations). One thread per token, as the CPU
// backend's `route`: the top_k largest logits in the total order of f32 (Rust's `total_cmp`),
// ties to the lower expert id; w_j = exp(l_j - l_0) summed in descending order, each divided
// by the sum; written in ascending expert id into ids[t, ..], weights[t, ..].
//
// No per-thread array (it would live in local memory, a stack frame): pick j is the best
// expert that comes after pick j-1 in the order (logit descending, then id ascending), so only
// the previous pick is kept; the experts chosen are those at or before the last pick, written
// by one ascending scan. The order is strict and total, so every pick exists (top_k <= experts
// is the host's check) and a NaN logit cannot make an id invalid.

// The largest top_k a host launches (GPT-OSS routes to 4; each pick is one scan of the row).
#define ROUTER_MAX_TOP_K 8

// The logit as an int ordered as `f32::total_cmp` orders floats.
DEVICE int router_key(float l) {
    u32 b = f32_bits(l);
    return (int)(b ^ ((b & 0x80000000u) ? 0x7fffffffu : 0u));
}

EXTERN_KERNEL void router_top_k(GLOBAL const float* logits, int n, int experts, int top_k,
                                GLOBAL int* ids, GLOBAL float* weights) {
    int t = GLOBAL_ID();
    if (t >= n) {
        return;
    }
    GLOBAL const float* row = logits + (i64)t * experts;
    int last = -1;
    int last_key = 0;
    float max = 0.0f;
    float sum = 0.0f;
    for (int j = 0; j < top_k; j++) {
        int best = -1;
        int best_key = 0;
        for (int e = 0; e < experts; e++) {
            int key = router_key(row[e]);
            int after = last < 0 || key < last_key || (key == last_key && e > last);
            if (after && (best < 0 || key > best_key)) {
                best = e;
                best_key = key;
            }
        }
        float l = row[best];
        if (j == 0) {
            max = l;
        }
        sum = sum + EXPF(l - max);
        last = best;
        last_key = best_key;
    }
    int out = 0;
    for (int e = 0; e < experts; e++) {
        int key = router_key(row[e]);
        if (key > last_key || (key == last_key && e <= last)) {
            ids[(i64)t * top_k + out] = e;
            weights[(i64)t * top_k + out] = EXPF(row[e] - max) / sum;
            out++;
        }
    }
}
