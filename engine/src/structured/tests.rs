//! Constraints compiled over a small byte-level vocabulary, walked token by
//! token with adversarial logits: whatever the "model" prefers, the masked
//! output belongs to the language.

use super::*;
use crate::rng::RngCore;

/// Ids 0..256 are single bytes, then a few multi-byte words, then EOS (257 + k)
/// and a second end-of-turn token, both special.
fn env() -> (GrammarEnv, u32, u32) {
    let mut words: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for w in ["{\"", "\": ", "true", "false", "null", "\"}", "yes", "no", "  ", "\n\n"] {
        words.push(w.as_bytes().to_vec());
    }
    let eos = words.len() as u32;
    words.push(b"</s>".to_vec());
    let eot = words.len() as u32;
    words.push(b"<|im_end|>".to_vec());
    let mut special = vec![false; words.len()];
    special[eos as usize] = true;
    special[eot as usize] = true;
    (GrammarEnv::from_vocab(words, &special, eos, vec![eos, eot]).unwrap(), eos, eot)
}

/// Greedy decoding over random logits (a "model" that wants anything) under
/// the constraint; returns the text and whether it ended by grammar or EOS.
fn walk(c: &Constraint, seed: u64, max: usize) -> (String, bool) {
    let (env, eos, eot) = env();
    let mut g = compile(&env, c).unwrap();
    let mut rng = crate::rng::splitmix(seed);
    let mut out = Vec::new();
    // A bigger logit array than the vocabulary: the padding must be masked too.
    let vocab = env.vocab_size() + 5;
    for _ in 0..max {
        let mut logits: Vec<f32> = (0..vocab).map(|_| (rng.next_u64() % 1000) as f32 / 100.0).collect();
        g.apply_mask(&mut logits).unwrap();
        let (tok, _) = logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &l)| if l > b.1 { (i, l) } else { b });
        assert!(tok < env.vocab_size(), "padding id {tok} was allowed");
        if tok as u32 == eos || tok as u32 == eot {
            assert!(g.is_accepting(), "EOS allowed before the output was complete: {:?}", String::from_utf8_lossy(&out));
            return (String::from_utf8(out).unwrap(), true);
        }
        out.extend_from_slice(&[tok as u8][..]);
        if tok >= 256 {
            out.pop();
            let words = ["{\"", "\": ", "true", "false", "null", "\"}", "yes", "no", "  ", "\n\n"];
            out.extend_from_slice(words[tok - 256].as_bytes());
        }
        match g.commit(tok as u32) {
            Commit::Continue => {}
            Commit::Finished => return (String::from_utf8(out).unwrap(), true),
            Commit::Rejected(e) => panic!("{e}"),
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), false)
}

#[test]
fn json_schema_outputs_parse_and_fit() {
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["ok", "n"],
        "additionalProperties": false
    });
    let c = Constraint::JsonSchema(schema.to_string());
    for seed in 0..8 {
        let (text, done) = walk(&c, seed, 400);
        assert!(done, "seed {seed}: unfinished {text:?}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(v["ok"].is_boolean(), "{text}");
        let n = v["n"].as_i64().unwrap();
        assert!((0..=99).contains(&n), "{text}");
        assert_eq!(v.as_object().unwrap().len(), 2, "{text}");
    }
}

#[test]
fn json_object_regex_choice_and_lark() {
    for seed in 0..4 {
        let (t, done) = walk(&Constraint::JsonObject, seed, 300);
        // Random logits may wander in an open object; a finished one parses.
        if done {
            assert!(serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&t).is_ok(), "{t:?}");
        }
        let (t, done) = walk(&Constraint::Regex("[a-c]{2,4}-[0-9]+".into()), seed, 50);
        assert!(!done || regex_like(&t), "{t:?}");
        let choices = vec!["yes".to_string(), "no".into(), "maybe \"so\"".into()];
        let (t, done) = walk(&Constraint::Choice(choices.clone()), seed, 50);
        assert!(done && choices.contains(&t), "{t:?}");
        let (t, done) = walk(&Constraint::Lark("start: \"a\" b+\nb: \"x\" | \"y\"".into()), seed, 50);
        assert!(!done || (t.starts_with('a') && t[1..].chars().all(|c| c == 'x' || c == 'y') && t.len() > 1), "{t:?}");
    }
}

fn regex_like(t: &str) -> bool {
    let (a, b) = t.split_once('-').unwrap_or(("", ""));
    (2..=4).contains(&a.len()) && a.chars().all(|c| ('a'..='c').contains(&c)) && !b.is_empty() && b.chars().all(|c| c.is_ascii_digit())
}

