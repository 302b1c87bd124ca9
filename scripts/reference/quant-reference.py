#!/usr/bin/env python3
"""llama.cpp's reference for each quant type: requantizes the default model with
llama.cpp's own quantizer, runs llama.cpp greedy on fixed prompts, and writes
what ferry is held to (tests/e2e/test_quant_reference.py):

    python3 scripts/reference/quant-reference.py [--types Q4_K_M,Q8_0,...] [--model M.gguf] [--out-dir DIR]

For each type T it writes, into the model cache (the folder scripts/fetch/fetch-model.sh
uses, under quant-reference/):
  SmolLM2-135M-Instruct.T.gguf   the requantized model (llama_model_quantize with
                                 llama_model_quantize_default_params(),
                                 allow_requantize, 2 threads)
  SmolLM2-135M-Instruct.T.json   per prompt: llama.cpp's prompt ids, 32 greedy ids
                                 (EOS ignored), each step's top-1 minus top-2 logit
                                 margin, the first generated position's top-5
                                 natural-log logprobs; and the .gguf's sha256.
A file already there with the same source and llama.cpp version is kept.

Needs llama-cpp-python (pip install llama-cpp-python==0.3.36: a source build,
about 10 minutes on 2 cores) and numpy. Flash attention off, as in
engine/tests/data/llama_cpp/. The default model's 576-wide rows are not a
multiple of 256, so the K and IQ types keep llama.cpp's fallbacks (Q5_0, Q5_1,
Q8_0, IQ4_NL) for most tensors: the files are what llama-quantize really makes.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# llama.cpp's llama_ftype numbers (llama.h) for the types the issue names.
FTYPES = {"Q4_K_M": 15, "Q5_K_M": 17, "Q3_K_M": 12, "Q2_K": 10, "Q6_K": 18, "Q8_0": 7, "IQ4_XS": 30}

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "List of planets in the solar system: Mercury,",
    "In 1969, the first person to walk on the moon",
    "To make a cup of tea, first",
]
MAX_TOKENS = 32
TOP_N = 5


def model_cache_dir() -> Path:
    """engine/src/model/model_cache.rs's rule."""
    if os.environ.get("FERRY_MODEL_DIR"):
        return Path(os.environ["FERRY_MODEL_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg.startswith("/"):
        return Path(xdg) / "ferry" / "models"
    return Path(os.environ.get("HOME", "")) / ".cache" / "ferry" / "models"


def default_model() -> Path:
    if os.environ.get("FERRY_TEST_MODEL"):
        return Path(os.environ["FERRY_TEST_MODEL"])
    out = subprocess.run([str(REPO / "scripts" / "fetch" / "fetch-model.sh")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def paths(out_dir: Path, qtype: str) -> tuple[Path, Path]:
    stem = f"SmolLM2-135M-Instruct.{qtype}"
    return out_dir / f"{stem}.gguf", out_dir / f"{stem}.json"


def quantize(src: Path, dst: Path, qtype: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[qtype]
    params.allow_requantize = True
    params.nthread = 2
    # Written under a private name and renamed: a killed run leaves no partial file.
    part = dst.with_name(f"{dst.name}.part-{os.getpid()}")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(part).encode(), ctypes.byref(params))
    if rc != 0:
        part.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize {qtype} failed with {rc}")
    os.replace(part, dst)


def no_weight_repacking() -> None:
    """Turns off llama.cpp's extra CPU buffer types (weight repacking, AMX): a
    llama-cpp-python built with -march=native crashes in its AMX matmul on the
    first decode on these Xeons (../shared/FIELD-NOTES.md); the plain CPU path
    computes the same types."""
    import llama_cpp.llama_cpp as C

    if getattr(C.llama_model_default_params, "_ferry_patched", False):
        return
    orig = C.llama_model_default_params

    def params():
        p = orig()
        p.use_extra_bufts = False
        return p

    params._ferry_patched = True
    C.llama_model_default_params = params


def greedy(model: Path) -> list[dict]:
    import llama_cpp
    import numpy as np

    no_weight_repacking()
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=256, n_threads=2, n_threads_batch=2, logits_all=True,
                          flash_attn=False, verbose=False, seed=0)
    out = []
    for prompt in PROMPTS:
        # As ferry tokenizes a text prompt: BOS only where the vocabulary adds it.
        ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        llm.reset()
        llm.eval(ids)
        gen, margins, first_top = [], [], None
        for step in range(MAX_TOKENS):
            logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            order = np.argsort(-logits, kind="stable")
            margins.append(round(float(logits[order[0]] - logits[order[1]]), 5))
            if step == 0:
                mx = logits.max()
                lse = mx + np.log(np.exp(logits - mx).sum())
                first_top = [[int(i), round(float(logits[i] - lse), 5)] for i in order[:TOP_N]]
            tok = int(order[0])
            gen.append(tok)
            llm.eval([tok])
        out.append({"prompt": prompt, "prompt_token_ids": [int(i) for i in ids], "generated_token_ids": gen,
                    "margins": margins, "first_top_logprobs": first_top})
    del llm
    return out


def build(qtype: str, src: Path | None = None, out_dir: Path | None = None) -> Path:
    """Makes (or keeps) the type's .gguf and .json; returns the .json's path."""
    import llama_cpp

    src = src or default_model()
    out_dir = out_dir or model_cache_dir() / "quant-reference"
    out_dir.mkdir(parents=True, exist_ok=True)
    gguf, ref = paths(out_dir, qtype)
    src_sha = sha256(src)
    if ref.is_file() and gguf.is_file():
        old = json.loads(ref.read_text())
        if (old.get("source_sha256") == src_sha and old.get("llama_cpp_python") == llama_cpp.__version__
                and old.get("sha256") == sha256(gguf)):
            return ref
    quantize(src, gguf, qtype)
    data = {
        "type": qtype, "ftype": FTYPES[qtype], "sha256": sha256(gguf), "source": src.name, "source_sha256": src_sha,
        "llama_cpp_python": llama_cpp.__version__, "max_tokens": MAX_TOKENS, "ignore_eos": True,
        "prompts": greedy(gguf),
    }
    part = ref.with_name(f"{ref.name}.part-{os.getpid()}")
    part.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(part, ref)
    return ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default=",".join(FTYPES), help="comma-separated, of " + ", ".join(FTYPES))
    ap.add_argument("--model", type=Path, help="the source GGUF (default: the default model)")
    ap.add_argument("--out-dir", type=Path, help="default: <model cache>/quant-reference")
    a = ap.parse_args()
    for t in a.types.split(","):
        if t not in FTYPES:
            sys.exit(f"unknown type {t} (known: {', '.join(FTYPES)})")
        print(build(t, a.model, a.out_dir))


if __name__ == "__main__":
    main()
