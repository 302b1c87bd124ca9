//! The library's one error type: what [`crate::Llm`], [`crate::Stream`] and
//! [`crate::Server`] return. It has a [`ErrorKind`] that an application
//! can match on, a message for people, and the cause underneath. It has no
//! HTTP status: an application that wants the OpenAI error shape serves
//! through [`crate::Server`] or [`crate::Llm::router`], which make it.
//!
//! A leaf module: the gateway's own errors convert into it where they are
//! defined (`api::errors`, `server`), so nothing here reaches back into them.

use std::fmt;

/// What went wrong, in terms an embedding application acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The model could not be found, read or loaded, or its engines could not start.
    Model,
    /// The request itself is wrong: a bad parameter, a prompt too long for the
    /// model, a template that fails. Sending it again will fail again.
    InvalidRequest,
    /// No engine rank can take the request now: not ready, draining, or full.
    /// The same request may succeed later.
    Unavailable,
    /// The server could not listen: the address, the port or the TLS files.
    Listen,
    /// An engine failed while running the request, or an invariant broke.
    Internal,
}

/// An error from ferry's library API.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    retry_after: Option<u32>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// An error of `kind` caused by `source`, said as `message`.
    pub(crate) fn caused_by(kind: ErrorKind, message: String, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error { kind, message, retry_after: None, source: Some(Box::new(source)) }
    }

    /// The same error with a hint of when to try again.
    pub(crate) fn with_retry_after(self, seconds: Option<u32>) -> Error {
        Error { retry_after: seconds, ..self }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message alone, without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Seconds to wait before trying again, when the engines said how long.
    pub fn retry_after(&self) -> Option<u32> {
        self.retry_after
    }

    /// Loading the model or starting its engines failed.
    pub(crate) fn model(err: anyhow::Error) -> Error {
        let message = format!("{err:#}");
        Error { kind: ErrorKind::Model, message, retry_after: None, source: Some(err.into()) }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_failure_keeps_its_cause_chain_in_the_message() {
        let e = Error::model(anyhow::anyhow!("no such file").context("loading model.gguf"));
        assert_eq!(e.kind(), ErrorKind::Model);
        assert_eq!(e.message(), "loading model.gguf: no such file");
        assert!(std::error::Error::source(&e).is_some());
    }
}
