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


# ------------------------------------------------------------------------ Inception weights: never downloaded
class IntFeatures(torch.nn.Module):
    """Integer-valued features (pixel values 0..255 of the first row), so float64 sums are exact in any order."""

    tag = "int"

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.num_features, self.calls = dim, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (x[:, 0, 0, : self.num_features] * 255).round().double()


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Every way torch (and torch-fidelity, faked below) could download raises and is recorded; torch's hub cache
    is an empty folder; torch-fidelity is "installed" as a stand-in that, like the real one
    (FeatureExtractorInceptionV3.__init__), downloads with ``torch.hub.load_state_dict_from_url`` when given no
    weights path and else ``torch.load``s the path."""
    import urllib.request

    import torchmetrics.image.fid as tm_fid

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network is unreachable")  # what a compute node without internet gives

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    loaded = []

    class FakeInception(torch.nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__()
            if feature_extractor_weights_path is None:
                torch.hub.load_state_dict_from_url("https://example.invalid/weights.pth")
            else:
                torch.load(feature_extractor_weights_path, weights_only=True)
            loaded.append(feature_extractor_weights_path)

    monkeypatch.setattr(tm_fid, "_TORCH_FIDELITY_AVAILABLE", True)
    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", FakeInception)
    return attempts, loaded


def test_without_local_inception_weights_the_callback_names_the_option_and_downloads_nothing(no_network, tmp_path):
    from t2i_align.callbacks.fid import FIDEvaluation, InceptionWeightsError, inception_url
    from t2i_align.common import UserError

    attempts, loaded = no_network
    with pytest.raises(InceptionWeightsError) as info:
        FIDEvaluation(reference_dir=str(tmp_path), feature=2048)
    message = str(info.value)
    assert isinstance(info.value, UserError)  # t2i-align prints it as one line, no traceback
    assert "init_args.weights_path" in message and inception_url() in message and "curl" in message
    assert inception_url().startswith("https://") and inception_url().endswith(".pth")
    assert attempts == [] and loaded == []  # nothing was even tried

    # a weights_path that is not there: the same error, naming the value
    missing = r"init_args.weights_path of the FIDEvaluation callback is .*nowhere\.pth: no such file"
    with pytest.raises(InceptionWeightsError, match=missing):
        FIDEvaluation(reference_dir=str(tmp_path), feature=2048, weights_path=str(tmp_path / "nowhere.pth"))
    assert attempts == []


def test_a_weights_path_or_the_hub_cache_copy_is_loaded_without_download(no_network, tmp_path):
    from t2i_align.callbacks.fid import FIDEvaluation, cached_inception_weights

    attempts, loaded = no_network
    weights = tmp_path / "weights-inception.pth"
    torch.save({}, weights)
    fid = FIDEvaluation(reference_dir=str(tmp_path), feature=2048, weights_path=str(weights))
    assert loaded == [str(weights)] and attempts == []
    assert fid.extractor == "inception2048" and fid.metric.real_features_sum.numel() == 2048

    cached = cached_inception_weights()  # where torch.hub keeps torch-fidelity's own download
    assert cached.parent == tmp_path / "hub" / "checkpoints"
    cached.parent.mkdir(parents=True)
    torch.save({}, cached)
    FIDEvaluation(reference_dir=str(tmp_path), feature=2048)
    assert loaded[-1] == str(cached) and attempts == []


# ------------------------------------------------------------------------ padded rows, reference statistics file
def test_padded_rows_are_left_out_of_the_generated_statistics(tmp_path):
    from types import SimpleNamespace

    from t2i_align.callbacks.fid import FIDEvaluation

    fid = FIDEvaluation(reference_dir=str(tmp_path), feature=IntFeatures(4))
    feats = torch.arange(20, dtype=torch.float64).view(5, 4)
    images = as_images(feats / 255)
    padding = torch.tensor([False, False, True, False, True])

    fid.update(images, {"padding": padding}, None)  # a batch dict that marks its padding
    assert int(fid.metric.fake_features_num_samples) == 3
    assert torch.equal(fid.metric.fake_features_sum, feats[~padding].sum(0))
    assert torch.equal(fid.metric.fake_features_cov_sum, feats[~padding].T @ feats[~padding])

    fid.metric.reset()
    items = [SimpleNamespace(key=str(i), padding=bool(p)) for i, p in enumerate(padding)]  # items that say so
    fid.update(images, items, None)
    assert int(fid.metric.fake_features_num_samples) == 3
    fid.update(images[:2], [SimpleNamespace(key="a", padding=True)] * 2, None)  # a batch of padding only
    assert int(fid.metric.fake_features_num_samples) == 3

    fid.metric.reset()
    fid.update(images, [SimpleNamespace(key=str(i)) for i in range(5)], None)  # no padding marked: all count
    assert int(fid.metric.fake_features_num_samples) == 5


def _fake_trainer(rank0: bool = True):
    from types import SimpleNamespace

    barriers = []
    strategy = SimpleNamespace(barrier=lambda *a: barriers.append(a), root_device=torch.device("cpu"))
    trainer = SimpleNamespace(is_global_zero=rank0, global_rank=0 if rank0 else 1, world_size=2, strategy=strategy)
    return trainer, SimpleNamespace(device=torch.device("cpu"), trainer=trainer), barriers


def test_reference_stats_file_gives_the_fid_of_the_real_images_without_a_barrier(tmp_path):
    from t2i_align.callbacks.fid import FIDError, FIDEvaluation, FIDFileError
    from t2i_align.commands.fid_reference import fid_reference

    rng = np.random.default_rng(1)
    folder = tmp_path / "real"
    folder.mkdir()
    for i in range(9):
        Image.fromarray(rng.integers(0, 256, (20, 18 + i, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    stats = tmp_path / "ref.pt"
    for rank in (0, 1):
        fid_reference(stats, folder, resolution=16, feature=IntFeatures(16), batch_size=4, rank=rank, world=2)
    assert stats.is_file()

    fake = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(6)))
    values = {}
    sources = {"dir": {"reference_dir": str(folder), "reference_resolution": 16, "cache_dir": str(tmp_path / "c")},
               "stats": {"reference_stats": str(stats)}}
    for kind, kw in sources.items():
        fid = FIDEvaluation(feature=IntFeatures(16), prompts=[{"path": str(prompts)}], **kw)
        trainer, module, barriers = _fake_trainer()
        fid.setup(trainer, module, "validate")
        fid.reset(module)
        fid.update(fake, [None] * 6, module)
        values[kind] = fid.compute(trainer, module)
        assert barriers == ([()] if kind == "dir" else [])  # the statistics file needs no rank to wait
        assert fid.settings()[f"reference_{kind}"] == kw[f"reference_{kind}"]
    assert values["stats"] == values["dir"]  # the same number, exactly
    assert set(values["stats"]) == {"fid6_int16"}

    # every rank but 0 holds zeros (the states are summed over ranks in compute)
    other = FIDEvaluation(feature=IntFeatures(16), reference_stats=str(stats))
    trainer, module, barriers = _fake_trainer(rank0=False)
    other.setup(trainer, module, "fit")
    assert int(other.metric.real_features_num_samples) == 0 and barriers == []

    # a file of other features, a missing file, or both sources: refused at construction, naming the key
    key = r"\(init_args.reference_stats of the FIDEvaluation callback\)"
    other_features = rf"ref\.pt {key} holds statistics of 'int16' features, but the callback uses 'flatten16'"
    with pytest.raises(FIDError, match=other_features):
        FIDEvaluation(feature=Flatten(16), extractor_name="flatten16", reference_stats=str(stats))
    with pytest.raises(FIDFileError, match=rf"nowhere\.pt {key}: no such file; write it with"):
        FIDEvaluation(feature=IntFeatures(16), reference_stats=str(tmp_path / "nowhere.pt"))
    with pytest.raises(FIDError, match="exactly one of reference_stats"):
        FIDEvaluation(feature=IntFeatures(16), reference_stats=str(stats), reference_dir=str(folder))
