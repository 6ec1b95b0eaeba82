"""What a user sees when the input is wrong: one line `t2i-align: error: ...` that names the key or file and what was
expected, no traceback; bugs keep their traceback. Also the bounds that used to be silent: a limit that drops
prompts, a fit that never ends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from t2i_align.cli import main, short_parse_error
from t2i_align.common import ConfigError, UserError
from t2i_align.datamodules.pairs import PairSource
from t2i_align.datamodules.prompts import PromptSource
from t2i_align.diffusion.loading import ModelLoadError
from t2i_align.experts.captioner import BlipLikelihood
from t2i_align.experts.clip import CLIPImageFeatures
from t2i_align.io import WriteError, atomic_path
from tests.helpers import REPO_ROOT, tiny_fit_args

CONFIGS = Path(REPO_ROOT) / "configs"


def run_command(monkeypatch, capsys, args: list[str]) -> tuple[int | str | None, str]:
    """``t2i-align ARGS`` as from the shell (sys.argv, not main(args)): its exit code/message and stderr."""
    monkeypatch.setattr(sys, "argv", ["t2i-align", *args])
    monkeypatch.delenv("T2I_ALIGN_DEBUG", raising=False)
    with pytest.raises(SystemExit) as stopped:
        main()
    return stopped.value.code, capsys.readouterr().err


def one_line(code, err: str) -> str:
    """The single error line: either sys.exit's message or the parser's line on stderr."""
    text = code if isinstance(code, str) else err.strip().splitlines()[-1]
    assert "Traceback" not in err and text.startswith("t2i-align: error: ") and "\n" not in text
    return text


@pytest.fixture
def fit(tiny_sd, tiny_pairs, tmp_path):
    return lambda *extra: [*tiny_fit_args(tiny_sd, tiny_pairs, tmp_path, 1), "--trainer.logger=false", *extra]


@pytest.mark.parametrize(("extra", "expected"), [
    (["--model.init_args.optimizer.init_args.lr=fast"], "model.optimizer.lr: expected float, got 'fast'"),
    (["--model.init_args.generator.lora.rnk=3"], "model.generator.lora: Option 'rnk' is not accepted"),
    (["--trainer.max_stepz=3"], "unrecognized arguments: --trainer.max_stepz=3"),
])
def test_parse_errors_are_one_line_naming_the_key(fit, monkeypatch, capsys, extra, expected):
    code, err = run_command(monkeypatch, capsys, fit(*extra))
    assert code == 2
    assert expected in one_line(code, err)


def test_a_yaml_error_names_the_file_and_line(fit, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: 3\n  callbacks: [1\n")
    code, err = run_command(monkeypatch, capsys, fit("--config", str(bad)))
    assert one_line(code, err).startswith(f"t2i-align: error: {bad}:4:1: not valid YAML")
    code, err = run_command(monkeypatch, capsys, fit("--config", str(tmp_path / "nothing.yaml")))
    assert one_line(code, err) == f"t2i-align: error: config file {tmp_path / 'nothing.yaml'}: no such file"


@pytest.mark.parametrize(("extra", "expected"), [
    (["--model.init_args.generator.pretrained=/no/such/model"], "Stable Diffusion pipeline '/no/such/model': no such folder"),
    (["--model.init_args.generator.pretrained=some-org/some-model"], "is neither a local folder nor in the Hugging Face cache"),
    (["--data.init_args.train_pairs.limit=-1"], "limit must be a whole number >= 1"),
    (["--data.init_args.train_pairs.limit=0"], "limit must be a whole number >= 1"),
    (["--trainer.max_steps=-1", "--trainer.max_epochs=1"], "trainer.max_steps is not set"),
    (["--data.init_args.batch_size=0"], "batch sizes must be >= 1, got batch_size=0"),  # a constructor's ValueError
    (["--data.init_args.num_workers=-1"], "num_workers must be >= 0"),
    (["--data.init_args.resolution=33"], "resolution=33 is not a multiple of the VAE's downsampling factor"),
])
def test_errors_while_building_the_run_are_one_line(fit, monkeypatch, capsys, extra, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run_command(monkeypatch, capsys, fit(*extra))
    assert expected in one_line(code, err)


def test_bugs_keep_their_traceback_and_python_callers_get_the_exception(fit, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Exception) as raised:  # from Python: the exception itself, whatever wraps it
        main(fit("--trainer.max_steps=-1", "--trainer.max_epochs=1"))
    assert isinstance(raised.value, ConfigError)
    monkeypatch.setattr(sys, "argv", ["t2i-align", *fit()])
    monkeypatch.setattr("t2i_align.cli.T2ICLI", lambda **kwargs: 1 / 0)  # a bug, not the user's input
    with pytest.raises(ZeroDivisionError):
        main()


@pytest.mark.parametrize("limit", [-1, 0, 1.5, True])
def test_a_limit_that_would_drop_prompts_is_refused_where_it_is_configured(limit):
    with pytest.raises(ConfigError, match=r"prompts\.txt: limit must be a whole number >= 1"):
        PromptSource("prompts.txt", limit=limit)
    with pytest.raises(ConfigError, match=r"pairs\.jsonl: limit must be a whole number >= 1"):
        PairSource("pairs.jsonl", limit=limit)
    assert isinstance(ConfigError("x"), (UserError, ValueError))


def test_short_parse_error_keeps_the_innermost_complaint():
    message = ('Parser key "model":\n  Does not validate against any of the Union subtypes\n  Errors:\n'
               '    - Problem with given class_path \'x.Finetune\':\n        Parser key "seed":\n'
               "          Expected a <class 'int'>\n          Given value: abc\n    - Expected a <class 'NoneType'>\n")
    assert short_parse_error(message) == "model.seed: expected int, got 'abc'"


def test_two_runs_without_a_logger_never_share_a_folder(fit, tmp_path):
    main(fit())
    config, export = tmp_path / "config.yaml", tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    before = (config.read_bytes(), export.read_bytes())
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'config.yaml'} belongs to another run \(model\.init_args\."
                                          r"optimizer\.init_args\.lr differ\).*own trainer\.default_root_dir"):
        main(fit("--model.init_args.optimizer.init_args.lr=0.5"))
    assert (config.read_bytes(), export.read_bytes()) == before  # the first run's record and export are intact
    main(fit("--trainer.max_steps=2", "--ckpt_path=last"))  # its own resume still writes there


def test_a_method_stacked_with_another_methods_overlay_is_refused(tiny_sd, tiny_pairs, tmp_path, monkeypatch, capsys):
    args = [*tiny_fit_args(tiny_sd, tiny_pairs, tmp_path, 1), "--trainer.logger=false"]
    args[args.index(str(CONFIGS / "method/finetune.yaml"))] = str(CONFIGS / "method/refl.yaml")
    overlay = str(CONFIGS / "experiment/toyworld_comat.yaml")
    code, err = run_command(monkeypatch, capsys, [*args, "--config", overlay])
    assert one_line(code, err) == (
        f"t2i-align: error: {overlay} is an overlay for CoMat, but the stacked configs train ReFL "
        f"({CONFIGS / 'method/refl.yaml'}); stack it with configs/method/ of its own method")
    code, err = run_command(monkeypatch, capsys, [*args[:1], "--config", overlay, *args[1:]])  # in either order
    assert "is an overlay for CoMat, but the stacked configs train ReFL" in one_line(code, err)
    assert not list(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), RuntimeError(
    "[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: basic_ios::clear: iostream error")])
def test_a_full_disk_is_named_with_the_target_not_a_stream_error(tmp_path, failure):
    target = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(WriteError, match=rf"cannot write {target}: no space left on the device of {target.parent} "
                                         r"\(\d+ MiB free\)"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise failure
    assert list(target.parent.iterdir()) == []  # nothing half-written left behind


def test_an_unwritable_output_names_the_target_not_its_temporary(tmp_path, monkeypatch):
    blocker = tmp_path / "export"
    blocker.write_text("a file where the export folder should be")
    with pytest.raises(WriteError, match=rf"cannot write {blocker / 'lora.safetensors'}: ") as raised:
        with atomic_path(blocker / "lora.safetensors"):
            pass
    assert ".tmp" not in str(raised.value)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".x.host.1.abc.tmp"))

    monkeypatch.setattr("tempfile.mkdtemp", read_only)  # root ignores chmod: simulate a read-only folder
    with pytest.raises(WriteError, match=rf"cannot write {tmp_path / 'out.json'}: {tmp_path} is not writable"):
        with atomic_path(tmp_path / "out.json"):
            pass


@pytest.mark.parametrize(("build", "what"), [
    (lambda path: CLIPImageFeatures(path), "CLIP model"),
    (lambda path: BlipLikelihood(path), "captioner"),
])
def test_experts_say_a_mistyped_folder_is_missing_before_any_loader_runs(tmp_path, build, what):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as raised:
        build(str(missing))
    assert str(raised.value) == f"{what} '{missing}': no such folder"


@pytest.mark.ddp
def test_under_ddp_the_failing_ranks_error_is_the_last_line(fit, tmp_path):
    failing = "{class_path: tests.helpers.FailOnRank, init_args: {rank: 1, step: 1}}"
    args = fit("--trainer.max_steps=4", "--trainer.strategy=ddp", "--trainer.devices=2", f"--trainer.callbacks+={failing}")
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("T2I_ALIGN_ERROR_DIR", None)
    done = subprocess.run([sys.executable, "-m", "t2i_align.cli", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == "t2i-align: error: rank 1 failed: pairs.jsonl:3: image 'cat.png' cannot be read", done.stderr[-3000:]
    assert lines[-2].startswith("t2i-align: rank 0 stopped too (")  # its own failure in one line, no traceback
    assert "Traceback" not in done.stderr
