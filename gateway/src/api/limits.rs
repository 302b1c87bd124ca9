//! Bounds on the shape of one request, checked before any costly work (and
//! before admission), each refused with a 400 that names the limit. vLLM has
//! few of these; ferry faces clients directly, so it bounds what a single
//! request can make the gateway hold or compute. docs/limits.md lists them.

use super::errors::ApiError;
use super::types::{OpenAiMessage, StopSpec};

/// Stop strings per request.
pub(crate) const MAX_STOP_STRINGS: usize = 128;
/// Bytes of all stop strings of a request together.
pub(crate) const MAX_STOP_BYTES: usize = 16 * 1024;
/// Prompts in one completions request (each may also have `n` choices, within
/// `params::MAX_CHOICES`).
pub(crate) const MAX_PROMPTS: usize = 256;
/// Messages in one chat request.
pub(crate) const MAX_MESSAGES: usize = 4096;
/// Characters of prompt text in one request, before tokenizing (tokenizing is
/// the costly part; a token is rarely less than one character, so this is far
/// above any context a served model has).
pub(crate) const MAX_PROMPT_CHARS: usize = 1 << 20;

pub(crate) fn check_stop(stop: Option<&StopSpec>) -> Result<(), ApiError> {
    let Some(stop) = stop else { return Ok(()) };
    let (count, bytes) = match stop {
        StopSpec::One(s) => (1, s.len()),
        StopSpec::Many(v) => (v.len(), v.iter().map(String::len).sum()),
    };
    if count > MAX_STOP_STRINGS {
        return Err(ApiError::invalid_param("stop", format!("At most {MAX_STOP_STRINGS} stop strings are allowed, got {count}.")));
    }
    if bytes > MAX_STOP_BYTES {
        return Err(ApiError::invalid_param(
            "stop",
            format!("The stop strings total {bytes} bytes; at most {MAX_STOP_BYTES} are allowed."),
        ));
    }
    Ok(())
}

/// `chars` is the prompt text's length in characters, summed over a request.
pub(crate) fn check_prompt_chars(param: &str, chars: usize) -> Result<(), ApiError> {
    if chars > MAX_PROMPT_CHARS {
        return Err(ApiError::invalid_param(
            param,
            format!("The prompt is {chars} characters long; at most {MAX_PROMPT_CHARS} characters are allowed before tokenizing."),
        ));
    }
    Ok(())
}

pub(crate) fn check_prompt_count(count: usize) -> Result<(), ApiError> {
    if count > MAX_PROMPTS {
        return Err(ApiError::invalid_param("prompt", format!("At most {MAX_PROMPTS} prompts per request are allowed, got {count}.")));
    }
    Ok(())
}

/// A chat's messages: how many, and their text's length in characters.
pub(crate) fn check_messages(messages: &[OpenAiMessage]) -> Result<(), ApiError> {
    check_message_count(messages.len())?;
    check_prompt_chars("messages", messages.iter().map(|m| m.content.chars().count()).sum())
}

pub(crate) fn check_message_count(count: usize) -> Result<(), ApiError> {
    if count > MAX_MESSAGES {
        return Err(ApiError::invalid_param("messages", format!("At most {MAX_MESSAGES} messages per request are allowed, got {count}.")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_limit_is_named_in_its_refusal() {
        assert!(check_stop(Some(&StopSpec::Many(vec!["a".into(); MAX_STOP_STRINGS]))).is_ok());
        let e = check_stop(Some(&StopSpec::Many(vec!["a".into(); MAX_STOP_STRINGS + 1]))).unwrap_err();
        assert!(e.message.contains(&MAX_STOP_STRINGS.to_string()) && e.param.as_deref() == Some("stop"), "{e:?}");
        let e = check_stop(Some(&StopSpec::One("x".repeat(MAX_STOP_BYTES + 1)))).unwrap_err();
        assert!(e.message.contains(&MAX_STOP_BYTES.to_string()), "{e:?}");
        assert!(check_prompt_chars("prompt", MAX_PROMPT_CHARS).is_ok());
        assert!(check_prompt_chars("prompt", MAX_PROMPT_CHARS + 1).unwrap_err().message.contains("1048576"));
        assert!(check_prompt_count(MAX_PROMPTS + 1).is_err() && check_message_count(MAX_MESSAGES + 1).is_err());
    }
}
