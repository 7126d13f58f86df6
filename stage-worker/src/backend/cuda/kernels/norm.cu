// norm.cu: RMSNorm (reference §3.3) in f32, out = w * (x * 1/sqrt(mean(x^2) + eps)).
//
// One work-group of NORM_LANES lanes per row: lane l sums x[c]^2 for c = l, l + NORM_LANES, ...
// in ascending c, then a fixed tree over the lanes. A row's bits depend on nothing but the row.

#define NORM_LANES 64

DEVICE void rms_norm_row(GLOBAL const float* x, GLOBAL const u16* w, float eps, int width,
                         GLOBAL float* out, LOCAL float* sh) {
    int lane = LOCAL_ID();
    float acc = 0.0f;
    for (int c = lane; c < width; c += NORM_LANES) {
        float v = x[c];
        acc = acc + v * v;
    }
    sh[lane] = acc;
    BARRIER();
    tree_sum(sh, NORM_LANES);
    float inv = 1.0f / SQRTF(sh[0] / (float)width + eps);
    for (int c = lane; c < width; c += NORM_LANES) {
        out[c] = bf16_to_f32(w[c]) * (x[c] * inv);
    }
}

// Row GROUP_ID(0) of x into the same row of out.
EXTERN_KERNEL void rms_norm(GLOBAL const float* x, GLOBAL const u16* w, float eps, int width,
                            GLOBAL float* out) {
    SHARED float sh[NORM_LANES];
    i64 row = GROUP_ID(0);
    rms_norm_row(x + row * width, w, eps, width, out + row * width, sh);
}

// Row rows[GROUP_ID(0)] of x into row GROUP_ID(0) of out (the rows that want logits).
EXTERN_KERNEL void rms_norm_gather(GLOBAL const float* x, GLOBAL const int* rows,
                                   GLOBAL const u16* w, float eps, int width,
                                   GLOBAL float* out) {
    SHARED float sh[NORM_LANES];
    i64 dst = GROUP_ID(0);
    i64 src = rows[dst];
    rms_norm_row(x + src * width, w, eps, width, out + dst * width, sh);
}
