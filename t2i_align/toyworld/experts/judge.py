"""The exact ToyWorld judge: find every object in an image and read off its shape, colour, size and texture.

Geometry is in 64-px canvas units and scales with ``image size / 64``. Pipeline:

1. *Segmentation.* On a lightly smoothed copy (``smooth_sigma``), each pixel takes the palette colour whose hue relative to
   the background (angle of ``pixel - BACKGROUND`` in the opponent-colour plane) is nearest; mixing with
   the grey background, darkening to the stripe shade and blur all keep that angle. A pixel belongs to
   colour ``c`` if it lies at least ``mask_level`` of the way from the background to ``c`` (RGB distance;
   so the mask edge sits at ~50 % coverage, like the renderer's masks) and has at least ``chroma_level``
   of ``c``'s chroma. Per colour: 4-connected components, holes filled (a hole's content belongs to the
   enclosing object), components below ``min_area`` dropped. Same-colour objects whose corners touch (squares and triangles reach beyond their bounding
   circle) are split where an erosion by ``split_erosion`` leaves several sizeable cores. Only the
   ``max_candidates`` largest components go on (a scene has at most 4 objects; noise has hundreds of specks).
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
5. *Plausibility.* The judge scores generated images, and an untrained or broken generator draws noise,
   smears and colour blobs, not objects: a candidate is kept only if it looks like a rendered object. The
   cheap tests come first, so that garbage is mostly rejected before the template matching (a 64-px noise
   image takes ~15 ms): the mask is no bigger than any object (``max_area``) and the coverage within
   ``coverage_range`` of some template's area; the colour is pure (the object's colour and its stripe shade
   explain at least ``min_purity`` of the mask's ``pixel - BACKGROUND`` energy); the object stands on
   background (median colour of the window beyond ``near`` within ``max_background`` of BACKGROUND). Then
   the best template fits (``fit = 1 - SSD(coverage, template) / SSD(coverage, 0)`` at least ``min_fit``),
   its area matches the coverage (``coverage_range``), and it fits better than itself blurred by
   ``smear_sigma`` (smears are blurrier than any allowed blur). Purity and fit discount the pixel noise,
   estimated around the object (up to ``max_noise``), so that noisy but clear objects still pass. The
   thresholds are set between the scores of real objects in renders and those of candidates in garbage
   images (:func:`garbage`); see :class:`ToyJudge` and ``experiments/toyworld/judge_quality.py --scores``.

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
    fit: float = 1.0  # 1 - SSD(coverage, best template) / SSD(coverage, 0), noise discounted: 1 is perfect
    purity: float = 1.0  # share of the mask's colour signal explained by the object's colour (see ToyJudge)


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


GARBAGE = ("uniform", "salt_pepper", "blobs", "smear")


def garbage(kind: str, rng: np.random.Generator, size: int = 64) -> torch.Tensor:
    """A 3 x size x size image in [0, 1] with no object in it, like the output of an untrained generator:
    ``uniform`` noise; ``salt_pepper``: background with 30 % of the pixels set to random RGB corner colours;
    ``blobs``: ``rand(3, 8, 8)`` upsampled bicubic; ``smear``: a scene rendered then blurred by sigma 4 canvas px
    (shapes unrecognisable). The judge should find (almost) nothing in them."""
    if kind == "uniform":
        return torch.from_numpy(rng.random((3, size, size), dtype=np.float32))
    if kind == "salt_pepper":
        arr = np.repeat(np.repeat(_BG[:, None, None], size, 1), size, 2)
        hit = rng.random((size, size)) < 0.3
        arr[:, hit] = rng.integers(0, 2, (3, int(hit.sum()))).astype(np.float32)
        return torch.from_numpy(arr)
    if kind == "blobs":
        cells = torch.from_numpy(rng.random((1, 3, 8, 8), dtype=np.float32))
        return torch.nn.functional.interpolate(cells, size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    if kind == "smear":
        scene = sample_scene(NATURAL, random.Random(int(rng.integers(2**31))))
        sigma = 4 * size / 64
        arr = ndimage.gaussian_filter(to_array(render(scene, size=size)[0]), (sigma, sigma, 0), mode="nearest")
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    raise ValueError(f"unknown kind {kind!r}; expected one of {GARBAGE}")


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


# Coverage of each shape x size (SHAPES x SIZES order), 64-px canvas pixels: 59 (small star) to 353 (big circle).
_AREAS = np.array([_coverage(shape, size, 32.0, 32.0, 1.0, 64, 64).sum() for shape in SHAPES for size in SIZES])


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

    Plausibility (module docstring, step 5). Ranges quoted: real objects in renders at 32/48/64 px (~650
    per condition: clean; degraded, i.e. blur 0.5-1 px + noise 0.05; blur 1.5-2 px + noise 0.05; and,
    beyond the bars, blur 0.5-1.5 px + noise 0.1 or 0.15) vs. all candidates of 300 garbage images per
    kind (uniform noise, salt-and-pepper, colour blobs, sigma-4 smears: :func:`garbage`):

        max_candidates: components judged per image, largest first (the work is bounded on noise).
        max_area: masks bigger than this (canvas px) are no object (renders <= 388; blobs up to 795).
        coverage_range: coverage / best template's area must lie in this range (renders 0.60-1.11; medians
            0.43 uniform, 0.33 salt-and-pepper, 0.65 blobs). Coverage out of this range of every template's
            area (59-353) is rejected before the matching.
        min_purity: ``1 - residual / signal`` over the mask, with signal the energy of ``pixel - BACKGROUND``
            and residual that of its part outside the plane of the colour and its stripe shade, both less
            the noise's share (renders >= 0.994, >= 0.971 at noise 0.15; 1 % quantiles 0.89 uniform, 0.77
            salt-and-pepper, 0.93 blobs).
        max_background: distance of the median colour of the window's pixels beyond ``near`` (2-3 canvas px
            from the mask and the window's corners; other candidates included) from BACKGROUND (renders
            <= 0.135; blobs >= 0.22 (0.1 % quantile 0.33), uniform noise >= 0.48). Decides the colour blobs.
        min_fit: ``1 - (SSD(coverage, best template) - noise) / (SSD(coverage, 0) - noise)`` (renders
            >= 0.948, >= 0.88 at noise 0.15; uniform noise <= 0.84, salt-and-pepper <= 0.65; blobs up to
            0.99 and smears up to 0.95, which fail other tests). Decides salt-and-pepper.
        smear_sigma: the best template blurred by this much (canvas px) must fit worse than the best template
            (``sharpness`` = SSD(smeared) / SSD(best) > 1: renders >= 1.39, >= 1.07 at noise 0.15; smears
            <= 0.68). Decides the smears.
        max_noise: the largest per-channel pixel-noise sigma discounted from purity and fit. The noise is
            estimated around each object, from the pixels' differences to their 3 x 3 mean (robustly); on
            salt-and-pepper that estimate is ~0.25 and would let specks through.

    :attr:`SCORES` names the scores; :meth:`candidates` returns them for every candidate.
    """

    SCORES = ("mask_area", "coverage", "purity", "background", "fit", "template_ratio", "sharpness")

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
        max_candidates: int = 8,
        max_area: float = 480.0,
        coverage_range: tuple[float, float] = (0.5, 1.3),
        min_purity: float = 0.95,
        max_background: float = 0.18,
        min_fit: float = 0.9,
        smear_sigma: float = 3.0,
        max_noise: float = 0.15,
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
        self.max_candidates = max_candidates
        self.max_area = max_area
        self.coverage_range = coverage_range
        self.min_purity = min_purity
        self.max_background = max_background
        self.min_fit = min_fit
        self.smear_sigma = smear_sigma
        self.max_noise = max_noise
        diff = _PALETTE - _BG
        o1, o2 = _opponent(diff)
        self._angles = np.arctan2(o2, o1)
        self._dist = np.linalg.norm(diff, axis=1)
        self._chroma = np.hypot(o1, o2)
        self._unmix = _unmixing()
        self._cover_gain = (self._unmix.sum(axis=1) ** 2).sum(axis=1)  # variance of a + b per unit pixel noise
        self._basis = np.stack([np.stack([c - _BG, STRIPE_SHADE * c - _BG]) for c in _PALETTE]).astype(np.float32)
        self._references: dict[int, float] = {}

    def detect(self, image) -> list[Detection]:
        """All objects in the square ``image`` (PIL RGB, uint8/float HxWx3 array, or float 3xHxW tensor in [0, 1])."""
        arr = to_array(image)
        owner, colours = self._segment(arr)
        detail = _detail(arr) if colours else arr
        found = (self._describe(arr, detail, owner, i + 1, colour)[0] for i, colour in enumerate(colours))
        return [d for d in found if d is not None]

    def candidates(self, image) -> list[tuple[Detection, dict[str, float]]]:
        """Every candidate component of ``image`` (at most ``max_candidates``) described whether or not it
        passes the plausibility tests, with its scores (:attr:`SCORES`): for choosing the thresholds."""
        arr = to_array(image)
        owner, colours = self._segment(arr)
        detail = _detail(arr)
        return [self._describe(arr, detail, owner, i + 1, colour, strict=False) for i, colour in enumerate(colours)]

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
        small = self.min_area * s**2
        found = []  # (pixels, colour, component map, label, slice) of every component big enough
        for k in range(len(_NAMES)):
            fg = (label == k) & (dist >= self.mask_level * self._dist[k]) & (chroma >= self.chroma_level * self._chroma[k])
            comps, n = ndimage.label(fg)
            if n:
                sizes = np.bincount(comps.ravel(), minlength=n + 1)[1:]
                slices = ndimage.find_objects(comps)
                found += [(int(sizes[i]), k, comps, i + 1, slices[i]) for i in np.flatnonzero(sizes >= small)]
        found.sort(key=lambda f: -f[0])
        found = found[:self.max_candidates]  # the largest: a scene has at most 4 objects, more is garbage
        filled = []
        for _, k, comps, i, sl in found:
            crop = ndimage.binary_fill_holes(comps[sl] == i)
            filled.append((int(crop.sum()), k, sl, crop))
        owner = np.zeros(arr.shape[:2], dtype=np.int32)
        colours: list[int] = []
        for _, k, sl, crop in sorted(filled, key=lambda f: -f[0]):  # biggest first: a hole's content is its
            crop = crop & (owner[sl] == 0)  # enclosing object's
            if crop.sum() < small:
                continue
            for part in self._split(crop, s):
                if len(colours) < self.max_candidates:
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
    def _describe(self, arr: np.ndarray, detail: np.ndarray, owner: np.ndarray, index: int, k: int,
                  strict: bool = True) -> tuple[Detection | None, dict[str, float]]:
        """Object ``index`` of ``owner`` (palette colour ``k``) and its plausibility scores (:attr:`SCORES`). With
        ``strict``, returns (None, the scores so far) at the first failed test (the cheap ones come first)."""
        s = arr.shape[0] / 64
        h, w = owner.shape
        mask = owner == index
        ys, xs = np.nonzero(mask)
        scores = {"mask_area": len(ys) / s**2}
        if strict and not self._plausible(scores):
            return None, scores
        m = math.ceil(3 * s)
        y0, y1, x0, x1 = max(ys.min() - m, 0), min(ys.max() + 1 + m, h), max(xs.min() - m, 0), min(xs.max() + 1 + m, w)
        win = (slice(y0, y1), slice(x0, x1))
        mine = mask[win]
        usable = (owner[win] == 0) | mine  # pixels of other objects are left out of every comparison
        grown = ndimage.binary_dilation(mine, iterations=max(1, math.ceil(2 * s)))
        near = grown & usable
        diff = arr[win] - _BG
        coef = diff @ self._unmix[k].T  # a, b per pixel
        cover = coef[..., 0] + coef[..., 1]
        area = float((cover * near).sum()) / s**2
        residual = diff[mine] - coef[mine] @ self._basis[k]  # what the object's colour and its shade cannot explain
        ring = ~grown  # the window beyond ``near``, other candidates included: background around an object
        centre = np.median(arr[win][ring], axis=0)
        noise = min(_noise_variance(detail[win][ring]), self.max_noise**2)
        n = int(mine.sum())
        signal = float((diff[mine] ** 2).sum()) - 3 * noise * n  # the noise's share taken out
        scores.update(
            coverage=area,
            purity=1 - max(float((residual**2).sum()) - noise * n, 0) / signal if signal > 0 else 0.0,
            background=float(np.linalg.norm(centre - _BG)),
        )
        if strict and not self._plausible(scores):
            return None, scores
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
        error = max(float(errors[:, best].min()), 1e-12)
        smeared = ndimage.gaussian_filter(tmpl[best], self.smear_sigma * s, mode="constant")
        expected = noise * float(self._cover_gain[k]) * int(usable.sum())  # what the noise adds to every SSD
        energy = float(((cover * usable) ** 2).sum()) - expected
        scores.update(
            fit=1 - max(error - expected, 0) / energy if energy > 0 else 0.0,
            template_ratio=area * s**2 / max(float(tmpl[best].sum()), 1e-12),
            sharpness=float((((cover - smeared) * usable) ** 2).sum()) / error,
        )
        if strict and not self._plausible(scores):
            return None, scores
        (shape, size), (px, py) = classes[best], (centres[best][0] + x0, centres[best][1] + y0)

        texture = "striped" if self._stripe(coef, mine, s) > self.stripe_level * self._stripe_reference(arr.shape[0]) else "plain"

        box = (float(xs.min() / s), float(ys.min() / s), float((xs.max() + 1) / s), float((ys.max() + 1) / s))
        detection = Detection(shape, _NAMES[k], size, texture, float(px / s), float(py / s), box, mask, area,
                              scores["fit"], scores["purity"])
        return detection, scores

    @property
    def coverage_bounds(self) -> tuple[float, float]:
        """Coverage (canvas px) outside which no template can pass: ``coverage_range`` x the smallest/biggest
        template area, and at least ``min_coverage``."""
        lo, hi = self.coverage_range
        return max(self.min_coverage, lo * float(_AREAS.min())), hi * float(_AREAS.max())

    def _plausible(self, scores: dict[str, float]) -> bool:
        """Whether the ``scores`` computed so far pass every plausibility test (see the class docstring)."""
        lo, hi = self.coverage_range
        least, most = self.coverage_bounds
        tests = {
            "mask_area": lambda v: v <= self.max_area,
            "coverage": lambda v: least <= v <= most,
            "purity": lambda v: v >= self.min_purity,
            "background": lambda v: v <= self.max_background,
            "fit": lambda v: v >= self.min_fit,
            "template_ratio": lambda v: lo <= v <= hi,
            "sharpness": lambda v: v > 1,
        }
        return all(tests[name](value) for name, value in scores.items())

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


def _detail(arr: np.ndarray) -> np.ndarray:
    """``arr`` minus its 3 x 3 mean: per-pixel noise (variance 8/9 of the noise's) where the image is smooth."""
    return arr - ndimage.uniform_filter(arr, size=(3, 3, 1), mode="nearest")


def _noise_variance(detail: np.ndarray) -> float:
    """Per-channel pixel-noise variance from ``N x 3`` :func:`_detail` values (robust: from the median absolute value)."""
    return float(np.mean((1.4826 * np.median(np.abs(detail), axis=0)) ** 2)) * 9 / 8


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
    "ATTRIBUTES", "Detection", "GARBAGE", "JudgeScore", "ToyJudge", "degrade", "garbage", "held_out_scenes", "match",
    "score_renders", "to_array",
]
