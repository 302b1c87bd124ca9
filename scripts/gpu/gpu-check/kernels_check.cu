// Each of ferry's CUDA kernels (kernels/*.cu), launched alone on fresh random
// inputs and compared with a float64 reference computed on the host
// (reference.hpp). Built on the GPU machine by scripts/gpu/gpu-check.sh:
//
//   nvcc -O2 -std=c++17 -gencode=arch=compute_90,code=sm_90 kernels_check.cu
//
// The kernel sources are included as they are, after common.cuh, which is
// how NVRTC sees them at run time (kernels/src/lib.rs); nvcc compiles them
// here because the harness needs host code around them. Sizes include ones
// that are not multiples of the block size, and attention runs over contexts
// of 4096 tokens and more. One line per case: `RESULT <case> PASS|FAIL <what>`.
// Exit status: the number of failed cases (0: all passed).
//
// Usage: kernels_check [seed]

#include <cuda_runtime.h>

// A launch; with -DFERRY_HOST_EMULATION (g++, cuda_standin.h) a loop over the
// grid's blocks, each run by EMULATED_THREADS CPU threads.
#ifdef FERRY_HOST_EMULATION
#define LAUNCH(kernel, grid, block, ...)                                                  \
    do {                                                                                  \
        for (unsigned b_ = 0; b_ < (unsigned)(grid); b_++) {                              \
            blockIdx.x = b_;                                                              \
            emu_block_run([&] { kernel(__VA_ARGS__); });                                  \
        }                                                                                 \
    } while (0)
#else
#define LAUNCH(kernel, grid, block, ...) kernel<<<(grid), (block)>>>(__VA_ARGS__)
#endif

#include "../../../kernels/common.cuh"
#include "../../../kernels/embedding.cu"
#include "../../../kernels/rmsnorm.cu"
#include "../../../kernels/silu_mul.cu"
#include "../../../kernels/rope_kv.cu"
#include "../../../kernels/paged_attention.cu"
#include "../../../kernels/sampling.cu"

#include "reference.hpp"

#include <cstdlib>

static int failures = 0;

static void result(const char* name, bool ok, const std::string& what) {
    std::printf("RESULT %s %s %s\n", name, ok ? "PASS" : "FAIL", what.c_str());
    std::fflush(stdout);
    if (!ok) failures++;
}

// A CUDA error leaves the context unusable: report it and stop.
#define CK(x)                                                                                    \
    do {                                                                                         \
        cudaError_t e_ = (x);                                                                    \
        if (e_ != cudaSuccess) {                                                                 \
            std::printf("RESULT cuda-error FAIL %s at %s:%d: %s\n", #x, __FILE__, __LINE__,       \
                        cudaGetErrorString(e_));                                                 \
            std::exit(100);                                                                      \
        }                                                                                        \
    } while (0)

template <class T>
struct Dev {
    T* p = nullptr;
    size_t n = 0;
    explicit Dev(const std::vector<T>& h) : n(h.size()) {
        CK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
        if (n) CK(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice));
    }
    explicit Dev(size_t count) : n(count) {
        CK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
        CK(cudaMemset(p, 0, std::max<size_t>(n, 1) * sizeof(T)));
    }
    std::vector<T> get() const {
        std::vector<T> h(n);
        if (n) CK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
        return h;
    }
    ~Dev() { cudaFree(p); }
    Dev(const Dev&) = delete;
    Dev& operator=(const Dev&) = delete;
};

static void launched() {
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
}

// bf16 outputs against a double reference: one bf16 step (2^-8 relative) plus
// f32 arithmetic, with an absolute floor for values near zero.
static ref::Check bf16_check(double scale) { return ref::Check(2e-3 * scale, 1.0 / 128); }

