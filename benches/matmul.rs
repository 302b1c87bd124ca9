//! The CPU matmul (`cpu::kernels::matmul`) at the shapes and token counts the
//! kernels were tuned on; the speed probes that used to be ignored unit tests.
//!
//! - `matmul_shapes/TYPE/ROWSxCOLS`: SmolLM2-135M's matrices (q/k/v/o, the
//!   MLP, the Q8_0 vocabulary projection) and the other weight types at 1, 4,
//!   16 and 64 tokens, on the AVX2 kernels and the best this CPU has (and the
//!   scalar ones at 1 token); from 4 tokens also on the AVX2 per-row kernels
//!   alone (`avx2-rows`: no batched kernel, as `set_force_per_row`), the
//!   baseline of the batched ones. `FERRY_PROBE_TYPES=Q5_0,Q5_K` keeps only
//!   those types. Throughput is weight elements x tokens (multiply-adds).
//! - `model_step`: a decode step's matmuls on SmolLM2-135M's shapes (30
//!   layers of Q4_1 and the Q8_0 output matrix, ~96 MB, so the weights come
//!   from DRAM as in the real model), run from inside a rayon pool as the
//!   engine runs them, at 1, 4, 16 and 64 tokens (and on the scalar kernels at
//!   1), beside a plain parallel read of the same bytes (the memory bound).
//!   Throughput is tokens.
//! - Fixed work for `perf stat -e cycles:u` (or `task-clock`) on a loaded
//!   machine, where wall time mostly measures the other processes:
//!   `FERRY_AB=TYPE,ROWS,COLS,TOKENS,ITERS cargo bench --bench matmul` runs
//!   ITERS matmuls of that shape and nothing else; a sixth field `scalar`,
//!   `avx2` or `avx2-rows` picks those kernels instead of the best.

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use ferry_engine::cpu::kernels::{matmul, set_force_avx2, set_force_per_row, set_force_scalar, simd_name};
use ferry_engine::quant::{GgmlType, QMatrix};
use ferry_engine::rng::{splitmix, symmetric_f32};
use rayon::prelude::*;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

/// The kernels a case runs on; the SIMD switches are process-wide.
#[derive(Clone, Copy, PartialEq)]
enum Level {
    Scalar,
    Avx2,
    /// The AVX2 per-row kernels, no batched kernel.
    Avx2Rows,
    Best,
}

/// Sets the switches for `level` and names the kernels that then run; None
/// for AVX2 on a CPU without it.
fn select(level: Level) -> Option<&'static str> {
    set_force_scalar(false);
    set_force_per_row(false);
    match level {
        Level::Scalar => set_force_scalar(true),
        Level::Avx2 => set_force_avx2(true),
        Level::Avx2Rows => {
            set_force_avx2(true);
            set_force_per_row(true);
        }
        Level::Best => {}
    }
    let name = simd_name();
    if matches!(level, Level::Avx2 | Level::Avx2Rows) && name != "avx2" {
        set_force_scalar(false);
        set_force_per_row(false);
        return None;
    }
    Some(if level == Level::Avx2Rows { "avx2-rows" } else { name })
}

/// Benches `run` on each of `levels` whose kernels differ from those already run.
fn each_level(levels: &[Level], mut run: impl FnMut(&'static str)) {
    let mut seen = Vec::new();
    for &level in levels {
        match select(level) {
            Some(name) if !seen.contains(&name) => {
                seen.push(name);
                run(name);
            }
            _ => {}
        }
        set_force_scalar(false);
        set_force_per_row(false);
    }
}

/// Deterministic values in [-scale, scale), from the engine's own draw.
fn data(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = splitmix(seed);
    (0..n).map(|_| symmetric_f32(&mut rng) * scale).collect()
}

/// Random quantized blocks with small valid scales (fast to make), and their bytes.
fn random_matrix(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> (QMatrix, Arc<Vec<u8>>) {
    let rb = ty.row_bytes(cols).expect("whole blocks");
    let mut s = seed | 1;
    let mut bytes: Vec<u8> = (0..rows * rb)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 32) as u8
        })
        .collect();
    let scale = half::f16::from_f32(0.01).to_le_bytes();
    for blk in bytes.chunks_exact_mut(ty.type_size()) {
        blk[..2].copy_from_slice(&scale);
        if ty == GgmlType::Q4_1 {
            blk[2..4].copy_from_slice(&scale);
        }
    }
    let bytes = Arc::new(bytes);
    (QMatrix::new(ty, rows, cols, bytes.clone(), 0).expect("in bounds"), bytes)
}

fn bench_shapes(c: &mut Criterion) {
    use GgmlType::*;
    let shapes = [
        (Q4_1, 1536, 576),
        (Q8_0, 49152, 576),
        (Q4_1, 576, 1536),
        (Q4_1, 192, 576),
        (Q5_0, 1536, 576),
        (Q5_1, 1536, 576),
        (IQ4_NL, 1536, 576),
        (Q2_K, 576, 1536),
        (Q3_K, 576, 1536),
        (Q4_K, 576, 1536),
        (Q5_K, 576, 1536),
        (Q6_K, 576, 1536),
        (IQ4_XS, 576, 1536),
    ];
    let only = std::env::var("FERRY_PROBE_TYPES").ok();
    let keep = |ty: GgmlType| only.as_deref().is_none_or(|o| o.split(',').any(|n| n == ty.name()));
    eprintln!("matmul: best SIMD kernels {}; rayon threads: {}", simd_name(), rayon::current_num_threads());
    for (ty, rows, cols) in shapes.into_iter().filter(|s| keep(s.0)) {
        let w = QMatrix::quantize(ty, rows, cols, &data(rows * cols, 1, 0.5)).expect("quantizes");
        let mut group = c.benchmark_group(format!("matmul_shapes/{}/{rows}x{cols}", ty.name()));
        group.sample_size(10).sampling_mode(SamplingMode::Flat).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
        for n in [1usize, 4, 16, 64] {
            let x = data(n * cols, 2, 1.0);
            let mut out = vec![0f32; n * rows];
            group.throughput(Throughput::Elements((rows * cols * n) as u64));
            let levels: &[Level] = if n == 1 { &[Level::Scalar, Level::Avx2, Level::Best] } else { &[Level::Avx2Rows, Level::Avx2, Level::Best] };
            each_level(levels, |name| {
                group.bench_function(BenchmarkId::new(name, format!("tokens={n}")), |b| {
                    b.iter(|| matmul(&w, black_box(&x), n, black_box(&mut out)));
                });
            });
        }
        group.finish();
    }
}

