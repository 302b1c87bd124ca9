//! Structured outputs in EngineCore on a tiny random model: whatever the model
//! prefers, every completion is in the constraint's language, ends with
//! `stop` once the grammar is complete, and preemption (which recomputes a
//! sequence's tokens) leaves the grammar's state and the outputs unchanged.

mod common;

use common::*;
use ferry_engine::quant::GgmlType;
use ferry_engine::spec::SpeculativeConfig;
use ferry_engine::structured::GrammarEnv;
use ferry_engine::{EngineCore, EngineCoreConfig};
use ferry_transport::*;
use std::collections::HashMap;

const EOG: u32 = 2;
const VOCAB: usize = 300;

/// Ids below 256 are bytes (EOG, id 2, is a special token instead); the rest
/// are two-byte words, so tokens and bytes do not line up one to one.
fn words() -> Vec<Vec<u8>> {
    let mut w: Vec<Vec<u8>> = (0..256u32).map(|b| vec![b as u8]).collect();
    w[EOG as usize] = b"<|end|>".to_vec();
    let pairs = [&b"{\""[..], b"\":", b"tr", b"ue", b"fa", b"ls", b"\"}", b", ", b"xy", b"  "];
    for i in 256..VOCAB {
        w.push(pairs[i % pairs.len()].to_vec());
    }
    w
}

fn text(ids: &[u32]) -> String {
    let w = words();
    String::from_utf8(ids.iter().filter(|&&t| t != EOG).flat_map(|&t| w[t as usize].clone()).collect()).unwrap()
}

fn core(num_blocks: usize, grammars: bool) -> EngineCore {
    core_with(num_blocks, grammars, None)
}

fn core_with(num_blocks: usize, grammars: bool, spec: Option<SpeculativeConfig>) -> EngineCore {
    let exec = tiny_executor(GgmlType::Q8_0, 11, num_blocks);
    let core = EngineCore::new(EngineCoreConfig { rank: 0, scheduler: tiny_scheduler(num_blocks, 8, 64), seed: 1, spec }, exec, vec![EOG]);
    if !grammars {
        return core;
    }
    let mut special = vec![false; VOCAB];
    special[EOG as usize] = true;
    core.with_grammars(GrammarEnv::from_vocab(words(), &special, EOG, vec![EOG]).unwrap())
}

type Outs = HashMap<(RequestId, u32), (Vec<u32>, Option<FinishReason>)>;

fn run_to_end(core: &mut EngineCore) -> Outs {
    let mut outs = Outs::new();
    let mut steps = 0;
    while core.has_work() {
        for o in core.step(std::time::Instant::now()) {
            let e = outs.entry((o.id, o.index)).or_default();
            e.0.extend(&o.new_tokens);
            if o.finish.is_some() {
                e.1 = o.finish;
            }
        }
        steps += 1;
        assert!(steps < 10_000, "engine did not finish");
    }
    outs
}

fn schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {"a": {"type": "boolean"}, "b": {"enum": ["x", "yy"]}},
        "required": ["a", "b"],
        "additionalProperties": false,
        // Compact JSON: a random model would otherwise wander in whitespace
        // until the tight cache cuts it off.
        "x-guidance": {"whitespace_flexible": false}
    })
}

fn constrained(c: Constraint, temperature: f32, n: u32, seed: u64) -> SamplingParams {
    SamplingParams { temperature, n, seed: Some(seed), max_tokens: 200, constraint: Some(c), ..Default::default() }
}

#[test]
fn every_completion_fits_its_schema_and_stops_even_under_preemption() {
    let mut roomy = core(256, true);
    let mut tight = core(12, true); // 48 slots: six sequences growing past 20 tokens must preempt
    for c in [&mut roomy, &mut tight] {
        for r in 0..2u64 {
            let p = constrained(Constraint::JsonSchema(schema().to_string()), 1.0, 3, 7 + r);
            c.add_request(EngineRequest::new(r, tokens(r, 12, VOCAB), p), std::time::Instant::now()).unwrap();
        }
    }
    let (a, b) = (run_to_end(&mut roomy), run_to_end(&mut tight));
    assert!(tight.stats().num_preemptions > 0, "the tight cache should have forced preemption");
    assert_eq!(a.len(), 6);
    for (key, (toks, finish)) in &a {
        let t = text(toks);
        let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_else(|e| panic!("{key:?} {t:?}: {e}"));
        assert!(v["a"].is_boolean() && (v["b"] == "x" || v["b"] == "yy"), "{t}");
        assert_eq!(v.as_object().unwrap().len(), 2);
        assert_eq!(finish, &Some(FinishReason::Stop), "{t}");
        assert_eq!(&b[key], &(toks.clone(), finish.clone()), "preemption changed {key:?}");
    }
    assert_eq!(tight.num_free_blocks(), tight.num_blocks());
}

