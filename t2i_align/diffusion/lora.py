"""Export of the trained weights in diffusers formats: LoRA as ``pytorch_lora_weights.safetensors``
(read by ``pipeline.load_lora_weights``), a fully fine-tuned UNet as a ``unet/`` model folder; and the loader
of such a LoRA that checks every adapter arrived."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# The loader mixin, not StableDiffusionPipeline: importing the pipeline pulls transformers' image processors,
# which warn twice when torchvision is not installed.
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
from diffusers.utils import convert_unet_state_dict_to_peft
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from t2i_align.diffusion.generator import Generator
from t2i_align.io import atomic_path

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def export_lora(generator: Generator, out_dir: str | Path) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` (with rank/alpha metadata) atomically; other files
    in ``out_dir`` (earlier ``step_<N>`` exports) are kept.

    The keys are peft's own (``unet.<module>.lora_A.weight``), which diffusers' loader reads as they are. Not
    ``convert_state_dict_to_diffusers``: it rewrites only the attention projections to the older ``lora.down`` /
    ``lora.up`` form (PEFT_TO_DIFFUSERS in diffusers/utils/state_dict_utils.py), and ``load_lora_adapter``
    (diffusers/loaders/peft.py) picks the format of the whole file from its first key, so with adapters beyond
    attention the attention ones were silently dropped on loading (issue 24)."""
    if generator.config.lora is None:
        raise ValueError("export_lora needs a LoRA generator; this one fine-tunes the full UNet")
    layers = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(generator.unet).items()}
    # The adapter config travels as safetensors metadata, so loaders recover rank and alpha.
    metadata = generator.lora_config().to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    target = Path(out_dir) / LORA_WEIGHT_NAME
    with atomic_path(target) as tmp:
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            tmp.parent, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata, weight_name=tmp.name
        )
    return target


def export_trained_weights(generator: Generator, out_dir: str | Path) -> Path:
    """LoRA -> ``out_dir/pytorch_lora_weights.safetensors``; full fine-tuning -> ``out_dir/unet/`` (atomic)."""
    if generator.config.lora is not None:
        return export_lora(generator, out_dir)
    target = Path(out_dir) / "unet"
    with atomic_path(target, is_dir=True) as tmp:
        generator.unet.save_pretrained(tmp)
    return target


def load_lora(unet, folder: str | Path) -> None:
    """Load the LoRA export in ``folder`` into ``unet`` (which has no adapter yet) through diffusers' loader, and
    raise unless every weight of the file arrived. Exports written before issue 24 (attention keys in the older
    ``lora.down``/``lora.up`` form) are renamed to peft's form as a whole, so they load completely too."""
    path = Path(folder) / LORA_WEIGHT_NAME
    if getattr(unet, "peft_config", None):
        raise ValueError(f"cannot load {path}: the UNet already has LoRA adapter(s) {sorted(unet.peft_config)}")
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA export at {path} (a full fine-tune's unet/ folder is not a LoRA)")
    with safe_open(str(path), "pt") as f:
        layers = {k: f.get_tensor(k) for k in f.keys() if k.startswith("unet.")}  # noqa: SIM118 - not iterable
        metadata = (f.metadata() or {}).get("lora_adapter_metadata")
    layers = convert_unet_state_dict_to_peft(layers)
    if not any(".lora_A." in k for k in layers):
        raise ValueError(f"{path} holds no UNet LoRA weights (no unet.*.lora_A keys)")
    unet.load_lora_adapter(layers, prefix="unet", metadata=json.loads(metadata) if metadata else None)
    loaded = get_peft_model_state_dict(unet, adapter_name=next(iter(unet.peft_config)))

    def arrived(key: str, value: torch.Tensor) -> bool:
        got = loaded.get(key.removeprefix("unet."))
        return got is not None and torch.equal(got.cpu(), value.to(got.dtype))

    lost = [k for k, v in layers.items() if not arrived(k, v)]
    if lost:
        raise ValueError(f"{path}: {len(lost)} of {len(layers)} LoRA weights did not load, e.g. {lost[0]}")
