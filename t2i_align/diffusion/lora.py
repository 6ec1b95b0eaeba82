"""Export of the trained weights in diffusers formats: LoRA as ``pytorch_lora_weights.safetensors``
(read by ``pipeline.load_lora_weights``), a fully fine-tuned UNet as a ``unet/`` model folder; the loader
of such a LoRA that checks every adapter arrived; and :class:`PlainLayers`, the LoRA merged into plain layers for
UNet calls without gradient (sampling)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F
from torch import nn

# The loader mixin, not StableDiffusionPipeline: importing the pipeline pulls transformers' image processors,
# which warn twice when torchvision is not installed.
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
from diffusers.utils import convert_unet_state_dict_to_peft
from peft.tuners.lora.layer import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from t2i_align.io import atomic_path

if TYPE_CHECKING:  # generator.py imports this module (PlainLayers)
    from t2i_align.diffusion.generator import Generator

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def export_lora(generator: Generator, out_dir: str | Path) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` (with rank/alpha metadata) atomically; other files
    in ``out_dir`` (earlier ``step_<N>`` exports) are kept.

    The keys are peft's own (``unet.<module>.lora_A.weight``), which diffusers' loader reads as they are. Not
    ``convert_state_dict_to_diffusers``: it rewrites only the attention projections to the older ``lora.down`` /
    ``lora.up`` form (PEFT_TO_DIFFUSERS in diffusers/utils/state_dict_utils.py), and ``load_lora_adapter``
    (diffusers/loaders/peft.py) picks the format of the whole file from its first key, so with adapters beyond
    attention the attention ones were silently dropped on loading (issue 24).

    SDXL: the same file is what ``StableDiffusionXLPipeline.load_lora_weights`` reads (diffusers
    loaders/lora_pipeline.py: ``StableDiffusionXLLoraLoaderMixin.save_lora_weights`` writes the UNet's layers under the
    same ``unet.`` prefix, and its ``load_lora_weights`` hands them to the same ``load_lora_into_unet``;
    tests/diffusion/test_sdxl.py reloads an export there)."""
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


# ------------------------------------------------------------------------------------------ merged LoRA for sampling
class _MergedLinear(nn.Module):
    """``base`` with the merged weight ``W + delta`` (a new tensor: ``base``'s own parameters are never touched)."""

    def __init__(self, base: nn.Linear, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.bias = weight, base.bias  # plain attributes, not parameters: nothing here trains

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _MergedConv2d(nn.Module):
    def __init__(self, base: nn.Conv2d, weight: torch.Tensor) -> None:
        super().__init__()
        self._base, self.weight = (base,), weight  # a tuple: not registered as a child module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._base[0]._conv_forward(x, self.weight, self._base[0].bias)


class PlainLayers:
    """peft's LoRA wrappers of a UNet replaced, while :meth:`applied`, by plain layers computing the same function:
    ``W + scale * B A`` merged once (at construction) into a new weight tensor, the base layer itself where the
    adapters add nothing (a zero adapter, e.g. LoRA's initialisation, or adapters switched off with
    ``unet.disable_adapters()``).

    For UNet calls without gradient only (a sampler's no-grad steps; evaluation): the LoRA weights get no gradient
    through the merged layers. Nothing of the model is modified: the wrappers are put back in their parents'
    module slots when :meth:`applied` exits, and the original weights were never written (no float drift from
    merging and unmerging by addition and subtraction, as peft's ``merge``/``unmerge`` would have). A merged layer's
    output differs from the wrapper's ``W x + B (A x)`` by float rounding only; where nothing is merged, by nothing.
    Build it again after the weights change (an optimizer step): it holds the merged weights of its construction.

    A wrapper that is not a plain ``nn.Linear``/``nn.Conv2d`` LoRA (DoRA and other variants, LoRA bias, peft's own
    merged state, other base layers) is left in place as it is.
    """

    def __init__(self, unet: nn.Module) -> None:
        self.entries: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []  # (parent, name, wrapper, plain layer)
        self.merged = 0  # layers with a merged weight
        self.active = 0  # layers whose adapters were on (their LoRA weights get no gradient through the plain layer)
        with torch.no_grad():
            pending = []  # (parent, name, wrapper, its active adapters, whether they add anything: a 0-d tensor)
            for parent in unet.modules():
                for name, child in parent.named_children():
                    if not isinstance(child, LoraLayer):
                        continue
                    adapters = self._adapters(child)
                    if adapters is None:
                        continue  # left in place as it is
                    if not adapters:  # adapters off: the base layer is the function
                        self.entries.append((parent, name, child, child.get_base_layer()))
                        continue
                    self.active += 1
                    adds = torch.stack([child.lora_A[a].weight.any() & child.lora_B[a].weight.any() for a in adapters])
                    pending.append((parent, name, child, adapters, adds.any()))
            # read on the host once for all layers (one sync on a GPU, not one a layer); a zero factor (peft starts B
            # at zero) makes the wrapper add exactly zero, and the base layer is then the same function, bit for bit
            device = pending[0][-1].device if pending else None
            nonzero = torch.stack([adds.to(device) for *_, adds in pending]).tolist() if pending else []
            for (parent, name, child, adapters, _), merge in zip(pending, nonzero):
                plain = child.get_base_layer()
                if merge:
                    self.merged += 1
                    delta = sum(child.get_delta_weight(a) for a in adapters)  # one layer's at a time: bounded memory
                    weight = (plain.weight.float() + delta.float()).to(plain.weight.dtype)
                    plain = _MergedLinear(plain, weight) if isinstance(plain, nn.Linear) else _MergedConv2d(plain, weight)
                self.entries.append((parent, name, child, plain))

    @staticmethod
    def _adapters(layer: LoraLayer) -> list[str] | None:
        """The active adapters of a plain ``nn.Linear``/``nn.Conv2d`` LoRA wrapper ([] when switched off), None for a
        wrapper to leave in place."""
        base = layer.get_base_layer()
        if type(base) not in (nn.Linear, nn.Conv2d) or layer.merged:
            return None
        if layer.disable_adapters:
            return []
        adapters = [a for a in layer.active_adapters if a in layer.lora_A]
        if any(a in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(a) for a in adapters):
            return None
        return adapters

    def __len__(self) -> int:
        return len(self.entries)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The plain layers in the wrappers' places; the wrappers are back afterwards (also on an exception)."""
        if torch.is_grad_enabled() and self.active:
            raise RuntimeError("PlainLayers stand in for active LoRA adapters, which get no gradient through them: "
                               "use them under no_grad")
        for parent, name, _, plain in self.entries:
            parent._modules[name] = plain
        try:
            yield
        finally:
            for parent, name, wrapper, _ in self.entries:
                parent._modules[name] = wrapper
