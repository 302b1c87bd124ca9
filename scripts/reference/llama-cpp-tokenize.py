#!/usr/bin/env python3
"""llama.cpp's own tokenization of a fixed, varied set of texts on each of its
vocab-only files (ggml-vocab-*.gguf from the llama-cpp-python sdist, see
scripts/fetch/fetch-llama-cpp-vocabs.sh), written as JSON for
engine/tests/llama_cpp_vocabs.rs, which holds ferry's tokenizers to it.

    python3 scripts/reference/llama-cpp-tokenize.py VOCAB_DIR engine/tests/data/llama_cpp/vocab_texts.json

Needs llama-cpp-python (vocab_only: no weights are loaded). Tokenized as
llama.cpp's server tokenizes a prompt: no BOS added, special tokens parsed.
"""
import json
import sys

import llama_cpp

STEMS = ["llama-spm", "phi-3", "llama-bpe", "qwen2", "gpt-2", "starcoder", "refact", "command-r", "mpt", "falcon"]

TEXTS = [
    "",
    " ",
    "Hello world",
    " Hello world",
    "   leading spaces and trailing   ",
    "line one\nline two\r\nline three\n\n\n",
    "\t\ttabs\tand\t \tspaces  \n  \n",
    "1 12 123 1234 12345 123456 1234567 3.14159 1,000,000 2e-10 0x1F 007",
    "int main(void) {\n    for (int i = 0; i < 10; ++i) printf(\"%d\\n\", i);\n    return 0;\n}\n",
    "def f(x):\n\treturn [y ** 2 for y in x if y % 2 == 0]  # comment\n",
    '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}',
    "https://example.com/path?q=a+b&x=%20#frag user@example.org",
    "I'm sure you'll see they've said he'd go, WE'LL SEE, I'M DONE, 'quoted'",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "我想在apple工作1314151天～ 你好，世界。",
    "日本語のテキスト、カタカナとひらがな。ｶﾀｶﾅ",
    "한국어 텍스트입니다.",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "กรุงเทพมหานคร",
    "Ελληνικά και Ümlaute: äöüß ÄÖÜ ñ ç é è ê",
    "🚀 😶‍🌫️ 👍🏽 👨‍👩‍👧‍👦 🦙🦙 ✅ ❤️",
    "𓀀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ℝ ☃ \u00a0nbsp \u200bzwsp e\u0301",
    "\x00\x01\x1f control bytes \x7f",
    "------======= ......!!!!!!?????? ''''''```````\"\"\"\"",
    "a" * 40 + " " + "ab" * 20,
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX.",
]

# Special tokens in text, per vocabulary: parsed as their ids, as in a chat template.
# Not phi-3's: llama.cpp makes its special tokens eat the whitespace after them,
# a quirk keyed by the model's general.name, and ferry does not run Phi-3 (its
# vocabulary is here as a second SentencePiece one).
SPECIAL_TEXTS = {
    "llama-spm": ["<s>[INST] hi [/INST] there</s>"],
    "llama-bpe": ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"],
    "qwen2": ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"],
    "gpt-2": ["hi<|endoftext|>there"],
}


def main():
    vocab_dir, out = sys.argv[1], sys.argv[2]
    result = {"llama_cpp_python": llama_cpp.__version__, "vocabs": {}}
    for stem in STEMS:
        m = llama_cpp.Llama(model_path=f"{vocab_dir}/ggml-vocab-{stem}.gguf", vocab_only=True, verbose=False)
        cases = []
        for text in TEXTS + SPECIAL_TEXTS.get(stem, []):
            ids = m.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            cases.append({"text": text, "ids": ids})
        result["vocabs"][stem] = cases
        del m
    # One case per line: a diff shows which text moved.
    with open(out, "w") as f:
        f.write('{"llama_cpp_python": %s, "vocabs": {\n' % json.dumps(result["llama_cpp_python"]))
        stems = list(result["vocabs"])
        for i, stem in enumerate(stems):
            f.write(" %s: [\n" % json.dumps(stem))
            cases = result["vocabs"][stem]
            f.write(",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in cases))
            f.write("\n ]%s\n" % ("," if i + 1 < len(stems) else ""))
        f.write("}}\n")


if __name__ == "__main__":
    main()
