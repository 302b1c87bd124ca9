//! The gateway's engine ranks: the coordinator that picks a rank for each
//! request, each rank's link as the gateway sees it, and ranks started in this
//! process.

pub(crate) mod breaker;
pub(crate) mod coordinator;
pub(crate) mod events;
pub(crate) mod local;
pub(crate) mod numbering;
pub(crate) mod rank_link;
pub(crate) mod routing;
pub(crate) mod tracked;
