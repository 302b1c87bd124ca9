// Host-side references for ferry's CUDA kernels (kernels/*.cu), in float64.
//
// Plain C++17, no CUDA: kernels_check.cu uses it on the GPU machine, and
// reference_selftest.cpp checks it with g++ on any machine. Inputs are the
// kernels' own (bf16 bits, f32 tables); the arithmetic is done in double so a
// kernel's error is measured against the exact answer to the same inputs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace ref {

inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Round to nearest even, NaN kept quiet: the kernels' own f32_to_bf16.
inline uint16_t f32_to_bf16(float f) {
    uint32_t b;
    std::memcpy(&b, &f, 4);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((b >> 16) | 0x40);
    b += 0x7fffu + ((b >> 16) & 1u);
    return (uint16_t)(b >> 16);
}

inline double bf(uint16_t x) { return (double)bf16_to_f32(x); }

// splitmix64: fresh inputs from a seed the harness prints, so a failure reruns.
struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed) {}
    uint64_t next() {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    double uniform() { return (double)(next() >> 11) * (1.0 / 9007199254740992.0); }
    float sym(float a) { return (float)((2.0 * uniform() - 1.0) * a); }
    uint32_t below(uint32_t n) { return (uint32_t)(next() % n); }
};

inline std::vector<uint16_t> random_bf16(Rng& r, size_t n, float scale, float offset = 0.0f) {
    std::vector<uint16_t> v(n);
    for (auto& x : v) x = f32_to_bf16(offset + r.sym(scale));
    return v;
}

// The sampler's counter-based draw (common.cuh's draw_bits, the engine's
// rng::draw_bits), bit for bit, and its uniform in [0, 1) with 53 bits.
inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
inline uint64_t draw_bits(uint64_t seed, uint64_t position, uint64_t sub) {
    uint64_t h = mix64(seed ^ 0x9E3779B97F4A7C15ull);
    h = mix64(h ^ (position * 0xD1B54A32D192ED03ull));
    return mix64(h ^ (sub * 0xAEF17502108EF2D9ull));
}
inline double draw_unit(uint64_t seed, uint64_t position, uint64_t sub) {
    return (double)(draw_bits(seed, position, sub) >> 11) * (1.0 / 9007199254740992.0);
}
// engine/src/rng.rs's DRAW_VECTORS: draw_bits of (0,0,0), (42,0,0), (42,1,0),
// (42,0,1), (2^64-1, 2^40, 7), computed outside Rust.
static const uint64_t DRAW_VECTOR_ARGS[5][3] = {{0, 0, 0}, {42, 0, 0}, {42, 1, 0}, {42, 0, 1}, {~0ull, 1ull << 40, 7}};
static const uint64_t DRAW_VECTORS[5] = {0x33FE8BD4F9C57863ull, 0x6B9AF54417D0BF75ull, 0x74DC7851EA78D0FDull,
                                         0xB61981596C3F1275ull, 0xD26A14F26D257DB5ull};

// Error of got against want: each element may be off by atol + rtol * |want|;
// `worst` is the largest ratio of error to that allowance (pass: <= 1).
struct Check {
    double atol, rtol;
    double worst = 0.0, max_abs = 0.0;
    size_t n = 0, bad = 0, worst_at = 0;
    Check(double a, double r) : atol(a), rtol(r) {}
    void add(double got, double want) {
        // Equal values (infinities included) are exact; a NaN on one side only is wrong.
        double err = got == want ? 0.0 : std::fabs(got - want);
        if (std::isnan(got) != std::isnan(want)) err = INFINITY;
        double ratio = err == 0.0 ? 0.0 : err / (atol + rtol * std::fabs(want));
        if (!(ratio <= 1.0)) bad++;
        if (!(ratio <= worst)) { worst = ratio; worst_at = n; }
        max_abs = std::max(max_abs, err);
        n++;
    }
    bool ok() const { return n > 0 && bad == 0; }
    std::string summary() const {
        char b[160];
        std::snprintf(b, sizeof b, "%zu values, %zu off, max |err| %.3g, worst err/allowed %.3g (at %zu)", n, bad, max_abs, worst, worst_at);
        return b;
    }
};

