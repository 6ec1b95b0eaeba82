"""The study harness: which checkpoint of a run it evaluates, the full pass's callbacks, and the one cached evaluation
pass, reused only for the same request (checkpoint path and content, prompts, seeds, sampler: whatever the evaluation
callback's arguments are called). The CLI is replaced by a stand-in here, except in the end-to-end tests."""

import copy
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from t2i_align.callbacks.toyworld import ToyWorldEvaluation
from t2i_align.studies import harness
from t2i_align.studies.harness import Model
from tests.helpers import REPO_ROOT

CONFIGS = Path(REPO_ROOT) / "configs"
TINY = tuple(str(CONFIGS / name) for name in ("trainer/cpu.yaml", "method/finetune.yaml", "model/tiny.yaml",
                                              "data/tiny_pairs.yaml"))
# arguments of the toy evaluation that are not sampler settings (the sampler's are found as the others)
NOT_SAMPLER = {"prompts_dir", "categories", "per_category", "images_per_prompt", "batch_size", "seed", "log_samples",
               "evaluate_before_fit", "per_image"}


# ------------------------------------------------------------------------------------------ checkpoints
def test_newest_version_checkpoint_is_evaluated(tmp_path):
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        harness.checkpoint(tmp_path)
    for version in (2, 10, 9):
        folder = tmp_path / "logs" / f"version_{version}" / "checkpoints"
        folder.mkdir(parents=True)
        (folder / "last.ckpt").write_bytes(b"")
    assert harness.checkpoint(tmp_path).parts[-3] == "version_10"  # numeric, not lexical order


def test_checkpoint_of_the_step_from_the_newest_version(tmp_path):
    with pytest.raises(FileNotFoundError, match="step 100"):
        harness.checkpoint(tmp_path, 100)
    for version in (1, 10):
        folder = tmp_path / "logs" / f"version_{version}" / "checkpoints"
        folder.mkdir(parents=True)
        for step in (100, 200):
            (folder / f"epoch=0-step={step}.ckpt").write_bytes(b"")
    (tmp_path / "logs" / "version_10" / "checkpoints" / "epoch=0-step=1000.ckpt").write_bytes(b"")
    found = harness.checkpoint(tmp_path, 100)
    assert found.parts[-3] == "version_10" and found.name == "epoch=0-step=100.ckpt"  # not step=1000


def test_fit_is_skipped_for_a_finished_run_and_keeps_its_wall_time(tmp_path, monkeypatch):
    calls = []

    def run_cli(subcommand, args):
        calls.append((subcommand, list(args)))
        (tmp_path / "toy_eval.json").write_text(json.dumps({"step": 200}))
        return "t2i-align fit ...", 12.5

    monkeypatch.setattr(harness, "run_cli", run_cli)
    model = Model("A", ("a.yaml",), str(tmp_path))
    trained = harness.fit(model, ["--trainer.max_steps=200"], min_step=200)
    assert trained == {"command": "t2i-align fit ...", "seconds": 12.5}
    assert calls == [("fit", ["--config", "a.yaml", "--trainer.max_steps=200"])]
    # found: the command as it would be typed, the wall time of the fit that made the run
    assert harness.fit(model, ["--trainer.max_steps=200"], min_step=200) == \
        {"command": "t2i-align fit --config a.yaml --trainer.max_steps=200", "seconds": 12.5}
    assert harness.fit(model, min_step=100) and harness.fit(model) and len(calls) == 1  # a longer run is reused
    harness.fit(model, ["--trainer.max_steps=300"], min_step=300)  # too short
    harness.fit(model, retrain=True)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="no run folder"):
        harness.fit(Model("Base", ("a.yaml",)))


# --------------------------------------------------------------------------------------------- the pass
def test_full_prompt_set_pass_keeps_the_eval_configs_sampler():
    [toy] = harness.toy_pass_callbacks(100, 3, str(CONFIGS / "eval" / "toyworld.yaml"))
    [configured] = [c for c in yaml.safe_load((CONFIGS / "eval" / "toyworld.yaml").read_text())["trainer"]["callbacks"]
                    if c["class_path"] == toy["class_path"]]
    changed = {"per_category": 100, "images_per_prompt": 3, "per_image": True, "log_samples": 0}
    assert {k: toy["init_args"][k] for k in changed} == changed
    assert {k: v for k, v in toy["init_args"].items() if k not in changed} == \
        {k: v for k, v in configured["init_args"].items() if k not in changed}
    assert harness.toy_pass_callbacks(100, 3) == [toy]  # the default is that file


