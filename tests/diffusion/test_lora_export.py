"""The exported weights load into a plain diffusers pipeline and reproduce our sampler's images, for every LoRA
target set the configs train and for the whole UNet."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from t2i_align.diffusion.generator import Generator, GeneratorConfig, LoraSettings
from t2i_align.diffusion.lora import LORA_WEIGHT_NAME, export_lora, export_trained_weights, load_lora
from t2i_align.diffusion.sampling import SamplingSettings

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PROMPTS, SEEDS = ["a red circle", "two blue squares"], [5, 6]
SAMPLING = {"num_inference_steps": 5, "guidance_scale": 7.5}
# Both sides run the same float32 CPU ops on the same noise; only the order of some sums may differ. 1e-4 on pixels
# in [0, 1] is 40 times below one 8-bit level (the saved images are the same), and each test checks that the base
# model misses the module's images by far more, so a lost adapter cannot pass.
ATOL = 1e-4


def config_target_sets() -> list[list[str]]:
    """The generator LoRA target sets in configs/ (the LoRA that is exported), and the Generator's default."""
    sets = {tuple(LoraSettings().target_modules)}
    for path in sorted(CONFIGS.rglob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        generator = (config or {}).get("model", {}).get("init_args", {}).get("generator") or {}
        if isinstance(generator.get("lora"), dict) and "target_modules" in generator["lora"]:
            sets.add(tuple(generator["lora"]["target_modules"]))
    return [list(s) for s in sorted(sets, key=len)]


def randomise(params, scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def lora_generator(tiny_sd: str, targets: list[str]) -> Generator:
    gen = Generator(GeneratorConfig(pretrained=tiny_sd, lora=LoraSettings(rank=4, alpha=8, target_modules=targets)))
    randomise(gen.trainable_parameters(), 0.2)  # B = 0 at init: give every adapter weights, as training would
    return gen


def own_images(gen: Generator) -> torch.Tensor:
    with torch.no_grad():
        return gen.sample(PROMPTS, SEEDS, SamplingSettings(scheduler="ddim", **SAMPLING)).images


def pipeline_images(pipe: StableDiffusionPipeline) -> torch.Tensor:
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    with torch.no_grad():
        return pipe(PROMPTS, generator=gens, output_type="pt", **SAMPLING).images


def plain_pipeline(tiny_sd: str, **components) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False,
                                                   **components)


def adapted_modules(unet) -> set[str]:
    return {name for name, module in unet.named_modules() if getattr(module, "lora_A", None)}


def test_the_configs_train_the_comat_target_set():
    # the parametrisation below reads configs/: it must see more than the default attention-only set
    assert ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
            "conv2"] in config_target_sets()


@pytest.mark.parametrize("targets", config_target_sets(), ids=",".join)
def test_lora_export_loads_completely_and_reproduces_the_images(tiny_sd, tmp_path, targets):
    gen = lora_generator(tiny_sd, targets)
    path = export_trained_weights(gen, tmp_path / "lora")
    assert path == tmp_path / "lora" / LORA_WEIGHT_NAME and path.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["lora"]  # no temporary left behind

    ours = own_images(gen)
    pipe = plain_pipeline(tiny_sd)
    base = pipeline_images(pipe)
    pipe.load_lora_weights(str(path.parent), weight_name=LORA_WEIGHT_NAME)  # diffusers 0.34 offline needs the name
    theirs = pipeline_images(pipe)

    expected = adapted_modules(gen.unet)
    assert all(any(name.endswith(f".{t}") for name in expected) for t in targets)  # each target adapts something
    missing = sorted(expected - adapted_modules(pipe.unet))
    assert not missing, f"{len(missing)} of {len(expected)} adapted modules loaded without their LoRA: {missing[:3]}"
    assert (base - ours).abs().max() > 100 * ATOL  # the LoRA matters far beyond the tolerance
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())
    other = [k for k in keys if not (k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k))]
    assert keys and not other, f"keys not in peft's unet.<module>.lora_A/lora_B form: {other[:2]}"  # one format
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8  # diffusers flattens "unet." + key


