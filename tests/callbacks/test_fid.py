"""FID on known feature distributions, and the on-disk reference statistics cache."""

import numpy as np
import pytest
import torch
from PIL import Image

from t2i_align.callbacks.fid import REAL_STATES, build_fid, reference_statistics, set_reference


class Flatten(torch.nn.Module):
    """A feature extractor for tests: the "image" is the feature vector (first channel, first row)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim, self.calls = dim, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x[:, 0, 0, : self.dim].double()


def as_images(features: torch.Tensor) -> torch.Tensor:
    return features.view(len(features), 1, 1, -1).expand(-1, 3, 1, -1).contiguous()


def test_fid_is_near_zero_for_one_distribution_and_grows_with_a_known_mean_shift():
    d, n = 8, 4000
    g = torch.Generator().manual_seed(0)
    real = torch.randn(n, d, generator=g, dtype=torch.float64)
    fid = build_fid(Flatten(d))
    fid.update(as_images(real), real=True)
    fid.update(as_images(torch.randn(n, d, generator=g, dtype=torch.float64)), real=False)
    assert float(fid.compute()) < 0.03  # two samples of N(0, I): only sampling noise
    direction = torch.ones(d, dtype=torch.float64) / d**0.5
    values = []
    for shift in (0.5, 1.0, 2.0):
        fid.reset()  # keeps the reference (reset_real_features=False)
        fid.update(as_images(real + shift * direction), real=False)
        values.append(float(fid.compute()))
        # same covariance, means exactly ``shift`` apart: FID = shift^2
        assert values[-1] == pytest.approx(shift**2, rel=1e-3)
    assert values == sorted(values)


def test_reference_statistics_are_cached_and_equal_a_fresh_computation(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "real"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    extractor = Flatten(16)
    fid = build_fid(extractor)
    computed = []
    kw = dict(extractor="flatten16", resolution=16, cache_dir=tmp_path / "cache", batch_size=5, on_compute=computed.append)
    first = reference_statistics(fid, folder, **kw)
    calls = extractor.calls
    second = reference_statistics(fid, folder, **kw)
    assert computed == [12] and extractor.calls == calls  # the second call read the cache
    assert all(torch.equal(first[k], second[k]) for k in REAL_STATES)
    assert int(first["real_features_num_samples"]) == 12
    assert int(fid.real_features_num_samples) == 0  # computing the reference leaves the metric as it was

    from t2i_align.callbacks.fid import image_files, load_images

    fresh = build_fid(Flatten(16))
    fresh.update(load_images(image_files(folder), 16), real=True)
    assert all(torch.allclose(first[k].double(), getattr(fresh, k).double()) for k in REAL_STATES)

    # a changed image set is a different key
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / "new.png")
    reference_statistics(fid, folder, **kw)
    assert computed == [12, 13]

    # only rank 0 holds the reference: the cross-rank sum in compute() counts it once
    set_reference(fid, first, holder=False)
    assert int(fid.real_features_num_samples) == 0 and float(fid.real_features_sum.abs().sum()) == 0
    set_reference(fid, first, holder=True)
    assert torch.equal(fid.real_features_sum.cpu(), first["real_features_sum"])


def test_missing_or_empty_reference_folder(tmp_path):
    fid = build_fid(Flatten(4))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        reference_statistics(fid, tmp_path / "nowhere", "x", 16, tmp_path)
    with pytest.raises(ValueError, match="holds no images"):
        reference_statistics(fid, tmp_path, "x", 16, tmp_path)
