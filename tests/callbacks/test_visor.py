"""VISOR object accuracy: the prompt set, two-object spatial prompts parsed (T2I-CompBench's too), and the callback
on ToyWorld renders (exact: both found; colour-swapped: neither coloured shape found)."""

import lightning as L
import pytest
import torch

from t2i_align.callbacks.visor import VISORObjectAccuracy, spatial_objects, visor_prompts
from t2i_align.toyworld.experts.segmenter import ToyDetector
from tests.helpers import RenderingModule


def test_visor_prompt_set_is_every_ordered_pair_with_four_relations():
    classes = ["dog", "apple", "traffic light"]
    prompts = visor_prompts(classes)
    assert len(prompts) == 3 * 2 * 4 and len(set(prompts)) == len(prompts)
    assert "a dog to the left of an apple" in prompts and "an apple below a traffic light" in prompts
    assert spatial_objects("an apple below a traffic light") == ("apple", "traffic light")


def test_t2i_compbench_spatial_prompts_parse(benchmarks):
    lines = (benchmarks / "t2i_compbench" / "spatial_val.txt").read_text().splitlines()
    pairs = [spatial_objects(line) for line in lines if line.strip()]
    assert len(pairs) == 300  # every prompt of the file (wc -l says 299: no final newline)
    assert spatial_objects("a girl on the top of a frog") == ("girl", "frog")
    with pytest.raises(ValueError, match="'a cat and a dog'"):
        spatial_objects("a cat and a dog")


@pytest.mark.parametrize("swap", [False, True])
def test_object_accuracy_on_toyworld_renders(tmp_path, swap):
    prompts = tmp_path / "spatial.txt"
    prompts.write_text("a red circle to the left of a blue square\na green star above a yellow triangle\n"
                       "a purple square below a red star\n")
    callback = VISORObjectAccuracy(detector=ToyDetector(), prompts=[{"path": str(prompts)}], images_per_prompt=2,
                                   batch_size=4, log_samples=0)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[callback], default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(RenderingModule(swap_colours=swap), dataloaders=torch.utils.data.DataLoader([0]))
    accuracy = float(trainer.callback_metrics["val/visor/object_accuracy"])
    assert accuracy == 1.0 if not swap else accuracy < 0.5


def test_other_prompts_are_refused_before_generating(tmp_path):
    prompts = tmp_path / "mixed.txt"
    prompts.write_text("a red circle to the left of a blue square\nthree green stars\n")
    callback = VISORObjectAccuracy(detector=ToyDetector(), prompts=[{"path": str(prompts)}])
    with pytest.raises(ValueError, match="three green stars"):
        callback.items
