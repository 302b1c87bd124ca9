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

/// Read a text file; `action` names what is read in the error ("read
/// certificate file").
pub(crate) fn read_text(path: &Path, action: &'static str) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Io {
        action,
        path: path.to_path_buf(),
        source,
    })
}

/// Write through a temporary file and a rename, so a concurrent start never
/// reads half a file. Replaces `path` if it exists.
pub(crate) fn write_atomic(path: &Path, data: &[u8], secret: bool) -> Result<(), CertError> {
    let tmp = write_temp(path, data, secret)?;
    fs::rename(&tmp, path).map_err(|source| {
        let _ = fs::remove_file(&tmp);
        write_err(path, source)
    })
}

/// Like [`write_atomic`], but never replaces an existing file: the complete
/// temporary file is hard-linked to `path`, which fails when `path` exists,
/// even when another process creates it at the same moment.
pub(crate) fn write_new_atomic(path: &Path, data: &[u8], secret: bool) -> Result<(), CertError> {
    let tmp = write_temp(path, data, secret)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    linked.map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            CertError::Exists {
                path: path.to_path_buf(),
            }
        } else {
            write_err(path, source)
        }
    })
}

fn write_err(path: &Path, source: std::io::Error) -> CertError {
    CertError::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    }
}

/// Write `data` to a fresh temporary file beside `path` (mode 0600 when
/// `secret`) and flush it to disk; returns the temporary file's path.
fn write_temp(path: &Path, data: &[u8], secret: bool) -> Result<PathBuf, CertError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    // A leftover from a crashed run would keep its old mode: start afresh.
    let _ = fs::remove_file(&tmp);
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let written = opts.open(&tmp).and_then(|mut f| {
        f.write_all(data)?;
        f.sync_all()
    });
    if let Err(source) = written {
        let _ = fs::remove_file(&tmp);
        return Err(write_err(path, source));
    }
    Ok(tmp)
}
