"""Every YAML under configs/ parses and type-checks with the CLI; the tiny stack builds; --print_config
works."""

import re
from pathlib import Path

import pytest
import torch
import yaml

from t2i_align.cli import T2ICLI
from t2i_align.cli import main as cli_main
from tests.helpers import REPO_ROOT

CONFIGS = Path(REPO_ROOT) / "configs"
BASE = ["trainer/cpu.yaml", "method/finetune.yaml", "model/tiny.yaml", "data/tiny_pairs.yaml"]
# Fragments documented as stacking after another one of their group (see their header comments).
STACK_AFTER = {"trainer/ddp.yaml": ["trainer/gpu.yaml"], "trainer/multinode.yaml": ["trainer/gpu.yaml"]}
FRAGMENTS = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


class ParseOnlyCLI(T2ICLI):
    """Parses and validates (jsonargparse checks every class_path and init_args type while parsing) but
    builds nothing: no weights are loaded and no data is read."""

    def instantiate_classes(self) -> None:
        pass


def config_args(*names: str) -> list[str]:
    return [arg for name in names for arg in ("--config", str(CONFIGS / name))]


def parse_only(args: list[str]) -> dict:
    return ParseOnlyCLI(args=args, run=False).config.as_dict()


def header_stack(fragment: str) -> list[str]:
    """The ``--config`` files of the first command in the fragment's header comment without a placeholder
    (relative to configs/)."""
    header = []
    for line in (CONFIGS / fragment).read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# "))
    for command in " ".join(header).split("t2i-align ")[1:]:
        stack = re.findall(r"--config configs/(\S+\.yaml)", command)
        if stack and not any("<" in name for name in stack):
            return stack
    return []


def stack_for(fragment: str) -> list[str]:
    """An experiment is parsed on the stack its header gives (alone when it gives none); any other fragment goes
    on top of the base stack, overriding it."""
    if fragment.startswith("experiment/"):
        stack = header_stack(fragment)
        assert not stack or fragment in stack, f"{fragment}: its header's --config stack does not include it"
        return stack or [fragment]
    return [*BASE, *STACK_AFTER.get(fragment, []), fragment]


def assert_sets(parsed, fragment, key: str = "") -> None:
    """Every value the fragment sets is the parsed value (lists and dicts compared entry by entry)."""
    if isinstance(fragment, dict):
        for name, value in fragment.items():
            assert isinstance(parsed, dict) and name in parsed, f"{key}.{name} missing"
            assert_sets(parsed[name], value, f"{key}.{name}")
    elif isinstance(fragment, list):
        assert isinstance(parsed, list) and len(parsed) == len(fragment), key
        for i, (p, f) in enumerate(zip(parsed, fragment)):
            assert_sets(p, f, f"{key}[{i}]")
    else:
        assert parsed == fragment, f"{key}: {parsed!r} != {fragment!r}"


def test_every_config_is_covered():
    assert set(BASE) <= set(FRAGMENTS) and "experiment/tiny_demo.yaml" in FRAGMENTS
    assert set(FRAGMENTS) > set(BASE)


def test_toyworld_overlays_state_their_stack_and_stay_short():
    overlays = [f for f in FRAGMENTS if f.startswith("experiment/toyworld_")]
    assert len(overlays) >= 3
    for overlay in overlays:
        stack = header_stack(overlay)
        # a method's overlay, or a variant of one stacked after it (e.g. toyworld_arl_oracle.yaml after toyworld_arl.yaml)
        assert stack[0].startswith("method/") and stack[1] == "experiment/toyworld.yaml" and stack[-1] == overlay, stack
        assert len(stack) <= 5 and all(s.startswith("experiment/toyworld_") for s in stack[2:]), (overlay, stack)
        assert len((CONFIGS / overlay).read_text().splitlines()) <= 50, overlay
    assert header_stack("experiment/toyworld.yaml") == ["method/finetune.yaml", "experiment/toyworld.yaml"]


@pytest.mark.parametrize("fragment", FRAGMENTS)
def test_config_parses_on_its_stack(fragment):
    parsed = parse_only(config_args(*stack_for(fragment)))
    assert_sets(parsed, yaml.safe_load((CONFIGS / fragment).read_text()))
    assert parsed["model"]["class_path"] and parsed["data"]["class_path"]


@pytest.mark.parametrize(
    ("key", "parses"), [("seed", True), ("seeed", False), ("generator.lora.rnak", False)]
)
def test_misspelt_model_key_fails_to_parse(tmp_path, capsys, key, parses):
    init_args: dict = {}
    node = init_args
    *parents, leaf = key.split(".")
    for name in parents:
        node = node.setdefault(name, {})
    node[leaf] = 3
    typo = tmp_path / "override.yaml"
    typo.write_text(yaml.safe_dump({"model": {"init_args": init_args}}))
    args = config_args(*BASE) + ["--config", str(typo)]
    if parses:
        assert parse_only(args)["model"]["init_args"]["seed"] == 3
    else:
        with pytest.raises(SystemExit):
            parse_only(args)
        assert leaf in capsys.readouterr().err


