//! How many proposed tokens a sequence verifies: as many as pay for
//! themselves, judged from how often its proposals have been taken.
//!
//! A verify pass is not free: every proposed token is one more row through
//! the matmuls (compute, where decode is bound by memory) and attention. So
//! each sequence keeps a moving average `a` of the share of the proposed
//! tokens it tried that were taken (a rejected token ends a pass, so the
//! tokens after it were not tried): the chance that the next proposed token
//! is taken, each given the ones before it. It verifies the `k` that maximises the
//! expected tokens per unit of step time, `(B + a + a^2 + .. + a^k) / t(k)`,
//! where `B` is what the step makes without these proposals (a token per
//! sequence in the batch, and what other sequences' proposals are expected to
//! add) and `t(k)` the step's time with `k` more rows over its time without
//! ([`PassCost`], from the engine's measured step times: `super::cost`).
//! Where no `k` pays (`a` too low), it stops
//! proposing for a cool-down that doubles each time (up to
//! [`MAX_COOLDOWN`] steps), and then probes again with a few tokens: so text
//! that does not repeat costs about nothing, and text that starts repeating
//! is found again within a few dozen tokens.

/// Weight of the newest verify pass in the moving average: the last three or
/// four passes dominate, so a sequence that stops repeating backs off within
/// a handful of steps.
const WEIGHT: f32 = 0.3;
/// The average's start: optimistic, so that a sequence's first proposals
/// get verified and it can learn.
const PRIOR: f32 = 0.7;
/// The first cool-down, in steps.
const MIN_COOLDOWN: u32 = 4;
/// The longest cool-down, in steps (it doubles from 4 after each failed probe).
pub const MAX_COOLDOWN: u32 = 64;
/// Tokens verified by the probe at the end of a cool-down.
const PROBE: usize = 2;

/// One sequence's record of its proposals, and its cool-down.
#[derive(Clone, Debug)]
pub struct SpecBackoff {
    acceptance: f32,
    cooldown: u32,
    next_cooldown: u32,
    probe: bool,
}

impl Default for SpecBackoff {
    fn default() -> Self {
        SpecBackoff { acceptance: PRIOR, cooldown: 0, next_cooldown: MIN_COOLDOWN, probe: false }
    }
}

/// What verifying more tokens of one sequence costs and what the step makes
/// without them.
#[derive(Clone, Debug)]
pub struct PassCost {
    /// Tokens the step is expected to make without this sequence's
    /// proposals: one per decoding sequence, plus the expected accepted
    /// tokens of the proposals already taken into the step.
    pub base_tokens: f32,
    /// `relative[k]`: the step's time with `k` more rows over its time
    /// without them (`relative[0]` = 1, non-decreasing). Its length bounds
    /// how many tokens are verified.
    pub relative: Vec<f32>,
}

impl PassCost {
    /// One sequence alone, each more row costing `per_row` of the step, up
    /// to `max_k` rows more.
    pub fn linear(per_row: f32, max_k: usize) -> PassCost {
        PassCost { base_tokens: 1.0, relative: (0..=max_k).map(|k| 1.0 + per_row * k as f32).collect() }
    }

    /// Expected tokens per unit of step time with `k` more rows that add
    /// `expected` tokens.
    fn rate(&self, k: usize, expected: f32) -> f32 {
        let t = self.relative.get(k).or(self.relative.last()).copied().unwrap_or(1.0).max(1.0);
        (self.base_tokens + expected) / t
    }

    /// The `k` in 0..=`chances.len()` with the best rate, `chances[i]` the
    /// chance that proposed tokens 0..=i are all taken (0: none pays).
    fn best(&self, chances: impl Iterator<Item = f32>) -> usize {
        let (mut best, mut best_rate, mut expected) = (0, self.rate(0, 0.0), 0.0f32);
        for (i, p) in chances.enumerate() {
            expected += p.clamp(0.0, 1.0);
            let rate = self.rate(i + 1, expected);
            if rate > best_rate {
                (best, best_rate) = (i + 1, rate);
            }
        }
        best
    }
}

impl SpecBackoff {
    /// The estimated chance that the next proposed token is accepted.
    pub fn acceptance(&self) -> f32 {
        self.acceptance
    }

    /// Whether the sequence is cooling down: `budget` gives 0 whatever is
    /// proposed, so the proposer need not run.
    pub fn cooling(&self) -> bool {
        self.cooldown > 0
    }

    /// How many of the `available` proposed tokens to verify this step, at
    /// `cost`. 0: decode as usual (this may start or count down a cool-down;
    /// call it once per step the sequence decodes, whether or not anything
    /// was proposed).
    pub fn budget(&mut self, available: usize, cost: &PassCost) -> usize {
        if self.cooldown > 0 {
            self.cooldown -= 1;
            self.probe = self.cooldown == 0;
            return 0;
        }
        if available == 0 {
            return 0;
        }
        if std::mem::take(&mut self.probe) {
            return available.min(PROBE);
        }
        let a = self.acceptance().clamp(0.0, 1.0);
        let best = cost.best((1..=available as i32).map(|k| a.powi(k)));
        if best == 0 {
            self.cooldown = self.next_cooldown;
            self.next_cooldown = (self.next_cooldown * 2).min(MAX_COOLDOWN);
        }
        best
    }

