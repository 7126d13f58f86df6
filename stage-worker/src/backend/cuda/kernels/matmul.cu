// matmul.cu: the dense bf16 product, out[t, r] = sum_k X(t, k) * W[r, k] (+ bias[r]), for the
// q/k/v projection, the output projection (added to the residual), the router and the LM head.
//
// The reduction order (the numeric contract; it does not depend on n):
// - One work-group of MM_LANES lanes per tile of MM_ROWS weight rows; it loops over the n
//   tokens. For each (t, r), lane l accumulates in f32, k = l, l + MM_LANES, ... ascending:
//   acc = acc + X(t, k) * w[r, k] (no contraction; the product of two bf16 values is exact).
// - Then a fixed tree over the lanes (tree_sum), then the bias in f32, then, if `accumulate`,
//   out[t, r] = out[t, r] + that.
// X(t, k) is x[t, k] rounded to bf16 when `round_x` (every product of activations with a
// weight matrix but the router's, whose logits are computed from f32 activations).

#define MM_LANES 32
#define MM_ROWS 4

EXTERN_KERNEL void matmul_bf16(GLOBAL const float* x, int n, int k_dim, GLOBAL const u16* w,
                               int rows, GLOBAL const u16* bias, int has_bias, int round_x,
                               int accumulate, GLOBAL float* out) {
    SHARED float sh[MM_ROWS * MM_LANES];
    int lane = LOCAL_ID();
    int row0 = GROUP_ID(0) * MM_ROWS;
    for (int t = 0; t < n; t++) {
        GLOBAL const float* xr = x + (i64)t * k_dim;
        float acc[MM_ROWS];
        for (int r = 0; r < MM_ROWS; r++) {
            acc[r] = 0.0f;
        }
        for (int k = lane; k < k_dim; k += MM_LANES) {
            float xv = xr[k];
            if (round_x) {
                xv = round_bf16(xv);
            }
            for (int r = 0; r < MM_ROWS; r++) {
                // Rows past the end (last tile) read row rows - 1 and are not written.
                int row = row0 + r < rows ? row0 + r : rows - 1;
                acc[r] = acc[r] + xv * bf16_to_f32(w[(i64)row * k_dim + k]);
            }
        }
        for (int r = 0; r < MM_ROWS; r++) {
            sh[r * MM_LANES + lane] = acc[r];
        }
        BARRIER();
        for (int s = MM_LANES / 2; s > 0; s >>= 1) {
            if (lane < s) {
                for (int r = 0; r < MM_ROWS; r++) {
                    sh[r * MM_LANES + lane] = sh[r * MM_LANES + lane] + sh[r * MM_LANES + lane + s];
                }
            }
            BARRIER();
        }
        if (lane < MM_ROWS && row0 + lane < rows) {
            int row = row0 + lane;
            float v = sh[lane * MM_LANES];
            if (has_bias) {
                v = v + bf16_to_f32(bias[row]);
            }
            i64 o = (i64)t * rows + row;
            out[o] = accumulate ? out[o] + v : v;
        }
        BARRIER();
    }
}
