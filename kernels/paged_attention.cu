// Attention over the paged KV cache, in two forms.
//
// Decode (one query token per sequence), split along the sequence
// (flash-decoding): grid (heads, seqs, partitions); each block scores one
// partition of PARTITION tokens of one (sequence, head) and leaves its
// unnormalized output, running max and sum; paged_attention_reduce then
// merges the partitions. Long contexts keep every SM busy this way.
//
// Prefill (chunked prefill included): grid (query tokens, heads), one warp per
// (token, head), online softmax over the keys at positions <= the token's own
// (already in the cache: rope_write_kv_bf16 ran first), so no score matrix is
// ever stored.
//
// Cache layout: [block][kv_head][offset][head_dim] bf16; block_tables[s *
// max_blocks + i] is sequence s's i-th block. Grouped-query attention: query
// head h reads KV head h / (heads / kv_heads). head_dim <= 256.

#define PARTITION 512
#define MAX_HEAD_DIM 256

__device__ __forceinline__ size_t kv_index(const int* block_tables, int max_blocks, int seq, int pos,
                                           int kv_head, int kv_heads, int block_size, int head_dim) {
    int block = block_tables[(size_t)seq * max_blocks + pos / block_size];
    return (((size_t)block * kv_heads + kv_head) * block_size + pos % block_size) * head_dim;
}

extern "C" __global__ void paged_attention_decode_bf16(
    float* __restrict__ part_out,   // [seqs, heads, partitions, head_dim]
    float* __restrict__ part_max,   // [seqs, heads, partitions]
    float* __restrict__ part_sum,   // [seqs, heads, partitions]
    const bf16* __restrict__ q,  // [seqs, heads, head_dim]
    const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
    const int* __restrict__ block_tables, const int* __restrict__ context_lens,
    int max_blocks, int heads, int kv_heads, int head_dim, int block_size, float scale) {
    __shared__ float qs[MAX_HEAD_DIM];
    __shared__ float scores[PARTITION];
    __shared__ float scratch[32];
    int h = blockIdx.x, s = blockIdx.y, p = blockIdx.z, parts = gridDim.z;
    int len = context_lens[s];
    int start = p * PARTITION;
    int end = min(start + PARTITION, len);
    size_t slot = ((size_t)s * heads + h) * parts + p;
    if (start >= len) {  // nothing here: a neutral partial
        if (threadIdx.x == 0) { part_max[slot] = -F32_INF; part_sum[slot] = 0.0f; }
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) part_out[slot * head_dim + d] = 0.0f;
        return;
    }
    int kvh = h / (heads / kv_heads);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x)
        qs[d] = bf16_to_f32(q[((size_t)s * heads + h) * head_dim + d]);
    __syncthreads();
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int j = start + warp; j < end; j += warps) {
        size_t base = kv_index(block_tables, max_blocks, s, j, kvh, kv_heads, block_size, head_dim);
        float dot = 0.0f;
        for (int d = lane; d < head_dim; d += 32) dot += qs[d] * bf16_to_f32(k_cache[base + d]);
        dot = warp_sum(dot);
        if (lane == 0) scores[j - start] = dot * scale;
    }
    __syncthreads();
    float m = -F32_INF;
    for (int j = threadIdx.x; j < end - start; j += blockDim.x) m = fmaxf(m, scores[j]);
    m = block_max(m, scratch);
    float l = 0.0f;
    for (int j = threadIdx.x; j < end - start; j += blockDim.x) {
        float e = __expf(scores[j] - m);
        scores[j] = e;
        l += e;
    }
    l = block_sum(l, scratch);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = start; j < end; j++) {
            size_t base = kv_index(block_tables, max_blocks, s, j, kvh, kv_heads, block_size, head_dim);
            acc += scores[j - start] * bf16_to_f32(v_cache[base + d]);
        }
        part_out[slot * head_dim + d] = acc;
    }
    if (threadIdx.x == 0) { part_max[slot] = m; part_sum[slot] = l; }
}

// Merges the partitions of paged_attention_decode_bf16. Grid (heads, seqs).
extern "C" __global__ void paged_attention_reduce_bf16(
    bf16* __restrict__ out,  // [seqs, heads, head_dim]
    const float* __restrict__ part_out, const float* __restrict__ part_max, const float* __restrict__ part_sum,
    int heads, int head_dim, int parts) {
    int h = blockIdx.x, s = blockIdx.y;
    size_t base = ((size_t)s * heads + h) * parts;
    float m = -F32_INF;
    for (int p = 0; p < parts; p++) m = fmaxf(m, part_max[base + p]);
    float total = 0.0f;
    for (int p = 0; p < parts; p++) total += part_sum[base + p] * (part_max[base + p] == -F32_INF ? 0.0f : __expf(part_max[base + p] - m));
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int p = 0; p < parts; p++) {
            float w = part_max[base + p] == -F32_INF ? 0.0f : __expf(part_max[base + p] - m);
            acc += w * part_out[(base + p) * head_dim + d];
        }
        out[((size_t)s * heads + h) * head_dim + d] = f32_to_bf16(total > 0.0f ? acc / total : 0.0f);
    }
}

// Causal attention for prefill chunks. token_seq[t] names token t's sequence,
// token_pos[t] its position; it attends keys 0..=token_pos[t] of its sequence.
// Grid (tokens, heads), blockDim.x == 32.
extern "C" __global__ void paged_attention_prefill_bf16(
    bf16* __restrict__ out, const bf16* __restrict__ q,
    const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
    const int* __restrict__ block_tables, const int* __restrict__ token_seq, const int* __restrict__ token_pos,
    int max_blocks, int heads, int kv_heads, int head_dim, int block_size, float scale) {
    const int PER_LANE = MAX_HEAD_DIM / 32;
    int t = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
    int s = token_seq[t], pos = token_pos[t];
    int kvh = h / (heads / kv_heads);
    float qv[PER_LANE], acc[PER_LANE];
    for (int i = 0; i < PER_LANE; i++) {
        int d = lane + 32 * i;
        qv[i] = d < head_dim ? bf16_to_f32(q[((size_t)t * heads + h) * head_dim + d]) : 0.0f;
        acc[i] = 0.0f;
    }
    float m = -F32_INF, l = 0.0f;
    for (int j = 0; j <= pos; j++) {
        size_t base = kv_index(block_tables, max_blocks, s, j, kvh, kv_heads, block_size, head_dim);
        float dot = 0.0f;
        for (int i = 0; i < PER_LANE; i++) {
            int d = lane + 32 * i;
            if (d < head_dim) dot += qv[i] * bf16_to_f32(k_cache[base + d]);
        }
        float score = warp_sum(dot) * scale;
        float m_new = fmaxf(m, score);
        float correction = __expf(m - m_new);
        float p = __expf(score - m_new);
        l = l * correction + p;
        for (int i = 0; i < PER_LANE; i++) {
            int d = lane + 32 * i;
            float v = d < head_dim ? bf16_to_f32(v_cache[base + d]) : 0.0f;
            acc[i] = acc[i] * correction + p * v;
        }
        m = m_new;
    }
    for (int i = 0; i < PER_LANE; i++) {
        int d = lane + 32 * i;
        if (d < head_dim) out[((size_t)t * heads + h) * head_dim + d] = f32_to_bf16(acc[i] / l);
    }
}
