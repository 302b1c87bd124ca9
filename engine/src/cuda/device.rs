//! The CUDA backend's device side: one rank's weights, KV cache, buffers,
//! kernels, cuBLAS GEMMs, CUDA graphs and NCCL all-reduces, and the Llama
//! forward pass over them.
//!
//! STATUS: compiles (`--features cuda`) against cudarc 0.19's API; has never
//! run. Written to be checked by `scripts/gpu/gpu-check.sh` (the transformers
//! comparison and the benchmarks); nothing here is known to work until then.
//!
//! Layout: every matrix is bf16, row-major [out, in] (as the model files hold
//! it), multiplied with cublasGemmEx (bf16 in, f32 compute; bf16 out, f32 for
//! the logits). Activations are bf16 [tokens, width]. The KV cache is one
//! buffer per layer for keys and one for values,
//! `[block][kv_head][offset][head_dim]` (kernels/rope_kv.cu's layout). All work runs on one stream per
//! rank; cudarc's event tracking is off, so nothing but that stream orders it,
//! and CUDA graphs capture it whole.

use super::budget::{self, ActivationShape, DeviceMemory};
use super::convert;
use super::pack::{self, Answers, Packed, RowParams};
use super::tp::RankShare;
use crate::backend::{RowSampling, StepOutput};
use crate::batch::{LogitRows, ModelInput};
use crate::model::config::{ModelConfig, RopeStyle};
use crate::model::weights::ModelWeights;
use cudarc::cublas::{self, CudaBlas};
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use cudarc::nccl;
use ferry_transport::MAX_LOGPROBS;
use std::sync::Arc;

// SAFETY: plain old data (ints and floats); all-zero is a valid value.
unsafe impl DeviceRepr for RowParams {}
// SAFETY: every field is an integer or a float, for which all-zero bits are 0.
unsafe impl ValidAsZeroBits for RowParams {}

/// A device error as one line.
pub type DevResult<T> = Result<T, String>;

fn drv(what: &str) -> impl Fn(cudarc::driver::DriverError) -> String + '_ {
    move |e| {
        let name = e.error_name().map_or_else(|_| format!("{:?}", e.0), |n| n.to_string_lossy().into_owned());
        format!("{what}: {name}")
    }
}

fn blas(what: &str) -> impl Fn(cublas::result::CublasError) -> String + '_ {
    move |e| format!("{what}: cuBLAS {e:?}")
}

/// The device address of a buffer (event tracking is off, so no guard is needed).
fn addr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

/// The compiled kernels of `ferry-kernels`.
pub struct Kernels {
    embed: CudaFunction,
    rmsnorm: CudaFunction,
    rope: CudaFunction,
    silu: CudaFunction,
    decode: CudaFunction,
    reduce: CudaFunction,
    prefill: CudaFunction,
    sample: CudaFunction,
}

/// NVRTC's version, (major, minor).
pub fn nvrtc_version() -> DevResult<(i32, i32)> {
    let (mut ma, mut mi) = (0, 0);
    // SAFETY: writes two ints; the library's presence was checked by the caller.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut ma, &mut mi) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcVersion: {r:?}"));
    }
    Ok((ma, mi))
}

impl Kernels {
    /// Compiles (or reads from the on-disk cache) every kernel for `arch` and
    /// loads them into `ctx`. Returns how many came from the cache.
    pub fn load(ctx: &Arc<CudaContext>, arch: &'static str) -> DevResult<(Kernels, usize)> {
        if !ferry_kernels::nvrtc::available() {
            return Err("libnvrtc was not found (install the CUDA toolkit's NVRTC, or the PyPI wheel nvidia-cuda-nvrtc, and put its lib folder on LD_LIBRARY_PATH)".into());
        }
        let version = nvrtc_version()?;
        let dir = super::nvrtc_cache::cache_dir();
        let options: Vec<String> = vec!["--std=c++17".into(), "-default-device".into()];
        let mut from_cache = 0;
        let mut functions = std::collections::HashMap::new();
        for k in ferry_kernels::KERNELS {
            let src = k.full_source();
            let (ptx, origin) = super::nvrtc_cache::compile_cached(&dir, k.file, &src, arch, version, &options, || {
                ferry_kernels::nvrtc::compile(k, arch)
            })?;
            from_cache += (origin == super::nvrtc_cache::Origin::Cache) as usize;
            let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).map_err(drv(k.file))?;
            for e in k.entry_points {
                functions.insert(*e, module.load_function(e).map_err(drv(e))?);
            }
        }
        let mut take = |n: &str| functions.remove(n).ok_or_else(|| format!("kernel {n} missing"));
        Ok((
            Kernels {
                embed: take("embedding_gather_bf16")?,
                rmsnorm: take("fused_add_rmsnorm_bf16")?,
                rope: take("rope_write_kv_bf16")?,
                silu: take("silu_and_mul_bf16")?,
                decode: take("paged_attention_decode_bf16")?,
                reduce: take("paged_attention_reduce_bf16")?,
                prefill: take("paged_attention_prefill_bf16")?,
                sample: take("sample_rows")?,
            },
            from_cache,
        ))
    }
}

/// A bf16 matrix on the device, [rows, cols] row-major.
struct DevMatrix {
    buf: CudaSlice<u16>,
    rows: usize,
    cols: usize,
}

struct DevLayer {
    attn_norm: CudaSlice<u16>,
    wq: DevMatrix,
    wk: DevMatrix,
    wv: DevMatrix,
    wo: DevMatrix,
    ffn_norm: CudaSlice<u16>,
    /// Gate rows, then up rows: one GEMM gives silu_and_mul's input.
    w_gate_up: DevMatrix,
    w_down: DevMatrix,
}

/// One rank's weights on its GPU.
pub struct DevWeights {
    embed: CudaSlice<u16>,
    layers: Vec<DevLayer>,
    norm: CudaSlice<u16>,
    lm_head: DevMatrix,
    inv_freq: CudaSlice<f32>,
    /// Bytes of bf16 weights uploaded (for the start-up log; the budget
    /// measures the device's free memory instead).
    pub bytes: usize,
}

/// Rows `rows` and columns `cols` of a row-major host matrix of width `width`.
fn sub_matrix(m: &[u16], width: usize, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>) -> Vec<u16> {
    let mut out = Vec::with_capacity(rows.len() * cols.len());
    for r in rows {
        out.extend_from_slice(&m[r * width + cols.start..r * width + cols.end]);
    }
    out
}

