//! The gateway's engine ranks: the coordinator that picks a rank for each
//! request, each rank's link as the gateway sees it, and ranks started in this
//! process.

pub mod breaker;
pub mod coordinator;
pub mod events;
pub mod local;
pub mod rank_link;
pub mod routing;
pub mod tracked;
