//! Starts engine ranks inside this process, linked to the gateway by flume.

use ferry_engine::{build_engine_core, spawn_engine, EngineArgs, EngineShape, EngineThreads, LoadedModel};
use ferry_transport::{flume_link, GatewayEnd};

pub struct LocalEngine {
    pub end: GatewayEnd,
    pub threads: EngineThreads,
    pub shape: EngineShape,
}

/// Builds rank `rank`'s engine over `model` and starts its threads.
pub fn start_local_engine(model: &LoadedModel, args: &EngineArgs, rank: u32, served_name: &str) -> anyhow::Result<LocalEngine> {
    let (core, shape) = build_engine_core(model, args, rank).map_err(anyhow::Error::msg)?;
    let (gateway_end, engine_end) = flume_link();
    let threads = spawn_engine(core, engine_end, shape.hello(rank, served_name))?;
    Ok(LocalEngine { end: gateway_end, threads, shape })
}