static void check_embedding(ref::Rng& rng, int tokens, int hidden, int vocab, int threads) {
    auto table = ref::random_bf16(rng, (size_t)vocab * hidden, 1.0f);
    std::vector<uint32_t> ids(tokens);
    for (auto& i : ids) i = rng.below(vocab);
    ids[0] = vocab;              // out of the vocabulary: zeros
    ids[tokens - 1] = vocab - 1;  // the last row
    Dev<uint16_t> dt(table), dout((size_t)tokens * hidden);
    Dev<uint32_t> di(ids);
    embedding_gather_bf16<<<tokens, threads>>>(dt.p, di.p, dout.p, hidden, vocab);
    launched();
    auto got = dout.get();
    auto want = ref::embedding(table, ids, hidden, vocab);
    ref::Check c(0.0, 0.0);  // a copy: exact
    for (size_t i = 0; i < got.size(); i++) c.add(ref::bf(got[i]), want[i]);
    char name[96];
    std::snprintf(name, sizeof name, "embedding[t=%d,h=%d,v=%d,threads=%d]", tokens, hidden, vocab, threads);
    result(name, c.ok(), c.summary());
}

static void check_rmsnorm(ref::Rng& rng, int rows, int hidden, bool with_add, int threads) {
    auto res = ref::random_bf16(rng, (size_t)rows * hidden, 2.0f);
    auto add = with_add ? ref::random_bf16(rng, (size_t)rows * hidden, 2.0f) : std::vector<uint16_t>();
    auto w = ref::random_bf16(rng, hidden, 0.5f, 1.0f);
    const float eps = 1e-5f;
    Dev<uint16_t> dres(res), dadd(add), dw(w), dout((size_t)rows * hidden);
    fused_add_rmsnorm_bf16<<<rows, threads>>>(dres.p, with_add ? dadd.p : nullptr, dw.p, dout.p, hidden, eps);
    launched();
    std::vector<double> new_res, want;
    ref::add_rmsnorm(res, add, w, rows, hidden, eps, new_res, want);
    auto got = dout.get(), got_res = dres.get();
    ref::Check c = bf16_check(1.0), cr = bf16_check(1.0);
    for (size_t i = 0; i < got.size(); i++) {
        c.add(ref::bf(got[i]), want[i]);
        cr.add(ref::bf(got_res[i]), new_res[i]);
    }
    char name[96];
    std::snprintf(name, sizeof name, "rmsnorm[rows=%d,h=%d,add=%d,threads=%d]", rows, hidden, (int)with_add, threads);
    result(name, c.ok() && cr.ok(), "out: " + c.summary() + "; residual: " + cr.summary());
}

static void check_silu(ref::Rng& rng, int tokens, int inter, int threads) {
    auto gu = ref::random_bf16(rng, (size_t)tokens * 2 * inter, 4.0f);
    Dev<uint16_t> dgu(gu), dout((size_t)tokens * inter);
    dim3 grid((inter + threads - 1) / threads, tokens);
    silu_and_mul_bf16<<<grid, threads>>>(dgu.p, dout.p, inter);
    launched();
    auto got = dout.get();
    auto want = ref::silu_mul(gu, tokens, inter);
    ref::Check c = bf16_check(1.0);
    for (size_t i = 0; i < got.size(); i++) c.add(ref::bf(got[i]), want[i]);
    char name[96];
    std::snprintf(name, sizeof name, "silu_mul[t=%d,inter=%d,threads=%d]", tokens, inter, threads);
    result(name, c.ok(), c.summary());
}

