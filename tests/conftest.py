"""Shared fixtures: the tiny SD pipeline saved to a temporary folder (loaded back like a real model)."""

import os

# No test may reach the network: make huggingface_hub fail fast instead of retrying connections.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from t2i_align.diffusion.tiny import save_tiny_pipeline, save_tiny_sdxl_pipeline  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[1].parent / "shared" / "benchmarks"


@pytest.fixture(scope="session")
def benchmarks() -> Path:
    """The read-only benchmark folder (../shared/benchmarks from the repo root); skip when absent."""
    if not BENCHMARKS.is_dir():
        pytest.skip(f"benchmark files not available at {BENCHMARKS}")
    return BENCHMARKS


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> str:
    """Folder of a tiny epsilon-prediction SD pipeline (random weights, seed 0)."""
    return str(save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd")))


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> str:
    """Folder of a tiny v-prediction SD pipeline (as SD 2.x 768)."""
    return str(save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd_v"), prediction_type="v_prediction"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> str:
    """Folder of a tiny SDXL pipeline (two text encoders, text_time conditioning, transformer blocks of depth 1 and
    2; random weights, seed 0), loaded back like stabilityai/stable-diffusion-xl-base-1.0."""
    return str(save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny_sdxl")))


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory) -> str:
    """A 16-pair synthetic set in TokenCompose's metadata.jsonl layout, 32 px."""
    from t2i_align.datamodules.synthetic import write_shape_pairs

    return str(write_shape_pairs(tmp_path_factory.mktemp("pairs"), count=16, size=32))


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> str:
    """Folder of a tiny random GPT-2 causal LM with the tiny CLIP tokenizer (a judge's LM, loaded back like a real one)."""
    import torch
    from transformers import CLIPTokenizer, GPT2Config, GPT2LMHeadModel

    from t2i_align.diffusion.tiny import TINY_TOKENIZER_DIR

    folder = tmp_path_factory.mktemp("lm")
    tokenizer = CLIPTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
