"""What only a CUDA device can show (``pytest -m gpu``; ``experiments/benchmarks/gpu_check.py`` runs these): the
experts follow the module onto the GPU, the LoRA export reproduces our sampler's images there, and an update under
bf16-mixed and under 16-mixed moves the weights the same way as fp32. Skipped where torch sees no CUDA device
(``T2I_ALIGN_GPU_TEST_DEVICE=cpu pytest -m gpu tests/test_gpu.py`` dry-runs them on the CPU)."""

import os

import lightning as L
import pytest
import torch

from t2i_align.diffusion.lora import export_trained_weights
from t2i_align.diffusion.sampling import SamplingSettings
from tests.diffusion.test_lora_export import (
    LORA_WEIGHT_NAME,
    PROMPTS,
    SAMPLING,
    SEEDS,
    adapted_modules,
    lora_generator,
    plain_pipeline,
)
from tests.experts.test_placement import no_spacy, tiny_blip  # noqa: F401  (fixtures)
from tests.training.test_requeue_toggles import captioner  # noqa: F401  (a fixture)

CUDA = torch.device(os.environ.get("T2I_ALIGN_GPU_TEST_DEVICE", "cuda"))
ACCELERATOR = "gpu" if CUDA.type == "cuda" else "cpu"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_experts_follow_the_module_onto_the_gpu(tiny_blip, no_spacy, monkeypatch, tmp_path):
    """Lightning moves the module to the rank's GPU; the module's hook moves its experts there too."""
    from t2i_align.experts.tagger import CaptionNounTagger
    from t2i_align.lightning_modules import base
    from tests.experts.test_placement import RecordingPart

    monkeypatch.setattr(base, "Generator", lambda config: torch.nn.Linear(1, 1))
    module = base.AlignmentModule(generator=None)
    module.experts = base.FrozenExperts(tagger=CaptionNounTagger(tiny_blip), recorder=RecordingPart())
    trainer = L.Trainer(accelerator=ACCELERATOR, devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.validate(module, torch.utils.data.DataLoader([{"prompts": ["a red circle"]}], batch_size=None),
                     verbose=False)
    assert module.experts["recorder"].moved_to[-1].type == CUDA.type
    assert {p.device.type for p in module.experts["tagger"].parameters()} == {CUDA.type}


def test_lora_export_reproduces_the_images_on_cuda(tiny_sd, tmp_path):
    gen = lora_generator(tiny_sd, ["to_q", "to_k", "to_v", "to_out.0"])
    gen.unet.to(CUDA)
    gen.vae.to(CUDA)
    gen.text_encoder.to(CUDA)
    path = export_trained_weights(gen, tmp_path / "lora")
    with torch.no_grad():
        ours = gen.sample(PROMPTS, SEEDS, SamplingSettings(scheduler="ddim", **SAMPLING)).images.float().cpu()
    from diffusers import DDIMScheduler

    pipe = plain_pipeline(tiny_sd).to(CUDA)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path.parent), weight_name=LORA_WEIGHT_NAME)
    assert adapted_modules(pipe.unet) == adapted_modules(gen.unet)
    with torch.no_grad():  # CPU generators, as our sampler draws its noise: the same starting latents
        theirs = pipe(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="pt",
                      **SAMPLING).images.float().cpu()
    torch.testing.assert_close(theirs, ours, atol=2e-3, rtol=0)  # GPU kernels: sums in another order


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_updates_follow_fp32(tiny_sd, tiny_pairs, tmp_path, precision):
    """Three Finetune updates under mixed precision: finite, and the weights move as under 32-true (cosine of the
    two updates > 0.9): the GradScaler's unscaling and the autocast are wired as Lightning expects."""
    from t2i_align.datamodules import T2IDataModule
    from t2i_align.datamodules.pairs import PairSource
    from t2i_align.diffusion.generator import GeneratorConfig, LoraSettings
    from t2i_align.lightning_modules.finetune import Finetune

    def update(precision: str) -> torch.Tensor:
        L.seed_everything(0)
        module = Finetune(generator=GeneratorConfig(pretrained=tiny_sd, lora=LoraSettings(rank=4)))
        before = torch.cat([p.detach().flatten().clone() for p in module.generator.trainable_parameters()])
        trainer = L.Trainer(accelerator=ACCELERATOR, devices=1, precision=precision, max_steps=3, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, default_root_dir=tmp_path / precision)
        trainer.fit(module, datamodule=T2IDataModule(train_pairs=PairSource(tiny_pairs), batch_size=2, resolution=32))
        after = torch.cat([p.detach().flatten().cpu() for p in module.generator.trainable_parameters()])
        assert module.nonfinite_total == 0
        return after - before.cpu()

    mixed, full = update(precision), update("32-true")
    assert mixed.abs().max() > 0
    assert torch.nn.functional.cosine_similarity(mixed, full, dim=0) > 0.9


def test_requeue_checkpoint_inside_comat_toggles_resumes_on_cuda(tiny_sd, captioner, tmp_path, monkeypatch):
    """tests/training/test_requeue_toggles.py's check on the GPU: a checkpoint saved inside CoMat's optimizer toggles
    and inside disable_adapters holds both networks and resumes to equal weights."""
    from tests.training import test_requeue_toggles as requeue

    def gpu_trainer(tmp_path, max_steps: int, callbacks=()) -> L.Trainer:
        return L.Trainer(max_steps=max_steps, accelerator=ACCELERATOR, devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
                         callbacks=list(callbacks))

    monkeypatch.setattr(requeue, "trainer", gpu_trainer)
    requeue.test_checkpoints_saved_inside_toggle_windows_hold_both_networks_and_resume(tiny_sd, captioner, tmp_path,
                                                                                      monkeypatch)
