//! Structured outputs: a request's [`Constraint`] compiled with llguidance into
//! a per-sequence matcher that says, before each sampling step, which tokens
//! keep the output inside the constraint's language.
//!
//! llguidance (the engine vLLM, llama.cpp and mistral.rs use) does the grammar
//! work; this module only adapts it: [`GrammarEnv`] holds the token trie built
//! from the model's vocabulary and the parser factory (built once per model,
//! shared by the gateway's validation and the engine), [`compile`] turns a
//! constraint into a [`SeqGrammar`], and `SeqGrammar` computes masks, applies
//! them to logits and follows the committed tokens.

mod env;
mod seq;

pub use env::GrammarEnv;
pub use seq::{Commit, SeqGrammar};

use ferry_transport::{Constraint, MAX_CONSTRAINT_BYTES};
use llguidance::api::TopLevelGrammar;

/// Most alternatives a choice constraint may list.
pub const MAX_CHOICES: usize = 1024;

/// Why a constraint could not be compiled: says what is wrong, for a 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConstraintError(pub String);

/// The llguidance grammar for a constraint, after the size checks that make
/// it safe to compile text read off the wire.
fn top_level(c: &Constraint) -> Result<TopLevelGrammar, ConstraintError> {
    if c.text_len() > MAX_CONSTRAINT_BYTES {
        return Err(ConstraintError(format!(
            "the structured output constraint is {} bytes; at most {MAX_CONSTRAINT_BYTES} are allowed",
            c.text_len()
        )));
    }
    Ok(match c {
        Constraint::JsonSchema(text) => {
            let schema: serde_json::Value = serde_json::from_str(text)
                .map_err(|e| ConstraintError(format!("the JSON schema is not valid JSON: {e}")))?;
            if !(schema.is_object() || schema.is_boolean()) {
                return Err(ConstraintError("the JSON schema must be an object or a boolean".into()));
            }
            TopLevelGrammar::from_json_schema(bounded_whitespace(schema))
        }
        Constraint::JsonObject => TopLevelGrammar::from_json_schema(bounded_whitespace(serde_json::json!({"type": "object"}))),
        Constraint::Regex(rx) => TopLevelGrammar::from_regex(rx),
        Constraint::Choice(choices) => TopLevelGrammar::from_lark(choice_lark(choices)?),
        Constraint::Lark(g) => {
            if g.trim().is_empty() {
                return Err(ConstraintError("the grammar is empty".into()));
            }
            TopLevelGrammar::from_lark(g.clone())
        }
    })
}

/// Most whitespace characters one run between two JSON tokens may hold,
/// unless the request names its own whitespace rule (vLLM's
/// `whitespace_pattern`, `disable_any_whitespace`). Unbounded, a small model
/// can spend every token of a reply on blank lines and stop at `max_tokens`
/// with invalid JSON; xgrammar bounds the runs the same way
/// (`max_whitespace_cnt`). 24 leaves room for pretty-printed JSON nested
/// several levels deep.
pub const MAX_JSON_WHITESPACE: usize = 24;

/// `schema` with llguidance's whitespace rule bounded to
/// [`MAX_JSON_WHITESPACE`] characters a run, where it names no rule of its own
/// (llguidance reads its JSON options from the schema's `x-guidance` key).
fn bounded_whitespace(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(map) = schema.as_object_mut() {
        map.entry("x-guidance")
            .or_insert_with(|| serde_json::json!({"whitespace_pattern": format!("[\\x20\\x0A\\x0D\\x09]{{1,{MAX_JSON_WHITESPACE}}}")}));
    }
    schema
}

/// `start: "a" | "b"`: Lark string literals are JSON strings, so serde_json's
/// quoting escapes every choice exactly.
fn choice_lark(choices: &[String]) -> Result<String, ConstraintError> {
    if choices.is_empty() {
        return Err(ConstraintError("the choice list is empty".into()));
    }
    if choices.len() > MAX_CHOICES {
        return Err(ConstraintError(format!("at most {MAX_CHOICES} choices are allowed, got {}", choices.len())));
    }
    if choices.iter().any(std::string::String::is_empty) {
        return Err(ConstraintError("a choice cannot be the empty string".into()));
    }
    let alts: Vec<String> = choices.iter().map(|c| serde_json::Value::from(c.as_str()).to_string()).collect();
    Ok(format!("start: {}", alts.join(" | ")))
}

/// Compiles `c` for one sequence. Errors say what is wrong with the constraint
/// (an invalid schema, regex or grammar).
pub fn compile(env: &GrammarEnv, c: &Constraint) -> Result<SeqGrammar, ConstraintError> {
    let grammar = top_level(c)?;
    let parser = env
        .factory()
        .create_parser(grammar)
        .map_err(|e| ConstraintError(format!("invalid structured output constraint: {e}")))?;
    Ok(SeqGrammar::new(llguidance::Matcher::new(Ok(parser)), env))
}

#[cfg(test)]
mod tests;
