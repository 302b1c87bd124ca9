//! The sampler's tests: validation, stop conditions, sampling.
use super::*;
use ferry_transport::FinishReason;

/// Test data from a tiny LCG of the tests' own, independent of the sampler's RNG.
struct Lcg(u64);
impl Lcg {
    fn next_f32(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32) / (1u64 << 24) as f32
    }
    fn logits(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| (self.next_f32() * 2.0 - 1.0) * scale)
            .collect()
    }
}

fn params() -> SamplingParams {
    SamplingParams::default()
}

type Edit = Box<dyn Fn(&mut SamplingParams)>;

// ---- validation -------------------------------------------------------

#[test]
fn validate_accepts_defaults_and_edges() {
    assert_eq!(validate(&params(), 100), Ok(()));
    let edges: Vec<Edit> = vec![
        Box::new(|p| p.n = 128),
        Box::new(|p| p.temperature = 0.0),
        Box::new(|p| p.temperature = 1e-6),
        Box::new(|p| p.temperature = 2.0),
        Box::new(|p| p.temperature = 50.0),
        Box::new(|p| p.top_p = 1.0),
        Box::new(|p| p.top_p = 1e-9),
        Box::new(|p| p.top_k = -1),
        Box::new(|p| p.top_k = 0),
        Box::new(|p| p.top_k = 1),
        Box::new(|p| p.top_k = i32::MAX),
        Box::new(|p| p.min_p = 0.0),
        Box::new(|p| p.min_p = 1.0),
        Box::new(|p| p.repetition_penalty = 1e-6),
        Box::new(|p| p.repetition_penalty = 100.0),
        Box::new(|p| p.presence_penalty = -2.0),
        Box::new(|p| p.presence_penalty = 2.0),
        Box::new(|p| p.frequency_penalty = -2.0),
        Box::new(|p| p.frequency_penalty = 2.0),
        Box::new(|p| p.max_tokens = 1),
        Box::new(|p| {
            p.max_tokens = 7;
            p.min_tokens = 7;
        }),
        Box::new(|p| p.logprobs = Some(0)),
        Box::new(|p| p.logprobs = Some(20)),
        Box::new(|p| p.stop_token_ids = vec![0, 99]),
        Box::new(|p| p.seed = Some(u64::MAX)),
        Box::new(|p| p.ignore_eos = true),
    ];
    for (i, edit) in edges.iter().enumerate() {
        let mut p = params();
        edit(&mut p);
        assert_eq!(validate(&p, 100), Ok(()), "edge case {i}: {p:?}");
    }
}

