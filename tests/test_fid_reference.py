"""``python -m t2i_align.commands.fid_reference``: FID reference statistics sharded over ranks, resumable, merged
into the file the FID callback reads (``reference_stats``)."""

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2i_align.callbacks.fid import REAL_STATES, STATS_FORMAT, build_fid, image_files, load_images
from t2i_align.commands.fid_reference import (
    FIDReferenceError,
    fid_reference,
    main,
    rank_split,
    shard_bounds,
    shard_path,
)


class IntFeatures(torch.nn.Module):
    """Integer-valued features (pixel values 0..255 of the first row): float64 sums are exact in any order, so
    shards must add up to the one-process statistics bit for bit."""

    tag = "int"

    def __init__(self, dim: int = 12) -> None:
        super().__init__()
        self.num_features, self.images = dim, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        return (x[:, 0, 0, : self.num_features] * 255).round().double()


@pytest.fixture
def folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "real"
    (root / "sub").mkdir(parents=True)
    for i in range(11):  # odd count, several sizes, one subfolder
        where = root / "sub" if i % 3 == 0 else root
        Image.fromarray(rng.integers(0, 256, (14 + i, 12 + 2 * i, 3), dtype=np.uint8)).save(where / f"{i:02d}.png")
    return root


def _stats(path: Path) -> dict:
    data = torch.load(path, weights_only=True)
    assert data["format"] == STATS_FORMAT
    return data


def test_two_shards_merge_to_exactly_the_one_process_statistics(folder, tmp_path):
    one = fid_reference(tmp_path / "one.pt", folder, resolution=12, feature=IntFeatures(), batch_size=3, rank=0,
                        world=1)
    assert one["out"] == tmp_path / "one.pt" and one["computed"]

    first = fid_reference(tmp_path / "two.pt", folder, resolution=12, feature=IntFeatures(), batch_size=3, rank=0,
                          world=2)
    assert first["out"] is None and first["missing"] == [1]  # rank 0 alone cannot merge
    assert not (tmp_path / "two.pt").exists()
    second = fid_reference(tmp_path / "two.pt", folder, resolution=12, feature=IntFeatures(), batch_size=3, rank=1,
                           world=2)
    assert second["out"] == tmp_path / "two.pt" and second["missing"] == []  # the last rank merges

    a, b = _stats(tmp_path / "one.pt"), _stats(tmp_path / "two.pt")
    for name in REAL_STATES:
        assert a["states"][name].dtype == b["states"][name].dtype
        assert torch.equal(a["states"][name], b["states"][name]), name
    assert a["states"]["real_features_sum"].dtype == torch.float64
    assert int(b["states"]["real_features_num_samples"]) == 11 and b["info"]["shards"] == 2
    assert b["info"]["extractor"] == "int12" and b["info"]["resolution"] == 12
    assert (tmp_path / "two.pt.json").is_file()

    # and they are the statistics of the images: n, sum of features, sum of outer products
    feats = IntFeatures()(load_images(image_files(folder), 12))
    assert torch.equal(a["states"]["real_features_sum"], feats.sum(0))
    assert torch.equal(a["states"]["real_features_cov_sum"], feats.T @ feats)


def test_a_finished_shard_is_skipped_and_a_killed_one_computed_again(folder, tmp_path):
    from t2i_align.io import _HOST

    out = tmp_path / "ref.pt"
    kw = {"resolution": 12, "batch_size": 4, "world": 2}
    extractor = IntFeatures()
    assert fid_reference(out, folder, feature=extractor, rank=0, **kw)["computed"]
    share0 = shard_bounds(11, 0, 2)
    assert extractor.images == share0[1] - share0[0] == 5

    # rank 1 was killed: a torn copy of its shard under the final name, and its writer's temporary left behind
    shard1 = shard_path(out, 1, 2)
    shard1.write_bytes(b"PK\x03\x04 torn")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = shard1.parent / f".{shard1.name}.{_HOST}.{dead.pid}.abc123.tmp"
    stale.mkdir()
    (stale / shard1.name).write_bytes(b"partial")

    again = fid_reference(out, folder, feature=extractor, rank=0, **kw)  # rank 0 rerun: nothing to do
    assert not again["computed"] and again["missing"] == [1] and extractor.images == 5
    redo = fid_reference(out, folder, feature=extractor, rank=1, **kw)
    assert redo["computed"] and redo["out"] == out and extractor.images == 11  # only rank 1's 6 images
    assert not stale.exists()  # the dead writer's temporary was removed

    one = fid_reference(tmp_path / "one.pt", folder, feature=IntFeatures(), rank=0, resolution=12, world=1)
    for name in REAL_STATES:
        assert torch.equal(_stats(out)["states"][name], _stats(one["out"])["states"][name])

    # the whole command again: done already, nothing computed
    assert not fid_reference(out, folder, feature=extractor, rank=1, **kw)["computed"] and extractor.images == 11

    # a changed image set: the stale shard is computed again, and the old merged file is not overwritten silently
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(folder / "new.png")
    with pytest.raises(FIDReferenceError, match="holds statistics of other settings or another image set"):
        fid_reference(out, folder, feature=extractor, rank=0, **kw)


