//! EngineCore end to end on a tiny random model: preemption, prefix sharing, seeds,
//! aborts, and that every KV block comes home.

mod common;

use common::*;
use ferry_engine::quant::GgmlType;
use ferry_engine::scheduler::SchedulerConfig;
use ferry_engine::rng::RngCore;
use ferry_engine::{spawn_engine, EngineCore, EngineCoreConfig};
use ferry_transport::*;
use std::collections::HashMap;

const EOG: u32 = 2;

fn core(num_blocks: usize, max_num_batched_tokens: usize, prefix_caching: bool) -> EngineCore {
    let exec = tiny_executor(GgmlType::Q8_0, 11, num_blocks);
    let sched = SchedulerConfig { enable_prefix_caching: prefix_caching, ..tiny_scheduler(num_blocks, 8, max_num_batched_tokens) };
    EngineCore::new(EngineCoreConfig { rank: 0, scheduler: sched, seed: 1 , spec: None }, exec, vec![EOG])
}

fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams { temperature: 0.0, max_tokens, ignore_eos: true, logprobs: Some(3), ..Default::default() }
}

type Outs = HashMap<(RequestId, u32), (Vec<u32>, Vec<TokenLogprob>, Option<FinishReason>)>;

/// Steps until every request has finished; collects each sequence's tokens.
fn run_to_end(core: &mut EngineCore, outs: &mut Outs) {
    let mut steps = 0;
    while core.has_work() {
        for o in core.step(std::time::Instant::now()) {
            let e = outs.entry((o.id, o.index)).or_default();
            e.0.extend(&o.new_tokens);
            e.1.extend(o.logprobs.unwrap_or_default());
            if o.finish.is_some() {
                e.2 = o.finish;
            }
        }
        steps += 1;
        assert!(steps < 10_000, "engine did not finish");
    }
}

fn add(core: &mut EngineCore, id: RequestId, prompt: Vec<u32>, p: SamplingParams) {
    core.add_request(EngineRequest::new(id, prompt, p), std::time::Instant::now()).expect("valid request");
}

#[test]
fn preempted_requests_resume_with_the_same_tokens_and_logprobs() {
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| tokens(100 + i, 10 + i as usize * 3, 300)).collect();
    let mut roomy = core(256, 64, true);
    let mut tight = core(14, 64, true); // 56 slots for four sequences growing to ~40 tokens each
    let (mut a, mut b) = (Outs::new(), Outs::new());
    for (i, p) in prompts.iter().enumerate() {
        add(&mut roomy, i as u64, p.clone(), greedy(24));
        add(&mut tight, i as u64, p.clone(), greedy(24));
    }
    run_to_end(&mut roomy, &mut a);
    run_to_end(&mut tight, &mut b);
    assert!(tight.stats().num_preemptions > 0, "the tight cache should have forced preemption");
    assert_eq!(roomy.stats().num_preemptions, 0);
    for key in a.keys() {
        let (ta, la, fa) = &a[key];
        let (tb, lb, fb) = &b[key];
        assert_eq!(ta.len(), 24);
        assert_eq!(fa, &Some(FinishReason::Length));
        assert_eq!(fa, fb);
        assert_eq!(ta, tb, "request {key:?}: tokens differ after preemption");
        for (x, y) in la.iter().zip(lb) {
            assert!((x.logprob - y.logprob).abs() < 1e-3, "logprob moved after preemption");
        }
    }
    for c in [&roomy, &tight] {
        assert_eq!(c.num_free_blocks(), c.num_blocks());
        assert_eq!(c.stats().kv_usage, 0.0);
    }
}

