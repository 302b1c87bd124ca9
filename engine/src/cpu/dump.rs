//! Optional dumps of a forward step's intermediate tensors, for finding the
//! first operation where ferry and another implementation part ways. With
//! `FERRY_DUMP_DIR=dir`, each named activation is written as raw little-endian
//! f32 to `dir/NAME-LAYER.f32` (overwritten step after step, so the last step's
//! values remain). `scripts/reference/llama_cpp_dump.py` takes llama.cpp's through its
//! eval callback and `scripts/reference/compare_dumps.py` lines the two up. Off unless
//! the variable is set (read once). Meant for tensor-parallel size 1: ranks
//! would overwrite each other's shards.

use std::path::PathBuf;
use std::sync::OnceLock;

fn dir() -> Option<&'static PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| std::env::var_os("FERRY_DUMP_DIR").map(PathBuf::from)).as_ref()
}

/// Whether dumping is on (steps that fuse operations then keep them apart, so
/// each intermediate tensor exists to be written).
pub(crate) fn enabled() -> bool {
    dir().is_some()
}

/// Writes `values` as `NAME-LAYER.f32` when dumping is on.
pub(crate) fn tensor(name: &str, layer: usize, values: &[f32]) {
    let Some(dir) = dir() else { return };
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let path = dir.join(format!("{name}-{layer}.f32"));
    if let Err(e) = std::fs::write(&path, bytes) {
        eprintln!("FERRY_DUMP_DIR: cannot write {}: {e}", path.display());
    }
}