#[test]
fn validate_rejects_each_field() {
    type Case = (Edit, &'static str, &'static str);
    let cases: Vec<Case> = vec![
        (Box::new(|p| p.n = 0), "n", "n must be at least 1, got 0."),
        (Box::new(|p| p.n = 129), "n", "n must be at most 128, got 129."),
        (
            Box::new(|p| {
                p.n = 2;
                p.temperature = 0.0;
            }),
            "n",
            "n must be 1 when using greedy sampling, got 2.",
        ),
        (Box::new(|p| p.temperature = -1.0), "temperature", "temperature must be non-negative, got -1.0."),
        (Box::new(|p| p.temperature = f32::NAN), "temperature", "temperature must be a finite number, got nan."),
        (
            Box::new(|p| p.temperature = f32::INFINITY),
            "temperature",
            "temperature must be a finite number, got inf.",
        ),
        (Box::new(|p| p.top_p = 1.5), "top_p", "top_p must be in (0, 1], got 1.5."),
        (Box::new(|p| p.top_p = 0.0), "top_p", "top_p must be in (0, 1], got 0.0."),
        (Box::new(|p| p.top_p = f32::NAN), "top_p", "top_p must be in (0, 1], got nan."),
        (Box::new(|p| p.top_k = -2), "top_k", "top_k must be 0 (disable), or at least 1, got -2."),
        (Box::new(|p| p.min_p = -0.5), "min_p", "min_p must be in [0, 1], got -0.5."),
        (Box::new(|p| p.min_p = 1.5), "min_p", "min_p must be in [0, 1], got 1.5."),
        (
            Box::new(|p| p.repetition_penalty = 0.0),
            "repetition_penalty",
            "repetition_penalty must be greater than zero, got 0.0.",
        ),
        (
            Box::new(|p| p.repetition_penalty = f32::INFINITY),
            "repetition_penalty",
            "repetition_penalty must be a finite number, got inf.",
        ),
        (
            Box::new(|p| p.presence_penalty = 2.5),
            "presence_penalty",
            "presence_penalty must be in [-2, 2], got 2.5.",
        ),
        (
            Box::new(|p| p.presence_penalty = f32::NAN),
            "presence_penalty",
            "presence_penalty must be in [-2, 2], got nan.",
        ),
        (
            Box::new(|p| p.frequency_penalty = -3.0),
            "frequency_penalty",
            "frequency_penalty must be in [-2, 2], got -3.0.",
        ),
        (Box::new(|p| p.max_tokens = 0), "max_tokens", "max_tokens must be at least 1, got 0."),
        (
            Box::new(|p| {
                p.max_tokens = 5;
                p.min_tokens = 6;
            }),
            "min_tokens",
            "min_tokens must be less than or equal to max_tokens=5, got 6.",
        ),
        (
            Box::new(|p| p.logprobs = Some(21)),
            "logprobs",
            "Requested sample logprobs of 21, which is greater than max allowed: 20",
        ),
        (
            Box::new(|p| p.stop_token_ids = vec![3, 100, 7, 250]),
            "stop_token_ids",
            "token_id(s) [100, 250] in stop_token_ids contain out-of-vocab token ids. Vocabulary size: 100",
        ),
    ];
    for (edit, param, message) in &cases {
        let mut p = params();
        edit(&mut p);
        let e = validate(&p, 100).expect_err(message);
        assert_eq!(e.param, *param);
        assert_eq!(e.message, *message);
        assert_eq!(e.to_string(), *message);
        assert!(
            e.message.contains(param),
            "message names the parameter: {message}"
        );
    }
}

// ---- greedy and determinism -------------------------------------------

#[test]
fn greedy_is_argmax_with_lowest_id_on_ties() {
    let mut rng = Lcg(1);
    let mut p = params();
    p.temperature = 0.0;
    let mut s = SequenceSampler::new(&p, &[], 0);
    for _ in 0..20 {
        let logits = rng.logits(3000, 10.0);
        // Reference: first index of the maximum, compared in f64.
        let mut best = 0;
        for i in 0..logits.len() {
            if (logits[i] as f64) > (logits[best] as f64) {
                best = i;
            }
        }
        let mut scratch = logits.clone();
        assert_eq!(s.sample(&mut scratch, &p, &[]).token, best as u32);
    }
    let mut tied = vec![0.5, 3.0, -1.0, 3.0, 3.0];
    assert_eq!(s.sample(&mut tied, &p, &[]).token, 1);
    assert_eq!(s.num_generated(), 21);
}

fn run(seed: u64, steps: usize, p: &SamplingParams) -> Vec<u32> {
    let mut data = Lcg(99);
    let mut s = SequenceSampler::new(p, &[1, 2, 3], seed);
    (0..steps)
        .map(|_| {
            let mut l = data.logits(1000, 3.0);
            s.sample(&mut l, p, &[]).token
        })
        .collect()
}

#[test]
fn same_seed_same_tokens_different_seeds_differ() {
    for p in [
        params(),
        SamplingParams {
            top_k: 50,
            top_p: 0.9,
            temperature: 0.8,
            ..params()
        },
        SamplingParams {
            min_p: 0.05,
            repetition_penalty: 1.3,
            ..params()
        },
    ] {
        let a = run(42, 60, &p);
        assert_eq!(a, run(42, 60, &p));
        assert_ne!(a, run(43, 60, &p));
    }
    assert_ne!(sequence_seed(42, 0), sequence_seed(42, 1));
    assert_eq!(sequence_seed(42, 3), sequence_seed(42, 3));
    assert_ne!(
        run(sequence_seed(5, 0), 40, &params()),
        run(sequence_seed(5, 1), 40, &params())
    );
}

