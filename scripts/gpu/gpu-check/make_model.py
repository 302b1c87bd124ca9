#!/usr/bin/env python3
"""Makes a random Llama-family model with transformers, for the GPU check.

  make_model.py OUT TOKENIZER_DIR --shape smollm2     # weights (bf16 safetensors) + config + tokenizer
  make_model.py OUT TOKENIZER_DIR --shape llama3-8b --config-only   # for `--load-format dummy`

smollm2 is the default model's shape (SmolLM2-135M: hidden 576, 30 layers, 9
heads, 3 KV heads, intermediate 1536, vocab 49152, tied embeddings). Weights
are drawn with a fixed seed and a wider init than transformers' default
(std 0.05), so greedy picks are rarely near-ties. Runs on the GPU machine
(torch, transformers; no network).
"""
import argparse
import shutil
import sys
from pathlib import Path

SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
}


def config(shape):
    from transformers import LlamaConfig
    return LlamaConfig(**SHAPES[shape], initializer_range=0.05, torch_dtype="bfloat16",
                       bos_token_id=1, eos_token_id=2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("tokenizer")
    ap.add_argument("--shape", choices=SHAPES, default="smollm2")
    ap.add_argument("--config-only", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(a.tokenizer).iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    cfg = config(a.shape)
    if a.config_only:
        cfg.save_pretrained(out)
        print(f"config of {a.shape} written to {out}")
        return 0
    import torch
    from transformers import LlamaForCausalLM
    torch.manual_seed(20261206)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    print(f"random {a.shape} ({n / 1e6:.1f}M parameters, bf16) written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