def test_tiny_stack_builds_model_and_datamodule(tiny_sd, tiny_pairs, tmp_path, monkeypatch):
    from t2i_align.callbacks import ExportWeights, StepCheckpoint
    from t2i_align.datamodules import T2IDataModule
    from t2i_align.lightning_modules import Finetune

    monkeypatch.chdir(tmp_path)
    cli = T2ICLI(
        args=config_args(*BASE)
        + [
            f"--model.init_args.generator.pretrained={tiny_sd}",
            f"--data.init_args.train_pairs.path={tiny_pairs}",
            f"--data.init_args.val_pairs.path={tiny_pairs}",
        ],
        run=False,
    )
    # model: the method's class and optimizer, the model fragment's LoRA
    assert type(cli.model) is Finetune
    trainable = [n for n, p in cli.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = cli.model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["lr"] == 1e-4
    # data: the data fragment's batch size and resolution, read from the synthetic pairs
    assert type(cli.datamodule) is T2IDataModule
    cli.datamodule.setup("fit")
    batch, _, _ = next(iter(cli.datamodule.train_dataloader()))
    assert batch["pairs"]["pixel_values"].shape == (4, 3, 32, 32)
    # trainer: the trainer fragment
    assert cli.trainer.max_steps == 20
    assert {type(c) for c in cli.trainer.callbacks} >= {StepCheckpoint, ExportWeights}


def test_print_config_prints_the_complete_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def print_config(config: Path) -> str:
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["fit", "--config", str(config), "--print_config"])
        assert exit_info.value.code in (None, 0)
        return capsys.readouterr().out

    printed = print_config(CONFIGS / "experiment/tiny_demo.yaml")
    assert "class_path: t2i_align.lightning_modules.Finetune" in printed
    config = yaml.safe_load(printed)
    assert {"seed_everything", "trainer", "model", "data", "ckpt_path"} <= set(config)
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 1e-3  # from the experiment
    assert config["model"]["init_args"]["seed"] == 0  # a default the experiment does not set
    assert config["trainer"]["logger"]["init_args"]["name"] == "logs"
    # complete: the printed config alone reproduces itself
    (tmp_path / "printed.yaml").write_text(printed)
    assert print_config(tmp_path / "printed.yaml") == printed


def test_every_config_checkpoint_keeps_the_final_step():
    """Lightning's ModelCheckpoint loses the steps after the last multiple of every_n_train_steps: configs use
    StepCheckpoint with save_last, so `--ckpt_path last` resumes the final state."""
    found = 0
    for path in sorted(CONFIGS.rglob("*.yaml")):
        for cb in ((yaml.safe_load(path.read_text()) or {}).get("trainer") or {}).get("callbacks") or []:
            if "Checkpoint" in cb.get("class_path", ""):
                found += 1
                assert cb["class_path"] == "t2i_align.callbacks.StepCheckpoint", path
                assert cb.get("init_args", {}).get("save_last") is True, path
    assert found >= 3


def _class_paths(node) -> set[str]:
    if isinstance(node, dict):
        found = {node["class_path"]} if isinstance(node.get("class_path"), str) else set()
        return found.union(*(_class_paths(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_class_paths(v) for v in node))
    return set()


def test_every_parameter_of_our_configured_classes_is_described():
    """`--help` and `--print_config` take parameter descriptions from the docstrings (jsonargparse +
    docstring_parser, base classes included): a parameter under a header the parser does not read has none."""
    import importlib
    import inspect

    from jsonargparse._optionals import parse_docs

    paths = set().union(*(_class_paths(yaml.safe_load(p.read_text())) for p in CONFIGS.rglob("*.yaml")))
    ours = sorted(p for p in paths if p.startswith("t2i_align."))
    assert len(ours) >= 10
    undocumented = []
    for path in ours:
        module, name = path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        docs = parse_docs(cls.__init__, cls, None)
        for base in cls.__mro__:  # parameters passed on through *args/**kwargs to our base classes too
            if not base.__module__.startswith("t2i_align") or "__init__" not in vars(base):
                continue
            for param in inspect.signature(base.__init__).parameters.values():
                if param.name != "self" and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                    if param.name not in docs:
                        undocumented.append(f"{path}: {param.name}")
    assert not undocumented, undocumented


@pytest.mark.parametrize("fragment", [f for f in FRAGMENTS if f.startswith("experiment/") and "toyworld" not in f])
def test_full_finetuning_on_gpu_bounds_its_disk(fragment):
    """A whole-UNet run keeps a bounded number of ~10 GB checkpoints and ~3.4 GB exports (SD1.5, fp32 weights and
    AdamW moments), not one every 250 steps for the whole run (~1 TB over TokenCompose's 24,000 steps)."""
    parsed = parse_only(config_args(*stack_for(fragment)))
    if parsed["model"]["init_args"]["generator"].get("lora") is not None or parsed["trainer"].get("accelerator") != "gpu":
        pytest.skip("a LoRA run, or not a GPU stack")
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c.get("init_args", {}) for c in parsed["trainer"]["callbacks"]}
    steps = parsed["trainer"]["max_steps"]
    checkpoint = callbacks["StepCheckpoint"]
    kept = checkpoint["save_top_k"] + bool(checkpoint.get("save_last"))
    assert checkpoint["save_top_k"] >= 0 and checkpoint.get("monitor") == "step", checkpoint  # the newest, not all
    every = callbacks.get("ExportWeights", {}).get("every_n_train_steps")
    exports = (steps // every if every else 0) + 1
    assert kept * 10 + exports * 3.4 <= 100, (fragment, kept, exports)  # GB
