//! The CUDA side of the engine (feature `cuda`). So far: finding out whether
//! this machine has a usable NVIDIA driver and GPU ([`probe`]). The CUDA
//! backend itself (weights on the device, cuBLAS GEMMs, the kernels of
//! `ferry-kernels`, CUDA graphs, NCCL) is not written yet; see docs/cuda.md.

pub mod probe;
