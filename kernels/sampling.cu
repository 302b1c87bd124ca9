// Sampling on the device, one row (sequence) per block (blockDim.x a multiple
// of 32, at most 1024; 1024 is meant), so only token ids and the logprobs a
// request asked for travel back to the host. The order of operations is the
// engine's host sampler's (engine/src/sampler), step for step:
//
//   1. grammar mask (vLLM's bitmask: bit b of word w allows token 32w + b;
//      tokens it does not allow get -inf), then NaN -> -inf and +inf -> the
//      largest finite value; this is the "raw" row logprobs are taken from
//      (copied to `raw` when the row asks for logprobs), and its argmax is the
//      last-resort token when every candidate ends up at -inf;
//   2. banned ids (the min-tokens mask) -> -inf;
//   3. logit_bias: l = min(l + b, MAX) for finite b, in list order;
//   4. penalties: repetition over prompt and output tokens (positive logits
//      times 1/r, the others times r), then frequency and presence over output
//      tokens (l -= f * count; l -= p);
//   5. temperature <= 0 (or NaN): greedy, the lowest id among equal maxima.
//      Otherwise T = max(T, 0.01), l = min(l / T, MAX), then min-p (keep
//      l - max >= ln(min_p)), top-k (keep l >= the k-th largest of min-p's
//      survivors: ties with it stay), top-p (keep, in (l desc, id asc) order,
//      each token while the mass before it is below top_p of the total), and
//      an inverse-CDF draw over the kept weights exp(l - max) in index order
//      with u = draw_unit(seed, position, 0) * total.
//
// Thresholds are found without sorting: top-k's k-th value and top-p's
// crossing value by bisection over the 32-bit order of floats (exact values,
// 32 block-wide passes each), top-p's ties at the crossing by their id order.
// Masses are summed in double, as the host does. Bit-exact agreement with the
// host is not promised: expf and the host's exp differ in the last bits, and
// sums run in another order, so a draw within rounding of the boundary
// between two tokens may go either way.
//
// Lists, per row as ranges into flat arrays (RowParams): penalties (token,
// times generated, in the prompt) with each token at most once; logit_bias
// (token, bias); banned tokens. Tokens >= vocab are skipped everywhere.
//
// Logprobs (RowParams.logprobs >= 0): of the raw row, as a log-softmax summed
// in double: the chosen token's logprob and rank (1 + tokens strictly above
// it), and the `logprobs` best (id, logprob), best first, lowest id first on
// ties, into out_top_* at row * MAX_TOP_LOGPROBS.

#define MAX_TOP_LOGPROBS 20
#define SAMPLE_THREADS 1024

struct RowParams {
    float temperature, top_p, min_p, repetition, presence, frequency;
    int top_k;       // 0: off
    int logprobs;    // -1: none; else how many top logprobs (0..=MAX_TOP_LOGPROBS)
    u64 seed, position;
    int pen_from, pen_to;
    int bias_from, bias_to;
    int ban_from, ban_to;
    long long mask_word;  // the row's first word in mask_words; -1: no grammar mask
};

