"""ToyWorld: a synthetic compositional world of coloured shapes.

A prompt is a :class:`PromptSpec` (noun phrases + an optional spatial relation) with a canonical text
from fixed templates; :func:`parse_prompt` turns that text back into the spec. A :class:`Scene` is a set
of :class:`Obj` placed without overlap that satisfies a spec; :func:`render` draws it (with one mask per
object). Two prompt distributions mirror the real setting: *natural* (each shape mostly in its canonical
colour, mostly 1-2 objects, like COCO) and *compositional* (uniform combinations, 2-4 objects, like
T2I-CompBench).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 45),
    "green": (45, 165, 70),
    "blue": (45, 85, 215),
    "yellow": (230, 200, 35),
    "purple": (145, 65, 190),
    "cyan": (40, 195, 205),
}
SIZES = ("small", "big")
TEXTURES = ("plain", "striped")
RELATIONS = ("to the left of", "to the right of", "above", "below")
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
CANONICAL = {"circle": "red", "square": "blue", "triangle": "green", "star": "yellow"}
BACKGROUND = (236, 236, 232)
STRIPE_SHADE = 0.55  # stripes are the object's colour darkened to 55 %: same hue, one connected region

# Geometry at 64 px; other image sizes scale it.
DIAMETER = {"small": 13.0, "big": 21.0}
GAP = 3.0  # minimum free pixels between the enclosing circles (radius ``Obj.extent``) of two objects
# Furthest vertex / radius of each drawn shape: square corner 0.86 * sqrt(2), triangle base corner
# sqrt(0.97^2 + 0.8^2) (see ``_polygon``).
EXTENT = {"circle": 1.0, "square": 0.86 * math.sqrt(2), "triangle": math.hypot(0.97, 0.8), "star": 1.0}
STRIPE_PERIOD = 6.0  # pixels: 3 px colour, 3 px dark. Not a divisor of the VAE's 8 px cells: with period 4
# every latent cell of a striped region is identical and a nearest-upsampling decoder cannot draw sub-cell stripes.


@dataclass(frozen=True)
class Obj:
    """One object of a scene; (x, y) is its centre in pixels of a 64 x 64 canvas."""

    shape: str
    colour: str
    size: str
    texture: str
    x: float
    y: float

    @property
    def radius(self) -> float:
        return DIAMETER[self.size] / 2

    @property
    def extent(self) -> float:
        """Distance from the centre to the furthest point of the drawn shape (square and triangle corners
        reach beyond the bounding circle of ``radius``; see ``_polygon``)."""
        return self.radius * EXTENT[self.shape]


@dataclass(frozen=True)
class Phrase:
    """A noun phrase: ``count`` objects of ``shape``; attributes left None are not constrained."""

    shape: str
    count: int = 1
    colour: str | None = None
    size: str | None = None
    texture: str | None = None

    def text(self, article: bool = True) -> str:
        words = [w for w in (self.size, self.texture, self.colour) if w]
        noun = self.shape if self.count == 1 else self.shape + "s"
        head = ("a" if article else "one") if self.count == 1 else COUNT_WORDS[self.count]
        return " ".join([head, *words, noun])

    def matches(self, obj) -> bool:
        """Does ``obj`` (an :class:`Obj` or a judge detection: anything with these four fields) fit?"""
        return (
            obj.shape == self.shape
            and self.colour in (None, obj.colour)
            and self.size in (None, obj.size)
            and self.texture in (None, obj.texture)
        )


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for. ``relation`` links ``phrases[0]`` (subject) to ``phrases[1]``."""

    phrases: tuple[Phrase, ...]
    relation: str | None = None
    template: str = "single"  # single | pair | spatial | counting | multi

    @property
    def num_objects(self) -> int:
        return sum(p.count for p in self.phrases)

    def text(self) -> str:
        parts = [p.text() for p in self.phrases]
        if self.template == "spatial":
            return f"{parts[0]} {self.relation} {parts[1]}"
        if self.template == "multi":
            return "a photo of " + ", ".join(parts[:-1]) + ", and " + parts[-1]
        return " and ".join(parts)