def toy_callback(prompts_dir, **init_args) -> list[dict]:
    return [{"class_path": "t2i_align.callbacks.toyworld.ToyWorldEvaluation",
             "init_args": {"prompts_dir": str(prompts_dir), "per_category": 2, "batch_size": 16, **init_args}}]


class FakeCLI:
    """Stands in for ``t2i-align validate``: writes the metrics file and one per-image record file where the pass
    runs, and counts the runs."""

    def __init__(self) -> None:
        self.runs: list[list[str]] = []

    def __call__(self, subcommand, args):
        assert subcommand == "validate"
        self.runs.append(list(args))
        root = Path(next(a.split("=", 1)[1] for a in args if a.startswith("--trainer.default_root_dir=")))
        (root / "toy_eval").mkdir(parents=True, exist_ok=True)
        (root / "toy_eval" / "per_image_step_0.jsonl").write_text(json.dumps({"run": len(self.runs)}) + "\n")
        (root / "metrics.json").write_text(json.dumps({"toy/all_clauses": 0.25, "run": len(self.runs)}))
        return "t2i-align validate ...", 3.0


@pytest.fixture
def fake_cli(monkeypatch):
    fake = FakeCLI()
    monkeypatch.setattr(harness, "run_cli", fake)
    return fake


@pytest.fixture
def eval_config(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": toy_callback(tmp_path / "prompts")}}))
    return str(path)


def resolved_toy_args(callbacks, eval_config) -> dict:
    """The toy callback's init_args as the CLI resolves them (defaults filled in)."""
    args = [*harness.config_args(TINY), "--config", eval_config, "--trainer.logger=false",
            "--trainer.callbacks=" + json.dumps(callbacks)]
    [toy] = harness.evaluation_key(args, None)["config"]["trainer"]["callbacks"]
    return toy["init_args"]


def test_an_identical_request_reuses_the_pass(tmp_path, fake_cli, eval_config):
    model, callbacks = Model("Tiny", TINY), toy_callback(tmp_path / "prompts")
    first = harness.evaluate(model, callbacks, "toy", root=tmp_path / "compare", eval_config=eval_config)
    assert first["metrics"] == {"toy/all_clauses": 0.25, "run": 1} and first["checkpoint"] is None
    assert Path(first["per_image"]).read_text() == '{"run": 1}\n' and Path(first["root"]).parent.name == "tiny"
    again = harness.evaluate(model, copy.deepcopy(callbacks), "toy", root=tmp_path / "compare", eval_config=eval_config)
    assert again == first and len(fake_cli.runs) == 1
    forced = harness.evaluate(model, callbacks, "toy", reevaluate=True, root=tmp_path / "compare",
                              eval_config=eval_config)
    assert len(fake_cli.runs) == 2 and forced["metrics"]["run"] == 2 and forced["root"] == first["root"]
    assert Path(forced["per_image"]).read_text() == '{"run": 2}\n'
    # the run the stand-in saw: the model's stack, the eval config, the callbacks, then the metrics writer
    args = fake_cli.runs[0]
    n = 2 * len(TINY)
    assert args[:n] == harness.config_args(TINY) and args[n:n + 2] == ["--config", eval_config]
    writer = json.loads(args[-1].removeprefix("--trainer.callbacks+="))
    assert writer["class_path"] == "t2i_align.studies.harness.MetricsFile"
    assert not any(a.startswith("--ckpt_path") for a in args)


def changed_requests(prompts_dir) -> dict[str, list[dict]]:
    return {"per_category": toy_callback(prompts_dir, per_category=3),
            "categories": toy_callback(prompts_dir, categories=["color_binding", "shape"]),
            "prompts folder": toy_callback(Path(prompts_dir).parent / "other_prompts"),
            "images per prompt": toy_callback(prompts_dir, images_per_prompt=3),
            "seed": toy_callback(prompts_dir, seed=1)}


@pytest.mark.parametrize("change", ["per_category", "categories", "prompts folder", "images per prompt", "seed"])
def test_other_prompts_or_seeds_are_evaluated_again(tmp_path, fake_cli, eval_config, change):
    model, root = Model("Tiny", TINY), tmp_path / "compare"
    first = harness.evaluate(model, toy_callback(tmp_path / "prompts"), "toy", root=root, eval_config=eval_config)
    other = harness.evaluate(model, changed_requests(tmp_path / "prompts")[change], "toy", root=root,
                             eval_config=eval_config)
    assert len(fake_cli.runs) == 2 and other["root"] != first["root"] and other["metrics"]["run"] == 2
    # and the first request is still there, not overwritten by the second
    again = harness.evaluate(model, toy_callback(tmp_path / "prompts"), "toy", root=root, eval_config=eval_config)
    assert again == first and len(fake_cli.runs) == 2


def sampler_leaves(init_args: dict, path=()) -> list[tuple]:
    """Paths of the numeric sampler settings among the resolved init_args (flat or in a nested group)."""
    out = []
    for key, value in init_args.items():
        if not path and key in NOT_SAMPLER:
            continue
        if isinstance(value, dict):
            out += sampler_leaves(value, (*path, key))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((*path, key))
    return out


def test_every_sampler_setting_is_part_of_the_request(tmp_path, fake_cli, eval_config):
    model, root = Model("Tiny", TINY), tmp_path / "compare"
    resolved = resolved_toy_args(toy_callback(tmp_path / "prompts"), eval_config)
    leaves = sampler_leaves(resolved)
    assert len(leaves) >= 2, resolved  # at least the steps and the guidance scale, whatever they are called
    first = harness.evaluate(model, toy_callback(tmp_path / "prompts"), "toy", root=root, eval_config=eval_config)
    for i, leaf in enumerate(leaves):
        init_args = copy.deepcopy(resolved)
        node = init_args
        for key in leaf[:-1]:
            node = node[key]
        node[leaf[-1]] = node[leaf[-1]] + (1 if isinstance(node[leaf[-1]], int) else 0.25)
        callbacks = toy_callback(tmp_path / "prompts")
        callbacks[0]["init_args"] = init_args
        other = harness.evaluate(model, callbacks, "toy", root=root, eval_config=eval_config)
        assert len(fake_cli.runs) == i + 2 and other["root"] != first["root"], leaf
    # the fully resolved arguments of the first request are that request: reused
    callbacks = toy_callback(tmp_path / "prompts")
    callbacks[0]["init_args"] = resolved
    assert harness.evaluate(model, callbacks, "toy", root=root, eval_config=eval_config) == first


def test_the_key_holds_every_resolved_callback_argument_but_no_output_location(tmp_path, eval_config):
    resolved = resolved_toy_args(toy_callback(tmp_path / "prompts"), eval_config)
    assert set(resolved) == set(inspect.signature(ToyWorldEvaluation).parameters)  # defaults filled in
    assert resolved["per_category"] == 2 and resolved["prompts_dir"] == str(tmp_path / "prompts")
    args = [*harness.config_args(TINY), "--config", eval_config]
    key = harness.evaluation_key([*args, "--trainer.default_root_dir=a"], None)
    assert key == harness.evaluation_key([*args, "--trainer.default_root_dir=b", "--trainer.logger=false",
                                          "--data.init_args.num_workers=3"], None)
    assert "default_root_dir" not in key["config"]["trainer"] and key["checkpoint"] is None
    assert key["config"]["model"]["init_args"]["generator"]["lora"]["rank"] == 4  # the model is part of it too
    assert key != harness.evaluation_key([*args, "--model.init_args.generator.lora.rank=8"], None)


def test_the_checkpoints_path_and_content_are_part_of_the_request(tmp_path, fake_cli, eval_config):
    root, callbacks = tmp_path / "compare", toy_callback(tmp_path / "prompts")
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    a.write_bytes(b"weights 1")
    b.write_bytes(b"weights 1")

    def evaluate(path):
        return harness.evaluate(Model("Tiny", TINY, checkpoint=str(path)), callbacks, "toy", root=root,
                                eval_config=eval_config)

    first = evaluate(a)
    assert first["checkpoint"] == str(a) and fake_cli.runs[0][-1] == f"--ckpt_path={a}"
    assert evaluate(a) == first and len(fake_cli.runs) == 1
    evaluate(b)  # the same content at another path
    assert len(fake_cli.runs) == 2
    a.write_bytes(b"weights 2")  # the same path, retrained
    assert evaluate(a)["root"] != first["root"] and len(fake_cli.runs) == 3
    a.write_bytes(b"weights 1")  # written again with the first content: that evaluation holds
    assert evaluate(a) == first and len(fake_cli.runs) == 3
    no_checkpoint = harness.evaluate(Model("Tiny", TINY), callbacks, "toy", root=root, eval_config=eval_config)
    assert no_checkpoint["root"] != first["root"] and len(fake_cli.runs) == 4


def test_the_model_slug_names_its_folder():
    assert Model("CA+FP (step 100)", ("a",)).slug == "ca_fp_step_100"
    assert Model("Base + fine stage", ("a",)).slug == "base_fine_stage"


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    from t2i_align.toyworld.splits import eval_prompt_sets, write_prompts

    root = tmp_path_factory.mktemp("prompts")
    for category, specs in eval_prompt_sets(0, 2).items():
        write_prompts(specs, root / f"{category}.txt")
    return root


def tiny_model(tmp_path, tiny_sd, tiny_pairs, name="Tiny") -> Model:
    """The tiny pipeline and pairs, trained for 2 steps into ``tmp_path/run`` (CSV logs under ``logs/``)."""
    override = tmp_path / "tiny.yaml"
    run = tmp_path / "run"
    override.write_text(yaml.safe_dump({
        "model": {"init_args": {"generator": {"pretrained": tiny_sd}}},
        "data": {"init_args": {"train_pairs": {"path": tiny_pairs}, "val_pairs": {"path": tiny_pairs, "limit": 2},
                               "batch_size": 2}},
        "trainer": {"default_root_dir": str(run), "max_steps": 2, "val_check_interval": 2,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(run), "name": "logs"}}}}))
    return Model(name, (*TINY, str(override)), str(run))


