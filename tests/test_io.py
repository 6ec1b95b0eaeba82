"""Atomic writes: complete under the final name or absent; usual permissions; no temporaries left."""

import os
import stat

import pytest
import torch

from t2i_align.io import AtomicCheckpointIO, atomic_path


def test_failed_write_leaves_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.ckpt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


def test_folder_is_replaced_whole_with_usual_permissions(tmp_path):
    target = tmp_path / "lora"
    target.mkdir()
    (target / "stale.txt").write_text("x")
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "weights.bin").write_bytes(b"1")
        os.chmod(tmp / "weights.bin", 0o600)
    assert [p.name for p in target.iterdir()] == ["weights.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((target / "weights.bin").stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


def test_checkpoint_io_round_trip(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, tmp_path / "a.ckpt")
    loaded = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert loaded["global_step"] == 3 and torch.equal(loaded["state_dict"]["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt"]
