"""Benchmark export layouts: every file name parses back to its prompt and image number, on the real files."""

import json

import pytest

from t2i_align.datamodules.export import LAYOUTS
from t2i_align.datamodules.export import get_layout as layout
from t2i_align.datamodules.prompts import Prompt, read_prompts

FILES = {
    "t2i_compbench": "t2i_compbench/color_val.txt",
    "geneval": "geneval/evaluation_metadata.jsonl",
    "dpg_bench": "dpg_bench/prompts",
    "tifa": "tifa/tifa_v1.0_text_inputs.json",
    "multigen": "tokencompose/multigen/coco_obj_comp_5_1k.json",
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_names_parse_back(name, benchmarks):
    prompts = read_prompts(benchmarks / FILES[name])
    lay = layout(name)
    seen = set()
    for index, p in enumerate(prompts):
        files = lay.files(p, index)
        assert len(files) == (1 if lay.grid > 1 else lay.images_per_prompt)
        for k, f in enumerate(files):
            assert f not in seen
            seen.add(f)
            key, number = lay.parse(f)
            assert number == k
            assert key == {"t2i_compbench": p.text, "geneval": index, "multigen": index}.get(name, p.id)


def test_geneval_metadata_and_tifa_image_map(benchmarks, tmp_path):
    prompts = read_prompts(benchmarks / FILES["geneval"])[:3]
    layout("geneval").finalize(tmp_path / "geneval", prompts)
    lines = (benchmarks / FILES["geneval"]).read_text().splitlines()[:3]
    for index, line in enumerate(lines):
        written = json.loads((tmp_path / "geneval" / f"{index:05d}" / "metadata.jsonl").read_text())
        assert written == json.loads(line)  # the scorer reads the prompt's own record
    prompts = read_prompts(benchmarks / FILES["tifa"])[:4]
    layout("tifa").finalize(tmp_path / "tifa", prompts)
    mapping = json.loads((tmp_path / "tifa" / "tifa_images.json").read_text())
    assert mapping == {p.id: str(tmp_path / "tifa" / f"{p.id}.png") for p in prompts}


def test_bad_names_and_counts():
    with pytest.raises(ValueError, match="cannot be a file name"):
        layout("t2i_compbench").files(Prompt("a/b", "s", "0"), 0)
    with pytest.raises(ValueError, match="grid holds exactly 4"):
        layout("dpg_bench", 3)
    with pytest.raises(ValueError, match="unknown layout"):
        layout("drawbench")
    assert layout("t2i_compbench", 2).files(Prompt("a cat", "s", "7"), 3) == ["samples/a cat_000006.png",
                                                                              "samples/a cat_000007.png"]
