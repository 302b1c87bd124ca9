//! Which kernels run: the SIMD level this CPU offers, and the process-wide
//! switches that force the scalar or the AVX2 paths (tests, debugging, odd CPUs).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::OnceLock;

/// Instruction-set level of the kernels, lowest first. The VNNI levels only
/// change how the 8-bit dot products are done; results are bit-identical to `Avx2`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX2 plus AVX-VNNI (VEX-encoded vpdpbusd).
    AvxVnni,
    /// AVX2 plus AVX512-VNNI and AVX512-VL (EVEX vpdpbusd on ymm, 32 registers).
    Avx512Vnni,
}

/// The highest level the kernels may use, as an `Isa as u8`: the switches
/// lower it so the fallback paths run on a CPU that has better ones.
static CAP: AtomicU8 = AtomicU8::new(Isa::Avx512Vnni as u8);
static ENV_READ: OnceLock<()> = OnceLock::new();
static DETECTED: OnceLock<Isa> = OnceLock::new();

/// Reads FERRY_FORCE_SCALAR and FERRY_FORCE_AVX2 once, so the variables set
/// the switches' initial state (FERRY_FORCE_AVX2=1: the paths of a CPU
/// without AVX-512, for benchmarks on one that has it) and `set_force_*`
/// can still change it afterwards.
fn init_from_env() {
    ENV_READ.get_or_init(|| {
        let set = |name: &str| std::env::var(name).is_ok_and(|v| v.trim() == "1");
        if set("FERRY_FORCE_SCALAR") {
            CAP.store(Isa::Scalar as u8, Ordering::Relaxed);
        } else if set("FERRY_FORCE_AVX2") {
            CAP.store(Isa::Avx2 as u8, Ordering::Relaxed);
        }
    });
}

fn set_cap(cap: Isa) {
    init_from_env();
    CAP.store(cap as u8, Ordering::Relaxed);
}

/// Forces (or stops forcing) the portable scalar kernels for the whole process.
pub fn set_force_scalar(on: bool) {
    set_cap(if on { Isa::Scalar } else { Isa::Avx512Vnni });
}

/// Forces (or stops forcing) the AVX2 kernels for the whole process, on a CPU
/// with more (AVX-VNNI, AVX512): the paths an AVX2-only CPU takes.
pub fn set_force_avx2(on: bool) {
    set_cap(if on { Isa::Avx2 } else { Isa::Avx512Vnni });
}

/// Set while the batched matmul kernels are switched off (`set_force_per_row`).
static PER_ROW: AtomicBool = AtomicBool::new(false);

/// Forces (or stops forcing) the per-row kernels for every matmul, whatever
/// its token count: the batched ones (gemm16, gemm16k, gemm8k, gemm8) give the same
/// bits, so this only moves time; benches compare the two paths with it.
pub fn set_force_per_row(on: bool) {
    PER_ROW.store(on, Ordering::Relaxed);
}

/// Whether the per-row kernels are forced (`set_force_per_row`).
pub(crate) fn per_row_forced() -> bool {
    PER_ROW.load(Ordering::Relaxed)
}

/// Whether the scalar kernels are forced.
pub fn force_scalar() -> bool {
    init_from_env();
    CAP.load(Ordering::Relaxed) == Isa::Scalar as u8
}

/// The best level this CPU supports, ignoring the switch.
pub(crate) fn detected() -> Isa {
    *DETECTED.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Isa {
    use std::arch::is_x86_feature_detected as has;
    if !(has!("avx2") && has!("fma") && has!("f16c")) {
        return Isa::Scalar;
    }
    if has!("avx512vnni") && has!("avx512vl") && has!("avx512bw") && has!("avx512f") {
        Isa::Avx512Vnni
    } else if has!("avxvnni") {
        Isa::AvxVnni
    } else {
        Isa::Avx2
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Isa {
    Isa::Scalar
}

/// The level the kernels use now: the detected one, or the forced one below it.
#[inline]
pub(crate) fn current() -> Isa {
    init_from_env();
    let cap = match CAP.load(Ordering::Relaxed) {
        0 => Isa::Scalar,
        1 => Isa::Avx2,
        2 => Isa::AvxVnni,
        _ => Isa::Avx512Vnni,
    };
    detected().min(cap)
}

/// Every level this CPU can run, scalar first (for tests that compare them).
#[cfg(test)]
pub(crate) fn available() -> Vec<Isa> {
    let mut v = vec![Isa::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") && has!("f16c") {
            v.push(Isa::Avx2);
            if has!("avxvnni") {
                v.push(Isa::AvxVnni);
            }
            if has!("avx512vnni") && has!("avx512vl") && has!("avx512bw") && has!("avx512f") {
                v.push(Isa::Avx512Vnni);
            }
        }
    }
    v
}

/// Name of the kernels in use, for logs ("scalar", "avx2", "avx-vnni", "avx512-vnni").
pub fn simd_name() -> &'static str {
    match current() {
        Isa::Scalar => "scalar",
        Isa::Avx2 => "avx2",
        Isa::AvxVnni => "avx-vnni",
        Isa::Avx512Vnni => "avx512-vnni",
    }
}

/// Whether AVX2 and FMA code may run now: the CPU has them and scalar is not
/// forced. Other modules (attention) pick their vectorized paths by it.
pub fn has_avx2_fma() -> bool {
    current() != Isa::Scalar
}

/// Whether AVX512 F/BW/VL (with AVX2, FMA and F16C) may run now, as
/// [`has_avx2_fma`]. Detected together with VNNI, which the matmul kernels
/// need: an AVX512 CPU without it takes the AVX2 paths everywhere.
pub fn has_avx512() -> bool {
    current() == Isa::Avx512Vnni
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_forces_scalar() {
        let before = force_scalar();
        set_force_scalar(true);
        assert_eq!(current(), Isa::Scalar);
        assert_eq!(simd_name(), "scalar");
        set_force_scalar(false);
        assert_eq!(current(), detected());
        set_force_avx2(true);
        assert_eq!(current(), detected().min(Isa::Avx2));
        set_force_avx2(false);
        assert_eq!(current(), detected());
        set_force_scalar(before);
        assert!(available().contains(&detected()));
    }
}
