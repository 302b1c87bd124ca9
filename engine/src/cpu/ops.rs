//! Element-wise pieces of the decoder: RMS norm, rotary embeddings, SwiGLU.

use crate::model::config::RopeStyle;

/// out = x / sqrt(mean(x^2) + eps) * w, per row of `w.len()` elements.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    if d == 0 {
        return;
    }
    // ggml's arithmetic exactly (ggml_compute_forward_rms_norm_f32): squares in
    // f32 summed in f64, in order, then mean, eps and the root in f32. ferry is
    // checked against llama.cpp, and each ulp here moves an 8-bit activation
    // rounding. The in-order f64 sum is one long chain of dependent adds, so
    // ROWS rows' sums are run side by side: each keeps its order, and the
    // core overlaps the chains (one at a time, the norms were a tenth of a
    // 16-sequence step, on one thread while the other waited).
    const ROWS: usize = 8;
    let n = x.len().min(out.len()) / d;
    let mut r0 = 0;
    while r0 < n {
        let nr = (n - r0).min(ROWS);
        let mut ss = [0.0f64; ROWS];
        for i in 0..d {
            for (r, s) in ss.iter_mut().enumerate().take(nr) {
                let v = x[(r0 + r) * d + i];
                *s += (v * v) as f64;
            }
        }
        for (r, &s) in ss.iter().enumerate().take(nr) {
            let mean = (s / d as f64) as f32;
            let scale = 1.0f32 / (mean + eps).sqrt();
            let row = (r0 + r) * d;
            for ((o, &v), &g) in out[row..row + d].iter_mut().zip(&x[row..row + d]).zip(w) {
                *o = v * scale * g;
            }
        }
        r0 += nr;
    }
}

/// The step between rotation frequencies: theta_i = pos * step^i with
/// step = base^(-2/head_dim), as ggml computes it (in f32).
pub fn rope_theta_scale(head_dim: usize, base: f32) -> f32 {
    base.powf(-2.0 / head_dim as f32)
}

/// (cos, sin) of each of the head_dim/2 rotation angles of position `pos`,
/// back to back in `cache`, in ggml's arithmetic (ggml_rope_cache_init): the
/// angle starts at pos and is multiplied by the step once per pair, in f32.
/// ferry is checked against llama.cpp bit for bit on the default model, and
/// `pos * base^(-2i/d)` rounds differently.
///
/// `freq_factors` (Llama 3's rope_freqs) divide each pair's angle as ggml does
/// (`theta / ff`, in f32); without them the loop is the one that matches
/// llama.cpp on the default model bit for bit.
pub fn rope_cache(pos: usize, theta_scale: f32, freq_factors: Option<&[f32]>, cache: &mut [f32]) {
    let mut theta = pos as f32;
    match freq_factors {
        None => {
            for cs in cache.chunks_exact_mut(2) {
                cs[0] = theta.cos();
                cs[1] = theta.sin();
                theta *= theta_scale;
            }
        }
        Some(ff) => {
            for (cs, &f) in cache.chunks_exact_mut(2).zip(ff) {
                let t = theta / f;
                cs[0] = t.cos();
                cs[1] = t.sin();
                theta *= theta_scale;
            }
        }
    }
}

/// Rotates each head of `x` (n_heads * head_dim values of one token) by the
/// angles of `cache` (from [`rope_cache`]).
pub fn rope(x: &mut [f32], head_dim: usize, cache: &[f32], style: RopeStyle) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::kernels::has_avx2_fma() {
        // SAFETY: the CPU has FMA (checked just above).
        return unsafe { rope_fma(x, head_dim, cache, style) };
    }
    rope_body(x, head_dim, cache, style);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rope_fma(x: &mut [f32], head_dim: usize, cache: &[f32], style: RopeStyle) {
    rope_body(x, head_dim, cache, style);
}

#[inline(always)]
fn rope_body(x: &mut [f32], head_dim: usize, cache: &[f32], style: RopeStyle) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for (i, cs) in cache.chunks_exact(2).enumerate() {
            let (cos, sin) = (cs[0], cs[1]);
            let (a, b) = match style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::Neox => (i, i + half),
            };
            let (x0, x1) = (head[a], head[b]);
            // ggml's `x0*cos - x1*sin` and `x0*sin + x1*cos`, contracted to
            // fmas the way its compiler does (checked against its outputs).
            head[a] = x0.mul_add(cos, -(x1 * sin));
            head[b] = x0.mul_add(sin, x1 * cos);
        }
    }
}

