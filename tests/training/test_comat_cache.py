"""CoMat's cache of real latents on tiny models: the cache command (through the training config stack) writes what
``CoMat.real_latents`` computes on the fly; it resumes (finished files are skipped), splits over ranks, refuses a
recipe that differs; training refuses a missing or unreadable entry and, with the cache, fine-tunes the whole UNet
with fidelity preservation."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from t2i_align.commands.comat_cache import main
from t2i_align.diffusion.generator import GeneratorConfig, LoraSettings
from t2i_align.diffusion.sampling import SamplingSettings
from t2i_align.experts.captioner import BlipLikelihood
from t2i_align.lightning_modules.comat import CoMat
from t2i_align.lightning_modules.comat.real_latents import (
    RECIPE_FILE,
    RealLatentsCacheError,
    cache_entry_name,
)
from tests.helpers import REPO_ROOT, save_tiny_captioner, trainable_digest

CONFIGS = Path(REPO_ROOT) / "configs"
# Two prompt files numbered from 0 each: ids collide across files, as with the paper's prompt sets.
FILES = {"a.txt": ["a red circle", "a blue square and a green star"],
         "b.txt": ["a yellow triangle", "a green circle"]}
STEPS = dict(num_grad_steps=2, grad_stride=2)
SAMPLING = SamplingSettings(4, guidance_scale=7.5, scheduler="ddpm")  # configs/method/comat.yaml's sampler, 4 steps
# The same latents computed in other batches: float32 rounding differs with the batch (CFG 7.5 amplifies it).
OTHER_BATCHES = dict(atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_sd) -> dict:
    root = tmp_path_factory.mktemp("comat_cache")
    captioner_dir = save_tiny_captioner(root / "captioner")
    files = []
    for name, lines in FILES.items():
        (root / name).write_text("\n".join(lines) + "\n")
        files.append(str(root / name))
    prompts = [(str(i), text) for lines in FILES.values() for i, text in enumerate(lines)]
    args = ["--config", str(CONFIGS / "method/comat.yaml"), "--config", str(CONFIGS / "model/tiny.yaml"),
            f"--model.init_args.generator.pretrained={tiny_sd}",
            f"--model.init_args.captioner.init_args.pretrained={captioner_dir}",
            "--model.init_args.captioner.init_args.prefix=",
            *[f"--model.init_args.{k}={v}" for k, v in STEPS.items()], "--model.init_args.sampling.num_inference_steps=4",
            "--data=t2i_align.datamodules.T2IDataModule",
            "--data.init_args.train_prompts=[" + ", ".join(f"{{path: {f}}}" for f in files) + "]",
            "--data.init_args.batch_size=2", "--data.init_args.resolution=32"]
    return {"root": root, "captioner_dir": captioner_dir, "files": files, "prompts": prompts, "args": args}


@pytest.fixture(scope="module")
def captioner(setup) -> BlipLikelihood:
    return BlipLikelihood(setup["captioner_dir"], prefix="", max_shift=0)


@pytest.fixture(scope="module")
def cache(setup) -> Path:
    """The cache of every training prompt, filled by one run of the command (single process, one batch)."""
    folder = setup["root"] / "cache"
    result = main([str(folder), *setup["args"], "--batch-size", "4", "--device", "cpu"])
    names = [cache_entry_name(i, text) for i, text in setup["prompts"]]
    assert sorted(result["written"]) == sorted(names) and result["skipped"] == 0
    assert sorted(p.name for p in folder.iterdir()) == sorted([*names, RECIPE_FILE])  # no temporaries left
    return folder


def copy_of(cache: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(cache, tmp_path / "cache"))


def make(tiny_sd: str, captioner, **kwargs) -> CoMat:
    settings = dict(STEPS, sampling=SAMPLING, adversarial_weight=0.0)
    settings.update(kwargs)
    generator = settings.pop("generator", GeneratorConfig(tiny_sd, lora=LoraSettings(rank=4)))
    torch.manual_seed(0)
    return CoMat(generator=generator, captioner=captioner, **settings)


def batch_of(setup) -> tuple[list[str], list[str]]:
    ids, prompts = zip(*setup["prompts"])
    return list(prompts), list(ids)


def test_cached_latents_are_the_on_the_fly_real_latents(tiny_sd, captioner, setup, cache):
    prompts, ids = batch_of(setup)
    online = make(tiny_sd, captioner)
    seeds = online.prompt_seeds(ids, prompts)
    with torch.no_grad():  # an online model that differs from the base: the cache holds the base model's latents
        for name, p in online.generator_trainable().items():
            if "lora_B" in name:
                p.normal_(std=0.5)
        on_the_fly = online.real_latents(prompts, seeds)
        online_latents = online.generator.sample(prompts, seeds, decode=False, sampling=online.sampling).latents
    cached = make(tiny_sd, captioner, real_latents=str(cache)).real_latents(prompts, seeds, ids)
    assert cached.shape == on_the_fly.shape == (4, 4, 16, 16) and cached.dtype == torch.float32
    torch.testing.assert_close(cached, on_the_fly, atol=1e-5, rtol=0)
    assert (online_latents - cached).abs().max() > 1e-3
    # prompts with the same id in different files have their own entries (same noise, other text)
    assert (cached[0] - cached[2]).abs().max() > 1e-3
    entry = torch.load(cache / cache_entry_name(ids[1], prompts[1]), weights_only=True)
    assert entry["id"] == "1" and entry["prompt"] == prompts[1] and entry["latents"].device.type == "cpu"


def test_a_rerun_writes_only_the_missing_files(setup, cache, tmp_path):
    folder = copy_of(cache, tmp_path)
    prompts, ids = batch_of(setup)
    removed = folder / cache_entry_name(ids[2], prompts[2])
    before = torch.load(removed, weights_only=True)["latents"]
    removed.unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    result = main([str(folder), *setup["args"], "--device", "cpu"])
    assert result["written"] == [removed.name] and result["skipped"] == 3
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name != removed.name} == mtimes
    torch.testing.assert_close(torch.load(removed, weights_only=True)["latents"], before, **OTHER_BATCHES)
    again = main([str(folder), *setup["args"], "--device", "cpu"])
    assert again["written"] == [] and again["skipped"] == 4


def test_two_ranks_cover_every_prompt_exactly_once(setup, cache, tmp_path, monkeypatch):
    folder = tmp_path / "ranked"
    monkeypatch.setenv("WORLD_SIZE", "2")
    written = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        result = main([str(folder), *setup["args"], "--batch-size", "1", "--device", "cpu"])
        assert result["skipped"] == 0 and len(result["written"]) == 2
        written.append(set(result["written"]))
    assert not written[0] & written[1]
    assert written[0] | written[1] == {p.name for p in cache.glob("*.pt")}
    for name in written[0] | written[1]:  # the same latents as one process with other batches
        torch.testing.assert_close(torch.load(folder / name, weights_only=True)["latents"],
                                   torch.load(cache / name, weights_only=True)["latents"], **OTHER_BATCHES)


def test_a_recipe_that_differs_is_refused(tiny_sd, captioner, setup, cache, tmp_path):
    folder = copy_of(cache, tmp_path)
    files = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    with pytest.raises(RealLatentsCacheError, match=r"num_inference_steps: cache 4, this run 6"):
        main([str(folder), *setup["args"], "--model.init_args.sampling.num_inference_steps=6",
              "--device", "cpu"])
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == files  # nothing written
    prompts, ids = batch_of(setup)
    module = make(tiny_sd, captioner, real_latents=str(folder), sampling=SAMPLING.replace(num_inference_steps=6))
    with pytest.raises(RealLatentsCacheError, match=r"num_inference_steps") as info:
        module.real_latents(prompts, module.prompt_seeds(ids, prompts), ids)
    assert "guidance_scale" not in str(info.value)  # only the keys that differ
    with pytest.raises(RealLatentsCacheError, match=r"seed: cache 0, this run 5"):
        make(tiny_sd, captioner, real_latents=str(folder), seed=5).check_real_latents_cache()


def test_a_missing_or_unreadable_entry_is_refused(tiny_sd, captioner, setup, cache, tmp_path):
    folder = copy_of(cache, tmp_path)
    prompts, ids = batch_of(setup)
    module = make(tiny_sd, captioner, real_latents=str(folder))
    seeds = module.prompt_seeds(ids, prompts)
    (folder / cache_entry_name(ids[3], prompts[3])).unlink()
    with pytest.raises(RealLatentsCacheError, match=r"no entry for prompt id '1' \('a green circle'") as info:
        module.real_latents(prompts, seeds, ids)
    assert str(folder) in str(info.value) and "comat_cache" in str(info.value)
    broken = folder / cache_entry_name(ids[0], prompts[0])
    broken.write_bytes(broken.read_bytes()[:100])  # a truncated copy
    with pytest.raises(RealLatentsCacheError, match=rf"{broken}.*prompt id '0'.*cannot be read"):
        module.real_latents(prompts[:1], seeds[:1], ids[:1])
    shutil.copy(folder / cache_entry_name(ids[1], prompts[1]), broken)  # another prompt's entry under this name
    with pytest.raises(RealLatentsCacheError, match=r"holds prompt id '1'"):
        module.real_latents(prompts[:1], seeds[:1], ids[:1])
    with pytest.raises(RealLatentsCacheError, match=rf"{tmp_path / 'nothing'} is not a folder.*comat_cache"):
        make(tiny_sd, captioner, real_latents=str(tmp_path / "nothing")).check_real_latents_cache()


def test_full_fine_tuning_with_fidelity_preservation_trains_on_the_cache(tiny_sd, captioner, setup, cache, tmp_path,
                                                                       monkeypatch):
    from t2i_align.datamodules import T2IDataModule
    from t2i_align.datamodules.prompts import PromptSource

    full = GeneratorConfig(tiny_sd, lora=None)
    with pytest.raises(ValueError, match=r"needs cached real latents.*real_latents"):
        make(tiny_sd, captioner, generator=full, adversarial_weight=1.0, discriminator_lora=LoraSettings(rank=2))
    module = make(tiny_sd, captioner, generator=full, adversarial_weight=1.0, discriminator_lora=LoraSettings(rank=2),
                  real_latents=str(cache))

    def no_frozen_pass(*args, **kwargs):
        raise AssertionError("the real latents must come from the cache")

    fed, events, generated, asked = [], [], [], []
    original_forward, original_check = module.discriminator.forward, module.check_real_latents_cache
    original_generate, original_cached = module.generate, module.cached_real_latents

    def spy_forward(latents, condition):
        fed.append((latents.detach().clone(), latents.requires_grad))
        events.append("discriminator")
        return original_forward(latents, condition)

    def spy_check():
        events.append("recipe check")
        return original_check()

    def spy_generate(*args, **kwargs):
        out = original_generate(*args, **kwargs)
        generated.append(out.latents)
        return out

    def spy_cached(prompts, ids):
        events.append("cache read")
        asked.append([cache_entry_name(i, text) for i, text in zip(ids, prompts)])
        return original_cached(prompts, ids)

    monkeypatch.setattr(module, "frozen_latents", no_frozen_pass)
    monkeypatch.setattr(module, "check_real_latents_cache", spy_check)
    monkeypatch.setattr(module, "generate", spy_generate)
    monkeypatch.setattr(module, "cached_real_latents", spy_cached)
    monkeypatch.setattr(module.discriminator, "forward", spy_forward)
    digests = {"g": trainable_digest(module.generator), "d": trainable_digest(module.discriminator)}
    assert any("lora" not in name for name in module.generator_trainable())  # the whole UNet trains
    data = T2IDataModule(train_prompts=[PromptSource(f) for f in setup["files"]], batch_size=2, resolution=32)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 1
    # the recipe is checked when fit starts; then G's adversarial term (run again in G's backward: activation
    # checkpointing), the cache read, D on real and on fakes
    assert events == ["recipe check", "discriminator", "discriminator", "cache read", "discriminator", "discriminator"]
    (fake_for_g, g_grad), (recomputed, _), (real, real_grad), (fake_for_d, d_grad) = fed
    assert torch.equal(recomputed, fake_for_g)
    [latents] = generated
    # G's adversarial term reads the generator's own output with its graph; D's fake input is that same output,
    # detached (D's loss must not reach the generator); D's real input carries no graph either
    assert torch.equal(fake_for_g, latents.detach()) and g_grad
    assert torch.equal(fake_for_d, latents.detach()) and not d_grad and not real_grad
    # each real sample is its own prompt's cached latents, in batch order
    [names] = asked
    assert len(names) == len(real) == len(latents)
    for row, name in zip(real, names):
        assert torch.equal(row, torch.load(cache / name, weights_only=True)["latents"])
    assert trainable_digest(module.generator) != digests["g"]
    assert trainable_digest(module.discriminator) != digests["d"]
    assert {"train/adv_loss", "train/d_loss"} <= set(trainer.callback_metrics)
