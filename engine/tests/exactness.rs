//! A greedy or seeded request's tokens depend only on its prompt, its
//! settings, its seed and the position in its output: never on what else is
//! in the batch, on a preemption, or on being resumed from its first tokens
//! (as a move to another rank resumes it). The counter-based draw makes the
//! seeded half hold; recompute computing each position with decode's bits
//! makes it hold after preemption and resume.

mod common;

use common::*;
use ferry_engine::quant::GgmlType;
use ferry_engine::{EngineCore, EngineCoreConfig};
use ferry_transport::*;
use std::collections::HashMap;
use std::time::Instant;

const EOG: u32 = 2;
const MAX_TOKENS: u32 = 40;

fn core(ty: GgmlType, num_blocks: usize, max_num_batched_tokens: usize) -> EngineCore {
    let sched = tiny_scheduler(num_blocks, 16, max_num_batched_tokens);
    // The engine's own seed differs from run to run of this test's cores:
    // requests without a seed must not be what the comparisons rest on.
    EngineCore::new(EngineCoreConfig { rank: 0, scheduler: sched, seed: num_blocks as u64 , spec: None }, tiny_executor(ty, 23, num_blocks), vec![EOG])
}

/// Request `i`'s settings: even ones greedy, odd ones sampled with every
/// setting a request can carry, seeded.
fn params(i: u64) -> SamplingParams {
    if i.is_multiple_of(2) {
        return SamplingParams { temperature: 0.0, max_tokens: MAX_TOKENS, ignore_eos: true, logprobs: Some(2), ..Default::default() };
    }
    SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        top_k: 50,
        min_p: 0.01,
        repetition_penalty: 1.1,
        frequency_penalty: 0.2,
        presence_penalty: 0.1,
        logit_bias: vec![(7, 1.5), (9, -2.0)],
        min_tokens: 5,
        stop_token_ids: vec![11],
        seed: Some(1000 + i),
        max_tokens: MAX_TOKENS,
        ignore_eos: true,
        logprobs: Some(2),
        ..Default::default()
    }
}

fn prompt(i: u64) -> Vec<u32> {
    tokens(500 + i, 9 + (i as usize * 5) % 17, 300)
}

/// Runs `reqs` on `core` to the end; each sequence's tokens, by (id, index).
fn run(core: &mut EngineCore, reqs: Vec<EngineRequest>) -> HashMap<(RequestId, u32), Vec<u32>> {
    for r in reqs {
        core.add_request(r, Instant::now()).expect("valid request");
    }
    let mut out: HashMap<(RequestId, u32), Vec<u32>> = HashMap::new();
    let mut steps = 0;
    while core.has_work() {
        for o in core.step(Instant::now()) {
            assert!(!matches!(o.finish, Some(FinishReason::Error(_))), "{o:?}");
            out.entry((o.id, o.index)).or_default().extend(&o.new_tokens);
        }
        steps += 1;
        assert!(steps < 20_000, "engine did not finish");
    }
    out
}

fn request(i: u64) -> EngineRequest {
    EngineRequest::new(i, prompt(i), params(i))
}

fn alone(ty: GgmlType, i: u64) -> Vec<u32> {
    run(&mut core(ty, 256, 64), vec![request(i)]).remove(&(i, 0)).expect("one sequence")
}

fn check(ty: GgmlType) {
    let n = 16u64;
    let want: Vec<Vec<u32>> = (0..n).map(|i| alone(ty, i)).collect();
    for (i, w) in want.iter().enumerate() {
        assert!(w.len() <= MAX_TOKENS as usize && !w.is_empty(), "request {i}: {w:?}");
    }
    // Sixteen at once, with room to spare.
    let batched = run(&mut core(ty, 512, 64), (0..n).map(request).collect());
    // Sixteen at once in a cache that holds about a third of them: preempted
    // and recomputed many times.
    let mut tight = core(ty, 60, 48);
    let preempted = run(&mut tight, (0..n).map(request).collect());
    assert!(tight.stats().num_preemptions >= 4, "only {} preemptions", tight.stats().num_preemptions);
    for i in 0..n {
        assert_eq!(batched[&(i, 0)], want[i as usize], "{ty:?} request {i} batched");
        assert_eq!(preempted[&(i, 0)], want[i as usize], "{ty:?} request {i} after preemption");
    }
    // Resumed from any cut: the rest is what the undisturbed run made next.
    for i in [1u64, 2, 5] {
        let w = &want[i as usize];
        for cut in [1usize, 4, 13, w.len() - 1] {
            let mut r = request(i);
            r.resume = Some(Resume { index: 0, output_tokens: w[..cut].to_vec() });
            let got = run(&mut core(ty, 256, 64), vec![r]).remove(&(i, 0)).unwrap_or_default();
            assert_eq!(got, w[cut..], "{ty:?} request {i} resumed after {cut} tokens");
        }
    }
}

#[test]
fn tokens_depend_only_on_the_request_q8_0() {
    check(GgmlType::Q8_0);
}

#[test]
fn tokens_depend_only_on_the_request_f32() {
    check(GgmlType::F32);
}

#[test]
fn each_completion_of_a_seeded_request_resumes_under_its_own_index() {
    let ty = GgmlType::Q8_0;
    let p = SamplingParams { n: 3, ..params(3) };
    let whole = run(&mut core(ty, 256, 64), vec![EngineRequest::new(3, prompt(3), p.clone())]);
    assert_ne!(whole[&(3, 1)], whole[&(3, 2)], "completions of one request differ");
    for index in 0..3u32 {
        let w = &whole[&(3, index)];
        let mut r = EngineRequest::new(3, prompt(3), p.clone());
        r.resume = Some(Resume { index, output_tokens: w[..10].to_vec() });
        let got = run(&mut core(ty, 256, 64), vec![r]);
        assert_eq!(got.keys().copied().collect::<Vec<_>>(), vec![(3, index)], "one completion, under its index");
        assert_eq!(got[&(3, index)], w[10..], "completion {index}");
    }
}

#[test]
fn a_resume_that_cannot_continue_is_refused() {
    let mut c = core(GgmlType::Q8_0, 64, 64);
    let refuse = |c: &mut EngineCore, resume: Resume, max_tokens: u32| {
        let mut r = EngineRequest::new(1, prompt(1), SamplingParams { max_tokens, ..params(1) });
        r.resume = Some(resume);
        match c.add_request(r, Instant::now()) {
            Err(out) => match out.finish {
                Some(FinishReason::Error(e)) => e.message,
                other => panic!("{other:?}"),
            },
            Ok(()) => panic!("accepted"),
        }
    };
    assert!(refuse(&mut c, Resume { index: 0, output_tokens: vec![5; 8] }, 8).contains("nothing to generate"));
    assert!(refuse(&mut c, Resume { index: 0, output_tokens: vec![300] }, 8).contains("out of vocabulary"));
    assert!(refuse(&mut c, Resume { index: MAX_N, output_tokens: vec![5] }, 8).contains("index"));
    assert!(refuse(&mut c, Resume { index: 0, output_tokens: vec![5; 250] }, 255).contains("maximum context length"), "past max_model_len");
}
