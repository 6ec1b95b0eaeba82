"""PairDataset: JSONL (TokenCompose) and COCO layouts, geometry, flips, validation errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from t2i_align.datamodules import PairDataset, PairFileError, PairSource, collate_pairs


def test_jsonl_item_geometry_and_masks(make_pair_jsonl) -> None:
    ds = PairDataset(make_pair_jsonl(3), resolution=16)
    assert len(ds) == 3
    item = ds[1]
    pv = item["pixel_values"]
    assert pv.shape == (3, 16, 16) and pv.dtype == torch.float32 and 0 <= pv.min() and pv.max() <= 1
    # 40x20 -> 32x16 -> centre crop x in [8, 24): original x in [10, 30); red left of x=20, blue right.
    assert torch.allclose(pv[0, :, :7], torch.ones(16, 7), atol=0.02) and pv[2, :, :7].max() < 0.02
    assert torch.allclose(pv[2, :, 9:], torch.ones(16, 7), atol=0.02) and pv[0, :, 9:].max() < 0.02
    assert (item["caption"], item["id"]) == ("caption 1", "1")
    (noun, mask), (noun2, none) = item["masks"]
    assert (noun, noun2, none) == ("left", "nothing", None)
    assert mask.shape == (16, 16) and mask.dtype == torch.bool
    assert mask[:, :7].all() and not mask[:, 9:].any()


def test_random_flip_flips_image_and_masks_together(make_pair_jsonl) -> None:
    path = make_pair_jsonl(8)
    plain = PairDataset(path, resolution=16)
    flipped = PairDataset(path, resolution=16, random_flip=True, seed=3)
    again = PairDataset(path, resolution=16, random_flip=True, seed=3)
    flips = []
    for i in range(8):
        a, b = plain[i], flipped[i]
        did = not torch.equal(a["pixel_values"], b["pixel_values"])
        flips.append(did)
        if did:
            assert torch.equal(a["pixel_values"].flip(-1), b["pixel_values"])
            assert torch.equal(a["masks"][0][1].flip(-1), b["masks"][0][1])
        else:
            assert torch.equal(a["masks"][0][1], b["masks"][0][1])
        assert torch.equal(b["pixel_values"], again[i]["pixel_values"])  # deterministic
    assert any(flips) and not all(flips)


@pytest.mark.parametrize("mask_shape", [(10, 10), (30, 20)], ids=["smaller, same aspect", "other aspect"])
def test_mask_of_other_size_than_its_image_is_refused(tmp_path: Path, save_image, mask_shape) -> None:
    save_image(tmp_path / "a.png", np.zeros((30, 30, 3), np.uint8))
    save_image(tmp_path / "ok.png", np.zeros((30, 30), np.uint8))
    save_image(tmp_path / "m.png", np.zeros(mask_shape, np.uint8))
    lines = [{"file_name": "a.png", "text": "t", "attn_list": [["x", "ok.png"]]},
             {"file_name": "a.png", "text": "u", "attn_list": [["x", "ok.png"], ["dog", "m.png"]]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    h, w = mask_shape
    with pytest.raises(PairFileError, match=rf"d\.jsonl: line 2: the mask for 'dog' \(.*m\.png\) is {w}x{h} but its "
                                           r"image is 30x30"):
        PairDataset(tmp_path / "d.jsonl", resolution=8)


def test_collate_pairs(make_pair_jsonl) -> None:
    ds = PairDataset(make_pair_jsonl(3), resolution=8)
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate_pairs)))
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    assert batch["captions"] == ["caption 0", "caption 1"] and batch["ids"] == ["0", "1"]
    assert len(batch["masks"]) == 2 and [n for n, _ in batch["masks"][0]] == ["left", "nothing"]


def write_coco(
    tmp_path: Path, save_image, annotations: list[dict], images=((1, "x.png"), (2, "y.png"), (3, "z.png"))
) -> Path:
    for _, name in images:
        save_image(tmp_path / "train2014" / name, np.full((12, 16, 3), 128, np.uint8))
    data = {"images": [{"id": i, "file_name": f} for i, f in images], "annotations": annotations}
    path = tmp_path / "annotations" / "captions_train2014.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_coco_per_caption_and_per_image(tmp_path: Path, save_image) -> None:
    anns = [
        {"id": 10, "image_id": 2, "caption": "two a"},
        {"id": 11, "image_id": 1, "caption": "one a"},
        {"id": 12, "image_id": 2, "caption": "two b"},
    ]
    path = write_coco(tmp_path, save_image, anns)
    per_caption = PairDataset(path, tmp_path / "train2014", resolution=8)
    assert [(r.id, r.caption) for r in per_caption.records] == [
        ("10", "two a"),
        ("11", "one a"),
        ("12", "two b"),
    ]
    item = per_caption[0]
    assert item["masks"] is None and item["pixel_values"].shape == (3, 8, 8)
    assert torch.allclose(item["pixel_values"], torch.full((3, 8, 8), 128 / 255), atol=1e-3)
    per_image = PairDataset.from_source(
        PairSource(str(path), str(tmp_path / "train2014"), per="image"), resolution=8
    )
    assert [(r.id, r.caption) for r in per_image.records] == [
        ("1", "one a"),
        ("2", "two a"),
    ]  # image 3: no caption
    assert collate_pairs([per_image[0], per_image[1]])["masks"] is None
    assert len(PairDataset(path, tmp_path / "train2014", limit=2)) == 2


def test_coco_missing_image_names_annotation(tmp_path: Path, save_image) -> None:
    path = write_coco(
        tmp_path,
        save_image,
        [{"id": 10, "image_id": 1, "caption": "a"}, {"id": 11, "image_id": 3, "caption": "b"}],
    )
    (tmp_path / "train2014" / "z.png").unlink()
    with pytest.raises(PairFileError, match=r"annotation id 11: image file not found: .*z\.png"):
        PairDataset(path, tmp_path / "train2014")


def test_real_tokencompose_metadata(benchmarks: Path, tmp_path: Path, save_image) -> None:
    """The real metadata.jsonl with stand-in images under image_root (COCO images are not available)."""
    meta = benchmarks / "tokencompose" / "coco_gsam_img_train" / "metadata.jsonl"
    with pytest.raises(PairFileError, match=r"line 1: image file not found: .*000000000142\.jpg"):
        PairDataset(meta, image_root=tmp_path)  # every record is checked eagerly
    records = [json.loads(line) for line in meta.read_text(encoding="utf-8").splitlines()[:2]]
    for rec in records:
        save_image(tmp_path / rec["file_name"], np.zeros((20, 30, 3), np.uint8))
        for _, mask in rec["attn_list"]:
            if mask is not None:
                save_image(tmp_path / mask, np.full((20, 30), 255, np.uint8))
    ds = PairDataset(meta, image_root=tmp_path, resolution=8, limit=2)
    item = ds[1]
    assert item["caption"] == records[1]["text"]
    assert [n for n, _ in item["masks"]] == [n for n, _ in records[1]["attn_list"]]
    assert [m is None for _, m in item["masks"]] == [m is None for _, m in records[1]["attn_list"]]
    assert any(m is None for _, m in item["masks"]) and all(
        m.all() for _, m in item["masks"] if m is not None
    )


@pytest.mark.parametrize(
    ("lines", "pattern"),
    [
        (
            ['{"file_name": "images/0.png", "text": "a"}', '{"file_name": "images/0.png", "text": }'],
            r"line 2.*invalid JSON",
        ),
        (['{"file_name": "images/0.png"}'], r"line 1.*\"file_name\" and \"text\""),
        (['{"file_name": "images/0.png", "text": "a", "attn_list": [["x"]]}'], r"line 1.*attn_list"),
        (['{"file_name": "images/0.png", "text": " "}'], r"line 1.*empty caption"),
        (["", " "], r"no image-caption pairs"),
        (
            ['{"file_name": "images/0.png", "text": "a"}', '{"file_name": "images/9.png", "text": "b"}'],
            r"line 2: image file not found: .*9\.png",
        ),
        (
            [
                '{"file_name": "images/0.png", "text": "a", '
                '"attn_list": [["cat", null], ["dog", "seg/none.png"]]}'
            ],
            r"line 1: mask file for 'dog' not found: .*none\.png",
        ),
    ],
)
def test_jsonl_errors_name_file_and_line(make_pair_jsonl, lines: list[str], pattern: str) -> None:
    path = make_pair_jsonl(1, with_masks=False)
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(PairFileError, match=pattern) as info:
        PairDataset(path)
    assert str(path) in str(info.value)


def test_missing_annotation_file_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(PairFileError, match="file not found"):
        PairDataset(tmp_path / "metadata.jsonl")
    with pytest.raises(PairFileError, match="file not found"):
        PairDataset(tmp_path / "captions.json")
    with pytest.raises(PairFileError, match="cannot infer pair format"):
        PairDataset(tmp_path / "pairs.csv")
    with pytest.raises(ValueError, match="per must be"):
        PairDataset(tmp_path / "metadata.jsonl", per="word")
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(PairFileError, match="COCO captions object"):
        PairDataset(tmp_path / "bad.json")