// RoPE on q and k at the given positions, and k, v into the cache at `slots`
// (some negative: not cached). The cache starts filled with a sentinel so a
// stray write shows.
static void check_rope(ref::Rng& rng, const char* label, const std::vector<int>& positions, int heads, int kv_heads, int head_dim,
                       int block_size, bool neox, double theta) {
    int tokens = (int)positions.size();
    int blocks = (tokens + block_size - 1) / block_size + 2;
    std::vector<float> inv_freq(head_dim / 2);
    for (int i = 0; i < head_dim / 2; i++) inv_freq[i] = (float)std::pow(theta, -2.0 * i / head_dim);
    auto q = ref::random_bf16(rng, (size_t)tokens * heads * head_dim, 1.0f);
    auto k = ref::random_bf16(rng, (size_t)tokens * kv_heads * head_dim, 1.0f);
    auto v = ref::random_bf16(rng, (size_t)tokens * kv_heads * head_dim, 1.0f);
    // Slots: a shuffled placement over the blocks; every 5th token not cached.
    std::vector<long long> slots(tokens);
    std::vector<int> free_slots(blocks * block_size);
    for (size_t i = 0; i < free_slots.size(); i++) free_slots[i] = (int)i;
    for (size_t i = free_slots.size() - 1; i > 0; i--) std::swap(free_slots[i], free_slots[rng.below((uint32_t)i + 1)]);
    for (int t = 0; t < tokens; t++) slots[t] = (t % 5 == 4) ? -1 : free_slots[t];
    const uint16_t SENTINEL = 0x7fc1;  // a NaN no kernel makes
    std::vector<uint16_t> cache((size_t)blocks * kv_heads * block_size * head_dim, SENTINEL);
    Dev<uint16_t> dq(q), dk(k), dv(v), dkc(cache), dvc(cache);
    Dev<int> dpos(positions);
    Dev<long long> dslots(slots);
    Dev<float> dfreq(inv_freq);
    rope_write_kv_bf16<<<tokens, 128>>>(dq.p, dk.p, dv.p, dkc.p, dvc.p, dpos.p, dslots.p, dfreq.p, heads, kv_heads, head_dim, block_size,
                                        neox ? 1 : 0);
    launched();
    std::vector<double> wq(q.size()), wk(k.size());
    for (size_t i = 0; i < q.size(); i++) wq[i] = ref::bf(q[i]);
    for (size_t i = 0; i < k.size(); i++) wk[i] = ref::bf(k[i]);
    for (int t = 0; t < tokens; t++) {
        for (int h = 0; h < heads; h++) ref::rope_head(wq, ((size_t)t * heads + h) * head_dim, head_dim, positions[t], inv_freq, neox);
        for (int h = 0; h < kv_heads; h++) ref::rope_head(wk, ((size_t)t * kv_heads + h) * head_dim, head_dim, positions[t], inv_freq, neox);
    }
    auto gq = dq.get(), gk = dk.get(), gkc = dkc.get(), gvc = dvc.get();
    ref::Check c = bf16_check(1.0);
    for (size_t i = 0; i < gq.size(); i++) c.add(ref::bf(gq[i]), wq[i]);
    for (size_t i = 0; i < gk.size(); i++) c.add(ref::bf(gk[i]), wk[i]);
    // The cache holds exactly the kernel's rotated k and the input v at each
    // cached token's slot, and the sentinel everywhere else.
    std::vector<uint16_t> want_kc(cache), want_vc(cache);
    for (int t = 0; t < tokens; t++) {
        if (slots[t] < 0) continue;
        long long b = slots[t] / block_size, off = slots[t] % block_size;
        for (int h = 0; h < kv_heads; h++)
            for (int d = 0; d < head_dim; d++) {
                size_t dst = (((size_t)b * kv_heads + h) * block_size + off) * head_dim + d;
                size_t src = ((size_t)t * kv_heads + h) * head_dim + d;
                want_kc[dst] = gk[src];
                want_vc[dst] = v[src];
            }
    }
    size_t cache_bad = 0;
    for (size_t i = 0; i < cache.size(); i++) cache_bad += (gkc[i] != want_kc[i]) + (gvc[i] != want_vc[i]);
    char name[128];
    std::snprintf(name, sizeof name, "rope_kv[%s,t=%d,heads=%d/%d,d=%d,bs=%d,neox=%d]", label, tokens, heads, kv_heads, head_dim, block_size,
                  (int)neox);
    result(name, c.ok() && cache_bad == 0, "q,k: " + c.summary() + "; cache values off: " + std::to_string(cache_bad));
}

// A paged cache of random keys and values for sequences of `lens` tokens,
// their blocks shuffled over the pool so block tables are not the identity.
struct PagedCache {
    int heads, kv_heads, head_dim, block_size, max_blocks;
    std::vector<int> lens, block_tables;
    std::vector<uint16_t> k, v;
    PagedCache(ref::Rng& rng, const std::vector<int>& lens_, int heads_, int kv_heads_, int head_dim_, int block_size_)
        : heads(heads_), kv_heads(kv_heads_), head_dim(head_dim_), block_size(block_size_), lens(lens_) {
        max_blocks = 0;
        int total = 0;
        for (int l : lens) {
            max_blocks = std::max(max_blocks, (l + block_size - 1) / block_size);
            total += (l + block_size - 1) / block_size;
        }
        std::vector<int> pool(total + 3);
        for (size_t i = 0; i < pool.size(); i++) pool[i] = (int)i;
        for (size_t i = pool.size() - 1; i > 0; i--) std::swap(pool[i], pool[rng.below((uint32_t)i + 1)]);
        block_tables.assign(lens.size() * max_blocks, -1);  // unused entries: a bad index if read
        int next = 0;
        for (size_t s = 0; s < lens.size(); s++)
            for (int b = 0; b < (lens[s] + block_size - 1) / block_size; b++) block_tables[s * max_blocks + b] = pool[next++];
        size_t elems = pool.size() * (size_t)kv_heads * block_size * head_dim;
        // Keys spread wider than values, so the softmax is peaked enough that
        // a lost or double-counted partition changes the answer visibly.
        k = ref::random_bf16(rng, elems, 2.0f);
        v = ref::random_bf16(rng, elems, 1.0f);
    }
};

