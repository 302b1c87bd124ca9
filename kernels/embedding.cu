// Embedding gather: out[t, :] = table[ids[t], :]. An id outside the vocabulary
// (the engine checks them; this is the last line of defence) gives zeros.
// Grid: one block per token; threads stride over the hidden size.
extern "C" __global__ void embedding_gather_bf16(
    const bf16* __restrict__ table, const u32* __restrict__ ids,
    bf16* __restrict__ out, int hidden, int vocab) {
    int t = blockIdx.x;
    u32 id = ids[t];
    bf16* dst = out + (size_t)t * hidden;
    if (id >= (u32)vocab) {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = f32_to_bf16(0.0f);
        return;
    }
    const bf16* src = table + (size_t)id * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = src[i];
}
