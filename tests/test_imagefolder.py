"""The ImageNet-style image-folder path: augmentation, 10-view testing, broken files, bad layouts.

Everything runs on a tiny folder of JPEGs written to tmp_path, at shrunken sizes (shorter side
40-60 instead of 256-512, 32x32 crops instead of 224x224)."""

import math
import re
import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from delving.data import imagefolder as imf
from delving.data import (EvalTransform, PCALighting, TrainTransform, UnreadableImageWarning, eval_loader,
                          evaluate_center_crop, evaluate_ten_view, imagefolder_datasets, load_or_compute_mean,
                          scan, train_loader)

CLASSES = ("cat", "dog", "fox")
SMALL = dict(crop=32, scale_range=(40, 60), eval_resize=40)
ZERO = (0.0, 0.0, 0.0)


def random_image(rng, w=64, h=52):
    """Smooth colour noise plus a gradient (compresses like a photo, unlike white noise)."""
    low = rng.random((h // 8 + 1, w // 8 + 1, 3))
    big = np.kron(low, np.ones((8, 8, 1)))[:h, :w]
    ramp = np.linspace(0, 1, w)[None, :, None]
    return Image.fromarray((255 * (0.7 * big + 0.3 * ramp)).astype(np.uint8))


def make_folder(root, classes=CLASSES, per_class=6, splits=("train", "val"), seed=0, size=(64, 52)):
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class if split == "train" else 2):
                random_image(rng, *size).save(d / f"{c}_{i}.jpg", quality=90)
    return root


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "data")


# --- shapes, crops, flips, colour jitter -----------------------------------------------------

def test_train_and_val_batches_have_the_documented_shapes(folder):
    train, val = imagefolder_datasets(folder, **SMALL)
    assert train.classes == val.classes == list(CLASSES)
    assert len(train) == 18 and len(val) == 6
    assert val.targets == [0, 0, 1, 1, 2, 2]
    seen = 0
    loader = train_loader(train, batch_size=4, num_workers=0, drop_last=False, seed=1)
    for x, y in loader:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and x.is_contiguous()
        assert y.dtype == torch.int64 and len(y) == len(x) and 0 <= int(y.min()) and int(y.max()) <= 2
        seen += len(y)
    assert seen == 18 and len(loader) == 5 and loader.skipped == 0
    assert len(train_loader(train, batch_size=4, num_workers=0)) == 4  # drop_last by default
    x, y = next(iter(eval_loader(val, batch_size=4, num_workers=0)))
    assert x.shape == (4, 10, 3, 32, 32) and y.tolist() == [0, 0, 1, 1]
    x, _ = next(iter(eval_loader(val.with_views("center"), batch_size=4, num_workers=0)))
    assert x.shape == (4, 3, 32, 32)


def test_mean_is_subtracted_and_only_the_mean_by_default(folder):
    train, _ = imagefolder_datasets(folder, crop=32, scale_range=(40, 40), pca_std=0, flip_p=0)
    raw = TrainTransform(crop=32, scale_range=(40, 40), flip_p=0, pca_std=0, mean=ZERO)
    img = imf.load_rgb(train.samples[0][0])
    torch.manual_seed(3)
    a = train.transform(img)
    torch.manual_seed(3)
    b = raw(img)
    assert 0 <= float(b.min()) and float(b.max()) <= 1  # [0, 1] RGB before the mean
    torch.testing.assert_close(a, b - torch.tensor(imf.IMAGENET_MEAN).view(3, 1, 1))


