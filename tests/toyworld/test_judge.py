"""The exact ToyWorld judge: accuracy bars on held-out renders, exact recovery on hand-made scenes, inputs."""

import itertools
import time

import numpy as np
import pytest
import torch
from PIL import Image

from t2i_align.toyworld.experts.judge import (
    ATTRIBUTES,
    GARBAGE,
    Detection,
    JudgeScore,
    ToyJudge,
    degrade,
    garbage,
    held_out_scenes,
    match,
    score_renders,
    to_array,
)
from t2i_align.toyworld.world import COLOURS, DIAMETER, GAP, SHAPES, Obj, PromptSpec, Scene, render

# Tuning used scene seeds below 2e6; the script uses 9e6 onwards.
SEED = 3_000_000


@pytest.fixture(scope="module")
def judge() -> ToyJudge:
    return ToyJudge()


def scene(*objects: Obj, noise_seed: int = 0) -> Scene:
    return Scene(PromptSpec(()), tuple(objects), noise_seed)


def assert_exact(judge: ToyJudge, sc: Scene, image) -> None:
    """Every object found once with all attributes, centre within 1 px, and nothing else."""
    dets = judge.detect(image)
    pairs = match(dets, sc.objects)
    assert len(dets) == len(sc.objects) == len(pairs), (dets, sc.objects)
    for i, j in pairs:
        obj, det = sc.objects[i], dets[j]
        assert [getattr(det, a) for a in ATTRIBUTES] == [getattr(obj, a) for a in ATTRIBUTES], (obj, det)
        assert abs(det.x - obj.x) < 1 and abs(det.y - obj.y) < 1, (obj, det)


# ------------------------------------------------------------------------------------------------ bars
@pytest.mark.parametrize("degraded, bar", [(False, 0.99), (True, 0.95)])
def test_bars_on_held_out_renders(judge, degraded, bar):
    score = score_renders(judge, held_out_scenes(150, SEED), 64, degraded)
    assert score.objects > 300
    assert score.accuracy >= bar, vars(score)
    assert score.count_accuracy >= bar, vars(score)


# Relaxed bars at lower resolution: clean >= 98 %, degraded >= 90 % (stripes are 1.5-2 px there).
@pytest.mark.parametrize("size", [32, 48])
@pytest.mark.parametrize("degraded, bar", [(False, 0.98), (True, 0.90)])
def test_relaxed_bars_at_lower_resolution(judge, size, degraded, bar):
    score = score_renders(judge, held_out_scenes(60, SEED + 1000), size, degraded)
    assert score.accuracy >= bar, vars(score)


def test_shape_colour_and_size_survive_blur_beyond_the_bar(judge):
    # Blur sigma 1.5-2 px wipes out the 4-px stripes (texture then reads plain), but the blurred templates
    # still recover the other attributes.
    score = JudgeScore()
    for sc in held_out_scenes(60, SEED + 2000):
        image = degrade(render(sc)[0], np.random.default_rng(sc.noise_seed), blur=(1.5, 2.0))
        score.update(judge.detect(image), sc.objects)
    assert score.count_accuracy == 1
    for attribute in ("shape", "colour", "size"):
        assert score.attribute_accuracy(attribute) >= 0.98, vars(score)


# ----------------------------------------------------------------------------------- hand-made scenes
def corner_scenes() -> list[Scene]:
    """Each shape x colour x size x texture once, four objects a scene, each 1 px from two image borders."""
    objs = list(itertools.product(SHAPES, COLOURS, DIAMETER, ("plain", "striped")))
    out = []
    for k in range(0, len(objs), 4):
        placed = []
        for (shape, colour, size, texture), (cx, cy) in zip(objs[k:k + 4], [(0, 0), (1, 0), (0, 1), (1, 1)]):
            r = DIAMETER[size] / 2
            x = r + 1 + 0.3 * k / len(objs) if cx == 0 else 63 - r - 0.3 * k / len(objs)
            y = r + 1.2 if cy == 0 else 63 - r - 0.1
            placed.append(Obj(shape, colour, size, texture, x, y))
        out.append(scene(*placed, noise_seed=k))
    return out


