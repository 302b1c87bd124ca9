//! The engine's shell: one engine, links attached over time, requests keyed
//! by link and id, each link's figures its own, and a closed link's requests
//! ended with their blocks freed while the prefix cache keeps what they
//! computed; every link hears which blocks the prefix cache holds.

mod common;

use common::*;
use ferry_engine::quant::GgmlType;
use ferry_engine::{Engine, EngineCore, EngineCoreConfig, LinkEnd};
use ferry_transport::*;
use std::collections::HashMap;
use std::time::Duration;

fn core() -> EngineCore {
    EngineCore::new(EngineCoreConfig { rank: 3, scheduler: tiny_scheduler(128, 16, 64), seed: 1 , spec: None }, tiny_executor(GgmlType::Q8_0, 5, 128), vec![2])
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
        node: "n".into(),
    }
}

fn welcome() -> ToEngine {
    ToEngine::Welcome(Welcome { protocol_version: PROTOCOL_VERSION, accepted: true, reason: None, rank: 3, retry: false })
}

/// A link attached to `engine`, hello read and welcome sent.
fn link(engine: &Engine, rt: &tokio::runtime::Runtime) -> (GatewayEnd, ferry_engine::LinkThreads) {
    let (gw, threads, _) = link_with_snapshot(engine, rt);
    (gw, threads)
}

/// A link attached to `engine`, hello read, welcome sent, and its first batch
/// read: the prefix cache's blocks as KV events, `Cleared` first, no outputs
/// (the link has sent nothing yet). Small caches fit one batch.
fn link_with_snapshot(engine: &Engine, rt: &tokio::runtime::Runtime) -> (GatewayEnd, ferry_engine::LinkThreads, Vec<KvEvent>) {
    let (mut gw, eng) = flume_link();
    let threads = engine.attach(eng, hello()).unwrap();
    assert_eq!(rt.block_on(gw.rx.recv()).unwrap(), FromEngine::Hello(hello()));
    gw.tx.send(welcome()).unwrap();
    let FromEngine::Outputs(first) = rt.block_on(gw.rx.recv()).unwrap() else { panic!("second hello") };
    assert!(first.outputs.is_empty(), "{first:?}");
    assert_eq!(first.kv_events.first(), Some(&KvEvent::Cleared), "a link's events start with Cleared");
    (gw, threads, first.kv_events)
}

fn add(gw: &GatewayEnd, id: RequestId, prompt: Vec<u32>, p: SamplingParams) {
    gw.tx.send(ToEngine::Command(EngineCommand::Add(Box::new(EngineRequest::new(id, prompt, p))))).unwrap();
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
    assert_eq!(threads.join(), LinkEnd::Released);
    engine.stop();
}

#[test]
fn two_links_share_one_engine_with_their_own_ids_and_the_whole_engines_figures() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let engine = Engine::start(core()).unwrap();
    let (mut a, ta) = link(&engine, &rt);
    let (mut b, tb) = link(&engine, &rt);
    let prompt = tokens(9, 20, 300);
    // Both links use id 7; each gets its own answer. Each link hears the
    // whole engine's queue (API nodes sharing a rank count each other's
    // load), and the Adds it sent itself.
    add(&a, 7, prompt.clone(), greedy(60));
    add(&b, 7, prompt.clone(), greedy(5));
    add(&b, 8, prompt.clone(), greedy(5));
    let got_b = collect(&mut b, &rt, |g, s| {
        assert!(s.num_running + s.num_waiting <= 3, "{s:?}");
        assert!(s.num_added <= 2);
        g.values().filter(|v| v.1.is_some()).count() == 2
    });
    assert_eq!(got_b[&(7, 0)].0, got_b[&(8, 0)].0, "same prompt, same greedy tokens");
    // Link a also hears of the blocks link b's requests cached, possibly
    // before its own Add was taken in.
    let got_a = collect(&mut a, &rt, |g, s| {
        assert!(s.num_added <= 1, "{s:?}");
        let done = g.get(&(7, 0)).is_some_and(|v| v.1.is_some());
        if done {
            assert_eq!(s.num_added, 1);
        }
        done
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
    assert_eq!(ta.join(), LinkEnd::Closed);
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
    assert_eq!(tb.join(), LinkEnd::Released);
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
        assert_eq!(threads.join(), LinkEnd::Closed);
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

/// Applies `events` to a multiset of block hashes, as a gateway would.
fn replay(held: &mut HashMap<u64, usize>, events: &[KvEvent]) {
    for e in events {
        match *e {
            KvEvent::Cleared => held.clear(),
            KvEvent::Stored(h) => *held.entry(h).or_default() += 1,
            KvEvent::Removed(h) => {
                let n = held.get_mut(&h).expect("removed a block never stored");
                *n -= 1;
                if *n == 0 {
                    held.remove(&h);
                }
            }
        }
    }
}

/// The chained hashes of `tokens`' full blocks, as a gateway computes them.
use ferry_engine::kv_cache::block_hashes;

/// Sends one request and reads until it finishes, replaying every batch's KV
/// events into `held`. Returns the tokens the engine computed KV for (the
/// prompt and every output but the last, which is sampled, never fed back)
/// and the prefix-cache hit.
fn run_replaying(gw: &mut GatewayEnd, rt: &tokio::runtime::Runtime, held: &mut HashMap<u64, usize>, id: RequestId, prompt: &[u32]) -> (Vec<u32>, u32) {
    add(gw, id, prompt.to_vec(), greedy(6));
    let (mut out, mut cached) = (Vec::new(), None);
    loop {
        let next = rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), gw.rx.recv()).await });
        let FromEngine::Outputs(b) = next.expect("an answer in time").expect("link open") else { panic!("second hello") };
        replay(held, &b.kv_events);
        for o in b.outputs {
            cached.get_or_insert(o.num_cached_tokens);
            out.extend(o.new_tokens);
            if o.finish.is_some() {
                assert_eq!(o.finish, Some(FinishReason::Length));
                let computed = [prompt, &out[..out.len() - 1]].concat();
                return (computed, cached.unwrap_or(0));
            }
        }
    }
}