# ----------------------------------------------------------------------------------------------- parsing
_PHRASE = re.compile(
    r"^(?P<head>a|an|one|two|three|four)\s+(?:(?P<size>small|big)\s+)?(?:(?P<texture>plain|striped)\s+)?"
    r"(?:(?P<colour>" + "|".join(COLOURS) + r")\s+)?(?P<shape>circle|square|triangle|star)s?$"
)
_WORD_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}


def parse_phrase(text: str, prompt: str) -> Phrase:
    m = _PHRASE.match(text.strip())
    if not m:
        raise ValueError(f"ToyWorld prompt {prompt!r}: cannot parse the phrase {text.strip()!r}")
    return Phrase(m["shape"], _WORD_COUNTS[m["head"]], m["colour"], m["size"], m["texture"])


def parse_prompt(prompt: str) -> PromptSpec:
    """Inverse of :meth:`PromptSpec.text` for the ToyWorld templates (case and spacing tolerant)."""
    text = " ".join(prompt.lower().replace(",", " , ").split()).rstrip(" .")
    if text.startswith("a photo of "):
        body = text[len("a photo of "):].replace(" , and ", " , ").replace(" and ", " , ")
        phrases = tuple(parse_phrase(p, prompt) for p in body.split(" , ") if p.strip())
        return PromptSpec(phrases, None, "multi")
    for rel in RELATIONS:
        if f" {rel} " in text:
            left, right = text.split(f" {rel} ", 1)
            return PromptSpec((parse_phrase(left, prompt), parse_phrase(right, prompt)), rel, "spatial")
    phrases = tuple(parse_phrase(p, prompt) for p in text.split(" and "))
    if any(p.count > 1 for p in phrases):
        template = "counting"
    else:
        template = "single" if len(phrases) == 1 else "pair"
    return PromptSpec(phrases, None, template)


# ---------------------------------------------------------------------------------------------- relations
def relation_holds(relation: str, a, b) -> bool:
    """Is ``a`` <relation> ``b``? Centres compared; the displacement must lie within 45 degrees of the axis
    (the rule T2I-CompBench's spatial metric uses on detection boxes)."""
    dx, dy = b.x - a.x, b.y - a.y  # image y grows downwards
    if relation == "to the left of":
        return dx > abs(dy)
    if relation == "to the right of":
        return -dx > abs(dy)
    if relation == "above":
        return dy > abs(dx)
    if relation == "below":
        return -dy > abs(dx)
    raise ValueError(f"unknown relation {relation!r}")


# ------------------------------------------------------------------------------------------ distributions
@dataclass(frozen=True)
class Distribution:
    """Prompt priors. ``templates`` are weights; ``canonical_p`` is the chance a shape takes its canonical
    colour (otherwise uniform over the others; None: uniform over all colours); size/texture words appear
    with ``size_word_p``/``texture_word_p``."""

    name: str
    templates: dict[str, float]
    canonical_p: float | None
    size_word_p: float = 0.3
    texture_word_p: float = 0.3
    striped_p: float = 0.3
    max_objects: int = 4


# Natural: ~85 % canonical colours, ~90 % of scenes with 1-2 objects (single + pair + spatial + 2-counts).
NATURAL = Distribution("natural", {"single": 0.62, "pair": 0.14, "spatial": 0.14, "counting": 0.07, "multi": 0.03}, 0.85)
# Compositional: uniform colours, 2-4 objects.
COMPOSITIONAL = Distribution("compositional", {"pair": 0.25, "spatial": 0.25, "counting": 0.25, "multi": 0.25}, None)
# COCO-like: natural colours as NATURAL, but several objects per image, like the COCO images TokenCompose trains on
# (about 3 categories per image, TokenCompose Section 4): every scene 2-4 objects.
COCO_LIKE = Distribution("coco_like", {"pair": 0.35, "spatial": 0.2, "counting": 0.15, "multi": 0.3}, 0.85)


