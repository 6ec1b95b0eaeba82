"""The generator: a Stable Diffusion (1.x/2.x or SDXL) UNet with LoRA (or full fine-tuning), prompt encoding with
CFG, the denoising loss, and a sampler whose gradient rule is a :mod:`~t2i_align.diffusion.policies` policy.

SD 1.x/2.x's text condition is a tensor ``[B, 77, D]``; SDXL's is an :class:`XLCondition` (hidden states of both text
encoders, the pooled embedding and the size/crop ids), which supports the tensor operations callers use on a
condition (``len``, slicing, ``expand``, ``to``); :meth:`Generator.condition_kwargs` turns either into the UNet's
keyword arguments.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import itertools
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from torch.utils.checkpoint import checkpoint

from t2i_align.common import ConfigError
from t2i_align.diffusion.attention import (
    AttentionStore,
    CaptureProcessor,
    ScoreEdit,
    cross_attention_layer_names,
    install_capture,
    key_value_cache,
)
from t2i_align.diffusion.loading import load_sd_components, load_vae, xl_vae_dtype
from t2i_align.diffusion.lora import PlainLayers
from t2i_align.diffusion.policies import GradientPolicy, NoGrad
from t2i_align.diffusion.sampling import SamplingSettings, step_noise

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: No-grad UNet calls of at least this many rows on a CPU running 2 intra-op threads run as two halves on two
#: threads (see _HalvesOnTwoThreads); below it one call on 2 threads is faster (measured on the ToyWorld UNet).
SPLIT_MIN_BATCH = 32


@dataclass
class LoraSettings:
    """LoRA on the UNet through peft.

    Args:
        rank: LoRA rank r.
        alpha: LoRA alpha (scale alpha / r); None means alpha = rank.
        target_modules: module-name patterns that get LoRA (SD attention projections by default).
        init: peft ``init_lora_weights`` (True: B = 0 so training starts at the base model; "gaussian", ...).
        dropout: LoRA dropout.
    """

    rank: int = 4
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    init: bool | str = True
    dropout: float = 0.0

    def __post_init__(self) -> None:  # peft's own messages do not name the config key
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"lora.rank must be a whole number >= 1, got {self.rank!r} "
                              "(lora: null fine-tunes the whole UNet instead)")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be > 0 (or null for alpha = rank), got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules is empty: name the UNet modules that get LoRA (e.g. to_q, to_k)")


@dataclass
class GeneratorConfig:
    """Which model to load and what to train.

    Args:
        pretrained: local diffusers folder or hub id of an SD 1.x/2.x or SDXL (base) pipeline.
        revision: hub revision.
        variant: weight variant on the hub (e.g. "fp16").
        lora: LoRA settings; None trains the full UNet.
        weight_dtype: dtype of the frozen weights (trainable ones are always float32).
        gradient_checkpointing: wrap grad-enabled UNet calls in non-reentrant checkpointing.
        vae: another VAE (folder or hub id of an ``AutoencoderKL``) instead of the pipeline's, e.g.
            madebyollin/sdxl-vae-fp16-fix for SDXL in float16 (SDXL's own VAE overflows in float16: with
            ``weight_dtype: float16`` it is kept and run in float32, as its ``force_upcast`` asks).
    """

    pretrained: str
    revision: str | None = None
    variant: str | None = None
    lora: LoraSettings | None = field(default_factory=LoraSettings)
    weight_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    gradient_checkpointing: bool = False
    vae: str | None = None


@dataclass
class XLCondition:
    """SDXL's text condition of a batch: what its UNet takes besides the latents and timesteps.

    ``hidden``: both text encoders' penultimate hidden states, concatenated on the feature axis ``[B, 77, 768 +
    1280]``; ``pooled``: text_encoder_2's projected pooled output ``[B, 1280]`` (diffusers
    pipeline_stable_diffusion_xl.py ``StableDiffusionXLPipeline.encode_prompt``); ``time_ids``: SDXL's size and crop
    conditioning ``[B, 6]`` = (original height, width, crop top, left, target height, width), None: the generator
    derives them at each UNet call from the latents' size as diffusers' pipeline does by default (original = target
    = the image size, crop (0, 0): ``StableDiffusionXLPipeline.__call__`` / ``_get_add_time_ids``).

    It supports the operations methods and the sampler use on SD's condition tensor (``len``, slicing, ``expand``,
    ``expand_as``, ``to``, ``shape``/``device``/``dtype`` of ``hidden``), so callers need not tell the two apart.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> XLCondition:
        return XLCondition(fn(self.hidden), fn(self.pooled), None if self.time_ids is None else fn(self.time_ids))

    def __getitem__(self, index) -> XLCondition:
        if not isinstance(index, (slice, int, list, torch.Tensor)):
            raise TypeError(f"an XLCondition is indexed along its batch only, got {index!r}")
        return self._map(lambda t: t[index:index + 1] if isinstance(index, int) else t[index])

    def expand(self, batch: int, *_: int) -> XLCondition:
        """Each part expanded to ``batch`` rows (``cond.expand(n, -1, -1)`` as on a tensor)."""
        return self._map(lambda t: t.expand(batch, *t.shape[1:]))

    def expand_as(self, other: XLCondition) -> XLCondition:
        return self.expand(len(other))

    def to(self, *args, **kwargs) -> XLCondition:
        return self._map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> XLCondition:
        return self._map(torch.Tensor.detach)

    @property
    def shape(self) -> torch.Size:
        return self.hidden.shape

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    @staticmethod
    def cat(parts: Sequence[XLCondition]) -> XLCondition:
        """Parts stacked along the batch (their ``time_ids`` all given or all None)."""
        ids = [p.time_ids for p in parts]
        if any(i is None for i in ids) and not all(i is None for i in ids):
            raise ValueError("cannot concatenate XLConditions with and without time_ids")
        return XLCondition(torch.cat([p.hidden for p in parts]), torch.cat([p.pooled for p in parts]),
                           None if ids[0] is None else torch.cat(ids))