/// What the CUDA backend refuses, before anything is put on a GPU.
pub fn check_model(cfg: &ModelConfig, weights: &ModelWeights) -> Result<(), String> {
    if cfg.qkv_bias {
        return Err(format!("the CUDA backend does not run models with q/k/v biases ({}) yet; use --device cpu", cfg.arch));
    }
    if cfg.head_dim > 256 || !cfg.head_dim.is_multiple_of(2) {
        return Err(format!("head_dim {} is not supported by the CUDA kernels (even, at most 256)", cfg.head_dim));
    }
    if !cfg.num_heads.is_multiple_of(cfg.num_kv_heads) {
        return Err(format!("{} heads are not a multiple of {} KV heads", cfg.num_heads, cfg.num_kv_heads));
    }
    let check = |m: &crate::quant::QMatrix| {
        if convert::supported(m.ty()) {
            Ok(())
        } else {
            Err(format!("weights of type {} are not supported by the CUDA backend", m.ty().name()))
        }
    };
    check(&weights.embed)?;
    check(&weights.lm_head)?;
    for l in &weights.layers {
        for m in [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down] {
            check(m)?;
        }
    }
    Ok(())
}

impl DevWeights {
    /// Converts this rank's share of `w` to bf16 and copies it to the device.
    pub fn upload(stream: &Arc<CudaStream>, cfg: &ModelConfig, w: &ModelWeights, share: &RankShare) -> DevResult<DevWeights> {
        let mut bytes = 0usize;
        let mut put = |v: Vec<u16>| -> DevResult<CudaSlice<u16>> {
            bytes += v.len() * 2;
            stream.clone_htod(&v).map_err(drv("copying weights to the GPU"))
        };
        let h = cfg.hidden_size;
        let mut layers = Vec::with_capacity(w.layers.len());
        for l in &w.layers {
            let rows = |m: &crate::quant::QMatrix, r: std::ops::Range<usize>| {
                let full = convert::matrix_to_bf16(m);
                sub_matrix(&full, m.cols(), r, 0..m.cols())
            };
            let (qr, kvr, ir) = (share.q_rows(), share.kv_rows(), share.intermediate.clone());
            let wq = DevMatrix { rows: qr.len(), cols: h, buf: put(rows(&l.wq, qr.clone()))? };
            let wk = DevMatrix { rows: kvr.len(), cols: h, buf: put(rows(&l.wk, kvr.clone()))? };
            let wv = DevMatrix { rows: kvr.len(), cols: h, buf: put(rows(&l.wv, kvr.clone()))? };
            let wo_full = convert::matrix_to_bf16(&l.wo);
            let wo = DevMatrix { rows: h, cols: qr.len(), buf: put(sub_matrix(&wo_full, l.wo.cols(), 0..h, share.o_cols()))? };
            let mut gu = rows(&l.w_gate, ir.clone());
            gu.extend(rows(&l.w_up, ir.clone()));
            let w_gate_up = DevMatrix { rows: 2 * ir.len(), cols: h, buf: put(gu)? };
            let down_full = convert::matrix_to_bf16(&l.w_down);
            let w_down = DevMatrix { rows: h, cols: ir.len(), buf: put(sub_matrix(&down_full, l.w_down.cols(), 0..h, ir))? };
            layers.push(DevLayer {
                attn_norm: put(convert::vec_to_bf16(&l.attn_norm))?,
                wq,
                wk,
                wv,
                wo,
                ffn_norm: put(convert::vec_to_bf16(&l.ffn_norm))?,
                w_gate_up,
                w_down,
            });
        }
        let embed = put(convert::matrix_to_bf16(&w.embed))?;
        let lm_head = DevMatrix { rows: w.lm_head.rows(), cols: h, buf: put(convert::matrix_to_bf16(&w.lm_head))? };
        let norm = put(convert::vec_to_bf16(&w.norm))?;
        let half = cfg.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                let f = (cfg.rope_theta as f64).powf(-2.0 * i as f64 / cfg.head_dim as f64);
                let div = cfg.rope_freq_factors.as_ref().map_or(1.0, |v| v[i] as f64);
                (f / div) as f32
            })
            .collect();
        let inv_freq = stream.clone_htod(&inv_freq).map_err(drv("copying RoPE frequencies"))?;
        Ok(DevWeights { embed, layers, norm, lm_head, inv_freq, bytes })
    }
}

/// Limits the buffers are sized for.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Tokens one step may take (max_num_batched_tokens).
    pub max_tokens: usize,
    /// Sequences one step may take (max_num_seqs).
    pub max_seqs: usize,
    /// Positions a sequence may reach: sizes the block tables and attention's
    /// partitions.
    pub max_model_len: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks per layer in this rank's cache, as the budget decided.
    pub num_blocks: usize,
}

impl Limits {
    fn max_blocks_per_seq(&self) -> usize {
        self.max_model_len.div_ceil(self.block_size)
    }
    fn max_parts(&self) -> usize {
        self.max_model_len.div_ceil(budget::PARTITION).max(1)
    }
}

/// Per-step inputs, device side (fixed addresses: graphs read them).
struct StepBufs {
    tokens: CudaSlice<u32>,
    positions: CudaSlice<i32>,
    slots: CudaSlice<i64>,
    block_tables: CudaSlice<i32>,
    context_lens: CudaSlice<i32>,
    token_seq: CudaSlice<i32>,
    token_pos: CudaSlice<i32>,
    logit_rows: CudaSlice<u32>,
    sample_rows: CudaSlice<u32>,
}

/// Activations and scratch, sized for the largest step.
struct ActBufs {
    residual: CudaSlice<u16>,
    normed: CudaSlice<u16>,
    q: CudaSlice<u16>,
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
    attn: CudaSlice<u16>,
    proj: CudaSlice<u16>,
    gate_up: CudaSlice<u16>,
    act: CudaSlice<u16>,
    part_out: CudaSlice<f32>,
    part_max: CudaSlice<f32>,
    part_sum: CudaSlice<f32>,
    picked: CudaSlice<u16>,
    logits: CudaSlice<f32>,
    sample_logits: CudaSlice<f32>,
    raw: CudaSlice<f32>,
    workspace: CudaSlice<u8>,
}

