"""The exact ToyWorld judge: find every object in an image and read off its shape, colour, size and texture.

Geometry is in 64-px canvas units and scales with ``image size / 64``. Pipeline:

1. *Segmentation.* On a lightly smoothed copy (``smooth_sigma``), each pixel takes the palette colour whose hue relative to
   the background (angle of ``pixel - BACKGROUND`` in the opponent-colour plane) is nearest; mixing with
   the grey background, darkening to the stripe shade and blur all keep that angle. A pixel belongs to
   colour ``c`` if it lies at least ``mask_level`` of the way from the background to ``c`` (RGB distance;
   so the mask edge sits at ~50 % coverage, like the renderer's masks) and has at least ``chroma_level``
   of ``c``'s chroma. Per colour: 4-connected components, holes filled (a hole's content belongs to the
   enclosing object), components below ``min_area`` dropped. Same-colour objects whose corners touch (squares and triangles reach beyond their bounding
   circle) are split where an erosion by ``split_erosion`` leaves several sizeable cores.
2. *Unmixing.* On the raw image every pixel near the object is written as
   ``BACKGROUND + a (c - BACKGROUND) + b (STRIPE_SHADE c - BACKGROUND)``: ``a + b`` is the object's coverage
   (exact under antialiasing and any blur, since both are linear) and ``b`` its dark-stripe share.
3. *Shape and size* by template matching: the coverage map is compared (sum of squared differences) with
   the renderer's own coverage of each shape x size, drawn with the same centroid and blurred by each of
   ``blur_grid``; the best fit wins and also gives the centre (so ``Detection.x/y`` estimate ``Obj.x/y``).
   Objects covering less than ``min_coverage`` are dropped as noise.
4. *Texture*: amplitude, at the stripe frequency, of the rows' dark share (``b`` over ``a + b`` per row,
   phase-free), relative to that of a clean render of a striped square; striped above ``stripe_level``.
   Clean: plain < 0.08, striped > 0.7; degraded (blur sigma <= 1 px, noise 0.05): plain < 0.2, striped
   > 0.2 with rare exceptions among small objects. Blur beyond ~1.5 px erases the stripes (read as plain).

:func:`match` and :class:`JudgeScore` implement the object-level accuracy used to check the judge.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from t2i_align.toyworld.world import (
    BACKGROUND, COLOURS, COMPOSITIONAL, NATURAL, SHAPES, SIZES, STRIPE_PERIOD, STRIPE_SHADE, Obj, PromptSpec, Scene,
    _draw_shape, render, sample_scene,
)

_BG = np.array(BACKGROUND, dtype=np.float32) / 255
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32) / 255
_NAMES = tuple(COLOURS)
_SUPERSAMPLE = 4  # as the renderer


@dataclass(frozen=True)
class Detection:
    """One detected object. Coordinates are in 64-px canvas units whatever the image size."""

    shape: str
    colour: str
    size: str
    texture: str
    x: float  # centre of the object's bounding circle (as ``Obj.x``), from the best-fitting template
    y: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 of the mask
    mask: np.ndarray = field(repr=False, compare=False)  # bool, image resolution
    area: float = 0.0  # coverage (sum of a + b), 64-px canvas pixels


# ------------------------------------------------------------------------------------------------ inputs
def to_array(image) -> np.ndarray:
    """``image`` (PIL RGB, uint8 or float HxWx3 array, or float 3xHxW tensor in [0, 1]) as float32 HxWx3 in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB")).astype(np.float32) / 255
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a 3xHxW tensor, got shape {tuple(image.shape)}")
        return image.detach().to("cpu", torch.float32).permute(1, 2, 0).numpy()
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 array, got shape {arr.shape}")
    return arr.astype(np.float32) / 255 if arr.dtype == np.uint8 else arr.astype(np.float32)


def degrade(image, rng: np.random.Generator, blur: tuple[float, float] = (0.5, 1.0), noise: float = 0.05) -> np.ndarray:
    """Gaussian blur (sigma uniform in ``blur``, in 64-px canvas pixels) then Gaussian pixel noise (sigma
    ``noise`` on the [0, 1] scale), like an imperfect generated image. Returns float32 HxWx3 in [0, 1]."""
    arr = to_array(image)
    sigma = rng.uniform(*blur) * arr.shape[0] / 64
    arr = ndimage.gaussian_filter(arr, sigma=(sigma, sigma, 0), mode="nearest")
    arr = arr + rng.normal(0.0, noise, arr.shape)
    return np.clip(arr, 0, 1).astype(np.float32)


