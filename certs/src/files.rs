//! Files: where the state directory is, and writing files atomically.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::CertError;

/// Where the self-signed certificate lives by default: `$FERRY_STATE_DIR/certs`,
/// else `$XDG_STATE_HOME/ferry/certs`, else `~/.local/state/ferry/certs`.
/// None when none of these can be found (no HOME).
pub fn default_state_dir() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = env("FERRY_STATE_DIR") {
        return Some(d.join("certs"));
    }
    if let Some(d) = env("XDG_STATE_HOME") {
        return Some(d.join("ferry").join("certs"));
    }
    env("HOME").map(|h| h.join(".local/state/ferry/certs"))
}

/// Create `dir` and its parents.
pub(crate) fn create_dir(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(|source| CertError::Io {
        action: "create directory",
        path: dir.to_path_buf(),
        source,
    })
}

/// Write through a temporary file and a rename, so a concurrent start never
/// reads half a file.
pub(crate) fn write_atomic(path: &Path, data: &[u8], secret: bool) -> Result<(), CertError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let io_err = |action, source| CertError::Io {
        action,
        path: path.to_path_buf(),
        source,
    };
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = opts.open(&tmp).map_err(|e| io_err("write", e))?;
    f.write_all(data).map_err(|e| io_err("write", e))?;
    f.sync_all().map_err(|e| io_err("write", e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| io_err("write", e))
}
