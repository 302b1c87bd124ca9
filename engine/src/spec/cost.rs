//! What a verify pass costs on this machine: learned from the steps the
//! engine has run, not assumed.
//!
//! How much one more row costs depends on the backend and the hardware. On a
//! GPU a few more rows cost almost nothing; on the CPU, where the kernels keep
//! llama.cpp's float order, a step of 2 rows took 1.3x one of 1 and each row
//! after that about 0.3 more (measured: see `docs/performance.md`, "What a
//! verify pass costs, measured"), where a constant had said 0.15. A sequence that
//! verifies more than pays makes the stream slower than not speculating, so
//! [`StepTimes`] keeps a moving average of the time of a step by its number
//! of rows, and [`StepTimes::relative`] answers "how much longer is a step
//! of `rows` rows than one of `base`". Until a row count has been seen the
//! answer comes from [`PRIOR_ROW_COST`]; it is optimistic on purpose, so
//! that drafts get verified and the counts get measured.
//!
//! Only steps whose every chunk decodes or verifies are recorded: a prompt
//! chunk's rows skip the LM head and cost differently. The clock is the
//! shell's (sans-IO: the engine core is handed the two instants).

use std::time::Duration;

/// Assumed cost of one more row, as a fraction of a one-row step, for row
/// counts not yet measured.
pub const PRIOR_ROW_COST: f32 = 0.15;
/// Most rows tracked one by one; steps beyond are not recorded, and their
/// cost is extrapolated.
pub const MAX_ROWS: usize = 512;
/// Weight of the newest step in its row count's average: the context grows
/// as a stream goes on (attention reads more), so old steps are let go.
const WEIGHT: f64 = 0.2;

/// Moving averages of step time by number of rows.
#[derive(Clone, Debug)]
pub struct StepTimes {
    /// secs[r]: the average of steps of r rows; 0: none seen.
    secs: Vec<f64>,
}

impl Default for StepTimes {
    fn default() -> Self {
        StepTimes { secs: vec![0.0; MAX_ROWS + 1] }
    }
}

impl StepTimes {
    /// Records a step of `rows` decode or verify rows that took `took`.
    /// Zero durations (a caller with one clock reading for the whole step)
    /// and row counts past [`MAX_ROWS`] are ignored.
    pub fn record(&mut self, rows: usize, took: Duration) {
        let s = took.as_secs_f64();
        if rows == 0 || rows > MAX_ROWS || s <= 0.0 || !s.is_finite() {
            return;
        }
        let avg = &mut self.secs[rows];
        *avg = if *avg == 0.0 { s } else { *avg + WEIGHT * (s - *avg) };
    }

    /// The time of a step of `rows` rows over that of a step of `base` rows
    /// (`rows >= base >= 1`): measured where both were seen, interpolated
    /// between measured counts, and past the last measured count extended
    /// at [`PRIOR_ROW_COST`] of the base step per row. Never below 1, and
    /// never less for more rows.
    pub fn relative(&self, base: usize, rows: usize) -> f32 {
        let base = base.clamp(1, MAX_ROWS);
        self.relative_from(base, rows.max(base) - base).last().copied().unwrap_or(1.0)
    }

    /// [`Self::relative`] for `base + k` rows, k = 0..=max_k, in one walk
    /// up the row counts (the engine asks this of every sequence every step).
    pub fn relative_from(&self, base: usize, max_k: usize) -> Vec<f32> {
        let base = base.clamp(1, MAX_ROWS);
        // The prior's cost of going from `from` rows to `to`, in steps of `from` rows.
        let prior = |from: usize, to: usize| PRIOR_ROW_COST * (to - from) as f32 / (1.0 + PRIOR_ROW_COST * (from - 1) as f32);
        let t0 = self.secs[base];
        if t0 == 0.0 {
            return (0..=max_k).map(|k| 1.0 + prior(base, base + k)).collect();
        }
        let at = |r: usize| self.secs.get(r).copied().filter(|&s| s > 0.0);
        let next_seen = |from: usize| (from..=MAX_ROWS).find(|&r| at(r).is_some());
        // The measured counts around the current one: lo at or below, hi above.
        let (mut lo, mut t_lo, mut hi) = (base, t0, next_seen(base + 1));
        let mut out = Vec::with_capacity(max_k + 1);
        for rows in base..=base + max_k {
            if Some(rows) == hi {
                (lo, t_lo, hi) = (rows, at(rows).unwrap_or(t_lo).max(t_lo), next_seen(rows + 1));
            }
            let t = match hi {
                _ if lo == rows => t_lo,
                Some(h) => {
                    let t_hi = at(h).unwrap_or(t_lo).max(t_lo);
                    t_lo + (t_hi - t_lo) * (rows - lo) as f64 / (h - lo) as f64
                }
                // The prior's row, in units of the base step: a one-row step's
                // PRIOR_ROW_COST, a one-row step being t0 / (1 + c (base - 1)).
                None => t_lo + t0 * prior(base, base + rows - lo) as f64,
            };
            // Noise can make a larger step look cheaper; a row is never free.
            let r = (t / t0).max(1.0) as f32;
            out.push(out.last().map_or(r, |&prev: &f32| r.max(prev)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(x: f64) -> Duration {
        Duration::from_secs_f64(x / 1000.0)
    }

    #[test]
    fn unmeasured_counts_follow_the_prior() {
        let t = StepTimes::default();
        assert_eq!(t.relative(1, 1), 1.0);
        assert!((t.relative(1, 5) - (1.0 + 4.0 * PRIOR_ROW_COST)).abs() < 1e-6);
        // At a batch of 16 a row is a smaller share of the step.
        assert!(t.relative(16, 17) - 1.0 < PRIOR_ROW_COST / 2.0);
    }

    #[test]
    fn measured_counts_replace_it_and_gaps_are_interpolated() {
        let mut t = StepTimes::default();
        t.record(1, ms(4.0));
        t.record(2, ms(5.2));
        t.record(6, ms(10.0));
        assert!((t.relative(1, 2) - 1.3).abs() < 1e-4);
        assert!((t.relative(1, 4) - 7.6 / 4.0).abs() < 1e-4, "{}", t.relative(1, 4));
        assert!((t.relative(1, 6) - 2.5).abs() < 1e-4);
        // Past the last measured count: the prior's slope from there.
        assert!((t.relative(1, 8) - (2.5 + 2.0 * PRIOR_ROW_COST)).abs() < 1e-4, "{}", t.relative(1, 8));
        // From a measured base of 2.
        assert!((t.relative(2, 6) - 10.0 / 5.2).abs() < 1e-4);
    }

    #[test]
    fn the_average_follows_new_steps_and_ignores_zero_and_huge_ones() {
        let mut t = StepTimes::default();
        t.record(1, ms(4.0));
        t.record(3, ms(8.0));
        for _ in 0..40 {
            t.record(3, ms(6.0));
        }
        assert!((t.relative(1, 3) - 1.5).abs() < 0.01, "{}", t.relative(1, 3));
        t.record(3, Duration::ZERO);
        t.record(MAX_ROWS + 1, ms(1.0));
        assert!((t.relative(1, 3) - 1.5).abs() < 0.01);
    }

    #[test]
    fn more_rows_never_look_cheaper() {
        let mut t = StepTimes::default();
        t.record(1, ms(4.0));
        t.record(2, ms(3.0)); // noise: a 2-row step that happened to run fast
        t.record(3, ms(6.0));
        let r = t.relative_from(1, 4);
        assert_eq!(r[0], 1.0);
        assert!(r.windows(2).all(|w| w[1] >= w[0]), "{r:?}");
    }
}
