//! The engine's shell: one engine, links attached over time, requests keyed
//! by link and id, each link's figures its own, and a closed link's requests
//! ended with their blocks freed while the prefix cache keeps what they
//! computed.

mod common;

use common::*;
use ferry_engine::quant::GgmlType;
use ferry_engine::{Engine, EngineCore, EngineCoreConfig};
use ferry_transport::*;
use std::collections::HashMap;
use std::time::Duration;

fn core() -> EngineCore {
    EngineCore::new(EngineCoreConfig { rank: 3, scheduler: tiny_scheduler(128, 16, 64), seed: 1 }, tiny_executor(GgmlType::Q8_0, 5, 128), vec![2])
}

fn hello() -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        rank: 3,
        model: "tiny".into(),
        fingerprint: Default::default(),
        vocab_size: 300,
        max_model_len: 256,
        num_kv_blocks: 128,
        block_size: 4,
    }
}

fn welcome() -> ToEngine {
    ToEngine::Welcome(Welcome { protocol_version: PROTOCOL_VERSION, accepted: true, reason: None, rank: 3 })
}

/// A link attached to `engine`, hello read and welcome sent.
fn link(engine: &Engine, rt: &tokio::runtime::Runtime) -> (GatewayEnd, ferry_engine::LinkThreads) {
    let (mut gw, eng) = flume_link();
    let threads = engine.attach(eng, hello()).unwrap();
    assert_eq!(rt.block_on(gw.rx.recv()).unwrap(), FromEngine::Hello(hello()));
    gw.tx.send(welcome()).unwrap();
    (gw, threads)
}

fn add(gw: &GatewayEnd, id: RequestId, prompt: Vec<u32>, p: SamplingParams) {
    gw.tx.send(ToEngine::Command(EngineCommand::Add(EngineRequest::new(id, prompt, p)))).unwrap();
}

/// Reads batches until `done` says so; every output by (id, index).
fn collect(
    gw: &mut GatewayEnd,
    rt: &tokio::runtime::Runtime,
    mut done: impl FnMut(&HashMap<(RequestId, u32), (Vec<u32>, Option<FinishReason>)>, &EngineStats) -> bool,
) -> HashMap<(RequestId, u32), (Vec<u32>, Option<FinishReason>)> {
    let mut got: HashMap<(RequestId, u32), (Vec<u32>, Option<FinishReason>)> = HashMap::new();
    loop {
        let next = rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), gw.rx.recv()).await });
        let FromEngine::Outputs(b) = next.expect("an answer in time").expect("link open") else { panic!("second hello") };
        assert_eq!(b.rank, 3);
        for o in b.outputs {
            let e = got.entry((o.id, o.index)).or_default();
            e.0.extend(o.new_tokens);
            if o.finish.is_some() {
                e.1 = o.finish;
            }
        }
        if done(&got, &b.stats) {
            return got;
        }
    }
}

fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams { temperature: 0.0, max_tokens, ignore_eos: true, ..Default::default() }
}

#[test]
fn completions_that_end_in_one_step_all_reach_their_link() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let engine = Engine::start(core()).unwrap();
    let (mut gw, threads) = link(&engine, &rt);
    let p = SamplingParams { n: 3, temperature: 0.8, seed: Some(1), max_tokens: 2, prompt_logprobs: Some(1), ..Default::default() };
    add(&gw, 1, vec![5, 6, 7, 8], p);
    let got = collect(&mut gw, &rt, |g, _| g.values().filter(|v| v.1.is_some()).count() == 3);
    for index in 0..3 {
        assert_eq!(got[&(1, index)].0.len(), 2, "completion {index}");
        assert_eq!(got[&(1, index)].1, Some(FinishReason::Length));
    }
    gw.tx.send(ToEngine::Command(EngineCommand::Shutdown)).unwrap();
    assert_eq!(threads.join(), None);
    engine.stop();
}

#[test]
fn two_links_share_one_engine_with_their_own_ids_and_figures() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let engine = Engine::start(core()).unwrap();
    let (mut a, ta) = link(&engine, &rt);
    let (mut b, tb) = link(&engine, &rt);
    let prompt = tokens(9, 20, 300);
    // Both links use id 7; each gets its own answer, and each link's figures
    // count its own requests only.
    add(&a, 7, prompt.clone(), greedy(60));
    add(&b, 7, prompt.clone(), greedy(5));
    add(&b, 8, prompt.clone(), greedy(5));
    let got_b = collect(&mut b, &rt, |g, s| {
        assert!(s.num_running + s.num_waiting <= 2, "link b sees only its own: {s:?}");
        assert!(s.num_added <= 2);
        g.values().filter(|v| v.1.is_some()).count() == 2
    });
    assert_eq!(got_b[&(7, 0)].0, got_b[&(8, 0)].0, "same prompt, same greedy tokens");
    let got_a = collect(&mut a, &rt, |g, s| {
        assert!(s.num_added == 1, "{s:?}");
        g.get(&(7, 0)).is_some_and(|v| v.1.is_some())
    });
    assert_eq!(got_a[&(7, 0)].0[..5], got_b[&(7, 0)].0[..], "link a's request 7 is its own, 60 tokens long");
    assert_eq!(got_a[&(7, 0)].0.len(), 60);
    // A duplicate id on one link is refused, on that link only.
    add(&a, 9, prompt.clone(), greedy(200));
    add(&a, 9, prompt.clone(), greedy(1));
    let dup = collect(&mut a, &rt, |g, _| g.get(&(9, 0)).is_some_and(|v| matches!(v.1, Some(FinishReason::Error(_)))));
    assert!(matches!(&dup[&(9, 0)].1, Some(FinishReason::Error(e)) if e.message.contains("already running")));
    // Link a closes with request 9 in flight: it is aborted, link b serves on.
    drop(a);
    assert_eq!(ta.join(), None);
    add(&b, 10, prompt, greedy(3));
    let last = collect(&mut b, &rt, |g, s| {
        let done = g.get(&(10, 0)).is_some_and(|v| v.1.is_some());
        if done {
            assert_eq!(s.num_running, 0);
        }
        done
    });
    assert_eq!(last[&(10, 0)].0.len(), 3);
    let handle = engine.handle();
    assert!(wait(|| handle.in_flight() == 0), "the closed link's request was aborted");
    b.tx.send(ToEngine::Command(EngineCommand::Shutdown)).unwrap();
    assert_eq!(tb.join(), None);
    engine.stop();
}

#[test]
fn a_new_link_finds_the_prefix_cache_of_an_old_one() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let engine = Engine::start(core()).unwrap();
    let prompt = tokens(11, 33, 300);
    // One link at a time sends the prompt, reads how much of it was cached, and closes.
    let served = || {
        let (mut gw, threads) = link(&engine, &rt);
        add(&gw, 1, prompt.clone(), greedy(2));
        let n = first_cached(&mut gw, &rt);
        drop(gw);
        assert_eq!(threads.join(), None);
        n
    };
    assert_eq!(served(), 0);
    let second = served();
    assert!(second >= 28, "a later link's request is served from the cache: {second} of 33 tokens");
    engine.stop();
}

/// The prefix-cache hit the request's first output reports.
fn first_cached(gw: &mut GatewayEnd, rt: &tokio::runtime::Runtime) -> u32 {
    loop {
        let FromEngine::Outputs(b) = rt.block_on(gw.rx.recv()).unwrap() else { panic!() };
        if let Some(o) = b.outputs.iter().find(|o| !o.new_tokens.is_empty()) {
            return o.num_cached_tokens;
        }
    }
}

fn wait(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}
