"""ARL: rank-sum selection, prompts scored against their own candidates, rounds from the CLI and resume."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from t2i_align.cli import main as cli_main
from t2i_align.datamodules.prompts import Prompt
from t2i_align.diffusion.generator import GeneratorConfig, LoraSettings
from t2i_align.diffusion.sampling import SamplingSettings
from t2i_align.lightning_modules import ARL
from t2i_align.rewards import Reward
from t2i_align.rewards.ranking import average_ranks, rank_sum, select_candidates
from tests.helpers import REPO_ROOT

CONFIGS = Path(REPO_ROOT) / "configs"
PROMPTS = ["a red circle", "two blue squares", "a green star above a yellow triangle", "a purple square"]


# ----------------------------------------------------------------------------------------------- selection
def test_average_ranks_best_is_one_and_ties_share():
    torch.testing.assert_close(average_ranks(torch.tensor([0.1, 0.9, 0.5, 0.7])), torch.tensor([4.0, 1, 3, 2]).double())
    torch.testing.assert_close(average_ranks(torch.tensor([0.2, 0.9, 0.9])), torch.tensor([3.0, 1.5, 1.5]).double())
    torch.testing.assert_close(average_ranks(torch.tensor([[1.0, 1, 1, 1]])), torch.full((1, 4), 2.5).double())
    nan = float("nan")
    torch.testing.assert_close(average_ranks(torch.tensor([nan, 0.3, nan, -5.0])), torch.tensor([3.5, 1, 3.5, 2]).double())


@pytest.mark.parametrize("scores, kept", [
    ({"a": [0.1, 0.5, 0.3]}, 1),  # a single reward: its best
    ({"a": [3.0, 2, 1], "b": [1.0, 3, 2]}, 1),  # rank sums 4, 3, 5
    ({"a": [0.9, 0.9, 0.1], "b": [0.2, 0.5, 0.5]}, 1),  # ties: sums 4.5, 3, 4.5
    ({"a": [0.9, 0.1, 0.5], "b": [0.1, 0.9, 0.5]}, 0),  # all sums equal (4): the first candidate
    # summing argsort indices (the public notebook) would keep candidate 2 here; ranks keep candidate 3
    ({"a": [0.0, 1.0, 2.0, 3.0], "b": [3.0, 0.0, 2.5, 2.9]}, 3),
    # a NaN score (a reward failed on that image) ranks last, never first
    ({"a": [float("nan"), 0.2, 0.1]}, 1),
    ({"a": [0.9, 0.5, 0.1], "b": [float("nan"), 0.5, 0.4]}, 1),  # sums 1+3, 2+1, 3+2
])
def test_selection_on_hand_made_scores(scores, kept):
    assert int(select_candidates({k: torch.tensor(v) for k, v in scores.items()})) == kept


def test_rank_sum_needs_the_same_candidates_for_every_reward():
    with pytest.raises(ValueError, match="same candidates"):
        rank_sum({"a": torch.zeros(3), "b": torch.zeros(4)})


# ------------------------------------------------------------------------------------------------ rounds
class PromptRecorder(Reward):
    """Scores with the mean of the red channel; records every call's prompts."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def score(self, images, prompts):
        self.calls.append(list(prompts))
        return images[:, 0].mean((1, 2))


def arl(tiny_sd, tmp_path, **kwargs):
    return ARL(generator=GeneratorConfig(pretrained=tiny_sd, lora=LoraSettings(rank=4)),
               rewards={"red": PromptRecorder()}, candidates=3, sampling=SamplingSettings(3, guidance_scale=1.0),
               generation_batch_size=2, output_dir=str(tmp_path / "arl"), **kwargs)


def attach(module):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    module.trainer = trainer
    return trainer


def test_each_candidate_is_scored_against_its_own_prompt_and_the_best_is_kept(tiny_sd, tmp_path):
    module = arl(tiny_sd, tmp_path)
    attach(module)
    prompts = [Prompt(text, "train", str(i)) for i, text in enumerate(PROMPTS)]
    metadata = module.prepare_round(0, prompts)
    calls = module.rewards["red"].calls
    # generation_batch_size 2 and K = 3: two scoring calls per prompt, in prompt order, each with that prompt only
    assert [set(c) for c in calls] == [{p} for p in PROMPTS for _ in range(2)] and sum(map(len, calls)) == 12
    lines = [json.loads(line) for line in metadata.read_text().splitlines()]
    assert [line["text"] for line in lines] == PROMPTS
    for index, line in enumerate(lines):
        record = json.loads((metadata.parent / "selection" / f"{index:06d}.json").read_text())
        scores = record["scores"]["red"]
        assert record["kept"] == max(range(3), key=scores.__getitem__)
        # the kept PNG is the kept candidate: its red mean is the kept score (up to uint8 rounding)
        import numpy as np
        from PIL import Image
        red = np.asarray(Image.open(metadata.parent / line["file_name"]))[..., 0].mean() / 255
        assert abs(red - scores[record["kept"]]) < 2 / 255


