// RoPE applied to q and k, and k, v written into the paged KV cache in the
// same pass. Cache layout: [block][kv_head][offset in block][head_dim], bf16.
// slot[t] = block * block_size + offset for token t (negative: not cached, a
// padding token). Rotation pairs: `neox` rotates (i, i + d/2) as Hugging Face
// Llama does; otherwise adjacent pairs (2i, 2i + 1) as GGUF's original Llama.
// inv_freq[i] = theta^(-2i/d) with any Llama 3 scaling already applied, so
// one table serves every RoPE variant.
// Grid: one block per token; threads stride over (heads + kv_heads) * d/2.
extern "C" __global__ void rope_write_kv_bf16(
    bf16* __restrict__ q, bf16* __restrict__ k, const bf16* __restrict__ v,
    bf16* __restrict__ k_cache, bf16* __restrict__ v_cache,
    const int* __restrict__ positions, const long long* __restrict__ slots,
    const float* __restrict__ inv_freq, int heads, int kv_heads, int head_dim,
    int block_size, int neox) {
    int t = blockIdx.x;
    int half = head_dim / 2;
    float pos = (float)positions[t];
    int pairs = (heads + kv_heads) * half;
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        int h = p / half, i = p % half;
        bf16* base = h < heads ? q + ((size_t)t * heads + h) * head_dim
                                        : k + ((size_t)t * kv_heads + (h - heads)) * head_dim;
        int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
        float s, c;
        __sincosf(pos * inv_freq[i], &s, &c);
        float x0 = bf16_to_f32(base[a]), x1 = bf16_to_f32(base[b]);
        base[a] = f32_to_bf16(x0 * c - x1 * s);
        base[b] = f32_to_bf16(x0 * s + x1 * c);
    }
    __syncthreads();
    long long slot = slots[t];
    if (slot < 0) return;
    long long block = slot / block_size, off = slot % block_size;
    int kv_elems = kv_heads * head_dim;
    for (int e = threadIdx.x; e < kv_elems; e += blockDim.x) {
        int h = e / head_dim, d = e % head_dim;
        size_t dst = (((size_t)block * kv_heads + h) * block_size + off) * head_dim + d;
        k_cache[dst] = k[(size_t)t * kv_elems + e];
        v_cache[dst] = v[(size_t)t * kv_elems + e];
    }
}
