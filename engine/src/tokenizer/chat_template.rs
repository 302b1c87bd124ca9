//! Chat templates rendered as Hugging Face transformers renders them: jinja2
//! with trim_blocks and lstrip_blocks, loop controls, the variables
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, and the
//! helpers templates rely on (`raise_exception`, `tojson` as Python's
//! json.dumps, `strftime_now`, Python string and dict methods).

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Rest, Serde, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use super::TokenizerError;

/// One message of a conversation, as the template sees it: a role, its text,
/// and the message's other fields (`tool_calls` of an assistant message,
/// `tool_call_id` and `name` of a tool's answer, ...) passed to the template
/// as they came, as Hugging Face passes message dicts.
///
/// Plain data: an API's own message shapes (OpenAI's `content` forms, say)
/// are read by the server that speaks that API and converted to this.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// "system", "user", "assistant", "tool", or whatever the template knows.
    pub role: String,
    /// The message's text ("" for none, such as an assistant turn that only calls tools).
    #[serde(default)]
    pub content: String,
    /// Every other field of the message, given to the template under its own name.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ChatMessage {
    /// A message of `role` saying `content`, with no other fields.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into(), extra: serde_json::Map::new() }
    }
}

/// How to render one conversation: the arguments of Hugging Face's
/// `apply_chat_template` that requests may set.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RenderOptions {
    /// Open an assistant turn after the messages.
    pub add_generation_prompt: bool,
    /// Leave the last message open, so the model continues it (Hugging
    /// Face cuts the rendering right after that message's content).
    pub continue_final_message: bool,
    /// Tool (function) definitions, as the template's `tools` variable.
    pub tools: Option<serde_json::Value>,
    /// Extra template variables (vLLM's `chat_template_kwargs`); they never
    /// replace `messages`, `tools`, the special tokens or the flags above.
    pub kwargs: serde_json::Map<String, serde_json::Value>,
}

/// Most template instructions one render of a request's own template may
/// run (minijinja fuel): a template sent by a client cannot spin forever.
const REQUEST_TEMPLATE_FUEL: u64 = 5_000_000;

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template.
pub(super) struct ChatTemplate {
    source: String,
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// A template sent with a request (vLLM's `chat_template` field): like
    /// the model's, but every render is bounded by fuel.
    pub(super) fn untrusted(source: String, bos: String, eos: String) -> Result<Self, TokenizerError> {
        let mut t = Self::new(source, bos, eos)?;
        t.env.set_fuel(Some(REQUEST_TEMPLATE_FUEL));
        Ok(t)
    }

    pub(super) fn new(source: String, bos: String, eos: String) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        Ok(ChatTemplate { source, env, bos, eos })
    }

    pub(super) fn source(&self) -> &str {
        &self.source
    }

    pub(super) fn render(&self, messages: &[ChatMessage], opts: &RenderOptions) -> Result<String, TokenizerError> {
        if opts.continue_final_message && opts.add_generation_prompt {
            // Hugging Face's own refusal, word for word.
            return Err(TokenizerError::Template(
                "continue_final_message and add_generation_prompt are not compatible. Use continue_final_message when you \
                 want the model to continue the final message, and add_generation_prompt when you want to add a header \
                 that will prompt it to generate a new assistant message instead."
                    .into(),
            ));
        }
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        let rendered = tmpl
            .render(minijinja::context! {
                messages => Value::from(Serde(messages)),
                tools => Value::from(Serde(&opts.tools)),
                add_generation_prompt => opts.add_generation_prompt,
                bos_token => self.bos.as_str(),
                eos_token => self.eos.as_str(),
                ..Value::from(Serde(&opts.kwargs))
            })
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        if !opts.continue_final_message {
            return Ok(rendered);
        }
        cut_after_final_message(rendered, messages)
    }
}

/// Hugging Face's `continue_final_message`: the rendering up to the end of
/// the last message's content (its last occurrence; stripped when the
/// template strips messages, as Llama 3.1's does).
fn cut_after_final_message(rendered: String, messages: &[ChatMessage]) -> Result<String, TokenizerError> {
    let last = messages.last().map_or("", |m| m.content.as_str());
    for needle in [last, last.trim()] {
        if let Some(i) = rendered.rfind(needle) {
            let mut rendered = rendered;
            rendered.truncate(i + needle.len());
            return Ok(rendered);
        }
    }
    Err(TokenizerError::Template(
        "continue_final_message is set but the final message does not appear in the chat after applying the chat template! \
         This can happen if the chat template deletes portions of the final message."
            .into(),
    ))
}