// ---- distribution -----------------------------------------------------

/// The filtered distribution written out plainly in f64, with a full sort:
/// temperature, min-p, top-k (ties with the k-th kept), top-p (ascending
/// cumulative sum <= 1 - p dropped, the best token always kept), softmax.
fn reference_distribution(
    logits: &[f32],
    t: f64,
    top_k: i32,
    top_p: f64,
    min_p: f64,
) -> Vec<f64> {
    let n = logits.len();
    let t = if t < 0.01 { 0.01 } else { t };
    let mut l: Vec<f64> = logits.iter().map(|&x| x as f64 / t).collect();
    let softmax = |l: &[f64]| {
        let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = l.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        e.into_iter().map(|x| x / z).collect::<Vec<f64>>()
    };
    if min_p > 0.0 {
        let p = softmax(&l);
        let pmax = p.iter().cloned().fold(0.0, f64::max);
        for i in 0..n {
            if p[i] < min_p * pmax {
                l[i] = f64::NEG_INFINITY;
            }
        }
    }
    if top_k > 0 && (top_k as usize) < n {
        let mut sorted = l.clone();
        sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
        let kth = sorted[top_k as usize - 1];
        for x in l.iter_mut() {
            if *x < kth {
                *x = f64::NEG_INFINITY;
            }
        }
    }
    if top_p < 1.0 {
        let p = softmax(&l);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| l[a].partial_cmp(&l[b]).unwrap().then(b.cmp(&a)));
        let mut cum = 0.0;
        for (pos, &i) in order.iter().enumerate() {
            cum += p[i];
            if cum <= 1.0 - top_p && pos + 1 < n {
                l[i] = f64::NEG_INFINITY;
            }
        }
    }
    softmax(&l)
}

#[test]
fn draws_match_the_filtered_distribution() {
    let logits = [1.0f32, 2.5, 0.3, 2.0, -1.0, 1.7, 0.0, 2.5, -0.4, 1.2];
    // (temperature, top_k, top_p, min_p)
    let configs = [
        (1.0, 0, 1.0, 0.0),
        (0.7, 0, 1.0, 0.0),
        (1.5, 0, 1.0, 0.0),
        (1.0, 3, 1.0, 0.0), // the 3rd best (2.0) and a tie at the top (2.5, 2.5)
        (1.0, 2, 1.0, 0.0),
        (1.0, 1, 1.0, 0.0), // top_k = 1 keeps both tokens tied at the top, like vLLM
        (1.0, 0, 0.6, 0.0),
        (1.0, 0, 0.85, 0.0),
        (1.0, 0, 1.0, 0.2),
        (0.8, 0, 1.0, 0.3),
        (1.3, 5, 0.8, 0.05),
        (0.9, 6, 0.9, 0.25),
        // min-p before top-p (vLLM v1's order): the other order differs by 0.15 here.
        (1.0, 0, 0.7, 0.3),
        (1e-6, 0, 1.0, 0.0), // raised to 0.01 like vLLM: the tied best two
    ];
    const DRAWS: usize = 20_000;
    for (ci, &(t, k, tp, mp)) in configs.iter().enumerate() {
        let p = SamplingParams {
            temperature: t as f32,
            top_k: k,
            top_p: tp as f32,
            min_p: mp as f32,
            ..params()
        };
        let want = reference_distribution(&logits, t, k, tp, mp);
        let mut s = SequenceSampler::new(&p, &[], 1234 + ci as u64);
        let mut counts = [0usize; 10];
        for _ in 0..DRAWS {
            let mut l = logits.to_vec();
            counts[s.sample(&mut l, &p, &[]).token as usize] += 1;
            // Penalties are off, so the recorded outputs don't matter.
        }
        for i in 0..10 {
            let got = counts[i] as f64 / DRAWS as f64;
            assert!(
                (got - want[i]).abs() < 0.02,
                "config {ci} {:?}: token {i} got {got}, want {}",
                (t, k, tp, mp),
                want[i]
            );
            if want[i] == 0.0 {
                assert_eq!(counts[i], 0, "config {ci}: filtered token {i} drawn");
            }
        }
    }
}