# ------------------------------------------------------------------------------------------- templates
def _coverage(shape: str, size: str, x: float, y: float, s: float, h: int, w: int) -> np.ndarray:
    """The renderer's coverage (0..1) of a ``shape`` x ``size`` object centred at image pixel (x, y), on an
    h x w image of scale ``s`` (image px per canvas px)."""
    ss = _SUPERSAMPLE
    canvas = Image.new("L", (w * ss, h * ss), 0)
    _draw_shape(ImageDraw.Draw(canvas), Obj(shape, "red", size, "plain", x / s, y / s), ss * s, 255)
    return np.asarray(canvas, dtype=np.float32).reshape(h, ss, w, ss).mean(axis=(1, 3)) / 255


@lru_cache(maxsize=None)
def _centroid_offset(shape: str, size: str, s: float) -> tuple[float, float]:
    """(coverage centroid - object centre) in image pixels, measured on the renderer's own drawing."""
    n = math.ceil(32 * s)
    cov = _coverage(shape, size, n / 2, n / 2, s, n, n)
    ys, xs = np.mgrid[:n, :n] + 0.5
    return float((cov * xs).sum() / cov.sum() - n / 2), float((cov * ys).sum() / cov.sum() - n / 2)


def _unmixing() -> np.ndarray:
    """Per colour the 2 x 3 least-squares inverse of [c - BG, STRIPE_SHADE c - BG]."""
    return np.stack([np.linalg.pinv(np.stack([c - _BG, STRIPE_SHADE * c - _BG], 1)) for c in _PALETTE]).astype(np.float32)


