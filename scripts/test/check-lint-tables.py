#!/usr/bin/env python3
"""Fails if a crate that keeps its own [lints] table drifts from the workspace's.

Cargo lets a member either inherit `[workspace.lints]` whole or write its own
table. engine/ and kernels/ write their own: the workspace forbids unsafe code,
and their SIMD and CUDA code needs it. Their tables must be the workspace's set
without `unsafe_code`, so a lint added to the workspace reaches them too. Every
other member must inherit the workspace's table.
"""
import os
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OWN_TABLES = ("engine", "kernels")


def load(path):
    with open(os.path.join(ROOT, path, "Cargo.toml"), "rb") as f:
        return tomllib.load(f)


def main():
    root = load(".")
    expected = {group: dict(table) for group, table in root["workspace"]["lints"].items()}
    expected["rust"].pop("unsafe_code", None)
    failures = []
    for member in root["workspace"]["members"]:
        lints = load(member).get("lints")
        if member in OWN_TABLES:
            if lints != expected:
                failures.append(f"{member}/Cargo.toml: its [lints] must be the workspace's without unsafe_code: {expected}, not {lints}")
        elif lints != {"workspace": True}:
            failures.append(f"{member}/Cargo.toml: must have [lints] workspace = true, not {lints}")
    for f in failures:
        print(f)
    if failures:
        sys.exit(1)
    print("lint tables agree")


if __name__ == "__main__":
    main()