def one_image(prompts) -> list[dict]:
    return toy_callback(prompts, categories=["color_binding"], per_category=1, per_image=True, log_samples=0)


def test_the_pass_appends_the_metrics_writer_to_its_callbacks(tmp_path, fake_cli, eval_config):
    harness.evaluate(Model("Tiny", TINY), toy_callback(tmp_path / "prompts"), "toy", root=tmp_path / "compare",
                     eval_config=eval_config)
    [args] = fake_cli.runs
    toy, writer = harness.resolved_config(args)["trainer"]["callbacks"]  # what the CLI will build
    assert toy["init_args"]["prompts_dir"] == str(tmp_path / "prompts")
    assert writer == {"class_path": "t2i_align.studies.harness.MetricsFile",
                      "init_args": {"path": str(Path(args[-2].split("=", 1)[1]) / "metrics.json")}}


def test_the_metrics_file_holds_what_validate_returns(tmp_path, prompts):
    import lightning as L
    import torch

    from tests.helpers import RenderingModule

    callbacks = [ToyWorldEvaluation(str(prompts), per_category=1, batch_size=7, log_samples=0),
                 harness.MetricsFile(str(tmp_path / "metrics.json"))]
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=callbacks, default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False)
    [returned] = trainer.validate(RenderingModule(), dataloaders=torch.utils.data.DataLoader([0]))
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == pytest.approx({k.removeprefix("val/"): float(v) for k, v in returned.items()})
    assert written["toy/all_clauses"] == 1.0 and "toy/seconds" in written


