"""Prompt readers on the real benchmark files in ../shared/benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from t2i_align.datamodules import read_prompts, sniff_format

# Prompt lists under ../shared/benchmarks and the format "auto" must pick for each. Not prompt lists (and
# not supported): tifa/human_annotations/*, tifa/sample/sample_{imgs,question_answers,evaluation_result}.json.
SUPPORTED: dict[str, str] = {
    **{
        f"t2i_compbench/{n}.txt": "txt"
        for n in [
            "3d_spatial",
            "3d_spatial_train",
            "3d_spatial_val",
            "color",
            "color_train",
            "color_val",
            "color_val_seen",
            "color_val_unseen",
            "complex",
            "complex_train",
            "complex_train_action",
            "complex_train_spatial",
            "complex_train_spatialaction",
            "complex_val",
            "complex_val_action",
            "complex_val_spatial",
            "complex_val_spatialaction",
            "new_objects",
            "non_spatial",
            "non_spatial_train",
            "non_spatial_val",
            "numeracy",
            "numeracy_train",
            "numeracy_val",
            "shape",
            "shape_train",
            "shape_val",
            "shape_val_seen",
            "shape_val_unseen",
            "spatial",
            "spatial_train",
            "spatial_val",
            "texture",
            "texture_train",
            "texture_val",
            "texture_val_seen",
            "texture_val_unseen",
            "legacy_pre_3310c2f/color",
            "legacy_pre_3310c2f/color_val",
        ]
    },
    "structured_diffusion/ABC-6K.txt": "txt",
    "structured_diffusion/CC-500.txt": "txt",
    "comat/collected_data/abc5k.txt": "txt",
    "comat/collected_data/hrs_collected_10k.txt": "txt",
    "comat/collected_data/train_all.txt": "txt",
    "comat/merged_data/abc5k_hrs10k_t2icompall_20k.txt": "txt",
    "comat/valid.txt": "txt",
    "geneval/generation_prompts.txt": "txt",
    "geneval/object_names.txt": "txt",
    "geneval/evaluation_metadata.jsonl": "jsonl",
    "tokencompose/coco_gsam_img_train/metadata.jsonl": "jsonl",
    "tifa/tifa_v1.0_text_inputs.json": "tifa",
    "tifa/sample/sample_text_inputs.json": "tifa",
    "tokencompose/multigen/coco_obj_comp_5_1k.json": "multigen",
    "tokencompose/multigen/ade20k_obj_comp_5_1k.json": "multigen",
    "imagereward/refl_data.json": "refl",
    "imagereward/test.json": "imagereward",
    "imagereward/benchmark-prompts.json": "imagereward",
    "drawbench/DrawBench.csv": "drawbench",
    "vilg300/ViLG-300.csv": "vilg300",
    "hrs_bench/synthetic_color_comp_prompts.csv": "hrs",
    "hrs_bench/synthetic_counting_prompts.csv": "hrs",
    "hrs_bench/synthetic_size_comp_prompts.csv": "hrs",
    "hrs_bench/synthetic_spatial_relation_prompts.csv": "hrs",
}
DPG_KEY = "dpg_bench/prompts/*.txt (1065 files)"  # the PROVENANCE.md row for the DPG-Bench prompt folder


def _check_clean(prompts) -> None:
    for p in prompts:
        assert p.text == p.text.strip() and p.text, p
        assert "\r" not in p.text and "\n" not in p.text and "\ufeff" not in p.text, p
    ids = [p.id for p in prompts]
    assert len(set(ids)) == len(ids)
    json.dumps([p.meta for p in prompts])  # meta is JSON-serialisable


@pytest.mark.parametrize("rel", sorted(SUPPORTED))
def test_real_file_counts_and_cleanliness(
    benchmarks: Path, provenance_counts: dict[str, int], rel: str
) -> None:
    path = benchmarks / rel
    assert sniff_format(path) == SUPPORTED[rel]
    prompts = read_prompts(path)
    assert len(prompts) == provenance_counts[rel]
    assert {p.source for p in prompts} == {path.stem}
    _check_clean(prompts)


def test_every_supported_file_is_listed_in_provenance(provenance_counts: dict[str, int]) -> None:
    assert set(SUPPORTED) <= set(provenance_counts) and DPG_KEY in provenance_counts


@pytest.mark.parametrize("rel", sorted(r for r, f in SUPPORTED.items() if f == "txt"))
def test_txt_first_and_last_prompt_match_raw_bytes(benchmarks: Path, rel: str) -> None:
    raw = (benchmarks / rel).read_bytes()
    raw = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    lines = [line.strip().decode("utf-8") for line in raw.split(b"\n") if line.strip()]
    prompts = read_prompts(benchmarks / rel)
    assert [prompts[0].text, prompts[-1].text] == [lines[0], lines[-1]]
    assert (prompts[0].id, prompts[-1].id) == ("0", str(len(lines) - 1))


def test_dpg_folder(benchmarks: Path, provenance_counts: dict[str, int]) -> None:
    folder = benchmarks / "dpg_bench" / "prompts"
    assert sniff_format(folder) == "folder"
    prompts = read_prompts(folder, source="dpg")
    assert len(prompts) == provenance_counts[DPG_KEY]
    _check_clean(prompts)
    assert {p.id for p in prompts} == {f.stem for f in folder.glob("*.txt")}
    by_id = {p.id: p for p in prompts}
    assert by_id["whoops31"].text == (folder / "whoops31.txt").read_bytes().decode().strip()
    assert [p.id for p in prompts][:3] == ["0", "1", "2"]  # natural order


def test_vilg300_multiline_cell_survives(benchmarks: Path) -> None:
    path = benchmarks / "vilg300" / "ViLG-300.csv"
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b"in the shape of a\r\ntriangle." in raw  # a quoted CRLF cell
    prompts = read_prompts(path)
    assert prompts[0].text == "A red colored car."
    assert prompts[0].meta == {"text_zh": "一辆红色的汽车。", "category_zh": "颜色", "origin": "DrawBench"}
    frame = [p for p in prompts if p.text.startswith("A triangular orange picture frame")]
    assert [p.text for p in frame] == [
        "A triangular orange picture frame. An orange picture frame in the shape of a triangle."
    ]
    # DrawBench holds the same prompts on one line: the wrapped ViLG cells must read identically.
    drawbench = {p.text for p in read_prompts(benchmarks / "drawbench" / "DrawBench.csv")}
    otto = [p.text for p in prompts if "Otto von Garfield" in p.text]
    assert len(otto) == 1 and otto[0] in drawbench and otto[0].endswith("lasagna.")


def test_drawbench_and_hrs_columns(benchmarks: Path) -> None:
    db = read_prompts(benchmarks / "drawbench" / "DrawBench.csv")
    assert (db[0].text, db[0].meta) == ("A red colored car.", {"category": "Colors"})
    assert "Gary Marcus et al." in {p.meta["category"] for p in db}  # trailing space in the file, stripped
    counting = read_prompts(benchmarks / "hrs_bench" / "synthetic_counting_prompts.csv")
    assert counting[0].text == "two cups filled with steaming hot coffee sit side-by-side on a wooden table."
    assert counting[0].meta["vanilla_prompt"] == "2 cup" and counting[0].meta["n2"] == "0"
    color = read_prompts(benchmarks / "hrs_bench" / "synthetic_color_comp_prompts.csv")
    assert (color[0].text, color[-1].id) == ("a red banana and a green chair.", "500")
    assert color[0].meta == {"obj1": "banana", "obj2": "chair", "color1": "red", "color2": "green"}


def test_geneval_jsonl_matches_txt(benchmarks: Path) -> None:
    meta = read_prompts(benchmarks / "geneval" / "evaluation_metadata.jsonl")
    txt = read_prompts(benchmarks / "geneval" / "generation_prompts.txt")
    assert [p.text for p in meta] == [p.text for p in txt]
    assert [p.id for p in meta] == [str(i) for i in range(553)]
    assert meta[0].meta == {"tag": "single_object", "include": [{"class": "bench", "count": 1}]}


def test_json_ids_come_from_the_files(benchmarks: Path) -> None:
    tifa = read_prompts(benchmarks / "tifa" / "tifa_v1.0_text_inputs.json")
    assert (tifa[0].id, tifa[0].meta) == ("coco_301091", {"coco_val_id": "380711"})
    assert tifa[0].text == "On a gray day a surfer carrying a white board walks on a beach."
    assert sum("coco_val_id" in p.meta for p in tifa) == 2000  # PROVENANCE.md: 2,000 COCO captions
    multigen = read_prompts(benchmarks / "tokencompose" / "multigen" / "coco_obj_comp_5_1k.json")
    assert (
        multigen[0].id == "0"
        and multigen[0].text == "a photo of a book, a cup, a kite, a mouse, and a surfboard."
    )
    assert multigen[0].meta["obj_5_attributes"] == ["surfboard"]
    refl = read_prompts(benchmarks / "imagereward" / "refl_data.json")
    assert (
        refl[0].id == "000044-0048" and refl[2].text == "a hybrid animal of a cat and a human"
    )  # trailing space stripped
    test = read_prompts(benchmarks / "imagereward" / "test.json")
    assert test[0].id == "005658-0040" and test[0].meta["ranking"] == [1, 2, 5, 3]
