//! Pieces the benches share.

use std::path::PathBuf;

/// The default model's file, when it is here: `FERRY_TEST_MODEL` alone decides
/// when set (a path that isn't there skips the real model), else `models/` at the
/// package root.
pub fn model_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("FERRY_TEST_MODEL") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")).filter(|p| p.is_file())
}
