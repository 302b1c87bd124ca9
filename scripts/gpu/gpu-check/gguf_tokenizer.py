#!/usr/bin/env python3
"""Writes the default model's tokenizer as a Hugging Face tokenizer folder
(tokenizer.json, tokenizer_config.json), read from its GGUF file, for the GPU
check's random SmolLM2-shaped model (the GGUF itself, 98 MB, is too big to
carry). Byte-level BPE with the GGUF's vocabulary, merges and special tokens;
digits split one by one, as SmolLM2's own tokenizer does. Both transformers
and ferry then read this same file, which is what the comparison needs.

  gguf_tokenizer.py MODEL.gguf OUT_DIR      (needs PyPI gguf and tokenizers)
"""
import json
import sys
from pathlib import Path

from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers


def field(r, key):
    f = r.fields.get(key)
    if f is None:
        return None
    if len(f.data) == 1:
        v = f.parts[f.data[0]]
        return bytes(v).decode() if v.dtype.kind == "u" and v.itemsize == 1 and len(v) != 1 else v[0].item()
    return [bytes(f.parts[i]).decode() if f.parts[i].dtype.kind == "u" and f.parts[i].itemsize == 1 else f.parts[i][0].item() for i in f.data]


def main():
    src, out = sys.argv[1], Path(sys.argv[2])
    r = GGUFReader(src)
    tokens = field(r, "tokenizer.ggml.tokens")
    merges = field(r, "tokenizer.ggml.merges")
    types = field(r, "tokenizer.ggml.token_type")
    assert field(r, "tokenizer.ggml.model") == "gpt2", "only byte-level BPE (gpt2) GGUF tokenizers"
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], ignore_merges=False)
    tk = Tokenizer(bpe)
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    special = [t for t, ty in zip(tokens, types) if ty == 3]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    out.mkdir(parents=True, exist_ok=True)
    tk.save(str(out / "tokenizer.json"))
    bos, eos = tokens[field(r, "tokenizer.ggml.bos_token_id")], tokens[field(r, "tokenizer.ggml.eos_token_id")]
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": eos,
           "add_bos_token": False, "model_max_length": 8192}
    template = field(r, "tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    print(f"{len(tokens)} tokens, {len(merges)} merges, {len(special)} special -> {out}")


if __name__ == "__main__":
    main()
