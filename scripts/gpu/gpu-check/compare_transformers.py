#!/usr/bin/env python3
"""ferry's CUDA backend against transformers on the same weights (GPU check).

  compare_transformers.py prompts MODEL PROMPTS_JSON [--new-tokens N]
      tokenizes the check's prompts with the model's tokenizer -> PROMPTS_JSON
  compare_transformers.py engine MODEL PROMPTS_JSON FERRY_JSON
      judges ferry's first-step logits and greedy tokens (cuda::gpu_tests)
  compare_transformers.py serve MODEL BASE_URL [--new-tokens N]
      judges `ferry serve --device cuda`'s greedy completions over HTTP (as text)

Each judgement prints one `RESULT <name> PASS|FAIL <what>` line. The
reference is transformers' LlamaForCausalLM in bf16 on the GPU (eager
attention), greedy. Logits may differ by bf16 rounding (different GEMM
kernels, attention in another order); tokens may differ only where
transformers' own top two were within that rounding (a near-tie), after
which the two sequences are different texts and no longer compared.
"""
import argparse
import json
import sys
import urllib.request

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away,",
    "1, 2, 3, 4, 5,",
    "Translate to German: I would like a cup of coffee.",
    "The three laws of thermodynamics are",
]
NEAR_TIE = 0.25  # logit gap below which bf16 rounding may reorder the top two


def load(model_dir):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16, attn_implementation="eager").cuda().eval()
    return tok, model


def reference(model, ids, n):
    """transformers' first-step logits (f32) and greedy tokens, with each step's top-2 gap."""
    import torch
    with torch.no_grad():
        x = torch.tensor([ids], device="cuda")
        out = model(x, use_cache=True)
        first = out.logits[0, -1].float()
        past = out.past_key_values
        tokens, gaps = [], []
        logits = first
        for _ in range(n):
            top = torch.topk(logits, 2)
            tokens.append(int(top.indices[0]))
            gaps.append(float(top.values[0] - top.values[1]))
            out = model(torch.tensor([[tokens[-1]]], device="cuda"), past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float()
    return first, tokens, gaps


def judge_tokens(got, want, gaps):
    """(equal prefix length, diverged at a near-tie?)"""
    k = 0
    while k < min(len(got), len(want)) and got[k] == want[k]:
        k += 1
    return k, k < len(want) and k < len(got) and gaps[k] < NEAR_TIE


def result(name, ok, what):
    print(f"RESULT {name} {'PASS' if ok else 'FAIL'} {what}", flush=True)
    return ok


def cmd_prompts(a):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(a.model)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    json.dump({"prompts": ids, "new_tokens": a.new_tokens, "texts": PROMPTS}, open(a.out, "w"))
    print(f"{len(ids)} prompts, {a.new_tokens} new tokens each -> {a.out}")
    return 0


def cmd_engine(a):
    import torch
    spec = json.load(open(a.prompts))
    ferry = json.load(open(a.ferry))
    tok, model = load(a.model)
    n = spec["new_tokens"]
    ok = True
    worst_err, worst_rel, top1, exact, tie_div, bad = 0.0, 0.0, 0, 0, 0, []
    for i, ids in enumerate(spec["prompts"]):
        first, want, gaps = reference(model, ids, n)
        got_first = torch.tensor(ferry["graphs"]["first_logits"][i], device="cuda")
        err = float((got_first - first).abs().max())
        worst_err = max(worst_err, err)
        worst_rel = max(worst_rel, err / float(first.std()))
        top1 += int(torch.argmax(got_first)) == int(torch.argmax(first)) or gaps[0] < NEAR_TIE
        k, tie = judge_tokens(ferry["graphs"]["tokens"][i], want, gaps)
        if k == n:
            exact += 1
        elif tie:
            tie_div += 1
        else:
            bad.append(f"prompt {i}: {k}/{n} equal, then {ferry['graphs']['tokens'][i][k]} vs {want[k]} (gap {gaps[k]:.3f})")
    m = len(spec["prompts"])
    ok &= result("logits", worst_rel < 0.05 and top1 == m,
                 f"first-step logits: max |ferry - transformers| {worst_err:.4f} ({worst_rel:.4f} of the logits' std), top-1 equal {top1}/{m}")
    ok &= result("greedy", not bad,
                 f"{exact}/{m} prompts equal for all {n} tokens, {tie_div} diverged at a near-tie (gap < {NEAR_TIE}){'; ' + bad[0] if bad else ''}")
    return 0 if ok else 1


def cmd_serve(a):
    """ferry's completion text against the text of transformers' greedy tokens
    (ferry's API returns text, not ids): the number of reference tokens whose
    decoded text ferry's text begins with is where the two part."""
    tok, model = load(a.model)
    ok_all, lines = True, []
    equal = tie = 0
    for i, text in enumerate(PROMPTS):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        body = json.dumps({"model": "m", "prompt": ids, "max_tokens": a.new_tokens, "temperature": 0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(a.base_url.rstrip("/") + "/v1/completions", body, {"Content-Type": "application/json"})
        got = json.load(urllib.request.urlopen(req, timeout=60))["choices"][0]["text"]
        _, want, gaps = reference(model, ids, a.new_tokens)
        k = 0
        while k < len(want) and got.startswith(tok.decode(want[:k + 1])):
            k += 1
        if k == len(want) and got == tok.decode(want):
            equal += 1
        elif k < len(want) and gaps[k] < NEAR_TIE:
            tie += 1
        else:
            ok_all = False
            lines.append(f"prompt {i}: {k}/{len(want)} tokens equal")
    return 0 if result("serve", ok_all, f"{equal}/{len(PROMPTS)} completions equal transformers' greedy text, {tie} diverged at a near-tie"
                       + (f"; {lines[0]}" if lines else "")) else 1


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts"); p.add_argument("model"); p.add_argument("out"); p.add_argument("--new-tokens", type=int, default=24)
    e = sub.add_parser("engine"); e.add_argument("model"); e.add_argument("prompts"); e.add_argument("ferry")
    s = sub.add_parser("serve"); s.add_argument("model"); s.add_argument("base_url"); s.add_argument("--new-tokens", type=int, default=24)
    a = ap.parse_args()
    return {"prompts": cmd_prompts, "engine": cmd_engine, "serve": cmd_serve}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
