//! ferry's CUDA kernels: their sources (`kernels/*.cu`, with `common.cuh`
//! prepended) and, with the `cuda` feature, their compilation by NVRTC for the
//! GPU in hand.
//!
//! Status: written and compiled for sm_90 here (the test below, in CI), and
//! launched by the CUDA backend (`ferry-engine`'s `cuda::device`); not yet run
//! on a GPU. Nothing here is called working until it has run on one (see
//! docs/cuda.md).

/// The helpers every kernel file starts with.
pub const COMMON: &str = include_str!("../common.cuh");

/// One kernel source file and the entry points it defines.
pub struct KernelSource {
    /// The file's name in `kernels/` (`"rmsnorm.cu"`): names it in NVRTC's
    /// `#line`, in errors, and in the engine's PTX cache.
    pub file: &'static str,
    /// The file's text, without [`COMMON`] (see [`Self::full_source`]).
    pub source: &'static str,
    /// The `extern "C" __global__` functions it defines, which the engine
    /// looks up in the compiled module by these names.
    pub entry_points: &'static [&'static str],
}

/// Every kernel ferry has.
pub const KERNELS: &[KernelSource] = &[
    KernelSource { file: "embedding.cu", source: include_str!("../embedding.cu"), entry_points: &["embedding_gather_bf16"] },
    KernelSource { file: "rmsnorm.cu", source: include_str!("../rmsnorm.cu"), entry_points: &["fused_add_rmsnorm_bf16"] },
    KernelSource { file: "rope_kv.cu", source: include_str!("../rope_kv.cu"), entry_points: &["rope_write_kv_bf16"] },
    KernelSource { file: "silu_mul.cu", source: include_str!("../silu_mul.cu"), entry_points: &["silu_and_mul_bf16"] },
    KernelSource {
        file: "paged_attention.cu",
        source: include_str!("../paged_attention.cu"),
        entry_points: &["paged_attention_decode_bf16", "paged_attention_reduce_bf16", "paged_attention_prefill_bf16"],
    },
    KernelSource { file: "sampling.cu", source: include_str!("../sampling.cu"), entry_points: &["sample_rows"] },
];

impl KernelSource {
    /// The text NVRTC compiles: the common header, then the file.
    pub fn full_source(&self) -> String {
        format!("{COMMON}\n#line 1 \"{}\"\n{}", self.file, self.source)
    }
}

#[cfg(feature = "cuda")]
pub mod nvrtc {
    //! Compiling the kernels with NVRTC. cudarc panics when a library is
    //! missing, so presence is checked first and turned into an error.

    use super::KernelSource;

    /// NVRTC's shared library could be loaded (PATH / LD_LIBRARY_PATH).
    pub fn available() -> bool {
        // SAFETY: only tries to dlopen the library by its known names.
        unsafe { cudarc::nvrtc::sys::is_culib_present() }
    }

    /// PTX for `arch` (such as "sm_90"), or NVRTC's log of why not.
    pub fn compile(k: &KernelSource, arch: &'static str) -> Result<String, String> {
        if !available() {
            return Err("libnvrtc was not found (install CUDA, or the PyPI wheel nvidia-cuda-nvrtc and put its lib folder on LD_LIBRARY_PATH)".into());
        }
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            options: vec!["--std=c++17".into(), "-default-device".into()],
            ..Default::default()
        };
        cudarc::nvrtc::compile_ptx_with_opts(k.full_source(), opts)
            .map(|ptx| ptx.to_src())
            .map_err(|e| format!("{}: {e:?}", k.file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_point_is_defined_in_its_file() {
        for k in KERNELS {
            for e in k.entry_points {
                assert!(k.source.contains(&format!("extern \"C\" __global__ void {e}(")), "{} lacks {e}", k.file);
            }
        }
    }

    /// Compiles every kernel for sm_90 (the H200) with NVRTC, where libnvrtc can
    /// be found; `FERRY_REQUIRE_NVRTC=1` (CI sets it) makes its absence a failure.
    #[cfg(feature = "cuda")]
    #[test]
    fn every_kernel_compiles_with_nvrtc_for_sm_90() {
        if !nvrtc::available() {
            assert!(std::env::var("FERRY_REQUIRE_NVRTC").is_err(), "FERRY_REQUIRE_NVRTC is set but libnvrtc is missing");
            eprintln!("skipped: libnvrtc not found");
            return;
        }
        for k in KERNELS {
            let ptx = nvrtc::compile(k, "sm_90").unwrap_or_else(|e| panic!("{e}"));
            for e in k.entry_points {
                assert!(ptx.contains(&format!(".entry {e}(")), "{}: no PTX entry for {e}", k.file);
            }
        }
    }
}
