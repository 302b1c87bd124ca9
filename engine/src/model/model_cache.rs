//! Where fetched models live: one per-user cache, the same from any working
//! directory, so a model fetched once (by `ferry serve`, scripts/fetch/fetch-model.sh or
//! scripts/test/all.sh) is found again by every later command and test.
//!
//! `$FERRY_MODEL_DIR`, else `$XDG_CACHE_HOME/ferry/models`, else
//! `~/.cache/ferry/models` (the XDG base-directory rule; an empty or relative
//! `XDG_CACHE_HOME` is ignored, as that spec says). scripts/fetch/fetch-model.sh and
//! tests/e2e/e2e_server.py follow the same rule.

use std::ffi::OsString;
use std::path::PathBuf;

/// The default model's file name inside the cache.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Its sha256: checked after every fetch, so a truncated or wrong file never
/// sits under the final name.
pub const DEFAULT_MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The cache folder for this process's environment.
pub fn model_dir() -> PathBuf {
    model_dir_from(|k| std::env::var_os(k))
}

/// The rule itself, over any environment (tests pass their own).
pub fn model_dir_from(env: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(dir) = set("FERRY_MODEL_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(xdg) = set("XDG_CACHE_HOME").map(PathBuf::from).filter(|p| p.is_absolute()) {
        return xdg.join("ferry").join("models");
    }
    // No HOME at all (a bare container): the relative path keeps working in place.
    let home = set("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".cache").join("ferry").join("models")
}

/// The default model's path in the cache (it may not be fetched yet).
pub fn default_model_path() -> PathBuf {
    model_dir().join(DEFAULT_MODEL_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn dir(vars: &[(&str, &str)]) -> PathBuf {
        let m: HashMap<String, OsString> = vars.iter().map(|(k, v)| (k.to_string(), OsString::from(v))).collect();
        model_dir_from(|k| m.get(k).cloned())
    }

    #[test]
    fn ferry_model_dir_wins() {
        assert_eq!(dir(&[("FERRY_MODEL_DIR", "/m"), ("XDG_CACHE_HOME", "/x"), ("HOME", "/h")]), PathBuf::from("/m"));
    }

    #[test]
    fn xdg_cache_home_next() {
        assert_eq!(dir(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")]), PathBuf::from("/x/ferry/models"));
    }

    #[test]
    fn home_cache_last() {
        assert_eq!(dir(&[("HOME", "/h")]), PathBuf::from("/h/.cache/ferry/models"));
    }

    #[test]
    fn empty_or_relative_values_are_ignored() {
        assert_eq!(dir(&[("FERRY_MODEL_DIR", ""), ("XDG_CACHE_HOME", "rel"), ("HOME", "/h")]), PathBuf::from("/h/.cache/ferry/models"));
        assert_eq!(dir(&[("XDG_CACHE_HOME", ""), ("HOME", "/h")]), PathBuf::from("/h/.cache/ferry/models"));
    }
}