#[test]
fn n_completions_share_the_prompt_blocks_and_seeds_reproduce() {
    let prompt = tokens(7, 37, 300);
    let params = SamplingParams { n: 4, temperature: 1.0, seed: Some(1234), max_tokens: 12, ignore_eos: true, ..Default::default() };
    let run = || {
        let mut c = core(128, 256, true);
        add(&mut c, 9, prompt.clone(), params.clone());
        let mut o = Outs::new();
        run_to_end(&mut c, &mut o);
        let s = c.stats();
        assert!(s.prefix_cache_hits >= 3 * 36 / 4 * 4, "children should hit the prompt's full blocks: {s:?}");
        assert_eq!(c.num_free_blocks(), c.num_blocks());
        (0..4).map(|i| o[&(9, i)].0.clone()).collect::<Vec<_>>()
    };
    let first = run();
    assert_eq!(first, run(), "same seed, same completions");
    assert!(first.iter().any(|c| c != &first[0]), "sampled children should differ: {first:?}");
}

#[test]
fn every_block_returns_after_a_random_mix_of_endings() {
    let mut c = core(24, 32, true);
    let mut rng = ferry_engine::rng::splitmix(5);
    let mut outs = Outs::new();
    let mut live: Vec<RequestId> = Vec::new();
    let mut next_id = 0u64;
    for step in 0..400 {
        let r = rng.next_u64() % 10;
        if r < 3 && live.len() < 12 {
            let len = 1 + (rng.next_u64() % 30) as usize;
            let p = SamplingParams {
                n: 1 + (rng.next_u64() % 3) as u32,
                temperature: 0.8,
                max_tokens: 1 + (rng.next_u64() % 20) as u32,
                stop_token_ids: vec![(rng.next_u64() % 300) as u32],
                ..Default::default()
            };
            // Shared prefixes now and then, so cached blocks are shared too.
            let prompt = if r == 0 { tokens(77, len, 300) } else { tokens(step, len, 300) };
            add(&mut c, next_id, prompt, p);
            live.push(next_id);
            next_id += 1;
        } else if r == 3 && !live.is_empty() {
            let victim = live.swap_remove((rng.next_u64() % live.len() as u64) as usize);
            c.abort(&[victim], std::time::Instant::now());
        }
        for o in c.step(std::time::Instant::now()) {
            if o.finish.is_some() {
                outs.insert((o.id, o.index), (vec![], vec![], o.finish));
            }
        }
    }
    let ids: Vec<RequestId> = (0..next_id).collect();
    c.abort(&ids, std::time::Instant::now());
    assert_eq!(c.num_requests(), 0);
    assert!(!c.has_work());
    assert_eq!(c.num_free_blocks(), c.num_blocks(), "blocks leaked");
    assert!(c.stats().num_preemptions > 0, "the mix should have preempted someone");
}

#[test]
fn invalid_requests_are_refused_with_the_parameter_named() {
    let mut c = core(16, 64, true);
    let bad = |p: SamplingParams| EngineRequest::new(1, vec![1, 2, 3], p);
    let cases = [
        (SamplingParams { temperature: -1.0, ..Default::default() }, "temperature"),
        (SamplingParams { top_p: 1.5, ..Default::default() }, "top_p"),
        (SamplingParams { max_tokens: 0, ..Default::default() }, "max_tokens"),
        (SamplingParams { stop_token_ids: vec![9999], ..Default::default() }, "stop_token_ids"),
    ];
    for (p, name) in cases {
        let refusal = c.add_request(bad(p), std::time::Instant::now()).expect_err("must be refused");
        match refusal.finish {
            Some(FinishReason::Error(e)) => assert!(e.kind == ferry_transport::ErrorKind::InvalidRequest && e.message.contains(name), "{e:?} should name {name}"),
            other => panic!("expected an error, got {other:?}"),
        }
    }
    let too_long = EngineRequest::new(2, vec![1; 300], Default::default());
    let refusal = c.add_request(too_long, std::time::Instant::now()).expect_err("longer than max_model_len");
    assert!(matches!(refusal.finish, Some(FinishReason::Error(e)) if e.message.contains("300") && e.message.contains("256")));
    let oov = EngineRequest::new(3, vec![300], Default::default());
    assert!(c.add_request(oov, std::time::Instant::now()).is_err());
    assert_eq!(c.num_requests(), 0);
}

