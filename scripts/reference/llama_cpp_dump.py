#!/usr/bin/env python3
"""Dump llama.cpp's intermediate tensors for one prompt, for scripts/compare_dumps.py.

Runs the prompt through llama-cpp-python's low-level API with an eval callback
(cb_eval) that copies every f32/f16 tensor of the graph as it is computed, and
saves them to an .npz keyed by ggml's tensor names (a name seen again gets #2,
#3...: "Qcur-0#3" is layer 0's Q after rope). Flash attention is off, as in
../shared/reference/.

    python scripts/reference/llama_cpp_dump.py MODEL.gguf '[504, 3575, 282]' out.npz

Needs llama-cpp-python (see scripts/bench/bench_llama_cpp_engine.py) and numpy.
"""
import ctypes
import json
import sys

import llama_cpp as L
import numpy as np

GGML_MAX_DIMS, GGML_MAX_OP_PARAMS, GGML_MAX_SRC, GGML_MAX_NAME = 4, 64, 10, 64


class GgmlTensor(ctypes.Structure):
    """struct ggml_tensor's leading fields (ggml.h), as far as `name`."""
    _fields_ = [
        ("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS), ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p), ("name", ctypes.c_char * GGML_MAX_NAME),
    ]


def main():
    model_path, ids, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    dumps = {}

    def on_tensor(t, ask, _user):
        if ask:
            return True  # yes, show me every tensor
        tt = ctypes.cast(t, ctypes.POINTER(GgmlTensor)).contents
        dtype = {0: np.float32, 1: np.float16}.get(tt.type)
        if dtype is None:
            return True  # quantized tensors are weights, not activations
        ne, nb = list(tt.ne), list(tt.nb)
        size = sum((n - 1) * s for n, s in zip(ne, nb)) + np.dtype(dtype).itemsize
        raw = bytes((ctypes.c_char * size).from_address(tt.data))
        a = np.ndarray(shape=ne[::-1], dtype=dtype, buffer=raw, strides=nb[::-1])
        name, k = tt.name.decode(), 1
        key = name
        while key in dumps:
            k += 1
            key = f"{name}#{k}"
        dumps[key] = a.astype(np.float32).squeeze()
        return True

    callback = L.ggml_backend_sched_eval_callback(on_tensor)
    L.llama_backend_init()
    model = L.llama_model_load_from_file(model_path.encode(), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_threads, cp.n_threads_batch = 512, 512, 2, 2
    cp.flash_attn_type = 0
    cp.cb_eval = callback
    ctx = L.llama_init_from_model(model, cp)
    tokens = (L.llama_token * len(ids))(*ids)
    if L.llama_decode(ctx, L.llama_batch_get_one(tokens, len(ids))) != 0:
        sys.exit("llama_decode failed")
    np.savez(out, **dumps)
    print(f"{len(dumps)} tensors -> {out}")


if __name__ == "__main__":
    main()