def test_scale_crop_is_resize_then_crop_and_draws_the_whole_scale_range():
    img = random_image(np.random.default_rng(1), 80, 60)
    t = imf.RandomScaleCrop(crop=32, scale_range=(40, 60))
    scales = set()
    for k in range(40):
        torch.manual_seed(k)
        out = t(img)
        torch.manual_seed(k)
        s, top, left = t.params(*img.size)
        scales.add(s)
        ref = TF.crop(TF.resize(img, s, TF.InterpolationMode.BILINEAR), top, left, 32, 32)
        diff = np.abs(np.asarray(out, dtype=int) - np.asarray(ref, dtype=int))
        assert out.size == (32, 32) and diff.max() <= 2 and diff.mean() < 0.3, (k, s, diff.max(), diff.mean())
    assert min(scales) >= 40 and max(scales) <= 60 and len(scales) >= 12
    fixed = imf.RandomScaleCrop(crop=32, scale_range=(40, 40))
    assert {fixed.params(80, 60)[0] for _ in range(20)} == {40}  # the small model's fixed scale
    with pytest.raises(ValueError, match="scale_range"):
        imf.RandomScaleCrop(crop=32, scale_range=(30, 60))


def test_half_of_the_training_views_are_flipped():
    img = Image.new("RGB", (32, 32))
    img.paste((255, 255, 255), (16, 0, 32, 32))  # right half white
    t = TrainTransform(crop=32, scale_range=(32, 32), pca_std=0, mean=ZERO)
    torch.manual_seed(0)
    flipped = sum(float(t(img)[:, :, 0].mean()) > 0.5 for _ in range(400))
    assert 160 <= flipped <= 240  # Binomial(400, 0.5): mean 200, sd 10
    never = TrainTransform(crop=32, scale_range=(32, 32), pca_std=0, mean=ZERO, flip_p=0)
    assert all(float(never(img)[:, :, 0].mean()) < 0.5 for _ in range(50))


def test_pca_colour_jitter_has_the_alexnet_statistics():
    t = PCALighting(std=0.1)
    torch.manual_seed(0)
    n = 20000
    zero = torch.zeros(3, 2, 2)
    shifts = torch.stack([t(zero) for _ in range(n)]).double()  # [n, 3, 2, 2]
    assert (shifts == shifts[:, :, :1, :1]).all()  # one RGB shift for every pixel of an image
    s = shifts[:, :, 0, 0]
    v = torch.tensor(imf.IMAGENET_PCA_EIGVEC, dtype=torch.float64)
    lam = torch.tensor(imf.IMAGENET_PCA_EIGVAL, dtype=torch.float64)
    cov = v @ torch.diag((0.1 * lam) ** 2) @ v.T  # Cov(V (alpha * lambda)), alpha ~ N(0, 0.1^2)
    sd = cov.diagonal().sqrt()
    assert sd.tolist() == pytest.approx([0.0124, 0.0126, 0.0128], abs=2e-4)  # about 1.2 % of full scale
    assert (s.mean(0).abs() < 4 * sd / math.sqrt(n)).all()
    torch.testing.assert_close(s.T.cov(), cov, rtol=0.05, atol=2e-6)
    assert PCALighting(std=0)(zero) is zero


# --- 10-view testing ------------------------------------------------------------------------

def test_ten_views_are_the_corner_and_centre_crops_and_their_mirrors():
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))  # shorter side 40: no resampling
    x = imf.to_float_tensor(img)
    views = EvalTransform(resize=40, crop=32, views="ten", mean=ZERO)(img)
    assert views.shape == (10, 3, 32, 32) and views.dtype == torch.float32
    tl, tr = x[:, :32, :32], x[:, :32, 16:]
    bl, br = x[:, 8:, :32], x[:, 8:, 16:]
    c = x[:, 4:36, 8:40]
    flip = lambda t: t.flip(-1)  # noqa: E731
    by_hand = torch.stack([tl, tr, bl, br, c, flip(tr), flip(tl), flip(br), flip(bl), flip(c)])
    assert torch.equal(views, by_hand)
    assert torch.equal(views, torch.stack(TF.ten_crop(x, [32, 32])))
    centre = EvalTransform(resize=40, crop=32, views="center", mean=ZERO)(img)
    assert torch.equal(centre, c)
    channel_mean = torch.tensor([0.1, 0.2, 0.3])
    assert torch.allclose(EvalTransform(resize=40, crop=32, mean=channel_mean)(img),
                          by_hand - channel_mean.view(3, 1, 1))
    assert torch.allclose(EvalTransform(resize=40, crop=32, views="center", mean=channel_mean)(img),
                          c - channel_mean.view(3, 1, 1))
    pixel_mean = torch.rand(3, 32, 32)
    assert torch.allclose(EvalTransform(resize=40, crop=32, mean=pixel_mean)(img), by_hand - pixel_mean)
    with pytest.raises(ValueError, match="does not fit"):
        EvalTransform(resize=40, crop=32, mean=torch.zeros(3, 30, 30))


