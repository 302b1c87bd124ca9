//! When each request is sent: offsets from the start of the run.
//!
//! As in vLLM's `get_request`: with an infinite rate every offset is 0; with a
//! finite rate the gaps are gamma-distributed with shape = burstiness and
//! mean 1/rate (burstiness 1 is a Poisson process), and the cumulative offsets
//! are rescaled so the last one lands exactly at num_requests / rate, which
//! keeps throughput figures stable across seeds.

use super::rng::Rng;

/// Offsets in seconds from the run's start, one per request, non-decreasing.
pub(crate) fn arrival_offsets(n: usize, rate: f64, burstiness: f64, rng: &mut Rng) -> Vec<f64> {
    if n == 0 {
        return Vec::new();
    }
    if rate.is_infinite() {
        return vec![0.0; n];
    }
    let mut offsets = Vec::with_capacity(n);
    let mut t = 0.0;
    for _ in 0..n {
        let gap = if burstiness.is_infinite() {
            1.0 / rate
        } else {
            rng.gamma(burstiness, 1.0 / (rate * burstiness))
        };
        t += gap;
        offsets.push(t);
    }
    let last = *offsets.last().unwrap_or(&0.0);
    if last > 0.0 {
        let factor = (n as f64 / rate) / last;
        for o in &mut offsets {
            *o *= factor;
        }
    }
    offsets
}

/// The gaps between successive offsets (the first gap is from 0).
#[cfg(test)]
pub(crate) fn gaps(offsets: &[f64]) -> Vec<f64> {
    let mut prev = 0.0;
    offsets
        .iter()
        .map(|&o| {
            let g = o - prev;
            prev = o;
            g
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean_var(xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let m = xs.iter().sum::<f64>() / n;
        (m, xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n)
    }

    #[test]
    fn infinite_rate_sends_everything_at_once() {
        let mut r = Rng::new(0);
        assert_eq!(arrival_offsets(4, f64::INFINITY, 1.0, &mut r), vec![0.0; 4]);
    }

    #[test]
    fn poisson_gaps_have_mean_and_variance_of_exponential() {
        let mut r = Rng::new(5);
        let rate = 4.0;
        let offs = arrival_offsets(100_000, rate, 1.0, &mut r);
        // Normalisation puts the last arrival at n / rate exactly.
        assert!((offs.last().unwrap() - 100_000.0 / rate).abs() < 1e-6);
        assert!(offs.windows(2).all(|w| w[1] >= w[0]));
        let (m, v) = mean_var(&gaps(&offs));
        // Exponential with mean 1/rate = 0.25 has variance 0.0625.
        assert!((m - 0.25).abs() < 1e-9, "{m}");
        assert!((v - 0.0625).abs() < 0.004, "{v}");
    }

    #[test]
    fn gamma_burstiness_changes_variance_not_mean() {
        // Gamma(shape b, scale 1/(rate*b)) has variance 1/(rate^2 b).
        for &b in &[0.25, 4.0] {
            let mut r = Rng::new(9);
            let offs = arrival_offsets(100_000, 2.0, b, &mut r);
            let (m, v) = mean_var(&gaps(&offs));
            assert!((m - 0.5).abs() < 1e-9);
            let want = 1.0 / (4.0 * b);
            assert!((v - want).abs() < 0.08 * want, "b={b} var {v} want {want}");
        }
    }

    #[test]
    fn infinite_burstiness_is_uniform_spacing() {
        let mut r = Rng::new(0);
        let offs = arrival_offsets(4, 2.0, f64::INFINITY, &mut r);
        assert_eq!(offs, vec![0.5, 1.0, 1.5, 2.0]);
    }
}