#[test]
fn eos_is_allowed_only_when_accepting_and_opens_every_eog_id() {
    let (env, eos, eot) = env();
    let mut g = compile(&env, &Constraint::Choice(vec!["yes".into()])).unwrap();
    let mut logits = vec![1.0; env.vocab_size()];
    g.apply_mask(&mut logits).unwrap();
    assert_eq!(logits[eos as usize], f32::NEG_INFINITY);
    assert_eq!(logits[eot as usize], f32::NEG_INFINITY);
    assert!(logits[b'y' as usize].is_finite() && logits[262].is_finite()); // "yes" as bytes or one word
    assert_eq!(g.commit(262), Commit::Finished);
    // A choice that may go on: "a" then EOS or "aa".
    let mut g = compile(&env, &Constraint::Choice(vec!["a".into(), "aa".into()])).unwrap();
    assert_eq!(g.commit(b'a' as u32), Commit::Continue);
    let mut logits = vec![1.0; env.vocab_size()];
    g.apply_mask(&mut logits).unwrap();
    assert!(logits[eos as usize].is_finite() && logits[eot as usize].is_finite() && logits[b'a' as usize].is_finite());
    assert_eq!(logits[b'b' as usize], f32::NEG_INFINITY);
    // EOS is not fed to the matcher: under ignore_eos the grammar stays put.
    assert_eq!(g.commit(eos), Commit::Continue);
    assert!(matches!(g.commit(b'b' as u32), Commit::Rejected(_)));
}

#[test]
fn bad_constraints_say_what_is_wrong() {
    let (env, _, _) = env();
    let err = |c: Constraint| compile(&env, &c).err().map_or_else(|| panic!("{c:?} compiled"), |e| e.0);
    assert!(err(Constraint::JsonSchema("{not json".into())).contains("not valid JSON"));
    assert!(err(Constraint::JsonSchema("[1]".into())).contains("must be an object"));
    let e = err(Constraint::JsonSchema(r#"{"type": "frobnicate"}"#.into()));
    assert!(e.contains("frobnicate"), "{e}");
    assert!(err(Constraint::Regex("a(b".into())).starts_with("invalid structured output constraint"));
    assert!(err(Constraint::Lark("start: undefined_rule".into())).contains("undefined_rule"));
    assert!(err(Constraint::Lark("  ".into())).contains("empty"));
    assert!(err(Constraint::Choice(vec![])).contains("empty"));
    assert!(err(Constraint::Choice(vec!["".into()])).contains("empty string"));
    let big = "a".repeat(ferry_transport::MAX_CONSTRAINT_BYTES + 1);
    assert!(err(Constraint::Regex(big)).contains("at most"));
}

/// A run of whitespace between JSON tokens is bounded by default
/// (MAX_JSON_WHITESPACE), so a model that loves blank lines still has to
/// write the value; a schema that names its own rule keeps it.
#[test]
fn json_whitespace_runs_are_bounded_unless_the_schema_says_otherwise() {
    let (env, _, _) = env();
    let allows_newline = |g: &mut SeqGrammar| {
        let mut logits = vec![0.0f32; env.vocab_size()];
        crate::sampler::apply_allowed(&mut logits, &g.mask_words().unwrap());
        logits[b'\n' as usize] == 0.0
    };
    let mut g = compile(&env, &Constraint::JsonSchema(r#"{"type": "object"}"#.into())).unwrap();
    assert_eq!(g.commit(b'{' as u32), Commit::Continue);
    for i in 0..MAX_JSON_WHITESPACE {
        assert!(allows_newline(&mut g), "newline {i} refused");
        assert_eq!(g.commit(b'\n' as u32), Commit::Continue);
    }
    assert!(!allows_newline(&mut g), "a run longer than {MAX_JSON_WHITESPACE} was allowed");
    // The request's own rule (vLLM's whitespace_pattern) wins.
    let own = r#"{"type": "object", "x-guidance": {"whitespace_pattern": "[\\n]*"}}"#;
    let mut g = compile(&env, &Constraint::JsonSchema(own.into())).unwrap();
    assert_eq!(g.commit(b'{' as u32), Commit::Continue);
    for _ in 0..2 * MAX_JSON_WHITESPACE {
        assert_eq!(g.commit(b'\n' as u32), Commit::Continue);
    }
    assert!(allows_newline(&mut g));
}