@pytest.mark.slow
def test_a_pass_runs_the_cli_and_hands_back_its_metrics(tmp_path, tiny_sd, tiny_pairs, prompts, eval_config,
                                                        monkeypatch):
    model = tiny_model(tmp_path, tiny_sd, tiny_pairs)
    result = harness.evaluate(model, one_image(prompts), "toy", root=tmp_path / "compare", eval_config=eval_config)
    expected = {"toy/all_clauses", "toy/color_binding/object_missing", "toy/seconds", "denoise_loss"}
    assert expected <= set(result["metrics"])
    [record] = [json.loads(line) for line in Path(result["per_image"]).read_text().splitlines()]
    assert record["key"].startswith("color_binding/") and result["command"].startswith("t2i-align validate --config")
    monkeypatch.setattr(harness, "run_cli", None)  # reused: the CLI is not run again
    again = harness.evaluate(model, one_image(prompts), "toy", root=tmp_path / "compare", eval_config=eval_config)
    assert again == result


@pytest.mark.slow
def test_a_fit_and_its_checkpoint_evaluated_end_to_end(tmp_path, tiny_sd, tiny_pairs, prompts, eval_config):
    model = tiny_model(tmp_path, tiny_sd, tiny_pairs)
    trained = harness.fit(model)
    assert trained["command"].startswith("t2i-align fit --config") and trained["seconds"] > 0
    ckpt = harness.checkpoint(model.run_dir)
    assert ckpt.name == "last.ckpt" and harness.checkpoint(model.run_dir, 2).name.endswith("step=2.ckpt")
    trained_model = model.replace(checkpoint=str(ckpt))
    after = harness.evaluate(trained_model, one_image(prompts), "toy", root=tmp_path / "compare",
                             eval_config=eval_config)
    before = harness.evaluate(model, one_image(prompts), "toy", root=tmp_path / "compare", eval_config=eval_config)
    assert f"--ckpt_path={ckpt}" in after["command"] and after["root"] != before["root"]
    assert after["metrics"]["denoise_loss"] != before["metrics"]["denoise_loss"]  # the trained weights were loaded