def test_min_scores_leave_prompts_whose_kept_candidate_falls_short_out_of_the_round(tiny_sd, tmp_path):
    prompts = [Prompt(text, "train", str(i)) for i, text in enumerate(PROMPTS)]
    everything = arl(tiny_sd, tmp_path / "all")
    attach(everything)
    records = everything.prepare_round(0, prompts).parent / "selection"
    selections = [json.loads((records / f"{i:06d}.json").read_text()) for i in range(len(PROMPTS))]
    kept = [r["scores"]["red"][r["kept"]] for r in selections]
    threshold = sorted(kept)[1] + 1e-6  # the two lowest fall short
    filtered = arl(tiny_sd, tmp_path / "filtered", min_scores={"red": threshold})
    attach(filtered)
    lines = [json.loads(line) for line in filtered.prepare_round(0, prompts).read_text().splitlines()]
    assert [line["text"] for line in lines] == [p for p, k in zip(PROMPTS, kept) if k >= threshold]
    assert len(lines) == len(PROMPTS) - 2
    summary = json.loads((tmp_path / "filtered" / "arl" / "round_0" / "summary.json").read_text())
    assert summary["trained_on"] == len(PROMPTS) - 2
    nothing = arl(tiny_sd, tmp_path / "none", min_scores={"red": 2.0})
    attach(nothing)
    with pytest.raises(RuntimeError, match="no prompt's kept candidate reached min_scores"):
        nothing.prepare_round(0, prompts)
    with pytest.raises(ValueError, match="min_scores names rewards that are not given: \\['blue'\\]"):
        arl(tiny_sd, tmp_path, min_scores={"blue": 0.5})


def test_selection_resumes_where_it_stopped(tiny_sd, tmp_path):
    module = arl(tiny_sd, tmp_path)
    attach(module)
    prompts = [Prompt(text, "train", str(i)) for i, text in enumerate(PROMPTS)]
    metadata = module.prepare_round(0, prompts)
    before = metadata.read_text()
    records = {i: (metadata.parent / "selection" / f"{i:06d}.json").read_text() for i in range(4)}
    metadata.unlink()
    for i in (1, 3):
        (metadata.parent / "selection" / f"{i:06d}.json").unlink()
    selected, select = [], module.select
    module.select = lambda r, prompt, index: (selected.append(index), select(r, prompt, index))[1]
    assert module.prepare_round(0, prompts).read_text() == before
    assert selected == [1, 3]
    assert {i: (metadata.parent / "selection" / f"{i:06d}.json").read_text() for i in range(4)} == records


def arl_args(tiny_sd, tiny_pairs, prompts_file, root, epochs, extra=()):
    return [
        "fit",
        "--config", str(CONFIGS / "trainer/cpu.yaml"),
        "--config", str(CONFIGS / "method/arl.yaml"),
        "--config", str(CONFIGS / "model/tiny.yaml"),
        f"--model.init_args.generator.pretrained={tiny_sd}",
        "--model.init_args.rewards={red: {class_path: tests.training.test_arl.PromptRecorder}}",
        "--model.init_args.candidates=3", "--model.init_args.sampling.num_inference_steps=3",
        "--model.init_args.sampling.guidance_scale=1.0",
        "--data=t2i_align.datamodules.RankedPairsData",
        f"--data.init_args.train_prompts=[{{path: {prompts_file}}}]",
        f"--data.init_args.val_pairs={{path: {tiny_pairs}}}",
        "--data.init_args.batch_size=2", "--data.init_args.resolution=32",
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_epochs={epochs}", "--trainer.limit_train_batches=2",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.val_check_interval=null",
        "--trainer.check_val_every_n_epoch=1",
        *extra,
    ]


def test_rounds_from_the_cli_generate_with_the_latest_weights_and_resume_between_rounds(tiny_sd, tiny_pairs, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    root = tmp_path / "run"
    cli_main(arl_args(tiny_sd, tiny_pairs, prompts_file, root, epochs=1))
    round0 = root / "arl" / "round_0"
    assert len(round0.joinpath("metadata.jsonl").read_text().splitlines()) == 4
    stamp = {p: p.stat().st_mtime_ns for p in round0.rglob("*")}
    last = root / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["RankedPairsData"]["round"] == 0  # the datamodule state holds the round

    cli_main(arl_args(tiny_sd, tiny_pairs, prompts_file, root, epochs=2, extra=[f"--ckpt_path={last}"]))
    assert {p: p.stat().st_mtime_ns for p in round0.rglob("*")} == stamp  # round 0 not redone
    round1 = [json.loads((root / "arl" / "round_1" / "selection" / f"{i:06d}.json").read_text()) for i in range(4)]
    assert all(r["round"] == 1 and r["global_step"] == 2 for r in round1)  # after round 0's two updates
    first = [json.loads((round0 / "selection" / f"{i:06d}.json").read_text()) for i in range(4)]
    assert all(r["global_step"] == 0 for r in first)
    summary = json.loads((root / "arl" / "round_1" / "summary.json").read_text())
    assert summary["prompts"] == 4 and set(summary["kept"]) == {"red"}


@pytest.mark.ddp
def test_two_processes_split_the_prompts_and_select_what_one_process_selects(tiny_sd, tiny_pairs, tmp_path):
    from tests.training.test_ddp import run_cli

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join([*PROMPTS, "a cyan circle"]) + "\n")  # 5 prompts: an uneven split
    rounds = {}
    for name, extra in {"ddp": ["--trainer.strategy=ddp", "--trainer.devices=2"], "single": []}.items():
        root = tmp_path / name
        run_cli(arl_args(tiny_sd, tiny_pairs, prompts_file, root, epochs=1, extra=extra))
        rounds[name] = root / "arl" / "round_0"
    ddp, single = rounds["ddp"], rounds["single"]
    assert ddp.joinpath("metadata.jsonl").read_text() == single.joinpath("metadata.jsonl").read_text()
    for i in range(5):
        a, b = (json.loads((r / "selection" / f"{i:06d}.json").read_text()) for r in (ddp, single))
        assert a["text"] == b["text"] and a["seeds"] == b["seeds"] and a["kept"] == b["kept"]
        assert a["scores"]["red"] == pytest.approx(b["scores"]["red"], abs=1e-5)
        assert (ddp / "images" / f"{i:06d}.png").exists()
    assert json.loads((ddp / "summary.json").read_text())["prompts"] == 5
