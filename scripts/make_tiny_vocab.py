#!/usr/bin/env python3
"""Learn a tiny, genuine CLIP-style byte-level BPE vocabulary for our test models.

Output: assets/tiny-clip-tokenizer/{vocab.json, merges.txt, tokenizer_config.json,
special_tokens_map.json}, laid out exactly like the real CLIP / Stable Diffusion 1.5
tokenizer folder, just smaller:

  ids   0..255  the 256 byte-unicode characters, in the order of CLIP's bytes_to_unicode()
  ids 256..511  the same characters with the end-of-word marker "</w>" appended
  ids 512..997  one token per merge, in merge order (486 merges)
  id  998       <|startoftext|>
  id  999       <|endoftext|>

The BPE is learned the way CLIP's vocabulary was built: text is lower-cased and
whitespace-cleaned, split with CLIP's pre-tokenization regex, every pre-token is
mapped byte-by-byte through bytes_to_unicode(), and the last symbol of each word carries
"</w>". Merges are then learned greedily (most frequent adjacent pair first).

Usage:  python3 scripts/make_tiny_vocab.py [--out assets/tiny-clip-tokenizer]

Stdlib only; the `regex` module is used for the pre-tokenizer when installed, and an
equivalent hand-written scanner otherwise (the embedded corpus gives the same result
either way).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import unicodedata

NUM_MERGES = 486
VOCAB_SIZE = 1000
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"

# CLIP's pre-tokenization pattern (openai/CLIP simple_tokenizer.py), used with IGNORECASE.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's / GPT-2's reversible byte -> printable unicode character table.

    Printable Latin-1 bytes map to themselves; the remaining 68 bytes (control chars,
    space, DEL, NBSP, soft hyphen, ...) map to U+0100 onwards. The dict's insertion
    order is the order CLIP uses for the first 256 vocabulary ids.
    """
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


# ---------------------------------------------------------------------------
# Pre-tokenization
# ---------------------------------------------------------------------------

try:  # pragma: no cover - depends on the environment
    import regex as _regex

    _PAT = _regex.compile(CLIP_PATTERN, _regex.IGNORECASE)

    def pre_tokenize(text: str) -> list[str]:
        return _PAT.findall(text)

except ImportError:  # pragma: no cover
    _CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")

    def _is_letter(ch: str) -> bool:
        return unicodedata.category(ch).startswith("L")

    def _is_number(ch: str) -> bool:
        return unicodedata.category(ch).startswith("N")

    def pre_tokenize(text: str) -> list[str]:
        """Hand-written equivalent of CLIP_PATTERN (leftmost alternative wins)."""
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            ch = text[i]
            if ch.isspace():
                i += 1
                continue
            for special in (BOS, EOS):
                if text.startswith(special, i):
                    out.append(special)
                    i += len(special)
                    break
            else:
                c = next((c for c in _CONTRACTIONS if text[i : i + len(c)].lower() == c), None)
                if c is not None:
                    out.append(text[i : i + len(c)])
                    i += len(c)
                elif _is_letter(ch):
                    j = i
                    while j < n and _is_letter(text[j]):
                        j += 1
                    out.append(text[i:j])
                    i = j
                elif _is_number(ch):
                    out.append(ch)
                    i += 1
                else:
                    j = i
                    while j < n and not (text[j].isspace() or _is_letter(text[j]) or _is_number(text[j])):
                        j += 1
                    out.append(text[i:j])
                    i = j
        return out


def clean_text(text: str) -> str:
    """CLIP's basic_clean/whitespace_clean for our plain-ASCII corpus, then lower-case."""
    return " ".join(text.split()).lower()


# ---------------------------------------------------------------------------
# Corpus: hand-written captions (product photos, colored shapes, everyday objects,
# numbers, punctuation). Kept small on purpose; it only has to produce 486 merges.
# ---------------------------------------------------------------------------