# ------------------------------------------------------------------------------------------ training seeds
def test_a_training_seed_is_another_run_of_the_same_stack(tmp_path, monkeypatch):
    calls = []

    def run_cli(subcommand, args):
        calls.append(list(args))
        return "t2i-align fit ...", 1.0

    monkeypatch.setattr(harness, "run_cli", run_cli)
    model = Model("A", ("a.yaml",), str(tmp_path / "a"))
    assert harness.training_seed(model, 0) is model  # the configs' own seeds
    seeded = harness.training_seed(model, 2)
    assert seeded.name == "A (training seed 2)" and seeded.run_dir == f"{tmp_path / 'a'}_seed2"
    harness.fit(seeded, ["--trainer.max_steps=5"])
    assert calls == [["--config", "a.yaml", "--model.init_args.seed=2", "--data.init_args.seed=2",
                      f"--trainer.default_root_dir={tmp_path / 'a'}_seed2",
                      f"--trainer.logger.init_args.save_dir={tmp_path / 'a'}_seed2", "--trainer.max_steps=5"]]
    with pytest.raises(ValueError, match="not trained"):
        harness.training_seed(Model("Base", ("a.yaml",)), 1)


def test_a_training_seed_reaches_the_resolved_config_and_the_evaluation_key():
    from t2i_align.studies.compare_methods import METHODS

    model = METHODS["Finetune"]
    seeded = harness.training_seed(model, 1)
    config = harness.resolved_config(seeded.args())
    assert config["model"]["init_args"]["seed"] == 1 and config["data"]["init_args"]["seed"] == 1
    assert config["trainer"]["default_root_dir"] == f"{model.run_dir}_seed1"
    assert harness.resolved_config(model.args())["model"]["init_args"]["seed"] == 0
    assert harness.evaluation_key(seeded.args(), None) != harness.evaluation_key(model.args(), None)


def test_the_key_of_a_stack_with_a_function_default_is_the_same_in_every_process():
    """CoMat's ``discriminator_optimizer`` defaults to a function, which ``str`` wrote with its memory address: every
    study run got another key for the same evaluation and re-ran it (found when an ablation re-scored all its arms)."""
    from t2i_align.studies.comat_ablation import ARMS

    args = [*ARMS["CA+FP"].args(), "--config", harness.EVAL_CONFIG]
    key = harness.key_digest(harness.evaluation_key(args, None))
    assert " at 0x" not in json.dumps(harness.evaluation_key(args, None))
    code = ("import sys; from t2i_align.studies import harness; "
            "print(harness.key_digest(harness.evaluation_key(sys.argv[1:], None)))")
    other = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                           cwd=REPO_ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert other.stdout.split()[-1] == key
