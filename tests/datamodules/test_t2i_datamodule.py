"""T2IDataModule: loaders, batch formats, multi-rank streams, state round-trip, a real Trainer resume."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader

from t2i_align.datamodules import PairSource, PromptSource, ShardSampler, StreamSampler, T2IDataModule


@pytest.fixture
def prompt_files(tmp_path: Path) -> list[str]:
    paths = []
    for name, n in (("small", 5), ("big", 23)):
        path = tmp_path / f"{name}.txt"
        path.write_text("\n".join(f"{name} {i}" for i in range(n)), encoding="utf-8")
        paths.append(str(path))
    return paths


def make_dm(prompt_files, pairs: Path | None = None, **kw) -> T2IDataModule:
    kw.setdefault("batch_size", 2)
    kw.setdefault("resolution", 8)
    return T2IDataModule(
        train_prompts=[PromptSource(p) for p in prompt_files] if prompt_files else None,
        train_pairs=PairSource(str(pairs)) if pairs else None,
        **kw,
    )


def take(loader, steps: int, dm: T2IDataModule | None = None) -> list:
    """Batches of ``steps`` training steps; calls ``dm.advance()`` after each like the LightningModule."""
    it = iter(loader)
    out = []
    for _ in range(steps):
        batch = next(it)
        out.append(batch[0] if isinstance(loader, CombinedLoader) else batch)
        if dm is not None:
            dm.advance()
    return out


def ids(batches: list, key: str | None = None) -> list[str]:
    return [i for b in batches for i in (b[key] if key else b)["ids"]]


def test_prompts_only_without_trainer(prompt_files) -> None:
    dm = make_dm(prompt_files)
    dm.setup("fit")
    assert (dm.world_size, dm.rank) == (1, 0)
    combined = dm.train_dataloader()
    loader = combined.iterables["prompts"]  # the one shape: loaders (and batches) by name, also for one kind
    assert isinstance(combined, CombinedLoader) and set(combined.iterables) == {"prompts"}
    assert isinstance(loader, DataLoader) and isinstance(loader.sampler, StreamSampler)
    with pytest.raises(TypeError):
        len(loader)
    batch = take(combined, 1)[0]
    assert set(batch) == {"prompts"} and set(batch["prompts"]) == {"prompts", "ids", "sources"}
    assert len(batch["prompts"]["prompts"]) == 2
    assert loader.sampler.weights is not None  # two sources -> weighted mixing
    assert dm.val_dataloader() == []


def test_pairs_only_and_two_loader_dict_batch(prompt_files, make_pair_jsonl) -> None:
    pairs = make_pair_jsonl(3)
    dm = make_dm(None, pairs)
    batch = take(dm.train_dataloader(), 1)[0]  # setup() is called lazily
    assert set(batch) == {"pairs"}
    assert (
        batch["pairs"]["pixel_values"].shape == (2, 3, 8, 8)
        and len(batch["pairs"]["captions"]) == 2
        and len(batch["pairs"]["masks"]) == 2
    )
    both = make_dm(prompt_files, pairs)
    both.setup("fit")
    loader = both.train_dataloader()
    assert isinstance(loader, CombinedLoader) and loader._mode == "max_size_cycle"
    for batch in take(loader, 5, both):  # pair set (3) wraps around more often than the prompts: never ends
        assert set(batch) == {"prompts", "pairs"}
        assert len(batch["prompts"]["prompts"]) == 2 and batch["pairs"]["pixel_values"].shape == (2, 3, 8, 8)
    assert both.state_dict()["pairs"] == {"epoch": 3, "consumed": 1, "seed": 1, "n": 3}


def test_ranks_split_the_single_process_stream(prompt_files) -> None:
    single = make_dm(prompt_files, batch_size=6)
    single.setup("fit")
    expected = ids(take(single.train_dataloader(), 4, single), "prompts")
    per_rank = []
    dms = [make_dm(prompt_files, batch_size=2) for _ in range(3)]
    for r, dm in enumerate(dms):
        dm.setup("fit")
        dm.world_size, dm.rank = 3, r  # what setup() reads from trainer.world_size / global_rank
        per_rank.append(take(dm.train_dataloader(), 4, dm))
    got = [i for step in range(4) for r in range(3) for i in per_rank[r][step]["prompts"]["ids"]]
    sources = [s for step in range(4) for r in range(3) for s in per_rank[r][step]["prompts"]["sources"]]
    single_sources = [
        s for b in take(make_dm(prompt_files, batch_size=6).train_dataloader(), 4) for s in b["prompts"]["sources"]
    ]
    assert list(zip(got, sources, strict=True)) == list(zip(expected, single_sources, strict=True))
    assert dms[0].state_dict() == single.state_dict()


@pytest.mark.parametrize("when", ["before_setup", "after_loader"])
def test_state_dict_roundtrip_continues_the_stream(prompt_files, make_pair_jsonl, when: str) -> None:
    pairs = make_pair_jsonl(3)
    dm = make_dm(prompt_files, pairs, seed=7)
    loader = dm.train_dataloader()
    first = take(loader, 3, dm)
    state = dm.state_dict()
    reference = take(dm.train_dataloader(), 4)  # fresh loader from the saved position (nothing advanced)
    assert ids(reference[:1], "prompts") != ids(first[:1], "prompts") or ids(reference[:1], "pairs") != ids(
        first[:1], "pairs"
    )

    resumed = make_dm(prompt_files, pairs, seed=7)
    if when == "before_setup":  # as Lightning does: restore_datamodule runs before train_dataloader()
        resumed.load_state_dict(state)
        assert resumed.state_dict() == state
        loader = resumed.train_dataloader()
    else:
        loader = resumed.train_dataloader()
        resumed.load_state_dict(state)
    got = take(loader, 4)
    for key in ("prompts", "pairs"):
        assert ids(got, key) == ids(reference, key)
    assert torch.equal(got[0]["pairs"]["pixel_values"], reference[0]["pairs"]["pixel_values"])


def test_val_loaders(prompt_files, make_pair_jsonl) -> None:
    pairs = make_pair_jsonl(3)
    dm = T2IDataModule(
        val_prompts=[PromptSource(p) for p in prompt_files],
        val_pairs=PairSource(str(pairs)),
        batch_size=2,
        val_batch_size=4,
        resolution=8,
        val_limit=10,
    )
    dm.setup("validate")
    loaders = dm.val_dataloader()
    assert dm.val_loader_names == ["prompts", "pairs"] and isinstance(loaders, list)
    assert all(isinstance(dl.sampler, ShardSampler) for dl in loaders)
    prompt_batches = list(loaders[0])
    assert [len(b["prompts"]) for b in prompt_batches] == [4, 4, 2]  # val_limit=10 of 28, no padding in 1 process
    assert all(not b["padding"].any() for b in prompt_batches)
    assert ids(prompt_batches) == [str(i) for i in range(5)] + [str(i) for i in range(5)]
    assert [b["pixel_values"].shape[0] for b in loaders[1]] == [3]
    dm.world_size, dm.rank = 3, 2
    batches = list(dm.val_dataloader()[0])
    assert [len(b["prompts"]) for b in batches] == [4]  # indices 2, 5, 8 and a repeat of 1 (10 items, 4 per rank)
    assert batches[0]["padding"].tolist() == [False, False, False, True]
    only_pairs = T2IDataModule(val_pairs=PairSource(str(pairs)), resolution=8)
    assert isinstance(only_pairs.val_dataloader(), DataLoader)


def test_config_dicts_and_errors(prompt_files) -> None:
    dm = T2IDataModule(train_prompts=[{"path": prompt_files[0], "weight": 2.0}], batch_size=1)
    assert isinstance(dm.train_prompts[0], PromptSource)
    with pytest.raises(RuntimeError, match="before train_dataloader"):
        dm.advance()
    with pytest.raises(RuntimeError, match="no training data"):
        T2IDataModule().train_dataloader()
    with pytest.raises(ValueError, match="shuffle=False"):
        make_dm(prompt_files, shuffle=False)
    with pytest.raises(ValueError, match="batch sizes"):
        T2IDataModule(batch_size=0)


# ------------------------------------------------------------------------------------ real Trainer resume


class Recorder(L.LightningModule):
    """Records the prompt ids of every training step; advances the datamodule in ``hook``."""

    def __init__(self, hook: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.hook = hook
        self.seen: list[list[str]] = []
        self.val_batches = 0

    def training_step(self, batch, batch_idx):
        self.seen.append(list(batch["prompts"]["ids"]))
        return (self.weight**2).sum()

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self.hook == "on_train_batch_start":
            self.trainer.datamodule.advance()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.hook == "on_train_batch_end":
            self.trainer.datamodule.advance()

    def validation_step(self, batch, batch_idx):
        self.val_batches += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path: Path, prompt_file: str, hook: str, max_steps: int, ckpt: str | None = None) -> Recorder:
    model = Recorder(hook)
    dm = T2IDataModule(
        train_prompts=[PromptSource(prompt_file)],
        val_prompts=[PromptSource(prompt_file)],
        batch_size=3,
        val_batch_size=8,
        val_limit=8,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / hook, every_n_train_steps=2, save_top_k=-1)],
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    assert isinstance(trainer.train_dataloader["prompts"].sampler, StreamSampler)  # Lightning kept our sampler
    return model


@pytest.mark.parametrize("hook", ["on_train_batch_start", "on_train_batch_end"])
def test_trainer_checkpoint_resume(tmp_path: Path, prompt_files, hook: str) -> None:
    full = fit(tmp_path, prompt_files[1], hook, max_steps=4)
    assert len(full.seen) == 4 and full.val_batches == 2  # validation ran at steps 2 and 4
    ckpt = tmp_path / hook / "epoch=0-step=2.ckpt"
    saved = torch.load(ckpt, weights_only=False)["T2IDataModule"]
    resumed = fit(tmp_path / "resumed", prompt_files[1], hook, max_steps=4, ckpt=str(ckpt))
    if hook == "on_train_batch_start":
        assert saved["prompts"]["consumed"] == 6
        assert resumed.seen == full.seen[2:]  # exact continuation
    else:
        # Lightning runs ModelCheckpoint.on_train_batch_end before the module's hook: one batch behind.
        assert saved["prompts"]["consumed"] == 3
        assert resumed.seen == full.seen[1:3]


def test_texts_longer_than_the_text_encoder_reads_are_warned_once_per_set(tiny_sd, tmp_path, make_pair_jsonl):
    """Over-long captions are truncated by the tokenizer: one warning per set, with the count and the first."""
    import json
    import warnings
    from types import SimpleNamespace

    from t2i_align.diffusion.generator import Generator, GeneratorConfig

    pairs = make_pair_jsonl(3, with_masks=False)
    records = [json.loads(line) for line in pairs.read_text().splitlines()]
    records[1]["text"] = records[2]["text"] = " ".join(["red"] * 90)  # 90 words: > 77 tokens
    pairs.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\n" + " ".join(["blue"] * 80) + "\n")
    dm = T2IDataModule(train_pairs=PairSource(str(pairs)), val_prompts=[PromptSource(str(prompts))], resolution=8)
    trainer = SimpleNamespace(world_size=1, global_rank=0,
                              lightning_module=SimpleNamespace(generator=Generator(GeneratorConfig(pretrained=tiny_sd))))
    dm.trainer = trainer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
        dm.setup("validate")  # checked once per datamodule
    messages = [str(w.message) for w in caught if "text encoder" in str(w.message)]
    assert len(messages) == 2
    assert "2 of 3 texts are longer than the text encoder's 77 tokens" in messages[0]
    assert "metadata.jsonl: line 2" in messages[0] and "92 tokens" in messages[0]  # start + 90 words + end
    assert "1 of 2 texts" in messages[1] and "prompts.txt" in messages[1]