// embedding_gather_bf16: rows of the table, zeros for an id outside it.
inline std::vector<double> embedding(const std::vector<uint16_t>& table, const std::vector<uint32_t>& ids, int hidden, int vocab) {
    std::vector<double> out(ids.size() * hidden, 0.0);
    for (size_t t = 0; t < ids.size(); t++)
        if (ids[t] < (uint32_t)vocab)
            for (int i = 0; i < hidden; i++) out[t * hidden + i] = bf(table[(size_t)ids[t] * hidden + i]);
    return out;
}

// fused_add_rmsnorm_bf16: x = residual + add (add may be empty); out = x / rms(x) * weight.
inline void add_rmsnorm(const std::vector<uint16_t>& residual, const std::vector<uint16_t>& add, const std::vector<uint16_t>& weight,
                        int rows, int hidden, double eps, std::vector<double>& new_residual, std::vector<double>& out) {
    new_residual.assign((size_t)rows * hidden, 0.0);
    out.assign((size_t)rows * hidden, 0.0);
    for (int r = 0; r < rows; r++) {
        double ss = 0.0;
        for (int i = 0; i < hidden; i++) {
            size_t j = (size_t)r * hidden + i;
            double x = bf(residual[j]) + (add.empty() ? 0.0 : bf(add[j]));
            new_residual[j] = x;
            ss += x * x;
        }
        double inv = 1.0 / std::sqrt(ss / hidden + eps);
        for (int i = 0; i < hidden; i++) {
            size_t j = (size_t)r * hidden + i;
            out[j] = new_residual[j] * inv * bf(weight[i]);
        }
    }
}

// silu_and_mul_bf16: gate and up side by side in rows of 2 * inter.
inline std::vector<double> silu_mul(const std::vector<uint16_t>& gate_up, int tokens, int inter) {
    std::vector<double> out((size_t)tokens * inter);
    for (int t = 0; t < tokens; t++)
        for (int j = 0; j < inter; j++) {
            double g = bf(gate_up[(size_t)t * 2 * inter + j]), u = bf(gate_up[(size_t)t * 2 * inter + inter + j]);
            out[(size_t)t * inter + j] = g / (1.0 + std::exp(-g)) * u;
        }
    return out;
}

// rope_write_kv_bf16's rotation of one head in place. The angle is the f32
// product the kernel forms (position times the f32 table entry, one IEEE
// multiply), and its sine and cosine are taken exactly: what is measured is
// the kernel's sine and cosine and its rounding, not the angle's f32 product,
// which Hugging Face's own f32 RoPE shares.
inline void rope_head(std::vector<double>& x, size_t base, int head_dim, int pos, const std::vector<float>& inv_freq, bool neox) {
    int half = head_dim / 2;
    for (int i = 0; i < half; i++) {
        int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
        double ang = (double)((float)pos * inv_freq[i]);
        double s = std::sin(ang), c = std::cos(ang);
        double x0 = x[base + a], x1 = x[base + b];
        x[base + a] = x0 * c - x1 * s;
        x[base + b] = x0 * s + x1 * c;
    }
}

// The paged cache's index: [block][kv_head][offset][head_dim].
inline size_t kv_index(const std::vector<int>& block_tables, int max_blocks, int seq, int pos, int kvh, int kv_heads, int block_size, int head_dim) {
    int block = block_tables[(size_t)seq * max_blocks + pos / block_size];
    return (((size_t)block * kv_heads + kvh) * block_size + pos % block_size) * head_dim;
}

// Softmax attention of one query head over keys 0..n-1 of sequence `seq`.
inline void attend(const std::vector<uint16_t>& q, size_t q_off, const std::vector<uint16_t>& kc, const std::vector<uint16_t>& vc,
                   const std::vector<int>& bt, int max_blocks, int seq, int n, int kvh, int kv_heads, int block_size, int head_dim,
                   double scale, double* out) {
    std::vector<double> s(n);
    double m = -INFINITY;
    for (int j = 0; j < n; j++) {
        size_t base = kv_index(bt, max_blocks, seq, j, kvh, kv_heads, block_size, head_dim);
        double dot = 0.0;
        for (int d = 0; d < head_dim; d++) dot += bf(q[q_off + d]) * bf(kc[base + d]);
        s[j] = dot * scale;
        m = std::max(m, s[j]);
    }
    double l = 0.0;
    for (int j = 0; j < n; j++) l += (s[j] = std::exp(s[j] - m));
    for (int d = 0; d < head_dim; d++) out[d] = 0.0;
    for (int j = 0; j < n; j++) {
        size_t base = kv_index(bt, max_blocks, seq, j, kvh, kv_heads, block_size, head_dim);
        for (int d = 0; d < head_dim; d++) out[d] += s[j] / l * bf(vc[base + d]);
    }
}