#[test]
fn top_p_over_a_large_vocabulary_matches_a_full_sort() {
    let mut rng = Lcg(7);
    for (n, scale, p) in [
        (5000, 0.5, 0.9),
        (5000, 8.0, 0.5),
        (150, 2.0, 0.95),
        (3000, 0.01, 0.3),
    ] {
        let logits = rng.logits(n, scale);
        let want = reference_distribution(&logits, 1.0, 0, p, 0.0);
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        let kept = top_p_keep(&mut cand, max, p, &mut Vec::new());
        let mut got: Vec<u32> = cand[..kept].iter().map(|c| c.0).collect();
        got.sort_unstable();
        let expected: Vec<u32> = (0..n as u32).filter(|&i| want[i as usize] > 0.0).collect();
        assert_eq!(got, expected, "n={n} scale={scale} p={p}");
    }
}

// ---- penalties --------------------------------------------------------

#[test]
fn penalties_match_the_formula() {
    let prompt = [1u32, 2, 2, 7, 9999]; // 9999 lies outside the vocabulary: ignored
    let outputs = [3u32, 3, 2, 5, 3];
    let (rep, freq, pres) = (1.7f32, 0.4f32, -0.3f32);
    let p = SamplingParams {
        temperature: 0.0,
        repetition_penalty: rep,
        frequency_penalty: freq,
        presence_penalty: pres,
        ..params()
    };
    let mut s = SequenceSampler::new(&p, &prompt, 0);
    // Force the outputs with an overwhelming logit.
    for &t in &outputs {
        let mut l = vec![0.0f32; 10];
        l[t as usize] = 1000.0;
        assert_eq!(s.sample(&mut l, &p, &[]).token, t);
    }
    let base: Vec<f32> = vec![1.5, -2.0, 0.8, 3.0, -0.5, 0.0, 2.2, -1.1, 0.6, -3.3];
    let mut got = base.clone();
    apply_penalties(&mut got, &s.row(&p, &[], 0));
    for i in 0..10u32 {
        let count = outputs.iter().filter(|&&t| t == i).count() as f64;
        let seen = prompt.contains(&i) || count > 0.0;
        let mut want = base[i as usize] as f64;
        if seen {
            want = if want > 0.0 {
                want / rep as f64
            } else {
                want * rep as f64
            };
        }
        want -= freq as f64 * count;
        if count > 0.0 {
            want -= pres as f64;
        }
        assert!(
            (got[i as usize] as f64 - want).abs() < 1e-5,
            "token {i}: got {} want {want}",
            got[i as usize]
        );
    }

    // End to end: the penalty moves the greedy pick off the repeated token.
    let mut l = vec![0.0f32; 10];
    l[3] = 2.0; // 2/1.7 - 0.4*3 + 0.3 = 0.276...
    l[4] = 1.0; // untouched
    assert_eq!(s.sample(&mut l, &p, &[]).token, 4);
}

// ---- logprobs ---------------------------------------------------------

fn reference_logprobs(raw: &[f32]) -> Vec<f64> {
    let clean: Vec<f64> = raw
        .iter()
        .map(|&x| {
            if x.is_nan() {
                f64::NEG_INFINITY
            } else {
                x as f64
            }
        })
        .collect();
    let m = clean.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = clean.iter().map(|x| (x - m).exp()).sum();
    clean.iter().map(|x| x - m - z.ln()).collect()
}

