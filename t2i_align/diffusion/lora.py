"""Export of the trained weights in diffusers formats: LoRA as ``pytorch_lora_weights.safetensors``
(read by ``pipeline.load_lora_weights``), a fully fine-tuned UNet as a ``unet/`` model folder."""

from __future__ import annotations

from pathlib import Path

# The loader mixin, not StableDiffusionPipeline: importing the pipeline pulls transformers' image processors,
# which warn twice when torchvision is not installed.
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict

from t2i_align.diffusion.generator import Generator
from t2i_align.io import atomic_path

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def export_lora(generator: Generator, out_dir: str | Path) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` (with rank/alpha metadata) atomically; other files
    in ``out_dir`` (earlier ``step_<N>`` exports) are kept."""
    if generator.config.lora is None:
        raise ValueError("export_lora needs a LoRA generator; this one fine-tunes the full UNet")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(generator.unet))
    layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
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