CORPUS = """
a photo of a red apple on a white table
a photo of a green apple next to a yellow banana
a close-up product photo of a black leather wallet
a product photo of white running shoes on a grey background
a studio photo of a blue ceramic mug with a wooden handle
a red circle on a white background
a blue square on a black background
a green triangle inside a yellow circle
two red squares and one blue circle
three small green triangles in a row
a large orange star on a purple background
a pink heart next to a small grey square
a photo of a cat sitting on a wooden chair
a photo of a dog running in the park
a cup of coffee on a kitchen table
a glass of water next to a plate of cookies
a bowl of fresh fruit: apples, oranges and grapes
an old brown leather bag on the floor
a silver watch with a black strap
a gold ring on a velvet cushion
a pair of blue jeans folded on a bed
a white t-shirt with a small logo
a red dress hanging on a door
a yellow raincoat and green boots
a wooden spoon, a fork and a knife
a stack of books on a desk
an open laptop on a desk next to a lamp
a smartphone lying face down on a table
a pair of headphones on a white desk
a camera with a long lens
a bicycle leaning against a brick wall
a red car parked in front of a house
a blue bus on a city street at night
a small boat on a calm lake
a tall tree in a green field
a bunch of flowers in a glass vase
a potted plant on a windowsill
a white cloud in a blue sky
the sun setting over the ocean
a snowy mountain under a clear sky
a photo of 3 apples and 2 pears
a photo of 12 eggs in a carton
the number 7 painted on a door
a sign that says "open 24 hours"
a price tag reading $19.99
a receipt with a total of $42.50
a clock showing 10:30
a calendar page for march 2024
a box of 100 paper clips
a red sticker with the number 1
a blue square, a red square, and a green square
the square is red. the circle is blue!
is the triangle green? yes, it is.
wow! what a bright yellow star...
a black and white photo of an old camera
a product shot of a stainless steel water bottle
a product shot of a glass perfume bottle on a mirror
a studio shot of a pair of sunglasses
a top-down view of a wooden cutting board with vegetables
a top-down photo of a breakfast plate with eggs and toast
a flat lay of office supplies: pens, pencils, paper and a stapler
a close-up of a green leaf with water drops
a close-up of a red rose
a white ceramic vase on a wooden shelf
a grey sofa with two yellow pillows
a small round table with a blue cloth
a kitchen with white cabinets and a black oven
a bathroom with a white sink and a round mirror
a bedroom with a large bed and a green blanket
a living room with a brown leather chair
a child's drawing of a house and a sun
the cat's toy is a small red ball
it's a sunny day in the park
we're looking at a blue car
they've painted the wall white
i'm holding a yellow umbrella
you'll see a green door on the left
he'd like a cup of tea
don't touch the hot stove
the dog isn't sleeping
a purple cube on a grey floor
an orange cylinder next to a white cone
a blue sphere and a red cube on a table
a yellow pyramid in the desert sand
a black hexagon on a white wall
two circles, one square and three triangles
four blue dots in a line
five red stars on a flag
six green squares in a grid
seven yellow circles on a black background
eight orange triangles around a circle
nine small pink hearts
ten white squares on a chessboard
a red and white striped shirt
a blue and yellow checkered pattern
a green and brown plaid blanket
a pattern of small grey dots on a white background
a product photo of a wireless keyboard
a product photo of a computer mouse on a mouse pad
a product photo of a coffee maker in a kitchen
a product photo of a toaster with two slices of bread
a product photo of a blender full of strawberries
a product photo of a backpack with many pockets
a product photo of a leather belt with a silver buckle
a product photo of a wool hat and a scarf
a product photo of a pair of brown boots
a product photo of a soft pillow
a product photo of a scented candle in a glass jar
a product photo of a bottle of olive oil
a product photo of a box of chocolate
a product photo of a bag of coffee beans
a product photo of a tube of toothpaste
a product photo of a bar of soap
a product photo of a desk lamp
a product photo of a plastic water bottle
a product photo of a children's toy truck
a product photo of a teddy bear
an apple, a banana, a lemon and a lime
a slice of pizza on a paper plate
a sandwich with cheese, lettuce and tomato
a bowl of soup with a spoon
a plate of pasta with red sauce
a chocolate cake with white candles
a cup of green tea on a saucer
a glass of orange juice
a bottle of red wine and two glasses
a basket of bread on a table
a white horse in a green field
a brown cow next to a wooden fence
a black bird sitting on a branch
a small fish in a glass bowl
a yellow duck swimming in a pond
a red fox in the snow
a grey rabbit eating a carrot
a sleeping kitten on a blue blanket
a puppy playing with a red ball
a butterfly on a purple flower
a street at night with bright lights
a city skyline at sunset
a quiet road through a forest
a wooden bridge over a river
a lighthouse on a rocky coast
a small house with a red roof
a tall building with many windows
a train station with people waiting
an airport with a white plane
a market with fruit and vegetables
photo #1: a red apple
photo #2: a green pear
photo #3: a yellow lemon
item no. 45 - blue cotton socks (pack of 3)
item no. 46 - white cotton towels (set of 2)
size: 10 x 20 cm
weight: 250 g
price: $5.00 each
save 20% today!
only 3 left in stock
free shipping on orders over $50
rated 4.5 out of 5 stars
1, 2, 3, 4, 5, 6, 7, 8, 9, 10
100, 200, 300, 400, 500
0.5, 1.5, 2.5 and 3.75
call 555-0123 for more information
see page 12 for details
chapter 1: the red circle
chapter 2: the blue square
"hello," said the small green robot.
'good morning!' she said.
is this a cup or a bowl?
yes -- it's a cup.
a list: apples; pears; plums.
(a photo of a dog)
[a drawing of a cat]
{a blue square}
a & b
red / green / blue
colors: red, orange, yellow, green, blue, indigo, violet
shapes: circle, square, triangle, star, heart, oval, diamond
a diamond shape in bright red
an oval mirror with a gold frame
a light blue shirt and dark blue pants
a dark green bottle on a light wooden table
a bright red apple and a pale yellow pear
a very small white dog
a very large black cat
a long red scarf
a short green pencil
a round white plate
a square wooden box
a flat grey stone
a soft pink blanket
a hard plastic case
a shiny metal spoon
a clean white towel
a photo of a person holding a red umbrella
a photo of a woman reading a book in a park
a photo of a man riding a bicycle
a photo of two children playing with a ball
a photo of a family eating dinner
a portrait of an old man with a grey beard
a portrait of a young woman with long brown hair
a photo of a chef cooking in a kitchen
a photo of a painter at work
a photo of a gardener planting flowers
a watercolor painting of a red barn
an oil painting of a blue lake
a pencil sketch of a cat
a digital illustration of a green dragon
a cartoon drawing of a happy sun
a 3d render of a white cube
a pixel art image of a red heart
a simple icon of a house
a black and white logo of a bird
a colorful poster with big letters
a minimalist photo of a single leaf
a product photo on a clean white background
a product photo with soft shadows
a product photo with natural light
a product photo from the side
a product photo from above
a close-up product photo with shallow depth of field
high quality photo, sharp focus
a blurry photo of a street
a dark photo of a room at night
a bright photo of a beach in summer
a photo of a snowman in winter
a photo of autumn leaves on the ground
a photo of spring flowers in a garden
a rainy day in the city
a foggy morning by the lake
a sunny afternoon at the beach
a cold night under the stars
a red circle, a green circle, and a blue circle
a red square, a green square, and a blue square
a red triangle, a green triangle, and a blue triangle
the red circle is above the blue square
the green triangle is below the yellow star
the purple heart is to the left of the orange circle
the white square is to the right of the black circle
a small circle inside a large square
a large circle around a small triangle
a square with rounded corners
a circle with a thick black outline
a triangle pointing up
a triangle pointing down
an arrow pointing to the right
a line from the top to the bottom
two lines that cross in the middle
a grid of red and blue squares
a row of colored pencils
a jar of colored buttons
a box of crayons in many colors
a set of wooden blocks
a toy car, a toy train and a toy plane
a chess board with black and white pieces
a deck of playing cards
a pair of dice showing 6 and 6
a small clock on a shelf
a wall clock with roman numbers
a key on a ring
a lock on a red door
a pen and a notebook
a pair of scissors
a roll of tape
a hammer and some nails
a screwdriver with a yellow handle
a paint brush in a cup of water
a broom next to a door
a bucket of water
a watering can in the garden
a pair of gloves
a blue umbrella and a red raincoat
a straw hat on a chair
a pair of socks with stripes
a warm winter coat
a summer dress with flowers
a tie with blue dots
a leather jacket
a wool sweater
a cotton shirt
a silk scarf
"""


