//! Structured outputs on the API side: OpenAI's `response_format`, vLLM's
//! `structured_outputs` object and its legacy `guided_*` fields, turned into
//! the one [`Constraint`] the engine takes, and compiled here against the
//! model's vocabulary so that a bad schema, regex or grammar is a 400 that
//! says what is wrong before anything reaches an engine.

use ferry_engine::structured::{compile, ConstraintError, GrammarEnv};
use ferry_transport::Constraint;
use serde::Deserialize;
use serde_json::Value;

use super::errors::ApiError;
use super::AppState;

/// The request fields that ask for a structured output (both endpoints).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub(crate) struct StructuredFields {
    pub response_format: Option<ResponseFormat>,
    pub structured_outputs: Option<StructuredOutputs>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
    pub guided_whitespace_pattern: Option<String>,
}

/// OpenAI's `response_format`: `text`, `json_object` or `json_schema`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub(crate) struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    pub json_schema: Option<JsonSchemaFormat>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub(crate) struct JsonSchemaFormat {
    pub name: Option<String>,
    pub description: Option<String>,
    /// OpenAI's field is `schema`; vLLM also reads `json_schema`.
    #[serde(alias = "json_schema")]
    pub schema: Option<Value>,
    /// Accepted as OpenAI's clients send it; the constraint is always strict.
    pub strict: Option<bool>,
}

/// vLLM's `structured_outputs`: exactly one of its constraint fields.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub(crate) struct StructuredOutputs {
    pub json: Option<Value>,
    pub regex: Option<String>,
    pub choice: Option<Vec<String>>,
    pub grammar: Option<String>,
    pub json_object: Option<bool>,
    pub disable_any_whitespace: Option<bool>,
    pub whitespace_pattern: Option<String>,
    pub structural_tag: Option<Value>,
}

/// One constraint asked for, with the field that asked (errors name it).
struct Asked {
    param: &'static str,
    constraint: Constraint,
}

/// A schema given as an object or as JSON text, with vLLM's whitespace options.
fn schema_text(param: &'static str, v: &Value, ws: &Whitespace) -> Result<String, ApiError> {
    let mut schema = match v {
        Value::String(s) => serde_json::from_str(s)
            .map_err(|e| ApiError::invalid_param(param, format!("The JSON schema is not valid JSON: {e}")))?,
        v => v.clone(),
    };
    if let (Some(opts), Value::Object(map)) = (ws.guidance_options(), &mut schema) {
        // llguidance reads its JSON options from the schema's `x-guidance` key.
        map.entry("x-guidance").or_insert(opts);
    }
    Ok(schema.to_string())
}

#[derive(Default)]
struct Whitespace {
    disable_any: bool,
    pattern: Option<String>,
}

impl Whitespace {
    fn guidance_options(&self) -> Option<Value> {
        match (&self.pattern, self.disable_any) {
            (Some(p), _) => Some(serde_json::json!({"whitespace_pattern": p})),
            (None, true) => Some(serde_json::json!({"whitespace_flexible": false})),
            (None, false) => None,
        }
    }
}

/// A grammar in Lark, or in GBNF (`root ::= ...`) rewritten as Lark.
fn grammar(param: &'static str, g: &str) -> Result<Constraint, ApiError> {
    if !super::gbnf::is_gbnf(g) {
        return Ok(Constraint::Lark(g.to_string()));
    }
    super::gbnf::to_lark(g)
        .map(Constraint::Lark)
        .map_err(|e| ApiError::invalid_param(param, format!("Invalid GBNF grammar: {e}")))
}

/// Every constraint the fields ask for.
fn asked(f: &StructuredFields) -> Result<Vec<Asked>, ApiError> {
    let mut out = Vec::new();
    let mut push = |param, constraint| out.push(Asked { param, constraint });
    let legacy_ws = Whitespace { disable_any: false, pattern: f.guided_whitespace_pattern.clone() };
    if let Some(rf) = &f.response_format {
        match rf.kind.as_str() {
            "text" => {}
            "json_object" => push("response_format", Constraint::JsonObject),
            "json_schema" => {
                let schema = rf.json_schema.as_ref().and_then(|j| j.schema.as_ref()).ok_or_else(|| {
                    ApiError::invalid_param("response_format", "`response_format.json_schema.schema` is required when `type` is \"json_schema\".")
                })?;
                push("response_format", Constraint::JsonSchema(schema_text("response_format", schema, &Whitespace::default())?));
            }
            other => {
                return Err(ApiError::invalid_param(
                    "response_format",
                    format!("Unsupported response_format type {other:?}: use \"text\", \"json_object\" or \"json_schema\"."),
                ))
            }
        }
    }
    if let Some(so) = &f.structured_outputs {
        let ws = Whitespace { disable_any: so.disable_any_whitespace.unwrap_or(false), pattern: so.whitespace_pattern.clone() };
        if so.structural_tag.is_some() {
            return Err(ApiError::invalid_param("structured_outputs", "`structural_tag` is not supported."));
        }
        if let Some(j) = &so.json {
            push("structured_outputs", Constraint::JsonSchema(schema_text("structured_outputs", j, &ws)?));
        }
        if let Some(r) = &so.regex {
            push("structured_outputs", Constraint::Regex(r.clone()));
        }
        if let Some(c) = &so.choice {
            push("structured_outputs", Constraint::Choice(c.clone()));
        }
        if let Some(g) = &so.grammar {
            push("structured_outputs", grammar("structured_outputs", g)?);
        }
        if so.json_object == Some(true) {
            push("structured_outputs", Constraint::JsonObject);
        }
    }
    if let Some(j) = &f.guided_json {
        push("guided_json", Constraint::JsonSchema(schema_text("guided_json", j, &legacy_ws)?));
    }
    if let Some(r) = &f.guided_regex {
        push("guided_regex", Constraint::Regex(r.clone()));
    }
    if let Some(c) = &f.guided_choice {
        push("guided_choice", Constraint::Choice(c.clone()));
    }
    if let Some(g) = &f.guided_grammar {
        push("guided_grammar", grammar("guided_grammar", g)?);
    }
    Ok(out)
}

