// embed.cu: the embedding gather. out[t, c] = f32(table[ids[t], c]) (exact: bf16 -> f32).
// One thread per output element; ids were checked against the table by the host.

EXTERN_KERNEL void embed_bf16(GLOBAL const u16* table, GLOBAL const u32* ids, int width,
                              int total, GLOBAL float* out) {
    int i = GLOBAL_ID();
    if (i >= total) {
        return;
    }
    int t = i / width;
    int c = i - t * width;
    out[i] = bf16_to_f32(table[(i64)ids[t] * width + c]);
}