fn bench_model_step(c: &mut Criterion) {
    let (h, f, kv, vocab) = (576, 1536, 192, 49152);
    let layers: Vec<Vec<(QMatrix, Arc<Vec<u8>>)>> = (0..30)
        .map(|l| {
            [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]
                .iter()
                .enumerate()
                .map(|(i, &(r, c))| random_matrix(GgmlType::Q4_1, r, c, (l * 10 + i) as u64 + 1))
                .collect()
        })
        .collect();
    let output = random_matrix(GgmlType::Q8_0, vocab, h, 999);
    let all: Vec<&Arc<Vec<u8>>> = layers.iter().flatten().chain(std::iter::once(&output)).map(|(_, b)| b).collect();
    let total: usize = all.iter().map(|b| b.len()).sum();
    let mut group = c.benchmark_group("model_step");
    group.sample_size(10).sampling_mode(SamplingMode::Flat).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    // Baseline: a plain parallel read of the same number of bytes.
    group.throughput(Throughput::Bytes(total as u64));
    group.bench_function(format!("read {} MB", total >> 20), |b| {
        b.iter(|| {
            all.par_iter()
                .map(|b| {
                    b.par_chunks(1 << 16)
                        .map(|c| c.chunks_exact(8).fold(0u64, |a, w| a ^ u64::from_le_bytes(w.try_into().unwrap())))
                        .reduce(|| 0, |a, b| a ^ b)
                })
                .reduce(|| 0, |a, b| a ^ b)
        });
    });
    // As the engine calls it: from inside the pool, so the calling thread
    // works too and no job crosses threads per call.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(rayon::current_num_threads()).build().expect("a rayon pool");
    for n in [1usize, 4, 16, 64] {
        let xh = data(n * h, 3, 1.0);
        let xf = data(n * f, 4, 1.0);
        let mut out = vec![0f32; n * vocab];
        group.throughput(Throughput::Elements(n as u64));
        let levels: &[Level] = if n == 1 { &[Level::Best, Level::Scalar] } else { &[Level::Best] };
        each_level(levels, |name| {
            group.bench_function(BenchmarkId::new(name, format!("tokens={n}")), |b| {
                b.iter(|| {
                    pool.install(|| {
                        for l in &layers {
                            for (i, (m, _)) in l.iter().enumerate() {
                                let x = if i == 6 { &xf } else { &xh };
                                matmul(m, x, n, &mut out[..n * m.rows()]);
                            }
                        }
                        matmul(&output.0, &xh, n, &mut out);
                    });
                });
            });
        });
    }
    group.finish();
}

/// FERRY_AB=TYPE,ROWS,COLS,TOKENS,ITERS: that many matmuls of random blocks
/// and nothing else, for a cycle count.
fn fixed_work(spec: &str) {
    let f: Vec<&str> = spec.split(',').collect();
    let (&[name, rows, cols, n, iters], level) = (&f[..f.len().min(5)], f.get(5)) else { panic!("FERRY_AB={spec}: want TYPE,ROWS,COLS,TOKENS,ITERS[,LEVEL]") };
    let level = match level.copied() {
        None => Level::Best,
        Some("scalar") => Level::Scalar,
        Some("avx2") => Level::Avx2,
        Some("avx2-rows") => Level::Avx2Rows,
        Some(l) => panic!("FERRY_AB: no level {l} (scalar, avx2, avx2-rows)"),
    };
    let kernels = select(level).unwrap_or_else(|| panic!("FERRY_AB: this CPU has no AVX2"));
    eprintln!("FERRY_AB: {kernels} kernels");
    let ty = GgmlType::ALL.into_iter().find(|t| t.name() == name).unwrap_or_else(|| panic!("FERRY_AB: no type {name}"));
    let num = |s: &str| -> usize { s.parse().unwrap_or_else(|_| panic!("FERRY_AB: {s} is not a count")) };
    let (rows, cols, n, iters) = (num(rows), num(cols), num(n), num(iters));
    let mut w = QMatrix::random(ty, rows, cols, 1).expect("whole blocks");
    // As the model's matrices: with the 16-row kernel's copy where it runs
    // (FERRY_INTERLEAVE=0: without).
    ferry_engine::cpu::kernels::interleave_for_this_cpu(&mut w);
    let x = data(n * cols, 2, 1.0);
    let mut out = vec![0f32; n * rows];
    for _ in 0..iters {
        matmul(&w, &x, n, &mut out);
    }
    black_box(&out);
}

// In a private module: the function criterion_group! makes is public and
// undocumented.
mod group {
    criterion::criterion_group!(benches, super::bench_shapes, super::bench_model_step);
}

fn main() {
    if let Ok(spec) = std::env::var("FERRY_AB") {
        fixed_work(&spec);
        return;
    }
    group::benches();
    Criterion::default().configure_from_args().final_summary();
}
