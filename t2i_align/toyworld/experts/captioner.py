"""The ToyWorld captioner: a small ``BlipForConditionalGeneration`` trained with the LM loss on renders.

It is the image-to-text teacher (CoMat's L_i2t = -log p(prompt | image), see
:func:`caption_log_likelihood`) and the caption model of RealignDiff's caption reward. The saved folder
loads with ``BlipForConditionalGeneration`` and ``BlipProcessor`` ``.from_pretrained``.

Token conventions follow the real BLIP checkpoints: the tokenizer (a whole-word WordPiece vocabulary of
every word ToyWorld captions can contain) writes ``[CLS] text [SEP]``; the decoder's start token is
``[DEC]`` (``text_config.bos_token_id``), which replaces ``[CLS]`` at position 0 (as BLIP's training code
does), and generation stops at ``[SEP]`` (``text_config.sep_token_id``).

Trained (and resumed) by the ``captioner`` stage of ``python -m t2i_align.commands.toyworld_pretrain``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from itertools import combinations
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

from t2i_align.toyworld.pretraining.batches import (
    CLIP_MEAN,
    CLIP_STD,
    LoopConfig,
    heldout_scenes,
    normalize,
    render_batch,
    to_float,
    train_loop,
)
from t2i_align.toyworld.evaluation.metrics import score_image
from t2i_align.toyworld.world import (
    COLOURS,
    COUNT_WORDS,
    RELATIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    Phrase,
    PromptSpec,
    Scene,
    parse_prompt,
)

STREAM = "captioner"
IMAGE_SIZE = 64
MAX_TOKENS = 64
MAX_OBJECTS = 4  # the world's largest scene; count corruptions stay within it
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DEC = "[DEC]"  # BLIP's decoder start token (the real checkpoints append it after BERT's vocabulary)
EXTRA_WORDS = ("an", "the", "photo", "picture", "image", "of", "with", "there", "is", "are", "in", "on", "next",
               "shape", "shapes", "object", "objects", "background", ".")
OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
            "below": "above"}


# ------------------------------------------------------------------------------------------- vocabulary
def _words(text: str) -> list[str]:
    return text.lower().replace(",", " , ").split()


def caption_vocabulary() -> list[str]:
    """Every word of every ToyWorld caption (from the world's vocabulary and templates), then extras.

    Order: the five BERT special tokens, caption words in order of first appearance, generic extras, ``[DEC]``.
    """
    texts = []
    for shape in SHAPES:
        for count in COUNT_WORDS:
            for colour in (None, *COLOURS):
                for size in (None, *SIZES):
                    for texture in (None, *TEXTURES):
                        phrase = Phrase(shape, count, colour, size, texture)
                        texts += [phrase.text(), phrase.text(article=False)]
    a, b, c = Phrase("circle"), Phrase("square"), Phrase("star")
    texts += [PromptSpec((a, b), rel, "spatial").text() for rel in RELATIONS]
    texts += [PromptSpec((a, b), None, "pair").text(), PromptSpec((a, b, c), None, "multi").text()]
    vocab = list(SPECIAL)
    for word in [w for t in texts for w in _words(t)] + list(EXTRA_WORDS):
        if word not in vocab:
            vocab.append(word)
    return vocab + [DEC]


def build_captioner_tokenizer(out_dir: str | Path) -> BertTokenizerFast:
    """Write the WordPiece tokenizer (``vocab.txt`` + tokenizer files) into ``out_dir`` and load it back."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = caption_vocabulary()
    (out_dir / "vocab.txt").write_text("".join(w + "\n" for w in vocab))
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, bos_token=DEC,
                                  model_max_length=MAX_TOKENS)
    tokenizer.save_pretrained(out_dir)
    return BertTokenizerFast.from_pretrained(out_dir)