// Floats in their total order as unsigned integers (-0 just below +0).
__device__ __forceinline__ u32 order_key(float f) {
    u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_value(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__device__ double block_sum_d(double v, double* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < warps) ? scratch[threadIdx.x] : 0.0;
    if (warp == 0)
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    double r = scratch[0];
    __syncthreads();
    return r;
}

// The first of the block's (value, index) pairs in (value desc, index asc)
// order; every thread gets it. sv/si hold blockDim.x entries.
__device__ void block_argmax(float v, int idx, float* sv, int* si, float* out_v, int* out_i) {
    __syncthreads();
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
    *out_v = sv[0];
    *out_i = si[0];
    __syncthreads();
}

// The argmax of l over [0, vocab): the lowest index among equal maxima; -1
// when every value is -inf.
__device__ int row_argmax(const float* l, int vocab, float* sv, int* si, float* max_out) {
    float best = -F32_INF;
    int best_i = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        if (l[i] > best) { best = l[i]; best_i = i; }
    float m;
    int a;
    block_argmax(best, best_i, sv, si, &m, &a);
    *max_out = m;
    return (m == -F32_INF || a == 0x7fffffff) ? -1 : a;
}

// What survives min-p, top-k and top-p: the weight exp(x - max) of a kept
// value, 0 otherwise. `tie` counts the values at top-p's crossing seen so far
// in index order (only the first n_keep of them stay).
struct Keep {
    float max, kth;
    double floor_;
    bool top_p_on;
    u32 cross_key;
    int n_keep;
};

__device__ __forceinline__ float kept_weight(float x, const Keep& k, int* tie) {
    if (!(x > -F32_INF && (double)__fsub_rn(x, k.max) >= k.floor_ && x >= k.kth)) return 0.0f;
    if (k.top_p_on) {
        u32 key = order_key(x);
        if (key < k.cross_key) return 0.0f;
        if (key == k.cross_key && (*tie)++ >= k.n_keep) return 0.0f;
    }
    return expf(__fsub_rn(x, k.max));
}

__device__ __forceinline__ bool finite_f(float x) { return fabsf(x) <= F32_MAX; }

extern "C" __global__ void sample_rows(
    float* __restrict__ logits, float* __restrict__ raw, int vocab, const RowParams* __restrict__ params,
    const u32* __restrict__ pen_tokens, const u32* __restrict__ pen_counts, const unsigned char* __restrict__ pen_in_prompt,
    const u32* __restrict__ bias_tokens, const float* __restrict__ bias_values,
    const u32* __restrict__ ban_tokens, const u32* __restrict__ mask_words,
    u32* __restrict__ out_tokens, float* __restrict__ out_logprob, int* __restrict__ out_rank,
    u32* __restrict__ out_top_ids, float* __restrict__ out_top_logprobs) {
    __shared__ float sv[SAMPLE_THREADS];
    __shared__ int si[SAMPLE_THREADS];
    __shared__ double part[SAMPLE_THREADS];
    __shared__ int ties_before[SAMPLE_THREADS];
    __shared__ float scratch[32];
    __shared__ double dscratch[32];
    __shared__ int shared_n_keep;
    int row = blockIdx.x;
    RowParams p = params[row];
    float* l = logits + (size_t)row * vocab;
    bool want_lp = p.logprobs >= 0 && raw != nullptr;
    float* rl = want_lp ? raw + (size_t)row * vocab : nullptr;

    // 1. Grammar mask, then NaN -> -inf and +inf -> MAX: the raw row.
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float x = l[i];
        if (p.mask_word >= 0 && !((mask_words[p.mask_word + (i >> 5)] >> (i & 31)) & 1u)) x = -F32_INF;
        x = (x != x) ? -F32_INF : fminf(x, F32_MAX);
        l[i] = x;
        if (want_lp) rl[i] = x;
    }
    __syncthreads();
    float raw_max;
    int raw_argmax = row_argmax(l, vocab, sv, si, &raw_max);
    if (raw_argmax < 0) raw_argmax = 0;

    // 2. Banned ids (the min-tokens mask).
    for (int i = p.ban_from + threadIdx.x; i < p.ban_to; i += blockDim.x)
        if (ban_tokens[i] < (u32)vocab) l[ban_tokens[i]] = -F32_INF;
    __syncthreads();
    // 3. logit_bias, in list order (a token listed twice adds twice, as on the host).
    if (threadIdx.x == 0)
        for (int i = p.bias_from; i < p.bias_to; i++) {
            u32 t = bias_tokens[i];
            float b = bias_values[i];
            if (t < (u32)vocab && finite_f(b)) l[t] = fminf(__fadd_rn(l[t], b), F32_MAX);
        }
    __syncthreads();
    // 4. Penalties (each token once in the list, so threads never share one).
    {
        float rep = p.repetition;
        bool use_rep = finite_f(rep) && rep > 0.0f && rep != 1.0f;
        float inv = 1.0f / rep;
        float freq = finite_f(p.frequency) ? p.frequency : 0.0f;
        float pres = finite_f(p.presence) ? p.presence : 0.0f;
        for (int i = p.pen_from + threadIdx.x; i < p.pen_to; i += blockDim.x) {
            u32 t = pen_tokens[i];
            if (t >= (u32)vocab) continue;
            float x = l[t];
            u32 count = pen_counts[i];
            if (use_rep && (count > 0 || pen_in_prompt[i])) x = x > 0.0f ? __fmul_rn(x, inv) : __fmul_rn(x, rep);
            if ((freq != 0.0f || pres != 0.0f) && count > 0) {
                x = __fsub_rn(x, __fmul_rn(freq, (float)count));
                x = __fsub_rn(x, pres);
            }
            l[t] = x;
        }
    }
    __syncthreads();

    int pick;
    if (!(p.temperature > 0.0f)) {
        // 5a. Greedy.
        float m;
        pick = row_argmax(l, vocab, sv, si, &m);
        if (pick < 0) pick = raw_argmax;
    } else {
        // 5b. Temperature, min-p, top-k, top-p, draw.
        float t = fminf(fmaxf(p.temperature, 1e-2f), F32_MAX);
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) l[i] = fminf(__fdiv_rn(l[i], t), F32_MAX);
        __syncthreads();
        float max;
        int am = row_argmax(l, vocab, sv, si, &max);
        if (am < 0) {
            pick = raw_argmax;
        } else {
            float min_p = (p.min_p != p.min_p) ? 0.0f : fminf(fmaxf(p.min_p, 0.0f), 1.0f);
            double floor_ = min_p > 0.0f ? log((double)min_p) : -(double)F32_INF;
#define KEEP_MIN_P(x) ((x) > -F32_INF && (double)__fsub_rn((x), max) >= floor_)
            // top-k: the k-th largest value of min-p's survivors; -inf when fewer survive.
            float kth = -F32_INF;
            if (p.top_k > 0 && p.top_k < vocab) {
                float n_all = 0.0f;
                for (int i = threadIdx.x; i < vocab; i += blockDim.x) n_all += KEEP_MIN_P(l[i]) ? 1.0f : 0.0f;
                n_all = block_sum(n_all, scratch);
                if (n_all >= (float)p.top_k) {
                    // The largest key K with at least k survivors >= K (an element's key).
                    u64 lo = 0, hi = 0x100000000ull;
                    while (hi - lo > 1) {
                        u64 mid = (lo + hi) / 2;
                        float n = 0.0f;
                        for (int i = threadIdx.x; i < vocab; i += blockDim.x)
                            n += (KEEP_MIN_P(l[i]) && (u64)order_key(l[i]) >= mid) ? 1.0f : 0.0f;
                        n = block_sum(n, scratch);
                        if (n >= (float)p.top_k) lo = mid; else hi = mid;
                    }
                    kth = key_value((u32)lo);
                }
            }
#define KEEP_K(x) (KEEP_MIN_P(x) && (x) >= kth)
            // top-p: the crossing value (largest key whose mass at or above it
            // reaches top_p of the total), and how many of its ties stay.
            bool top_p_on = p.top_p < 1.0f;
            u32 cross_key = 0;
            int n_keep = 0x7fffffff;
            int chunk = (vocab + blockDim.x - 1) / blockDim.x;
            int from = min((int)threadIdx.x * chunk, vocab), to = min(from + chunk, vocab);
            if (top_p_on) {
                double z = 0.0;
                for (int i = threadIdx.x; i < vocab; i += blockDim.x) z += KEEP_K(l[i]) ? (double)expf(__fsub_rn(l[i], max)) : 0.0;
                z = block_sum_d(z, dscratch);
                double target = (double)p.top_p * z;
                u64 lo = 0, hi = 0x100000000ull;
                while (hi - lo > 1) {
                    u64 mid = (lo + hi) / 2;
                    double m = 0.0;
                    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
                        m += (KEEP_K(l[i]) && (u64)order_key(l[i]) >= mid) ? (double)expf(__fsub_rn(l[i], max)) : 0.0;
                    m = block_sum_d(m, dscratch);
                    if (m >= target) lo = mid; else hi = mid;
                }
                cross_key = (u32)lo;
                double above = 0.0;
                int ties = 0;
                for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
                    if (!KEEP_K(l[i])) continue;
                    u32 k = order_key(l[i]);
                    if (k > cross_key) above += (double)expf(__fsub_rn(l[i], max));
                }
                for (int i = from; i < to; i++) ties += (KEEP_K(l[i]) && order_key(l[i]) == cross_key) ? 1 : 0;
                above = block_sum_d(above, dscratch);
                ties_before[threadIdx.x] = ties;
                __syncthreads();
                if (threadIdx.x == 0) {
                    int total_ties = 0;
                    for (int c = 0; c < (int)blockDim.x; c++) {
                        int n = ties_before[c];
                        ties_before[c] = total_ties;
                        total_ties += n;
                    }
                    // The host keeps a tie while the mass before it is below the target.
                    float w = expf(__fsub_rn(key_value(cross_key), max));
                    double acc = above;
                    int n = 0;
                    while (n < total_ties && (n == 0 || acc < target)) { acc += (double)w; n++; }
                    shared_n_keep = n;
                }
                __syncthreads();
                n_keep = shared_n_keep;
            }
            // The draw: weights in index order, each thread a contiguous chunk.
            Keep kp{max, kth, floor_, top_p_on, cross_key, n_keep};
            double mine = 0.0;
            {
                int tie = top_p_on ? ties_before[threadIdx.x] : 0;
                for (int i = from; i < to; i++) mine += (double)kept_weight(l[i], kp, &tie);
            }
            __syncthreads();
            part[threadIdx.x] = mine;
            __syncthreads();
            if (threadIdx.x == 0) {
                double total = 0.0;
                int last_chunk = -1;
                for (int c = 0; c < (int)blockDim.x; c++) {
                    total += part[c];
                    if (part[c] > 0.0) last_chunk = c;
                }
                int chosen = -1;
                if (total > 0.0) {
                    double u = draw_unit(p.seed, p.position, 0) * total;
                    double acc = 0.0;
                    for (int c = 0; c < (int)blockDim.x && chosen < 0; c++) {
                        if (part[c] <= 0.0) continue;
                        if (acc + part[c] <= u) { acc += part[c]; continue; }
                        int a = min(c * chunk, vocab), b = min(a + chunk, vocab);
                        int tie = top_p_on ? ties_before[c] : 0;
                        for (int i = a; i < b; i++) {
                            float w = kept_weight(l[i], kp, &tie);
                            if (w > 0.0f) {
                                acc += (double)w;
                                if (u < acc) { chosen = i; break; }
                            }
                        }
                    }
                    // Rounding left u at or past the sum: the last positive weight, as the host.
                    if (chosen < 0 && last_chunk >= 0) {
                        int a = min(last_chunk * chunk, vocab), b = min(a + chunk, vocab);
                        int tie = top_p_on ? ties_before[last_chunk] : 0;
                        for (int i = a; i < b; i++)
                            if (kept_weight(l[i], kp, &tie) > 0.0f) chosen = i;
                    }
                }
                si[0] = chosen < 0 ? raw_argmax : chosen;
            }
            __syncthreads();
            pick = si[0];
            __syncthreads();
#undef KEEP_K
#undef KEEP_MIN_P
        }
    }
    if (threadIdx.x == 0) out_tokens[row] = (u32)pick;
    if (!want_lp) return;

    // Logprobs of the raw row: log-softmax in double.
    double sum = 0.0;
    if (raw_max != -F32_INF)
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) sum += (double)expf(__fsub_rn(rl[i], raw_max));
    sum = block_sum_d(sum, dscratch);
    double lse = raw_max == -F32_INF ? (double)F32_INF : (double)raw_max + log(sum);
    float chosen = rl[pick];
    float above = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) above += rl[i] > chosen ? 1.0f : 0.0f;
    above = block_sum(above, scratch);
    if (threadIdx.x == 0) {
        out_logprob[row] = (float)((double)chosen - lse);
        out_rank[row] = 1 + (int)above;
    }
    int k = min(min(p.logprobs, MAX_TOP_LOGPROBS), vocab);
    float prev_v = F32_INF;
    int prev_i = -1;
    for (int j = 0; j < k; j++) {
        // The best entry after (prev_v, prev_i) in (value desc, id asc) order.
        float best = -F32_INF;
        int best_i = 0x7fffffff;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            float x = rl[i];
            bool after = x < prev_v || (x == prev_v && i > prev_i);
            if (after && (x > best || (x == best && i < best_i))) { best = x; best_i = i; }
        }
        float v;
        int id;
        block_argmax(best, best_i, sv, si, &v, &id);
        if (threadIdx.x == 0) {
            out_top_ids[(size_t)row * MAX_TOP_LOGPROBS + j] = (u32)id;
            out_top_logprobs[(size_t)row * MAX_TOP_LOGPROBS + j] = (float)((double)v - lse);
        }
        prev_v = v;
        prev_i = id;
    }
}