#[test]
fn stop_tokens_end_a_sequence_unless_min_tokens_holds_it() {
    let mut c = core(64, 64, true);
    let prompt = tokens(3, 8, 300);
    // Find what greedy decoding says first, then make that the stop token.
    add(&mut c, 1, prompt.clone(), greedy(1));
    let mut o = Outs::new();
    run_to_end(&mut c, &mut o);
    let first = o[&(1, 0)].0[0];
    let stop = SamplingParams { temperature: 0.0, max_tokens: 10, stop_token_ids: vec![first], ..Default::default() };
    add(&mut c, 2, prompt.clone(), stop.clone());
    add(&mut c, 3, prompt, SamplingParams { min_tokens: 3, ..stop });
    run_to_end(&mut c, &mut o);
    assert_eq!(o[&(2, 0)].0, vec![first]);
    assert_eq!(o[&(2, 0)].2, Some(FinishReason::Stop));
    assert!(o[&(3, 0)].0.len() >= 3 && !o[&(3, 0)].0[..3].contains(&first));
}

#[test]
fn threads_answer_over_the_flume_link_and_abort_frees_blocks() {
    let c = core(64, 64, true);
    let (mut gw, eng) = flume_link();
    let hello = Hello { protocol_version: PROTOCOL_VERSION, rank: 0, model: "tiny".into(), fingerprint: Default::default(), vocab_size: 1 << 17, max_model_len: 256, num_kv_blocks: 64, block_size: 4, node: "n".into() };
    let threads = spawn_engine(c, eng, hello.clone()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    assert_eq!(rt.block_on(gw.rx.recv()).unwrap(), FromEngine::Hello(hello));
    let long = SamplingParams { max_tokens: 200, ignore_eos: true, ..Default::default() };
    gw.tx.send(ToEngine::Command(EngineCommand::Add(Box::new(EngineRequest::new(5, tokens(1, 20, 300), long))))).unwrap();
    // Wait for a token, then abort: the request must end as aborted with usage back to 0.
    let mut saw_token = false;
    let mut aborted = false;
    while !aborted {
        let FromEngine::Outputs(b) = rt.block_on(gw.rx.recv()).unwrap() else { panic!("second hello") };
        for o in &b.outputs {
            if !o.new_tokens.is_empty() && !saw_token {
                saw_token = true;
                assert!(b.stats.kv_usage > 0.0);
                gw.tx.send(ToEngine::Command(EngineCommand::Abort(vec![5]))).unwrap();
            }
            if o.finish == Some(FinishReason::Abort) {
                aborted = true;
                assert_eq!(b.stats.kv_usage, 0.0);
                assert_eq!(b.stats.num_running, 0);
            }
        }
    }
    gw.tx.send(ToEngine::Command(EngineCommand::Shutdown)).unwrap();
    threads.join();
}

/// Prompt logprobs, checked against scoring each prefix separately: the
/// logprob the model gives prompt token p after tokens 0..p is what a request
/// for prompt 0..p reports for a sampled token p, forced by a +100 logit bias
/// (logprobs come from the raw logits, before the bias). The prompt is
/// prefilled in chunks and its prefix is already cached, which the request
/// must not use (every position has to produce logits).
#[test]
fn prompt_logprobs_equal_scoring_each_prefix_and_skip_the_cache() {
    let prompt = tokens(7, 21, 300);
    let mut c = core(256, 8, true);
    let mut warm = Outs::new();
    add(&mut c, 1, prompt.clone(), greedy(1)); // fills the prefix cache
    run_to_end(&mut c, &mut warm);

    let mut p = greedy(2);
    p.prompt_logprobs = Some(5);
    c.add_request(EngineRequest::new(2, prompt.clone(), p), std::time::Instant::now()).unwrap();
    let mut plps = None;
    let mut cached = 0;
    while c.has_work() {
        for o in c.step(std::time::Instant::now()) {
            if o.id == 2 && o.prompt_logprobs.is_some() {
                assert!(plps.is_none(), "prompt logprobs come once");
                plps = o.prompt_logprobs.clone();
                cached = o.num_cached_tokens;
            }
        }
    }
    let plps = plps.expect("prompt logprobs on the first output");
    assert_eq!(cached, 0, "a prompt-logprobs request is not served from the cache");
    assert_eq!(plps.len(), prompt.len() - 1);

    for pos in 1..prompt.len() {
        let lp = &plps[pos - 1];
        assert_eq!(lp.token, prompt[pos]);
        assert!(lp.top.len() == 5 && lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        let rank = 1 + lp.top.iter().filter(|t| t.1 > lp.logprob).count() as u32;
        if lp.logprob >= lp.top[4].1 {
            assert_eq!(lp.rank, rank, "position {pos}");
        }
        let mut f = greedy(1);
        f.logit_bias = vec![(prompt[pos], 100.0)];
        let mut one = Outs::new();
        let mut s = core(256, 64, false);
        add(&mut s, 9, prompt[..pos].to_vec(), f);
        run_to_end(&mut s, &mut one);
        let (toks, lps, _) = &one[&(9, 0)];
        assert_eq!(toks[0], prompt[pos], "a +100 bias forces the token");
        assert!((lps[0].logprob - lp.logprob).abs() < 1e-3, "position {pos}: {} vs {}", lps[0].logprob, lp.logprob);
    }
}

#[test]
fn logit_bias_bans_and_forces_tokens_and_bad_maps_are_refused() {
    let prompt = tokens(3, 9, 300);
    let mut c = core(256, 64, true);
    let mut free = Outs::new();
    add(&mut c, 1, prompt.clone(), greedy(6));
    run_to_end(&mut c, &mut free);
    let banned = free[&(1, 0)].0.clone();
    let mut p = greedy(6);
    p.logit_bias = banned.iter().collect::<std::collections::BTreeSet<_>>().into_iter().map(|&t| (t, -100.0)).collect();
    let mut out = Outs::new();
    add(&mut c, 2, prompt.clone(), p);
    run_to_end(&mut c, &mut out);
    assert!(out[&(2, 0)].0.iter().all(|t| !banned.contains(t)), "banned tokens never come: {:?} vs {:?}", out[&(2, 0)].0, banned);

    for (bias, what) in [(vec![(10_000u32, 1.0f32)], "out-of-vocab"), (vec![(5, 1.0), (5, 2.0)], "more than once"), (vec![(5, f32::NAN)], "[-100, 100]")] {
        let mut p = greedy(2);
        p.logit_bias = bias;
        let refused = c.add_request(EngineRequest::new(3, prompt.clone(), p), std::time::Instant::now()).unwrap_err();
        match refused.finish {
            Some(FinishReason::Error(e)) => assert!(e.kind == ErrorKind::InvalidRequest && e.message.contains(what), "{e:?}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}

/// vLLM's `vllm:iteration_tokens_total` counts, per step, the tokens made
/// plus each whole prompt at the step of its first token: a 20-token prompt
/// prefilled in chunks of 8 counts 0, 0, then 20 + 1, then 1 per step.
#[test]
fn step_tokens_count_as_vllms_iteration_stats() {
    let mut c = core(64, 8, false);
    add(&mut c, 1, tokens(7, 20, 300), greedy(3));
    let mut outs = Outs::new();
    run_to_end(&mut c, &mut outs);
    assert_eq!(c.take_step_tokens(), vec![0, 0, 21, 1, 1]);
    assert!(c.take_step_tokens().is_empty());
    // n = 2: each sequence counts its prompt at its first token, as vLLM's
    // child requests do.
    let mut c = core(64, 64, false);
    add(&mut c, 2, tokens(9, 10, 300), SamplingParams { n: 2, temperature: 1.0, ..greedy(2) });
    run_to_end(&mut c, &mut outs);
    assert_eq!(c.take_step_tokens(), vec![22, 2]);
}