# ---------------------------------------------------------------------------------------------- model
def build_captioner(seed: int = 0, vision_hidden: int = 128, text_hidden: int = 128, layers: int = 4,
                    heads: int = 4) -> BlipForConditionalGeneration:
    """A randomly initialised ToyWorld BLIP captioner (vision 64 px / patch 8; decoder with cross-attention)."""
    vocab = caption_vocabulary()
    ids = {w: i for i, w in enumerate(vocab)}
    text = dict(
        vocab_size=len(vocab), hidden_size=text_hidden, intermediate_size=4 * text_hidden, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=MAX_TOKENS, projection_dim=text_hidden,
        bos_token_id=ids[DEC], eos_token_id=ids["[SEP]"], sep_token_id=ids["[SEP]"], pad_token_id=ids["[PAD]"],
    )
    vision = dict(
        image_size=IMAGE_SIZE, patch_size=8, hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
        num_hidden_layers=layers, num_attention_heads=heads, projection_dim=vision_hidden, initializer_range=0.02,
    )
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=text_hidden,
                        image_text_hidden_size=text_hidden)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    gen = model.generation_config
    gen.max_length, gen.num_beams, gen.do_sample = MAX_TOKENS, 1, False
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = ids[DEC], ids["[SEP]"], ids["[PAD]"]
    return model


def image_processor() -> BlipImageProcessor:
    """64 px processor (resize to 64 x 64, a no-op on 64 px renders), CLIP mean/std as in BLIP."""
    return BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=list(CLIP_MEAN),
                              image_std=list(CLIP_STD))


def pixel_values(model: BlipForConditionalGeneration, processor: BlipProcessor,
                 images: torch.Tensor | Sequence[Image.Image]) -> torch.Tensor:
    """Model inputs from PIL images (through the processor) or float ``B x 3 x H x W`` in [0, 1]
    (differentiable: resized bicubically if needed, then normalised with the processor's mean/std)."""
    param = next(model.parameters())
    if not isinstance(images, torch.Tensor):
        return processor.image_processor(list(images), return_tensors="pt").pixel_values.to(param.device, param.dtype)
    size = model.config.vision_config.image_size
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    ip = processor.image_processor
    return normalize(images.to(param.device, param.dtype), ip.image_mean, ip.image_std)


