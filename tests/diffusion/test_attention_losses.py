"""Attention-map losses (t2i_align/diffusion/attention_losses.py) on hand-made maps with hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from t2i_align.diffusion.attention_losses import (
    Grounding,
    comat_concentration,
    pixel_loss,
    resize_mask,
    token_loss,
)

# A 2x2 map over 3 tokens; each pixel's row sums to 1 over the tokens.
#   token 1: [[.3, .1], [.2, .4]] (total 1.0)    token 2: [[.2, .3], [.1, .2]] (total 0.8)
PIXELS = [[[0.5, 0.3, 0.2], [0.6, 0.1, 0.3]],
          [[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]]]
TOP_LEFT = torch.tensor([[True, False], [False, False]])
BOTTOM_RIGHT = torch.tensor([[False, False], [False, True]])
EMPTY = torch.zeros(2, 2, dtype=torch.bool)
log = math.log


def hand_map(pixels=PIXELS) -> torch.Tensor:
    maps = torch.tensor([pixels], dtype=torch.float64)
    torch.testing.assert_close(maps.sum(-1), torch.ones(1, 2, 2, dtype=torch.float64))
    return maps


def close(actual: torch.Tensor, expected: float) -> None:
    torch.testing.assert_close(actual, torch.tensor([expected]), atol=1e-6, rtol=1e-6)


def random_maps(b: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, r, r, 77, generator=g).mul(3).softmax(-1)


def random_mask(r: int, seed: int) -> torch.Tensor:
    return torch.rand(r, r, generator=torch.Generator().manual_seed(seed)) > 0.6


def test_resize_mask_is_antialiased_bilinear_then_positive():
    # 8 -> 2: the antialiased triangle filter of output cell 0 (centre 2) spans input pixels 0..5, cell 1
    # (centre 6) pixels 2..7, so pixels 0-1 light only cell 0, 6-7 only cell 1, 2-5 both
    m = torch.zeros(8, 8, dtype=torch.bool)
    m[0, 7] = True
    torch.testing.assert_close(resize_mask(m, (2, 2)), torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    m[4, 1] = True
    torch.testing.assert_close(resize_mask(m, 2), torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    # a lone corner pixel survives a factor-4 shrink (plain bilinear samples pixels 1 and 2 of each block only)
    corner = torch.zeros(8, 8, dtype=torch.bool)
    corner[0, 0] = True
    torch.testing.assert_close(resize_mask(corner, 2), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert F.interpolate(corner[None, None].float(), size=(2, 2), mode="bilinear").sum() == 0
    # already at size: unchanged, as 0/1 floats
    torch.testing.assert_close(resize_mask(TOP_LEFT, (2, 2)), TOP_LEFT.float())
    # upsampling is plain bilinear: pixel (0, 0) of a 2x2 mask reaches output pixels 0..2 of each axis
    up = torch.zeros(4, 4)
    up[:3, :3] = 1
    torch.testing.assert_close(resize_mask(TOP_LEFT, 4), up)
    # an empty mask stays empty at any size
    for size in (2, 4, 8, 128):
        assert resize_mask(torch.zeros(64, 64, dtype=torch.bool), size).sum() == 0


@pytest.mark.parametrize("size", [8, 4, 2])
def test_resize_mask_keeps_a_small_object_anywhere(size):
    """A 3x3 square at every position of a 64x64 mask stays non-empty when shrunk 8x, 16x and 32x (plain bilinear
    interpolation point-samples and loses most of them)."""
    lost = []
    for y in range(62):
        for x in range(62):
            m = torch.zeros(64, 64, dtype=torch.bool)
            m[y:y + 3, x:x + 3] = True
            if resize_mask(m, size).sum() == 0:
                lost.append((y, x))
    assert not lost, f"{len(lost)} of {62 * 62} positions lost at {size}x{size}, e.g. {lost[:3]}"


def test_resize_mask_keeps_every_toyworld_object():
    """ToyWorld's natural training scenes (64 px, per-object masks): no object vanishes at the 4x4 and 2x2 maps
    of its UNet (plain bilinear loses about a quarter of them at 4x4 and over half at 2x2)."""
    from t2i_align.toyworld.splits import natural_scenes
    from t2i_align.toyworld.world import render

    masks = [torch.from_numpy(m) for scene in natural_scenes(0, 200, set()) for m in render(scene)[1]]
    assert len(masks) > 200 and all(m.any() for m in masks)
    for size in (4, 2):
        empty = sum(int(resize_mask(m, size).sum() == 0) for m in masks)
        assert empty == 0, f"{empty} of {len(masks)} object masks empty at {size}x{size}"


def test_comat_eq4_eq5_single_entity():
    pos, neg = comat_concentration(hand_map(), [[Grounding((1,), TOP_LEFT)]], alpha=1.0, beta=1.0)
    # Eq. 4: region 0.3 / 1.0 at the one mask pixel; pixel term log(0.3) / |A| with |A| = 4
    close(pos, -(0.3 + log(0.3) / 4))
    # Eq. 5: region -(0.1 + 0.2 + 0.4) / 1.0 outside; pixel term log(1 - A) at the three other pixels
    close(neg, -(-(0.1 + 0.2 + 0.4) + (log(0.9) + log(0.8) + log(0.6)) / 4))
    # the default weights alpha = 1e-3, beta = 5e-5
    pos, neg = comat_concentration(hand_map(), [[Grounding((1,), TOP_LEFT)]])
    close(pos, -(1e-3 * 0.3 + 5e-5 * log(0.3) / 4))
    close(neg, -(1e-3 * -0.7 + 5e-5 * (log(0.9) + log(0.8) + log(0.6)) / 4))


def test_comat_multi_token_entity_sums_its_tokens_and_averages_over_entities():
    pos, neg = comat_concentration(hand_map(), [[Grounding((1, 2), BOTTOM_RIGHT)]], alpha=1.0, beta=1.0)
    # region: t1 / 1.0 + t2 / 0.8 = [[.55, .475], [.325, .65]]; summed map t1 + t2 = [[.5, .4], [.3, .6]]
    close(pos, -(0.65 + log(0.6) / 4))
    close(neg, -(-(0.55 + 0.475 + 0.325) + (log(0.5) + log(0.6) + log(0.7)) / 4))
    both = [[Grounding((1,), TOP_LEFT), Grounding((1, 2), BOTTOM_RIGHT)]]
    pos2, neg2 = comat_concentration(hand_map(), both, alpha=1.0, beta=1.0)
    close(pos2, (-(0.3 + log(0.3) / 4) - (0.65 + log(0.6) / 4)) / 2)
    close(neg2, (-(-0.7 + (log(0.9) + log(0.8) + log(0.6)) / 4)
                 - (-1.35 + (log(0.5) + log(0.6) + log(0.7)) / 4)) / 2)


def test_comat_empty_mask_gives_only_the_negative_term_and_counts_in_n():
    pos, neg = comat_concentration(hand_map(), [[Grounding((1,), EMPTY)]], alpha=1.0, beta=1.0)
    close(pos, 0.0)
    expected_neg = -(-1.0 + (log(0.7) + log(0.9) + log(0.8) + log(0.6)) / 4)
    close(neg, expected_neg)
    assert expected_neg > 0
    # with a second, visible entity: N = 2, so the visible entity's L_pos is halved
    pos, neg = comat_concentration(hand_map(), [[Grounding((1,), TOP_LEFT), Grounding((2,), EMPTY)]],
                                   alpha=1.0, beta=1.0)
    close(pos, -(0.3 + log(0.3) / 4) / 2)


def test_token_loss_known_values_and_empty_masks():
    maps = hand_map()
    close(token_loss(maps, [[Grounding((1,), TOP_LEFT)]]), (1 - 0.3) ** 2)
    # multi-token noun: A = t1 + t2 = [[.5, .4], [.3, .6]], 0.6 of 1.8 inside
    close(token_loss(maps, [[Grounding((1, 2), BOTTOM_RIGHT)]]), (1 - 0.6 / 1.8) ** 2)
    close(token_loss(maps, [[Grounding((1,), TOP_LEFT), Grounding((1, 2), BOTTOM_RIGHT)]]),
          (0.49 + (2 / 3) ** 2) / 2)
    nouns = [[Grounding((1,), TOP_LEFT), Grounding((2,), EMPTY)]]
    close(token_loss(maps, nouns, empty="skip"), 0.49)
    close(token_loss(maps, nouns, empty="keep"), (0.49 + 1.0) / 2)  # all-zero target: (1 - 0)^2
    # a small object shrunk to the map's size keeps its cell: token 2 has 0.2 of its 0.8 there
    corner = torch.zeros(8, 8, dtype=torch.bool)
    corner[0, 0] = True
    close(token_loss(maps, [[Grounding((1,), TOP_LEFT), Grounding((2,), corner)]]), (0.49 + (1 - 0.25) ** 2) / 2)
    with pytest.raises(ValueError):
        token_loss(maps, nouns, empty="drop")


def test_pixel_loss_is_bce_of_the_summed_token_map():
    maps = random_maps(1, 4, seed=0)
    maps[0, 0, 0] = F.one_hot(torch.tensor(1), 77).float()  # A = 1 and A = 0 at one pixel: the clamp matters
    m1, m2 = random_mask(4, 1), random_mask(4, 2)
    eps = 1e-6
    a1 = maps[0, ..., 1].clamp(eps, 1 - eps)
    a2 = (maps[0, ..., 2] + maps[0, ..., 5]).clamp(eps, 1 - eps)
    expected = (F.binary_cross_entropy(a1, m1.float()) + F.binary_cross_entropy(a2, m2.float())) / 2
    got = pixel_loss(maps, [[Grounding((1,), m1), Grounding((2, 5), m2)]])
    torch.testing.assert_close(got, expected[None], atol=1e-5, rtol=1e-5)
    # empty mask: skipped by default, kept (BCE against zeros) on request
    empty = torch.zeros(4, 4, dtype=torch.bool)
    nouns = [[Grounding((1,), m1), Grounding((3,), empty)]]
    torch.testing.assert_close(pixel_loss(maps, nouns), F.binary_cross_entropy(a1, m1.float())[None])
    a3 = maps[0, ..., 3].clamp(eps, 1 - eps)
    keep = (F.binary_cross_entropy(a1, m1.float()) + F.binary_cross_entropy(a3, empty.float())) / 2
    torch.testing.assert_close(pixel_loss(maps, nouns, empty="keep"), keep[None], atol=1e-5, rtol=1e-5)


def test_batch_equals_single_samples():
    maps = random_maps(2, 8, seed=3)
    groundings = [
        [Grounding((2, 3), random_mask(16, 4)), Grounding((5,), random_mask(16, 5))],
        [Grounding((7,), random_mask(8, 6)), Grounding((9,), torch.zeros(16, 16, dtype=torch.bool))],
    ]
    batch_pos, batch_neg = comat_concentration(maps, groundings)
    for b in range(2):
        pos, neg = comat_concentration(maps[b:b + 1], groundings[b:b + 1])
        torch.testing.assert_close(batch_pos[b:b + 1], pos)
        torch.testing.assert_close(batch_neg[b:b + 1], neg)
        for loss in (token_loss, pixel_loss):
            for empty in ("skip", "keep"):
                torch.testing.assert_close(loss(maps, groundings, empty=empty)[b:b + 1],
                                           loss(maps[b:b + 1], groundings[b:b + 1], empty=empty))
    assert batch_pos.shape == (2,) and (batch_pos[0] - batch_pos[1]).abs() > 0
    with pytest.raises(ValueError):
        token_loss(maps, groundings[:1])


def test_gradients_reach_the_grounded_tokens_only():
    maps = random_maps(2, 4, seed=7).requires_grad_(True)
    groundings = [[Grounding((1, 4), random_mask(4, 8))], []]  # the second sample has no entity
    pos, neg = comat_concentration(maps, groundings)
    tok, pix = token_loss(maps, groundings), pixel_loss(maps, groundings)
    for v in (pos, neg, tok, pix):
        assert v.requires_grad and v[1] == 0
    (pos + neg + tok + pix).sum().backward()
    grad = maps.grad
    assert torch.isfinite(grad).all()
    assert grad[0][..., [1, 4]].abs().sum() > 0
    others = [k for k in range(77) if k not in (1, 4)]
    assert grad[0][..., others].abs().sum() == 0 and grad[1].abs().sum() == 0


def test_attention_moving_into_the_mask_lowers_the_losses():
    before = hand_map()
    # move 0.2 of token 1 from the bottom-right pixel into the top-left (mask) pixel; token 0 pays for it
    after = hand_map([[[0.3, 0.5, 0.2], [0.6, 0.1, 0.3]],
                      [[0.7, 0.2, 0.1], [0.6, 0.2, 0.2]]])
    nouns = [[Grounding((1,), TOP_LEFT)]]
    assert sum(comat_concentration(after, nouns)) < sum(comat_concentration(before, nouns))
    pos_a, neg_a = comat_concentration(after, nouns, alpha=1.0, beta=1.0)
    pos_b, neg_b = comat_concentration(before, nouns, alpha=1.0, beta=1.0)
    assert pos_a < pos_b and neg_a < neg_b
    assert token_loss(after, nouns) < token_loss(before, nouns)
    close(token_loss(after, nouns), (1 - 0.5) ** 2)