def test_full_unet_export_reproduces_the_images(tiny_sd, tmp_path):
    gen = Generator(GeneratorConfig(pretrained=tiny_sd, lora=None))
    randomise(gen.trainable_parameters(), 0.02)
    path = export_trained_weights(gen, tmp_path / "out")
    assert path == tmp_path / "out" / "unet" and [p.name for p in tmp_path.iterdir()] == ["out"]

    ours = own_images(gen)
    base = pipeline_images(plain_pipeline(tiny_sd))
    theirs = pipeline_images(plain_pipeline(tiny_sd, unet=UNet2DConditionModel.from_pretrained(path)))
    assert (base - ours).abs().max() > 100 * ATOL
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


def write_mixed_export(gen: Generator, folder: Path) -> None:
    """What export_lora wrote before issue 24: attention keys in diffusers' lora.down/lora.up form, the rest peft."""
    metadata = gen.lora_config().to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(gen.unet))
    StableDiffusionLoraLoaderMixin.save_lora_weights(folder, unet_lora_layers=layers, weight_name=LORA_WEIGHT_NAME,
                                                     unet_lora_adapter_metadata=metadata)


@pytest.mark.parametrize("written_by", ["export_lora", "the export before issue 24"])
def test_load_lora_loads_every_adapter_of_an_export(tiny_sd, tmp_path, written_by):
    gen = lora_generator(tiny_sd, config_target_sets()[-1])  # the widest set: attention and beyond
    if written_by == "export_lora":
        export_lora(gen, tmp_path)
    else:
        write_mixed_export(gen, tmp_path)
        assert any(".lora.down." in k for k in load_file(tmp_path / LORA_WEIGHT_NAME))  # really the mixed format
    plain = Generator(GeneratorConfig(pretrained=tiny_sd, lora=None))
    load_lora(plain.unet, tmp_path)
    assert adapted_modules(plain.unet) == adapted_modules(gen.unet)
    torch.testing.assert_close(own_images(plain), own_images(gen), atol=ATOL, rtol=0)


def test_load_lora_refuses_what_it_cannot_load_completely(tiny_sd, tmp_path):
    gen = lora_generator(tiny_sd, ["to_q", "conv1"])
    export_lora(gen, tmp_path / "lora")
    with pytest.raises(ValueError, match=r"the UNet already has LoRA adapter\(s\) \['default'\]"):
        load_lora(gen.unet, tmp_path / "lora")
    with pytest.raises(FileNotFoundError, match="no LoRA export at"):
        load_lora(Generator(GeneratorConfig(pretrained=tiny_sd, lora=None)).unet, tmp_path)

    layers = load_file(tmp_path / "lora" / LORA_WEIGHT_NAME)
    (tmp_path / "text").mkdir()
    text_only = {k.replace("unet.", "text_encoder.", 1): v for k, v in layers.items()}
    save_file(text_only, tmp_path / "text" / LORA_WEIGHT_NAME)
    with pytest.raises(ValueError, match="holds no UNet LoRA weights"):
        load_lora(Generator(GeneratorConfig(pretrained=tiny_sd, lora=None)).unet, tmp_path / "text")

    # a module the UNet does not have: diffusers only warns, the load must not pass as complete
    key = next(k for k in layers if ".lora_A." in k)
    layers[key.replace("down_blocks.0.", "down_blocks.9.", 1)] = layers[key].clone()
    (tmp_path / "extra").mkdir()
    save_file(layers, tmp_path / "extra" / LORA_WEIGHT_NAME)
    with pytest.raises(ValueError, match="1 of .* LoRA weights did not load, e.g. unet.down_blocks.9."):
        load_lora(Generator(GeneratorConfig(pretrained=tiny_sd, lora=None)).unet, tmp_path / "extra")


def test_export_refuses_full_finetuning(tiny_sd, tmp_path):
    gen = Generator(GeneratorConfig(pretrained=tiny_sd, lora=None))
    with pytest.raises(ValueError, match="LoRA"):
        export_lora(gen, tmp_path / "x")
    assert not (tmp_path / "x").exists()
