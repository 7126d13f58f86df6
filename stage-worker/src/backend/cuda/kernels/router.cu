// router.cu: the router's top-k and softmax (reference §3.6) over f32 logits [n, experts]
// (the logits come from matmul_bf16 on f32 activations). One thread per token: the top_k
// largest logits, ties to the lower expert id (a strict > over ascending ids), in descending
// order; w_j = exp(l_j - l_0) summed in that order, each divided by the sum; then sorted by
// ascending expert id into ids[t, ..], weights[t, ..]. As the CPU backend's `route`.

#define ROUTER_MAX_TOP_K 8

EXTERN_KERNEL void router_top_k(GLOBAL const float* logits, int n, int experts, int top_k,
                                GLOBAL int* ids, GLOBAL float* weights) {
    int t = GLOBAL_ID();
    if (t >= n) {
        return;
    }
    GLOBAL const float* row = logits + (i64)t * experts;
    int id[ROUTER_MAX_TOP_K];
    float w[ROUTER_MAX_TOP_K];
    for (int j = 0; j < top_k; j++) {
        int best = -1;
        float best_l = 0.0f;
        for (int e = 0; e < experts; e++) {
            int taken = 0;
            for (int i = 0; i < j; i++) {
                taken = taken || id[i] == e;
            }
            if (!taken && (best < 0 || row[e] > best_l)) {
                best = e;
                best_l = row[e];
            }
        }
        id[j] = best;
        w[j] = best_l;
    }
    float max = w[0];
    float sum = 0.0f;
    for (int j = 0; j < top_k; j++) {
        w[j] = EXPF(w[j] - max);
        sum = sum + w[j];
    }
    for (int j = 0; j < top_k; j++) {
        w[j] = w[j] / sum;
    }
    // Insertion sort by expert id (ids are distinct).
    for (int j = 1; j < top_k; j++) {
        int ij = id[j];
        float wj = w[j];
        int i = j - 1;
        while (i >= 0 && id[i] > ij) {
            id[i + 1] = id[i];
            w[i + 1] = w[i];
            i--;
        }
        id[i + 1] = ij;
        w[i + 1] = wj;
    }
    for (int j = 0; j < top_k; j++) {
        ids[(i64)t * top_k + j] = id[j];
        weights[(i64)t * top_k + j] = w[j];
    }
}
