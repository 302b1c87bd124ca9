//! The quantized matmul kernels: `cpu::kernels::matmul` over the weight types ferry
//! loads, on SmolLM2-135M's MLP shapes (gate/up 1536x576, down 576x1536), at
//! one token (decode) and 16 tokens (a small prefill or a batch of 16 decodes),
//! with the SIMD kernels this CPU offers and with the portable scalar ones.
//!
//! Throughput is weight elements x tokens (multiply-adds), so criterion prints
//! elements/s and the types compare directly. The K-quants and IQ4_XS need rows
//! of whole 256-element super-blocks, so they only run on the 576x1536 shape (as in
//! llama.cpp, a 576-column tensor can't be stored as a K-quant).
//!
//! matmul is called from the bench thread and fans out over rayon's global
//! pool; the engine instead runs it inside its executor's own pool (install),
//! which saves a wake-up per parallel loop.
//!
//! Run it with `cargo bench --bench quant_dot`; `-- Q4_K` (any part of a group
//! name, `quant_dot/<type>/<rows>x<cols>`) runs some types only, and
//! `RAYON_NUM_THREADS` sets the pool size, which the bench prints. The
//! figures are in docs/performance.md.

use criterion::{criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use ferry_engine::cpu::kernels::{matmul, set_force_scalar, simd_name};
use ferry_engine::quant::{GgmlType, QMatrix};
use ferry_engine::rng::{symmetric_f32, splitmix};
use std::hint::black_box;
use std::time::Duration;

const TYPES: [GgmlType; 12] = [
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::IQ4_NL,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_XS,
    GgmlType::F16,
];
/// (rows, cols): ffn_gate/ffn_up, then ffn_down of SmolLM2-135M.
const SHAPES: [(usize, usize); 2] = [(1536, 576), (576, 1536)];
const TOKENS: [usize; 2] = [1, 16];

/// Deterministic values in [-scale, scale), so every run quantizes the same bytes.
fn data(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut rng = splitmix(seed);
    (0..n).map(|_| symmetric_f32(&mut rng) * scale).collect()
}

fn bench_matmul(c: &mut Criterion) {
    // The SIMD level is process-wide; name it so the figures can be read later.
    set_force_scalar(false);
    let simd = simd_name();
    eprintln!("quant_dot: SIMD kernels are {simd}; rayon threads: {}", rayon_threads());
    for (rows, cols) in SHAPES {
        for ty in TYPES {
            if ty.row_bytes(cols).is_none() {
                eprintln!("quant_dot: skipping {} {rows}x{cols}: {cols} columns are not whole {}-element blocks", ty.name(), ty.block_size());
                continue;
            }
            let w = match QMatrix::quantize(ty, rows, cols, &data(1, rows * cols, 1.0 / (cols as f32).sqrt())) {
                Ok(w) => w,
                Err(e) => {
                    eprintln!("quant_dot: skipping {} {rows}x{cols}: {e}", ty.name());
                    continue;
                }
            };
            let mut group = c.benchmark_group(format!("quant_dot/{}/{rows}x{cols}", ty.name()));
            // Flat: the slow scalar cases (tens of ms an iteration) fit the time without a ramp.
            group
                .sample_size(10)
                .sampling_mode(SamplingMode::Flat)
                .warm_up_time(Duration::from_millis(500))
                .measurement_time(Duration::from_secs(2));
            for n in TOKENS {
                let x = data(2, n * cols, 1.0);
                let mut out = vec![0f32; n * rows];
                group.throughput(Throughput::Elements((rows * cols * n) as u64));
                for (label, scalar) in [(simd, false), ("scalar", true)] {
                    group.bench_function(BenchmarkId::new(label, format!("tokens={n}")), |b| {
                        set_force_scalar(scalar);
                        b.iter(|| matmul(&w, black_box(&x), n, black_box(&mut out)));
                        set_force_scalar(false);
                    });
                }
            }
            group.finish();
        }
    }
}

/// rayon's pool size without depending on rayon: RAYON_NUM_THREADS, else the CPU count.
fn rayon_threads() -> String {
    std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| {
        std::thread::available_parallelism().map_or_else(|_| "?".into(), |n| n.to_string())
    })
}

// `criterion_group!` makes a `pub fn` it cannot document; in a private module
// it is not exported, so `missing_docs` has nothing to ask of it.
mod group {
    criterion::criterion_group!(benches, super::bench_matmul);
}
criterion_main!(group::benches);
