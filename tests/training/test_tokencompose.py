"""TokenCompose on tiny models: nouns to token positions (repeated and multi-token nouns, missing masks), the
grounding losses on hand-made maps, a batch equal to the mean of its single samples through a real UNet forward,
and training that pulls the nouns' attention into their masks where the denoising loss alone does not. The CLI,
resume, export and DDP are the contract test's (tests/training/test_method_contract.py)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from t2i_align.diffusion import attention_losses as al
from t2i_align.diffusion.attention import AttentionStore
from t2i_align.diffusion.generator import GeneratorConfig, LoraSettings
from t2i_align.lightning_modules.tokencompose import TokenCompose, grounding_losses, noun_groundings


@pytest.fixture(scope="module")
def tokenizer(tiny_sd):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")


def test_nouns_map_to_their_tokens_by_occurrence(tokenizer):
    mask = torch.ones(4, 4, dtype=torch.bool)
    caption = "a red circle and a blue circle beside chocolate spread"
    groups = noun_groundings(caption, [("circle", mask), ("circle", mask), ("chocolate spread", mask)], tokenizer)
    first, second, spread = (g.positions for g in groups)
    assert len(first) == len(second) == 1 and second[0] > first[0]  # the second "circle", not the first again
    assert len(spread) == len(tokenizer.tokenize("chocolate spread")) >= 2 and spread[0] > second[0]
    # a noun without a mask is skipped but still takes its occurrence
    [only] = noun_groundings(caption, [("circle", None), ("circle", mask)], tokenizer)
    assert only.positions == second
    with pytest.raises(ValueError, match="pair 000042: .*'square'"):
        noun_groundings(caption, [("square", mask)], tokenizer, where="000042")


def store_of(maps: dict[str, torch.Tensor]) -> AttentionStore:
    store = AttentionStore()
    store.maps = {(0, name): m for name, m in maps.items()}
    return store


def test_grounding_losses_on_hand_made_maps():
    """Token 1 is the noun; its mask is the left column. At 4x4, one layer puts all of the noun's attention inside
    the mask and one spreads it uniformly: L_token sums their token losses, L_pixel takes the BCE of their mean
    map. At 2x2 (one layer) all of it is inside."""
    left4 = torch.zeros(4, 4)
    left4[:, 0] = 1
    inside, uniform = torch.zeros(1, 4, 4, 3), torch.zeros(1, 4, 4, 3)
    inside[0, :, 0, 1] = 1 / 4
    uniform[0, :, :, 1] = 1 / 16
    small = torch.zeros(1, 2, 2, 3)
    small[0, :, 0, 1] = 0.5
    store = store_of({"up.a": inside, "up.b": uniform, "mid": small})
    groups = [[al.Grounding((1,), left4.bool())]]  # the mask is resized to each resolution (left column at 2x2)
    token, pixel = grounding_losses(store, groups)
    assert token.shape == (1,)
    # 0 (inside) + (1 - 1/4)^2 (uniform); the mean map (5/8 inside) would give (1 - 5/8)^2; the 2x2 map adds 0
    assert float(token) == pytest.approx(0 + (1 - 1 / 4) ** 2)
    bce4 = 0.25 * -math.log(5 / 32) + 0.75 * -math.log(1 - 1 / 32)  # mean map: 5/32 inside, 1/32 outside
    bce2 = 0.5 * -math.log(0.5) + 0.5 * -math.log(1 - 1e-6)
    assert float(pixel) == pytest.approx(bce4 + bce2, rel=1e-5)
    token2, pixel2 = grounding_losses(store, groups, resolutions=[2])
    assert float(token2) == pytest.approx(0, abs=1e-7) and float(pixel2) == pytest.approx(bce2, rel=1e-5)
    with pytest.raises(ValueError, match="recorded: \\[2, 4\\]"):
        grounding_losses(store, groups, resolutions=[8])
    # an empty mask is skipped: that sample's terms are 0
    token0, pixel0 = grounding_losses(store, [[al.Grounding((1,), torch.zeros(4, 4, dtype=torch.bool))]])
    assert float(token0) == 0 and float(pixel0) == 0


def test_token_loss_sums_the_layers_and_pixel_loss_takes_their_mean_map():
    """TokenCompose's code (train/src/loss_utils.py, get_grounding_loss_by_layer) and Eq. 7: per resolution, one
    token loss per layer, summed; one pixel loss of the layers' mean map. Three layers at 8x8, two at 4x4."""
    g = torch.Generator().manual_seed(0)
    layers = {f"up.{r}.{i}": torch.randn(2, r, r, 77, generator=g).mul(3).softmax(-1)
              for r, n in ((8, 3), (4, 2)) for i in range(n)}
    masks = [torch.zeros(16, 16, dtype=torch.bool) for _ in range(3)]  # blocks: still partial at 4x4
    masks[0][:8, :8], masks[1][:, 12:], masks[2][13:] = True, True, True
    groups = [[al.Grounding((2,), masks[0]), al.Grounding((4, 5), masks[1])], [al.Grounding((3,), masks[2])]]
    token, pixel = grounding_losses(store_of(layers), groups)
    by_res = {r: [m for name, m in layers.items() if name.startswith(f"up.{r}.")] for r in (8, 4)}
    expected_token = sum(al.token_loss(m, groups) for maps in by_res.values() for m in maps)
    expected_pixel = sum(al.pixel_loss(torch.stack(maps).mean(0), groups) for maps in by_res.values())
    torch.testing.assert_close(token, expected_token)
    torch.testing.assert_close(pixel, expected_pixel)
    of_mean = sum(al.token_loss(torch.stack(maps).mean(0), groups) for maps in by_res.values())
    assert (token - of_mean).abs().min() > 1e-3  # not the token loss of the mean map