def test_exact_recovery_of_every_attribute_combination_at_the_borders(judge):
    scenes = corner_scenes()
    assert len(scenes) == 24
    for sc in scenes:
        assert_exact(judge, sc, render(sc)[0])


@pytest.mark.parametrize("first, second", list(itertools.combinations_with_replacement(SHAPES, 2)))
@pytest.mark.parametrize("axis", ["horizontal", "vertical"])
def test_same_colour_objects_at_the_minimum_gap(judge, first, second, axis):
    a = Obj(first, "blue", "big", "striped", 20.0, 24.3)
    d = a.radius + DIAMETER["small"] / 2 + GAP
    b = Obj(second, "blue", "small", "plain", a.x + d, a.y) if axis == "horizontal" else Obj(second, "blue", "small", "plain", a.x, a.y + d)
    sc = scene(a, b, noise_seed=7)
    assert_exact(judge, sc, render(sc)[0])


def test_touching_corners_of_same_colour_squares_are_split(judge):
    # Squares reach 0.86 * sqrt(2) = 1.22 radii along the diagonal, so at the minimum gap their corners touch.
    a = Obj("square", "red", "big", "plain", 18.0, 18.0)
    d = (2 * a.radius + GAP) / np.sqrt(2)
    sc = scene(a, Obj("square", "red", "big", "plain", 18.0 + d, 18.0 + d), noise_seed=3)
    assert_exact(judge, sc, render(sc)[0])


def test_blank_images_have_no_detections(judge):
    blank = scene(noise_seed=11)
    assert judge.detect(render(blank)[0]) == []
    assert judge.detect(degrade(render(blank)[0], np.random.default_rng(0))) == []
    assert judge.detect(render(blank, size=32)[0]) == []


# --------------------------------------------------------------------------------- garbage images
# The judge scores generated images: noise, smears and colour blobs from an untrained generator are no objects.
@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("kind", GARBAGE)
def test_garbage_images_have_almost_no_detections(judge, kind, size):
    rng = np.random.default_rng(size)
    found = [d for _ in range(50) for d in judge.detect(garbage(kind, rng, size))]
    assert len(found) <= 2, found


def test_a_smear_is_rejected_though_a_less_blurred_render_is_judged(judge):
    sc = scene(Obj("circle", "red", "small", "plain", 20, 20), Obj("square", "blue", "big", "plain", 42, 40))
    image = render(sc)[0]
    assert len(judge.detect(degrade(image, np.random.default_rng(0), blur=(2.0, 2.0)))) == 2
    assert judge.detect(degrade(image, np.random.default_rng(0), blur=(4.0, 4.0), noise=0)) == []


def test_noisy_but_clear_objects_are_kept(judge):
    # The plausibility tests discount the pixel noise: twice the degraded renders' noise loses no object.
    score = JudgeScore()
    for sc in held_out_scenes(40, SEED + 7000):
        score.update(judge.detect(degrade(render(sc)[0], np.random.default_rng(sc.noise_seed), noise=0.12)), sc.objects)
    assert score.count_accuracy == 1
    for attribute in ("shape", "colour", "size"):
        assert score.attribute_accuracy(attribute) >= 0.98, vars(score)


def test_noise_images_are_judged_quickly(judge):
    rng = np.random.default_rng(0)
    for kind in ("uniform", "blobs"):  # the slowest kinds: many candidate regions
        images = [garbage(kind, rng, 64) for _ in range(20)]
        judge.detect(images[0])  # warm the caches
        start = time.perf_counter()
        for image in images:
            judge.detect(image)
        assert (time.perf_counter() - start) / len(images) < 0.2  # ~15 ms unloaded


def test_candidates_are_capped_and_scored(judge):
    noise = garbage("uniform", np.random.default_rng(1), 64)
    assert len(judge.candidates(noise)) == judge.max_candidates  # hundreds of specks, only the largest judged
    sc = held_out_scenes(4, SEED + 6000)[3]
    image = render(sc)[0]
    found = judge.candidates(image)
    assert [d for d, _ in found] == judge.detect(image) and len(found) == len(sc.objects)
    for det, scores in found:
        assert tuple(scores) == ToyJudge.SCORES
        assert det.fit == scores["fit"] >= judge.min_fit and det.purity == scores["purity"] >= judge.min_purity
        assert all(type(v) is float for v in scores.values())
        assert scores["sharpness"] > 1 and scores["background"] < judge.max_background
    strict = ToyJudge(max_background=-1.0)  # nothing stands on background: everything is dropped
    assert strict.detect(image) == [] and len(strict.candidates(image)) == len(sc.objects)


