//! Speculative decoding changes how soon tokens come, never which: greedy and
//! seeded requests make the same tokens and logprobs with and without it,
//! alone, batched, under preemption, in small token budgets (chunked
//! prefill), resumed after a cut, and with stop ids and `max_tokens` ending
//! them inside a verified run. The tiny random model's greedy output falls
//! into loops, so the n-gram and suffix proposers are right often (accepted
//! runs) and wrong often (rejections): both paths run, which the counters
//! check.

mod common;

use common::*;
use ferry_engine::quant::GgmlType;
use ferry_engine::spec::SpeculativeConfig;
use ferry_engine::{EngineCore, EngineCoreConfig};
use ferry_transport::*;
use std::collections::HashMap;
use std::time::Instant;

const EOG: u32 = 2;

fn ngram(k: usize, min: usize, max: usize) -> SpeculativeConfig {
    let json = format!(r#"{{"method": "ngram", "num_speculative_tokens": {k}, "prompt_lookup_min": {min}, "prompt_lookup_max": {max}}}"#);
    SpeculativeConfig::parse(&json).unwrap()
}

fn suffix(k: usize, depth: usize) -> SpeculativeConfig {
    let json = format!(r#"{{"method": "suffix", "num_speculative_tokens": {k}, "suffix_decoding_max_tree_depth": {depth}}}"#);
    SpeculativeConfig::parse(&json).unwrap()
}

fn core(num_blocks: usize, budget: usize, spec: Option<SpeculativeConfig>) -> EngineCore {
    let sched = tiny_scheduler(num_blocks, 16, budget);
    EngineCore::new(EngineCoreConfig { rank: 0, scheduler: sched, seed: 9, spec }, tiny_executor(GgmlType::Q8_0, 23, num_blocks), vec![EOG])
}

/// Even requests greedy, odd ones seeded with every sampling setting; some
/// end on a stop id or an odd `max_tokens` (inside a verify pass's run).
fn params(i: u64) -> SamplingParams {
    let max_tokens = 37 + (i as u32 % 3) * 11;
    if i.is_multiple_of(2) {
        return SamplingParams { temperature: 0.0, max_tokens, ignore_eos: i.is_multiple_of(4), logprobs: Some(2), ..Default::default() };
    }
    SamplingParams {
        temperature: 0.7,
        top_p: 0.9,
        top_k: 40,
        min_p: 0.02,
        repetition_penalty: 1.05,
        frequency_penalty: 0.1,
        presence_penalty: 0.1,
        logit_bias: vec![(7, 1.5)],
        min_tokens: 4,
        stop_token_ids: if i.is_multiple_of(3) { vec![11] } else { vec![] },
        seed: Some(77 + i),
        max_tokens,
        ignore_eos: true,
        logprobs: Some(1),
        ..Default::default()
    }
}

/// Prompts that repeat themselves (a motif several times), so the proposer
/// has something to find from the first step on.
fn prompt(i: u64) -> Vec<u32> {
    let motif = tokens(40 + i, 3 + i as usize % 5, 300);
    let mut p = tokens(90 + i, 4, 300);
    for _ in 0..4 {
        p.extend(&motif);
    }
    p
}

type Outs = HashMap<(RequestId, u32), (Vec<u32>, Vec<TokenLogprob>, Option<FinishReason>)>;

fn run(core: &mut EngineCore, reqs: Vec<EngineRequest>) -> Outs {
    for r in reqs {
        core.add_request(r, Instant::now()).expect("valid request");
    }
    let mut out = Outs::new();
    let mut steps = 0;
    while core.has_work() {
        for o in core.step(Instant::now()) {
            assert!(!matches!(o.finish, Some(FinishReason::Error(_))), "{o:?}");
            let e = out.entry((o.id, o.index)).or_default();
            e.0.extend(&o.new_tokens);
            e.1.extend(o.logprobs.unwrap_or_default());
            if o.finish.is_some() {
                e.2 = o.finish;
            }
        }
        steps += 1;
        assert!(steps < 20_000, "engine did not finish");
    }
    out
}

fn requests(n: u64) -> Vec<EngineRequest> {
    (0..n).map(|i| EngineRequest::new(i, prompt(i), params(i))).collect()
}

#[test]
fn speculation_changes_no_token_alone_batched_or_preempted() {
    let n = 12;
    let plain: Vec<_> = (0..n).map(|i| run(&mut core(256, 64, None), vec![EngineRequest::new(i, prompt(i), params(i))])).collect();
    let cases: [(&str, usize, usize, SpeculativeConfig); 7] = [
        ("roomy", 512, 256, ngram(4, 1, 3)),
        ("long drafts", 512, 256, ngram(8, 2, 4)),
        // A budget of 24 tokens: proposals are cut to fit, prompts chunked.
        ("small budget", 512, 24, ngram(5, 1, 3)),
        // About a third of the sequences fit: preempted and recomputed.
        ("tight cache", 70, 64, ngram(4, 1, 3)),
        // The suffix proposer, whose drafts also come from the other
        // sequences' outputs (running ones included).
        ("suffix", 512, 256, suffix(8, 24)),
        ("suffix, small budget", 512, 24, suffix(16, 12)),
        ("suffix, tight cache", 70, 64, suffix(6, 24)),
    ];
    for (name, blocks, budget, spec) in cases {
        let mut c = core(blocks, budget, Some(spec));
        let got = run(&mut c, requests(n));
        for i in 0..n {
            assert_eq!(got[&(i, 0)], plain[i as usize][&(i, 0)], "{name}: request {i}");
        }
        let s = c.stats();
        assert!(s.spec.num_drafts > 0 && s.spec.num_accepted_tokens > 0, "{name}: nothing speculated: {:?}", s.spec);
        assert!(s.spec.num_accepted_tokens < s.spec.num_draft_tokens, "{name}: nothing rejected: {:?}", s.spec);
        assert_eq!(s.spec.accepted_per_pos.iter().sum::<u64>(), s.spec.num_accepted_tokens, "{name}");
        if name.ends_with("tight cache") {
            assert!(s.num_preemptions > 0, "the tight cache should preempt");
        }
        assert_eq!(c.num_free_blocks(), c.num_blocks(), "{name}: blocks leaked");
    }
}

#[test]
fn a_resumed_request_continues_the_same_with_speculation() {
    for (spec, i) in [(ngram(4, 1, 3), 0u64), (ngram(4, 1, 3), 1), (ngram(4, 1, 3), 2), (suffix(8, 16), 0), (suffix(8, 16), 1)] {
        let whole = run(&mut core(256, 64, None), vec![EngineRequest::new(i, prompt(i), params(i))]).remove(&(i, 0)).unwrap().0;
        for cut in [1usize, 9, whole.len() - 1] {
            let mut r = EngineRequest::new(i, prompt(i), params(i));
            r.resume = Some(Resume { index: 0, output_tokens: whole[..cut].to_vec() });
            let got = run(&mut core(256, 64, Some(spec.clone())), vec![r]).remove(&(i, 0)).map(|o| o.0).unwrap_or_default();
            assert_eq!(got, whole[cut..], "request {i} resumed after {cut}");
        }
    }
}

#[test]
fn verify_passes_make_several_tokens_per_step() {
    // One greedy request on a repeating prompt: with speculation it needs
    // fewer steps than tokens.
    let req = || EngineRequest::new(1, prompt(0), SamplingParams { temperature: 0.0, max_tokens: 120, ignore_eos: true, ..Default::default() });
    let mut c = core(256, 64, Some(ngram(6, 1, 4)));
    c.add_request(req(), Instant::now()).unwrap();
    let (mut steps, mut toks) = (0, 0);
    while c.has_work() {
        toks += c.step(Instant::now()).iter().map(|o| o.new_tokens.len()).sum::<usize>();
        steps += 1;
    }
    assert_eq!(toks, 120);
    let s = c.stats().spec;
    assert!(steps < toks, "{steps} steps for {toks} tokens: {s:?}");
    assert_eq!(toks as u64, steps as u64 + s.num_accepted_tokens, "a token per step, plus every accepted draft");
}

#[test]
fn the_suffix_proposer_learns_from_earlier_outputs() {
    // A prompt that does not repeat, so its first output gives the proposer
    // little; asked again, the first output is in the cache and the second
    // is proposed nearly whole: the same tokens, in far fewer steps.
    let req = |id| {
        EngineRequest::new(id, tokens(5, 48, 300), SamplingParams { temperature: 0.0, max_tokens: 80, ignore_eos: true, ..Default::default() })
    };
    let plain = run(&mut core(256, 64, None), vec![req(1)]).remove(&(1, 0)).unwrap().0;
    let mut c = core(256, 64, Some(suffix(16, 24)));
    let steps_for = |c: &mut EngineCore, id| {
        c.add_request(req(id), Instant::now()).unwrap();
        let (mut steps, mut out) = (0, Vec::new());
        while c.has_work() {
            for o in c.step(Instant::now()) {
                out.extend(o.new_tokens);
            }
            steps += 1;
        }
        (steps, out)
    };
    let (first_steps, first) = steps_for(&mut c, 1);
    let accepted_first = c.stats().spec.num_accepted_tokens;
    let (second_steps, second) = steps_for(&mut c, 2);
    assert_eq!(first, plain);
    assert_eq!(second, plain);
    let s = c.stats().spec;
    assert!(s.num_accepted_tokens - accepted_first >= 60, "{s:?}, {accepted_first} in the first");
    assert!(second_steps * 3 < first_steps, "{second_steps} steps the second time, {first_steps} the first");
    assert_eq!(c.num_free_blocks(), c.num_blocks());
}