#[test]
fn logprobs_are_the_raw_log_softmax() {
    let mut rng = Lcg(3);
    let mut raw = rng.logits(2000, 12.0);
    raw[17] = f32::NEG_INFINITY;
    raw[18] = f32::NAN;
    let want = reference_logprobs(&raw);
    let mut order: Vec<usize> = (0..raw.len()).collect();
    order.sort_by(|&a, &b| want[b].partial_cmp(&want[a]).unwrap().then(a.cmp(&b)));
    // Penalties and temperature must not touch the reported logprobs.
    let p = SamplingParams {
        logprobs: Some(5),
        temperature: 0.5,
        repetition_penalty: 1.8,
        top_k: 40,
        ..params()
    };
    let mut s = SequenceSampler::new(&p, &[order[0] as u32, 5, 6], 11);
    for _ in 0..5 {
        let mut l = raw.clone();
        let out = s.sample(&mut l, &p, &[]);
        let lp = out.logprob.expect("logprobs asked for");
        assert_eq!(lp.token, out.token);
        assert!((lp.logprob as f64 - want[out.token as usize]).abs() < 1e-5);
        assert_eq!(lp.top.len(), 5);
        for (j, &(id, v)) in lp.top.iter().enumerate() {
            assert_eq!(id as usize, order[j]);
            assert!((v as f64 - want[order[j]]).abs() < 1e-5);
        }
    }
    // k = 0: only the chosen token; no logprobs asked: none.
    let p0 = SamplingParams {
        logprobs: Some(0),
        ..params()
    };
    let mut l = raw.clone();
    let out = SequenceSampler::new(&p0, &[], 1).sample(&mut l, &p0, &[]);
    let lp = out.logprob.unwrap();
    assert!(lp.top.is_empty());
    assert!((lp.logprob as f64 - want[out.token as usize]).abs() < 1e-5);
    let mut l = raw.clone();
    assert!(SequenceSampler::new(&params(), &[], 1)
        .sample(&mut l, &params(), &[])
        .logprob
        .is_none());
}

// ---- min_tokens and stopping -----------------------------------------

#[test]
fn min_tokens_masks_eog_and_stop_ids() {
    let eog = [0u32, 9];
    let stop = 4u32;
    for (temperature, ignore_eos) in [(0.0, false), (1.0, false), (0.0, true)] {
        let p = SamplingParams {
            temperature,
            min_tokens: 3,
            max_tokens: 10,
            stop_token_ids: vec![stop],
            ignore_eos,
            ..params()
        };
        for seed in 0..50 {
            let mut s = SequenceSampler::new(&p, &[], seed);
            for step in 0..5 {
                // EOG and the stop id dominate; everything else is tiny but finite.
                let mut l = vec![-5.0f32; 10];
                l[0] = 10.0;
                l[9] = 10.0;
                l[stop as usize] = 10.0;
                let t = s.sample(&mut l, &p, &eog).token;
                let ends = eog.contains(&t) || t == stop;
                if step < 3 {
                    // Like vLLM, EOG is masked during min_tokens even with ignore_eos.
                    assert!(!ends, "step {step} produced {t} (seed {seed})");
                } else {
                    assert!(ends, "step {step} produced {t} (seed {seed})");
                }
            }
            if temperature == 0.0 {
                break; // greedy: one seed is enough
            }
        }
    }
}

#[test]
fn check_stop_cases() {
    let eog = [2u32, 50];
    let p = SamplingParams {
        max_tokens: 10,
        stop_token_ids: vec![7],
        ..params()
    };
    assert_eq!(check_stop(&p, 2, 1, &eog), Some(FinishReason::Stop));
    assert_eq!(check_stop(&p, 50, 4, &eog), Some(FinishReason::Stop));
    assert_eq!(check_stop(&p, 7, 4, &eog), Some(FinishReason::Stop));
    assert_eq!(check_stop(&p, 3, 9, &eog), None);
    assert_eq!(check_stop(&p, 3, 10, &eog), Some(FinishReason::Length));
    // Stop wins over Length on the last token.
    assert_eq!(check_stop(&p, 2, 10, &eog), Some(FinishReason::Stop));

    let ig = SamplingParams {
        ignore_eos: true,
        ..p.clone()
    };
    assert_eq!(check_stop(&ig, 2, 1, &eog), None);
    assert_eq!(check_stop(&ig, 7, 1, &eog), Some(FinishReason::Stop));
    assert_eq!(check_stop(&ig, 2, 10, &eog), Some(FinishReason::Length));

    // min_tokens: no stop while fewer than min_tokens tokens exist (vLLM).
    let mt = SamplingParams {
        min_tokens: 3,
        ..p.clone()
    };
    assert_eq!(check_stop(&mt, 2, 1, &eog), None);
    assert_eq!(check_stop(&mt, 7, 2, &eog), None);
    assert_eq!(check_stop(&mt, 2, 3, &eog), Some(FinishReason::Stop));
    assert_eq!(check_stop(&mt, 7, 4, &eog), Some(FinishReason::Stop));

    let one = SamplingParams {
        max_tokens: 1,
        ..params()
    };
    assert_eq!(check_stop(&one, 5, 1, &[]), Some(FinishReason::Length));
    // Unvalidated min_tokens > max_tokens still ends at max_tokens.
    let bad = SamplingParams {
        max_tokens: 2,
        min_tokens: 5,
        ..params()
    };
    assert_eq!(check_stop(&bad, 5, 2, &[]), Some(FinishReason::Length));
}