# ------------------------------------------------------------------------------------------------- judge
class ToyJudge:
    """Detects ToyWorld objects and their attributes (see the module docstring).

    Args:
        min_area: components whose mask is smaller than this (64-px canvas pixels) are noise.
        min_coverage: objects whose coverage (``Detection.area``) is smaller than this are noise too (the
            smallest object, a small star, covers 56; noise specks pass ``min_area`` at 32 px).
        mask_level: fraction of the RGB distance from background to a colour a pixel must reach to belong to it.
        chroma_level: fraction of the colour's chroma a pixel must also reach (rejects grey and dark pixels).
        smooth_sigma: Gaussian denoising before segmentation, in image pixels (the noise is per pixel);
            attributes use the raw image.
        split_erosion: erosion depth (canvas px) that separates touching same-colour objects.
        split_min_core: an eroded core counts as an object if at least this big (canvas px).
        blur_grid: blur sigmas (canvas px) tried for the templates.
        stripe_level: stripe amplitude of the dark share, as a fraction of a clean render's, above which an
            object is striped.
    """

    def __init__(
        self,
        min_area: float = 12.0,
        min_coverage: float = 28.0,
        mask_level: float = 0.5,
        chroma_level: float = 0.2,
        smooth_sigma: float = 0.7,
        split_erosion: float = 2.0,
        split_min_core: float = 6.0,
        blur_grid: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0),
        stripe_level: float = 0.2,
    ) -> None:
        self.min_area = min_area
        self.min_coverage = min_coverage
        self.mask_level = mask_level
        self.chroma_level = chroma_level
        self.smooth_sigma = smooth_sigma
        self.split_erosion = split_erosion
        self.split_min_core = split_min_core
        self.blur_grid = blur_grid
        self.stripe_level = stripe_level
        diff = _PALETTE - _BG
        o1, o2 = _opponent(diff)
        self._angles = np.arctan2(o2, o1)
        self._dist = np.linalg.norm(diff, axis=1)
        self._chroma = np.hypot(o1, o2)
        self._unmix = _unmixing()
        self._references: dict[int, float] = {}

    def detect(self, image) -> list[Detection]:
        """All objects in the square ``image`` (PIL RGB, uint8/float HxWx3 array, or float 3xHxW tensor in [0, 1])."""
        arr = to_array(image)
        owner, colours = self._segment(arr)
        found = (self._describe(arr, owner, i + 1, colour) for i, colour in enumerate(colours))
        return [d for d in found if d.area >= self.min_coverage]

    def detect_batch(self, images: torch.Tensor) -> list[list[Detection]]:
        """:meth:`detect` for each image of a B x 3 x H x W batch in [0, 1]."""
        return [self.detect(image) for image in images.detach().to("cpu", torch.float32)]

    # ----------------------------------------------------------------------------------- segmentation
    def _segment(self, arr: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """Label map (0 = background, i = object i) and each object's palette index."""
        s = arr.shape[0] / 64
        smooth = ndimage.gaussian_filter(arr, sigma=(self.smooth_sigma, self.smooth_sigma, 0), mode="nearest")
        diff = smooth - _BG
        o1, o2 = _opponent(diff)
        chroma, dist = np.hypot(o1, o2), np.linalg.norm(diff, axis=2)
        label = np.full(arr.shape[:2], -1)
        cand = dist >= self.mask_level * self._dist.min()  # the hue only matters where some colour may pass
        gap = np.abs((np.arctan2(o2[cand], o1[cand])[:, None] - self._angles + math.pi) % (2 * math.pi) - math.pi)
        label[cand] = gap.argmin(axis=1)
        found = []  # (pixels, colour, slice, filled mask) of every component big enough
        for k in range(len(_NAMES)):
            fg = (label == k) & (dist >= self.mask_level * self._dist[k]) & (chroma >= self.chroma_level * self._chroma[k])
            comps, _ = ndimage.label(fg)
            for i, sl in enumerate(ndimage.find_objects(comps), start=1):
                crop = ndimage.binary_fill_holes(comps[sl] == i)
                if crop.sum() >= self.min_area * s**2:
                    found.append((int(crop.sum()), k, sl, crop))
        owner = np.zeros(arr.shape[:2], dtype=np.int32)
        colours: list[int] = []
        for _, k, sl, crop in sorted(found, key=lambda f: -f[0]):  # biggest first: a hole's content is its
            crop = crop & (owner[sl] == 0)  # enclosing object's
            if crop.sum() < self.min_area * s**2:
                continue
            for part in self._split(crop, s):
                colours.append(k)
                owner[sl][part] = len(colours)
        return owner, colours

    def _split(self, crop: np.ndarray, s: float) -> list[np.ndarray]:
        """``crop`` as one mask per object: touching objects keep separate cores under erosion."""
        depth = max(1, round(self.split_erosion * s))
        padded = np.pad(crop, depth)
        cores, n = ndimage.label(ndimage.binary_erosion(padded, np.ones((3, 3), bool), iterations=depth))
        sizes = ndimage.sum_labels(np.ones_like(cores), cores, range(1, n + 1))
        keep = [i + 1 for i, a in enumerate(sizes) if a >= self.split_min_core * s**2]
        if len(keep) < 2:
            return [crop]
        seeds = np.where(np.isin(cores, keep), cores, 0)
        _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
        nearest = seeds[iy, ix][depth:-depth, depth:-depth]
        return [crop & (nearest == i) for i in keep]

    # ------------------------------------------------------------------------------------- attributes
    def _describe(self, arr: np.ndarray, owner: np.ndarray, index: int, k: int) -> Detection:
        s = arr.shape[0] / 64
        h, w = owner.shape
        mask = owner == index
        ys, xs = np.nonzero(mask)
        m = math.ceil(3 * s)
        y0, y1, x0, x1 = max(ys.min() - m, 0), min(ys.max() + 1 + m, h), max(xs.min() - m, 0), min(xs.max() + 1 + m, w)
        win = (slice(y0, y1), slice(x0, x1))
        mine = mask[win]
        usable = (owner[win] == 0) | mine  # pixels of other objects are left out of every comparison
        near = ndimage.binary_dilation(mine, iterations=max(1, math.ceil(2 * s))) & usable
        coef = (arr[win] - _BG) @ self._unmix[k].T  # a, b per pixel
        cover = coef[..., 0] + coef[..., 1]
        weight = np.where(near, np.clip(cover, 0, None), 0) + 1e-6 * mine  # (never all zero)
        yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
        cx, cy = (weight * xx).sum() / weight.sum(), (weight * yy).sum() / weight.sum()

        classes = [(shape, size) for shape in SHAPES for size in SIZES]
        centres = [(cx - x0 - ox, cy - y0 - oy) for ox, oy in (_centroid_offset(*c, s) for c in classes)]
        tmpl = np.stack([_coverage(*c, px, py, s, y1 - y0, x1 - x0) for c, (px, py) in zip(classes, centres)])
        errors = np.stack([  # blur x class
            (((cover - (ndimage.gaussian_filter(tmpl, (0, sigma * s, sigma * s), mode="constant") if sigma > 0 else tmpl))
              * usable) ** 2).sum(axis=(1, 2))
            for sigma in self.blur_grid
        ])
        best = int(errors.min(axis=0).argmin())
        (shape, size), (px, py) = classes[best], (centres[best][0] + x0, centres[best][1] + y0)

        texture = "striped" if self._stripe(coef, mine, s) > self.stripe_level * self._stripe_reference(arr.shape[0]) else "plain"

        box = (float(xs.min() / s), float(ys.min() / s), float((xs.max() + 1) / s), float((ys.max() + 1) / s))
        area = float((cover * near).sum()) / s**2
        return Detection(shape, _NAMES[k], size, texture, float(px / s), float(py / s), box, mask, area)

    @staticmethod
    def _stripe(coef: np.ndarray, mask: np.ndarray, s: float) -> float:
        """Amplitude, at the stripe frequency, of the rows' dark share over ``mask`` (pixels weighted by coverage)."""
        weight = mask * np.clip(coef[..., 0] + coef[..., 1], 0, 1)
        dark, cover = (coef[..., 1] * weight).sum(axis=1), ((coef[..., 0] + coef[..., 1]) * weight).sum(axis=1)
        wave = np.exp(-2j * math.pi * np.arange(len(dark)) / (STRIPE_PERIOD * s))
        return 2 * abs((dark * wave).sum()) / max(cover.sum(), 1e-6)

    def _stripe_reference(self, size: int) -> float:
        """:meth:`_stripe` of a clean render of a big striped square at ``size`` px (the full stripe signal)."""
        if size not in self._references:
            obj = Obj("square", "red", "big", "striped", 32.0, 32.0)
            arr = to_array(render(Scene(PromptSpec(()), (obj,)), size=size, noise=0)[0])
            k = _NAMES.index("red")
            mask = self._segment(arr)[0] == 1
            self._references[size] = self._stripe((arr - _BG) @ self._unmix[k].T, mask, size / 64)
        return self._references[size]


def _opponent(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Opponent-colour coordinates (the plane orthogonal to grey) of ``... x 3`` values."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (r - g) / math.sqrt(2), (r + g - 2 * b) / math.sqrt(6)


# ---------------------------------------------------------------------------------------------- scoring
def match(detections: list[Detection], objects: tuple[Obj, ...] | list[Obj]) -> list[tuple[int, int]]:
    """One-to-one (object index, detection index) pairs: minimum total centre distance (Hungarian), a pair
    counting only if the detection's centre lies within the object's radius."""
    if not detections or not objects:
        return []
    cost = np.array([[math.dist((o.x, o.y), (d.x, d.y)) for d in detections] for o in objects])
    radius = np.array([o.radius for o in objects])[:, None]
    rows, cols = linear_sum_assignment(np.where(cost <= radius, cost, 1e6))
    return [(int(i), int(j)) for i, j in zip(rows, cols) if cost[i, j] <= radius[i, 0]]


ATTRIBUTES = ("shape", "colour", "size", "texture")


@dataclass
class JudgeScore:
    """Accumulates object-level accuracy: objects matched with all attributes right / (objects + unmatched
    detections). Per-attribute accuracies use the same denominator; count accuracy is per image."""

    objects: int = 0
    unmatched: int = 0
    exact: int = 0
    images: int = 0
    count_ok: int = 0
    seconds: float = 0.0  # time spent judging (filled by :func:`score_renders`)
    attribute: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ATTRIBUTES, 0))

    def update(self, detections: list[Detection], objects: tuple[Obj, ...] | list[Obj]) -> None:
        pairs = match(detections, objects)
        self.objects += len(objects)
        self.unmatched += len(detections) - len(pairs)
        self.images += 1
        self.count_ok += len(detections) == len(objects)
        for i, j in pairs:
            ok = [getattr(objects[i], a) == getattr(detections[j], a) for a in ATTRIBUTES]
            self.exact += all(ok)
            for a, good in zip(ATTRIBUTES, ok):
                self.attribute[a] += good

    @property
    def accuracy(self) -> float:
        return self.exact / max(self.objects + self.unmatched, 1)

    @property
    def count_accuracy(self) -> float:
        return self.count_ok / max(self.images, 1)

    def attribute_accuracy(self, name: str) -> float:
        return self.attribute[name] / max(self.objects + self.unmatched, 1)


def held_out_scenes(count: int, seed: int) -> list[Scene]:
    """``count`` scenes, alternately NATURAL and COMPOSITIONAL, scene i from ``random.Random(seed + i)``."""
    return [sample_scene(COMPOSITIONAL if i % 2 else NATURAL, random.Random(seed + i)) for i in range(count)]


def score_renders(judge: ToyJudge, scenes: list[Scene], size: int = 64, degraded: bool = False) -> JudgeScore:
    """Renders ``scenes`` at ``size`` px (optionally :func:`degrade`-d, seeded by the scene's noise seed) and
    scores ``judge`` on them."""
    score = JudgeScore()
    for scene in scenes:
        image = render(scene, size=size)[0]
        if degraded:
            image = degrade(image, np.random.default_rng(scene.noise_seed + 1))
        start = time.perf_counter()
        detections = judge.detect(image)
        score.seconds += time.perf_counter() - start
        score.update(detections, scene.objects)
    return score


__all__ = [
    "ATTRIBUTES", "Detection", "JudgeScore", "ToyJudge", "degrade", "held_out_scenes", "match", "score_renders", "to_array",
]
