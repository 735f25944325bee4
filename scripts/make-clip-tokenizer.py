#!/usr/bin/env python3
"""assets/clip-tokenizer: the CLIP ViT-L/14 BPE tokenizer (49408 tokens) in Hugging Face layout, for single-file SD 1.x
checkpoints, which carry no tokenizer.

The BPE merges are OpenAI CLIP's bpe_simple_vocab_16e6.txt.gz, as the open-clip-torch wheel ships it
(open_clip/bpe_simple_vocab_16e6.txt.gz, MIT license, copied to assets/clip-tokenizer/LICENSE-open_clip). vocab.json and
merges.txt are built from it the way CLIP's SimpleTokenizer builds its encoder (256 byte characters, the same with
"</w>", one token per merge, then <|startoftext|> and <|endoftext|>), which is the vocabulary of
openai/clip-vit-large-patch14's and stable-diffusion-v1-5's tokenizer/ folder. The special-token files are those of
SD 1.5's tokenizer/ (model_max_length 77, pad = eos = unk = <|endoftext|>).

Proof: the ids of transformers' CLIPTokenizer on this folder equal open_clip's SimpleTokenizer (the original CLIP
tokenizer) on a set of texts.

Usage:  python3 scripts/make-clip-tokenizer.py /path/to/open_clip_torch-*.whl
        (needs transformers, and ftfy + regex for open_clip's tokenizer)
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "assets" / "clip-tokenizer"

# CLIP's byte -> unicode table: the one in make_tiny_vocab.py (the tiny test tokenizer is built the same way).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_vocab import bytes_to_unicode  # noqa: E402

SPECIAL = {"content": "", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def main() -> None:
    wheel = Path(sys.argv[1])
    tmp = Path(tempfile.mkdtemp())
    with zipfile.ZipFile(wheel) as z:
        z.extract("open_clip/bpe_simple_vocab_16e6.txt.gz", tmp)
        z.extract("open_clip/tokenizer.py", tmp)
        lic = [n for n in z.namelist() if n.endswith("licenses/LICENSE")]
        license_text = z.read(lic[0]).decode("utf-8")
    gz = tmp / "open_clip" / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(gz).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]  # as CLIP's SimpleTokenizer
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False) + "\n", encoding="utf-8")
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    tok = lambda c: {**SPECIAL, "content": c}
    (OUT / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": tok("<|startoftext|>"), "eos_token": tok("<|endoftext|>"), "pad_token": "<|endoftext|>",
                    "unk_token": tok("<|endoftext|>")}, indent=2) + "\n")
    (OUT / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", **tok("<|startoftext|>")},
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", **tok("<|endoftext|>")},
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": "train-lora/clip-tokenizer",
        "pad_token": "<|endoftext|>",
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", **tok("<|endoftext|>")},
    }, indent=2) + "\n")
    (OUT / "LICENSE-open_clip").write_text(license_text)

    # Proof against the original tokenizer.
    from transformers import CLIPTokenizer

    spec = importlib.util.spec_from_file_location("oc_tokenizer", tmp / "open_clip" / "tokenizer.py")
    oc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oc)
    ref = oc.SimpleTokenizer(bpe_path=str(gz))
    hf = CLIPTokenizer.from_pretrained(str(OUT))
    texts = [
        "a photo of an astronaut riding a horse on mars",
        "A PRODUCT PHOTO of Running-Shoes, 4k, highly detailed!!!",
        "sks dog in a bucket; (masterpiece:1.2) [blurry]",
        "zebra xylophone quokka 12345 3.14 #hashtag @you",
        "café naïve résumé",
        "日本語のテキスト and emoji 🙂🚀",
        "it's we're they've I'm you'll he'd",
        "   lots   of\twhite\nspace   ",
    ]
    for t in texts:
        # open_clip runs ftfy.fix_text first (curly quotes -> straight ones, ...), transformers does not: the texts
        # here are ones ftfy leaves as they are, so that only the vocabulary and merges are compared.
        assert oc.basic_clean(t) == oc.basic_clean(oc.basic_clean(t)) and __import__("ftfy").fix_text(t) == t, t
        want = [ref.sot_token_id] + ref.encode(t) + [ref.eot_token_id]
        got = hf(t).input_ids
        assert got == want, (t, got, want)
    # Golden ids for test/tokenizer.test.ts (src/tokenizer.ts on this folder must give transformers' ids).
    cases = texts + ["<|startoftext|>a<|endoftext|>", "x" * 300, ""]
    golden = REPO / "test" / "fixtures" / "tokenizer" / "clip_cases.json"
    golden.write_text(json.dumps([{"text": t, "ids": hf(t).input_ids} for t in cases], ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT}: {len(vocab)} tokens, {len(merges)} merges; transformers' ids equal open_clip's on {len(texts)} texts")


if __name__ == "__main__":
    main()
