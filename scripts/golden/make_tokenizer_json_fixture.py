#!/usr/bin/env python3
"""A tokenizer folder with tokenizer.json only (what transformers 5's save_pretrained writes: no vocab.json or
merges.txt), for test/tokenizer.test.ts.

Loads assets/tiny-clip-tokenizer (vocab.json + merges.txt) with transformers' CLIPTokenizer, saves it to
test/fixtures/tokenizer/tokenizer-json/, reloads that folder and checks that its ids equal the golden ids of
test/fixtures/tokenizer/tiny_cases.json (so the fixture is proven equivalent by transformers itself).

Usage:  python3 scripts/golden/make_tokenizer_json_fixture.py
"""

from __future__ import annotations

import json
import os
import shutil

from transformers import CLIPTokenizer

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
SRC = os.path.join(ROOT, "assets", "tiny-clip-tokenizer")
OUT = os.path.join(ROOT, "test", "fixtures", "tokenizer", "tokenizer-json")
CASES = os.path.join(ROOT, "test", "fixtures", "tokenizer", "tiny_cases.json")


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    CLIPTokenizer.from_pretrained(SRC).save_pretrained(OUT)
    for name in ("vocab.json", "merges.txt"):
        path = os.path.join(OUT, name)
        if os.path.exists(path):
            os.remove(path)
    files = sorted(os.listdir(OUT))
    assert "tokenizer.json" in files, files
    tok = CLIPTokenizer.from_pretrained(OUT)
    with open(CASES, encoding="utf-8") as f:
        cases = json.load(f)
    for c in cases:
        assert tok(c["text"]).input_ids == c["ids"], c["text"]
    print(f"wrote {OUT}: {files}; {len(cases)} cases give the golden ids")


if __name__ == "__main__":
    main()