/// The one constraint the fields ask for, if any. More than one is a 400,
/// as in vLLM.
pub(crate) fn requested(f: &StructuredFields) -> Result<Option<(&'static str, Constraint)>, ApiError> {
    let mut all = asked(f)?;
    if all.len() > 1 {
        let names: Vec<&str> = all.iter().map(|a| a.param).collect();
        return Err(ApiError::invalid_param(
            all[1].param,
            format!("You can only use one kind of structured outputs constraint but multiple are specified: {}.", names.join(", ")),
        ));
    }
    Ok(all.pop().map(|a| (a.param, a.constraint)))
}

/// Compiles `c` against the model's vocabulary (`env`, or why there is none):
/// Err is the 400 naming `param`.
pub(crate) fn check(env: Result<GrammarEnv, String>, param: &str, c: &Constraint) -> Result<(), ApiError> {
    let env = env.map_err(|e| ApiError::invalid_param(param, format!("Structured outputs are not available for this model: {e}")))?;
    compile(&env, c).map(drop).map_err(|ConstraintError(e)| ApiError::invalid_param(param, format!("Invalid structured outputs constraint: {e}")))
}

/// The checked constraint of a request, compiled off the async workers (a
/// big schema takes milliseconds; the first request also builds the
/// vocabulary's trie).
pub(crate) async fn constraint(state: &AppState, f: &StructuredFields) -> Result<Option<Constraint>, ApiError> {
    let Some((param, c)) = requested(f)? else { return Ok(None) };
    let holder = state.clone();
    state.text_work(move || check(holder.grammar_env(), param, &c).map(|()| Some(c))).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(v: Value) -> Result<Option<(&'static str, Constraint)>, ApiError> {
        requested(&serde_json::from_value::<StructuredFields>(v).unwrap())
    }

    #[test]
    fn each_form_gives_its_constraint() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "string"}}});
        let js = |v: Value| Constraint::JsonSchema(v.to_string());
        let cases = [
            (json!({}), None),
            (json!({"response_format": {"type": "text"}}), None),
            (json!({"response_format": {"type": "json_object"}}), Some(Constraint::JsonObject)),
            (json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}}}), Some(js(schema.clone()))),
            (json!({"structured_outputs": {"json": schema}}), Some(js(schema.clone()))),
            (json!({"structured_outputs": {"json": schema.to_string()}}), Some(js(schema.clone()))),
            (json!({"structured_outputs": {"regex": "a+"}}), Some(Constraint::Regex("a+".into()))),
            (json!({"structured_outputs": {"choice": ["x", "y"]}}), Some(Constraint::Choice(vec!["x".into(), "y".into()]))),
            (json!({"structured_outputs": {"grammar": "start: \"a\""}}), Some(Constraint::Lark("start: \"a\"".into()))),
            (json!({"structured_outputs": {"json_object": true}}), Some(Constraint::JsonObject)),
            (json!({"guided_json": schema}), Some(js(schema.clone()))),
            (json!({"guided_regex": "b"}), Some(Constraint::Regex("b".into()))),
            (json!({"guided_choice": ["z"]}), Some(Constraint::Choice(vec!["z".into()]))),
            (json!({"guided_grammar": "start: \"q\""}), Some(Constraint::Lark("start: \"q\"".into()))),
        ];
        for (body, want) in cases {
            assert_eq!(req(body.clone()).unwrap().map(|c| c.1), want, "{body}");
        }
        let Some((_, Constraint::JsonSchema(s))) = req(json!({"structured_outputs": {"json": {"type": "object"}, "disable_any_whitespace": true}})).unwrap() else { panic!() };
        assert_eq!(serde_json::from_str::<Value>(&s).unwrap()["x-guidance"], json!({"whitespace_flexible": false}));
    }

    #[test]
    fn conflicts_and_bad_forms_are_400s_naming_the_field() {
        let e = req(json!({"guided_regex": "a", "guided_choice": ["b"]})).err().unwrap();
        assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some("guided_choice")));
        assert!(e.message.contains("only use one kind"), "{}", e.message);
        let e = req(json!({"response_format": {"type": "json_schema"}})).err().unwrap();
        assert_eq!(e.param.as_deref(), Some("response_format"));
        let e = req(json!({"response_format": {"type": "yaml"}})).err().unwrap();
        assert!(e.message.contains("yaml"));
        let e = req(json!({"guided_json": "{oops"})).err().unwrap();
        assert_eq!(e.param.as_deref(), Some("guided_json"));
    }
}
