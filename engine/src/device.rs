//! Which device the engine's arithmetic runs on (`--device cpu|cuda|auto`).
//!
//! The choice is made here, once, before any model is loaded, so that
//! `--device cuda` fails at start-up with the reason (no GPU, no driver, a
//! build without CUDA) instead of running on the CPU behind the user's back;
//! `auto` takes a usable GPU when there is one.

use std::fmt;

/// The `--device` flag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA where a usable GPU and the CUDA backend are there, else the CPU.
    #[default]
    Auto,
    /// The CPU, whatever GPUs there are.
    Cpu,
    /// A GPU, or a start-up error saying why there is none usable.
    Cuda,
}

/// The device the engine will run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The CPU backend (`crate::cpu`), always there.
    Cpu,
    /// NVIDIA GPUs through the CUDA backend (`crate::cuda`, feature `cuda`).
    Cuda,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda => f.write_str("cuda"),
        }
    }
}

/// A resolved choice, with a line for the log that says why when the answer
/// is not simply what was asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The device the engine runs on.
    pub device: Device,
    /// The log line: the GPU found, or why `auto` fell back to the CPU. None
    /// for `--device cpu`.
    pub note: Option<String>,
}

/// What this machine offers CUDA: a GPU description, or why there is none.
pub type GpuFinding = Result<String, String>;

/// Looks for a GPU (feature `cuda`); a build without it finds none, by design.
pub fn find_gpu() -> GpuFinding {
    #[cfg(feature = "cuda")]
    {
        crate::cuda::probe::probe().map(|p| p.to_string()).map_err(|e| e.to_string())
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err("this ferry was built without CUDA support (build it with `--features cuda`)".into())
    }
}

/// Decides `choice` against what `find` reports (the real [`find_gpu`], or a
/// test's stand-in). Err: `--device cuda` cannot be honoured, and why.
pub fn resolve_with(choice: DeviceChoice, find: impl FnOnce() -> GpuFinding) -> Result<Resolved, String> {
    match choice {
        DeviceChoice::Cpu => Ok(Resolved { device: Device::Cpu, note: None }),
        DeviceChoice::Cuda => match find() {
            Ok(gpu) => Ok(Resolved { device: Device::Cuda, note: Some(format!("--device cuda: {gpu}")) }),
            Err(why) => Err(format!("--device cuda: no usable GPU: {why}")),
        },
        DeviceChoice::Auto => Ok(match find() {
            Ok(gpu) => Resolved { device: Device::Cuda, note: Some(format!("--device auto: running on {gpu}")) },
            Err(why) => Resolved { device: Device::Cpu, note: Some(format!("--device auto: running on the CPU ({why})")) },
        }),
    }
}

/// Decides `choice` on this machine.
pub fn resolve(choice: DeviceChoice) -> Result<Resolved, String> {
    resolve_with(choice, find_gpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_the_cpu_and_asks_nothing() {
        let r = resolve_with(DeviceChoice::Cpu, || panic!("no probe for --device cpu")).unwrap();
        assert_eq!(r, Resolved { device: Device::Cpu, note: None });
    }

    #[test]
    fn cuda_without_a_gpu_is_an_error_that_says_why() {
        let e = resolve_with(DeviceChoice::Cuda, || Err("no driver".into())).unwrap_err();
        assert!(e.contains("no usable GPU") && e.contains("no driver"), "{e}");
    }

    #[test]
    fn cuda_and_auto_with_a_gpu_run_on_it_and_name_it() {
        for choice in [DeviceChoice::Cuda, DeviceChoice::Auto] {
            let r = resolve_with(choice, || Ok("GPU 0: NVIDIA H200".into())).unwrap();
            assert_eq!(r.device, Device::Cuda);
            assert!(r.note.unwrap().contains("NVIDIA H200"));
        }
    }

    #[test]
    fn auto_without_a_gpu_runs_on_the_cpu_and_says_why() {
        let r = resolve_with(DeviceChoice::Auto, || Err("no driver".into())).unwrap();
        assert_eq!(r.device, Device::Cpu);
        assert!(r.note.unwrap().contains("running on the CPU (no driver)"));
    }

    /// On this machine (no GPU, in CI too): never a panic; `auto` is the CPU
    /// and `cuda` an error that says why.
    #[test]
    fn resolving_here_never_panics() {
        if find_gpu().is_err() {
            assert_eq!(resolve(DeviceChoice::Auto).unwrap().device, Device::Cpu);
            assert!(resolve(DeviceChoice::Cuda).is_err());
        }
    }
}