def _colour(shape: str, dist: Distribution, rng: random.Random) -> str:
    if dist.canonical_p is None:
        return rng.choice(list(COLOURS))
    if rng.random() < dist.canonical_p:
        return CANONICAL[shape]
    return rng.choice([c for c in COLOURS if c != CANONICAL[shape]])


def _phrase(shape: str, dist: Distribution, rng: random.Random, count: int = 1) -> Phrase:
    size = rng.choice(SIZES) if rng.random() < dist.size_word_p else None
    texture = ("striped" if rng.random() < 0.5 else "plain") if rng.random() < dist.texture_word_p else None
    return Phrase(shape, count, _colour(shape, dist, rng), size, texture)


def _distinct(phrases: list[Phrase]) -> bool:
    """No two phrases could describe the same object (so exact counts are well defined)."""
    keys = [(p.shape, p.colour) for p in phrases]
    return len(set(keys)) == len(keys)


def sample_spec(dist: Distribution, rng: random.Random, template: str | None = None) -> PromptSpec:
    """Draw one prompt from ``dist`` (optionally forcing the template)."""
    template = template or rng.choices(list(dist.templates), weights=list(dist.templates.values()))[0]
    while True:
        if template == "single":
            phrases = [_phrase(rng.choice(SHAPES), dist, rng)]
        elif template in ("pair", "spatial"):
            phrases = [_phrase(s, dist, rng) for s in rng.sample(SHAPES, 2)]
        elif template == "multi":
            phrases = [_phrase(s, dist, rng) for s in rng.sample(SHAPES, rng.choice((3, 4)))]
        elif template == "counting":
            first = rng.randint(2, dist.max_objects)
            phrases = [_phrase(rng.choice(SHAPES), dist, rng, first)]
            if first < dist.max_objects and rng.random() < 0.5:
                phrases.append(_phrase(rng.choice(SHAPES), dist, rng, rng.randint(1, dist.max_objects - first)))
        else:
            raise ValueError(f"unknown template {template!r}")
        if _distinct(phrases):
            relation = rng.choice(RELATIONS) if template == "spatial" else None
            return PromptSpec(tuple(phrases), relation, template)


# ------------------------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class Scene:
    spec: PromptSpec
    objects: tuple[Obj, ...]
    noise_seed: int = 0

    @property
    def caption(self) -> str:
        return self.spec.text()


def _fill(phrase: Phrase, dist: Distribution, rng: random.Random) -> tuple[str, str, str]:
    colour = phrase.colour or _colour(phrase.shape, dist, rng)
    size = phrase.size or rng.choice(SIZES)
    texture = phrase.texture or ("striped" if rng.random() < dist.striped_p else "plain")
    return colour, size, texture


def _random_centres(radii: list[float], rng: random.Random, canvas: float) -> list[tuple[float, float]]:
    return [(rng.uniform(r + 1, canvas - r - 1), rng.uniform(r + 1, canvas - r - 1)) for r in radii]


def _grid_centres(radii: list[float], rng: random.Random, canvas: float) -> list[tuple[float, float]]:
    """Jittered 2 x 2 grid: each object in its own cell (always fits four big objects)."""
    cell = canvas / 2
    cells = rng.sample([(i, j) for i in range(2) for j in range(2)], len(radii))
    return [(i * cell + rng.uniform(r + 1.5, cell - r - 1.5), j * cell + rng.uniform(r + 1.5, cell - r - 1.5))
            for (i, j), r in zip(cells, radii)]


