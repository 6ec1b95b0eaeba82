"""W&B sweep files: every trial command that `wandb agent` would run parses with the CLI and sets the
swept values."""

import math
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO_ROOT
from tests.test_configs import ParseOnlyCLI

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

SWEEPS = sorted((Path(REPO_ROOT) / "experiments" / "sweeps").glob("*.yaml"))
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]


def expand_args(params: dict) -> list[str]:
    """W&B's `${args}`: one `--name=value` per parameter, the value written with str()
    (wandb 0.31: wandb/sdk/launch/sweeps/utils.py, create_sweep_command_args)."""
    return [f"--{name}={value}" for name, value in params.items()]


def expand_command(sweep: dict, params: dict) -> list[str]:
    """The command the agent runs for one trial (wandb 0.31: wandb/wandb_agent.py, Agent._command_run):
    an item `${name}` is replaced by that macro's list of items (none if unknown), others are kept."""
    macros = {
        "env": ["/usr/bin/env"],
        "interpreter": ["python"],
        "program": [sweep.get("program", "")],
        "args": expand_args(params),
    }
    command = []
    for item in map(str, sweep.get("command", DEFAULT_COMMAND)):
        if item.startswith("${") and item.endswith("}"):
            command += macros.get(item[2:-1], [])
        else:
            command.append(item)
    return command


def candidates(spec: dict) -> list:
    """Concrete values of one sweep parameter: each of its `values`, its `value`, or the ends of its range."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    low, high = spec["min"], spec["max"]
    # PyYAML reads 1e-5 (no dot) as a string: range bounds must come out as numbers
    assert all(isinstance(v, (int, float)) for v in (low, high)), spec
    if spec.get("distribution") in ("log_uniform", "q_log_uniform"):  # bounds given as natural logs
        return [math.exp(low), math.exp(high)]
    return [low, high]


def trials(parameters: dict) -> list[dict]:
    """Few trials in which every candidate of every parameter appears at least once."""
    options = {name: candidates(spec) for name, spec in parameters.items()}
    count = max(len(values) for values in options.values())
    return [{name: values[i % len(values)] for name, values in options.items()} for i in range(count)]


def test_expansion_matches_wandb():
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    params = {"model.init_args.optimizer.init_args.lr": 1e-05, "data.init_args.batch_size": 8, "a.b": False}
    wandb_args = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args"]
    assert expand_args(params) == wandb_args == [
        "--model.init_args.optimizer.init_args.lr=1e-05", "--data.init_args.batch_size=8", "--a.b=False"
    ]
    command = ["${env}", "${interpreter}", "-m", "pkg", "${args}", "${unknown}"]
    assert expand_command({"program": "t.py", "command": command}, {"a.b": 1}) == [
        "/usr/bin/env", "python", "-m", "pkg", "--a.b=1"
    ]
    assert expand_command({"program": "t.py"}, {"a": 2}) == ["/usr/bin/env", "python", "t.py", "--a=2"]


def test_trials_cover_every_candidate():
    parameters = {"a": {"values": [1, 2, 3]}, "b": {"min": 0.5, "max": 2.0}, "c": {"value": "x"}}
    assert trials(parameters) == [
        {"a": 1, "b": 0.5, "c": "x"}, {"a": 2, "b": 2.0, "c": "x"}, {"a": 3, "b": 0.5, "c": "x"}
    ]
    with pytest.raises(AssertionError):
        candidates({"min": "1e-5", "max": 1.0e-3})


def test_sweep_files_exist():
    assert {p.name for p in SWEEPS} >= {"tiny_lr.yaml", "sd15_lora.yaml"}


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=lambda p: p.name)
def test_every_trial_parses_with_the_swept_values(sweep_file, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # agents run from the repository root: the configs/ paths are relative
    sweep = yaml.safe_load(sweep_file.read_text())
    assert sweep["method"] in ("grid", "random", "bayes")
    assert sweep["metric"] == {"name": "val/denoise_loss", "goal": "minimize"}
    for params in trials(sweep["parameters"]):
        command = expand_command(sweep, params)
        assert command[:5] == ["/usr/bin/env", "python", "-m", "t2i_align.cli", "fit"]
        config = ParseOnlyCLI(args=command[5:], run=False).config
        for key, value in params.items():
            assert config[key] == value, key
        # the trial must log to W&B, in the sweep's project, for the sweep to see its metric
        assert config["trainer.logger.class_path"] == "lightning.pytorch.loggers.WandbLogger"
        assert config["trainer.logger.init_args.project"] == sweep["project"]


def test_tiny_sweep_trials_differ_in_the_swept_keys(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    sweep = yaml.safe_load((Path(REPO_ROOT) / "experiments/sweeps/tiny_lr.yaml").read_text())
    commands = [expand_command(sweep, params) for params in trials(sweep["parameters"])]
    parsed = [ParseOnlyCLI(args=command[5:], run=False).config for command in commands]
    assert [c["model.init_args.optimizer.init_args.lr"] for c in parsed] == [1e-4, 3e-4, 1e-3]
    assert [c["model.init_args.generator.lora.rank"] for c in parsed] == [2, 4, 8]
    # the rest comes from the demo
    assert {c["model.init_args.generator.pretrained"] for c in parsed} == {".cache/tiny/sd"}
