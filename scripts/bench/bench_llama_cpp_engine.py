#!/usr/bin/env python3
"""llama.cpp's side of `scripts/bench/bench_engine.sh`: the same figures ferry's
`ferry bench engine` reports, measured through llama.cpp's own batched API
(llama-cpp-python's low-level bindings), on the same GGUF and thread count.

- prompt tokens/s: one prompt of --prompt-len tokens decoded as one batch;
- decode tokens/s at concurrency N: N sequences with short distinct prompts,
  each then decoding --decode-len tokens, one token per sequence per llama_decode
  call (llama.cpp's continuous-batching server does the same), greedy argmax.

Prints one JSON object. Flash attention is off, as in ../shared/reference.
"""
import argparse, ctypes, json, time

import llama_cpp
import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-len", type=int, default=64)
    ap.add_argument("--short-prompt-len", type=int, default=16)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    levels = [int(x) for x in a.concurrency.split(",")]
    max_seqs = max(levels)

    llama_cpp.llama_backend_init()
    llama_cpp.llama_log_set(ctypes.cast(None, llama_cpp.llama_log_callback), None) if hasattr(llama_cpp, "llama_log_callback") else None
    mp = llama_cpp.llama_model_default_params()
    # No extra CPU buffer types (weight repacking, AMX): a llama-cpp-python
    # built with -march=native crashes in its AMX matmul on these Xeons
    # (../shared/FIELD-NOTES.md); the plain CPU path computes the same types.
    if hasattr(mp, "use_extra_bufts"):
        mp.use_extra_bufts = False
    model = llama_cpp.llama_model_load_from_file(a.model.encode(), mp)
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = max(a.prompt_len + a.decode_len + 8, (a.short_prompt_len + a.decode_len + 8) * max_seqs)
    cp.n_batch = max(512, a.prompt_len, max_seqs * a.short_prompt_len)
    cp.n_ubatch = cp.n_batch
    cp.n_seq_max = max_seqs
    cp.n_threads = a.threads
    cp.n_threads_batch = a.threads
    cp.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.kv_unified = True
    ctx = llama_cpp.llama_init_from_model(model, cp)
    mem = llama_cpp.llama_get_memory(ctx)
    batch = llama_cpp.llama_batch_init(cp.n_batch, 0, max_seqs)
    rng = np.random.default_rng(0)

    def fill(entries):
        for i, (tok, pos, seq, want) in enumerate(entries):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = want
        batch.n_tokens = len(entries)
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise SystemExit(f"llama_decode failed: {rc}")

    def argmax(i):
        p = llama_cpp.llama_get_logits_ith(ctx, i)
        return int(np.ctypeslib.as_array(p, shape=(n_vocab,)).argmax())

    def prompt_rate():
        best = 0.0
        for _ in range(a.repeats):
            llama_cpp.llama_memory_clear(mem, True)
            toks = rng.integers(100, n_vocab - 100, a.prompt_len).tolist()
            t = time.perf_counter()
            fill([(tok, p, 0, p == len(toks) - 1) for p, tok in enumerate(toks)])
            argmax(len(toks) - 1)
            best = max(best, a.prompt_len / (time.perf_counter() - t))
        return best

    def decode_rate(n):
        best = 0.0
        for _ in range(a.repeats):
            llama_cpp.llama_memory_clear(mem, True)
            entries = []
            for s in range(n):
                toks = rng.integers(100, n_vocab - 100, a.short_prompt_len).tolist()
                entries += [(tok, p, s, p == len(toks) - 1) for p, tok in enumerate(toks)]
            fill(entries)
            last = [argmax(s * a.short_prompt_len + a.short_prompt_len - 1) for s in range(n)]
            t = time.perf_counter()
            for step in range(a.decode_len):
                pos = a.short_prompt_len + step
                fill([(last[s], pos, s, True) for s in range(n)])
                last = [argmax(s) for s in range(n)]
            best = max(best, n * a.decode_len / (time.perf_counter() - t))
        return best

    out = {
        "engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
        "threads": a.threads,
        "prompt_tokens_per_s": prompt_rate(),
        "decode_tokens_per_s": {str(n): decode_rate(n) for n in levels},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
