//! Which device the engine's arithmetic runs on (`--device cpu|cuda|auto`).
//!
//! Only the CPU backend exists so far. The choice is still made here, once,
//! before any model is loaded, so that `--device cuda` fails at start-up with
//! the reason (no GPU, no driver, a build without CUDA, or the CUDA backend not
//! being written yet) instead of running on the CPU behind the user's back.

use std::fmt;

/// The `--device` flag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA where a usable GPU and the CUDA backend are there, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// The device the engine will run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
        }
    }
}

/// A resolved choice, with a line for the log that says why when the answer
/// is not simply what was asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub device: Device,
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

const NOT_YET: &str = "ferry's CUDA backend is not implemented yet (issue 14: the kernels exist, the backend that runs a model with them does not)";

/// Decides `choice` against what `find` reports (the real [`find_gpu`], or a
/// test's stand-in). Err: `--device cuda` cannot be honoured, and why.
pub fn resolve_with(choice: DeviceChoice, find: impl FnOnce() -> GpuFinding) -> Result<Resolved, String> {
    match choice {
        DeviceChoice::Cpu => Ok(Resolved { device: Device::Cpu, note: None }),
        DeviceChoice::Cuda => match find() {
            Ok(gpu) => Err(format!("--device cuda: found {gpu}, but {NOT_YET}; run with --device cpu")),
            Err(why) => Err(format!("--device cuda: no usable GPU: {why}")),
        },
        DeviceChoice::Auto => {
            let note = match find() {
                Ok(gpu) => format!("--device auto: found {gpu}, but {NOT_YET}; running on the CPU"),
                Err(why) => format!("--device auto: running on the CPU ({why})"),
            };
            Ok(Resolved { device: Device::Cpu, note: Some(note) })
        }
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
    fn cuda_with_a_gpu_says_the_backend_is_not_written_rather_than_using_the_cpu() {
        let e = resolve_with(DeviceChoice::Cuda, || Ok("GPU 0: NVIDIA H200".into())).unwrap_err();
        assert!(e.contains("NVIDIA H200") && e.contains("not implemented yet"), "{e}");
    }

    #[test]
    fn auto_falls_back_to_the_cpu_and_says_why() {
        for find in [Ok("GPU 0: NVIDIA H200".to_string()), Err("no driver".to_string())] {
            let r = resolve_with(DeviceChoice::Auto, || find.clone()).unwrap();
            assert_eq!(r.device, Device::Cpu);
            assert!(r.note.unwrap().contains("running on the CPU"));
        }
    }

    /// On this machine, whatever it has: never a panic, and `cuda` is never
    /// granted while the CUDA backend does not exist.
    #[test]
    fn resolving_here_never_panics() {
        assert_eq!(resolve(DeviceChoice::Auto).unwrap().device, Device::Cpu);
        assert!(resolve(DeviceChoice::Cuda).is_err());
    }
}