// One sampling row as sample_rows takes it (kernels/sampling.cu's RowParams).
struct RowParams {
    float temperature, top_p, min_p, repetition, presence, frequency;
    int top_k;
    int logprobs;  // -1: none
    uint64_t seed, position;
    int pen_from, pen_to, bias_from, bias_to, ban_from, ban_to;
    long long mask_word;  // -1: no grammar mask
};
static_assert(sizeof(RowParams) == 80, "RowParams is 80 bytes (the engine packs it so)");

// The flat lists the rows' ranges point into.
struct RowLists {
    std::vector<uint32_t> pen_tokens, pen_counts;
    std::vector<unsigned char> pen_in_prompt;
    std::vector<uint32_t> bias_tokens;
    std::vector<float> bias_values;
    std::vector<uint32_t> ban_tokens;
    std::vector<uint32_t> mask_words;
};

const float kF32Max = 3.402823466e38f;

// Steps 1-4 of sample_rows, in f32 as the engine's host sampler does them:
// `raw` becomes the masked, sanitized row (logprobs come from it), `l` the
// row after banned ids, logit_bias and penalties.
inline void prepare_row(std::vector<float>& l, const RowParams& p, const RowLists& s, std::vector<float>& raw) {
    size_t v = l.size();
    for (size_t i = 0; i < v; i++) {
        float x = l[i];
        if (p.mask_word >= 0 && !((s.mask_words[p.mask_word + (i >> 5)] >> (i & 31)) & 1u)) x = -INFINITY;
        l[i] = (x != x) ? -INFINITY : std::min(x, kF32Max);
    }
    raw = l;
    for (int i = p.ban_from; i < p.ban_to; i++)
        if (s.ban_tokens[i] < v) l[s.ban_tokens[i]] = -INFINITY;
    for (int i = p.bias_from; i < p.bias_to; i++) {
        uint32_t t = s.bias_tokens[i];
        float b = s.bias_values[i];
        if (t < v && std::isfinite(b)) l[t] = std::min(l[t] + b, kF32Max);
    }
    float rep = p.repetition;
    bool use_rep = std::isfinite(rep) && rep > 0.0f && rep != 1.0f;
    float inv = 1.0f / rep;
    float freq = std::isfinite(p.frequency) ? p.frequency : 0.0f, pres = std::isfinite(p.presence) ? p.presence : 0.0f;
    for (int i = p.pen_from; i < p.pen_to; i++) {
        uint32_t t = s.pen_tokens[i];
        if (t >= v) continue;
        float x = l[t];
        uint32_t c = s.pen_counts[i];
        if (use_rep && (c > 0 || s.pen_in_prompt[i])) x = x > 0.0f ? x * inv : x * rep;
        if ((freq != 0.0f || pres != 0.0f) && c > 0) {
            float fc = freq * (float)c;
            x = x - fc;
            x = x - pres;
        }
        l[t] = x;
    }
}

inline bool greedy(const RowParams& p) { return !(p.temperature > 0.0f); }

// Step 5's division: l = min(l / T, MAX) with T = max(T, 0.01).
inline void divide_by_temperature(std::vector<float>& l, const RowParams& p) {
    float t = std::min(std::max(p.temperature, 1e-2f), kF32Max);
    for (auto& x : l) x = std::min(x / t, kF32Max);
}

// The greedy pick: the largest value, the lowest id among equal maxima; -1
// when every value is -inf.
inline int argmax(const std::vector<float>& l) {
    int best = -1;
    for (int i = 0; i < (int)l.size(); i++)
        if (l[i] > -INFINITY && (best < 0 || l[i] > l[best])) best = i;
    return best;
}

