//! The CUDA side of the engine (feature `cuda`): the device probe, and the
//! CUDA backend. Everything loads CUDA's libraries at run time (cudarc's
//! dynamic loading), so a build with the feature runs, and its tests pass, on
//! machines without a GPU; see docs/cuda.md for what has been checked where.
//!
//! Host-side parts, unit-tested without a GPU: [`convert`] (weights to bf16),
//! [`budget`] (KV blocks from `--gpu-memory-utilization`), [`graphs`] (CUDA
//! graph batch sizes), [`tp`] (tensor-parallel split and NCCL id exchange),
//! [`nvrtc_cache`] (compiled kernels on disk), [`pack`] (sampling rows for the
//! kernel), [`options`] (its settings from the engine's arguments). The
//! device parts ([`device`], [`backend`]) compile here and have never run.

pub mod backend;
pub mod budget;
pub mod convert;
pub mod device;
pub mod graphs;
pub mod nvrtc_cache;
pub mod options;
pub mod pack;
pub mod probe;
pub mod tp;

pub use backend::{build, build_with, CudaLoaded, CudaWorker};

#[cfg(test)]
mod gpu_tests;