def test_evaluation_resizes_the_shorter_side():
    img = random_image(np.random.default_rng(3), 90, 60)
    views = EvalTransform(resize=40, crop=32, views="ten", mean=ZERO)(img)
    resized = imf.to_float_tensor(img.resize((60, 40), Image.BILINEAR))
    assert torch.equal(views, torch.stack(TF.ten_crop(resized, [32, 32])))


class ViewTable(nn.Module):
    """Logits looked up by the view number written in pixel (0, 0, 0) of each view."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table)

    def forward(self, x):
        return self.table[x[:, 0, 0, 0].long()]


def test_ten_view_evaluation_averages_softmax_not_logits():
    # One view is very sure of class 0; nine mildly prefer class 1. The mean logit picks class 0,
    # the mean softmax picks class 1.
    table = [[10.0, 0.0, 0.0]] + [[0.0, 1.0, 0.0]] * 9
    x = torch.zeros(2, 10, 3, 4, 4)
    x[:, :, 0, 0, 0] = torch.arange(10).float()
    model = ViewTable(table)
    assert evaluate_ten_view(model, [(x, torch.tensor([1, 0]))], "cpu", ks=(1, 2)) == (0.5, 0.0)
    assert evaluate_ten_view(model, [(x, torch.tensor([1, 1]))], "cpu", ks=(1,)) == (0.0,)
    assert torch.tensor(table).mean(0).argmax() == 0  # what averaging logits would have said
    with pytest.raises(ValueError, match="expected batches"):
        evaluate_ten_view(model, [(x[:, 0], torch.tensor([1, 0]))])
    with pytest.raises(ValueError, match="no images"):
        evaluate_ten_view(model, [])


def test_ten_view_and_centre_crop_errors_match_a_manual_computation(folder):
    _, val = imagefolder_datasets(folder, **SMALL)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(3 * 32 * 32, 3))
    model.train()
    ten = evaluate_ten_view(model, eval_loader(val, batch_size=4, num_workers=0), "cpu", ks=(1, 2))
    centre = evaluate_center_crop(model, eval_loader(val.with_views("center"), batch_size=4, num_workers=0),
                                  "cpu", ks=(1, 2))
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        wrong_ten, wrong_c = [0, 0], [0, 0]
        for i in range(len(val)):
            views, y = val[i]
            p = model(views).softmax(1).mean(0)
            lc = model(views[4:5])[0]  # view 4 is the centre crop
            for j, k in enumerate((1, 2)):
                wrong_ten[j] += y not in p.topk(k).indices.tolist()
                wrong_c[j] += y not in lc.topk(k).indices.tolist()
    assert ten == pytest.approx([w / len(val) for w in wrong_ten])
    assert centre == pytest.approx([w / len(val) for w in wrong_c])


# --- broken files -----------------------------------------------------------------------------

def add_broken_files(folder):
    good = (folder / "train" / "cat" / "cat_0.jpg").read_bytes()
    bad = {
        "truncated": folder / "train" / "cat" / "truncated.jpg",
        "empty": folder / "train" / "dog" / "empty.jpg",
        "text": folder / "train" / "fox" / "notes_as.jpg",
    }
    bad["truncated"].write_bytes(good[: len(good) // 2])
    bad["empty"].write_bytes(b"")
    bad["text"].write_text("this is not a JPEG\n")
    other = folder / "train" / "fox" / "labels.txt"
    other.write_text("not an image either\n")
    return bad, other


@pytest.mark.timeout(60)
def test_unreadable_files_are_skipped_named_and_counted_with_worker_processes(folder):
    bad, other = add_broken_files(folder)
    with pytest.warns(UnreadableImageWarning, match=re.escape(str(other))):
        train, _ = imagefolder_datasets(folder, **SMALL)
    assert len(train) == 21 and train.ignored == [str(other)]
    loader = train_loader(train, batch_size=4, num_workers=2, drop_last=False, seed=0, persistent_workers=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counts = [sum(len(y) for _, y in loader) for _epoch in range(2)]
    assert counts == [18, 18]
    messages = [str(w.message) for w in caught if issubclass(w.category, UnreadableImageWarning)]
    assert len(messages) == 3  # once per file, not once per epoch
    for path in bad.values():
        assert sum(str(path) in m for m in messages) == 1
    assert set(loader.bad_files) == {str(p) for p in bad.values()} and loader.skipped == 6
    assert "truncated" in loader.bad_files[str(bad["truncated"])]


@pytest.mark.timeout(60)
def test_a_batch_of_only_unreadable_files_is_left_out(tmp_path):
    make_folder(tmp_path, classes=("a",), per_class=2)
    for i in range(3):
        (tmp_path / "train" / "a" / f"z{i}.jpg").write_bytes(b"")  # sorted after a_0, a_1
    train, _ = imagefolder_datasets(tmp_path, **SMALL)
    loader = eval_loader(train, batch_size=2, num_workers=2)
    with pytest.warns(UnreadableImageWarning):
        sizes = [len(y) for _, y in loader]
    assert sizes == [2] and loader.skipped == 3  # batches [a_0, a_1], [z0, z1] (dropped), [z2] (dropped)


def test_scan_finds_bad_files_and_exclude_leaves_them_out(folder):
    bad, _ = add_broken_files(folder)
    quick = dict(scan(folder))
    assert set(quick) == {str(bad["empty"]), str(bad["text"])}  # verify() does not see a truncated JPEG
    full = dict(scan(folder, decode=True))
    assert set(full) == {str(p) for p in bad.values()}
    assert "0 bytes" in full[str(bad["empty"])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        train, _ = imagefolder_datasets(folder, **SMALL, exclude=full)
    assert len(train) == 18 and sorted(train.excluded) == sorted(full)
    with pytest.raises(FileNotFoundError):
        scan(folder / "nowhere")


# --- layouts that are refused before training ------------------------------------------------

def test_missing_or_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nothere")) + ".*train/<class>"):
        imagefolder_datasets(tmp_path / "nothere")
    make_folder(tmp_path / "notrain", splits=("val",))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "notrain" / "train")) + ": not found"):
        imagefolder_datasets(tmp_path / "notrain")
    make_folder(tmp_path / "noval", splits=("train",))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "noval" / "val")) + ": not found"):
        imagefolder_datasets(tmp_path / "noval")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "empty" / "train")) + ": no class folders"):
        imagefolder_datasets(tmp_path / "empty")


def test_an_empty_class_folder_is_refused_naming_it(folder):
    (folder / "train" / "emu").mkdir()
    (folder / "train" / "emu" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=re.escape(str(folder / "train" / "emu")) + ": class folder with no images"):
        imagefolder_datasets(folder, **SMALL)


def test_flat_val_folder_gets_a_hint(folder):
    for p in (folder / "val").rglob("*.jpg"):
        p.rename(folder / "val" / p.name)
    for d in (folder / "val").iterdir():
        if d.is_dir():
            d.rmdir()
    with pytest.raises(ValueError, match="(?s)val: no class folders. It holds 6 images directly.*valprep"):
        imagefolder_datasets(folder, **SMALL)


def test_val_uses_train_class_indices_and_refuses_unknown_classes(tmp_path):
    make_folder(tmp_path, splits=("train",))
    make_folder(tmp_path, classes=("dog", "fox"), splits=("val",))
    train, val = imagefolder_datasets(tmp_path, **SMALL)
    assert val.classes == list(CLASSES) and val.targets == [1, 1, 2, 2]
    make_folder(tmp_path, classes=("gnu", "yak"), splits=("val",))
    with pytest.raises(ValueError, match="2 class folder\\(s\\) that the training set lacks: gnu, yak"):
        imagefolder_datasets(tmp_path, **SMALL)


# --- loaders and the mean ---------------------------------------------------------------------

def test_loader_takes_a_distributed_sampler(folder):
    train, _ = imagefolder_datasets(folder, **SMALL)
    sampler = DistributedSampler(train, num_replicas=2, rank=1, shuffle=True, seed=0)
    loader = train_loader(train, batch_size=3, num_workers=0, sampler=sampler, pin_memory=False)
    loader.set_epoch(1)
    assert sum(len(y) for _, y in loader) == 9 and loader.sampler is sampler


def test_mean_is_computed_once_and_kept_in_a_file(folder, tmp_path):
    path = tmp_path / "results" / "mean.pt"
    kw = dict(n_images=10, resize=40, crop=32, num_workers=0)
    mean = load_or_compute_mean(path, folder, kind="pixel", **kw)
    assert mean.shape == (3, 32, 32) and path.exists() and 0.2 < float(mean.mean()) < 0.8
    assert torch.equal(load_or_compute_mean(path, folder, kind="pixel", **kw), mean)
    saved = torch.load(path, weights_only=True)
    assert saved["images_used"] == 10 and saved["kind"] == "pixel"
    with pytest.raises(ValueError, match="other settings"):
        load_or_compute_mean(path, folder, kind="channel", **kw)
    channel = load_or_compute_mean(tmp_path / "channel.pt", folder, kind="channel", **kw)
    torch.testing.assert_close(channel, mean.mean(dim=(1, 2)))
    train, _ = imagefolder_datasets(folder, **SMALL, mean=path)
    assert torch.equal(train.transform._normalize.mean, mean)
    with pytest.raises(ValueError, match="does not fit"):
        imagefolder_datasets(folder, crop=30, scale_range=(40, 40), eval_resize=40, mean=path)


def test_imagenet_oddities_decode_to_rgb(tmp_path):
    # ImageNet's train set has upper-case .JPEG names, a CMYK JPEG, grey JPEGs and a PNG named .JPEG.
    make_folder(tmp_path, classes=("a",), per_class=1)
    d = tmp_path / "train" / "a"
    rgb = random_image(np.random.default_rng(4))
    rgb.convert("CMYK").save(d / "cmyk.JPEG", "JPEG")
    rgb.convert("L").save(d / "grey.jpeg", "JPEG")
    rgb.convert("RGBA").save(d / "png_named.JPEG", "PNG")
    rgb.convert("P").save(d / "palette.png")
    train, _ = imagefolder_datasets(tmp_path, **SMALL)
    assert len(train) == 5
    x, y = next(iter(train_loader(train, batch_size=5, num_workers=0)))
    assert x.shape == (5, 3, 32, 32) and torch.isfinite(x).all()


def test_half_precision_samples_are_within_a_fraction_of_a_grey_level(folder):
    _, val32 = imagefolder_datasets(folder, **SMALL)
    train16, val16 = imagefolder_datasets(folder, **SMALL, dtype=torch.float16)
    a, b = val32[0][0], val16[0][0]
    assert b.dtype == torch.float16 and b.shape == a.shape == (10, 3, 32, 32)
    assert float((b.float() - a).abs().max()) <= 2 ** -12  # |x| < 1: half spacing <= 2^-11; 1/255 ~ 2^-8
    assert train16[0][0].dtype == torch.float16
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    assert evaluate_ten_view(model, eval_loader(val16, batch_size=4, num_workers=0), ks=(1, 2)) == pytest.approx(
        evaluate_ten_view(model, eval_loader(val32, batch_size=4, num_workers=0), ks=(1, 2)))
