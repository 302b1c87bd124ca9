//! Is there a usable NVIDIA driver and GPU here, and which?
//!
//! Everything goes through cudarc's dynamically loaded driver API, so a build
//! with the `cuda` feature links no CUDA library and starts on any machine.
//! cudarc panics when a library or symbol it is asked for is missing, so the
//! library is looked for first, and the calls run inside `catch_unwind` in
//! case a very old driver lacks one of the few symbols used here.

use cudarc::driver::{result, sys};
use std::fmt;

/// One GPU as the driver describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    /// The driver's device number (0-based, as `CUDA_VISIBLE_DEVICES`
    /// renumbers them): what a rank's `device` refers to.
    pub ordinal: usize,
    /// The product name (`"NVIDIA H200"`).
    pub name: String,
    /// Compute capability (major, minor): (9, 0) on an H100 or H200.
    pub compute_capability: (i32, i32),
    /// The device's memory in bytes, free or not.
    pub total_memory_bytes: usize,
    /// Streaming multiprocessors (132 on an H100 SXM).
    pub multiprocessors: i32,
}

impl fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (ma, mi) = self.compute_capability;
        let gib = self.total_memory_bytes as f64 / (1u64 << 30) as f64;
        write!(f, "GPU {}: {} (sm_{ma}{mi}, {gib:.1} GiB, {} SMs)", self.ordinal, self.name, self.multiprocessors)
    }
}

/// What the probe found: the driver's CUDA version and every GPU it sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaProbe {
    /// The newest CUDA version the driver supports, (major, minor).
    pub driver_cuda_version: (i32, i32),
    /// Every GPU the driver sees, by ordinal; never empty.
    pub gpus: Vec<GpuInfo>,
    /// libnvrtc could be loaded (the backend compiles its kernels with it).
    pub nvrtc: bool,
}

impl fmt::Display for CudaProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (ma, mi) = self.driver_cuda_version;
        write!(f, "NVIDIA driver for CUDA {ma}.{mi}, NVRTC {}", if self.nvrtc { "found" } else { "not found" })?;
        for g in &self.gpus {
            write!(f, "; {g}")?;
        }
        Ok(())
    }
}

/// Why no GPU can be used; each message says what to check.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// libcuda could not be loaded: no driver here.
    #[error("the NVIDIA driver library (libcuda.so.1) was not found: no NVIDIA driver is installed, or it is not on the library path")]
    NoDriver,
    /// `cuInit` failed (or the library lacks a symbol); the driver's error name.
    #[error("the NVIDIA driver did not start (cuInit: {0}); is a GPU attached and the driver loaded (nvidia-smi)?")]
    Init(String),
    /// The driver started but counts no device.
    #[error("the NVIDIA driver sees no GPU")]
    NoDevice,
    /// A query after `cuInit` failed (version, count, a GPU's attributes);
    /// the driver's error name.
    #[error("the NVIDIA driver failed to describe a GPU: {0}")]
    Query(String),
}

fn name(e: result::DriverError) -> String {
    match e.error_name() {
        Ok(n) => format!("{} ({})", n.to_string_lossy(), e.0 as u32),
        Err(_) => format!("error {}", e.0 as u32),
    }
}

fn describe(ordinal: usize) -> Result<GpuInfo, ProbeError> {
    let q = |e| ProbeError::Query(name(e));
    let dev = result::device::get(ordinal as i32).map_err(q)?;
    use sys::CUdevice_attribute::*;
    // SAFETY: `dev` came from cuDeviceGet.
    unsafe {
        Ok(GpuInfo {
            ordinal,
            name: result::device::get_name(dev).map_err(q)?,
            compute_capability: (
                result::device::get_attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR).map_err(q)?,
                result::device::get_attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR).map_err(q)?,
            ),
            total_memory_bytes: result::device::total_mem(dev).map_err(q)?,
            multiprocessors: result::device::get_attribute(dev, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(q)?,
        })
    }
}

fn probe_inner() -> Result<CudaProbe, ProbeError> {
    // SAFETY: only tries to dlopen the driver library by its known names.
    if !unsafe { sys::is_culib_present() } {
        return Err(ProbeError::NoDriver);
    }
    result::init().map_err(|e| match e.0 {
        sys::CUresult::CUDA_ERROR_NO_DEVICE => ProbeError::NoDevice,
        _ => ProbeError::Init(name(e)),
    })?;
    let mut version = 0i32;
    // SAFETY: writes one int.
    unsafe { sys::cuDriverGetVersion(&mut version) }.result().map_err(|e| ProbeError::Query(name(e)))?;
    let count = result::device::get_count().map_err(|e| ProbeError::Query(name(e)))?;
    if count <= 0 {
        return Err(ProbeError::NoDevice);
    }
    let gpus = (0..count as usize).map(describe).collect::<Result<Vec<_>, _>>()?;
    Ok(CudaProbe { driver_cuda_version: (version / 1000, version % 1000 / 10), gpus, nvrtc: ferry_kernels::nvrtc::available() })
}

/// Looks for the driver and the GPUs. Never panics.
pub fn probe() -> Result<CudaProbe, ProbeError> {
    std::panic::catch_unwind(probe_inner).unwrap_or_else(|p| {
        let why = crate::shell::panic_message(&*p).unwrap_or_default();
        Err(ProbeError::Init(format!("the driver library lacks a function ferry needs: {why}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs everywhere: with no driver it must say so (not panic); with one,
    /// it must describe at least one GPU. `FERRY_REQUIRE_GPU=1` (the GPU
    /// check script sets it) makes "no GPU" a failure.
    #[test]
    fn probe_answers_without_panicking() {
        match probe() {
            Ok(p) => {
                assert!(!p.gpus.is_empty());
                eprintln!("found: {p}");
            }
            Err(e) => {
                assert!(std::env::var("FERRY_REQUIRE_GPU").is_err(), "FERRY_REQUIRE_GPU is set but: {e}");
                eprintln!("skipped (no GPU here): {e}");
            }
        }
    }
}
