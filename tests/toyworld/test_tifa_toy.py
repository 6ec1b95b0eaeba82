"""TIFA on ToyWorld: scene-graph questions in TIFA's format, answered by the judge through the VQA interface."""

import json

import lightning as L
import pytest
import torch

from t2i_align.callbacks.tifa import TIFAEvaluation, read_tifa_questions
from t2i_align.experts.vqa import VQAModel
from t2i_align.toyworld.experts.judge import ToyJudge
from t2i_align.toyworld.evaluation.metrics import score_image
from t2i_align.toyworld.splits import TIFA_TYPES, eval_prompt_sets, tifa_questions
from t2i_align.toyworld.experts.vqa import ToyVQA
from t2i_align.toyworld.world import parse_prompt
from tests.helpers import RenderingGenerator, RenderingModule

Module = RenderingModule


@pytest.fixture(scope="module")
def question_file(tmp_path_factory):
    sets = {c: specs for c, specs in eval_prompt_sets(0, 3).items() if c in ("color_binding", "spatial", "counting", "size")}
    path = tmp_path_factory.mktemp("tifa") / "eval_tifa.json"
    path.write_text(json.dumps(tifa_questions(sets)))
    return path


def validate(question_file, tmp_path, swap_colours: bool) -> tuple[dict, Module]:
    callback = TIFAEvaluation(str(question_file), vqa=ToyVQA(), batch_size=5, log_samples=0)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[callback], default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False)
    module = Module(swap_colours)
    trainer.validate(module, dataloaders=torch.utils.data.DataLoader([0]))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}, module


def test_question_file_is_valid_tifa(question_file):
    questions = read_tifa_questions(question_file)
    assert len(questions) == 12
    types = {q.element_type for qs in questions.values() for q in qs}
    assert {"object", "color", "counting", "spatial", "size"} <= types <= set(TIFA_TYPES.values())
    assert isinstance(ToyVQA(), VQAModel)


def test_judge_answers_match_the_toy_metric(question_file, tmp_path):
    good, _ = validate(question_file, tmp_path, swap_colours=False)
    assert good["val/tifa_toyjudge/average"] == 1.0 and good["val/tifa_toyjudge/counting"] == 1.0
    bad, module = validate(question_file, tmp_path, swap_colours=True)
    assert bad["val/tifa_toyjudge/color"] < 0.9 and bad["val/tifa_toyjudge/object"] == 1.0
    # the same images scored by the toy metric's own TIFA (Question objects, no text round trip)
    judge, direct = ToyJudge(), []
    for prompts, seeds, _ in module.generator.calls:
        images = RenderingGenerator(swap_colours=True).sample(prompts, seeds).images
        direct += [score_image(parse_prompt(p), d)["tifa"] for p, d in zip(prompts, judge.detect_batch(images))]
    assert bad["val/tifa_toyjudge/average"] == pytest.approx(sum(direct) / len(direct))


def test_unparseable_question_is_answered_unknown():
    assert ToyVQA().answer(torch.zeros(1, 3, 64, 64), ["what colour is the sky?"]) == ["unknown"]
