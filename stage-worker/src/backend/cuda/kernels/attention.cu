// attention.cu: grouped-query attention with learned sinks (reference §3.5) over the paged
// bf16 KV pool, one code path for decode and prefill.
//
// One work-group of ATTN_LANES lanes per (query head, token): GROUP_ID(0) is the head,
// GROUP_ID(1) the token. The token attends to positions lo..=pos of its own sequence (lo from
// the window). Keys are visited in tiles of ATTN_TILE positions aligned to absolute positions
// (tile j covers j*ATTN_TILE ..), in ascending order; per tile, lane i takes position
// tile + i: score = (sum_d q_d * k_d, d ascending) * scale with q rounded to bf16; the tile's
// max and sum by fixed trees; p rounded to bf16 for the p*v sum (lane d: positions ascending).
// Tile partials (m, l, acc) merge into the running ones in ascending tile order from
// (-inf, 0, 0); the sink merges last as (m = sink, l = 1, acc = 0). A token's result depends
// only on its query, its position and its sequence's KV: not on the step's other tokens, on
// how the prompt was chunked, or on the batch.

#define ATTN_LANES 64
#define ATTN_TILE 64
#define ATTN_MAX_HEAD_DIM 64

EXTERN_KERNEL void attention(GLOBAL const float* q, GLOBAL const u16* k_cache,
                             GLOBAL const u16* v_cache, GLOBAL const u16* sinks, int q_heads,
                             int kv_heads, int head_dim, int window,
                             GLOBAL const int* tok_pos, GLOBAL const int* tok_table,
                             GLOBAL const int* tables, int block_size, i64 layer_rows,
                             GLOBAL float* out) {
    SHARED float qs[ATTN_MAX_HEAD_DIM];
    SHARED float red[ATTN_LANES];
    SHARED float ps[ATTN_TILE];
    SHARED i64 rows[ATTN_TILE];
    int lane = LOCAL_ID();
    int head = GROUP_ID(0);
    i64 t = GROUP_ID(1);
    int d = head_dim;
    int kv_dim = kv_heads * d;
    int kvh = head / (q_heads / kv_heads);
    int pos = tok_pos[t];
    int lo = window > 0 && pos + 1 > window ? pos + 1 - window : 0;
    GLOBAL const int* table = tables + tok_table[t];
    float scale = 1.0f / SQRTF((float)d);
    if (lane < d) {
        qs[lane] = round_bf16(q[t * q_heads * d + head * d + lane]);
    }
    BARRIER();
    float m = NEG_INF_F32;
    float l = 0.0f;
    float acc = 0.0f;
    for (int tile = (lo / ATTN_TILE) * ATTN_TILE; tile <= pos; tile += ATTN_TILE) {
        int p = tile + lane;
        int valid = p >= lo && p <= pos;
        float score = NEG_INF_F32;
        i64 row = -1;
        if (valid) {
            row = layer_rows + (i64)table[p / block_size] * block_size + p % block_size;
            GLOBAL const u16* k = k_cache + row * kv_dim + kvh * d;
            float dot = 0.0f;
            for (int i = 0; i < d; i++) {
                dot = dot + qs[i] * bf16_to_f32(k[i]);
            }
            score = dot * scale;
        }
        rows[lane] = row;
        red[lane] = score;
        BARRIER();
        tree_max(red, ATTN_LANES);
        float m_tile = red[0];
        BARRIER();
        float pr = valid ? EXPF(score - m_tile) : 0.0f;
        red[lane] = pr;
        ps[lane] = round_bf16(pr);
        BARRIER();
        tree_sum(red, ATTN_LANES);
        float l_tile = red[0];
        float acc_tile = 0.0f;
        if (lane < d) {
            for (int j = 0; j < ATTN_TILE; j++) {
                if (rows[j] >= 0) {
                    acc_tile = acc_tile + ps[j] * bf16_to_f32(v_cache[rows[j] * kv_dim + kvh * d + lane]);
                }
            }
        }
        float m_new = MAXF(m, m_tile);
        float a = m == NEG_INF_F32 ? 0.0f : EXPF(m - m_new);
        float b = EXPF(m_tile - m_new);
        l = l * a + l_tile * b;
        acc = acc * a + acc_tile * b;
        m = m_new;
        BARRIER();
    }
    float sink = bf16_to_f32(sinks[head]);
    float m_new = MAXF(m, sink);
    float a = EXPF(m - m_new);
    float b = EXPF(sink - m_new);
    l = l * a + b;
    acc = acc * a;
    if (lane < d) {
        out[t * q_heads * d + head * d + lane] = acc / l;
    }
}