/// The sampling kernel's inputs and outputs (grown when a step needs more).
struct SampleBufs {
    params: CudaSlice<RowParams>,
    pen_tokens: CudaSlice<u32>,
    pen_counts: CudaSlice<u32>,
    pen_in_prompt: CudaSlice<u8>,
    bias_tokens: CudaSlice<u32>,
    bias_values: CudaSlice<f32>,
    ban_tokens: CudaSlice<u32>,
    mask_words: CudaSlice<u32>,
    out_tokens: CudaSlice<u32>,
    out_logprob: CudaSlice<f32>,
    out_rank: CudaSlice<i32>,
    out_top_ids: CudaSlice<u32>,
    out_top_logprobs: CudaSlice<f32>,
}

/// An NCCL communicator of one rank (cudarc's `nccl::result` calls directly,
/// so bf16 needs no `half` types here).
pub struct NcclComm {
    comm: nccl::sys::ncclComm_t,
    /// This rank in the communicator (the tensor-parallel rank).
    pub rank: usize,
    /// Ranks in the communicator.
    pub world: usize,
}

// SAFETY: an NCCL communicator may be used from any one thread at a time;
// each rank's is owned and used by its worker alone (Sync only because the
// `Communicator` trait asks for it; nothing shares one between threads).
unsafe impl Send for NcclComm {}
// SAFETY: as for Send: no two threads use one communicator at once.
unsafe impl Sync for NcclComm {}

impl NcclComm {
    /// Joins rank `rank` of `world` (blocks until every rank has called it).
    pub fn init(rank: usize, world: usize, id: [std::ffi::c_char; 128]) -> DevResult<NcclComm> {
        let mut comm = std::ptr::null_mut();
        // SAFETY: `comm` receives the handle; the id came from rank 0's ncclGetUniqueId.
        unsafe { nccl::result::comm_init_rank(&mut comm, world as i32, nccl::sys::ncclUniqueId { internal: id }, rank as i32) }
            .map_err(|e| format!("ncclCommInitRank (rank {rank} of {world}): {e:?}"))?;
        Ok(NcclComm { comm, rank, world })
    }

    /// rank 0's unique id.
    pub fn unique_id() -> DevResult<[std::ffi::c_char; 128]> {
        // SAFETY: only tries to dlopen the library by its known names.
        if !unsafe { nccl::sys::is_culib_present() } {
            return Err("--tensor-parallel-size > 1 needs NCCL (libnccl.so.2), which was not found".into());
        }
        nccl::result::get_uniqueid().map(|id| id.internal).map_err(|e| format!("ncclGetUniqueId: {e:?}"))
    }

    /// Sums `len` bf16 values at `ptr` over the ranks, in place, on `stream`.
    fn all_reduce_bf16(&self, ptr: u64, len: usize, stream: &CudaStream) -> DevResult<()> {
        // SAFETY: ptr holds len bf16 values on this rank's device, ordered on `stream`.
        unsafe {
            nccl::result::all_reduce(
                ptr as *const _,
                ptr as *mut _,
                len,
                nccl::sys::ncclDataType_t::ncclBfloat16,
                nccl::sys::ncclRedOp_t::ncclSum,
                self.comm,
                stream.cu_stream() as _,
            )
        }
        .map(|_| ())
        .map_err(|e| format!("ncclAllReduce: {e:?}"))
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: the handle came from ncclCommInitRank and is dropped once.
        let _ = unsafe { nccl::result::comm_destroy(self.comm) };
    }
}

/// `Communicator` over bf16 device rows: what NCCL all-reduces.
pub struct DeviceRows {
    /// Device address of the first value, on this rank's GPU.
    pub ptr: u64,
    /// bf16 values at `ptr`, summed in place.
    pub len: usize,
    /// The stream the reduction is ordered on (the rank's one stream).
    pub stream: Arc<CudaStream>,
}

impl crate::communicator::Communicator<DeviceRows> for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, buf: &mut DeviceRows) {
        if let Err(e) = self.all_reduce_bf16(buf.ptr, buf.len, &buf.stream) {
            panic!("{e}");
        }
    }
    /// Never called: the CUDA backend keeps the LM head whole on every rank,
    /// so its forward pass only all-reduces (the CPU backend's split LM head
    /// is what gathers).
    fn all_gather(&self, _local: &DeviceRows, _out: &mut DeviceRows) {
        unreachable!("the CUDA backend keeps the LM head whole on every rank and never gathers device rows")
    }
}

/// A captured decode step (graphs are used only by the thread that owns the worker).
struct Graph(CudaGraph);
// SAFETY: a graph is launched only by the worker that captured it, one thread at a time.
unsafe impl Send for Graph {}

/// One rank: everything it needs to run steps.
pub struct DeviceWorker {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    w: DevWeights,
    cfg: ModelConfig,
    share: RankShare,
    comm: Option<NcclComm>,
    lim: Limits,
    k_cache: Vec<CudaSlice<u16>>,
    v_cache: Vec<CudaSlice<u16>>,
    step: StepBufs,
    act: ActBufs,
    samp: SampleBufs,
    graph_sizes: Vec<usize>,
    graphs: Vec<(usize, Graph)>,
}

/// How a step's attention runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Attn {
    /// One token per sequence: flash-decoding over `parts` partitions and `max_blocks` table columns.
    Decode { parts: usize, max_blocks: usize },
    /// Any chunks: the causal prefill kernel over `max_blocks` table columns.
    Prefill { max_blocks: usize },
}

/// A planned step: the host-side arrays, and how it runs.
struct Plan {
    tokens: Vec<u32>,
    positions: Vec<i32>,
    slots: Vec<i64>,
    block_tables: Vec<i32>,
    context_lens: Vec<i32>,
    token_seq: Vec<i32>,
    token_pos: Vec<i32>,
    /// Token rows whose logits are computed, in batch order.
    logit_rows: Vec<u32>,
    /// Positions in `logit_rows` of each sampling chunk's row (its last).
    sample_rows: Vec<u32>,
    /// Whether some chunk wants all its rows back (`LogitRows::All`).
    any_all: bool,
    /// Ranges of `logit_rows` that are `All` chunks' rows.
    all_ranges: Vec<std::ops::Range<usize>>,
    attn: Attn,
    /// Rows the step runs as (a graph's size, or the token count).
    padded: usize,
    /// The captured size it replays, if any.
    graph: Option<usize>,
}