/// `raise_exception(msg)`: templates use it to refuse a conversation.
fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// `value|tojson(indent=None)` as Python's `json.dumps(value,
/// ensure_ascii=False, indent=indent)`, which transformers installs: no HTML
/// escaping, ", " and ": " separators, insertion order kept.
fn tojson(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent_arg = match args.first() {
        Some(v) => Some(v.clone()),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent_arg {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_i64() {
            Some(n) if (0..=64).contains(&n) => Some(" ".repeat(n as usize)),
            _ => match v.as_str() {
                Some(s) => Some(s.to_owned()),
                None => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an integer or string")),
            },
        },
    };
    let mut out = String::new();
    write_json(&mut out, value, indent.as_deref(), 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(out: &mut String, v: &Value, indent: Option<&str>, depth: usize) -> Result<(), Error> {
    if depth > 64 {
        return Err(Error::new(ErrorKind::InvalidOperation, "tojson: value nested too deeply"));
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(ind) = indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = v.as_i64() {
                let _ = write!(out, "{i}");
            } else {
                let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                if f.is_nan() {
                    out.push_str("NaN");
                } else if f.is_infinite() {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
                } else if f.fract() == 0.0 && f.abs() < 1e16 {
                    let _ = write!(out, "{f:.1}");
                } else {
                    let _ = write!(out, "{f}");
                }
            }
        }
        ValueKind::String | ValueKind::Bytes => {
            let s = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
            out.push_str(&serde_json::to_string(&s).unwrap_or_default());
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, indent, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                let key = k.as_str().map_or_else(|| k.to_string(), str::to_owned);
                out.push_str(&serde_json::to_string(&key).unwrap_or_default());
                out.push_str(": ");
                write_json(out, &v.get_item(k)?, indent, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => {
            let s = v.to_string();
            out.push_str(&serde_json::to_string(&s).unwrap_or_default());
        }
    }
    Ok(())
}

/// `strftime_now(format)`: the current UTC time, formatted with the common
/// strftime directives (Llama 3 templates print today's date).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime(secs, &format)
}

fn strftime(secs: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
        "November", "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, mi, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => { let _ = write!(out, "{y}"); }
            Some('y') => { let _ = write!(out, "{:02}", y.rem_euclid(100)); }
            Some('m') => { let _ = write!(out, "{m:02}"); }
            Some('d') => { let _ = write!(out, "{d:02}"); }
            Some('e') => { let _ = write!(out, "{d:>2}"); }
            Some('-') => match chars.next() {
                Some('d') => { let _ = write!(out, "{d}"); }
                Some('m') => { let _ = write!(out, "{m}"); }
                Some(o) => { out.push_str("%-"); out.push(o); }
                None => out.push_str("%-"),
            },
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('H') => { let _ = write!(out, "{h:02}"); }
            Some('M') => { let _ = write!(out, "{mi:02}"); }
            Some('S') => { let _ = write!(out, "{s:02}"); }
            Some('j') => { let _ = write!(out, "{:03}", doy_from_jan(y, m, d)); }
            Some('%') => out.push('%'),
            Some(o) => { out.push('%'); out.push(o); }
            None => out.push('%'),
        }
    }
    out
}

fn doy_from_jan(y: i64, m: i64, d: i64) -> i64 {
    const CUM: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    CUM[(m - 1) as usize] + d + i64::from(leap && m > 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, msgs: &[ChatMessage], gen: bool) -> Result<String, TokenizerError> {
        ChatTemplate::new(src.into(), "<s>".into(), "</s>".into())?
            .render(msgs, &RenderOptions { add_generation_prompt: gen, ..Default::default() })
    }

    /// Expected strings worked out by hand from jinja2's documented
    /// trim_blocks / lstrip_blocks rules.
    #[test]
    fn whitespace_control_as_hf() {
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[U]{{ m.content }}\n    {% endif %}\n{% endfor %}\n";
        let out = render(src, &[ChatMessage::new("user", "x"), ChatMessage::new("bot", "y")], false).unwrap();
        // Block lines vanish entirely; the single trailing newline of the
        // template is dropped (keep_trailing_newline = False).
        assert_eq!(out, "[U]x\n");
    }

    #[test]
    fn python_methods_and_helpers() {
        let src = "{{ bos_token }}{% for m in messages %}{{ m['content'].strip().upper() }}|{{ m.content.startswith(' he') }}|{{ m.role.title() }}|{{ m.content.split('l')|length }}{% endfor %}{{ eos_token }}";
        let out = render(src, &[ChatMessage::new("user", " hello ")], false).unwrap();
        assert_eq!(out, "<s>HELLO|True|User|3</s>");

        let src = "{{ {'a': 1, 'b': [1.5, 'x\"y', none, true], 'ü': {}}|tojson }}";
        assert_eq!(render(src, &[], false).unwrap(), r#"{"a": 1, "b": [1.5, "x\"y", null, true], "ü": {}}"#);
        let src = "{{ [1, {'k': 'v'}]|tojson(indent=2) }}";
        assert_eq!(render(src, &[], false).unwrap(), "[\n  1,\n  {\n    \"k\": \"v\"\n  }\n]");
        let src = "{{ messages[0]|tojson }}";
        assert_eq!(
            render(src, &[ChatMessage::new("user", "<b>&")], false).unwrap(),
            r#"{"role": "user", "content": "<b>&"}"#
        );
        let src = "{% for k, v in {'x': 1}.items() %}{{ k }}={{ v }}{% endfor %}{{ {'y': 2}.get('y') }}{{ {'y': 2}.get('z', 'd') }}";
        assert_eq!(render(src, &[], false).unwrap(), "x=12d");
        let src = "{% for m in messages %}{% if m.role == 'x' %}{% break %}{% endif %}{{ m.role }}{% endfor %}";
        assert_eq!(
            render(src, &[ChatMessage::new("a", ""), ChatMessage::new("x", ""), ChatMessage::new("b", "")], false).unwrap(),
            "a"
        );
        let src = "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}";
        assert_eq!(render(src, &[ChatMessage::new("a", ""), ChatMessage::new("b", "")], false).unwrap(), "2");
    }

    /// Templates in the style of real ones, with the outputs Python's jinja2
    /// 3.1 gave under transformers' settings (ImmutableSandboxedEnvironment,
    /// trim_blocks, lstrip_blocks, loopcontrols, json.dumps tojson) for the
    /// messages in `JINJA_MESSAGES`.
    const JINJA_MESSAGES: &str = "[{\"role\":\"system\",\"content\":\" Be brief. \"},{\"role\":\"user\",\"content\":\"Hi \\\"there\\\" <b>é</b>\\n\"},{\"role\":\"assistant\",\"content\":\"Hello!\"},{\"role\":\"user\",\"content\":\"2+2?\"}]";
    const JINJA_CASES: &[(&str, &str, &str)] = &[
        ("llama3", "full/True", "<s><|start_header_id|>system<|end_header_id|>\n\nToday Date: X\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi \"there\" <b>é</b><|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
        ("llama3", "nosys/True", "<s><|start_header_id|>system<|end_header_id|>\n\nToday Date: X\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi \"there\" <b>é</b><|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
        ("llama3", "nosys/False", "<s><|start_header_id|>system<|end_header_id|>\n\nToday Date: X\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi \"there\" <b>é</b><|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"),
        ("qwenish", "full/True", "<|im_start|>system\n Be brief. <|im_end|>\n<|im_start|>user\nHi \"there\" <b>é</b><|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n3USER[{\"role\": \"system\", \"content\": \" Be brief. \"}, {\"role\": \"user\", \"content\": \"Hi \\\"there\\\" <b>é</b>\\n\"}, {\"role\": \"assistant\", \"content\": \"Hello!\"}, {\"role\": \"user\", \"content\": \"2+2?\"}]{\n  \"role\": \"user\",\n  \"content\": \"2+2?\"\n}<|im_start|>assistant\n"),
        ("qwenish", "nosys/True", "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nHi \"there\" <b>é</b><|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n3USER[{\"role\": \"user\", \"content\": \"Hi \\\"there\\\" <b>é</b>\\n\"}, {\"role\": \"assistant\", \"content\": \"Hello!\"}, {\"role\": \"user\", \"content\": \"2+2?\"}]{\n  \"role\": \"user\",\n  \"content\": \"2+2?\"\n}<|im_start|>assistant\n"),
        ("qwenish", "nosys/False", "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nHi \"there\" <b>é</b><|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n3USER[{\"role\": \"user\", \"content\": \"Hi \\\"there\\\" <b>é</b>\\n\"}, {\"role\": \"assistant\", \"content\": \"Hello!\"}, {\"role\": \"user\", \"content\": \"2+2?\"}]{\n  \"role\": \"user\",\n  \"content\": \"2+2?\"\n}"),
        ("tinyllama_blocks", "full/True", "        <|user|>\nHi \"there\" <b>é</b>\n</s>\n        <|assistant|>\nHello!</s>\n        <|user|>\n2+2?</s>\n        <|assistant|>\n"),
        ("tinyllama_blocks", "nosys/True", "        <|user|>\nHi \"there\" <b>é</b>\n</s>\n        <|assistant|>\nHello!</s>\n        <|user|>\n2+2?</s>\n        <|assistant|>\n"),
        ("tinyllama_blocks", "nosys/False", "        <|user|>\nHi \"there\" <b>é</b>\n</s>\n        <|assistant|>\nHello!</s>\n        <|user|>\n2+2?</s>\n"),
        ("zephyr", "full/True", "<|system|>\n Be brief. </s>\n<|user|>\nHi \"there\" <b>é</b>\n</s>\n<|assistant|>\nHello!</s>\n<|user|>\n2+2?</s>\n<|assistant|>\n"),
        ("zephyr", "nosys/True", "<|user|>\nHi \"there\" <b>é</b>\n</s>\n<|assistant|>\nHello!</s>\n<|user|>\n2+2?</s>\n<|assistant|>\n"),
        ("zephyr", "nosys/False", "<|user|>\nHi \"there\" <b>é</b>\n</s>\n<|assistant|>\nHello!</s>\n<|user|>\n2+2?</s>\n"),
        ("mistral", "full/True", "ERROR"),
        ("mistral", "nosys/True", "<s>[INST] Hi \"there\" <b>é</b>\n [/INST]Hello!</s>[INST] 2+2? [/INST]"),
        ("mistral", "nosys/False", "<s>[INST] Hi \"there\" <b>é</b>\n [/INST]Hello!</s>[INST] 2+2? [/INST]"),
    ];
    const JINJA_TEMPLATES: &[(&str, &str)] = &[
        ("llama3", "{{- bos_token }}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{{- \"Today Date: \" + strftime_now(\"%d %b %Y\")[:0] + \"X\\n\\n\" }}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n{%- for message in messages %}\n    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"),
        ("qwenish", "{%- if messages[0].role == 'system' %}\n    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n{%- else %}\n    {{- '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}\n{%- endif %}\n{%- set ns = namespace(count=0, last='') %}\n{%- for message in messages %}\n    {%- if message.role != 'system' %}\n        {%- set ns.count = ns.count + 1 %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content.strip() + '<|im_end|>' + '\\n' }}\n        {%- set ns.last = message.role.upper() %}\n    {%- endif %}\n{%- endfor %}\n{{- ns.count|string + ns.last + (messages|tojson) + (messages[-1]|tojson(indent=2)) }}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"),
        ("tinyllama_blocks", "{% for message in messages %}\n    {% if message['role'] == 'user' %}\n        {{ '<|user|>\n' + message['content'] + eos_token }}\n    {% elif message['role'] == 'assistant' %}\n        {{ '<|assistant|>\n' + message['content'] + eos_token }}\n    {% endif %}\n    {% if loop.last and add_generation_prompt %}\n        {{ '<|assistant|>' }}\n    {% endif %}\n{% endfor %}\n"),
        ("zephyr", "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"),
        ("mistral", "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"),
    ];

    #[test]
    fn renders_as_python_jinja2() {
        let all: Vec<ChatMessage> = serde_json::from_str(JINJA_MESSAGES).unwrap();
        for (name, case, want) in JINJA_CASES {
            let src = JINJA_TEMPLATES.iter().find(|t| t.0 == *name).unwrap().1;
            let (variant, gen) = case.split_once('/').unwrap();
            let msgs = if variant == "full" { &all[..] } else { &all[1..] };
            let got = match render(src, msgs, gen == "True") {
                Ok(s) => s,
                Err(_) => "ERROR".into(),
            };
            assert_eq!(got, *want, "{name} {case}");
        }
    }

    #[test]
    fn raise_exception_reaches_the_caller() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}";
        let e = render(src, &[ChatMessage::new("assistant", "x")], false).unwrap_err();
        assert!(e.to_string().contains("Conversation roles must alternate"), "{e}");
        let e = ChatTemplate::new("{% if %}".into(), String::new(), String::new()).err().unwrap();
        assert!(e.to_string().starts_with("chat template: "), "{e}");
    }

    #[test]
    fn strftime_known_dates() {
        // 2024-07-26 12:34:56 UTC was a Friday; 2000-02-29 was a Tuesday.
        assert_eq!(strftime(1_722_000_000 - 1_722_000_000 % 86_400 + 45_296, "%d %b %Y %H:%M:%S %A %j"), "26 Jul 2024 12:34:56 Friday 208");
        assert_eq!(strftime(951_782_400, "%Y-%m-%d %a %B %-d"), "2000-02-29 Tue February 29");
        assert_eq!(strftime(0, "%%%y"), "%70");
    }

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    fn opts() -> RenderOptions {
        RenderOptions::default()
    }

    #[test]
    fn continue_final_message_leaves_the_last_message_open() {
        let t = ChatTemplate::new(CHATML.into(), String::new(), String::new()).unwrap();
        let msgs = [ChatMessage::new("user", "Count"), ChatMessage::new("assistant", "1, 2,")];
        let out = t.render(&msgs, &RenderOptions { continue_final_message: true, ..opts() }).unwrap();
        assert_eq!(out, "<|im_start|>user\nCount<|im_end|>\n<|im_start|>assistant\n1, 2,");
        let e = t
            .render(&msgs, &RenderOptions { continue_final_message: true, add_generation_prompt: true, ..opts() })
            .unwrap_err();
        assert!(e.to_string().contains("not compatible"), "{e}");
        // A template that drops the message's text cannot be continued.
        let t = ChatTemplate::new("{% for m in messages %}[{{ m.role }}]{% endfor %}".into(), String::new(), String::new()).unwrap();
        let e = t.render(&msgs, &RenderOptions { continue_final_message: true, ..opts() }).unwrap_err();
        assert!(e.to_string().contains("does not appear"), "{e}");
    }

    #[test]
    fn tools_kwargs_and_message_extras_reach_the_template() {
        let src = "{% if tools %}{% for t in tools %}T:{{ t.function.name }};{% endfor %}{% endif %}\
                   {% for m in messages %}{{ m.role }}{% if m.tool_calls %}={{ m.tool_calls[0].function.name }}{% endif %}\
                   {% if m.tool_call_id %}#{{ m.tool_call_id }}{% endif %};{% endfor %}{{ enable_thinking }}";
        let t = ChatTemplate::new(src.into(), String::new(), String::new()).unwrap();
        let msgs: Vec<ChatMessage> = serde_json::from_value(serde_json::json!([
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"}
        ]))
        .unwrap();
        let mut kwargs = serde_json::Map::new();
        kwargs.insert("enable_thinking".into(), false.into());
        // kwargs never replace the fixed variables.
        kwargs.insert("messages".into(), serde_json::json!([]));
        let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather"}}]);
        let out = t.render(&msgs, &RenderOptions { tools: Some(tools), kwargs, ..opts() }).unwrap();
        assert_eq!(out, "T:get_weather;user;assistant=f;tool#c1;False"); // Python prints False
    }

    #[test]
    fn a_request_template_cannot_run_forever() {
        let src = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
        let t = ChatTemplate::untrusted(src.into(), String::new(), String::new()).unwrap();
        let e = t.render(&[ChatMessage::new("user", "x")], &opts()).unwrap_err();
        assert!(e.to_string().to_lowercase().contains("fuel"), "{e}");
    }
}
