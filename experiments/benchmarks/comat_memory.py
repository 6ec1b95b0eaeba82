"""Memory of CoMat's generator graph with and without ``activation_checkpointing`` (the VAE decode of the grad path
and the discriminator's forward in the generator's loss recomputed in the backward), at the SD1.5 architecture
(random weights from ``save_random_sd15``: the UNet, VAE and text tower of SD1.5, no download).

    python experiments/benchmarks/comat_memory.py                       # CPU: 64 px, batch 1 (~10 min on 1 core)
    python experiments/benchmarks/comat_memory.py --device cuda --resolution 512 --batch 4 --steps 50 --grad-steps 5

One generator loss (``CoMat.generator_loss``: the online chain with CFG and K grad steps, decoded, L_i2t under a tiny
captioner, the adversarial term through the discriminator, whose own weights are frozen as in the generator's
``toggled_optimizer`` window; no mixed latents), once per setting, on one module (its backward on CUDA). The
UNet's grad steps are checkpointed in both (``generator.gradient_checkpointing``, as configs/model/sd15.yaml).

CPU (no allocator statistics): **graph bytes**, the distinct storages the autograd graph keeps for the backward at the
end of the forward (``torch.autograd.graph.saved_tensors_hooks``; the weights it saves are not counted: they are
held anyway), and an **estimated peak** of the graph, these plus
the largest region recomputed in the backward at a time (a checkpointed UNet grad step, and with
``activation_checkpointing`` the decode or the discriminator; each region's bytes measured alone, not checkpointed).
CUDA: also ``torch.cuda.max_memory_allocated`` over forward and backward, above the weights. The captioner is tiny
here: BLIP-large's own activations (the same in both settings) are not in these numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import ClassVar

import torch

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPTS = ["a red circle to the left of a blue square", "two green triangles and a big yellow star",
           "a small purple square above a striped cyan circle", "three blue stars next to a red triangle"]


class GraphBytes:
    """Bytes of the distinct storages the autograd graph saves while active; ``region(name)`` also counts what is
    saved inside it under that name (a region that is checkpointed saves nothing here: checkpoint's own hooks win)."""

    #: storages not to count: the weights (saved for the backward by every matmul, but held anyway); set by main()
    weights: ClassVar[set[int]] = set()

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}
        self.regions: dict[str, dict[int, int]] = {}
        self._current: list[str] = []

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() in self.weights:
            return t
        self.storages[storage.data_ptr()] = storage.nbytes()
        for name in self._current:
            self.regions.setdefault(name, {})[storage.data_ptr()] = storage.nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @contextlib.contextmanager
    def region(self, name: str):
        self._current.append(name)
        try:
            yield
        finally:
            self._current.pop()

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def region_total(self, name: str) -> int:
        return sum(self.regions.get(name, {}).values())


def region_bytes(fn, *args) -> int:
    """Bytes one call of ``fn(*args)`` saves for its backward, not checkpointed (what a recompute rebuilds)."""
    counter = GraphBytes()
    with counter.hooks():
        out = fn(*args)
    del out
    return counter.total