#[test]
fn greedy_regex_and_choice_hold() {
    let mut c = core(256, true);
    let choices = vec!["tr".to_string(), "false".into(), "xy{".into()];
    let reqs = [
        (0, constrained(Constraint::Regex("[a-f]{3}[0-9]{2}".into()), 0.0, 1, 1)),
        (1, constrained(Constraint::Choice(choices.clone()), 0.0, 1, 1)),
        (2, constrained(Constraint::Choice(choices.clone()), 1.0, 4, 3)),
        (3, constrained(Constraint::Lark("start: \"ab\" (\"c\" | \"dd\")".into()), 0.0, 1, 1)),
    ];
    for (id, p) in reqs {
        c.add_request(EngineRequest::new(id, tokens(id, 9, VOCAB), p), std::time::Instant::now()).unwrap();
    }
    let outs = run_to_end(&mut c);
    let r = text(&outs[&(0, 0)].0);
    assert!(r.len() == 5 && r[..3].chars().all(|x| ('a'..='f').contains(&x)) && r[3..].chars().all(|x| x.is_ascii_digit()), "{r:?}");
    for i in 0..4 {
        let t = text(&outs[&(if i == 0 { 1 } else { 2 }, i)].0);
        assert!(choices.contains(&t), "{t:?}");
    }
    assert!(["abc", "abdd"].contains(&text(&outs[&(3, 0)].0).as_str()));
    assert!(outs.values().all(|(_, f)| f == &Some(FinishReason::Stop)));
}

#[test]
fn bad_constraints_and_engines_without_a_vocabulary_refuse_the_request() {
    let mut c = core(64, true);
    let p = constrained(Constraint::JsonSchema("{\"type\": 5}".into()), 0.0, 1, 1);
    let refusal = c.add_request(EngineRequest::new(1, vec![5, 6], p.clone()), std::time::Instant::now()).unwrap_err();
    match refusal.finish {
        Some(FinishReason::Error(e)) => assert_eq!(e.kind, ErrorKind::InvalidRequest, "{e}"),
        other => panic!("{other:?}"),
    }
    let mut bare = core(64, false);
    let p = constrained(Constraint::JsonObject, 0.0, 1, 1);
    let refusal = bare.add_request(EngineRequest::new(1, vec![5, 6], p), std::time::Instant::now()).unwrap_err();
    assert!(matches!(refusal.finish, Some(FinishReason::Error(e)) if e.message.contains("structured outputs")));
    assert_eq!(c.num_requests() + bare.num_requests(), 0);
}

#[test]
fn speculation_proposes_within_the_grammar_and_changes_no_output() {
    // Prompts that already hold answers of the schema's shape, so the n-gram
    // proposer finds runs to propose; the grammar trims them and the masks
    // follow them, and the outputs stay what they were without speculation.
    let spec = SpeculativeConfig::parse(r#"{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 1, "prompt_lookup_max": 3}"#).unwrap();
    let bytes = |t: &str| t.bytes().map(u32::from).collect::<Vec<u32>>();
    let mut outs = Vec::new();
    let mut drafts = 0;
    for spec in [None, Some(spec)] {
        let mut c = core_with(256, true, spec);
        for r in 0..4u64 {
            let mut prompt = tokens(r, 5, VOCAB);
            for answer in [r#"{"a":true,"b":"yy"}"#, r#"{"a":false,"b":"x"}"#] {
                prompt.extend(bytes(answer));
            }
            let p = constrained(Constraint::JsonSchema(schema().to_string()), if r % 2 == 0 { 0.0 } else { 0.9 }, 1 + (r % 2) as u32, 3 + r);
            c.add_request(EngineRequest::new(r, prompt, p), std::time::Instant::now()).unwrap();
        }
        outs.push(run_to_end(&mut c));
        drafts = c.stats().spec.num_drafts;
    }
    assert!(drafts > 0, "nothing was proposed");
    assert_eq!(outs[0], outs[1]);
    for (toks, finish) in outs[1].values() {
        let v: serde_json::Value = serde_json::from_str(&text(toks)).unwrap();
        assert!(v["a"].is_boolean(), "{v}");
        assert_eq!(finish, &Some(FinishReason::Stop));
    }
}