// ---- bad numbers --------------------------------------------------------

#[test]
fn nan_and_inf_never_panic() {
    let greedy = SamplingParams {
        temperature: 0.0,
        logprobs: Some(3),
        ..params()
    };
    let random = SamplingParams {
        top_k: 3,
        top_p: 0.5,
        min_p: 0.1,
        logprobs: Some(3),
        ..params()
    };
    for p in [&greedy, &random, &params()] {
        let mut s = SequenceSampler::new(p, &[0, 1], 5);
        // All NaN: raw argmax fallback, the lowest id.
        let mut l = vec![f32::NAN; 8];
        let out = s.sample(&mut l, p, &[]);
        assert_eq!(out.token, 0);
        // NaN is -inf, +inf is the best.
        let mut l = vec![f32::NAN, 0.0, f32::INFINITY, f32::NAN, 1.0];
        assert_eq!(s.sample(&mut l, p, &[]).token, 2);
        // NaNs mixed in are never drawn.
        for _ in 0..200 {
            let mut l = vec![f32::NAN, 1.0, f32::NAN, 1.2, f32::NEG_INFINITY];
            let t = s.sample(&mut l, p, &[]).token;
            assert!(t == 1 || t == 3, "drew {t}");
        }
        // Empty logits: token 0, no panic.
        assert_eq!(s.sample(&mut [], p, &[]).token, 0);
    }
    // min_tokens masks the only finite logit: fall back to the raw argmax.
    let p = SamplingParams {
        min_tokens: 2,
        ..params()
    };
    let mut s = SequenceSampler::new(&p, &[], 0);
    let mut l = vec![f32::NEG_INFINITY, 3.0, f32::NEG_INFINITY];
    assert_eq!(s.sample(&mut l, &p, &[1]).token, 1);
    // Penalties and tiny temperatures that overflow stay finite.
    let p = SamplingParams {
        repetition_penalty: 1e-6,
        temperature: 1e-4,
        ..params()
    };
    let mut s = SequenceSampler::new(&p, &[0, 1], 0);
    let mut l = vec![f32::MAX, f32::MAX / 2.0, -f32::MAX];
    // Both penalized logits saturate at f32::MAX, so either may come out.
    assert!(s.sample(&mut l, &p, &[]).token < 2);
    // Unvalidated params don't panic either.
    let wild = SamplingParams {
        temperature: f32::NAN,
        top_p: -1.0,
        top_k: -7,
        min_p: 5.0,
        repetition_penalty: -1.0,
        frequency_penalty: f32::NAN,
        logprobs: Some(1000),
        ..params()
    };
    let mut s = SequenceSampler::new(&wild, &[0], 0);
    let mut l = vec![0.1, 0.2, 0.3];
    let out = s.sample(&mut l, &wild, &[]);
    assert_eq!(out.token, 2);
    assert_eq!(out.logprob.unwrap().top.len(), 3);
    let wild2 = SamplingParams {
        temperature: f32::INFINITY,
        top_p: 0.0,
        min_p: 1.5,
        ..params()
    };
    let mut l = vec![0.1, 0.9, f32::NEG_INFINITY];
    let t = SequenceSampler::new(&wild2, &[], 0)
        .sample(&mut l, &wild2, &[])
        .token;
    assert!(t < 2);
}
