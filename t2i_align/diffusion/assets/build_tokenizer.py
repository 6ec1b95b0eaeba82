"""Build the tiny CLIP-format tokenizer fixture used by tests and the tiny demo model.

Command: ``python -m t2i_align.commands.build_tiny_tokenizer OUT_DIR``

Trains a byte-level BPE with the ``tokenizers`` library on a small caption corpus embedded below and
writes it in the layout of the Stable Diffusion 1.x ``tokenizer/`` folder (``vocab.json``,
``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``), which
``transformers.CLIPTokenizer.from_pretrained`` loads. The vocabulary is ordered as in OpenAI's CLIP
(``clip/simple_tokenizer.py``): the 256 byte symbols, the same 256 with ``</w>``, one token per merge
in merge order, then ``<|startoftext|>`` and ``<|endoftext|>`` as the last two ids. The output is
deterministic (no randomness, sorted keys, fixed corpus order).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"
MODEL_MAX_LENGTH = 77
NUM_MERGES = 560  # vocab = 512 base symbols + 560 merges + 2 special tokens = 1074
MIN_FREQUENCY = 2  # words seen once stay split, like rare words in the real CLIP vocab
# Same split as CLIP (clip/simple_tokenizer.py `pat`, transformers CLIPTokenizer pre_tokenizer).
CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
    r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map, in CLIP's vocabulary order.

    Printable latin-1 bytes map to themselves; the other bytes map to 256, 257, ... in byte order
    (as in clip/simple_tokenizer.py).
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


# --- corpus -------------------------------------------------------------------------------------

COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white",
           "gray", "golden", "silver"]
SHAPES = ["cube", "sphere", "ball", "cone", "cylinder", "pyramid", "circle", "square", "triangle",
          "star", "ring", "box", "heart", "rectangle"]
SIZES = ["small", "large", "big", "tiny", "huge", "tall", "short", "long", "little", "giant"]
TEXTURES = ["wooden", "metal", "glass", "plastic", "furry", "fluffy", "shiny", "matte", "rough",
            "smooth", "striped", "spotted", "leather", "stone", "rubber", "woolen"]
RELATIONS = ["on the left of", "on the right of", "above", "below", "behind", "in front of",
             "next to", "on top of", "under", "beside", "near", "inside"]
COUNTS = [("one", 1), ("two", 2), ("three", 3), ("four", 4), ("five", 5), ("six", 6),
          ("several", 3), ("many", 9), ("a pair of", 2)]
ANIMALS = ["cat", "dog", "horse", "cow", "sheep", "bird", "elephant", "giraffe", "zebra", "bear",
           "rabbit", "duck", "fish", "mouse", "lion", "tiger", "monkey", "puppy", "kitten"]
OBJECTS = ["car", "bus", "truck", "bicycle", "bench", "chair", "table", "cup", "bottle", "vase",
           "clock", "book", "laptop", "phone", "umbrella", "kite", "pizza", "banana", "apple",
           "sandwich", "bowl", "plate", "knife", "fork", "spoon", "bed", "couch", "train", "boat",
           "airplane", "backpack", "suitcase", "teddy bear", "traffic light", "skateboard", "lamp"]
SCENES = ["in a kitchen", "on a street", "in a park", "on a beach", "in a living room", "at night",
          "in the snow", "on a wooden table", "in a field of grass", "under a blue sky",
          "next to a river", "in a city", "on a sunny day", "in the rain", "in a bedroom",
          "on a white background"]
IRREGULAR_PLURALS = {"sheep": "sheep", "fish": "fish", "mouse": "mice", "knife": "knives",
                     "puppy": "puppies", "teddy bear": "teddy bears", "bus": "buses", "box": "boxes",
                     "couch": "couches", "sandwich": "sandwiches", "glass": "glasses"}

HANDWRITTEN = [
    "A man riding a wave on top of a surfboard.",
    "A woman is holding an umbrella while walking in the rain.",
    "Two people are sitting on a bench in the park.",
    "A plate of food with broccoli, rice and chicken.",
    "A group of children playing soccer on a green field.",
    "A black and white photo of an old train station.",
    "An empty street with cars parked along the side.",
    "A bathroom with a white sink, a mirror and a toilet.",
    "A person flying a colorful kite on a windy beach.",
    "Three giraffes standing next to each other near some trees.",
    "A close-up photo of a slice of pizza with cheese and tomatoes.",
    "A living room with a brown couch, a lamp and a television.",
    "A cat sleeping on a laptop keyboard.",
    "A dog catching a frisbee in mid-air.",
    "Some horses grazing in a field under cloudy skies.",
    "A painting of a sunset over the mountains and a lake.",
    "A watercolor illustration of a fox in a snowy forest.",
    "A realistic photograph of a bowl of fruit on a kitchen counter.",
    "A bird perched on a branch of a tree with pink flowers.",
    "An elephant walking through tall grass with its baby.",
    "A red stop sign at the corner of a busy intersection.",
    "A young boy eating a banana while sitting at the table.",
    "A herd of zebras drinking water from a pond.",
    "A sailboat floating on the calm water of a harbor.",
    "A bowl of soup with a spoon and a piece of bread.",
    "A girl wearing a yellow raincoat and blue boots.",
    "A teddy bear sitting on a bed with white sheets.",
    "A double-decker bus driving down a city street.",
    "A skier going down a snowy slope on a sunny day.",
    "A cup of coffee next to an open book and a pair of glasses.",
    "The man is standing in front of a large clock tower.",
    "A photo of a cake with candles and chocolate frosting.",
    "A vase of flowers on a windowsill in the morning light.",
    "An airplane flying high in the clear blue sky.",
    "A tennis player swinging a racket at the ball.",
    "A bear walking across a rocky river bank.",
    "Several boats docked at a pier next to the ocean.",
    "A motorcycle parked in front of a brick building.",
    "A baseball player holding a bat at home plate.",
    "A refrigerator full of vegetables, milk and eggs.",
    "There are 2 dogs and 3 cats in the picture.",
    "It's a bright and beautiful day; they're having a picnic!",
    "A digital art of a robot painting a portrait, highly detailed, 4k.",
    "A photo of an astronaut riding a horse on the moon.",
    "A cozy cabin in the woods covered with snow at dawn.",
    "A bowl with five oranges and one green apple.",
    "An orange cat and a gray dog lying on a rug.",
    "A stack of pancakes with butter and maple syrup.",
    "A street vendor selling hot dogs from a small cart.",
    "A bicycle leaning against a fence covered in ivy.",
]


def _count_phrase(count: str, n: int, noun: str) -> str:
    """``'three cats'``; singular stays with the count word (``'one cat'``)."""
    if n == 1:
        return f"{count} {noun}"
    plural = IRREGULAR_PLURALS.get(noun, noun + "s")
    return f"{count} {plural}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def build_corpus() -> list[str]:
    """A few hundred COCO/T2I-CompBench-like captions, generated with fixed strides (no RNG)."""
    lines = list(HANDWRITTEN)
    things = SHAPES + ANIMALS + OBJECTS
    for i in range(120):  # attribute binding + spatial relation
        c1, c2 = COLOURS[i % len(COLOURS)], COLOURS[(i * 5 + 3) % len(COLOURS)]
        s1, s2 = SHAPES[(i * 3) % len(SHAPES)], SHAPES[(i * 7 + 2) % len(SHAPES)]
        rel = RELATIONS[i % len(RELATIONS)]
        lines.append(f"{_article(c1)} {c1} {s1} {rel} {_article(c2)} {c2} {s2}")
    for i in range(100):  # size + texture + animal/object in a scene
        size, tex = SIZES[i % len(SIZES)], TEXTURES[(i * 3 + 1) % len(TEXTURES)]
        noun = OBJECTS[(i * 7) % len(OBJECTS)] if i % 2 else ANIMALS[(i * 5) % len(ANIMALS)]
        scene = SCENES[(i * 11) % len(SCENES)]
        lines.append(f"a photo of {_article(size)} {size} {tex} {noun} {scene}")
    for i in range(80):  # counting
        count, n = COUNTS[i % len(COUNTS)]
        noun = things[(i * 13) % len(things)]
        count2, n2 = COUNTS[(i * 4 + 1) % len(COUNTS)]
        noun2 = things[(i * 17 + 5) % len(things)]
        lines.append(f"{_count_phrase(count, n, noun)} and {_count_phrase(count2, n2, noun2)}")
    for i in range(60):  # colour + texture + relation between animals/objects
        a, b = ANIMALS[i % len(ANIMALS)], OBJECTS[(i * 5 + 2) % len(OBJECTS)]
        c, tex = COLOURS[(i * 2) % len(COLOURS)], TEXTURES[i % len(TEXTURES)]
        rel = RELATIONS[(i * 7) % len(RELATIONS)]
        lines.append(f"the {c} {a} is sitting {rel} the {tex} {b}")
    return lines


# --- training -----------------------------------------------------------------------------------


def train_merges(corpus: list[str], num_merges: int = NUM_MERGES) -> list[tuple[str, str]]:
    """Learn BPE merges on ``corpus`` with CLIP's normalisation and pre-tokenisation."""
    model = BPE(unk_token=EOS, continuing_subword_prefix="", end_of_word_suffix=EOW, fuse_unk=False)
    tok = Tokenizer(model)
    # Same pipeline as transformers' CLIPTokenizer (models/clip/tokenization_clip.py).
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # stop on min_frequency; we keep the first `num_merges` merges below
        min_frequency=MIN_FREQUENCY,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix=EOW,
        continuing_subword_prefix="",
        # Seeding the trainer's vocabulary with the 512 base symbols in CLIP order fixes their ids.
        # Otherwise the ids of the `</w>` symbols follow Rust HashMap iteration order
        # (tokenizers/src/models/bpe/trainer.rs `tokenize_words`), and ties between equally
        # frequent pairs, broken by pair ids, could differ between runs.
        special_tokens=base_symbols(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]
    if len(merges) < num_merges:
        raise RuntimeError(f"corpus only supports {len(merges)} merges, asked for {num_merges}")
    return merges[:num_merges]


def base_symbols() -> list[str]:
    """CLIP's 512 base tokens: the 256 byte symbols, then the same with ``</w>``."""
    base = list(bytes_to_unicode().values())
    return base + [b + EOW for b in base]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP vocabulary order: bytes, bytes + ``</w>``, merge results, then BOS/EOS last."""
    tokens = base_symbols() + ["".join(m) for m in merges] + [BOS, EOS]
    if len(set(tokens)) != len(tokens):
        raise RuntimeError("duplicate tokens in vocabulary")
    return {t: i for i, t in enumerate(tokens)}


def write_tokenizer(out_dir: str | Path, num_merges: int = NUM_MERGES) -> Path:
    """Train and write the tokenizer files into ``out_dir``; return the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = train_merges(build_corpus(), num_merges)
    vocab = build_vocab(merges)
    # vocab.json as in openai/clip-vit-*: compact, non-ASCII kept; ids in insertion (= id) order.
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    # merges.txt starts with a version header; transformers 4.x's slow CLIPTokenizer skips line 1.
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out / "merges.txt").write_text(merges_text, encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (out / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out