# ------------------------------------------------------------------------------------------- inputs
def test_pil_array_tensor_and_batch_inputs_agree(judge):
    sc = held_out_scenes(4, SEED + 5000)[3]
    image = render(sc)[0]
    arr = np.asarray(image)
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255
    reference = judge.detect(image)
    assert len(reference) == len(sc.objects) > 1
    for other in (judge.detect(arr), judge.detect(tensor), judge.detect_batch(tensor[None].repeat(2, 1, 1, 1))[1]):
        assert other == reference  # dataclass equality: every field but the mask
        assert all(np.array_equal(a.mask, b.mask) for a, b in zip(other, reference))


def test_detection_geometry_is_in_canvas_units(judge):
    obj = Obj("circle", "green", "big", "plain", 40.3, 22.6)
    sc = scene(obj)
    for size in (32, 48, 64):
        (det,) = judge.detect(render(sc, size=size)[0])
        assert det.mask.shape == (size, size)
        assert abs(det.x - obj.x) < 0.5 and abs(det.y - obj.y) < 0.5
        x0, y0, x1, y1 = det.box
        assert abs((x1 - x0) - 21) <= 1.5 and abs((y1 - y0) - 21) <= 1.5
        gt = render(sc, size=size)[1][0]
        assert abs(det.area - gt.sum() * (64 / size) ** 2) < 0.03 * det.area
        assert (det.mask & gt).sum() / (det.mask | gt).sum() > 0.85


def test_degrade_blurs_and_adds_noise():
    image = render(scene(Obj("square", "red", "big", "striped", 32, 32)))[0]
    clean = to_array(image)
    a, b = degrade(image, np.random.default_rng(1)), degrade(image, np.random.default_rng(1))
    assert np.array_equal(a, b) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    flat = degrade(Image.new("RGB", (64, 64), (128, 128, 128)), np.random.default_rng(2))
    assert 0.045 < flat.std() < 0.055  # the noise
    def stripe_contrast(arr: np.ndarray) -> float:
        return float(np.abs(np.diff(arr[24:40, 32, 0])).max())  # down the middle of the striped square

    assert stripe_contrast(degrade(image, np.random.default_rng(3), noise=0)) < 0.9 * stripe_contrast(clean)
    assert stripe_contrast(degrade(image, np.random.default_rng(3), blur=(1.0, 1.0), noise=0)) < 0.5 * stripe_contrast(clean)


# ------------------------------------------------------------------------------------------- scoring
def det(shape: str, x: float, y: float, **kw) -> Detection:
    attrs = {"colour": "red", "size": "big", "texture": "plain", **kw}
    return Detection(shape, attrs["colour"], attrs["size"], attrs["texture"], x, y, (0, 0, 1, 1), np.zeros((1, 1), bool), 1.0)


def test_score_counts_wrong_attributes_misses_and_extras():
    objs = [Obj("circle", "red", "big", "plain", 20, 20), Obj("square", "red", "big", "plain", 45, 45)]
    score = JudgeScore()
    score.update([det("circle", 21, 20), det("square", 44, 46)], objs)
    assert score.accuracy == 1 and score.count_accuracy == 1
    score.update([det("circle", 21, 20, texture="striped"), det("star", 5, 60)], objs)  # wrong texture, a miss, an extra
    assert score.objects == 4 and score.unmatched == 1 and score.exact == 2
    assert score.accuracy == pytest.approx(2 / 5)
    assert score.attribute_accuracy("texture") == pytest.approx(2 / 5)
    assert score.attribute_accuracy("shape") == pytest.approx(3 / 5)
    assert score.count_accuracy == 1.0  # two detections for two objects, though one is wrong
    assert match([det("circle", 20 + 10.6, 20)], objs[:1]) == []  # beyond the radius: no match