#[test]
fn links_hear_which_blocks_the_prefix_cache_holds() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let engine = Engine::start(core()).unwrap();
    let bs = hello().block_size as usize;
    let (mut a, ta, first) = link_with_snapshot(&engine, &rt);
    assert_eq!(first, vec![KvEvent::Cleared], "an empty cache");
    let mut held = HashMap::new();
    // Two prompts sharing a 40-token (10-block) prefix, one after the other.
    let prefix = tokens(21, 40, 300);
    let p1 = [prefix.clone(), tokens(22, 7, 300)].concat();
    let p2 = [prefix, tokens(23, 9, 300)].concat();
    let (c1, hit1) = run_replaying(&mut a, &rt, &mut held, 1, &p1);
    let (c2, hit2) = run_replaying(&mut a, &rt, &mut held, 2, &p2);
    assert_eq!((hit1, hit2), (0, 40), "the second request is served the shared prefix from the cache");
    // Every full block either request computed, the shared ones once (the
    // second request reused them); 128 blocks are plenty, so none was evicted.
    let mut want: HashMap<u64, usize> = HashMap::new();
    for h in block_hashes(&c1, bs).into_iter().chain(block_hashes(&c2, bs)) {
        want.insert(h, 1);
    }
    assert_eq!(want.len(), (c1.len() / bs) + (c2.len() / bs) - 10);
    assert_eq!(held, want, "the events replay into the blocks the requests computed");
    // A link attached later starts from Cleared and a snapshot of the same set.
    let (b, tb, snapshot) = link_with_snapshot(&engine, &rt);
    let mut seen_by_b = HashMap::new();
    replay(&mut seen_by_b, &snapshot);
    assert_eq!(snapshot.len(), 1 + want.len());
    assert_eq!(seen_by_b, want);
    for (gw, threads) in [(a, ta), (b, tb)] {
        gw.tx.send(ToEngine::Command(EngineCommand::Shutdown)).unwrap();
        assert_eq!(threads.join(), LinkEnd::Released);
    }
    engine.stop();
}

#[test]
fn a_link_that_asks_for_a_rank_number_speaks_as_the_one_it_is_given() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let engine = Engine::start(core()).unwrap();
    let (mut gw, eng) = flume_link();
    let asking = Hello { rank: AUTO_RANK, ..hello() };
    let threads = engine.attach(eng, asking.clone()).unwrap();
    assert_eq!(rt.block_on(gw.rx.recv()).unwrap(), FromEngine::Hello(asking));
    // Nothing follows the Hello until the Welcome names the rank: the
    // gateway checks every batch against the link's rank.
    let early = rt.block_on(async { tokio::time::timeout(Duration::from_millis(300), gw.rx.recv()).await });
    assert!(early.is_err(), "a batch before the Welcome: {early:?}");
    assert_eq!(threads.welcomed(Duration::from_millis(10)), None);
    gw.tx.send(ToEngine::Welcome(Welcome { protocol_version: PROTOCOL_VERSION, accepted: true, reason: None, rank: 17, retry: false })).unwrap();
    let FromEngine::Outputs(first) = rt.block_on(gw.rx.recv()).unwrap() else { panic!("second hello") };
    assert_eq!(first.rank, 17, "batches name the assigned rank");
    assert_eq!(threads.welcomed(Duration::from_secs(5)), Some(17));
    gw.tx.send(ToEngine::Command(EngineCommand::Shutdown)).unwrap();
    assert_eq!(threads.join(), LinkEnd::Released);
    engine.stop();
}

#[test]
fn a_link_refused_before_its_welcome_ends_without_a_batch() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let engine = Engine::start(core()).unwrap();
    let (mut gw, eng) = flume_link();
    let threads = engine.attach(eng, Hello { rank: AUTO_RANK, ..hello() }).unwrap();
    let _hello = rt.block_on(gw.rx.recv()).unwrap();
    let no = Welcome { protocol_version: PROTOCOL_VERSION, accepted: false, reason: Some("full".into()), rank: AUTO_RANK, retry: true };
    gw.tx.send(ToEngine::Welcome(no)).unwrap();
    match threads.join() {
        LinkEnd::Refused(r) => assert!(r.retry && r.message.contains("full"), "{r:?}"),
        other => panic!("{other:?}"),
    }
    engine.stop();
}