static void check_decode(ref::Rng& rng, const char* label, const std::vector<int>& lens, int heads, int kv_heads, int head_dim, int block_size,
                         int threads) {
    PagedCache pc(rng, lens, heads, kv_heads, head_dim, block_size);
    int seqs = (int)lens.size();
    int longest = *std::max_element(lens.begin(), lens.end());
    int parts = (longest + PARTITION - 1) / PARTITION;
    auto q = ref::random_bf16(rng, (size_t)seqs * heads * head_dim, 2.0f);
    double scale = 1.0 / std::sqrt((double)head_dim);
    Dev<uint16_t> dq(q), dk(pc.k), dv(pc.v), dout((size_t)seqs * heads * head_dim);
    Dev<int> dbt(pc.block_tables), dlen(lens);
    Dev<float> pout((size_t)seqs * heads * parts * head_dim), pmax((size_t)seqs * heads * parts), psum((size_t)seqs * heads * parts);
    paged_attention_decode_bf16<<<dim3(heads, seqs, parts), threads>>>(pout.p, pmax.p, psum.p, dq.p, dk.p, dv.p, dbt.p, dlen.p, pc.max_blocks,
                                                                        heads, kv_heads, head_dim, block_size, (float)scale);
    launched();
    paged_attention_reduce_bf16<<<dim3(heads, seqs), threads>>>(dout.p, pout.p, pmax.p, psum.p, heads, head_dim, parts);
    launched();
    auto got = dout.get();
    ref::Check c = bf16_check(1.0);
    std::vector<double> want(head_dim);
    for (int s = 0; s < seqs; s++)
        for (int h = 0; h < heads; h++) {
            ref::attend(q, ((size_t)s * heads + h) * head_dim, pc.k, pc.v, pc.block_tables, pc.max_blocks, s, lens[s], h / (heads / kv_heads),
                        kv_heads, block_size, head_dim, scale, want.data());
            for (int d = 0; d < head_dim; d++) c.add(ref::bf(got[((size_t)s * heads + h) * head_dim + d]), want[d]);
        }
    char name[128];
    std::snprintf(name, sizeof name, "attn_decode[%s,seqs=%d,max_len=%d,parts=%d,heads=%d/%d,d=%d,bs=%d]", label, seqs, longest, parts, heads,
                  kv_heads, head_dim, block_size);
    result(name, c.ok(), c.summary());
}