def test_a_batch_gives_each_sample_its_own_loss_through_the_unet(tiny_sd, tokenizer):
    torch.manual_seed(0)
    module = TokenCompose(generator=GeneratorConfig(tiny_sd, lora=LoraSettings(rank=4)))
    gen = module.generator
    gen.enable_attention_capture(module.layers)
    captions = ["a red circle and a blue square", "a green square"]
    masks = [torch.zeros(32, 32, dtype=torch.bool) for _ in range(3)]
    masks[0][:, :16], masks[1][:, 16:], masks[2][8:24, 8:24] = True, True, True
    groups = [noun_groundings(captions[0], [("circle", masks[0]), ("square", masks[1])], tokenizer),
              noun_groundings(captions[1], [("square", masks[2])], tokenizer)]
    side = 32 // gen.vae_scale_factor
    latents = torch.randn(2, 4, side, side)
    t = torch.tensor([100, 700])

    def losses(index):
        store = gen.attention_store
        store.clear()
        with store.record(0, False, (side, side)):
            gen.unet_forward(latents[index], t[index], gen.encode_prompts([captions[i] for i in index]))
        return grounding_losses(store, [groups[i] for i in index])

    token, pixel = losses([0, 1])
    singles = [losses([i]) for i in (0, 1)]
    torch.testing.assert_close(token, torch.cat([s[0] for s in singles]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pixel, torch.cat([s[1] for s in singles]), atol=1e-6, rtol=1e-5)
    assert float(token.min()) > 0  # not vacuous: both samples have a term
    (token.mean() + pixel.mean()).backward()  # the loss of the batch: the mean of its samples' losses
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in gen.trainable_parameters())


def fit(tiny_sd, tiny_pairs, tmp_path, steps: int, **weights) -> TokenCompose:
    from t2i_align.datamodules import T2IDataModule
    from t2i_align.datamodules.pairs import PairSource

    torch.manual_seed(0)
    module = TokenCompose(generator=GeneratorConfig(tiny_sd, lora=LoraSettings(rank=8)),
                          optimizer=lambda params: torch.optim.Adam(params, lr=3e-3), **weights)
    if steps == 0:
        return module
    data = T2IDataModule(train_pairs=PairSource(tiny_pairs), batch_size=4, resolution=32)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    return module


