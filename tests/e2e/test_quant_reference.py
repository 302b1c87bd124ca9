"""ferry against llama.cpp on each quant type: the default model requantized by
llama.cpp's own quantizer (scripts/reference/quant-reference.py), greedy on fixed prompts.
ferry's tokens must equal llama.cpp's up to the first step where llama.cpp's
top-1 / top-2 logit margin is below NEAR_TIE (past a near-tie two correct
implementations may part ways); the first generated position's top logprobs are
printed beside llama.cpp's (pytest -s, or on failure).

The files and references live in the model cache (quant-reference/); they are
made here when llama-cpp-python is importable, and reused when already there.
Without either, the tests skip saying how to make them, unless
FERRY_REQUIRE_QUANT_REFERENCE=1 (then they fail).

Types ferry cannot load yet are expected failures (xfail, not strict): flip a
type into FERRY_LOADS when its kernels land, and its test must then pass.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from e2e_server import REPO, default_model, ferry_binary, model_cache_dir

pytestmark = pytest.mark.timeout(900)

# The quant types whose every tensor type ferry loads today: flip a type in here
# when its kernels land. What llama.cpp 0.3.36's quantizer really writes for this
# model (576-wide rows are not a multiple of 256, so most tensors fall back;
# norms are F32 in all):
#   Q8_0    Q8_0
#   Q6_K    Q8_0, Q6_K
#   Q4_K_M  Q5_0 (166 tensors), Q4_K, Q6_K, Q8_0
#   Q5_K_M  Q5_1 (166), Q5_K, Q6_K, Q8_0
#   Q3_K_M  Q4_0 (120), Q5_0, Q5_1, Q4_K, Q5_K, Q8_0   (no Q3_K tensor)
#   Q2_K    Q4_0 (180), Q3_K (ffn_down), Q8_0          (no Q2_K tensor)
#   IQ4_XS  IQ4_NL (180), IQ4_XS, Q5_K, Q8_0
FERRY_LOADS = {"Q8_0", "Q6_K", "Q4_K_M", "Q5_K_M", "Q3_K_M", "Q2_K", "IQ4_XS"}
# Files ferry loads whose greedy tokens still leave llama.cpp's before the
# first near-tie, with the reason as far as it is known (an open question,
# not a pass): Q3_K_M's mix differs at 2 of 8 prompts (steps 5 and 8) while
# every type in it passes alone in the other files and in the f64 unit tests.
# Likely cause: its Q4_0 tensors are dotted in another float order than
# llama.cpp's, and on this model reordering one type's float operations
# alone moved greedy text at a margin of 0.19 (docs/performance.md, "What
# llama.cpp's order costs").
KNOWN_DIVERGENT = {"Q3_K_M": "2 of 8 prompts leave llama.cpp at a margin >= 0.25; likely the float order of its Q4_0 tensors"}
TYPES = ["Q8_0", "Q6_K", "Q4_K_M", "Q5_K_M", "Q3_K_M", "Q2_K", "IQ4_XS"]
NEAR_TIE = 0.25

_TOKEN_LINE = re.compile(r"^token\s+(\d+)\s+(\S+)\s+(.*)\s+top \[(.*)\]$")


def _script():
    spec = importlib.util.spec_from_file_location("quant_reference", REPO / "scripts" / "reference" / "quant-reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _reference(qtype: str) -> tuple[Path, dict]:
    qr = _script()
    out_dir = model_cache_dir() / "quant-reference"
    gguf, ref = qr.paths(out_dir, qtype)
    try:
        import llama_cpp  # noqa: F401
        have_llama_cpp = True
    except ImportError:
        have_llama_cpp = False
    if have_llama_cpp:
        qr.build(qtype, default_model(), out_dir)
    elif not (gguf.is_file() and ref.is_file() and json.loads(ref.read_text())["sha256"] == qr.sha256(gguf)):
        how = ("no llama.cpp reference for " + qtype + ": pip install llama-cpp-python==0.3.36 (a source build, "
               "~10 min on 2 cores), then run this again or scripts/reference/quant-reference.py")
        if os.environ.get("FERRY_REQUIRE_QUANT_REFERENCE") == "1":
            pytest.fail(how, pytrace=False)
        pytest.skip(how)
    return gguf, json.loads(ref.read_text())


def _ferry_greedy(gguf: Path, prompt: str, n: int) -> tuple[list[int], list[tuple[int, float]]]:
    """ferry generate, greedy with EOS ignored: the ids and the first step's top-5."""
    cmd = [str(ferry_binary()), "generate", str(gguf), "--prompt", prompt, "--max-tokens", str(n),
           "--ignore-eos", "--logprobs", "5", "--threads", "2", "--kv-cache-memory-bytes", str(16 << 20)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NO_COLOR": "1", "FERRY_LOG": "warn"})
    assert p.returncode == 0, f"ferry could not run {gguf.name}:\n{p.stderr[-3000:]}"
    ids, first_top = [], None
    for line in p.stderr.splitlines():
        m = _TOKEN_LINE.match(line)
        if not m:
            continue
        ids.append(int(m.group(1)))
        if first_top is None:
            first_top = [(int(a), float(b)) for a, b in (x.split(":") for x in m.group(4).split())]
    assert len(ids) == n, f"ferry generated {len(ids)} tokens, not {n}:\n{p.stderr[-2000:]}"
    return ids, first_top


@pytest.mark.parametrize("qtype", [
    pytest.param(t, id=t, marks=[] if t in FERRY_LOADS and t not in KNOWN_DIVERGENT else [
        pytest.mark.xfail(strict=False, reason=KNOWN_DIVERGENT.get(t, f"ferry does not load every tensor type of a {t} file yet"))])
    for t in TYPES
])
def test_greedy_tokens_match_llama_cpp(qtype):
    gguf, ref = _reference(qtype)
    problems = []
    for case in ref["prompts"]:
        want = case["generated_token_ids"]
        got, top = _ferry_greedy(gguf, case["prompt"], len(want))
        # Compared up to (not including) the first near-tie of llama.cpp's.
        upto = next((i for i, m in enumerate(case["margins"]) if m < NEAR_TIE), len(want))
        print(f"\n{qtype} {case['prompt']!r}: equal steps compared {upto}/{len(want)}")
        print("  first position   ferry            llama.cpp")
        for (fi, fl), (li, ll) in zip(top, case["first_top_logprobs"]):
            print(f"    {fi:>7} {fl:>9.4f}   {li:>7} {ll:>9.4f}   {'' if fi == li else 'id differs'}")
        if got[:upto] != want[:upto]:
            k = next(i for i in range(upto) if got[i] != want[i])
            problems.append(f"{case['prompt']!r}: step {k} of {upto} differs: ferry {got[:upto]} llama.cpp {want[:upto]}")
    assert not problems, f"{qtype}: " + "\n".join(problems)