/// e^x the way ggml's vectorized softmax and SiLU compute it (ggml_v_expf, its
/// AVX512 version: a degree-5 polynomial after range reduction, within 1.5 ulp),
/// so ferry's values equal llama.cpp's to the bit; libm's expf differs in the
/// last place often enough to move 8-bit activation roundings downstream.
/// Underflows to 0 below about -103.97, overflows to inf above about 88.38.
#[inline(always)]
pub fn expf_ggml(x: f32) -> f32 {
    let c = f32::from_bits;
    let r = c(0x4b40_0000); // 0x1.8p23: adding it rounds to an integer
    let z = x.mul_add(c(0x3fb8_aa3b), r); // x * log2(e) + r
    let n = z - r;
    // b = x - n * ln2, with ln2 split in two parts.
    let b = (-n).mul_add(c(0x35bf_be8e), (-n).mul_add(c(0x3f31_7200), x));
    let u = b * b;
    let j = c(0x3c07_2010)
        .mul_add(b, c(0x3d2b_9f17))
        .mul_add(u, c(0x3e2a_af33).mul_add(b, c(0x3eff_fedb)))
        .mul_add(u, c(0x3f7f_fff6).mul_add(b, 1.0));
    // j * 2^n with one rounding (vscalefps): two exact power-of-two factors,
    // each a normal float since |n| <= 192. Beyond that the result is 0 or
    // inf; both are computed and one selected, without a branch, so loops
    // over this function vectorize.
    let out_of_range = n.abs() > 192.0;
    let limit = if n <= 0.0 { 0.0 } else { f32::INFINITY };
    let ni = n.clamp(-192.0, 192.0) as i32;
    let (n1, n2) = (ni >> 1, ni - (ni >> 1));
    let v = j * f32::from_bits(((n1 + 127) as u32) << 23) * f32::from_bits(((n2 + 127) as u32) << 23);
    if out_of_range {
        limit
    } else {
        v
    }
}

/// gate = silu(gate) * up, in place, as ggml_vec_swiglu_f32 computes it:
/// x / (1 + e^-x) with [`expf_ggml`].
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::kernels::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { silu_mul_fma(gate, up) };
    }
    silu_mul_body(gate, up);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_fma(gate: &mut [f32], up: &[f32]) {
    silu_mul_body(gate, up);
}

#[inline(always)]
fn silu_mul_body(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + expf_ggml(0.0 - *g)) * u;
    }
}

/// x += y element-wise (the residual connections); stops at the shorter slice.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Adds `bias` to each row of `x`.
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        add_assign(row, bias);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expf_ggml_is_close_to_exp_everywhere() {
        let mut x = -110.0f32;
        while x < 90.0 {
            let (got, want) = (expf_ggml(x) as f64, (x as f64).exp());
            if want < 1e-38 {
                assert!(got < 1.2e-38, "{x}: {got}");
            } else if want > 3.4e38 {
                assert!(got.is_infinite(), "{x}: {got}");
            } else {
                assert!(((got - want) / want).abs() < 3e-7, "{x}: {got} vs {want}");
            }
            x += 0.0137;
        }
        assert_eq!(expf_ggml(0.0), 1.0);
        assert_eq!(expf_ggml(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf_ggml(200.0), f32::INFINITY);
    }

    #[test]
    fn silu_and_rope_against_f64() {
        let mut g: Vec<f32> = (0..64).map(|i| (i as f32 - 32.0) * 0.37).collect();
        let x = g.clone();
        let up: Vec<f32> = (0..64).map(|i| 1.0 + i as f32 * 0.01).collect();
        silu_mul(&mut g, &up);
        for ((&o, &x), &u) in g.iter().zip(&x).zip(&up) {
            let want = x as f64 / (1.0 + (-x as f64).exp()) * u as f64;
            assert!((o as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()), "{x}: {o} vs {want}");
        }
        let (hd, base, pos) = (16, 10000.0f32, 7);
        let mut cache = vec![0f32; hd];
        rope_cache(pos, rope_theta_scale(hd, base), None, &mut cache);
        let orig: Vec<f32> = (0..hd).map(|i| 0.5 + i as f32).collect();
        let mut v = orig.clone();
        rope(&mut v, hd, &cache, RopeStyle::Interleaved);
        for i in 0..hd / 2 {
            let ang = pos as f64 * (base as f64).powf(-2.0 * i as f64 / hd as f64);
            let (x0, x1) = (orig[2 * i] as f64, orig[2 * i + 1] as f64);
            assert!((v[2 * i] as f64 - (x0 * ang.cos() - x1 * ang.sin())).abs() < 1e-4);
            assert!((v[2 * i + 1] as f64 - (x0 * ang.sin() + x1 * ang.cos())).abs() < 1e-4);
        }
    }
}