def load_corpus() -> list[str]:
    return [line for line in CORPUS.splitlines() if line.strip()]


# ---------------------------------------------------------------------------
# BPE learning
# ---------------------------------------------------------------------------


def word_counts(lines: list[str], byte_encoder: dict[int, str]) -> collections.Counter[tuple[str, ...]]:
    """Count words as tuples of byte-unicode symbols, the last one carrying </w>."""
    counts: collections.Counter[tuple[str, ...]] = collections.Counter()
    for line in lines:
        for token in pre_tokenize(clean_text(line)):
            symbols = [byte_encoder[b] for b in token.encode("utf-8")]
            symbols[-1] += EOW
            counts[tuple(symbols)] += 1
    return counts


def merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Merge every non-overlapping occurrence of `pair`, scanning left to right."""
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_merges(
    words: collections.Counter[tuple[str, ...]], num_merges: int, base_vocab: set[str]
) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair.

    Ties are broken by the lexicographically smallest pair so the output is fully
    deterministic. A pair whose concatenation is already a token (e.g. "ab"+"c" after
    "a"+"bc") is skipped, so every merge adds exactly one new vocabulary entry, as in
    CLIP's vocabulary (49408 = 2*256 + 48894 merges + 2 specials).
    """
    words = collections.Counter(words)
    known = set(base_vocab)
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, freq in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += freq
        candidates = [(-count, pair) for pair, count in pairs.items() if pair[0] + pair[1] not in known]
        if not candidates:
            raise SystemExit(f"corpus too small: only {len(merges)} merges could be learned, need {num_merges}")
        _, best = min(candidates)
        merges.append(best)
        known.add(best[0] + best[1])
        new_words: collections.Counter[tuple[str, ...]] = collections.Counter()
        for word, freq in words.items():
            new_words[merge_word(word, best)] += freq
        words = new_words
    return merges


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def added_token(content: str, with_type: bool) -> dict:
    tok = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **tok} if with_type else tok


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(here, "..", "assets", "tiny-clip-tokenizer"))
    args = parser.parse_args()

    byte_encoder = bytes_to_unicode()
    base = list(byte_encoder.values())
    base = base + [ch + EOW for ch in base]
    merges = learn_merges(word_counts(load_corpus(), byte_encoder), NUM_MERGES, set(base))

    tokens = base + [a + b for a, b in merges] + [BOS, EOS]
    assert len(tokens) == len(set(tokens)) == VOCAB_SIZE, len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}

    os.makedirs(args.out, exist_ok=True)

    def write(name: str, text: str) -> None:
        with open(os.path.join(args.out, name), "w", encoding="utf-8", newline="\n") as f:
            f.write(text)

    # Same shape as the SD 1.5 tokenizer folder: compact vocab.json, merges.txt with header.
    write("vocab.json", json.dumps(vocab, ensure_ascii=False, separators=(",", ":")) + "\n")
    write("merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer_config = {
        "add_prefix_space": False,
        "bos_token": added_token(BOS, True),
        "do_lower_case": True,
        "eos_token": added_token(EOS, True),
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": "train-lora/tiny-clip-tokenizer",
        "pad_token": EOS,
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added_token(EOS, True),
    }
    special_tokens_map = {
        "bos_token": added_token(BOS, False),
        "eos_token": added_token(EOS, False),
        "pad_token": EOS,
        "unk_token": added_token(EOS, False),
    }
    write("tokenizer_config.json", json.dumps(tokenizer_config, indent=2) + "\n")
    write("special_tokens_map.json", json.dumps(special_tokens_map, indent=2) + "\n")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {os.path.normpath(args.out)}")


if __name__ == "__main__":
    main()
