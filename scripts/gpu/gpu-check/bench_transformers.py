#!/usr/bin/env python3
"""The GPU check's yardsticks for `ferry bench engine --device cuda`:

- the HBM floor of batch-1 decode: bytes of weights read per token over the
  device's measured copy bandwidth (a 2 GiB device-to-device copy, bytes read
  plus bytes written per second), i.e. the fastest a token can come if every
  weight is read once from HBM;
- transformers' `generate` with a static KV cache on the same shape (random
  bf16 weights, greedy, eager PyTorch, no torch.compile), at each batch size:
  prefill of `--prompt-len` random tokens, then `--decode-len` tokens, decode
  throughput = batch × (decode_len - 1) / (time of the whole generate - time
  of a 1-token generate).

  bench_transformers.py CONFIG_DIR --batches 1,16,64,256 [--prompt-len 128] [--decode-len 64]

Prints one JSON line per measurement and a summary line `RESULT bench-hf ...`.
"""
import argparse
import json
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-len", type=int, default=64)
    a = ap.parse_args()
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    dev = torch.device("cuda")
    # Copy bandwidth.
    n = 2 << 30
    x = torch.empty(n, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    reps = 10
    for _ in range(reps):
        y.copy_(x)
    e.record()
    torch.cuda.synchronize()
    bw = 2 * n * reps / (s.elapsed_time(e) / 1e3)
    del x, y
    cfg = AutoConfig.from_pretrained(a.config)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # Batch-1 decode reads every weight once per token (tied embeddings count once).
    floor_ms = wbytes / bw * 1e3
    print(json.dumps({"copy_bandwidth_GBps": bw / 1e9, "weight_bytes": wbytes, "hbm_floor_ms_per_token": floor_ms}), flush=True)
    results = {}
    for b in [int(v) for v in a.batches.split(",")]:
        ids = torch.randint(100, cfg.vocab_size - 100, (b, a.prompt_len), device=dev)
        mask = torch.ones_like(ids)
        kw = dict(attention_mask=mask, do_sample=False, cache_implementation="static", pad_token_id=0)

        def timed(new):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
            torch.cuda.synchronize()
            return time.perf_counter() - t

        timed(2)  # warm-up
        t1 = timed(1)
        tn = timed(a.decode_len)
        tok_s = b * (a.decode_len - 1) / max(tn - t1, 1e-9)
        results[b] = tok_s
        print(json.dumps({"batch": b, "prefill_s": t1, "generate_s": tn, "decode_tok_per_s": tok_s,
                          "ms_per_step": (tn - t1) / (a.decode_len - 1) * 1e3}), flush=True)
    summary = ", ".join(f"b{b} {v:.0f} tok/s" for b, v in results.items())
    print(f"RESULT bench-hf PASS transformers static-cache decode: {summary}; HBM floor {floor_ms:.2f} ms/token "
          f"({wbytes / 1e9:.1f} GB of weights at {bw / 1e9:.0f} GB/s copy bandwidth)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
