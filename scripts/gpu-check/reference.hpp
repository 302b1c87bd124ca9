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

// The kernels' counter-based draw in [0, 1) (common.cuh's uniform01), bit for bit.
inline float uniform01(uint64_t seed, uint64_t step) {
    uint64_t z = seed + 0x9E3779B97F4A7C15ull * (step + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 16777216.0f);
}

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
    int pad;
    uint64_t seed, step;
};

// sample_rows' first stage, in f32 as the kernel does it: NaN to -inf, +inf to
// the largest finite value, then the penalties of the row's sparse list.
inline void clamp_and_penalize(std::vector<float>& l, const RowParams& p, const uint32_t* tokens, const uint32_t* counts,
                               const unsigned char* in_prompt, int n) {
    for (auto& x : l) x = (x != x) ? -INFINITY : std::min(x, 3.402823466e38f);
    for (int i = 0; i < n; i++) {
        uint32_t t = tokens[i];
        if (t >= l.size()) continue;
        float v = l[t];
        if (p.repetition != 1.0f && (counts[i] > 0 || in_prompt[i])) v = v > 0.0f ? v / p.repetition : v * p.repetition;
        if (counts[i] > 0) v -= p.presence + p.frequency * (float)counts[i];
        l[t] = v;
    }
}

// The greedy pick: the largest value, the lowest id among equal maxima.
inline int argmax(const std::vector<float>& l) {
    int best = 0;
    for (int i = 1; i < (int)l.size(); i++)
        if (l[i] > l[best]) best = i;
    return best;
}

// What sample_rows may draw from a (penalized) row, and the draw itself, in
// double: z = (l - max) / T; kept: z >= log(min_p), fewer than top_k values
// strictly above, and (top-p over what min-p and top-k kept) the mass strictly
// above it below top_p of their total. `slack` widens each bound relatively,
// so a token within float rounding of a bound counts as kept.
struct Draw {
    std::vector<double> w;  // exp(z) of kept tokens, 0 elsewhere
    double total = 0.0;
    int pick = -1;          // the inverse-CDF pick for u
};

inline Draw sample_reference(const std::vector<float>& l, const RowParams& p, float u01, double slack) {
    int v = (int)l.size();
    int am = argmax(l);
    double mx = l[am];
    double inv_t = 1.0 / std::max((double)p.temperature, 1e-2);
    std::vector<double> z(v);
    for (int i = 0; i < v; i++) z[i] = ((double)l[i] - mx) * inv_t;
    std::vector<char> keep(v, 1);
    if (p.min_p > 0.0f)
        for (int i = 0; i < v; i++) keep[i] = z[i] >= std::log((double)p.min_p) - slack;
    if (p.top_k > 0 && p.top_k < v) {
        std::vector<double> sorted(z);
        std::sort(sorted.begin(), sorted.end(), std::greater<double>());
        double kth = sorted[p.top_k - 1];
        for (int i = 0; i < v; i++) keep[i] = keep[i] && z[i] >= kth - slack;
    }
    if (p.top_p < 1.0f) {
        std::vector<int> idx;
        double zs = 0.0;
        for (int i = 0; i < v; i++)
            if (keep[i]) { idx.push_back(i); zs += std::exp(z[i]); }
        std::sort(idx.begin(), idx.end(), [&](int a, int b) { return z[a] > z[b]; });
        double above = 0.0;
        std::vector<char> nucleus(v, 0);
        for (size_t k = 0; k < idx.size(); k++) {
            // Ties: tokens of equal z share the mass strictly above them.
            size_t e = k;
            while (e + 1 < idx.size() && z[idx[e + 1]] == z[idx[k]]) e++;
            bool in = above < p.top_p * zs * (1.0 + slack);
            double group = 0.0;
            for (size_t g = k; g <= e; g++) { nucleus[idx[g]] = in; group += std::exp(z[idx[g]]); }
            above += group;
            k = e;
        }
        for (int i = 0; i < v; i++) keep[i] = keep[i] && nucleus[i];
    }
    Draw d;
    d.w.assign(v, 0.0);
    for (int i = 0; i < v; i++)
        if (keep[i]) { d.w[i] = std::exp(z[i]); d.total += d.w[i]; }
    double u = (double)u01 * d.total, run = 0.0;
    for (int i = 0; i < v; i++) {
        run += d.w[i];
        if (d.w[i] > 0.0 && run > u) { d.pick = i; break; }
    }
    if (d.pick < 0) d.pick = am;
    return d;
}

}  // namespace ref
