// Sampling on the device, one row (sequence) per block of 1024 threads, so
// only token ids travel back to the host. The order is vLLM's (and ferry's CPU
// sampler's): penalties, then temperature 0 is greedy (the lowest id among
// equal maxima); otherwise divide by the temperature, keep what min-p, top-k
// and top-p allow, and draw from what is left with a counter-based random
// number of (seed, step), so a seeded sequence draws the same every run.
//
// Penalties come as a sparse list per row (pen_offsets[row]..pen_offsets[row+1]):
// a token, how often the row generated it, and whether the prompt holds it.
// Repetition divides positive logits (multiplies negative ones) of tokens in
// the prompt or the output; presence and frequency subtract for output tokens.
//
// top-k and top-p thresholds are found by bisection on the logit value (32
// rounds of block-wide counts and sums) instead of sorting the vocabulary: the
// cost is 32 passes over the row, with no scratch memory beyond the block's.

struct RowParams {
    float temperature, top_p, min_p, repetition, presence, frequency;
    int top_k;
    int pad;
    u64 seed, step;
};

__device__ void apply_penalties(float* logits, const RowParams& p, const u32* tokens, const u32* counts,
                                const unsigned char* in_prompt, int from, int to, int vocab) {
    for (int i = from + threadIdx.x; i < to; i += blockDim.x) {
        u32 t = tokens[i];
        if (t >= (u32)vocab) continue;
        float l = logits[t];
        if (p.repetition != 1.0f && (counts[i] > 0 || in_prompt[i])) l = l > 0.0f ? l / p.repetition : l * p.repetition;
        if (counts[i] > 0) l -= p.presence + p.frequency * (float)counts[i];
        logits[t] = l;
    }
    __syncthreads();
}

// The largest value and its lowest index over the block.
__device__ void block_argmax(float v, int idx, float* sv, int* si) {
    sv[threadIdx.x] = v;
    si[threadIdx.x] = idx;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            float ov = sv[threadIdx.x + stride];
            int oi = si[threadIdx.x + stride];
            if (ov > sv[threadIdx.x] || (ov == sv[threadIdx.x] && oi < si[threadIdx.x])) {
                sv[threadIdx.x] = ov;
                si[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
}

extern "C" __global__ void sample_rows(
    float* __restrict__ logits, int vocab, const RowParams* __restrict__ params,
    const int* __restrict__ pen_offsets, const u32* __restrict__ pen_tokens, const u32* __restrict__ pen_counts,
    const unsigned char* __restrict__ pen_in_prompt, u32* __restrict__ out_tokens) {
    __shared__ float sv[1024];
    __shared__ int si[1024];
    __shared__ float scratch[32];
    int row = blockIdx.x;
    RowParams p = params[row];
    float* l = logits + (size_t)row * vocab;
    // NaN counts as -inf, +inf as the largest finite value (the CPU sampler's rule).
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float x = l[i];
        l[i] = (x != x) ? -F32_INF : fminf(x, F32_MAX);
    }
    __syncthreads();
    apply_penalties(l, p, pen_tokens, pen_counts, pen_in_prompt, pen_offsets[row], pen_offsets[row + 1], vocab);

    float best = -F32_INF;
    int best_i = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        if (l[i] > best) { best = l[i]; best_i = i; }
    block_argmax(best, best_i, sv, si);
    float max = sv[0];
    int argmax = si[0] == 0x7fffffff ? 0 : si[0];
    if (p.temperature < 1e-5f || max == -F32_INF) {
        if (threadIdx.x == 0) out_tokens[row] = (u32)argmax;
        return;
    }
    float inv_t = 1.0f / fmaxf(p.temperature, 1e-2f);
    // Work on scaled logits relative to the maximum: z = (l - max) / T <= 0.
    float cutoff = -F32_INF;
    if (p.min_p > 0.0f) cutoff = fmaxf(cutoff, logf(p.min_p));
    if (p.top_k > 0 && p.top_k < vocab) {
        // Smallest threshold c with at most top_k values >= c (ties kept by count).
        float lo = -80.0f, hi = 0.0f;
        for (int it = 0; it < 32; it++) {
            float mid = 0.5f * (lo + hi);
            float n = 0.0f;
            for (int i = threadIdx.x; i < vocab; i += blockDim.x) n += ((l[i] - max) * inv_t >= mid) ? 1.0f : 0.0f;
            n = block_sum(n, scratch);
            if (n > (float)p.top_k) lo = mid; else hi = mid;
        }
        cutoff = fmaxf(cutoff, hi);
    }
    if (p.top_p < 1.0f) {
        float z = 0.0f;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            float s = (l[i] - max) * inv_t;
            z += s >= cutoff ? __expf(s) : 0.0f;
        }
        z = block_sum(z, scratch);
        // Largest threshold whose kept mass is still >= top_p of the total.
        float lo = cutoff > -80.0f ? cutoff : -80.0f, hi = 0.0f;
        for (int it = 0; it < 32; it++) {
            float mid = 0.5f * (lo + hi);
            float mass = 0.0f;
            for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
                float s = (l[i] - max) * inv_t;
                mass += (s >= mid && s >= cutoff) ? __expf(s) : 0.0f;
            }
            mass = block_sum(mass, scratch);
            if (mass >= p.top_p * z) lo = mid; else hi = mid;
        }
        cutoff = fmaxf(cutoff, lo);
    }
    // Inverse-CDF draw in index order: each thread sums a contiguous chunk.
    int chunk = (vocab + blockDim.x - 1) / blockDim.x;
    int from = threadIdx.x * chunk, to = min(from + chunk, vocab);
    float part = 0.0f;
    for (int i = from; i < to; i++) {
        float s = (l[i] - max) * inv_t;
        part += s >= cutoff ? __expf(s) : 0.0f;
    }
    // sv[0] held the maximum that every thread read above; with no top-k or
    // top-p pass between (no block-wide sum, so no barrier), a fast warp could
    // overwrite it before a slow one had read it.
    __syncthreads();
    sv[threadIdx.x] = part;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int i = 0; i < (int)blockDim.x; i++) total += sv[i];
        float u = uniform01(p.seed, p.step) * total;
        int pick = argmax;
        float run = 0.0f;
        for (int c = 0; c < (int)blockDim.x && total > 0.0f; c++) {
            if (run + sv[c] > u) {
                int a = c * chunk, b = min(a + chunk, vocab);
                for (int i = a; i < b; i++) {
                    float s = (l[i] - max) * inv_t;
                    float w = s >= cutoff ? __expf(s) : 0.0f;
                    if (w > 0.0f) { pick = i; }
                    run += w;
                    if (run > u) break;
                }
                break;
            }
            run += sv[c];
        }
        out_tokens[row] = (u32)pick;
    }
}