def cat_conditions(parts: Sequence) -> torch.Tensor | XLCondition:
    """Conditions (all tensors or all :class:`XLCondition`) stacked along the batch."""
    if isinstance(parts[0], XLCondition):
        return XLCondition.cat(parts)
    return torch.cat(list(parts))


@dataclass
class SampleOutput:
    latents: torch.Tensor  # final latents (the one-step x0 prediction for a policy that stops early)
    images: torch.Tensor | None  # decoded, B x 3 x H x W in [0, 1]
    attention: AttentionStore | None
    plan_grad_steps: tuple[int, ...]


@dataclass
class DenoisingOutput:
    loss: torch.Tensor
    attention: AttentionStore | None  # the maps of this forward (step 0), when recorded
    captions: list[str]  # the captions trained on ("" where dropped)


class _HalvesOnTwoThreads:
    """A no-grad UNet call (or VAE decode) as two halves of the batch (with CFG: the unconditional and the conditional
    half), each on its own thread running 1 intra-op thread, for a CPU running 2 intra-op threads (2 cores).

    On the ToyWorld UNet at 56 prompts with CFG this takes 155 ms instead of 205 ms a call, the decode of 56 images
    118 ms instead of 154 ms, the same numbers bit for bit: one OpenMP team of 2 threads meets at a barrier after
    every kernel, two single-threaded halves never wait for each other. It also keeps the kernels off OpenMP's
    spin-wait, which on a 2-core machine that other processes load made the 2-thread call 5-10x slower. Below
    ``SPLIT_MIN_BATCH`` rows one call is faster (per-kernel overhead).
    """

    def __init__(self) -> None:
        self._halves: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None

    def halves(self, cond: torch.Tensor, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The condition's halves, the same tensors at every step (the key/value cache matches them by identity)."""
        if self._halves is None or self._halves[0] is not cond or self._halves[1][0].shape[0] != h:
            self._halves = (cond, (cond[:h], cond[h:]))
        return self._halves[1]

    @staticmethod
    def _run(result: list, forward: Callable, *args: torch.Tensor) -> None:
        try:
            torch.set_num_threads(1)  # this thread's own OpenMP setting (it is per thread)
            with torch.no_grad():
                result.append(forward(*args))
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller's thread
            result.append(e)

    def __call__(self, forward: Callable[..., torch.Tensor], x: torch.Tensor, cond: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """``forward(x)`` (``forward(x, cond)``) without gradient, by halves of ``x`` (and ``cond``)."""
        h = x.shape[0] // 2
        firsts, seconds = [x[:h]], [x[h:]]
        if cond is not None:
            first_c, second_c = self.halves(cond, h)
            firsts.append(first_c)
            seconds.append(second_c)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        result: list = []
        worker = threading.Thread(target=self._run, args=(result, forward, *firsts), name="t2i-half", daemon=True)
        try:
            worker.start()
            with torch.no_grad():
                second = forward(*seconds)
        finally:
            worker.join()
            torch.set_num_threads(threads)
        if isinstance(result[0], BaseException):
            raise result[0]
        return torch.cat([result[0], second])


class BackgroundLane:
    """``fn()`` without gradient on a second thread while the caller's thread goes on, each with 1 intra-op thread
    (CPU, 2 intra-op threads): two single-threaded streams of work get more out of 2 cores than one 2-thread stream
    of small kernels (ToyWorld's batch-8 UNet calls: 0.77 s for two 25-step chains side by side, 0.97 s one after
    the other). The caller's thread gets its 2 threads back at the first :meth:`poll` (e.g. a sampler's
    ``step_hook``) after ``fn`` finished, or at :meth:`result`.

    ``fn`` must not share mutable state with the caller's work (a :meth:`Generator.base_model` has its own modules).
    """

    def __init__(self, fn: Callable[[], torch.Tensor]) -> None:
        self.threads = torch.get_num_threads()
        self._result: list = []
        self._restored = False
        torch.set_num_threads(1)
        self.thread = threading.Thread(target=self._run, args=(fn,), name="t2i-lane", daemon=True)
        self.thread.start()

    @staticmethod
    def available(device: torch.device) -> bool:
        """Whether a lane pays here: a CPU running 2 intra-op threads."""
        return device.type == "cpu" and torch.get_num_threads() == 2

    def _run(self, fn: Callable[[], torch.Tensor]) -> None:
        try:
            torch.set_num_threads(1)  # this thread's own OpenMP setting
            with torch.no_grad():
                self._result.append(fn())
        except BaseException as e:  # noqa: BLE001 - re-raised by result()
            self._result.append(e)

    def poll(self, *args) -> None:
        """Give the caller's thread its threads back if ``fn`` is done (returns None: usable as a ``step_hook``)."""
        if not self._restored and not self.thread.is_alive():
            torch.set_num_threads(self.threads)
            self._restored = True

    def result(self) -> torch.Tensor:
        """Wait for ``fn`` and return its result (or raise its exception)."""
        self.thread.join()
        self.poll()
        if isinstance(self._result[0], BaseException):
            raise self._result[0]
        return self._result[0]


def keep_freed_memory() -> None:
    """Let glibc keep freed memory for the next allocation instead of returning it to the system (Linux only).

    PyTorch's CPU tensors come from malloc, and glibc hands a block of more than 128 KiB back to the system when it is
    freed (unmapped, or the heap trimmed): the same activation allocated again at the next UNet call is then zeroed
    page by page by the kernel. On the ToyWorld UNet (56 prompts, CFG) that was 4,000-8,500 page faults and 4-15 ms
    of a 140 ms call. Kept, it is reused without faults; the process's resident memory stays at its peak instead.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB free at the top of the heap
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MiB (glibc's maximum) from the heap
    except (OSError, AttributeError):  # not glibc (musl, ...): its allocator's own behaviour
        pass


def seeded_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, so a sample's noise depends on its own seed only."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


class Generator(nn.Module):
    """Tokenizer, text encoder, VAE and UNet of a Stable Diffusion pipeline (SDXL: both tokenizers and text
    encoders; prompts encode to an :class:`XLCondition`).

    Only the UNet (its LoRA, or all of it) is trainable. Text encoder and VAE are frozen and kept in
    ``weight_dtype``; trainable parameters stay float32 and the forward runs under autocast when
    ``weight_dtype`` is a half type.
    """

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        self.weight_dtype = DTYPES[config.weight_dtype]
        parts = load_sd_components(config.pretrained, config.revision, config.variant, dtype=self.weight_dtype)
        self.tokenizer = parts.tokenizer
        self.text_encoder = parts.text_encoder.requires_grad_(False).eval()
        self.is_xl = parts.is_xl
        # SDXL: the second tokenizer and text encoder; the unconditional branch of CFG is zeros where the pipeline
        # says so (diffusers StableDiffusionXLPipeline.encode_prompt: force_zeros_for_empty_prompt, True for base 1.0)
        self.tokenizer_2 = parts.tokenizer_2
        self.text_encoder_2 = None if parts.text_encoder_2 is None else parts.text_encoder_2.requires_grad_(False).eval()
        self.force_zeros_for_empty_prompt = bool(self.is_xl and (parts.pipeline_config or {}).get(
            "force_zeros_for_empty_prompt", True))
        vae = parts.vae
        if config.vae is not None:
            vae = load_vae(config.vae, dtype=xl_vae_dtype(self.weight_dtype) if self.is_xl else self.weight_dtype)
        # SDXL's VAE overflows in float16 (its config's force_upcast): loaded (loading.xl_vae_dtype) and run in float32
        # then, as the SDXL pipeline decodes (StableDiffusionXLPipeline.__call__, ``needs_upcasting``); an fp16-fixed
        # VAE (force_upcast false) runs in float16. SD 1.x/2.x keep their VAE as it is, as StableDiffusionPipeline does.
        self.vae_upcast = bool(self.is_xl and self.weight_dtype == torch.float16 and vae.config.force_upcast)
        if self.is_xl and self.weight_dtype == torch.float16 and not self.vae_upcast:
            vae = vae.to(torch.float16)
        self.vae = vae.requires_grad_(False).eval()
        self._time_ids: dict = {}  # (rows, height, width, device) -> SDXL's default time ids (one tensor per shape)
        self.unet = parts.unet
        self.scheduler_config = parts.scheduler_config
        self.train_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        if config.lora is None:
            self.unet.requires_grad_(True).to(torch.float32)
        else:
            self.unet.requires_grad_(False)
            self.unet.add_adapter(self.lora_config())
            for p in self.unet.parameters():  # peft creates LoRA in the base dtype: train it in fp32
                if p.requires_grad:
                    p.data = p.data.float()
        self._empty_embedding: torch.Tensor | None = None
        self.attention_store: AttentionStore | None = None
        # The sampler's UNet calls without gradient run LoRA merged into plain layers (lora.PlainLayers) and reuse
        # the chain's cross-attention keys and values (attention.key_value_cache): the same results to float
        # rounding (bit for bit for a zero adapter, e.g. the base model). False: every call through peft's
        # wrappers and the SDPA processor, as training's grad steps run (the reference the tests compare with).
        self.fast_sampling = True
        keep_freed_memory()

    def base_model(self) -> Generator:
        """This LoRA generator's frozen base model as another :class:`Generator`: the same tokenizer, text encoder,
        VAE and UNet weights (the same tensors: nothing is copied or loaded), its UNet a module tree of its own
        without the LoRA wrappers (the function of ``unet.disable_adapters()``, bit for bit) and with SDPA attention
        everywhere. Its sampling touches none of this generator's modules, so it may run in another thread
        (:class:`BackgroundLane`) while this one samples or trains. Built once and kept (outside the module tree:
        no state-dict entries); built again when the UNet's parameters are other objects."""
        if self.config.lora is None:
            raise ValueError("base_model() is the UNet without its LoRA adapters: it needs a LoRA generator")
        key = tuple(id(p) for p in self.unet.parameters())
        cached = self.__dict__.get("_base_model")
        if cached is None or cached[0] != key:
            from peft.tuners.lora.layer import LoraLayer

            shared = {id(t): t for t in itertools.chain(self.unet.parameters(), self.unet.buffers())}
            shared.update({id(p): p for p in self.unet.attn_processors.values()})  # replaced below, never copied
            unet = copy.deepcopy(self.unet, shared)  # new modules around the same parameter tensors
            for parent in list(unet.modules()):
                for name, child in list(parent.named_children()):
                    if isinstance(child, LoraLayer):
                        parent._modules[name] = child.get_base_layer()
            unet.set_attn_processor(AttnProcessor2_0())
            view = copy.copy(self)
            view.__dict__.pop("_base_model", None)
            view._modules, view._parameters, view._buffers = dict(self._modules), dict(self._parameters), dict(self._buffers)
            view._modules["unet"] = unet
            view.config = dataclasses.replace(self.config, lora=None)
            view.attention_store = None
            cached = (key, view)
            object.__setattr__(self, "_base_model", cached)  # not registered as a submodule
        view = cached[1]
        view._empty_embedding = self.empty_embedding()  # computed here: the view's own would tokenize in its thread
        return view

    # ----------------------------------------------------------------------------- configuration
    def lora_config(self):
        from peft import LoraConfig

        lora = self.config.lora
        assert lora is not None
        return LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
            target_modules=list(lora.target_modules),
            init_lora_weights=lora.init,
            lora_dropout=lora.dropout,
        )

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def check_resolution(self, size: int, key: str = "resolution") -> None:
        """Refuse an image side the VAE cannot encode/decode without cropping (not a multiple of its factor)."""
        factor = self.vae_scale_factor
        if size % factor:
            low, high = size // factor * factor, (size // factor + 1) * factor
            raise ConfigError(f"{key}={size} is not a multiple of the VAE's downsampling factor {factor} "
                             f"({self.config.pretrained}); use {low or high} or {high}")

    @property
    def default_resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def enable_attention_capture(self, layers: list[str] | None = None) -> AttentionStore:
        """Install capture processors on ``layers`` (default: mid + up cross-attention) and return the store."""
        if self.attention_store is None:
            self.attention_store = AttentionStore()
        install_capture(self.unet, layers or cross_attention_layer_names(self.unet), self.attention_store)
        return self.attention_store

    def _ensure_processors(self, layers: Sequence[str]) -> AttentionStore:
        """The store, with a capture/edit processor on each of ``layers`` (others keep theirs)."""
        store = self.attention_store or AttentionStore()
        self.attention_store = store
        processors = self.unet.attn_processors  # "<layer>.processor" -> processor
        missing = [name for name in layers if not isinstance(processors.get(f"{name}.processor"), CaptureProcessor)]
        if missing:
            install_capture(self.unet, missing, store)
        return store

    def autocast(self):
        if self.weight_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.weight_dtype)

    # ------------------------------------------------------------------------------- text & vae
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor | XLCondition:
        """CLIP text-encoder hidden states ``[B, 77, D]`` (frozen encoder, no gradient); for SDXL an
        :class:`XLCondition`: both encoders' penultimate hidden states concatenated, and text_encoder_2's pooled
        projection (diffusers ``StableDiffusionXLPipeline.encode_prompt``, without clip_skip)."""
        if self.is_xl:
            return self._encode_prompts_xl(prompts)
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        with self.autocast():
            return self.text_encoder(ids)[0]

    def _encode_prompts_xl(self, prompts: Sequence[str]) -> XLCondition:
        hidden = []
        pooled = None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(self.device)
            with self.autocast():
                out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # "SDXL always indexes from the penultimate layer"
            pooled = out[0]  # the last encoder's (text_encoder_2's) projected pooled output, [B, 1280]
        return XLCondition(torch.cat(hidden, dim=-1), pooled)

    def empty_embedding(self) -> torch.Tensor | XLCondition:
        """Embedding of the empty prompt (the unconditional branch of CFG), computed once per device; SDXL with
        ``force_zeros_for_empty_prompt``: zeros of the condition's shapes, as diffusers' SDXL pipeline uses without
        a negative prompt."""
        if self._empty_embedding is None or self._empty_embedding.device != self.device:
            empty = self.encode_prompts([""])
            if self.force_zeros_for_empty_prompt:
                empty = XLCondition(torch.zeros_like(empty.hidden), torch.zeros_like(empty.pooled))
            self._empty_embedding = empty
        return self._empty_embedding

    def vae_autocast(self):
        """The VAE's precision context: the generator's autocast, or float32 without autocast for a VAE kept in
        float32 (``vae_upcast``: SDXL's VAE with float16 weights elsewhere)."""
        if self.vae_upcast:
            return torch.autocast(self.device.type, enabled=False)
        return self.autocast()

    def _latent_stats(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A VAE config's ``latents_mean``/``latents_std`` (None in SD's and SDXL base's) as ``[1, C, 1, 1]``."""
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return None
        view = (1, len(mean), 1, 1)
        return (torch.tensor(mean).view(view).to(latents.device, latents.dtype),
                torch.tensor(std).view(view).to(latents.device, latents.dtype))

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] -> scaled VAE latents (a sample of the posterior, drawn with ``rng``)."""
        with self.vae_autocast():
            dist = self.vae.encode((pixels * 2 - 1).to(self.vae.dtype)).latent_dist
        noise = randn_tensor(dist.mean.shape, generator=rng, device=dist.mean.device, dtype=dist.mean.dtype)
        latents = (dist.mean + dist.std * noise).float()
        stats = self._latent_stats(latents)
        if stats is not None:  # diffusers' SDXL training scripts: (z - mean) * scaling_factor / std
            return (latents - stats[0]) * self.vae.config.scaling_factor / stats[1]
        return latents * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0, 1] (differentiable)."""
        stats = self._latent_stats(latents)
        with self.vae_autocast():
            if stats is not None:  # StableDiffusionXLPipeline.__call__: latents * std / scaling_factor + mean
                images = self.vae.decode(latents * stats[1] / self.vae.config.scaling_factor + stats[0]).sample
            elif self.vae_upcast:
                images = self.vae.decode(latents.float() / self.vae.config.scaling_factor).sample
            else:
                images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------------------------- unet
    def time_ids(self, rows: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        """SDXL's default size/crop ids of ``rows`` images of ``height`` x ``width`` pixels: (h, w, 0, 0, h, w)
        (diffusers ``StableDiffusionXLPipeline.__call__``: original_size = target_size = (height, width),
        crops_coords_top_left = (0, 0)), float32, one tensor per shape and device (made once: no copy per step)."""
        key = (rows, height, width, str(device))
        ids = self._time_ids.get(key)
        if ids is None:
            ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(rows, 1).to(device)
            self._time_ids[key] = ids
        return ids

    def condition_kwargs(self, condition, latents: torch.Tensor) -> dict:
        """The UNet's keyword arguments for ``condition`` (SD: a tensor; SDXL: an :class:`XLCondition`) on
        ``latents``: ``encoder_hidden_states``, and for SDXL ``added_cond_kwargs`` (pooled embedding and time ids)."""
        if not isinstance(condition, XLCondition):
            return {"encoder_hidden_states": condition}
        ids = condition.time_ids
        if ids is None:
            factor = self.vae_scale_factor
            ids = self.time_ids(len(condition), latents.shape[-2] * factor, latents.shape[-1] * factor, latents.device)
        return {"encoder_hidden_states": condition.hidden,
                "added_cond_kwargs": {"text_embeds": condition.pooled, "time_ids": ids}}

    def unet_forward(self, latents: torch.Tensor, timesteps: torch.Tensor, embeddings: torch.Tensor | XLCondition,
                     use_checkpoint: bool = False) -> torch.Tensor:
        """One UNet call; with ``use_checkpoint`` (and grad on) it is wrapped in non-reentrant checkpointing."""

        def run(x, t, c):
            with self.autocast():
                if isinstance(c, XLCondition):
                    return self.unet(x, t, **self.condition_kwargs(c, x)).sample.float()
                return self.unet(x, t, encoder_hidden_states=c).sample.float()

        if use_checkpoint and torch.is_grad_enabled():
            store = self.attention_store
            kwargs = {}
            if store is not None:
                # The backward re-run must take the same attention path without overwriting the maps.
                recording = store.recording
                kwargs["context_fn"] = lambda: (contextlib.nullcontext(), store.replay(recording))
            return checkpoint(run, latents, timesteps, embeddings, use_reentrant=False, **kwargs)
        return run(latents, timesteps, embeddings)

    def predict_x0(self, scheduler, latents: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """One-step clean-latent prediction from x_t for epsilon- and v-prediction models (``t`` a Python int: the
        coefficient is read on the host, a 0-d CPU tensor the device kernels take as a scalar: no copy, no sync)."""
        table = scheduler.alphas_cumprod if isinstance(t, int) else scheduler.alphas_cumprod.to(latents.device)
        alpha = table[t].float()
        sigma = (1 - alpha).sqrt()
        if self.prediction_type == "epsilon":
            return (latents - sigma * model_output) / alpha.sqrt()
        if self.prediction_type == "v_prediction":
            return alpha.sqrt() * latents - sigma * model_output
        raise ValueError(f"unsupported prediction_type '{self.prediction_type}'")

    def denoising_loss(self, pixels: torch.Tensor, prompts: Sequence[str], rng: torch.Generator | None = None,
                       caption_dropout: float = 0.0) -> torch.Tensor:
        """The plain latent-diffusion loss (MSE to epsilon or v) on image-caption pairs; see
        :meth:`denoising_forward` (which also returns the attention maps of the forward)."""
        return self.denoising_forward(pixels, prompts, rng, caption_dropout=caption_dropout).loss

    def denoising_forward(self, pixels: torch.Tensor, prompts: Sequence[str], rng: torch.Generator | None = None,
                          record_attention: bool = False, caption_dropout: float = 0.0) -> DenoisingOutput:
        """The latent-diffusion loss and, with ``record_attention``, the cross-attention maps of this very
        forward (a fresh store under step 0: maps left over from an earlier sampling call are never returned).

        ``rng`` fixes the VAE posterior sample, the noise, the timesteps and the dropped captions, so a step is
        exactly reproducible from its seed (this is what makes resume bit-for-bit on CPU). ``caption_dropout``:
        probability of training a pair with the empty caption instead (the unconditional branch CFG uses; 0
        draws nothing, so the other random numbers are those of a run without it).
        """
        for side in pixels.shape[-2:]:
            self.check_resolution(side, "image side")
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        latents = self.encode_images(pixels.to(self.device), rng)
        noise = randn_tensor(latents.shape, generator=rng, device=latents.device, dtype=latents.dtype)
        steps = self.train_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (latents.shape[0],), generator=rng).to(latents.device)
        captions = list(prompts)
        if caption_dropout > 0:
            dropped = torch.rand(len(captions), generator=rng) < caption_dropout
            captions = ["" if d else c for c, d in zip(captions, dropped.tolist())]
        noisy = self.train_scheduler.add_noise(latents, noise, t)
        target = noise if self.prediction_type == "epsilon" else self.train_scheduler.get_velocity(latents, noise, t)
        embeddings = self.encode_prompts(captions)
        store = self.enable_attention_capture() if record_attention and self.attention_store is None else self.attention_store
        ctx = contextlib.nullcontext()
        if record_attention:
            store.clear()
            ctx = store.record(0, False, tuple(latents.shape[-2:]))
        with ctx:
            pred = self.unet_forward(noisy, t, embeddings, use_checkpoint=self.config.gradient_checkpointing)
        attention = store.snapshot() if record_attention else None
        return DenoisingOutput(F.mse_loss(pred, target.float()), attention, captions)

    # ---------------------------------------------------------------------------------- sampling
    def make_scheduler(self, sampling: SamplingSettings):
        """A fresh scheduler of ``sampling``'s kind and steps on this model's device."""
        return sampling.make_scheduler(self.scheduler_config, self.device)

    def sample(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        sampling: SamplingSettings | None = None,
        *,
        policy: GradientPolicy | None = None,
        policy_rng: torch.Generator | None = None,
        decode: bool = True,
        record_attention: bool | Sequence[int] = False,
        embeddings: torch.Tensor | XLCondition | None = None,
        attention_edits: Sequence[ScoreEdit] = (),
        step_hook: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
        init_latents: torch.Tensor | None = None,
        start_step: int = 0,
    ) -> SampleOutput:
        """Generate from per-sample seeded noise with ``sampling``'s sampler (default: :class:`SamplingSettings`'s)
        and the gradient rule of ``policy``.

        Steps outside the policy's grad steps run the UNet under ``no_grad``. From the first grad step
        on, the scheduler update stays in the graph. ``record_attention``: True records the grad steps
        (or every step under a no-grad policy); a sequence records exactly those step indices.
        With grad disabled by the caller (evaluation) nothing carries gradient whatever the policy.

        ``attention_edits`` change the pre-softmax attention scores of named layers at chosen steps
        (:class:`~t2i_align.diffusion.attention.ScoreEdit`; capture in the same call sees the edited maps).
        ``step_hook(i, t, latents)`` runs after each scheduler step (as diffusers' ``callback_on_step_end``); a
        tensor it returns replaces the latents of the next step.

        ``init_latents`` (clean scaled latents, e.g. of real images) are noised with each sample's seeded noise to
        the timestep of step ``start_step`` and the chain runs from there (CoMat's mixed latents, as diffusers'
        img2img ``strength``). The policy plans the steps that run: its step indices count from ``start_step``,
        the returned ``plan_grad_steps`` are indices of the whole chain.
        """
        sampling = sampling or SamplingSettings()
        num_inference_steps, guidance_scale = sampling.num_inference_steps, sampling.guidance_scale
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        if not 0 <= start_step < num_inference_steps:
            raise ValueError(f"start_step={start_step} must be in [0, num_inference_steps={num_inference_steps})")
        if start_step and init_latents is None:
            raise ValueError("start_step > 0 needs init_latents (the clean latents to noise to that step)")
        policy = policy or NoGrad()
        plan = policy.plan(num_inference_steps - start_step, policy_rng)
        if start_step:
            plan = dataclasses.replace(plan, grad_steps=frozenset(start_step + s for s in plan.grad_steps),
                                       stop_at=None if plan.stop_at is None else start_step + plan.stop_at)
        sched = self.make_scheduler(sampling)
        grad_allowed = torch.is_grad_enabled()
        cfg = sampling.cfg

        cond = self.encode_prompts(prompts) if embeddings is None else embeddings
        if cfg:
            cond = cat_conditions([self.empty_embedding().expand_as(cond), cond])
        resolution = sampling.resolution or self.default_resolution
        self.check_resolution(resolution, "sampling.resolution")
        latent_side = resolution // self.vae_scale_factor
        shape = (len(prompts), self.unet.config.in_channels, latent_side, latent_side)
        gens = seeded_generators(seeds)
        latents = randn_tensor(shape, generator=gens, device=self.device, dtype=torch.float32) * sched.init_noise_sigma
        # Every scheduler step's noise is drawn here, from the same generators in the same order as the steps would
        # draw it (the same numbers), and reaches the device in one copy instead of one blocking copy a step.
        # sched.host_timesteps: the timesteps as ints, so the scheduler's arithmetic never reads a device tensor.
        host_t = sched.host_timesteps
        last = num_inference_steps if plan.stop_at is None else plan.stop_at  # steps start_step..last-1 call step()
        noisy = [i for i in range(start_step, last) if sched.draws_noise(host_t[i], sampling.eta)]
        noise = step_noise(gens, shape, len(noisy), self.device) if noisy else None
        noise_row = {i: row for row, i in enumerate(noisy)}
        if init_latents is not None:
            if tuple(init_latents.shape) != shape:
                raise ValueError(f"init_latents have shape {tuple(init_latents.shape)}; this sampling needs {shape}")
            t_start = sched.timesteps[start_step].repeat(len(prompts))
            latents = sched.add_noise(init_latents.to(self.device, torch.float32), latents / sched.init_noise_sigma,
                                      t_start)

        if record_attention is True:
            record_steps = set(plan.grad_steps) or set(range(start_step, num_inference_steps))
        else:
            record_steps = set(record_attention or ())
        if record_steps and self.attention_store is None:
            self.enable_attention_capture()
        if attention_edits:
            self._ensure_processors([layer for edit in attention_edits for layer in edit.layers])
        store = self.attention_store
        if store is not None:
            store.clear()
            store.edits = tuple(attention_edits)
        fast = contextlib.ExitStack()
        plain, kv, split = None, None, None  # merged LoRA, key/value cache, two-thread halves: for no-grad steps
        if self.fast_sampling:
            no_grad_steps = any(not (grad_allowed and i in plan.grad_steps) for i in range(start_step, num_inference_steps))
            if no_grad_steps and self.config.lora is not None:
                plain = PlainLayers(self.unet) or None
            kv = fast.enter_context(key_value_cache(self.unet)) if no_grad_steps else None
            rows = len(prompts) * (2 if cfg else 1)
            if (no_grad_steps and self.device.type == "cpu" and torch.get_num_threads() == 2 and rows >= SPLIT_MIN_BATCH
                    and not attention_edits):
                split = _HalvesOnTwoThreads()
        try:
            in_graph = False  # becomes True at the first grad step: later updates stay differentiable
            for i, t in enumerate(sched.timesteps):
                if i < start_step:
                    continue
                grad_step = grad_allowed and i in plan.grad_steps
                x = latents.detach() if (grad_step and plan.detach_input) else latents
                x_in = sched.scale_model_input(torch.cat([x, x]) if cfg else x, t)
                at_step = (store.at_step(i, host_t[i], cfg, (latent_side, latent_side), i in record_steps) if store is not None
                           else contextlib.nullcontext())
                merged = plain.applied() if plain is not None and not grad_step else contextlib.nullcontext()
                if kv is not None:
                    kv.active = not grad_step
                with torch.set_grad_enabled(grad_step), at_step, merged:
                    if split is not None and not grad_step and i not in record_steps:
                        out = split(lambda x_half, c_half: self.unet_forward(x_half, t, c_half), x_in, cond)
                    else:
                        out = self.unet_forward(x_in, t, cond, use_checkpoint=grad_step and self.config.gradient_checkpointing)
                if cfg:
                    uncond, text = out.chunk(2)
                    out = uncond + guidance_scale * (text - uncond)
                if plan.stop_at == i:
                    latents = self.predict_x0(sched, latents, out, host_t[i])
                    break
                in_graph = in_graph or grad_step
                with torch.set_grad_enabled(in_graph):
                    step_kwargs = {"eta": sampling.eta} if sampling.scheduler == "ddim" else {}
                    step_noise_i = noise[noise_row[i]] if i in noise_row else None
                    latents = sched.step(out, host_t[i], latents, variance_noise=step_noise_i, **step_kwargs).prev_sample
                if step_hook is not None:
                    replaced = step_hook(i, t, latents)
                    latents = latents if replaced is None else replaced
        finally:
            if store is not None:
                store.edits = ()
            fast.close()
        if not decode:
            images = None
        elif split is not None and not (torch.is_grad_enabled() and latents.requires_grad):
            images = split(self.decode_latents, latents)
        else:
            images = self.decode_latents(latents)
        attention = store.snapshot() if record_steps else None
        return SampleOutput(latents, images, attention, tuple(sorted(plan.grad_steps)))