// Prefill chunks: sequence s computes tokens start[s]..start[s]+count[s]-1
// (start > 0: a later chunk of a prompt whose earlier part is cached).
static void check_prefill(ref::Rng& rng, const char* label, const std::vector<int>& start, const std::vector<int>& count, int heads,
                          int kv_heads, int head_dim, int block_size) {
    std::vector<int> lens(start.size());
    for (size_t s = 0; s < start.size(); s++) lens[s] = start[s] + count[s];
    PagedCache pc(rng, lens, heads, kv_heads, head_dim, block_size);
    std::vector<int> tseq, tpos;
    for (size_t s = 0; s < start.size(); s++)
        for (int p = start[s]; p < lens[s]; p++) { tseq.push_back((int)s); tpos.push_back(p); }
    int tokens = (int)tseq.size();
    auto q = ref::random_bf16(rng, (size_t)tokens * heads * head_dim, 2.0f);
    double scale = 1.0 / std::sqrt((double)head_dim);
    Dev<uint16_t> dq(q), dk(pc.k), dv(pc.v), dout((size_t)tokens * heads * head_dim);
    Dev<int> dbt(pc.block_tables), dts(tseq), dtp(tpos);
    paged_attention_prefill_bf16<<<dim3(tokens, heads), 32>>>(dout.p, dq.p, dk.p, dv.p, dbt.p, dts.p, dtp.p, pc.max_blocks, heads, kv_heads,
                                                               head_dim, block_size, (float)scale);
    launched();
    auto got = dout.get();
    ref::Check c = bf16_check(1.0);
    std::vector<double> want(head_dim);
    for (int t = 0; t < tokens; t++)
        for (int h = 0; h < heads; h++) {
            ref::attend(q, ((size_t)t * heads + h) * head_dim, pc.k, pc.v, pc.block_tables, pc.max_blocks, tseq[t], tpos[t] + 1,
                        h / (heads / kv_heads), kv_heads, block_size, head_dim, scale, want.data());
            for (int d = 0; d < head_dim; d++) c.add(ref::bf(got[((size_t)t * heads + h) * head_dim + d]), want[d]);
        }
    char name[128];
    std::snprintf(name, sizeof name, "attn_prefill[%s,tokens=%d,max_pos=%d,heads=%d/%d,d=%d,bs=%d]", label, tokens,
                  *std::max_element(tpos.begin(), tpos.end()), heads, kv_heads, head_dim, block_size);
    result(name, c.ok(), c.summary());
}

// sample_rows over rows of random logits, each row its own settings. Checked:
// the penalized logits (the kernel leaves them in place), the greedy rows'
// exact argmax (ties included), every drawn token inside what the settings
// allow, and each draw equal to the float64 inverse-CDF draw of the same
// uniform number unless the two sit within rounding of a bucket's edge.
// The device's draw_bits against the engine's pinned vectors (rng.rs) and
// the float64 reference's, on many more (seed, position, sub) triples.
__global__ void draw_bits_kernel(const unsigned long long* args, unsigned long long* out, double* unit, int n) {
    int i = blockIdx.x;
    if (i >= n || threadIdx.x != 0) return;
    out[i] = draw_bits(args[3 * i], args[3 * i + 1], args[3 * i + 2]);
    unit[i] = draw_unit(args[3 * i], args[3 * i + 1], args[3 * i + 2]);
}

static void check_draw_bits(ref::Rng& rng) {
    std::vector<unsigned long long> args;
    for (auto& a : ref::DRAW_VECTOR_ARGS) args.insert(args.end(), {a[0], a[1], a[2]});
    for (int i = 0; i < 4091; i++) args.insert(args.end(), {rng.next(), rng.next() >> rng.below(64), rng.below(4)});
    int n = (int)args.size() / 3;
    Dev<unsigned long long> da(args), dout((size_t)n);
    Dev<double> du((size_t)n);
    LAUNCH(draw_bits_kernel, n, 32, da.p, dout.p, du.p, n);
    launched();
    auto got = dout.get();
    auto unit = du.get();
    int vectors_ok = 0, bad = 0;
    for (int i = 0; i < 5; i++) vectors_ok += got[i] == ref::DRAW_VECTORS[i];
    for (int i = 0; i < n; i++) {
        uint64_t want = ref::draw_bits(args[3 * i], args[3 * i + 1], args[3 * i + 2]);
        if (got[i] != want || unit[i] != ref::draw_unit(args[3 * i], args[3 * i + 1], args[3 * i + 2])) bad++;
    }
    char what[160];
    std::snprintf(what, sizeof what, "engine vectors %d/5 equal; %d of %d draws differ from the reference", vectors_ok, bad, n);
    result("draw_bits", vectors_ok == 5 && bad == 0, what);
}

