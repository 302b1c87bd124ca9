#!/usr/bin/env python3
"""Line up ferry's intermediate tensors (FERRY_DUMP_DIR) with llama.cpp's
(scripts/reference/llama_cpp_dump.py), op by op, to find where two runs of the same
prompt part ways: each row gives the largest difference, how many values
differ, and whether the tensors are bit-equal.

    FERRY_DUMP_DIR=ours ferry generate MODEL --prompt "..." --max-tokens 1
    python scripts/reference/llama_cpp_dump.py MODEL '[ids]' ref.npz
    python scripts/reference/compare_dumps.py ref.npz ours [layers, e.g. 0,1,29]

The prompt must go through in one step (ferry's dumps keep the last step's).
"""
import os
import sys

import numpy as np

# ferry's name -> llama.cpp's (per layer).
PAIRS = [("attn_norm", "attn_norm-{}"), ("Qcur", "Qcur-{}"), ("Kcur", "Kcur-{}"), ("Vcur", "Vcur-{}"),
         ("Qrope", "Qcur-{}#3"), ("Krope", "Kcur-{}#3"), ("kqv_out", "kqv_out-{}"), ("attn_out", "attn_out-{}"),
         ("ffn_inp", "ffn_inp-{}"), ("ffn_norm", "ffn_norm-{}"), ("ffn_gate", "ffn_gate-{}"), ("ffn_up", "ffn_up-{}"),
         ("ffn_swiglu", "ffn_swiglu-{}"), ("ffn_out", "ffn_out-{}"), ("l_out", "l_out-{}")]


def main():
    ref, ours_dir = np.load(sys.argv[1]), sys.argv[2]
    layers = [int(x) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else [0]

    def ours(name, layer):
        return np.fromfile(os.path.join(ours_dir, f"{name}-{layer}.f32"), dtype=np.float32)

    def row(label, a, b):
        a, b = a.ravel(), b.ravel()
        if a.shape != b.shape:
            # llama.cpp skips unused rows in the last layer; compare the last token.
            n = b.size
            a = a[-n:]
        d = np.abs(a.astype(np.float64) - b)
        print(f"{label:14s} max|diff| {d.max():.3e}  rel {d.max() / (np.abs(b).max() + 1e-30):.2e}  "
              f"differ {np.count_nonzero(d)}/{d.size}  {'bit-equal' if np.array_equal(a, b) else ''}")

    row("embd", ours("embd", 0), ref["embd"])
    for layer in layers:
        print(f"layer {layer}")
        for mine, theirs in PAIRS:
            key = theirs.format(layer)
            if key in ref.files:
                row(mine, ours(mine, layer), ref[key])
    row("result_norm", ours("result_norm", 0), ref["result_norm"])
    logits, want = ours("result_output", 0), ref["result_output"]
    row("result_output", logits, want)

    def logsoftmax(x):
        x = x.astype(np.float64) - x.max()
        return x - np.log(np.exp(x).sum())

    lo, lr = logsoftmax(logits[-want.size:]), logsoftmax(want)
    top = np.argsort(-lr)[:5]
    print("top-5 ids", top.tolist(), "llama.cpp", np.round(lr[top], 4).tolist(), "ferry", np.round(lo[top], 4).tolist())


if __name__ == "__main__":
    main()
