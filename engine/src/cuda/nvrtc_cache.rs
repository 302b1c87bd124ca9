//! NVRTC's output kept on disk, so a restart does not compile the kernels again.
//!
//! Key: SHA-256 of the full kernel source, the target architecture, NVRTC's
//! version and the compile options; one PTX file per key under
//! `$FERRY_CACHE_DIR/kernels`, else `$XDG_CACHE_HOME/ferry/kernels`, else
//! `~/.cache/ferry/kernels`. Files are written to a temporary name and
//! renamed, so a reader never sees half a file; an unreadable or unwritable
//! cache only costs a compile (logged), never a start-up.

use sha2::{Digest, Sha256};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The kernel cache folder, from the environment (`env` is `std::env::var_os`
/// outside tests).
pub fn cache_dir_from(env: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(d) = set("FERRY_CACHE_DIR") {
        return PathBuf::from(d).join("kernels");
    }
    if let Some(x) = set("XDG_CACHE_HOME").map(PathBuf::from).filter(|p| p.is_absolute()) {
        return x.join("ferry").join("kernels");
    }
    set("HOME").map(PathBuf::from).unwrap_or_default().join(".cache").join("ferry").join("kernels")
}

/// The kernel cache folder of this process: [`cache_dir_from`] over the real
/// environment.
pub fn cache_dir() -> PathBuf {
    cache_dir_from(|k| std::env::var_os(k))
}

/// The cache key of one compile.
pub fn key(source: &str, arch: &str, nvrtc_version: (i32, i32), options: &[String]) -> String {
    let mut h = Sha256::new();
    for part in [source, arch, &format!("{}.{}", nvrtc_version.0, nvrtc_version.1), &options.join("\u{1f}")] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Where one compile did or did not come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Read from the cache folder: no compile.
    Cache,
    /// Compiled by NVRTC now (and stored, unless the folder could not be written).
    Compiled,
}

/// The PTX for `source`: from `dir` when there, else `compile`d and stored.
/// `name` only names the file for a reader (`<name>-<key>.ptx`).
pub fn compile_cached(
    dir: &Path,
    name: &str,
    source: &str,
    arch: &str,
    nvrtc_version: (i32, i32),
    options: &[String],
    compile: impl FnOnce() -> Result<String, String>,
) -> Result<(String, Origin), String> {
    let k = key(source, arch, nvrtc_version, options);
    let path = dir.join(format!("{}-{}.ptx", name.trim_end_matches(".cu"), &k[..32]));
    if let Ok(ptx) = std::fs::read_to_string(&path) {
        if ptx.contains(".entry") || ptx.contains(".version") {
            return Ok((ptx, Origin::Cache));
        }
    }
    let ptx = compile()?;
    if let Err(e) = store(dir, &path, &ptx) {
        tracing::warn!("could not keep compiled kernel {name} in {}: {e}", dir.display());
    }
    Ok((ptx, Origin::Compiled))
}

fn store(dir: &Path, path: &Path, ptx: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, ptx)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    const PTX: &str = ".version 9.0\n.target sm_90\n.entry k(\n)";

    #[test]
    fn a_second_start_reads_the_cache_and_any_change_recompiles() {
        let dir = tempfile::tempdir().unwrap();
        let calls = Cell::new(0);
        let compile = || {
            calls.set(calls.get() + 1);
            Ok(PTX.to_string())
        };
        let opts = vec!["--std=c++17".to_string()];
        let run = |src: &str, arch: &str, v: (i32, i32), o: &[String]| {
            compile_cached(dir.path(), "k.cu", src, arch, v, o, compile).unwrap()
        };
        assert_eq!(run("src", "sm_90", (13, 0), &opts), (PTX.to_string(), Origin::Compiled));
        assert_eq!(run("src", "sm_90", (13, 0), &opts), (PTX.to_string(), Origin::Cache));
        assert_eq!(calls.get(), 1);
        // Source, architecture, NVRTC version and options each change the key.
        assert_eq!(run("src2", "sm_90", (13, 0), &opts).1, Origin::Compiled);
        assert_eq!(run("src", "sm_100", (13, 0), &opts).1, Origin::Compiled);
        assert_eq!(run("src", "sm_90", (13, 1), &opts).1, Origin::Compiled);
        assert_eq!(run("src", "sm_90", (13, 0), &[]).1, Origin::Compiled);
        assert_eq!(calls.get(), 5);
        // A damaged file is compiled over.
        for f in std::fs::read_dir(dir.path()).unwrap() {
            std::fs::write(f.unwrap().path(), "garbage").unwrap();
        }
        assert_eq!(run("src", "sm_90", (13, 0), &opts).1, Origin::Compiled);
        assert_eq!(run("src", "sm_90", (13, 0), &opts).1, Origin::Cache);
    }

    #[test]
    fn errors_pass_through_and_an_unwritable_cache_still_compiles() {
        let dir = tempfile::tempdir().unwrap();
        let e = compile_cached(dir.path(), "k", "s", "sm_90", (13, 0), &[], || Err("syntax error".into())).unwrap_err();
        assert_eq!(e, "syntax error");
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "").unwrap();
        let r = compile_cached(&file, "k", "s", "sm_90", (13, 0), &[], || Ok(PTX.into())).unwrap();
        assert_eq!(r.1, Origin::Compiled);
    }

    #[test]
    fn the_folder_follows_the_environment() {
        let dir = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            cache_dir_from(move |k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| OsString::from(v)))
        };
        assert_eq!(dir(&[("FERRY_CACHE_DIR", "/c"), ("HOME", "/h")]), PathBuf::from("/c/kernels"));
        assert_eq!(dir(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")]), PathBuf::from("/x/ferry/kernels"));
        assert_eq!(dir(&[("XDG_CACHE_HOME", "rel"), ("HOME", "/h")]), PathBuf::from("/h/.cache/ferry/kernels"));
        assert_ne!(key("a", "sm_90", (13, 0), &[]), key("a", "sm_90", (13, 0), &["x".into()]));
        assert_eq!(key("a", "sm_90", (13, 0), &[]).len(), 64);
    }
}