// Rows of every kind (see sampling_rows) over random logits, with a grammar
// mask, banned ids, logit_bias and penalties on some rows, and logprobs asked
// for on others. Checked: the kernel's processed row (after the penalties, and
// the temperature's division) against the f32 reference exactly up to 1e-6,
// the pick (greedy: exactly the argmax; drawn: the float64 reference's pick
// for the same u, or within rounding of a bucket edge), and the logprobs.
static void check_sampling(ref::Rng& rng, const char* label, int vocab, std::vector<ref::RowParams> params, float quantum = 0.0f) {
    int rows = (int)params.size();
    std::vector<float> logits((size_t)rows * vocab);
    for (auto& x : logits) x = rng.sym(8.0f);
    // Coarse logits (multiples of `quantum`): many exact ties at top-k's k-th
    // value and at top-p's crossing, which must be kept by id order as the host does.
    if (quantum > 0.0f)
        for (auto& x : logits) x = std::round(x / quantum) * quantum;
    // Row 0 holds a tie for the maximum (greedy must take the lower id), and a
    // NaN and a +inf to be clamped.
    logits[7] = logits[vocab - 3] = 50.0f;
    logits[11] = NAN;
    if (rows > 1) logits[(size_t)vocab + 5] = INFINITY;
    ref::RowLists lists;
    int words = (vocab + 31) / 32;
    for (int r = 0; r < rows; r++) {
        auto& p = params[r];
        // A distinct set of penalized tokens per row (the kernel writes each once).
        p.pen_from = (int)lists.pen_tokens.size();
        int n = 40 + (int)rng.below(40);
        std::vector<uint32_t> chosen;
        while ((int)chosen.size() < n) {
            uint32_t t = rng.below(vocab);
            if (std::find(chosen.begin(), chosen.end(), t) == chosen.end()) chosen.push_back(t);
        }
        for (uint32_t t : chosen) {
            lists.pen_tokens.push_back(t);
            lists.pen_counts.push_back(rng.below(4));
            lists.pen_in_prompt.push_back((unsigned char)rng.below(2));
        }
        p.pen_to = (int)lists.pen_tokens.size();
        // logit_bias on every third row (one token twice: it adds twice), banned ids on every fourth.
        p.bias_from = (int)lists.bias_tokens.size();
        if (r % 3 == 1) {
            for (int i = 0; i < 6; i++) { lists.bias_tokens.push_back(rng.below(vocab)); lists.bias_values.push_back(rng.sym(20.0f)); }
            lists.bias_tokens.push_back(lists.bias_tokens.back()); lists.bias_values.push_back(3.0f);
            lists.bias_tokens.push_back((uint32_t)vocab + 3); lists.bias_values.push_back(5.0f);  // outside: skipped
        }
        p.bias_to = (int)lists.bias_tokens.size();
        p.ban_from = (int)lists.ban_tokens.size();
        if (r % 4 == 2) {
            for (int i = 0; i < 5; i++) lists.ban_tokens.push_back(rng.below(vocab));
            lists.ban_tokens.push_back(7);  // row 0's tied maximum position, if this were row 0
        }
        p.ban_to = (int)lists.ban_tokens.size();
        // A grammar mask on every fifth row: about a tenth of the vocabulary allowed.
        p.mask_word = -1;
        if (r % 5 == 3) {
            p.mask_word = (long long)lists.mask_words.size();
            for (int w = 0; w < words; w++) {
                uint32_t m = 0;
                for (int b = 0; b < 32; b++) m |= (rng.below(10) == 0 ? 1u : 0u) << b;
                lists.mask_words.push_back(m);
            }
        }
        p.logprobs = r % 3 == 0 ? (int)rng.below(21) : -1;
    }
    Dev<float> dl(logits), draw_((size_t)rows * vocab);
    Dev<ref::RowParams> dp(params);
    Dev<uint32_t> dtok(lists.pen_tokens), dcnt(lists.pen_counts), dbt(lists.bias_tokens), dban(lists.ban_tokens), dmask(lists.mask_words);
    Dev<float> dbv(lists.bias_values);
    Dev<unsigned char> dpr(lists.pen_in_prompt);
    Dev<uint32_t> dout((size_t)rows), dtop((size_t)rows * MAX_TOP_LOGPROBS);
    Dev<float> dlp((size_t)rows), dtoplp((size_t)rows * MAX_TOP_LOGPROBS);
    Dev<int> drank((size_t)rows);
    static_assert(sizeof(ref::RowParams) == sizeof(RowParams), "RowParams layout");
    LAUNCH(sample_rows, rows, SAMPLE_THREADS, dl.p, draw_.p, vocab, reinterpret_cast<const RowParams*>(dp.p), dtok.p, dcnt.p, dpr.p,
           dbt.p, dbv.p, dban.p, dmask.p, dout.p, dlp.p, drank.p, dtop.p, dtoplp.p);
    launched();
    auto got_l = dl.get();
    auto got_raw = draw_.get();
    auto picks = dout.get();
    auto lps = dlp.get();
    auto ranks = drank.get();
    auto tops = dtop.get();
    auto toplps = dtoplp.get();
    ref::Check pen(1e-6, 1e-6), lpc(1e-5, 1e-5);
    int outside = 0, exact = 0, edge = 0, wrong = 0, lp_wrong = 0;
    std::string first_wrong;
    for (int r = 0; r < rows; r++) {
        const auto& p = params[r];
        std::vector<float> row(logits.begin() + (size_t)r * vocab, logits.begin() + (size_t)(r + 1) * vocab), raw;
        ref::prepare_row(row, p, lists, raw);
        if (!ref::greedy(p)) ref::divide_by_temperature(row, p);
        for (int i = 0; i < vocab; i++) pen.add(got_l[(size_t)r * vocab + i], row[i]);
        // From here on the kernel's own processed row is the input, so float
        // rounding in the penalties cannot move the draw.
        std::vector<float> krow(got_l.begin() + (size_t)r * vocab, got_l.begin() + (size_t)(r + 1) * vocab);
        int pick = (int)picks[r];
        int raw_am = std::max(ref::argmax(raw), 0);
        if (p.logprobs >= 0 && pick >= 0 && pick < vocab) {
            auto want = ref::logprobs_reference(raw, pick, p.logprobs);
            lpc.add(lps[r], want.logprob);
            bool same = ranks[r] == want.rank;
            for (size_t j = 0; j < want.top.size(); j++) {
                same = same && (int)tops[(size_t)r * MAX_TOP_LOGPROBS + j] == want.top[j].first;
                lpc.add(toplps[(size_t)r * MAX_TOP_LOGPROBS + j], want.top[j].second);
            }
            if (!same) { lp_wrong++; if (first_wrong.empty()) first_wrong = "row " + std::to_string(r) + ": logprob rank or top ids"; }
        }
        if (ref::greedy(p)) {
            int want = ref::argmax(krow);
            if (want < 0) want = raw_am;
            if (pick == want) exact++; else { wrong++; if (first_wrong.empty()) first_wrong = "greedy row " + std::to_string(r); }
            continue;
        }
        double u = ref::draw_unit(p.seed, p.position, 0);
        ref::Draw loose = ref::sample_reference(krow, p, u, 1e-4);
        ref::Draw strict = ref::sample_reference(krow, p, u, 0.0);
        if (strict.pick < 0) { if (pick == raw_am) exact++; else wrong++; continue; }
        if (pick < 0 || pick >= vocab || loose.w[pick] == 0.0) { outside++; continue; }
        if (pick == strict.pick) { exact++; continue; }
        // Different bucket: fine only when u lies within rounding of the edge
        // between the two picks in the cumulative mass.
        int lo = std::min(pick, strict.pick);
        double run = 0.0;
        for (int i = 0; i < lo; i++) run += strict.w[i];
        double cut = run + strict.w[lo];
        double ud = u * strict.total;
        if (std::fabs(ud - cut) <= 1e-4 * strict.total || std::fabs(ud - run) <= 1e-4 * strict.total) edge++;
        else { wrong++; if (first_wrong.empty()) first_wrong = "row " + std::to_string(r) + ": drew " + std::to_string(pick) + ", reference " + std::to_string(strict.pick); }
    }
    char name[96];
    std::snprintf(name, sizeof name, "sampling[%s,rows=%d,vocab=%d]", label, rows, vocab);
    char what[320];
    std::snprintf(what, sizeof what, "processed logits: %s; logprobs: %s, %d rows wrong; draws equal %d, at a bucket edge %d, outside the allowed set %d, wrong %d%s%s",
                  pen.summary().c_str(), lpc.summary().c_str(), lp_wrong, exact, edge, outside, wrong, first_wrong.empty() ? "" : "; first: ", first_wrong.c_str());
    result(name, pen.ok() && lpc.ok() && outside == 0 && wrong == 0 && lp_wrong == 0, what);
}

