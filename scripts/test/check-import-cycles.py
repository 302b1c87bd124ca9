#!/usr/bin/env python3
"""Fails if any crate's modules import each other in a cycle.

A reader following `use` lines should never come back to where they started.
For each crate (a folder with Cargo.toml and src/lib.rs or a [lib] path), every
file module is a node; `crate::a::b`, `super::x` and `self::y` paths in it, and
paths that start with the name of one of its own submodules (`env::X` in a
`mod.rs` that declares `mod env;`), are edges to the longest module they name.
A `mod.rs` (or lib.rs) that uses or re-exports its children has edges to them,
so a path into a module's re-exports leads on into the children that provide
them: `a -> b (b/mod.rs re-exports b::c) -> b::c -> a` is a cycle. Only edges
from a module to its own ancestors are left out (a child using `super::X` from
its parent's `mod.rs` is not a cycle), as are test-only files (`tests.rs`,
`*_tests.rs`) and inline `#[cfg(test)] mod` blocks. Prints each cycle and exits
1 if there is one.
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CRATES = {"ferry": "gateway/src", "ferry-transport": "transport/src", "ferry-engine": "engine/src",
          "ferry-certs": "certs/src", "ferry-kernels": "kernels/src"}
PATH_RE = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
USE_GROUP_RE = re.compile(r"\buse\s+(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^;]*)\};", re.S)


def modules(src):
    mods = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs") or f == "main.rs" or f == "tests.rs" or f.endswith("_tests.rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), src)[:-3].split(os.sep)
            if rel[-1] in ("lib", "mod"):
                rel = rel[:-1]
            mods[tuple(rel)] = os.path.join(dirpath, f)
    return mods


def strip_comments(text):
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    # Inline test modules may reach anywhere.
    m = re.search(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text)
    return text[: m.start()] if m else text


def resolve(mod, kind, segs, mods):
    base = ()
    if kind == "super":
        # In a/b.rs and in a/b/mod.rs alike, super is a.
        base = mod[:-1]
        while segs and segs[0] == "super":
            base, segs = base[:-1], segs[1:]
    path = base + tuple(segs)
    while path and path not in mods:
        path = path[:-1]
    return path


def absolute(mod, text, mods):
    """Rewrites `self::` and paths that start with one of `mod`'s own submodules
    as `crate::` paths, so the patterns below see them."""
    here = "".join("::" + s for s in mod)
    text = re.sub(r"(?<![\w:])self::", "crate" + here + "::", text)
    children = sorted(m[-1] for m in mods if len(m) == len(mod) + 1 and m[: len(mod)] == mod)
    if children:
        pat = r"(?<![\w:])(" + "|".join(map(re.escape, children)) + r")::"
        text = re.sub(pat, lambda m: "crate" + here + "::" + m.group(1) + "::", text)
    return text


def edges_of(mod, text, mods):
    found = set()
    text = absolute(mod, text, mods)
    for m in USE_GROUP_RE.finditer(text):
        kind, prefix, inner = m.group(1), m.group(2), m.group(3)
        pre = [s for s in prefix.split("::") if s]
        for item in re.split(r"[,{}]", inner):
            item = item.strip().split(" as ")[0].strip()
            if item and item != "self" and item != "*":
                found.add(resolve(mod, kind, pre + [s for s in item.split("::") if s], mods))
            else:
                found.add(resolve(mod, kind, pre, mods))
    for m in PATH_RE.finditer(USE_GROUP_RE.sub("", text)):
        found.add(resolve(mod, m.group(1), [s for s in m.group(2).split("::") if s], mods))
    # A module's own ancestors (its parent's mod.rs, the crate root) are where
    # it lives, not a place it goes: only those edges are left out.
    return {t for t in found if mod[: len(t)] != t}


def cycles(graph):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def main():
    bad = 0
    for crate, src in CRATES.items():
        src = os.path.join(ROOT, src)
        if not os.path.isdir(src):
            continue
        mods = modules(src)
        graph = {m: edges_of(m, strip_comments(open(p).read()), mods) for m, p in mods.items()}
        for comp in cycles(graph):
            bad += 1
            names = sorted("::".join(m) or "(root)" for m in comp)
            print(f"{crate}: import cycle among {', '.join(names)}")
            for m in comp:
                for t in sorted(graph[m] & set(comp)):
                    print(f"    {'::'.join(m)} -> {'::'.join(t)}")
    if bad:
        sys.exit(1)
    print("no import cycles")


if __name__ == "__main__":
    main()