// What sample_rows may draw from a row already divided by the temperature,
// and the draw itself, in double: kept are min-p's survivors (l - max >=
// ln(min_p)) that are >= the k-th largest of them, and of those, in (l desc,
// id asc) order, each one while the mass before it is below top_p of their
// total. The draw walks the kept weights exp(l - max) in index order. `slack`
// widens each bound relatively, so a token within rounding of one counts as kept.
struct Draw {
    std::vector<double> w;  // exp(l - max) of kept tokens, 0 elsewhere
    double total = 0.0;
    int pick = -1;          // the inverse-CDF pick for u; -1: nothing kept
};

inline Draw sample_reference(const std::vector<float>& l, const RowParams& p, double u01, double slack) {
    int v = (int)l.size();
    Draw d;
    d.w.assign(v, 0.0);
    int am = argmax(l);
    if (am < 0) return d;
    double mx = l[am];
    float min_p = p.min_p != p.min_p ? 0.0f : std::min(std::max(p.min_p, 0.0f), 1.0f);
    double floor_ = min_p > 0.0f ? std::log((double)min_p) : -INFINITY;
    std::vector<char> keep(v, 0);
    std::vector<int> kept;
    for (int i = 0; i < v; i++)
        if (l[i] > -INFINITY && (double)l[i] - mx >= floor_ - slack) { keep[i] = 1; kept.push_back(i); }
    if (p.top_k > 0 && p.top_k < v && (int)kept.size() >= p.top_k) {
        std::vector<float> vals;
        for (int i : kept) vals.push_back(l[i]);
        std::nth_element(vals.begin(), vals.begin() + (p.top_k - 1), vals.end(), std::greater<float>());
        double kth = vals[p.top_k - 1];
        for (int i = 0; i < v; i++) keep[i] = keep[i] && (double)l[i] >= kth - slack * std::fabs(kth);
    }
    if (p.top_p < 1.0f) {
        std::vector<int> idx;
        double zs = 0.0;
        for (int i = 0; i < v; i++)
            if (keep[i]) { idx.push_back(i); zs += std::exp((double)l[i] - mx); }
        std::sort(idx.begin(), idx.end(), [&](int a, int b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
        double above = 0.0;
        std::vector<char> nucleus(v, 0);
        for (size_t k = 0; k < idx.size(); k++) {
            if (k > 0 && above >= (double)p.top_p * zs * (1.0 + slack)) break;
            nucleus[idx[k]] = 1;
            above += std::exp((double)l[idx[k]] - mx);
        }
        for (int i = 0; i < v; i++) keep[i] = keep[i] && nucleus[i];
    }
    for (int i = 0; i < v; i++)
        if (keep[i]) { d.w[i] = std::exp((double)l[i] - mx); d.total += d.w[i]; }
    double u = u01 * d.total, run = 0.0;
    for (int i = 0; i < v; i++) {
        if (d.w[i] <= 0.0) continue;
        run += d.w[i];
        d.pick = i;
        if (u < run) break;
    }
    return d;
}

// Logprobs of the raw row: log-softmax in double; the chosen token's logprob
// and rank, and the k best (id, logprob), lowest id first on ties.
struct Logprobs {
    double logprob = 0.0;
    int rank = 0;
    std::vector<std::pair<int, double>> top;
};

inline Logprobs logprobs_reference(const std::vector<float>& raw, int token, int k) {
    double mx = -INFINITY;
    for (float x : raw) mx = std::max(mx, (double)x);
    double sum = 0.0;
    if (mx > -INFINITY)
        for (float x : raw) sum += std::exp((double)x - mx);
    double lse = mx > -INFINITY ? mx + std::log(sum) : INFINITY;
    Logprobs r;
    r.logprob = (double)raw[token] - lse;
    r.rank = 1;
    for (float x : raw) r.rank += x > raw[token] ? 1 : 0;
    std::vector<int> idx(raw.size());
    for (size_t i = 0; i < raw.size(); i++) idx[i] = (int)i;
    int n = std::min<int>(k, (int)raw.size());
    std::partial_sort(idx.begin(), idx.begin() + n, idx.end(),
                      [&](int a, int b) { return raw[a] > raw[b] || (raw[a] == raw[b] && a < b); });
    for (int j = 0; j < n; j++) r.top.push_back({idx[j], (double)raw[idx[j]] - lse});
    return r;
}

}  // namespace ref