def _token_log_probs(model: BlipForConditionalGeneration, processor: BlipProcessor, pixels: torch.Tensor,
                     texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the text tokens after the start token (``[SEP]`` included) and their mask."""
    enc = processor.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    input_ids = enc.input_ids.to(pixels.device)
    mask = enc.attention_mask.to(pixels.device)
    input_ids[:, 0] = model.config.text_config.bos_token_id
    logits = model(pixel_values=pixels, input_ids=input_ids, attention_mask=mask).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return logp, mask[:, 1:].to(logp.dtype)


def caption_log_likelihood(model: BlipForConditionalGeneration, processor: BlipProcessor,
                           images: torch.Tensor | Sequence[Image.Image], texts: list[str]) -> torch.Tensor:
    """log p(text | image) per pair: the sum of the log-probs of the text's tokens and the final ``[SEP]``,
    given ``[DEC]`` and no prompt prefix. Differentiable in float-tensor images (CoMat's L_i2t = -this)."""
    logp, mask = _token_log_probs(model, processor, pixel_values(model, processor, images), list(texts))
    return (logp * mask).sum(1)


def train_captioner(out_dir: str | Path, steps: int, batch_size: int = 128, lr: float = 5e-4, seed: int = 0,
                    device: str = "cpu", checkpoint_every: int = 200, log_every: int = 50, warmup: int = 200,
                    schedule: str = "constant", decay_steps: int | None = None, decay_start: int | None = None,
                    num_workers: int = 0,
                    world_seed: int = 0, vision_hidden: int = 128, text_hidden: int = 128) -> Path:
    """Train (or resume) the captioner in ``out_dir`` (mean token NLL of each scene's own caption); returns
    the ``save_pretrained`` folder (model + ``BlipProcessor``)."""
    out_dir = Path(out_dir)
    tokenizer = build_captioner_tokenizer(out_dir / "tokenizer")
    processor = BlipProcessor(image_processor=image_processor(), tokenizer=tokenizer)
    cfg = LoopConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, warmup=warmup, schedule=schedule,
                     decay_steps=decay_steps, decay_start=decay_start, checkpoint_every=checkpoint_every, log_every=log_every,
                     num_workers=num_workers, world_seed=world_seed, device=device)

    def loss_fn(model: BlipForConditionalGeneration, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        logp, mask = _token_log_probs(model, processor, normalize(to_float(images)), captions)
        return -(logp * mask).sum() / mask.sum()

    def save_final(model: BlipForConditionalGeneration, folder: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        (folder / "vocab.txt").write_text((out_dir / "tokenizer" / "vocab.txt").read_text())
        info = {"model": "captioner", "vision_hidden": vision_hidden, "text_hidden": text_hidden, **asdict(cfg)}
        (folder / "toyworld_training.json").write_text(json.dumps(info, indent=2) + "\n")

    model = build_captioner(seed, vision_hidden, text_hidden)
    return train_loop(out_dir, model, loss_fn, save_final, STREAM, cfg)


def load_captioner(model_dir: str | Path, device: str = "cpu") -> tuple[BlipForConditionalGeneration, BlipProcessor]:
    model = BlipForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    return model, BlipProcessor.from_pretrained(model_dir)


@torch.no_grad()
def generate_captions(model: BlipForConditionalGeneration, processor: BlipProcessor,
                      images: torch.Tensor | Sequence[Image.Image], max_new_tokens: int = 40) -> list[str]:
    """Greedy captions."""
    out = model.generate(pixel_values=pixel_values(model, processor, images), max_new_tokens=max_new_tokens,
                         num_beams=1, do_sample=False)
    return processor.batch_decode(out, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------- corruptions
def _distinct(phrases: Sequence[Phrase]) -> bool:
    keys = [(p.shape, p.colour) for p in phrases]
    return len(set(keys)) == len(keys)


def _same_meaning(a: PromptSpec, b: PromptSpec) -> bool:
    if a.relation or b.relation:
        return a.phrases == b.phrases and a.relation == b.relation
    return sorted(map(repr, a.phrases)) == sorted(map(repr, b.phrases))


def _count_template(spec: PromptSpec, phrases: tuple[Phrase, ...]) -> str:
    if spec.template in ("spatial", "multi"):
        return spec.template
    if any(p.count > 1 for p in phrases):
        return "counting"
    return "single" if len(phrases) == 1 else "pair"


def typed_corruptions(spec: PromptSpec) -> list[tuple[str, PromptSpec]]:
    """``(kind, corrupted spec)`` pairs that a scene satisfying ``spec`` does not satisfy.

    * ``attribute``: one attribute (colour, size or texture) swapped between two phrases that both name it
      with different values;
    * ``relation``: left <-> right, above <-> below;
    * ``count``: one phrase's count changed by +-1 (counts stay in 1..4 and the scene at most 4 objects).

    Corruptions that would name one (shape, colour) twice or mean the same as ``spec`` are skipped.
    """
    out: list[tuple[str, PromptSpec]] = []
    phrases = spec.phrases
    for i, j in combinations(range(len(phrases)), 2):
        for attr in ("colour", "size", "texture"):
            a, b = getattr(phrases[i], attr), getattr(phrases[j], attr)
            if a is None or b is None or a == b:
                continue
            new = list(phrases)
            new[i], new[j] = replace(phrases[i], **{attr: b}), replace(phrases[j], **{attr: a})
            out.append(("attribute", replace(spec, phrases=tuple(new))))
    if spec.relation is not None:
        out.append(("relation", replace(spec, relation=OPPOSITE[spec.relation])))
    for i, phrase in enumerate(phrases):
        for delta in (-1, 1):
            count = phrase.count + delta
            if count in COUNT_WORDS and spec.num_objects + delta <= MAX_OBJECTS:
                new = phrases[:i] + (replace(phrase, count=count),) + phrases[i + 1:]
                out.append(("count", PromptSpec(new, spec.relation, _count_template(spec, new))))
    return [(kind, c) for kind, c in out if _distinct(c.phrases) and not _same_meaning(c, spec)]


def corruptions(spec: PromptSpec) -> list[PromptSpec]:
    """Corrupted versions of ``spec`` (attribute swaps, reversed relation, counts +-1).

    See :func:`typed_corruptions`."""
    return [c for _, c in typed_corruptions(spec)]


# ---------------------------------------------------------------------------------------------- metrics
Scorer = Callable[[torch.Tensor, list[str]], torch.Tensor]


@torch.no_grad()
def sensitivity(scenes: Sequence[Scene], images: torch.Tensor, score: Scorer, batch: int = 128) -> dict[str, float]:
    """CoMat B.3 sensitivity: the fraction of (caption, corruption) pairs where ``score(image, caption)`` is
    strictly higher than ``score(image, corruption)``; overall and per corruption kind.

    ``images``: float ``N x 3 x H x W`` in [0, 1], one per scene; ``score(images, texts)`` -> ``Tensor[B]``.
    """
    rows: list[tuple[int, str, str | None]] = []  # (scene index, text, corruption kind or None for the caption)
    for k, scene in enumerate(scenes):
        kinds = typed_corruptions(scene.spec)
        if kinds:
            rows.append((k, scene.caption, None))
            rows += [(k, c.text(), kind) for kind, c in kinds]
    values: list[float] = []
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        index = torch.tensor([k for k, _, _ in chunk])
        values += score(images[index], [text for _, text, _ in chunk]).float().cpu().tolist()
    true_score: dict[int, float] = {k: v for (k, _, kind), v in zip(rows, values) if kind is None}
    wins: dict[str, list[bool]] = {"attribute": [], "relation": [], "count": []}
    for (k, _, kind), v in zip(rows, values):
        if kind is not None:
            wins[kind].append(true_score[k] > v)
    every = [w for ws in wins.values() for w in ws]
    out = {"sensitivity": sum(every) / max(len(every), 1), "pairs": float(len(every))}
    for kind, ws in wins.items():
        out[f"sensitivity/{kind}"] = sum(ws) / len(ws) if ws else float("nan")
        out[f"pairs/{kind}"] = float(len(ws))
    return out


def caption_matches(caption: str, scene: Scene) -> dict[str, bool]:
    """Does a generated caption describe the scene?

    ``satisfied``: it parses and every clause holds in the scene (``score_image(...)["all_clauses"]``);
    ``exact``: also every object of the scene is named exactly once (the phrases partition the objects): the
    right objects with the right attributes, the captioner bar. A relation is not required: whether a
    scene's own caption names one was a random template choice that the image does not show, but a
    relation that is named must hold (``satisfied``). ``relation``: the caption names a relation and it holds
    (reported separately over the scenes whose own caption names one).
    """
    try:
        spec = parse_prompt(caption)
    except ValueError:
        return {"parsed": False, "satisfied": False, "exact": False, "relation": False}
    satisfied = score_image(spec, scene.objects)["all_clauses"] == 1.0
    named = all(any(p.matches(o) for p in spec.phrases) for o in scene.objects)
    exact = satisfied and named and spec.num_objects == len(scene.objects)
    return {"parsed": True, "satisfied": satisfied, "exact": exact, "relation": satisfied and spec.relation is not None}


def caption_accuracy(scenes: Sequence[Scene], captions: Sequence[str]) -> dict[str, float]:
    """Means of :func:`caption_matches` over (scene, generated caption) pairs; ``caption_relation`` over the
    scenes whose own caption names a relation (NaN if none)."""
    results = [caption_matches(c, s) for c, s in zip(captions, scenes, strict=True)]
    out = {f"caption_{key}": sum(r[key] for r in results) / len(results) for key in ("parsed", "satisfied", "exact")}
    spatial = [r["relation"] for r, s in zip(results, scenes) if s.spec.relation is not None]
    out["caption_relation"] = sum(spatial) / len(spatial) if spatial else float("nan")
    return out


def captioner_quality(model_dir: str | Path, n: int = 300, seed: int = 1234, source: str = "mix",
                      device: str = "cpu", batch: int = 128) -> dict[str, float | list[str]]:
    """The captioner's bars on ``n`` held-out renders: sensitivity (>= 0.95 wanted) and greedy-caption
    accuracy (``caption_exact`` >= 0.90 wanted), plus examples."""
    model, processor = load_captioner(model_dir, device)
    scenes = heldout_scenes(source, seed, n)
    images = to_float(render_batch(scenes, IMAGE_SIZE))

    def score(ims: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return caption_log_likelihood(model, processor, ims, texts)

    out: dict[str, float | list[str]] = dict(sensitivity(scenes, images, score, batch))
    captions = [c for k in range(0, n, batch) for c in generate_captions(model, processor, images[k:k + batch])]
    out.update(caption_accuracy(scenes, captions))
    out["n"] = float(n)
    out["examples"] = [f"{s.caption} -> {c}" for s, c in zip(scenes[:5], captions[:5])]
    return out