def measure(module, prompts: list[str], seeds: list[int], device: torch.device) -> dict:
    """One generator loss and its backward under the module's current ``activation_checkpointing``."""
    from t2i_align.lightning_modules.comat.method import CoMat

    counter = GraphBytes()
    captured: dict[str, torch.Tensor] = {}
    decode, discriminate = CoMat.decode, CoMat._discriminate

    def decode_spy(latents):
        captured["latents"] = latents
        with counter.region("decode"):
            return decode(module, latents)

    def discriminate_spy(latents):
        with counter.region("discriminator"):
            return discriminate(module, latents)

    module.decode, module._discriminate = decode_spy, discriminate_spy
    cuda = device.type == "cuda"
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with counter.hooks():
            loss, _, _ = module.generator_loss({}, prompts, seeds, torch.Generator().manual_seed(0))
        if cuda:  # on a CPU the graph's bytes are read at the end of the forward: the backward is not needed
            loss.backward()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
    finally:
        del module.decode, module._discriminate
    module.zero_grad(set_to_none=True)
    out = {"graph_bytes": counter.total, "decode_saved": counter.region_total("decode"),
           "discriminator_saved": counter.region_total("discriminator")}
    if cuda:
        out["cuda_peak_bytes"] = peak
    return out | {"latents": captured["latents"].detach()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="sampler steps (the no-grad ones cost no graph memory)")
    p.add_argument("--grad-steps", type=int, default=2, help="K")
    p.add_argument("--lora-rank", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="weight dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--model-dir", default=None, help="reuse (or write) the random SD1.5 pipeline folder here")
    a = p.parse_args(argv)

    from comat_step import save_captioner

    from t2i_align.diffusion.generator import GeneratorConfig, LoraSettings
    from t2i_align.diffusion.sampling import SamplingSettings
    from t2i_align.diffusion.tiny import save_random_sd15
    from t2i_align.experts.captioner import BlipLikelihood
    from t2i_align.lightning_modules.comat import CoMat

    device = torch.device(a.device)
    dtype = a.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(a.model_dir) if a.model_dir else Path(tmp) / "sd15"
        if not (folder / "model_index.json").exists():
            save_random_sd15(folder)
        captioner = BlipLikelihood(save_captioner(Path(tmp) / "captioner", "tiny"), prefix="a photography of ", dtype=dtype)
        stride = max(1, (a.steps - 1) // max(1, a.grad_steps - 1)) if a.grad_steps > 1 else 1
        torch.manual_seed(0)
        module = CoMat(generator=GeneratorConfig(str(folder), lora=LoraSettings(rank=a.lora_rank), weight_dtype=dtype,
                                                 gradient_checkpointing=True),
                       captioner=captioner,
                       sampling=SamplingSettings(a.steps, guidance_scale=7.5, scheduler="ddpm", resolution=a.resolution),
                       num_grad_steps=a.grad_steps, grad_stride=stride, adversarial_weight=1.0,
                       discriminator_lora=LoraSettings(rank=a.lora_rank))
        module.to(device)
        module.experts.to(device)
        tensors = [*module.parameters(), *module.buffers(), *captioner.model.parameters(), *captioner.model.buffers()]
        GraphBytes.weights = {t.untyped_storage().data_ptr() for t in tensors}
        prompts = (PROMPTS * a.batch)[: a.batch]
        seeds = list(range(a.batch))
        results = {}
        module.trainable_keys()  # fixed before the flags change
        for param in module.discriminator_parameters():  # as toggled_optimizer(G) leaves them during G's loss
            param.requires_grad_(False)
        for on in (False, True):
            module.activation_checkpointing = on
            results[on] = measure(module, prompts, seeds, device)
        latents = results[False].pop("latents").requires_grad_(True)
        results[True].pop("latents")
        # what a recompute rebuilds at once: one region, measured alone (not checkpointed)
        module.activation_checkpointing = False
        generator = module.generator
        cond = torch.cat([generator.empty_embedding().expand(len(prompts), -1, -1), generator.encode_prompts(prompts)])
        t = generator.make_scheduler(module.sampling).timesteps[0]
        regions = {
            "unet_grad_step": region_bytes(lambda x: generator.unet_forward(x, t, cond), torch.cat([latents, latents])),
            "decode": region_bytes(module.decode, latents),
            "discriminator": region_bytes(module._discriminate, latents),
        }
    gib = 2.0**30
    report = {"resolution": a.resolution, "batch": a.batch, "steps": a.steps, "grad_steps": a.grad_steps,
              "lora_rank": a.lora_rank, "dtype": dtype, "device": str(device), "regions_gib": {k: v / gib for k, v in regions.items()}}
    for on in (False, True):
        recomputed = ["unet_grad_step"] + (["decode", "discriminator"] if on else [])
        r = results[on]
        entry = {"graph_gib": r["graph_bytes"] / gib, "decode_saved_gib": r["decode_saved"] / gib,
                 "discriminator_saved_gib": r["discriminator_saved"] / gib,
                 "estimated_peak_gib": (r["graph_bytes"] + max(regions[k] for k in recomputed)) / gib}
        if "cuda_peak_bytes" in r:
            entry["cuda_peak_gib"] = r["cuda_peak_bytes"] / gib
        report["checkpointing_on" if on else "checkpointing_off"] = entry
    off, on = report["checkpointing_off"], report["checkpointing_on"]
    report["ratio_graph"] = on["graph_gib"] / off["graph_gib"]
    report["ratio_estimated_peak"] = on["estimated_peak_gib"] / off["estimated_peak_gib"]
    if "cuda_peak_gib" in on:
        report["ratio_cuda_peak"] = on["cuda_peak_gib"] / off["cuda_peak_gib"]
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