def test_rank_split_from_torchrun_or_srun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID",
                 "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert rank_split() == (0, 1, None)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "16")  # the batch script's allocation, not this process's step: ignored
    assert rank_split() == (0, 1, None)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert rank_split() == (3, 8, 3)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank_split() == (1, 2, None)  # torchrun's variables first
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(FIDReferenceError, match=r"RANK=2 must be in \[0, WORLD_SIZE=2\)"):
        rank_split()
    assert [shard_bounds(5, r, 3) for r in range(3)] == [(0, 1), (1, 3), (3, 5)]
    assert [shard_bounds(1, r, 3) for r in range(3)] == [(0, 0), (0, 0), (0, 1)]  # more ranks than images


def test_command_line_with_an_image_list_and_a_feature_class_path(folder, tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    files = image_files(folder)
    listing = tmp_path / "list.txt"  # relative paths, unsorted, a comment
    listing.write_text("# reference images\n" + "".join(f"{p.relative_to(tmp_path)}\n" for p in reversed(files)))
    feature = ["--feature", "tests.test_fid_reference.IntFeatures", "--feature-args", '{"dim": 12}']
    by_list = main([str(tmp_path / "list.pt"), "--images", str(listing), "--resolution", "12", *feature])
    by_dir = main([str(tmp_path / "dir.pt"), "--images", str(folder), "--resolution", "12", *feature])
    for name in REAL_STATES:
        assert torch.equal(_stats(by_list["out"])["states"][name], _stats(by_dir["out"])["states"][name])

    # shards written by two ranks, merged afterwards by a third command that computes nothing
    for rank in (0, 1):
        fid_reference(tmp_path / "m.pt", folder, resolution=12, feature=IntFeatures(), rank=rank, world=2)
    (tmp_path / "m.pt").unlink()
    merged = main([str(tmp_path / "m.pt"), "--images", str(folder), "--resolution", "12", *feature, "--merge-only",
                   "--world-size", "2"])
    assert merged["out"] == tmp_path / "m.pt" and merged["shard"] is None and not merged["computed"]
    for name in REAL_STATES:
        assert torch.equal(_stats(merged["out"])["states"][name], _stats(by_dir["out"])["states"][name])

    limited = main([str(tmp_path / "four.pt"), "--images", str(folder), "--resolution", "12", "--limit", "4", *feature])
    assert int(_stats(limited["out"])["states"]["real_features_num_samples"]) == 4

    # the merged file loads into the metric the callback builds
    from t2i_align.callbacks.fid import load_reference_stats, set_reference

    states, info = load_reference_stats(by_dir["out"], "int12", 12)
    assert info["images"] == 11 and info["shards"] == 1
    metric = build_fid(IntFeatures())
    set_reference(metric, states, holder=True)
    assert int(metric.real_features_num_samples) == 11

    listing.write_text("real/missing.png\n")
    with pytest.raises(FileNotFoundError, match=r"line 1: .*missing\.png: no such file"):
        main([str(tmp_path / "x.pt"), "--images", str(listing)])


def test_inception_without_weights_names_the_option_and_downloads_nothing(folder, tmp_path, monkeypatch):
    from t2i_align.callbacks.fid import InceptionWeightsError, inception_url

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    with pytest.raises(InceptionWeightsError, match="--weights is not set") as info:
        main([str(tmp_path / "x.pt"), "--images", str(folder)])
    assert inception_url() in str(info.value) and attempts == []

    import sys  # as a command: one line naming the option, no traceback

    monkeypatch.setattr(sys, "argv", ["fid_reference", str(tmp_path / "x.pt"), "--images", str(folder),
                                      "--weights", str(tmp_path / "nowhere.pth")])
    with pytest.raises(SystemExit, match=r"fid_reference: error: --weights is .*nowhere\.pth: no such file"):
        main()
    assert attempts == []