def place(spec: PromptSpec, dist: Distribution, rng: random.Random, canvas: float = 64.0, tries: int = 2000) -> Scene:
    """Objects satisfying ``spec`` at random non-overlapping positions (the relation with a clear margin).

    Uniform positions are tried first; crowded scenes (four big objects) fall back to a jittered grid."""
    attrs = [(p, *_fill(p, dist, rng)) for p in spec.phrases for _ in range(p.count)]
    radii = [DIAMETER[size] / 2 * EXTENT[p.shape] for p, _, size, _ in attrs]
    for attempt in range(tries):
        centres = (_random_centres if attempt < 200 else _grid_centres)(radii, rng, canvas)
        objs = [Obj(p.shape, colour, size, texture, x, y) for (p, colour, size, texture), (x, y) in zip(attrs, centres)]
        if any(math.dist((a.x, a.y), (b.x, b.y)) < a.extent + b.extent + GAP for i, a in enumerate(objs) for b in objs[i + 1:]):
            continue
        if spec.relation is not None:
            a, b = objs[0], objs[spec.phrases[0].count]
            # a clear margin: 1.5x dominance of the relation's axis and a visible displacement
            dx, dy = abs(b.x - a.x), abs(b.y - a.y)
            along, across = (dx, dy) if "left" in spec.relation or "right" in spec.relation else (dy, dx)
            if not (relation_holds(spec.relation, a, b) and along > 1.5 * across):
                continue
        return Scene(spec, tuple(objs), rng.randrange(2**31))
    raise RuntimeError(f"could not place {spec.text()!r} without overlap in {tries} tries")


def sample_scene(dist: Distribution, rng: random.Random, template: str | None = None) -> Scene:
    return place(sample_spec(dist, rng, template), dist, rng)


# ---------------------------------------------------------------------------------------------- rendering
def _polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        h = r * 0.86
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if shape == "triangle":
        return [(x, y - r), (x + r * 0.97, y + r * 0.8), (x - r * 0.97, y + r * 0.8)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((x + rad * math.cos(ang), y + rad * math.sin(ang)))
        return pts
    return None  # circle


def _draw_shape(draw: ImageDraw.ImageDraw, obj: Obj, scale: float, fill) -> None:
    x, y, r = obj.x * scale, obj.y * scale, obj.radius * scale
    poly = _polygon(obj.shape, x, y, r)
    if poly is None:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def render(scene: Scene, size: int = 64, supersample: int = 4, noise: float = 4.0) -> tuple[Image.Image, list[np.ndarray]]:
    """The scene as an RGB image of ``size`` pixels and one boolean mask per object (same order)."""
    big = size * supersample
    scale = big / 64.0
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    masks = []
    stripes = np.zeros((big, big), dtype=bool)
    period = STRIPE_PERIOD * scale
    stripes[(np.arange(big) // (period / 2)).astype(int) % 2 == 1, :] = True
    for obj in scene.objects:
        mask_img = Image.new("L", (big, big), 0)
        _draw_shape(ImageDraw.Draw(mask_img), obj, scale, 255)
        mask = np.asarray(mask_img) > 127
        colour = np.array(COLOURS[obj.colour], dtype=np.uint8)
        pixels = np.asarray(canvas).copy()
        pixels[mask] = colour
        if obj.texture == "striped":
            pixels[mask & stripes] = (colour * STRIPE_SHADE).astype(np.uint8)
        canvas = Image.fromarray(pixels)
        masks.append(mask_img)
    image = canvas.resize((size, size), Image.Resampling.BOX)  # area average: no ringing halo
    if noise > 0:
        rng = np.random.default_rng(scene.noise_seed)
        arr = np.asarray(image).astype(np.float32) + rng.normal(0, noise, (size, size, 3))
        image = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))
    small = [np.asarray(m.resize((size, size), Image.Resampling.BILINEAR)) > 127 for m in masks]
    return image, small


__all__ = [
    "BACKGROUND", "CANONICAL", "COCO_LIKE", "COLOURS", "COMPOSITIONAL", "COUNT_WORDS", "Distribution", "NATURAL",
    "Obj", "Phrase", "PromptSpec", "RELATIONS", "SHAPES", "SIZES", "Scene", "TEXTURES", "parse_prompt", "place",
    "relation_holds", "render", "sample_scene", "sample_spec",
]
