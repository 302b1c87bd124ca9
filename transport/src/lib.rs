//! ferry's transport: the messages between the gateway and an engine rank, and the
//! links that carry them.
//!
//! A link is an ordered, reliable, two-way message channel between the gateway and
//! one engine rank. The engine's end is blocking (its input and output threads own
//! one half each); the gateway's end is async (tokio tasks). Both links implement
//! the same traits and pass one conformance suite (`tests/conformance.rs`).
//!
//! Modules, one job each:
//! - `protocol`: the messages, plain data, re-exported here (one path each:
//!   `ferry_transport::EngineRequest`).
//! - [`handshake`]: Hello/Welcome checks (version, rank, duplicates, model
//!   fingerprint), one implementation for every link. Sans-IO.
//! - [`codec`]: the QUIC link's wire format, versioned postcard in
//!   length-delimited frames with a size limit. Sans-IO.
//! - [`checks`]: what a peer may say (its rank, token ids below its vocabulary,
//!   request ids the gateway sent it), checked on every message read off the
//!   wire. Sans-IO.
//! - [`flume_link()`]: the in-process link, structs moved as they are, unchecked.
//! - [`quic_link`]: the link between nodes, QUIC with mutual TLS (quinn).
//! - [`admission`]: which connection attempts the API node gives a handshake
//!   slot (per address, a reserve for cluster members, a pool for verified
//!   peers awaiting their Hello). Sans-IO.
//! - `peer`: a link's peer named for logs (address, certificate name).

pub mod admission;
pub mod checks;
pub mod codec;
pub mod handshake;
mod peer;
mod protocol;
pub mod quic_link;

use std::future::Future;
use std::pin::Pin;

pub use protocol::*;

/// Why a link could not carry a message. Once a link has failed, every later
/// call on it fails too.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TransportError {
    /// The other end went away; no more messages will come.
    #[error("transport closed")]
    Closed,
    /// The peer broke the protocol (an undecodable or oversized frame, a
    /// message its state does not allow, a number out of range); the link is
    /// closed with this reason.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Anything else, in words: the QUIC link could not bind, dial, or finish
    /// a TLS handshake, or the API node turned the peer away.
    #[error("transport error: {0}")]
    Other(String),
}

/// The future [`OutputRx::recv`] returns: boxed, so the trait stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The gateway's sending half. Sending never blocks: commands are queued.
pub trait CommandTx: Send + Sync {
    /// Queues `msg` for the rank. `Err(Closed)` once the link is gone; the
    /// message is then lost.
    fn send(&self, msg: ToEngine) -> Result<(), TransportError>;
}

/// The gateway's receiving half.
pub trait OutputRx: Send {
    /// The rank's next message, in the order it sent them. `Err` once the
    /// link closed or the rank broke the protocol; every later call fails too.
    fn recv(&mut self) -> BoxFuture<'_, Result<FromEngine, TransportError>>;
}

/// The engine's receiving half (blocking: the engine's input thread).
pub trait CommandRx: Send {
    /// Blocks until the gateway's next message. `Err` once the link is gone:
    /// the engine stops reading (and dials again over QUIC).
    fn recv(&mut self) -> Result<ToEngine, TransportError>;
}

/// The engine's sending half (blocking: the engine's output thread).
pub trait OutputTx: Send {
    /// Queues `msg` for the gateway; never waits on the gateway reading it.
    /// `Err(Closed)` once the link is gone.
    fn send(&mut self, msg: FromEngine) -> Result<(), TransportError>;
}

/// The gateway's end of a link to one engine rank.
pub struct GatewayEnd {
    /// Sends Welcome and commands to the rank.
    pub tx: Box<dyn CommandTx>,
    /// Receives the rank's Hello, then its output batches.
    pub rx: Box<dyn OutputRx>,
}

/// An engine rank's end of its link to the gateway.
pub struct EngineEnd {
    /// Receives the gateway's Welcome, then its commands (the engine's input thread).
    pub rx: Box<dyn CommandRx>,
    /// Sends Hello, then output batches (the engine's output thread).
    pub tx: Box<dyn OutputTx>,
}

mod flume_link;
pub use flume_link::flume_link;
pub use quic_link::{dial, Peer, RpcListener};
