//! A seeded random source for prompts and arrival times.
//!
//! The benchmark must replay the same prompts and the same arrival schedule for
//! the same --seed on every machine and build: it draws from the engine's one
//! generator ([`ferry_engine::rng`], xoshiro256** from `rand_xoshiro`, a
//! published algorithm) and takes its distributions from `rand_distr`.

use ferry_engine::rng::{seeded, Xoshiro256StarStar};
use rand_distr::{Distribution, Gamma};

pub(crate) struct Rng(Xoshiro256StarStar);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seeded(seed))
    }

    #[cfg(test)]
    pub(crate) fn next_u64(&mut self) -> u64 {
        ferry_engine::rng::RngCore::next_u64(&mut self.0)
    }

    /// Uniform integer in [lo, hi] (inclusive), without modulo bias.
    pub(crate) fn range_inclusive(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        rand_distr::Uniform::new_inclusive(lo, hi).map_or(lo, |u| u.sample(&mut self.0))
    }

    /// Gamma deviate with shape k > 0 and scale theta (mean k * theta).
    pub(crate) fn gamma(&mut self, shape: f64, scale: f64) -> f64 {
        Gamma::new(shape, scale).map_or(shape * scale, |d| d.sample(&mut self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean_var(xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let m = xs.iter().sum::<f64>() / n;
        let v = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n;
        (m, v)
    }

    #[test]
    fn same_seed_same_stream() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let mut c = Rng::new(8);
        let xa: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let xb: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        let xc: Vec<u64> = (0..8).map(|_| c.next_u64()).collect();
        assert_eq!(xa, xb);
        assert_ne!(xa, xc);
    }

    #[test]
    fn uniform_range_covers_bounds_evenly() {
        let mut r = Rng::new(1);
        let mut counts = [0usize; 5];
        for _ in 0..50_000 {
            let v = r.range_inclusive(10, 14);
            assert!((10..=14).contains(&v));
            counts[(v - 10) as usize] += 1;
        }
        for c in counts {
            // Each bucket expects 10_000; 5 sigma is about 450.
            assert!((c as i64 - 10_000).abs() < 500, "{counts:?}");
        }
    }

    #[test]
    fn gamma_moments_match_theory() {
        // Gamma(k, theta): mean k*theta, variance k*theta^2.
        for &(k, theta) in &[(1.0, 0.5), (0.3, 2.0), (4.0, 0.25)] {
            let mut r = Rng::new(42);
            let xs: Vec<f64> = (0..200_000).map(|_| r.gamma(k, theta)).collect();
            let (m, v) = mean_var(&xs);
            assert!((m - k * theta).abs() < 0.02 * k * theta + 0.005, "k={k} mean {m}");
            assert!((v - k * theta * theta).abs() < 0.06 * k * theta * theta, "k={k} var {v}");
        }
    }
}