    /// As [`Self::budget`], for a proposer that estimates its own draft:
    /// `chances[i]` is the chance that tokens 0..=i are all right. Where the
    /// sequence is not cooling down and its record allows any tokens, it
    /// verifies the longer of what its record says pays and what the draft's
    /// own chances say pays: a proposer that has seen this exact continuation
    /// before (the suffix proposer's cache of earlier outputs) knows better
    /// than an average over the sequence's past drafts, and a draft that is
    /// wrong still lowers that average towards a cool-down.
    pub fn budget_estimated(&mut self, chances: &[f32], cost: &PassCost) -> usize {
        let by_record = self.budget(chances.len(), cost);
        if by_record == 0 {
            return 0;
        }
        by_record.max(cost.best(chances.iter().copied()))
    }

    /// Expected tokens taken of `k` verified ones: by the draft's own
    /// `chances` where the proposer gives them, by the record otherwise.
    pub fn expected(&self, chances: Option<&[f32]>, k: usize) -> f32 {
        match chances {
            Some(c) => c.iter().take(k).map(|p| p.clamp(0.0, 1.0)).sum(),
            None => (1..=k as i32).map(|i| self.acceptance.clamp(0.0, 1.0).powi(i)).sum(),
        }
    }

    /// Records a verify pass: `proposed` tokens, of which the first
    /// `accepted` were taken.
    pub fn record(&mut self, proposed: usize, accepted: usize) {
        if proposed == 0 {
            return;
        }
        let accepted = accepted.min(proposed);
        let tried = (accepted + 1).min(proposed);
        self.acceptance += WEIGHT * (accepted as f32 / tried as f32 - self.acceptance);
        if accepted > 0 {
            self.next_cooldown = MIN_COOLDOWN;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One sequence alone, each more row costing 0.15 of its step.
    fn one(max_k: usize) -> PassCost {
        PassCost::linear(0.15, max_k)
    }

    #[test]
    fn verifies_more_while_accepted_and_backs_off_when_not() {
        let mut b = SpecBackoff::default();
        let first = b.budget(5, &one(5));
        assert!(first >= 1, "the prior lets the first proposals through");
        for _ in 0..20 {
            let k = b.budget(5, &one(5));
            b.record(k, k);
        }
        assert_eq!(b.budget(5, &one(5)), 5, "always accepted: verify all");
        // Now nothing is accepted: the budget shrinks to 0 and a cool-down starts.
        let mut steps_to_zero = 0;
        while b.budget(5, &one(5)) > 0 {
            b.record(5, 0);
            steps_to_zero += 1;
            assert!(steps_to_zero < 30, "never backed off");
        }
        // During the cool-down nothing is verified, then a short probe.
        let idle = (0..MIN_COOLDOWN).filter(|_| b.budget(5, &one(5)) == 0).count();
        assert_eq!(idle as u32, MIN_COOLDOWN);
        assert_eq!(b.budget(5, &one(5)), PROBE);
        // A failed probe backs off for twice as long.
        b.record(PROBE, 0);
        assert_eq!(b.budget(5, &one(5)), 0);
        let idle = 1 + (0..100).take_while(|_| b.budget(5, &one(5)) == 0).count();
        assert_eq!(idle as u32, 2 * MIN_COOLDOWN + 1);
    }

    #[test]
    fn a_confident_draft_is_verified_whole() {
        let mut b = SpecBackoff::default();
        // A record of half-taken drafts allows a couple of tokens...
        for _ in 0..10 {
            b.record(6, 2);
        }
        let by_record = b.clone().budget(12, &one(12));
        assert!((1..6).contains(&by_record), "{by_record}");
        // ...but a draft its proposer is sure of is verified whole.
        assert_eq!(b.clone().budget_estimated(&[1.0; 12], &one(12)), 12);
        // One it doubts is not lengthened.
        assert_eq!(b.clone().budget_estimated(&[0.3, 0.12, 0.1], &one(3)), by_record.min(3));
        // Cooling down, nothing is verified however sure.
        for _ in 0..30 {
            let k = b.budget(5, &one(5));
            b.record(k, 0);
        }
        assert!(b.cooling());
        assert_eq!(b.budget_estimated(&[1.0; 12], &one(12)), 0);
    }

    #[test]
    fn big_batches_need_better_odds() {
        let mut b = SpecBackoff::default();
        for _ in 0..10 {
            b.record(4, 2);
        }
        let alone = b.clone().budget(8, &one(8));
        // 64 sequences: the step makes 64 tokens without these proposals,
        // and a row costs a sixty-fourth of it.
        let crowded = PassCost { base_tokens: 64.0, relative: (0..=8).map(|k| 1.0 + k as f32 / 64.0).collect() };
        let crowded = b.clone().budget(8, &crowded);
        assert!(alone > crowded, "{alone} vs {crowded}");
    }

    #[test]
    fn a_costly_first_row_needs_a_longer_draft() {
        // Measured on the CPU: 2 rows 1.3x one row, then +0.3 a row.
        let steep = PassCost { base_tokens: 1.0, relative: vec![1.0, 1.3, 1.6, 1.9, 2.2, 2.5] };
        let b = SpecBackoff { acceptance: 0.25, ..SpecBackoff::default() };
        // At a quarter's acceptance one token pays for a row at 0.15...
        assert_eq!(b.clone().budget(1, &one(1)), 1);
        // ...but not for one at 0.3.
        assert_eq!(b.clone().budget(1, &steep), 0);
        // A sure five-token draft pays for its rows, whole.
        let b = SpecBackoff::default();
        assert_eq!(b.clone().budget_estimated(&[1.0; 5], &steep), 5);
    }
}
