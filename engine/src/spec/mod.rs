//! Speculative decoding: proposing several tokens for a sequence and checking
//! them all in one pass over the weights.
//!
//! Decode reads every weight once per token, so a single stream is bound by
//! memory bandwidth; a pass that feeds the last token and K proposed ones
//! reads the weights once and gives the model's pick at every one of the K + 1
//! positions. The engine samples each position exactly as a decode step would
//! (the same float order per position, the same counter-based draw at the
//! same output index), and keeps the picks up to and including the first
//! that differs from its proposal: so greedy and seeded outputs are the same
//! tokens with and without speculation, only sooner.
//!
//! This module is sans-IO and knows no model: [`config`] is vLLM's
//! `--speculative-config`, [`ngram`] proposes from the sequence's own tokens,
//! [`suffix`] from them and from earlier outputs,
//! [`backoff`] decides per sequence how much to propose from how often its
//! proposals were taken and what a verify pass costs ([`cost`], learned from
//! the engine's own steps), and [`SpecStats`] counts what vLLM's metrics report.

pub mod backoff;
pub mod config;
pub mod cost;
pub mod ngram;
pub mod suffix;

pub use backoff::SpecBackoff;
pub use config::{SpecMethod, SpeculativeConfig};
pub use cost::StepTimes;
pub use suffix::{SuffixCache, SuffixParams};
pub use ferry_transport::SpecDecodeStats as SpecStats;
