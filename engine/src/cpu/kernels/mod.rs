//! The CPU backend's kernels over the quantized formats of [`crate::quant`]:
//! activation quantization, dot products and the batched matmul the model
//! runs.
//!
//! Dot products follow llama.cpp: the f32 activations are quantized once per
//! matmul to the weight type's "vec_dot_type" (Q8_0, Q8_1 or Q8_K), then each
//! block is an integer dot scaled by both blocks' scales. Every kernel has a
//! scalar version and an x86 SIMD version picked at run time; `set_force_scalar`
//! (or FERRY_FORCE_SCALAR=1) keeps the scalar one reachable.

mod act;
#[cfg(all(test, target_arch = "x86_64"))]
mod avx2_check;
mod dot_scalar;
#[cfg(target_arch = "x86_64")]
mod dot_x86;
#[cfg(target_arch = "x86_64")]
mod gemm16;
#[cfg(target_arch = "x86_64")]
mod gemm16k;
#[cfg(target_arch = "x86_64")]
mod gemm8;
#[cfg(target_arch = "x86_64")]
mod gemm8k;
mod interleave;
mod matmul;
mod simd;

pub use matmul::{interleave_for_this_cpu, matmul, matmul_gated, matmul_group, vec_dot};
pub(crate) use matmul::{Prepared, SHARE_ALIGN};
pub use simd::{force_scalar, has_avx2_fma, has_avx512, set_force_avx2, set_force_per_row, set_force_scalar, simd_name};
