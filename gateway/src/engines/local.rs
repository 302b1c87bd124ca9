//! Starts an engine rank of this process on a link end it is given: the
//! in-process flume link on an API node, a QUIC link on a headless node. The
//! engine code is the same behind either transport.

use ferry_engine::{build_engine_core, spawn_engine, EngineArgs, EngineShape, EngineThreads, LoadedModel};
use ferry_transport::{flume_link, EngineEnd, GatewayEnd};

pub(crate) struct LocalEngine {
    pub threads: EngineThreads,
    pub shape: EngineShape,
}

/// Builds rank `rank`'s engine over `model` and starts its threads on `end`.
pub(crate) fn start_engine_on(model: &LoadedModel, args: &EngineArgs, rank: u32, served_name: &str, end: EngineEnd) -> anyhow::Result<LocalEngine> {
    let (core, shape) = build_engine_core(model, args, rank).map_err(anyhow::Error::msg)?;
    let threads = spawn_engine(core, end, shape.hello(rank, served_name))?;
    Ok(LocalEngine { threads, shape })
}

/// Rank `rank` in this process behind a flume link; the gateway's end to attach.
pub(crate) fn start_local_engine(model: &LoadedModel, args: &EngineArgs, rank: u32, served_name: &str) -> anyhow::Result<(GatewayEnd, LocalEngine)> {
    let (gateway_end, engine_end) = flume_link();
    let engine = start_engine_on(model, args, rank, served_name, engine_end)?;
    Ok((gateway_end, engine))
}

/// Ranks `ranks` of this process, each behind its own flume link.
pub(crate) struct LocalRanks {
    /// Each rank's number and the gateway's end of its link, to attach.
    pub ends: Vec<(u32, GatewayEnd)>,
    pub threads: Vec<EngineThreads>,
    /// The context the ranks can hold (all are built alike); None with no ranks.
    pub max_model_len: Option<usize>,
}

/// Starts ranks `ranks` over `model`, logging each one's shape.
pub(crate) fn start_local_ranks(model: &LoadedModel, args: &EngineArgs, ranks: std::ops::Range<u32>, served_name: &str) -> anyhow::Result<LocalRanks> {
    let mut out = LocalRanks { ends: Vec::new(), threads: Vec::new(), max_model_len: None };
    for rank in ranks {
        let (end, e) = start_local_engine(model, args, rank, served_name)?;
        tracing::info!(
            "engine rank {rank} ready: {} layers, max model length {}, {} KV blocks of {} tokens",
            model.cfg.num_layers,
            e.shape.max_model_len,
            e.shape.num_blocks,
            e.shape.block_size
        );
        out.max_model_len = Some(e.shape.max_model_len);
        out.ends.push((rank, end));
        out.threads.push(e.threads);
    }
    Ok(out)
}

/// What a rank must match to join a gateway that loaded `model` (its config and,
/// when it loaded weights, its tensor table).
pub(crate) fn expectations(
    cfg: &ferry_engine::model::config::ModelConfig,
    weights: Option<&ferry_engine::model::weights::ModelWeights>,
    data_parallel_size: u32,
    elastic: bool,
) -> ferry_transport::handshake::Expectations {
    ferry_transport::handshake::Expectations {
        protocol_version: ferry_transport::PROTOCOL_VERSION,
        data_parallel_size,
        elastic,
        config_fingerprint: ferry_engine::model::fingerprint::config_hash(cfg),
        tensors_fingerprint: weights.map(ferry_engine::model::fingerprint::tensors_hash),
        // The first rank to join sets the block size every later one must share.
        block_size: None,
    }
}
