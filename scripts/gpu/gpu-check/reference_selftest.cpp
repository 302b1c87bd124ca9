// Checks reference.hpp on its own, with no GPU: the references must be right
// before a kernel is judged by them. Run here by scripts/gpu/gpu-check-prepare.sh
// (g++) and on the GPU machine by scripts/gpu-check.sh.
//
//   g++ -O2 -std=c++17 -o reference_selftest reference_selftest.cpp && ./reference_selftest

#include "reference.hpp"

// The kernels' own common.cuh, compiled for the host through the stand-in for
// CUDA's names, so its draw_bits (the text NVRTC compiles) is checked against
// the engine's vectors here, with no GPU.
#include "cuda_standin.h"
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsign-compare"
#include "../../../kernels/common.cuh"
#pragma GCC diagnostic pop

static int failed = 0;
#define EXPECT(cond)                                                              \
    do {                                                                          \
        if (!(cond)) { std::printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); failed++; } \
    } while (0)

int main() {
    // bf16: exact values, round half to even, NaN stays NaN.
    EXPECT(ref::f32_to_bf16(1.0f) == 0x3f80);
    EXPECT(ref::f32_to_bf16(1.00390625f) == 0x3f80);   // halfway, down to even
    EXPECT(ref::f32_to_bf16(1.01171875f) == 0x3f82);   // halfway, up to even
    EXPECT(ref::bf16_to_f32(ref::f32_to_bf16(-2.5f)) == -2.5f);
    EXPECT(std::isnan(ref::bf16_to_f32(ref::f32_to_bf16(NAN))));

    // The draw: the kernels' draw_bits (common.cuh) and the reference's equal
    // engine/src/rng.rs's vectors bit for bit; uniforms in [0, 1), mean near a half.
    for (int i = 0; i < 5; i++) {
        const uint64_t* a = ref::DRAW_VECTOR_ARGS[i];
        EXPECT(ref::draw_bits(a[0], a[1], a[2]) == ref::DRAW_VECTORS[i]);
        EXPECT(::draw_bits(a[0], a[1], a[2]) == ref::DRAW_VECTORS[i]);
        EXPECT(::draw_unit(a[0], a[1], a[2]) == ref::draw_unit(a[0], a[1], a[2]));
    }
    EXPECT(ref::mix64(0) == 0 && ref::mix64(0x9E3779B97F4A7C15ull) == 0xE220A8397B1DCDAFull);
    double mean = 0.0;
    bool in_range = true;
    for (int i = 0; i < 100000; i++) {
        double u = ref::draw_unit(12345, i, 0);
        in_range = in_range && u >= 0.0 && u < 1.0 && ::draw_bits(12345, i, 0) == ref::draw_bits(12345, i, 0);
        mean += u / 100000.0;
    }
    EXPECT(in_range);
    EXPECT(std::fabs(mean - 0.5) < 0.01);

    // Check: exact matches (infinities too) pass, one NaN fails, tolerance holds.
    ref::Check c(0.0, 0.0);
    c.add(-INFINITY, -INFINITY);
    c.add(3.0, 3.0);
    EXPECT(c.ok());
    c.add(NAN, 1.0);
    EXPECT(!c.ok());
    ref::Check t(1e-3, 0.01);
    t.add(1.005, 1.0);
    EXPECT(t.ok());
    t.add(1.02, 1.0);
    EXPECT(!t.ok());

    // RMSNorm of a constant row is the weight (up to the sign of the row).
    std::vector<uint16_t> res(8, ref::f32_to_bf16(-3.0f)), w(8);
    for (int i = 0; i < 8; i++) w[i] = ref::f32_to_bf16(0.5f + i);
    std::vector<double> nr, out;
    ref::add_rmsnorm(res, {}, w, 1, 8, 0.0, nr, out);
    for (int i = 0; i < 8; i++) EXPECT(std::fabs(out[i] + (0.5 + i)) < 1e-12);

    // RoPE: position 0 is the identity; any position keeps each pair's length.
    ref::Rng rng(7);
    std::vector<float> inv(32);
    for (int i = 0; i < 32; i++) inv[i] = (float)std::pow(10000.0, -2.0 * i / 64);
    std::vector<double> x(64), y;
    for (auto& e : x) e = rng.sym(1.0f);
    y = x;
    ref::rope_head(y, 0, 64, 0, inv, true);
    for (int i = 0; i < 64; i++) EXPECT(y[i] == x[i]);
    y = x;
    ref::rope_head(y, 0, 64, 5000, inv, false);
    for (int i = 0; i < 32; i++) EXPECT(std::fabs(std::hypot(y[2 * i], y[2 * i + 1]) - std::hypot(x[2 * i], x[2 * i + 1])) < 1e-12);

    // Attention: one key gives its value; equal keys give the mean of the values.
    int hd = 4, bs = 2;
    std::vector<int> bt{1, 0};  // sequence 0: block 1, then block 0
    std::vector<uint16_t> q(hd, ref::f32_to_bf16(0.5f)), kc(2 * bs * hd, ref::f32_to_bf16(1.0f)), vc(2 * bs * hd);
    for (size_t i = 0; i < vc.size(); i++) vc[i] = ref::f32_to_bf16((float)i);
    double o[4];
    ref::attend(q, 0, kc, vc, bt, 2, 0, 1, 0, 1, bs, hd, 1.0, o);
    for (int d = 0; d < hd; d++) EXPECT(o[d] == ref::bf(vc[ref::kv_index(bt, 2, 0, 0, 0, 1, bs, hd) + d]));
    ref::attend(q, 0, kc, vc, bt, 2, 0, 3, 0, 1, bs, hd, 1.0, o);
    for (int d = 0; d < hd; d++) {
        double m = 0.0;
        for (int p = 0; p < 3; p++) m += ref::bf(vc[ref::kv_index(bt, 2, 0, p, 0, 1, bs, hd) + d]) / 3.0;
        EXPECT(std::fabs(o[d] - m) < 1e-12);
    }

    // Sampling: greedy takes the lowest id among equal maxima; min-p 1 and
    // top-k 1 keep only the maximum; a tiny top-p keeps only the maximum; and
    // draws on a fine grid of u hit each token as often as its probability.
    std::vector<float> l{1.0f, 3.0f, 3.0f, 2.0f, -1.0f};
    EXPECT(ref::argmax(l) == 1);
    EXPECT(ref::argmax(std::vector<float>(3, -INFINITY)) == -1);
    ref::RowParams p{};
    p.temperature = 1.0f; p.top_p = 1.0f; p.repetition = 1.0f; p.logprobs = -1; p.mask_word = -1;
    std::vector<float> l2{0.5f, 3.0f, 2.0f, 1.0f};
    ref::RowParams k1 = p; k1.top_k = 1;
    ref::RowParams mp = p; mp.min_p = 1.0f;
    ref::RowParams tp = p; tp.top_p = 0.01f;
    for (const auto& r : {k1, mp, tp}) {
        auto d = ref::sample_reference(l2, r, 0.99, 0.0);
        EXPECT(d.pick == 1);
        EXPECT(d.w[0] == 0.0 && d.w[2] == 0.0 && d.w[3] == 0.0);
    }
    // top-p 0.7 over softmax(0.5, 3, 2, 1) = (.057, .636, .234, .086): tokens 1 and 2.
    ref::RowParams p7 = p; p7.top_p = 0.7f;
    auto d7 = ref::sample_reference(l2, p7, 0.0, 0.0);
    EXPECT(d7.w[1] > 0 && d7.w[2] > 0 && d7.w[0] == 0 && d7.w[3] == 0);
    // Ties: top-k keeps every value equal to the k-th; top-p keeps ties at its
    // crossing in id order, while the mass before each is below the target.
    std::vector<float> lt{1.0f, 2.0f, 1.0f, 2.0f, 1.0f};
    ref::RowParams k2 = p; k2.top_k = 1;
    auto dk = ref::sample_reference(lt, k2, 0.5, 0.0);
    EXPECT(dk.w[1] > 0 && dk.w[3] > 0 && dk.w[0] == 0);
    ref::RowParams tpt = p; tpt.top_p = 0.3f;  // masses (.42 each for 2.0): the first tie reaches 0.3
    auto dt = ref::sample_reference(lt, tpt, 0.5, 0.0);
    EXPECT(dt.w[1] > 0 && dt.w[3] == 0);
    std::vector<int> hits(4, 0);
    const int N = 20000;
    for (int i = 0; i < N; i++) hits[ref::sample_reference(l2, p, (i + 0.5) / N, 0.0).pick]++;
    double z = 0.0;
    for (float v : l2) z += std::exp((double)v);
    for (int i = 0; i < 4; i++) EXPECT(std::fabs(hits[i] / (double)N - std::exp((double)l2[i]) / z) < 1e-3);
    // Steps 1-4: the grammar mask and NaN give -inf in the raw row; banned ids,
    // logit_bias (twice for a token listed twice), then repetition divides
    // positive and multiplies negative logits of tokens seen, and presence and
    // frequency subtract for generated ones only.
    ref::RowLists s;
    s.pen_tokens = {0, 1, 2};
    s.pen_counts = {0, 2, 1};
    s.pen_in_prompt = {1, 0, 0};
    s.bias_tokens = {3, 3, 99};
    s.bias_values = {0.5f, 0.25f, 1.0f};
    s.ban_tokens = {4};
    s.mask_words = {0x2Fu};  // tokens 0-3 and 5 allowed
    std::vector<float> pl{2.0f, -2.0f, 1.0f, 1.0f, 7.0f, NAN, 9.0f}, raw;
    ref::RowParams pp = p;
    pp.repetition = 2.0f; pp.presence = 0.5f; pp.frequency = 0.25f;
    pp.pen_from = 0; pp.pen_to = 3; pp.bias_from = 0; pp.bias_to = 3; pp.ban_from = 0; pp.ban_to = 1; pp.mask_word = 0;
    ref::prepare_row(pl, pp, s, raw);
    EXPECT(raw[4] == -INFINITY && raw[5] == -INFINITY && raw[6] == -INFINITY && raw[0] == 2.0f);
    EXPECT(pl[0] == 1.0f);                      // prompt only: repetition
    EXPECT(pl[1] == -4.0f - 0.5f - 0.5f);       // generated twice
    EXPECT(pl[2] == 0.5f - 0.25f - 0.5f);       // generated once
    EXPECT(pl[3] == 1.75f);                     // biased twice
    EXPECT(pl[4] == -INFINITY);                 // masked (and banned)
    // Temperature: below 0.01 it is 0.01; logprobs rank ties together.
    std::vector<float> tl{1.0f, -1.0f};
    ref::RowParams tiny = p; tiny.temperature = 0.001f;
    ref::divide_by_temperature(tl, tiny);
    EXPECT(tl[0] == 1.0f / 0.01f && tl[1] == -1.0f / 0.01f);
    auto lp = ref::logprobs_reference(lt, 0, 2);
    EXPECT(lp.rank == 3 && lp.top.size() == 2 && lp.top[0].first == 1 && lp.top[1].first == 3);

    std::printf("reference self-test: %s\n", failed ? "FAILED" : "ok");
    return failed ? 1 : 0;
}
