//! What a request's channel carries, from the coordinator to the API layer.

use ferry_transport::{RequestId, TokenOutput};
use tokio::sync::mpsc;

/// One event of a request, under the request's own id wherever it runs.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum SeqEvent {
    Output(TokenOutput),
    /// The request could not go on (its rank went away or failed it, and it
    /// could not be moved).
    Failed { id: RequestId, message: String },
    /// Completions `indices` now run on rank `rank` (they moved): their
    /// later tokens are that rank's, in the per-rank metrics. Sent before any
    /// output from the new rank.
    Moved { id: RequestId, indices: Vec<u32>, rank: usize },
}

pub(crate) type EventTx = mpsc::UnboundedSender<SeqEvent>;
pub(crate) type EventRx = mpsc::UnboundedReceiver<SeqEvent>;