static std::vector<ref::RowParams> sampling_rows(ref::Rng& rng, int rows) {
    std::vector<ref::RowParams> out;
    for (int r = 0; r < rows; r++) {
        ref::RowParams p{};
        p.temperature = 1.0f;
        p.top_p = 1.0f;
        p.repetition = 1.0f;
        p.seed = rng.next();
        p.position = rng.below(1000);
        switch (r % 8) {
            case 0: p.temperature = 0.0f; p.repetition = 1.3f; break;              // greedy, penalized
            case 1: p.temperature = 0.0f; break;                                   // greedy
            case 2: break;                                                         // plain draw
            case 3: p.temperature = 0.7f; p.top_k = 50; break;
            case 4: p.temperature = 1.3f; p.top_p = 0.9f; break;
            case 5: p.temperature = 0.8f; p.min_p = 0.05f; p.top_k = 200; p.top_p = 0.95f; break;
            case 6: p.temperature = 1.0f; p.presence = 0.5f; p.frequency = 0.3f; p.repetition = 1.1f; p.top_p = 0.8f; break;
            case 7: p.temperature = 0.005f; p.top_k = 1; break;                    // raised to 0.01; top-k 1 is greedy by another road
        }
        out.push_back(p);
    }
    return out;
}

int main(int argc, char** argv) {
    uint64_t seed = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 20261201ull;
    int dev_count = 0;
    CK(cudaGetDeviceCount(&dev_count));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    std::printf("device 0: %s, sm_%d%d, %d SMs; seed %llu\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount,
                (unsigned long long)seed);
    ref::Rng rng(seed);

#ifndef FERRY_HOST_EMULATION
    check_embedding(rng, 37, 576, 49152, 256);   // SmolLM2's width
    check_embedding(rng, 5, 1003, 1009, 128);    // widths that are no multiple of the block

    check_rmsnorm(rng, 33, 576, true, 256);
    check_rmsnorm(rng, 7, 1003, true, 256);
    check_rmsnorm(rng, 3, 4096, false, 1024);
    check_rmsnorm(rng, 2, 50, true, 64);         // fewer elements than threads

    check_silu(rng, 19, 1536, 256);
    check_silu(rng, 3, 1001, 256);

    std::vector<int> short_pos(40), long_pos, very_long_pos;
    for (int i = 0; i < 40; i++) short_pos[i] = i;
    for (int i = 0; i < 64; i++) long_pos.push_back(4090 + 97 * i);        // 4090 .. 10201
    for (int i = 0; i < 16; i++) very_long_pos.push_back(131071 - 4099 * i);  // Llama 3 lengths
    check_rope(rng, "short", short_pos, 9, 3, 64, 16, false, 10000.0);      // SmolLM2: GGUF's adjacent pairs
    check_rope(rng, "short", short_pos, 8, 2, 128, 16, true, 500000.0);     // Hugging Face's half split
    check_rope(rng, "4k+", long_pos, 9, 3, 64, 16, true, 10000.0);
    check_rope(rng, "4k+", long_pos, 4, 4, 128, 7, false, 500000.0);        // a block size no power of two
    check_rope(rng, "128k", very_long_pos, 4, 2, 128, 16, true, 500000.0);

    check_decode(rng, "short", {1, 5, 17, 64}, 9, 3, 64, 16, 128);
    check_decode(rng, "partition edges", {511, 512, 513, 1025}, 8, 2, 128, 16, 128);
    check_decode(rng, "4k+", {4096, 4097, 6001, 300}, 9, 3, 64, 16, 128);
    check_decode(rng, "8k,d256", {8191, 2}, 4, 1, 256, 16, 256);

    check_prefill(rng, "fresh", {0, 0, 0}, {1, 17, 70}, 9, 3, 64, 16);
    check_prefill(rng, "chunked 4k+", {4000, 0}, {96, 33}, 9, 3, 64, 16);
    check_prefill(rng, "d128,bs7", {0, 5}, {45, 60}, 8, 2, 128, 7);
    check_prefill(rng, "d256", {2000}, {8}, 4, 2, 256, 16);

#endif
    check_draw_bits(rng);
    check_sampling(rng, "small", 1009, sampling_rows(rng, 16));
    check_sampling(rng, "SmolLM2", 49152, sampling_rows(rng, 16));
    check_sampling(rng, "Qwen2", 151936, sampling_rows(rng, 8));
    check_sampling(rng, "ties", 4099, sampling_rows(rng, 16), 0.5f);

    std::printf("%d case(s) failed\n", failures);
    return std::min(failures, 99);
}
