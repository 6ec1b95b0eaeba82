"""The exact ToyWorld judge: find every object in an image and read off its shape, colour, size and texture.

Pipeline (geometry in 64-px canvas units, scaled by ``image size / 64``):

1. *Foreground and colour.* A lightly smoothed copy of the image is compared with the known background.
   Each pixel's colour is the palette colour whose background-relative hue (angle in the opponent-colour
   plane of ``pixel - BACKGROUND``) is nearest; mixing with the grey background or darkening to the stripe
   shade keeps that angle. A pixel belongs to colour ``c`` if it is at least ``mask_level`` of the way from
   the background to ``c`` (RGB distance; so the mask edge sits at ~50 % coverage, like the renderer's
   masks) and its chroma is at least ``chroma_level`` of ``c``'s.
2. *Objects.* Per colour, 4-connected components with holes filled; components below ``min_area`` dropped.
3. *Attributes.* Shape from two scale-invariant mask features, solidity (area / convex-hull area: the star
   is the only concave shape) and extent (area / bounding-box area: square ~1, circle ~0.79, triangle ~0.5);
   size from the area relative to the expected small/big areas of that shape; texture from the amplitude
   of the row-mean brightness profile at the stripe frequency. All thresholds and expected values are
   *calibrated from the renderer*: at the first image of each resolution the judge renders a fixed set of
   single objects (clean and :func:`degrade`-d), measures the same features and puts each threshold at
   the spread-weighted midpoint between the two classes it separates.

:func:`match` and :class:`JudgeScore` implement the object-level accuracy used to check the judge.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.spatial import ConvexHull, QhullError

from t2i_align.toyworld.world import (
    BACKGROUND, COLOURS, DIAMETER, SHAPES, SIZES, STRIPE_PERIOD, STRIPE_SHADE, Obj, PromptSpec, Scene, render,
)

_BG = np.array(BACKGROUND, dtype=np.float32) / 255
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32) / 255
_NAMES = tuple(COLOURS)


@dataclass(frozen=True)
class Detection:
    """One detected object. Coordinates are in 64-px canvas units whatever the image size."""

    shape: str
    colour: str
    size: str
    texture: str
    x: float  # estimated centre of the object's bounding circle (as ``Obj.x``)
    y: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    mask: np.ndarray = field(repr=False, compare=False)  # bool, image resolution
    area: float = 0.0  # in 64-px canvas pixels


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


# -------------------------------------------------------------------------------------------- thresholds
def _split(a: np.ndarray, b: np.ndarray) -> float:
    """Threshold between samples ``a`` (lower class) and ``b``: the midpoint of the means weighted by the
    spreads (equal number of standard deviations from either mean)."""
    ma, mb = float(np.mean(a)), float(np.mean(b))
    sa, sb = float(np.std(a)) + 1e-6, float(np.std(b)) + 1e-6
    return (ma * sb + mb * sa) / (sa + sb)


@dataclass(frozen=True)
class Calibration:
    """Thresholds measured on renders at one image size (log-areas and log-stripe scores)."""

    star_solidity: float  # solidity below this: star
    square_extent: float  # extent above this (non-star): square
    triangle_extent: float  # extent below this (non-star): triangle
    log_area_split: dict[str, float]  # per shape: log area (64-px units) above this: big
    expected_area: dict[tuple[str, str], float]  # (shape, size) -> mean area, 64-px units
    centre_offset: dict[str, tuple[float, float]]  # per shape: (true centre - box centre) / box (w, h)
    log_stripe_split: float  # log stripe score above this: striped


@dataclass
class _Blob:
    colour: str
    mask: np.ndarray  # full-image bool
    features: dict[str, float]
    box: tuple[float, float, float, float]  # pixels


# ------------------------------------------------------------------------------------------------- judge
class ToyJudge:
    """Detects ToyWorld objects and their attributes (see the module docstring).

    Args:
        min_area: components smaller than this (64-px canvas pixels) are noise, not objects.
        mask_level: fraction of the RGB distance from background to a colour a pixel must reach to belong to it.
        chroma_level: fraction of the colour's chroma a pixel must reach (rejects grey/dark pixels).
        smooth_sigma: Gaussian denoising before segmentation, in 64-px canvas pixels.
        calibration_objects: renders per (shape, size, texture, clean/degraded) used for calibration.
        seed: seed of the calibration renders.
    """

    def __init__(
        self,
        min_area: float = 12.0,
        mask_level: float = 0.5,
        chroma_level: float = 0.2,
        smooth_sigma: float = 0.5,
        calibration_objects: int = 6,
        seed: int = 1234,
    ) -> None:
        self.min_area = min_area
        self.mask_level = mask_level
        self.chroma_level = chroma_level
        self.smooth_sigma = smooth_sigma
        self.calibration_objects = calibration_objects
        self.seed = seed
        diff = _PALETTE - _BG
        self._angles = np.arctan2(*_opponent(diff)[::-1])
        self._dist = np.linalg.norm(diff, axis=1)
        self._chroma = np.hypot(*_opponent(diff))
        self._calibrations: dict[int, Calibration] = {}

    # ---------------------------------------------------------------------------------------- public
    def detect(self, image) -> list[Detection]:
        """All objects in ``image`` (PIL RGB, uint8/float HxWx3 array, or float 3xHxW tensor in [0, 1])."""
        arr = to_array(image)
        cal = self.calibration(arr.shape[0])
        return [self._classify(blob, cal, arr.shape[0] / 64) for blob in self._blobs(arr)]

    def detect_batch(self, images: torch.Tensor) -> list[list[Detection]]:
        """:meth:`detect` for each image of a B x 3 x H x W batch in [0, 1]."""
        return [self.detect(image) for image in images]

    def calibration(self, size: int) -> Calibration:
        """Thresholds for ``size``-px images, measured once on renders."""
        if size not in self._calibrations:
            self._calibrations[size] = self._calibrate(size)
        return self._calibrations[size]

    # ----------------------------------------------------------------------------------- segmentation
    def _blobs(self, arr: np.ndarray) -> list[_Blob]:
        s = arr.shape[0] / 64
        smooth = ndimage.gaussian_filter(arr, sigma=(self.smooth_sigma * s, self.smooth_sigma * s, 0), mode="nearest")
        diff = smooth - _BG
        o1, o2 = _opponent(diff.reshape(-1, 3))
        gap = np.angle(np.exp(1j * (np.arctan2(o2, o1)[:, None] - self._angles[None, :])))
        label = np.abs(gap).argmin(axis=1).reshape(arr.shape[:2])
        chroma = np.hypot(o1, o2).reshape(arr.shape[:2])
        dist = np.linalg.norm(diff, axis=2)
        blobs = []
        for k, name in enumerate(_NAMES):
            fg = (label == k) & (dist >= self.mask_level * self._dist[k]) & (chroma >= self.chroma_level * self._chroma[k])
            comps, n = ndimage.label(fg)
            for i, sl in enumerate(ndimage.find_objects(comps), start=1):
                crop = ndimage.binary_fill_holes(comps[sl] == i)
                if crop.sum() / s**2 < self.min_area:
                    continue
                mask = np.zeros(arr.shape[:2], dtype=bool)
                mask[sl] |= crop
                box = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
                feats = _shape_features(crop)
                feats["stripe"] = _stripe_score(arr[sl], crop, _PALETTE[k], STRIPE_PERIOD * s)
                blobs.append(_Blob(name, mask, feats, box))
        return blobs

    def _classify(self, blob: _Blob, cal: Calibration, s: float) -> Detection:
        f = blob.features
        if f["solidity"] < cal.star_solidity:
            shape = "star"
        elif f["extent"] > cal.square_extent:
            shape = "square"
        elif f["extent"] < cal.triangle_extent:
            shape = "triangle"
        else:
            shape = "circle"
        area = f["area"] / s**2
        size = "big" if math.log(area) > cal.log_area_split[shape] else "small"
        texture = "striped" if math.log(f["stripe"] + 1e-4) > cal.log_stripe_split else "plain"
        x0, y0, x1, y1 = (v / s for v in blob.box)
        ox, oy = cal.centre_offset[shape]
        x, y = (x0 + x1) / 2 + ox * (x1 - x0), (y0 + y1) / 2 + oy * (y1 - y0)
        return Detection(shape, blob.colour, size, texture, x, y, (x0, y0, x1, y1), blob.mask, area)

    # ------------------------------------------------------------------------------------ calibration
    def _calibrate(self, size: int) -> Calibration:
        rows: list[tuple[Obj, dict[str, float], tuple[float, float, float, float]]] = []
        rng = random.Random(self.seed)
        nrng = np.random.default_rng(self.seed)
        s = size / 64
        for shape in SHAPES:
            for sz in SIZES:
                for texture in ("plain", "striped"):
                    for k in range(2 * self.calibration_objects):
                        obj = Obj(shape, rng.choice(_NAMES), sz, texture, 32 + rng.uniform(-2, 2), 32 + rng.uniform(-2, 2))
                        image, _ = render(Scene(PromptSpec(()), (obj,), rng.randrange(2**31)), size=size)
                        arr = degrade(image, nrng) if k % 2 else to_array(image)
                        blobs = self._blobs(arr)
                        if len(blobs) != 1:
                            raise RuntimeError(f"calibration: {len(blobs)} components for {obj} at {size} px")
                        rows.append((obj, blobs[0].features, tuple(v / s for v in blobs[0].box)))

        def feat(name: str, **where: str) -> np.ndarray:
            return np.array([f[name] for o, f, _ in rows if all(getattr(o, a) == v for a, v in where.items())])

        solid = {sh: feat("solidity", shape=sh) for sh in SHAPES}
        extent = {sh: feat("extent", shape=sh) for sh in SHAPES}
        non_star_min = min((solid[sh] for sh in ("circle", "square", "triangle")), key=np.mean)
        log_area = {(sh, sz): np.log(feat("area", shape=sh, size=sz) / s**2) for sh in SHAPES for sz in SIZES}
        offsets = {}
        for sh in SHAPES:
            sel = [(o, b) for o, _, b in rows if o.shape == sh]
            offsets[sh] = (
                float(np.mean([(o.x - (b[0] + b[2]) / 2) / (b[2] - b[0]) for o, b in sel])),
                float(np.mean([(o.y - (b[1] + b[3]) / 2) / (b[3] - b[1]) for o, b in sel])),
            )
        return Calibration(
            star_solidity=_split(solid["star"], non_star_min),
            square_extent=_split(extent["circle"], extent["square"]),
            triangle_extent=_split(extent["triangle"], extent["circle"]),
            log_area_split={sh: _split(log_area[sh, "small"], log_area[sh, "big"]) for sh in SHAPES},
            expected_area={k: float(np.exp(v).mean()) for k, v in log_area.items()},
            centre_offset=offsets,
            log_stripe_split=_split(np.log(feat("stripe", texture="plain") + 1e-4), np.log(feat("stripe", texture="striped") + 1e-4)),
        )


# ---------------------------------------------------------------------------------------------- features
def _opponent(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Opponent-colour coordinates (the plane orthogonal to grey) of ``... x 3`` values."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (r - g) / math.sqrt(2), (r + g - 2 * b) / math.sqrt(6)


def _shape_features(crop: np.ndarray) -> dict[str, float]:
    """Area (pixels), extent (area / box area) and solidity (area / convex hull of the pixel squares)."""
    area = float(crop.sum())
    ys, xs = np.nonzero(crop)
    corners = np.unique(np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)]), axis=0)
    try:
        hull = ConvexHull(corners).volume
    except QhullError:
        hull = area
    return {"area": area, "extent": area / crop.size, "solidity": area / hull}


def _stripe_score(pixels: np.ndarray, crop: np.ndarray, colour: np.ndarray, period: float) -> float:
    """Relative amplitude of the row-mean shade (pixel projected on ``colour``) at the stripe frequency,
    over the mask's interior (eroded by one pixel when that leaves at least two pixels a row on average)."""
    inner = ndimage.binary_erosion(crop)
    rows = np.nonzero(inner.any(axis=1))[0]
    if inner.sum() < 2 * len(rows) or len(rows) < 2:
        inner = crop
    shade = pixels @ colour / float(colour @ colour)
    counts = inner.sum(axis=1)
    keep = counts > 0
    profile = (shade * inner).sum(axis=1)[keep] / counts[keep]
    r = np.nonzero(keep)[0]
    if len(profile) < 2:
        return 0.0
    wave = np.exp(-2j * math.pi * r / period)
    amp = 2 * abs(np.sum((profile - profile.mean()) * wave)) / len(profile)
    return float(amp / max(profile.mean(), 1e-3))


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


__all__ = ["ATTRIBUTES", "Calibration", "Detection", "JudgeScore", "ToyJudge", "degrade", "match", "to_array"]