impl DeviceWorker {
    /// Rank `share.rank`'s worker: allocates its KV cache (`lim.num_blocks`
    /// blocks per layer), step, activation and sampling buffers, sets cuBLAS's
    /// fixed workspace, and captures a decode graph for each of `graph_sizes`
    /// (none under `--enforce-eager`). With NCCL, every rank must call this
    /// at once: the graphs' warm-up runs all-reduce.
    #[allow(clippy::too_many_arguments, reason = "the worker takes ownership of each of these once, at start-up; its one caller builds them separately")]
    pub fn new(
        ctx: Arc<CudaContext>,
        stream: Arc<CudaStream>,
        k: Kernels,
        w: DevWeights,
        cfg: ModelConfig,
        share: RankShare,
        comm: Option<NcclComm>,
        lim: Limits,
        graph_sizes: Vec<usize>,
    ) -> DevResult<DeviceWorker> {
        ctx.bind_to_thread().map_err(drv("binding the CUDA context"))?;
        let z = |what: &'static str| drv(what);
        let kvh = share.num_kv_heads();
        let per_layer = lim.num_blocks * kvh * lim.block_size * cfg.head_dim;
        let mut k_cache = Vec::new();
        let mut v_cache = Vec::new();
        for _ in 0..cfg.num_layers {
            k_cache.push(stream.alloc_zeros::<u16>(per_layer).map_err(z("allocating the KV cache"))?);
            v_cache.push(stream.alloc_zeros::<u16>(per_layer).map_err(z("allocating the KV cache"))?);
        }
        let t = lim.max_tokens.max(lim.max_seqs).max(graph_sizes.last().copied().unwrap_or(1));
        let s = lim.max_seqs.max(graph_sizes.last().copied().unwrap_or(1));
        let mb = lim.max_blocks_per_seq();
        let step = StepBufs {
            tokens: stream.alloc_zeros(t).map_err(z("step buffers"))?,
            positions: stream.alloc_zeros(t).map_err(z("step buffers"))?,
            slots: stream.alloc_zeros(t).map_err(z("step buffers"))?,
            block_tables: stream.alloc_zeros(s * mb).map_err(z("step buffers"))?,
            context_lens: stream.alloc_zeros(s).map_err(z("step buffers"))?,
            token_seq: stream.alloc_zeros(t).map_err(z("step buffers"))?,
            token_pos: stream.alloc_zeros(t).map_err(z("step buffers"))?,
            logit_rows: stream.alloc_zeros(t).map_err(z("step buffers"))?,
            sample_rows: stream.alloc_zeros(s).map_err(z("step buffers"))?,
        };
        let (h, q, kv, inter, vocab) = (cfg.hidden_size, share.q_rows().len(), share.kv_rows().len(), share.intermediate.len(), cfg.vocab_size);
        let heads = share.num_heads();
        let parts = lim.max_parts();
        let a = |n: usize| stream.alloc_zeros::<u16>(n.max(1)).map_err(z("activation buffers"));
        let f = |n: usize| stream.alloc_zeros::<f32>(n.max(1)).map_err(z("activation buffers"));
        let act = ActBufs {
            residual: a(t * h)?,
            normed: a(t * h)?,
            q: a(t * q)?,
            k: a(t * kv)?,
            v: a(t * kv)?,
            attn: a(t * q)?,
            proj: a(t * h)?,
            gate_up: a(t * 2 * inter)?,
            act: a(t * inter)?,
            part_out: f(s * heads * parts * cfg.head_dim)?,
            part_max: f(s * heads * parts)?,
            part_sum: f(s * heads * parts)?,
            picked: a(t * h)?,
            logits: f(t * vocab)?,
            sample_logits: f(s * vocab)?,
            raw: f(s * vocab)?,
            workspace: stream.alloc_zeros::<u8>(budget::CUBLAS_WORKSPACE).map_err(z("cuBLAS workspace"))?,
        };
        let samp = SampleBufs {
            params: stream.alloc_zeros(s).map_err(z("sampling buffers"))?,
            pen_tokens: stream.alloc_zeros(1024).map_err(z("sampling buffers"))?,
            pen_counts: stream.alloc_zeros(1024).map_err(z("sampling buffers"))?,
            pen_in_prompt: stream.alloc_zeros(1024).map_err(z("sampling buffers"))?,
            bias_tokens: stream.alloc_zeros(256).map_err(z("sampling buffers"))?,
            bias_values: stream.alloc_zeros(256).map_err(z("sampling buffers"))?,
            ban_tokens: stream.alloc_zeros(256).map_err(z("sampling buffers"))?,
            mask_words: stream.alloc_zeros(vocab.div_ceil(32)).map_err(z("sampling buffers"))?,
            out_tokens: stream.alloc_zeros(s).map_err(z("sampling buffers"))?,
            out_logprob: stream.alloc_zeros(s).map_err(z("sampling buffers"))?,
            out_rank: stream.alloc_zeros(s).map_err(z("sampling buffers"))?,
            out_top_ids: stream.alloc_zeros(s * MAX_LOGPROBS as usize).map_err(z("sampling buffers"))?,
            out_top_logprobs: stream.alloc_zeros(s * MAX_LOGPROBS as usize).map_err(z("sampling buffers"))?,
        };
        let blas = CudaBlas::new(stream.clone()).map_err(blas("cublasCreate"))?;
        // A fixed workspace, so graph capture never allocates.
        // SAFETY: the workspace outlives the handle (both live in this worker).
        unsafe {
            let ws = addr(&act.workspace, &stream);
            let st = cublas::sys::cublasSetWorkspace_v2(*blas.handle(), ws as *mut _, budget::CUBLAS_WORKSPACE);
            if st != cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(format!("cublasSetWorkspace: {st:?}"));
            }
        }
        let mut me = DeviceWorker {
            ctx,
            stream,
            blas,
            k,
            w,
            cfg,
            share,
            comm,
            lim,
            k_cache,
            v_cache,
            step,
            act,
            samp,
            graph_sizes: graph_sizes.clone(),
            graphs: Vec::new(),
        };
        me.capture_graphs(&graph_sizes)?;
        Ok(me)
    }

    /// The model's vocabulary: the width of every logit row.
    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    /// Lays out one step. Decode steps that fit a captured size run padded to it.
    /// `samples[s]`: chunk `s` has a sampling row (its last logit row is sampled).
    fn plan(&self, input: &ModelInput, samples: &[bool]) -> DevResult<Plan> {
        let bs = self.lim.block_size;
        let n = input.tokens.len();
        if n > self.lim.max_tokens.max(self.lim.max_seqs) {
            return Err(format!("a step of {n} tokens is larger than the buffers ({})", self.lim.max_tokens));
        }
        let decode = input.seqs.iter().all(|c| c.len == 1) && input.seqs.len() == n && n > 0;
        let mut p = Plan {
            tokens: input.tokens.clone(),
            positions: Vec::with_capacity(n),
            slots: Vec::with_capacity(n),
            block_tables: Vec::new(),
            context_lens: Vec::new(),
            token_seq: Vec::with_capacity(n),
            token_pos: Vec::with_capacity(n),
            logit_rows: Vec::new(),
            sample_rows: Vec::new(),
            any_all: false,
            all_ranges: Vec::new(),
            attn: Attn::Prefill { max_blocks: 1 },
            padded: n,
            graph: None,
        };
        let mut max_blocks = 1;
        let mut max_ctx = 1;
        for c in &input.seqs {
            let end = c.start_pos + c.len;
            if end > self.lim.max_model_len {
                return Err(format!("position {end} is past --max-model-len {}", self.lim.max_model_len));
            }
            max_blocks = max_blocks.max(end.div_ceil(bs));
            max_ctx = max_ctx.max(end);
        }
        for (s, c) in input.seqs.iter().enumerate() {
            let first = p.positions.len();
            for i in 0..c.len {
                let pos = c.start_pos + i;
                let block = *c.block_table.get(pos / bs).ok_or("a block table is shorter than its sequence")? as usize;
                if block >= self.lim.num_blocks {
                    return Err(format!("block {block} is outside the KV cache ({} blocks)", self.lim.num_blocks));
                }
                p.positions.push(pos as i32);
                p.slots.push((block * bs + pos % bs) as i64);
                p.token_seq.push(s as i32);
                p.token_pos.push(pos as i32);
            }
            match c.logits {
                LogitRows::None => {}
                LogitRows::Last => {
                    if samples.get(s).copied().unwrap_or(false) {
                        p.sample_rows.push(p.logit_rows.len() as u32);
                    }
                    p.logit_rows.push((first + c.len - 1) as u32);
                }
                LogitRows::All => {
                    let at = p.logit_rows.len();
                    p.logit_rows.extend((first..first + c.len).map(|t| t as u32));
                    p.all_ranges.push(at..p.logit_rows.len());
                    if samples.get(s).copied().unwrap_or(false) {
                        p.sample_rows.push((p.logit_rows.len() - 1) as u32);
                    }
                    p.any_all = true;
                }
                LogitRows::Verify(_) => {
                    return Err("the CUDA backend has no speculative verify passes yet".into());
                }
            }
        }
        let graph = super::graphs::graph_bucket(input, &self.graph_sizes).filter(|b| self.graphs.iter().any(|(g, _)| g == b));
        p.graph = graph;
        let (mb, parts) = match graph {
            Some(b) => {
                p.padded = b;
                (self.lim.max_blocks_per_seq(), self.lim.max_parts())
            }
            None => (max_blocks, max_ctx.div_ceil(budget::PARTITION).max(1)),
        };
        let rows = if decode { p.padded } else { input.seqs.len() };
        p.block_tables = vec![0; rows * mb];
        p.context_lens = vec![1; rows];
        for (s, c) in input.seqs.iter().enumerate() {
            for (i, &b) in c.block_table.iter().take(mb).enumerate() {
                p.block_tables[s * mb + i] = b as i32;
            }
            p.context_lens[s] = (c.start_pos + c.len) as i32;
        }
        // Padding rows: token 0 at position 0, written nowhere (slot -1).
        for _ in n..p.padded {
            p.tokens.push(0);
            p.positions.push(0);
            p.slots.push(-1);
            p.token_seq.push(0);
            p.token_pos.push(0);
            p.logit_rows.push(p.logit_rows.len() as u32);
        }
        p.attn = if decode { Attn::Decode { parts, max_blocks: mb } } else { Attn::Prefill { max_blocks: mb } };
        Ok(p)
    }

    fn upload_plan(&mut self, p: &Plan) -> DevResult<()> {
        let st = &self.stream;
        let e = drv("copying the step's inputs");
        st.memcpy_htod(&p.tokens, &mut self.step.tokens.slice_mut(0..p.tokens.len())).map_err(&e)?;
        st.memcpy_htod(&p.positions, &mut self.step.positions.slice_mut(0..p.positions.len())).map_err(&e)?;
        st.memcpy_htod(&p.slots, &mut self.step.slots.slice_mut(0..p.slots.len())).map_err(&e)?;
        st.memcpy_htod(&p.block_tables, &mut self.step.block_tables.slice_mut(0..p.block_tables.len())).map_err(&e)?;
        st.memcpy_htod(&p.context_lens, &mut self.step.context_lens.slice_mut(0..p.context_lens.len())).map_err(&e)?;
        st.memcpy_htod(&p.token_seq, &mut self.step.token_seq.slice_mut(0..p.token_seq.len())).map_err(&e)?;
        st.memcpy_htod(&p.token_pos, &mut self.step.token_pos.slice_mut(0..p.token_pos.len())).map_err(&e)?;
        if !p.logit_rows.is_empty() {
            st.memcpy_htod(&p.logit_rows, &mut self.step.logit_rows.slice_mut(0..p.logit_rows.len())).map_err(&e)?;
        }
        if !p.sample_rows.is_empty() {
            st.memcpy_htod(&p.sample_rows, &mut self.step.sample_rows.slice_mut(0..p.sample_rows.len())).map_err(&e)?;
        }
        Ok(())
    }

    /// Y[t, out] = X[t, in] · W[out, in]ᵀ for `t` rows; bf16 in, f32 compute,
    /// `y_f32` picks an f32 output (the logits) over bf16.
    fn gemm(&self, x: u64, w: &DevMatrix, y: u64, t: usize, y_f32: bool) -> DevResult<()> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        use cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
        let c_type = if y_f32 { cudaDataType_t::CUDA_R_32F } else { cudaDataType_t::CUDA_R_16BF };
        // SAFETY: x holds t × w.cols bf16, y room for t × w.rows; both on this stream's device.
        unsafe {
            cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                w.rows as i32,
                t as i32,
                w.cols as i32,
                &alpha as *const f32 as *const _,
                addr(&w.buf, &self.stream) as *const _,
                cudaDataType_t::CUDA_R_16BF,
                w.cols as i32,
                x as *const _,
                cudaDataType_t::CUDA_R_16BF,
                w.cols as i32,
                &beta as *const f32 as *const _,
                y as *mut _,
                c_type,
                w.rows as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(blas("cublasGemmEx"))
    }

    /// `embedding_gather_bf16` on this stream: `out[i, :] = table[ids[i], :]`
    /// for `n` ids, rows of `width` bf16 (f32 rows move as pairs); ids at or
    /// past `table_rows` give zeros. The token embedding, the logit rows and
    /// the sampling rows are all this one gather.
    fn gather(&self, table: u64, ids: u64, out: u64, width: i32, table_rows: i32, n: usize) -> DevResult<()> {
        // SAFETY: the arguments match the kernel's signature in
        // kernels/embedding.cu; the callers size `out` for n rows of `width`.
        unsafe {
            self.stream
                .launch_builder(&self.k.embed)
                .arg(&table)
                .arg(&ids)
                .arg(&out)
                .arg(&width)
                .arg(&table_rows)
                .launch(cfg1(n as u32, 256))
                .map_err(drv("embedding_gather_bf16"))
                .map(|_| ())
        }
    }

    fn all_reduce(&self, ptr: u64, len: usize) -> DevResult<()> {
        match &self.comm {
            Some(c) if c.world > 1 => c.all_reduce_bf16(ptr, len, &self.stream),
            _ => Ok(()),
        }
    }

    /// The forward pass over `t` rows of the uploaded step, up to the f32
    /// logits of the plan's `r` logit rows (in `act.logits`). Only device work
    /// on `self.stream`, so it can be captured into a graph.
    fn forward(&self, t: usize, r: usize, attn: Attn) -> DevResult<()> {
        let st = &self.stream;
        let cfg = &self.cfg;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (heads, kvh) = (self.share.num_heads() as i32, self.share.num_kv_heads() as i32);
        let inter = self.share.intermediate.len();
        let a = &self.act;
        let p = |s: &CudaSlice<u16>| addr(s, st);
        let (residual, normed, q, k, v, attn_o, proj, gu, actv) =
            (p(&a.residual), p(&a.normed), p(&a.q), p(&a.k), p(&a.v), p(&a.attn), p(&a.proj), p(&a.gate_up), p(&a.act));
        let l = drv("kernel launch");
        let (hi, vocab, ti) = (h as i32, cfg.vocab_size as i32, t as i32);
        let tokens = addr(&self.step.tokens, st);
        let embed = p(&self.w.embed);
        // SAFETY (every launch below): the arguments match the kernel's
        // signature in kernels/*.cu, and every buffer is sized by `Limits`.
        self.gather(embed, tokens, residual, hi, vocab, t)?;
        let eps = cfg.rms_norm_eps;
        let null = 0u64;
        let norm = |res: u64, add: u64, wt: u64, out: u64, rows: usize| -> DevResult<()> {
            // SAFETY: fused_add_rmsnorm_bf16's signature (kernels/rmsnorm.cu);
            // `rows` rows of `hidden` in each buffer, `add` null or such a buffer.
            unsafe {
                st.launch_builder(&self.k.rmsnorm)
                    .arg(&res)
                    .arg(&add)
                    .arg(&wt)
                    .arg(&out)
                    .arg(&hi)
                    .arg(&eps)
                    .launch(cfg1(rows as u32, 256))
                    .map_err(&l)
                    .map(|_| ())
            }
        };
        let (positions, slots, inv_freq) = (addr(&self.step.positions, st), addr(&self.step.slots, st), addr(&self.w.inv_freq, st));
        let neox = (cfg.rope_style == RopeStyle::Neox) as i32;
        let (hdi, bsi) = (hd as i32, self.lim.block_size as i32);
        let scale = 1.0f32 / (hd as f32).sqrt();
        for (li, layer) in self.w.layers.iter().enumerate() {
            let add = if li == 0 { null } else { proj };
            norm(residual, add, p(&layer.attn_norm), normed, t)?;
            self.gemm(normed, &layer.wq, q, t, false)?;
            self.gemm(normed, &layer.wk, k, t, false)?;
            self.gemm(normed, &layer.wv, v, t, false)?;
            let (kc, vc) = (p(&self.k_cache[li]), p(&self.v_cache[li]));
            // SAFETY: rope_write_kv_bf16's signature (kernels/rope_kv.cu); q, k,
            // v hold `t` rows, and every slot is -1 or inside this layer's cache.
            unsafe {
                st.launch_builder(&self.k.rope)
                    .arg(&q)
                    .arg(&k)
                    .arg(&v)
                    .arg(&kc)
                    .arg(&vc)
                    .arg(&positions)
                    .arg(&slots)
                    .arg(&inv_freq)
                    .arg(&heads)
                    .arg(&kvh)
                    .arg(&hdi)
                    .arg(&bsi)
                    .arg(&neox)
                    .launch(cfg1(t as u32, 128))
                    .map_err(&l)?;
            }
            let bt = addr(&self.step.block_tables, st);
            match attn {
                Attn::Decode { parts, max_blocks } => {
                    let (po, pm, ps) = (addr(&a.part_out, st), addr(&a.part_max, st), addr(&a.part_sum, st));
                    let (cl, mbi, parts_i) = (addr(&self.step.context_lens, st), max_blocks as i32, parts as i32);
                    let grid = LaunchConfig { grid_dim: (heads as u32, t as u32, parts as u32), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
                    // SAFETY: the signatures of paged_attention_decode_bf16 and
                    // _reduce_bf16 (kernels/paged_attention.cu); the partition
                    // buffers hold max_seqs x heads x max_parts, and `parts`
                    // and `max_blocks` are at most the `Limits` they come from.
                    unsafe {
                        st.launch_builder(&self.k.decode)
                            .arg(&po)
                            .arg(&pm)
                            .arg(&ps)
                            .arg(&q)
                            .arg(&kc)
                            .arg(&vc)
                            .arg(&bt)
                            .arg(&cl)
                            .arg(&mbi)
                            .arg(&heads)
                            .arg(&kvh)
                            .arg(&hdi)
                            .arg(&bsi)
                            .arg(&scale)
                            .launch(grid)
                            .map_err(&l)?;
                        let grid = LaunchConfig { grid_dim: (heads as u32, t as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
                        st.launch_builder(&self.k.reduce)
                            .arg(&attn_o)
                            .arg(&po)
                            .arg(&pm)
                            .arg(&ps)
                            .arg(&heads)
                            .arg(&hdi)
                            .arg(&parts_i)
                            .launch(grid)
                            .map_err(&l)?;
                    }
                }
                Attn::Prefill { max_blocks } => {
                    let (ts, tp, mbi) = (addr(&self.step.token_seq, st), addr(&self.step.token_pos, st), max_blocks as i32);
                    let grid = LaunchConfig { grid_dim: (t as u32, heads as u32, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
                    // SAFETY: paged_attention_prefill_bf16's signature
                    // (kernels/paged_attention.cu); `t` rows of q and out, and
                    // the block tables `max_blocks` wide, as the plan uploaded them.
                    unsafe {
                        st.launch_builder(&self.k.prefill)
                            .arg(&attn_o)
                            .arg(&q)
                            .arg(&kc)
                            .arg(&vc)
                            .arg(&bt)
                            .arg(&ts)
                            .arg(&tp)
                            .arg(&mbi)
                            .arg(&heads)
                            .arg(&kvh)
                            .arg(&hdi)
                            .arg(&bsi)
                            .arg(&scale)
                            .launch(grid)
                            .map_err(&l)?;
                    }
                }
            }
            self.gemm(attn_o, &layer.wo, proj, t, false)?;
            self.all_reduce(proj, t * h)?;
            norm(residual, proj, p(&layer.ffn_norm), normed, t)?;
            self.gemm(normed, &layer.w_gate_up, gu, t, false)?;
            let inter_i = inter as i32;
            let grid = LaunchConfig { grid_dim: ((inter as u32).div_ceil(256), t as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: silu_and_mul_bf16's signature (kernels/silu_mul.cu);
            // gate_up holds `t` rows of 2 x inter, act `t` rows of inter.
            unsafe {
                st.launch_builder(&self.k.silu).arg(&gu).arg(&actv).arg(&inter_i).launch(grid).map_err(&l)?;
            }
            self.gemm(actv, &layer.w_down, proj, t, false)?;
            self.all_reduce(proj, t * h)?;
        }
        norm(residual, proj, p(&self.w.norm), normed, t)?;
        // The logit rows, gathered (embedding_gather over the normed rows), then the LM head.
        let (rows_ptr, picked) = (addr(&self.step.logit_rows, st), p(&a.picked));
        self.gather(normed, rows_ptr, picked, hi, ti, r)?;
        self.gemm(picked, &self.w.lm_head, addr(&a.logits, st), r, true)
    }

    /// Captures a decode graph for each size (after one eager warm-up run of
    /// each, so cuBLAS has chosen its kernels and every module is loaded).
    fn capture_graphs(&mut self, sizes: &[usize]) -> DevResult<()> {
        let mut graphs = Vec::new();
        for &b in sizes {
            let attn = Attn::Decode { parts: self.lim.max_parts(), max_blocks: self.lim.max_blocks_per_seq() };
            // Inputs: padding rows everywhere (slot -1: nothing is written to the cache).
            let plan = Plan {
                tokens: vec![0; b],
                positions: vec![0; b],
                slots: vec![-1; b],
                block_tables: vec![0; b * self.lim.max_blocks_per_seq()],
                context_lens: vec![1; b],
                token_seq: vec![0; b],
                token_pos: vec![0; b],
                logit_rows: (0..b as u32).collect(),
                sample_rows: Vec::new(),
                any_all: false,
                all_ranges: Vec::new(),
                attn,
                padded: b,
                graph: None,
            };
            self.upload_plan(&plan)?;
            self.forward(b, b, attn)?;
            self.stream.synchronize().map_err(drv("graph warm-up"))?;
            self.stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(drv("cuStreamBeginCapture"))?;
            let run = self.forward(b, b, attn);
            let g = self.stream.end_capture(sys::CUgraphInstantiate_flags(0)).map_err(drv("cuStreamEndCapture"));
            run?;
            let g = g?.ok_or_else(|| format!("capturing the decode graph for {b} sequences gave no graph"))?;
            g.upload().map_err(drv("cuGraphUpload"))?;
            graphs.push((b, Graph(g)));
        }
        self.graphs = graphs;
        Ok(())
    }

    fn ensure<T: DeviceRepr + ValidAsZeroBits>(stream: &Arc<CudaStream>, buf: &mut CudaSlice<T>, n: usize) -> DevResult<()> {
        if buf.len() < n {
            *buf = stream.alloc_zeros::<T>(n.next_power_of_two()).map_err(drv("growing the sampling buffers"))?;
        }
        Ok(())
    }

    fn upload_sampling(&mut self, pk: &Packed) -> DevResult<()> {
        let st = self.stream.clone();
        let e = drv("copying sampling parameters");
        Self::ensure(&st, &mut self.samp.params, pk.params.len())?;
        Self::ensure(&st, &mut self.samp.pen_tokens, pk.pen_tokens.len())?;
        Self::ensure(&st, &mut self.samp.pen_counts, pk.pen_counts.len())?;
        Self::ensure(&st, &mut self.samp.pen_in_prompt, pk.pen_in_prompt.len())?;
        Self::ensure(&st, &mut self.samp.bias_tokens, pk.bias_tokens.len())?;
        Self::ensure(&st, &mut self.samp.bias_values, pk.bias_values.len())?;
        Self::ensure(&st, &mut self.samp.ban_tokens, pk.ban_tokens.len())?;
        Self::ensure(&st, &mut self.samp.mask_words, pk.mask_words.len())?;
        macro_rules! put {
            ($v:expr, $d:expr) => {
                if !$v.is_empty() {
                    st.memcpy_htod(&$v, &mut $d.slice_mut(0..$v.len())).map_err(&e)?;
                }
            };
        }
        put!(pk.params, self.samp.params);
        put!(pk.pen_tokens, self.samp.pen_tokens);
        put!(pk.pen_counts, self.samp.pen_counts);
        put!(pk.pen_in_prompt, self.samp.pen_in_prompt);
        put!(pk.bias_tokens, self.samp.bias_tokens);
        put!(pk.bias_values, self.samp.bias_values);
        put!(pk.ban_tokens, self.samp.ban_tokens);
        put!(pk.mask_words, self.samp.mask_words);
        Ok(())
    }

    /// Runs one step: the forward pass (a graph when one fits), then either
    /// the logit rows back to the host (`rows` None), or device sampling of
    /// `rows` (one per sampling chunk) plus the rows of `LogitRows::All` chunks.
    pub fn run(&mut self, input: &ModelInput, rows: Option<&[RowSampling]>) -> DevResult<StepOutput> {
        self.ctx.bind_to_thread().map_err(drv("binding the CUDA context"))?;
        let mut samples = vec![false; input.seqs.len()];
        for r in rows.unwrap_or_default() {
            if r.back != 0 {
                return Err("the CUDA backend samples only a chunk's last row (no speculative verify passes yet)".into());
            }
            match samples.get_mut(r.chunk) {
                Some(s) if !*s => *s = true,
                _ => return Err(format!("a sampling row names chunk {}, which the batch does not have once", r.chunk)),
            }
        }
        let plan = self.plan(input, &samples)?;
        self.upload_plan(&plan)?;
        let vocab = self.cfg.vocab_size;
        let r = plan.logit_rows.len();
        match plan.graph.and_then(|b| self.graphs.iter().find(|(g, _)| *g == b)) {
            Some((_, g)) => g.0.launch().map_err(drv("cuGraphLaunch"))?,
            None => self.forward(plan.tokens.len(), r, plan.attn)?,
        }
        let n_real = input.seqs.iter().map(|c| c.logits.count(c.len)).sum::<usize>();
        let mut out = StepOutput::default();
        let Some(rows) = rows else {
            let mut logits = vec![0f32; n_real * vocab];
            if n_real > 0 {
                self.stream.memcpy_dtoh(&self.act.logits.slice(0..n_real * vocab), &mut logits).map_err(drv("copying logits back"))?;
            }
            self.stream.synchronize().map_err(drv("step"))?;
            out.logits = logits;
            return Ok(out);
        };
        if rows.len() != plan.sample_rows.len() {
            return Err(format!("{} sampling rows for {} sampling chunks", rows.len(), plan.sample_rows.len()));
        }
        if plan.any_all {
            let mut all = Vec::new();
            for rg in &plan.all_ranges {
                let mut part = vec![0f32; rg.len() * vocab];
                self.stream
                    .memcpy_dtoh(&self.act.logits.slice(rg.start * vocab..rg.end * vocab), &mut part)
                    .map_err(drv("copying logit rows back"))?;
                all.extend(part);
            }
            out.logits = all;
        }
        if rows.is_empty() {
            self.stream.synchronize().map_err(drv("step"))?;
            return Ok(out);
        }
        let s = rows.len();
        // The sampling rows, contiguous: the first logit rows themselves when
        // they are the sampling rows (decode, padded or not), else gathered
        // (f32 rows moved as pairs of bf16).
        let contiguous = plan.sample_rows.iter().enumerate().all(|(i, &x)| x as usize == i);
        let logits_ptr = if contiguous {
            addr(&self.act.logits, &self.stream)
        } else {
            let (src, dst) = (addr(&self.act.logits, &self.stream), addr(&self.act.sample_logits, &self.stream));
            let idx = addr(&self.step.sample_rows, &self.stream);
            self.gather(src, idx, dst, 2 * vocab as i32, r as i32, s)?;
            dst
        };
        let pk = pack::pack(rows, vocab);
        self.upload_sampling(&pk)?;
        let st = &self.stream;
        let sb = &self.samp;
        let raw = if pk.any_logprobs { addr(&self.act.raw, st) } else { 0u64 };
        let vi = vocab as i32;
        let args = [
            addr(&sb.params, st),
            addr(&sb.pen_tokens, st),
            addr(&sb.pen_counts, st),
            addr(&sb.pen_in_prompt, st),
            addr(&sb.bias_tokens, st),
            addr(&sb.bias_values, st),
            addr(&sb.ban_tokens, st),
            addr(&sb.mask_words, st),
            addr(&sb.out_tokens, st),
            addr(&sb.out_logprob, st),
            addr(&sb.out_rank, st),
            addr(&sb.out_top_ids, st),
            addr(&sb.out_top_logprobs, st),
        ];
        // SAFETY: sample_rows's signature (kernels/sampling.cu), in order; the
        // input buffers were grown to the packed lengths just above, and the
        // outputs hold max_seqs rows: a step samples at most one row per
        // sequence, so at least `s`.
        unsafe {
            let mut b = st.launch_builder(&self.k.sample);
            b.arg(&logits_ptr).arg(&raw).arg(&vi);
            for a in &args {
                b.arg(a);
            }
            b.launch(cfg1(s as u32, 1024)).map_err(drv("sample_rows"))?;
        }
        let mut ans = Answers {
            tokens: vec![0; s],
            logprob: vec![0.0; s],
            rank: vec![0; s],
            top_ids: vec![0; s * MAX_LOGPROBS as usize],
            top_logprobs: vec![0.0; s * MAX_LOGPROBS as usize],
        };
        let e = drv("copying sampled tokens back");
        st.memcpy_dtoh(&sb.out_tokens.slice(0..s), &mut ans.tokens).map_err(&e)?;
        if pk.any_logprobs {
            st.memcpy_dtoh(&sb.out_logprob.slice(0..s), &mut ans.logprob).map_err(&e)?;
            st.memcpy_dtoh(&sb.out_rank.slice(0..s), &mut ans.rank).map_err(&e)?;
            st.memcpy_dtoh(&sb.out_top_ids.slice(0..s * MAX_LOGPROBS as usize), &mut ans.top_ids).map_err(&e)?;
            st.memcpy_dtoh(&sb.out_top_logprobs.slice(0..s * MAX_LOGPROBS as usize), &mut ans.top_logprobs).map_err(&e)?;
        }
        st.synchronize().map_err(drv("step"))?;
        out.sampled = pack::unpack(&pk.params, &ans);
        Ok(out)
    }
}

fn cfg1(blocks: u32, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks.max(1), 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// Memory before and after loading, for the budget.
pub fn memory(ctx: &Arc<CudaContext>) -> DevResult<(usize, usize)> {
    ctx.mem_get_info().map_err(drv("cuMemGetInfo"))
}

/// The activation sizes of one rank for the budget.
pub fn activation_shape(cfg: &ModelConfig, share: &RankShare, max_tokens: usize, max_seqs: usize, max_model_len: usize) -> ActivationShape {
    ActivationShape {
        hidden: cfg.hidden_size,
        q_size: share.q_rows().len(),
        kv_size: share.kv_rows().len(),
        intermediate: share.intermediate.len(),
        vocab: cfg.vocab_size,
        num_heads: share.num_heads(),
        head_dim: cfg.head_dim,
        max_tokens,
        max_seqs,
        max_model_len,
    }
}

/// Memory of one device for the budget (`free_at_start` measured before loading).
pub fn device_memory(ctx: &Arc<CudaContext>, free_at_start: usize) -> DevResult<DeviceMemory> {
    let (free_now, total) = memory(ctx)?;
    Ok(DeviceMemory { total, free_at_start, free_now })
}
