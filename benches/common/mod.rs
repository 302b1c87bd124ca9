//! Pieces the benches share.

use std::path::PathBuf;

/// The default model's file, when it is here: `FERRY_TEST_MODEL` alone decides
/// when set (a path that isn't there skips the real model), else the per-user
/// model cache (`ferry_engine::model::model_cache`, where scripts/fetch/fetch-model.sh puts it).
pub(crate) fn model_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("FERRY_TEST_MODEL") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    Some(ferry_engine::model::model_cache::default_model_path()).filter(|p| p.is_file())
}
