#!/usr/bin/env python3
"""Golden ids for src/tokenizer.ts, produced by transformers' CLIPTokenizer.

Runs `transformers.CLIPTokenizer.from_pretrained("assets/tiny-clip-tokenizer")` over a set
of awkward strings and writes test/fixtures/tokenizer/tiny_cases.json:

    [{"text": str, "ids": [...], "padded": [...]}, ...]

  ids     tokenizer(text).input_ids                      (bos + tokens + eos, no padding)
  padded  tokenizer(texts, padding="max_length", max_length=77, truncation=True).input_ids

Usage:  python3 scripts/golden/make_tokenizer_fixture.py
"""

from __future__ import annotations

import json
import os

import tokenizers
import transformers
from transformers import CLIPTokenizer

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
VOCAB_DIR = os.path.join(ROOT, "assets", "tiny-clip-tokenizer")
OUT = os.path.join(ROOT, "test", "fixtures", "tokenizer", "tiny_cases.json")
MAX_LENGTH = 77

LONG_TEXT = (
    "a detailed product photo of a bright red ceramic coffee mug with a wooden handle, standing on a "
    "light grey kitchen table next to a glass jar of brown sugar, a silver spoon, two green apples, "
    "a folded white cotton towel and a small potted plant, soft natural light from a window on the left, "
    "shallow depth of field, sharp focus on the mug, high quality, 4k, studio lighting, clean background"
)

CASES: list[str] = [
    # plain captions, casing
    "a photo of a red apple on a white table",
    "A PHOTO OF A RED APPLE",
    "a Product Photo of Running Shoes",
    "zebra xylophone quokka",
    # punctuation
    "Hello, World!",
    "wow!!! really?!... (yes) [no] {maybe} <ok>",
    '"quoted" and \'single quoted\'',
    "a-b_c/d\\e|f~g`h^i",
    "#hashtag @mention snake_case camelCase",
    "https://example.com/path?q=1&x=2#frag",
    # digits and numbers
    "12345",
    "3.14159 and 2,718",
    "1,000,000 pieces",
    "2024-05-09 at 10:30pm",
    "$19.99 + 20% off",
    "01234567890123456789012345678901234567890123456789",
    "½ ² ³ Ⅻ ٣ ៣",
    # apostrophes and contractions
    "it's a cat's toy",
    "don't, won't, can't",
    "we're here, they've gone, I'm fine, you'll see, he'd go",
    "IT'S DON'T WE'RE",
    "'sunny' 'tis 'll 'd 'm",
    "rock'n'roll O'Neil's cats' toys",
    "''s '''",
    "it\u2019s curly",
    # accents and normalization
    "café crème brûlée",
    "naïve résumé ÉCOLE",
    "cafe\u0301 decomposed",
    "Ångström Straße",
    "\u212a kelvin \u2126 ohm",
    "ΟΔΟΣ Σ σ ς",
    "İstanbul",
    "ﬁne ligature",
    "ＡＢＣ １２３ fullwidth",
    "\u1100\u1161 jamo",
    # other scripts
    "日本語のテキスト",
    "中文字符测试",
    "한국어 문장",
    "photo of 猫 cat",
    "हिन्दी",
    "مرحبا بالعالم",
    "Привет мир",
    # emoji
    "🍎🍌 red apple 👍🏽",
    "family 👨\u200d👩\u200d👧 emoji",
    "🇺🇸 flag",
    # whitespace
    "",
    " ",
    "     ",
    "\n",
    "a   photo\tof\n\na\r\ncat",
    "   spaced out   ",
    "\u00a0nbsp\u00a0and\u3000ideographic",
    "nel\u0085sep line\u2028sep",
    "bom\ufeffword zero\u200bwidth",
    "file\u001csep\u001funit",
    "ctrl\u0000nul\u0007bell",
    # HTML entities are NOT unescaped by transformers' CLIPTokenizer
    "&amp; &lt;b&gt; &quot;hi&quot; &#39;x&#39;",
    "fish &amp;amp; chips",
    # special tokens inside the text
    "<|endoftext|>",
    "a<|endoftext|>b",
    "<|ENDOFTEXT|>",
    "<|startoftext|> hi",
    "<|STARTOFTEXT|> hi",
    "<|endoftext|>\u0338",
    "<|startoftext|>\u0338",
    "<|endoftext|><|startoftext|>",
    "< |endoftext| >",
    # longer than 77 tokens
    LONG_TEXT,
    LONG_TEXT + " " + LONG_TEXT,
]


def main() -> None:
    tok = CLIPTokenizer.from_pretrained(VOCAB_DIR)
    unpadded = tok(CASES).input_ids
    padded = tok(CASES, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    longest = tok(CASES, padding="longest", max_length=MAX_LENGTH, truncation=True).input_ids

    # Sanity checks on the semantics test/tokenizer.test.ts relies on.
    width = max(min(len(ids), MAX_LENGTH) for ids in unpadded)
    for ids, pad, lng in zip(unpadded, padded, longest):
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        truncated = ids if len(ids) <= MAX_LENGTH else ids[: MAX_LENGTH - 1] + [tok.eos_token_id]
        assert pad == truncated + [tok.pad_token_id] * (MAX_LENGTH - len(truncated))
        assert lng == truncated + [tok.pad_token_id] * (width - len(truncated))
    assert any(len(ids) > MAX_LENGTH for ids in unpadded), "need at least one case longer than 77 tokens"

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8", newline="\n") as f:
        f.write("[\n")
        rows = [
            json.dumps({"text": text, "ids": ids, "padded": pad}, ensure_ascii=False, separators=(", ", ": "))
            for text, ids, pad in zip(CASES, unpadded, padded)
        ]
        f.write(",\n".join(rows))
        f.write("\n]\n")
    print(
        f"wrote {len(CASES)} cases to {os.path.relpath(OUT, ROOT)} "
        f"(transformers {transformers.__version__}, tokenizers {tokenizers.__version__})"
    )


if __name__ == "__main__":
    main()
