"""MultiGen: the released prompt files, MG_k on known detections, the ToyWorld detector on renders, the callback
end to end (exact renders vs colour-swapped ones), and OWLv2 built from a tiny config through from_pretrained."""

import json

import lightning as L
import numpy as np
import pytest
import torch

from t2i_align.callbacks.multigen import MultiGenEvaluation, multigen_counts, multigen_metrics, read_multigen
from t2i_align.experts.detector import Detector
from t2i_align.toyworld.experts.segmenter import ToyDetector
from tests.helpers import RenderingModule


@pytest.mark.parametrize("name", ["coco", "ade20k"])
def test_released_prompt_files(benchmarks, name):
    prompts = read_multigen(benchmarks / "tokencompose" / "multigen" / f"{name}_obj_comp_5_1k.json")
    assert len(prompts) == 1000 and len({p.id for p in prompts}) == 1000
    for p in prompts:
        assert len(p.categories) == 5 and p.text.startswith("a photo of a ")
        assert all(c in p.text for c in p.categories)


def test_malformed_prompt_file_names_the_entry(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"unique_id": 0, "num_objects": 2, "text": "a", "obj_1_attributes": ["cat"]}]))
    with pytest.raises(ValueError, match="bad.json: entry 0: .*obj_2_attributes"):
        read_multigen(path)


def test_mg_k_counts_images_with_at_least_k_found():
    found = [[True, True, False, False, False], [True] * 5, [False] * 5, [True, True, True, False, False]]
    metrics = multigen_metrics(multigen_counts(found))
    assert metrics == pytest.approx({"object_recall": 10 / 20, "mg2": 3 / 4, "mg3": 2 / 4, "mg4": 1 / 4,
                                     "mg5": 1 / 4})


def test_toy_detector_finds_what_is_drawn():
    from t2i_align.toyworld.experts.judge import held_out_scenes
    from t2i_align.toyworld.world import COLOURS, SHAPES, render

    detector = ToyDetector()
    assert isinstance(detector, Detector)
    images, labels, expected = [], [], []
    for scene in held_out_scenes(10, seed=6_000_000):
        image, _ = render(scene)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255)
        present = [f"{o.colour} {o.shape}" for o in scene.objects]
        absent = next(f"{c} {s}" for c in COLOURS for s in SHAPES
                      if not any(o.colour == c and o.shape == s for o in scene.objects))
        labels.append([*present, absent])
        expected.append([True] * len(present) + [False])
    found = detector.found(torch.stack(images), labels)
    hits = [f == e for row, exp in zip(found, expected) for f, e in zip(row, exp)]
    assert sum(hits) / len(hits) > 0.95


def toy_multigen_file(path, count: int = 6):
    """A MultiGen-layout file of ToyWorld prompts: two coloured shapes each."""
    from t2i_align.toyworld.world import COLOURS, SHAPES

    colours, shapes = sorted(COLOURS), sorted(SHAPES)
    entries = []
    for i in range(count):
        a, b = f"{colours[i % len(colours)]} {shapes[i % len(shapes)]}", \
            f"{colours[(i + 1) % len(colours)]} {shapes[(i + 2) % len(shapes)]}"
        entries.append({"unique_id": i, "num_objects": 2, "text": f"a {a} and a {b}",
                        "obj_1_attributes": a.split(), "obj_2_attributes": b.split()})
    path.write_text(json.dumps(entries))
    return str(path)


@pytest.mark.parametrize("swap", [False, True])
def test_callback_on_toyworld_renders(tmp_path, swap):
    callback = MultiGenEvaluation(toy_multigen_file(tmp_path / "toy_multigen.json"), detector=ToyDetector(),
                                  images_per_prompt=2, batch_size=5, log_samples=0)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[callback], default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False)
    module = RenderingModule(swap_colours=swap)
    trainer.validate(module, dataloaders=torch.utils.data.DataLoader([0]))
    metrics = trainer.callback_metrics
    assert sum(len(call[0]) for call in module.generator.calls) == 12
    if not swap:
        assert metrics["val/multigen_toy/mg2"] == 1.0 and metrics["val/multigen_toy/object_recall"] == 1.0
    else:  # both shapes drawn, each in the other's colour: neither coloured shape is found
        assert metrics["val/multigen_toy/mg2"] < 0.5 and metrics["val/multigen_toy/object_recall"] < 0.5


@pytest.fixture(scope="module")
def tiny_owl(tiny_sd, tmp_path_factory):
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection

    folder = tmp_path_factory.mktemp("owlv2")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    config = Owlv2Config(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=32)
    torch.manual_seed(0)
    Owlv2ForObjectDetection(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Owlv2ImageProcessor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
         "image_std": [0.26862954, 0.26130258, 0.27577711], "size": {"height": 32, "width": 32}}))
    return str(folder)


def test_owlv2_loads_through_from_pretrained_and_applies_the_threshold(tiny_owl):
    from t2i_align.experts.detector import OwlV2Detector

    images = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    labels = [["cat", "dog", "car"], ["cup", "book", "tree"], ["bus", "cake", "chair"]]
    assert isinstance(OwlV2Detector(tiny_owl), Detector)
    none = OwlV2Detector(tiny_owl, threshold=1.0).found(images, labels)
    assert none == [[False] * 3] * 3
    everything = OwlV2Detector(tiny_owl, threshold=0.0).found(images, labels)
    assert all(any(row) for row in everything)  # every box counts for its best query
    detector = OwlV2Detector(tiny_owl, threshold=0.5)
    batch = detector.found(images, labels)
    assert batch == [detector.found(images[i:i + 1], labels[i:i + 1])[0] for i in range(3)]
    mixed = detector.found(images[:2], [["cat"], ["cup", "book"]])  # different label counts: split per image
    assert [len(row) for row in mixed] == [1, 2]


def test_command_scores_an_exported_folder(tmp_path, capsys):
    from PIL import Image

    from t2i_align.commands.multigen import main
    from tests.helpers import RenderingGenerator

    prompt_file = toy_multigen_file(tmp_path / "toy_multigen.json", count=3)
    prompts = read_multigen(prompt_file)
    out = tmp_path / "export"
    out.mkdir()
    renders = RenderingGenerator().sample([p.text for p in prompts], [0, 1, 2]).images
    swapped = RenderingGenerator(swap_colours=True).sample([p.text for p in prompts], [0, 1, 2]).images
    for index in range(3):  # image 0 exact, image 1 with the colours swapped
        for k, image in enumerate((renders[index], swapped[index])):
            array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            Image.fromarray(array).save(out / f"{index}_{k}.png")
    args = [str(out), "--prompt-file", prompt_file, "--images-per-prompt", "2",
            "--detector", "t2i_align.toyworld.experts.segmenter.ToyDetector", "--batch-size", "4"]
    main(args)
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    saved = json.loads((out / "multigen_scores.json").read_text())
    assert printed == saved["metrics"] and saved["images"] == 6
    assert printed["mg2"] == pytest.approx(0.5)  # the exact half
    assert [r["image"] for r in saved["per_image"]][:2] == ["0_0.png", "0_1.png"]
    (out / "2_1.png").unlink()
    with pytest.raises(FileNotFoundError, match="2_1.png"):
        main(args)