def held_out_token_loss(module: TokenCompose, tiny_pairs: str) -> float:
    """L_token of the first 8 pairs at fixed noise and timesteps."""
    from t2i_align.datamodules.pairs import PairDataset, PairSource, collate_pairs

    data = PairDataset.from_source(PairSource(tiny_pairs, limit=8), resolution=32)
    batch = collate_pairs([data[i] for i in range(len(data))])
    gen = module.generator
    gen.enable_attention_capture(module.layers)
    with torch.no_grad():
        out = gen.denoising_forward(batch["pixel_values"], batch["captions"], torch.Generator().manual_seed(5),
                                    record_attention=True)
    groups = [noun_groundings(c, m, gen.tokenizer) for c, m in zip(batch["captions"], batch["masks"])]
    return float(grounding_losses(out.attention, groups)[0].mean())


def test_training_pulls_the_nouns_attention_into_their_masks(tiny_sd, tiny_pairs, tmp_path):
    start = held_out_token_loss(fit(tiny_sd, tiny_pairs, tmp_path / "none", 0), tiny_pairs)
    grounded = held_out_token_loss(fit(tiny_sd, tiny_pairs, tmp_path / "tc", 30, token_weight=1.0,
                                       pixel_weight=0.05), tiny_pairs)
    plain = held_out_token_loss(fit(tiny_sd, tiny_pairs, tmp_path / "ldm", 30, token_weight=0.0,
                                    pixel_weight=0.0), tiny_pairs)
    assert grounded < 0.7 * start and grounded < 0.7 * plain, (start, grounded, plain)


@pytest.mark.parametrize("dropout", [0.0, 0.99])
def test_a_dropped_caption_is_learned_unconditioned_and_not_grounded(tiny_sd, dropout):
    module = TokenCompose(generator=GeneratorConfig(tiny_sd, lora=LoraSettings(rank=4)), caption_dropout=dropout)
    module.finish_step = lambda loss, logs, batch_size: logs  # the step's logs, without a trainer
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[:, :16] = True
    batch = {"pairs": {"pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1, "captions": ["a red circle", "a blue square"],
                       "ids": ["0", "1"], "masks": [[("circle", mask)], [("square", mask)]]}}
    logs = module.training_step(batch, 0)
    assert float(logs["train/ldm"]) > 0
    # both captions dropped (at 0.99): no noun to ground, so no grounding loss (padding tokens are not a noun)
    assert (float(logs["train/token"]) == 0) == (dropout > 0)


def test_pairs_without_masks_are_refused(tiny_sd):
    module = TokenCompose(generator=GeneratorConfig(tiny_sd))
    batch = {"pairs": {"pixel_values": torch.zeros(1, 3, 32, 32), "captions": ["a circle"], "ids": ["0"], "masks": None}}
    with pytest.raises(ValueError, match="attn_list"):
        module.training_step(batch, 0)


def test_toyworld_overlay_trains_from_the_cli_at_batch_4(tmp_path):
    """The ToyWorld experiment stack (committed pipeline, natural pairs with their rendered per-noun masks) trains
    at batch 4 and logs both grounding losses; a small ToyWorld build stands in for .cache/toyworld."""
    import csv
    import subprocess
    import sys
    from pathlib import Path

    from t2i_align.cli import main as cli_main
    from tests.helpers import REPO_ROOT

    world = tmp_path / "world"
    subprocess.run([sys.executable, "-m", "t2i_align.commands.toyworld_build", str(world), "--natural", "16", "--natural-val", "4",
                    "--train-prompts", "4", "--eval-per-category", "1", "--val-per-category", "1"], check=True,
                   cwd=REPO_ROOT)
    configs = Path(REPO_ROOT) / "configs"
    cli_main(["fit", "--config", str(configs / "method/tokencompose.yaml"),
              "--config", str(configs / "experiment/toyworld.yaml"),
              "--config", str(configs / "experiment/toyworld_tokencompose.yaml"),
              f"--data.init_args.train_pairs.path={world}/natural/metadata.jsonl",
              f"--data.init_args.val_pairs.path={world}/natural_val/metadata.jsonl",
              "--data.init_args.batch_size=4", "--trainer.max_steps=2", "--trainer.callbacks=[]",
              f"--trainer.default_root_dir={tmp_path}/run", f"--trainer.logger.init_args.save_dir={tmp_path}/run",
              "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=2"])
    [metrics] = list((tmp_path / "run").rglob("metrics.csv"))
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("train/token")]
    assert len(rows) == 2 and all(float(r["train/token"]) > 0 and float(r["train/pixel"]) > 0 for r in rows)
