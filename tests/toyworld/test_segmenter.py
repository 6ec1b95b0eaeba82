"""ToyWorld's segmentation expert: phrase masks match the renderer's ground-truth masks."""

import numpy as np
import pytest
import torch

from t2i_align.experts.segmenter import Segmenter
from t2i_align.toyworld.experts.judge import held_out_scenes
from t2i_align.toyworld.experts.segmenter import ToySegmenter, parse_noun_phrase
from t2i_align.toyworld.world import COLOURS, SHAPES, Phrase, render


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return 1.0 if union == 0 else (a & b).sum() / union


def test_phrase_masks_match_ground_truth():
    seg = ToySegmenter()
    assert isinstance(seg, Segmenter)
    scenes = held_out_scenes(24, seed=4_000_000)
    images, phrases, truth = [], [], []
    for sc in scenes:
        image, masks = render(sc)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255)
        texts, expected = [], []
        for obj in sc.objects:  # by shape only, and by full description
            for text, phrase in ((f"{obj.shape}s", Phrase(obj.shape)),
                                 (f"{obj.size} {obj.texture} {obj.colour} {obj.shape}",
                                  Phrase(obj.shape, 1, obj.colour, obj.size, obj.texture))):
                texts.append(text)
                expected.append(np.any([m for o, m in zip(sc.objects, masks) if phrase.matches(o)], axis=0))
        absent = next(f"{c} {s}" for c in COLOURS for s in SHAPES
                      if not any(o.colour == c and o.shape == s for o in sc.objects))
        texts.append(absent)  # names nothing in the image: an empty mask
        expected.append(np.zeros_like(masks[0]))
        phrases.append(texts)
        truth.append(expected)
    out = seg.masks(torch.stack(images), phrases)
    scores = [iou(got.numpy()[k], exp[k]) for got, exp in zip(out, truth) for k in range(len(exp))]
    assert [o.shape[0] for o in out] == [len(p) for p in phrases]
    assert min(scores) > 0.75, min(scores)
    assert np.mean(scores) > 0.9


def test_noun_phrases_parse_and_bad_input_is_refused():
    assert parse_noun_phrase("Red  Circles") == Phrase("circle", colour="red")
    assert parse_noun_phrase("two big blue squares") == Phrase("square", 2, "blue", "big")
    with pytest.raises(ValueError, match="hexagon"):
        parse_noun_phrase("hexagon")
    seg = ToySegmenter()
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        seg.masks(torch.full((1, 3, 8, 8), 2.0), [["circle"]])
    with pytest.raises(ValueError, match="2 images but 1 text entries"):
        seg.masks(torch.zeros(2, 3, 8, 8), [["circle"]])


def test_misparsed_nouns_get_masks_instead_of_stopping_training():
    """spaCy's small model makes "cyan" the noun of "a striped cyan square above ..." (9 of ToyWorld's 5,000
    compositional training prompts): CoMat's attribute concentration gave it to the segmenter, which raised at
    step 116 of a 400-update run. A phrase of attribute words names every object with them, like an
    open-vocabulary segmenter; a phrase of no ToyWorld word names nothing."""
    from t2i_align.diffusion.tokens import load_spacy
    from t2i_align.experts.entities import parse_entities
    from t2i_align.toyworld.world import Obj, PromptSpec, Scene

    prompt = "a striped cyan square above a small plain yellow circle"
    assert [e.noun for e in parse_entities(prompt, load_spacy("en_core_web_sm"))] == ["cyan", "circle"]
    scene = Scene(PromptSpec((Phrase("square"),)), (Obj("square", "cyan", "big", "striped", 20, 16), Obj("circle", "yellow", "small", "plain", 44, 46),
                   Obj("star", "cyan", "small", "plain", 48, 14)))
    image, truth = render(scene)
    images = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()[None] / 255
    got = ToySegmenter().masks(images, [["cyan", "striped cyan", "circle", "hexagon", "cyan banana"]])[0].numpy()
    assert iou(got[0], truth[0] | truth[2]) > 0.75 and iou(got[1], truth[0]) > 0.75 and iou(got[2], truth[1]) > 0.75
    assert not got[3].any() and not got[4].any()
