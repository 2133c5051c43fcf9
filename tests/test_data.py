"""The default data set and the in-memory batch path."""

import gzip
import shutil

import pytest
import torch

from delving.data import InMemoryBatches, batch_flip, batch_translate, channel_stats, load_fashion_mnist
from delving.data import fashion_mnist as fm


def test_fashion_mnist_is_real_and_complete():
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
    assert xt.shape == (10000, 1, 28, 28) and yt.shape == (10000,)
    assert torch.bincount(y).tolist() == [6000] * 10 and torch.bincount(yt).tolist() == [1000] * 10
    mean, std = channel_stats(x)
    assert abs(mean.item() - 0.2860) < 1e-3 and abs(std.item() - 0.3530) < 1e-3  # published stats


def test_truncated_file_fails_its_checksum_with_how_to_fetch(tmp_path, monkeypatch):
    source, _ = fm.locate()
    cache = tmp_path / "fashion-mnist"
    cache.mkdir()
    for stem in fm.FILES:
        shutil.copy(fm._find(source, stem), cache)
    with gzip.open(cache / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(fm._read(fm._find(source, "t10k-labels-idx1-ubyte"))[:5000])
    monkeypatch.setenv("DELVING_DATA", str(tmp_path))
    with pytest.raises(fm.DatasetError, match="(?s)t10k-labels.*fails its checksum.*apt-get install dataset-fashion-mnist"):
        fm.locate()


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DELVING_DATA", str(tmp_path))
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "none")
    with pytest.raises(fm.DatasetError, match="(?s)not found.*make data"):
        fm.locate()


def _reference_translate(images, max_shift, dy, dx):
    """Per-sample pad-and-crop, the way a torchvision RandomCrop(padding=...) would do it."""
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    h, w = images.shape[-2:]
    return torch.stack([p[:, a:a + h, b:b + w] for p, a, b in zip(padded, dy.tolist(), dx.tolist())])


def test_batch_translate_equals_per_sample_pad_and_crop():
    images = torch.randn(16, 3, 9, 7)
    g = torch.Generator().manual_seed(5)
    out = batch_translate(images, 2, g)
    g = torch.Generator().manual_seed(5)
    dy = torch.randint(0, 5, (16,), generator=g)
    dx = torch.randint(0, 5, (16,), generator=g)
    assert torch.equal(out, _reference_translate(images, 2, dy, dx))


def test_batch_flip_mirrors_about_half():
    images = torch.randn(1000, 1, 4, 4)
    out = batch_flip(images, torch.Generator().manual_seed(0))
    flipped = (out == images.flip(-1)).flatten(1).all(1)
    same = (out == images).flatten(1).all(1)
    assert bool((flipped | same).all()) and 400 < int(flipped.sum()) < 600


def _loader(**kw):
    x, y = load_fashion_mnist("test")
    return InMemoryBatches(x[:1000], y[:1000], batch_size=64, mean=torch.tensor([0.286]), std=torch.tensor([0.353]),
                           seed=7, **kw)


def test_epoch_order_is_a_seeded_permutation_and_resumable():
    loader = _loader(shuffle=True, augment=True)
    first = list(loader.epoch(3))
    assert len(first) == len(loader) == 16 and sum(len(b[1]) for b in first) == 1000
    again = list(loader.epoch(3, start=5))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first[5:], again))
    other = next(iter(loader.epoch(4)))
    assert not torch.equal(first[0][1], other[1]), "each epoch draws a new order"


def test_normalisation_without_augmentation_is_exact():
    loader = _loader(shuffle=False, augment=False, channels_last=True)
    x, y = next(iter(loader.epoch(0)))
    raw, labels = load_fashion_mnist("test")
    assert torch.allclose(x, (raw[:64].float() / 255 - 0.286) / 0.353)
    assert torch.equal(y, labels[:64]) and x.is_contiguous(memory_format=torch.channels_last)
