"""ImageNet 2012 (and any folder laid out like it) with the paper's augmentation and 10-view testing.

Layout (torchvision `ImageFolder`'s)::

    root/train/<class>/<image>.JPEG      e.g. root/train/n01440764/n01440764_10026.JPEG
    root/val/<class>/<image>.JPEG        val sorted into the same class folders (devkit valprep.sh)

Imagenette/Imagewoof and other sets in this layout work unchanged. Class indices are the
positions of train's class folders in sorted order (as `ImageFolder` gives them; hidden folders
such as `.ipynb_checkpoints` are ignored); val uses train's indices, and a val class that train
lacks is an error.

Sec. 4 of He et al. (2015), per sample, in the loader's worker processes:

* training (`TrainTransform`): shorter side s drawn uniformly from `scale_range` ([256, 512] for
  the large models, (256, 256) for the small one), a random `crop` x `crop` view (224), a
  horizontal flip with p = 0.5, AlexNet's PCA colour jitter, the mean subtracted;
* testing (`EvalTransform`): shorter side 256, then either the centre 224 crop or the 10 views
  (four corners and the centre, and their flips) as one [10, 3, 224, 224] tensor;
  `evaluate_ten_view` averages the softmax outputs over the 10 views, as the paper does.

Pixels are RGB scaled to [0, 1]. The mean is a parameter: the per-channel ImageNet mean
(`IMAGENET_MEAN`, the default: a documented simplification of the paper's per-pixel mean), or a
mean image / per-channel mean computed over a sample of training images and kept in a small
file (`load_or_compute_mean`). Only the mean is subtracted, as in the paper; `std` optionally
divides as well.

Unreadable files (corrupt or truncated JPEGs, zero-byte files, non-images with an image
extension) never stop training: a worker returns an `Unreadable` sentinel instead of raising,
the collate function drops it, and the loader (`SkippingDataLoader`, in the main process) warns
once per file, naming it, and counts it. Files without an image extension are left out when the
folder is listed, with one warning naming them. `scan` finds bad files ahead of time; pass its
result as `exclude=` to leave them out up front (under DDP that keeps every rank's batches
full). Missing or empty folders are errors raised when the data sets are built, before training.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's
LAYOUT = ("expected the ImageFolder layout: <root>/train/<class>/<image>.jpg and "
          "<root>/val/<class>/<image>.jpg (e.g. ImageNet 2012 with val sorted into class folders, or Imagenette)")

# Per-channel ImageNet mean and std of [0, 1] RGB (the values torchvision's models use).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PCA of ImageNet RGB pixel values on the [0, 1] scale, for AlexNet's colour jitter
# (Krizhevsky, Sutskever & Hinton 2012, Sec. 4.1: add sum_i alpha_i lambda_i p_i to every pixel,
# alpha_i ~ N(0, 0.1), drawn once per image). These are the widely used constants of
# fb.resnet.torch (datasets/imagenet.lua), also used by many PyTorch ImageNet pipelines.
# Columns of IMAGENET_PCA_EIGVEC are the eigenvectors p_i (rows: R, G, B).
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                       (-0.5808, -0.0045, -0.8140),
                       (-0.5836, -0.6948, 0.4203))


class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded and was skipped."""


# --- 1. per-sample transforms (picklable: they run in worker processes) --------------------

def _resized_size(w: int, h: int, short: int) -> tuple[int, int]:
    """(width, height) with the shorter side `short`, as torchvision's resize(img, short) gives."""
    if w <= h:
        return short, int(short * h / w)
    return int(short * w / h), short


class RandomScaleCrop:
    """Shorter side resized to s ~ U{scale_range[0], ..., scale_range[1]}, then a random crop x crop view.

    Done in one PIL call: only the crop's box of the original is resampled to crop x crop
    (`Image.resize(box=...)`, the same filter and support as resizing the whole image and then
    cropping, at a fraction of the cost when s is large)."""

    def __init__(self, crop: int = 224, scale_range: tuple[int, int] = (256, 512)):
        lo, hi = scale_range
        if not (crop <= lo <= hi):
            raise ValueError(f"scale_range {scale_range}: need crop ({crop}) <= low <= high")
        self.crop, self.scale_range = crop, (int(lo), int(hi))

    def params(self, w: int, h: int) -> tuple[int, int, int]:
        """(s, top, left) of one draw, in the coordinates of the image resized to shorter side s."""
        lo, hi = self.scale_range
        s = int(torch.randint(lo, hi + 1, ()))
        rw, rh = _resized_size(w, h, s)
        top = int(torch.randint(0, rh - self.crop + 1, ()))
        left = int(torch.randint(0, rw - self.crop + 1, ()))
        return s, top, left

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        s, top, left = self.params(w, h)
        rw, rh = _resized_size(w, h, s)
        sx, sy = w / rw, h / rh
        box = (left * sx, top * sy, (left + self.crop) * sx, (top + self.crop) * sy)
        return img.resize((self.crop, self.crop), Image.BILINEAR, box=box)


class RandomHorizontalFlip:
    """Mirror left-right with probability p (the paper's 50 % flips)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.transpose(Image.FLIP_LEFT_RIGHT) if float(torch.rand(())) < self.p else img


def to_float_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float32 [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)


class PCALighting:
    """AlexNet's colour jitter (Krizhevsky et al. 2012, Sec. 4.1) on a [3, H, W] (or [..., 3, H, W]) tensor.

    Adds the same RGB shift  eigvec @ (alpha * eigval),  alpha ~ N(0, std^2) per component, to
    every pixel; so shift_c has mean 0 and variance std^2 * sum_i (eigval_i * eigvec[c, i])^2."""

    def __init__(self, std: float = 0.1, eigval: Sequence[float] = IMAGENET_PCA_EIGVAL,
                 eigvec: Sequence[Sequence[float]] = IMAGENET_PCA_EIGVEC):
        self.std = float(std)
        self.eigval = torch.tensor(eigval, dtype=torch.float32)
        self.eigvec = torch.tensor(eigvec, dtype=torch.float32)

    def shift(self) -> torch.Tensor:
        """One draw of the RGB shift, [3]."""
        alpha = torch.randn(3) * self.std
        return self.eigvec @ (alpha * self.eigval)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.std == 0:
            return x
        return x + self.shift()[:, None, None]


def as_mean(mean: Any) -> torch.Tensor:
    """A mean as a float tensor [3] (per channel) or [3, H, W] (per pixel).

    Accepts a tensor, a sequence of 3 numbers, or the path of a file from `load_or_compute_mean`."""
    if isinstance(mean, (str, os.PathLike)):
        mean = _load_mean_file(Path(mean))["mean"]
    t = torch.as_tensor(mean, dtype=torch.float32).clone()
    if not (t.shape == (3,) or (t.ndim == 3 and t.shape[0] == 3)):
        raise ValueError(f"mean: expected shape [3] or [3, H, W], got {tuple(t.shape)}")
    return t


class Normalize:
    """Subtract a per-channel [3] or per-pixel [3, H, W] mean; divide by a per-channel std if given."""

    def __init__(self, mean: Any = IMAGENET_MEAN, std: Sequence[float] | None = None):
        self.mean = as_mean(mean)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._mean = self.mean.view(3, 1, 1) if self.mean.ndim == 1 else self.mean

    def check_size(self, size: int) -> None:
        if self.mean.ndim == 3 and tuple(self.mean.shape[1:]) != (size, size):
            raise ValueError(f"per-pixel mean of shape {tuple(self.mean.shape)} does not fit {size}x{size} views")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x - self._mean
        return x / self.std if self.std is not None else x


@dataclasses.dataclass
class TrainTransform:
    """The paper's training augmentation of one decoded image: -> float32 [3, crop, crop].

    scale_range (256, 512): the large models' scale jitter; (256, 256): the small model's fixed 256.
    pca_std 0 turns the colour jitter off, flip_p 0 the flips. dtype: see `imagefolder_datasets`."""

    crop: int = 224
    scale_range: tuple[int, int] = (256, 512)
    flip_p: float = 0.5
    pca_std: float = 0.1
    mean: Any = IMAGENET_MEAN
    std: Sequence[float] | None = None
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        self._scale_crop = RandomScaleCrop(self.crop, tuple(self.scale_range))
        self._flip = RandomHorizontalFlip(self.flip_p)
        self._lighting = PCALighting(self.pca_std)
        self._normalize = Normalize(self.mean, self.std)
        self._normalize.check_size(self.crop)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        x = to_float_tensor(self._flip(self._scale_crop(img)))
        return self._normalize(self._lighting(x)).to(self.dtype)


VIEWS = ("ten", "center")


@dataclasses.dataclass
class EvalTransform:
    """Test views of one decoded image: shorter side `resize` (256), then crop x crop (224) views.

    views "center": float32 [3, crop, crop]; views "ten": float32 [10, 3, crop, crop], in
    torchvision's `ten_crop` order: top-left, top-right, bottom-left, bottom-right, centre of the
    image, then the same five of the mirrored image (so the mirrored crops of all five views)."""

    resize: int = 256
    crop: int = 224
    views: str = "ten"
    mean: Any = IMAGENET_MEAN
    std: Sequence[float] | None = None
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if self.views not in VIEWS:
            raise ValueError(f"views: got {self.views!r}; allowed: {VIEWS}")
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must not exceed resize ({self.resize})")
        self._normalize = Normalize(self.mean, self.std)
        self._normalize.check_size(self.crop)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.resize(_resized_size(*img.size, self.resize), Image.BILINEAR)
        x = to_float_tensor(img)
        per_channel = self._normalize.mean.ndim == 1
        if per_channel:  # the same numbers, cheaper: normalise the image once, before cropping
            x = self._normalize(x)
        size = [self.crop, self.crop]
        views = TF.center_crop(x, size).contiguous() if self.views == "center" else torch.stack(TF.ten_crop(x, size))
        return (views if per_channel else self._normalize(views)).to(self.dtype)


# --- 2. listing the folders ------------------------------------------------------------------

def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _check_split_dir(split_dir: Path) -> None:
    if not split_dir.is_dir():
        what = "is not a folder" if split_dir.exists() else "not found"
        raise FileNotFoundError(f"{split_dir}: {what}; {LAYOUT}")


def list_split(split_dir: str | Path, classes: Sequence[str] | None = None, *,
               exclude: Iterable[str | Path] = ()) -> tuple[list[str], list[tuple[str, int]], list[str], list[str]]:
    """(classes, samples [(path, class index)], ignored files, excluded files) of one split folder.

    classes: the class list to index by (train's, for val); None: this folder's class folders.
    Raises FileNotFoundError / ValueError, naming the folder, if the folder is missing, has no
    class folders, a class folder without images, or (with `classes`) a class not in `classes`.
    A class folder with no images is refused rather than skipped: in ImageNet it means an
    incomplete copy, and skipping it would silently change what the model is scored on."""
    split_dir = Path(split_dir)
    _check_split_dir(split_dir)
    found = _class_dirs(split_dir)
    if not found:
        loose = [e.name for e in os.scandir(split_dir) if e.is_file() and _is_image(e.name)]
        hint = (f" It holds {len(loose)} images directly: sort them into one folder per class "
                f"(for ImageNet val, the devkit's ground truth or valprep.sh does this)." if loose else "")
        raise ValueError(f"{split_dir}: no class folders.{hint} {LAYOUT}")
    if classes is None:
        classes = found
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            shown = ", ".join(extra[:10]) + (f" and {len(extra) - 10} more" if len(extra) > 10 else "")
            raise ValueError(f"{split_dir}: {len(extra)} class folder(s) that the training set lacks: {shown}; "
                             "train and val must have the same class folders")
    index = {c: i for i, c in enumerate(classes)}
    excluded_set = {os.path.abspath(p) for p in exclude}
    samples, ignored, excluded = [], [], []
    for c in found:
        class_dir = split_dir / c
        n = 0
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if not _is_image(name):
                    ignored.append(path)
                elif os.path.abspath(path) in excluded_set:
                    excluded.append(path)
                else:
                    samples.append((path, index[c]))
                    n += 1
        if n == 0:
            raise ValueError(f"{class_dir}: class folder with no images (extensions {', '.join(IMG_EXTENSIONS)}); "
                             "remove the folder or fill it (an empty class folder is refused, not skipped)")
    return list(classes), samples, ignored, excluded


def _warn_ignored(split_dir: Path, ignored: list[str]) -> None:
    if ignored:
        shown = ", ".join(ignored[:10]) + (f" and {len(ignored) - 10} more" if len(ignored) > 10 else "")
        warnings.warn(f"{split_dir}: ignored {len(ignored)} file(s) without an image extension: {shown}",
                      UnreadableImageWarning, stacklevel=3)


# --- 3. the data set --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Unreadable:
    """What a worker returns instead of a sample whose file cannot be decoded."""

    path: str
    reason: str


def load_rgb(path: str) -> Image.Image:
    """Decode a whole image file to RGB (raises on corrupt, truncated, empty or non-image files)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")  # convert() loads every pixel: a truncated file fails here


class ImageFolderDataset(Dataset):
    """samples[i] = (path, class index); item i = (transform(decoded image), class index), or an
    `Unreadable` sentinel when the file cannot be decoded (never an exception from a worker).

    Decoding errors of every kind are caught (PIL raises UnidentifiedImageError, OSError,
    SyntaxError, ValueError, EOFError, struct.error or DecompressionBombError on malformed
    files); the `try` holds only the decode, so a bug in a transform still raises."""

    def __init__(self, root: Path, classes: list[str], samples: list[tuple[str, int]], transform,
                 ignored: list[str] = (), excluded: list[str] = ()):
        self.root = Path(root)
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = list(samples)
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self.ignored, self.excluded = list(ignored), list(excluded)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        try:
            img = load_rgb(path)
        except Exception as e:  # noqa: BLE001 - any decode failure is the file's, see the class docstring
            return Unreadable(path, f"{type(e).__name__}: {e}")
        return (self.transform(img) if self.transform is not None else img), target

    def with_transform(self, transform) -> "ImageFolderDataset":
        """The same samples with another transform (a shallow copy)."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def with_views(self, views: str) -> "ImageFolderDataset":
        """A val set with `EvalTransform` views "ten" or "center", the rest of its transform unchanged."""
        if not isinstance(self.transform, EvalTransform):
            raise TypeError("with_views: this data set's transform is not an EvalTransform")
        return self.with_transform(dataclasses.replace(self.transform, views=views))

    def __repr__(self) -> str:
        return (f"ImageFolderDataset({str(self.root)!r}, {len(self)} images, {len(self.classes)} classes, "
                f"transform={self.transform!r})")


def imagefolder_datasets(root: str | Path, *, crop: int = 224, scale_range: tuple[int, int] = (256, 512),
                         eval_resize: int = 256, views: str = "ten", flip_p: float = 0.5, pca_std: float = 0.1,
                         mean: Any = IMAGENET_MEAN, std: Sequence[float] | None = None,
                         dtype: torch.dtype = torch.float32, exclude: Iterable[str | Path] = (),
                         train_dir: str = "train",
                         val_dir: str = "val") -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """(train, val) data sets of `root`/train and `root`/val with the paper's transforms.

    mean: IMAGENET_MEAN (per channel, default), a [3] or [3, crop, crop] tensor, or the path of a
    `load_or_compute_mean` file. exclude: paths to leave out (e.g. the paths `scan` returned).
    dtype: of the samples the workers send; torch.float16 halves the bytes each batch costs to move
    between processes (a 10-view sample is 6 MB in float32) at a rounding error of at most 1/16 of
    one 8-bit grey level (cast to float32 on the device; the evaluate functions do).
    Raises FileNotFoundError / ValueError naming the folder when the layout is wrong or empty."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data folder not found; {LAYOUT}")
    exclude = list(exclude)
    train_split, val_split = root / train_dir, root / val_dir
    _check_split_dir(train_split)
    _check_split_dir(val_split)
    classes, train_samples, train_ignored, train_excluded = list_split(train_split, exclude=exclude)
    _, val_samples, val_ignored, val_excluded = list_split(val_split, classes, exclude=exclude)
    _warn_ignored(train_split, train_ignored)
    _warn_ignored(val_split, val_ignored)
    mean = as_mean(mean)
    train = ImageFolderDataset(train_split, classes, train_samples,
                               TrainTransform(crop, tuple(scale_range), flip_p, pca_std, mean, std, dtype),
                               train_ignored, train_excluded)
    val = ImageFolderDataset(val_split, classes, val_samples,
                             EvalTransform(eval_resize, crop, views, mean, std, dtype), val_ignored, val_excluded)
    return train, val


# --- 4. loaders that skip unreadable files --------------------------------------------------

def collate_skipping(batch: list) -> tuple[torch.Tensor | None, torch.Tensor | None, list[tuple[str, str]]]:
    """(images, labels, [(path, reason)] of the unreadable samples dropped); images None if all were."""
    bad = [(s.path, s.reason) for s in batch if isinstance(s, Unreadable)]
    good = [s for s in batch if not isinstance(s, Unreadable)]
    if not good:
        return None, None, bad
    # default_collate stacks straight into shared memory in a worker (no copy when it is sent).
    images, labels = default_collate(good)
    return images, labels, bad


class SkippingDataLoader(DataLoader):
    """A DataLoader (with `collate_skipping`) that yields (images, labels) and, in the main process,
    warns once per unreadable file (naming it) and counts: `bad_files` {path: reason} and
    `skipped` (samples dropped, over all epochs). A batch whose samples are all unreadable is
    left out. Under DDP a short batch on one rank is harmless, a left-out one is not: `scan`
    and `exclude=` remove bad files up front."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("collate_fn", collate_skipping)
        super().__init__(*args, **kwargs)
        self.bad_files: dict[str, str] = {}
        self.skipped = 0

    def __iter__(self):
        for images, labels, bad in super().__iter__():
            for path, reason in bad:
                self.skipped += 1
                if path not in self.bad_files:
                    self.bad_files[path] = reason
                    warnings.warn(f"skipped unreadable image {path} ({reason}); "
                                  f"{len(self.bad_files)} unreadable file(s) so far", UnreadableImageWarning,
                                  stacklevel=2)
            if images is not None:
                yield images, labels

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch to the sampler (a DistributedSampler needs it for a new order each epoch)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def default_workers() -> int:
    """Worker processes per loader: the CPUs this process may use (split among local ranks under torchrun)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(16, cpus // max(1, local) - 1))


def _loader(dataset, *, batch_size, num_workers, sampler, shuffle, drop_last, seed, pin_memory,
            persistent_workers, prefetch_factor, timeout) -> SkippingDataLoader:
    num_workers = default_workers() if num_workers is None else num_workers
    pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=persistent_workers, prefetch_factor=prefetch_factor, timeout=timeout)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SkippingDataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
                              sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                              drop_last=drop_last, generator=generator, **kwargs)


def train_loader(dataset: Dataset, *, batch_size: int = 128, num_workers: int | None = None, sampler=None,
                 drop_last: bool = True, seed: int | None = None, pin_memory: bool | None = None,
                 persistent_workers: bool = True, prefetch_factor: int = 4,
                 timeout: float = 0) -> SkippingDataLoader:
    """Shuffled mini-batches (images float [B, 3, crop, crop], labels [B]) of a training set.

    sampler: e.g. a DistributedSampler under torchrun (then it shuffles; call `set_epoch`).
    num_workers None: `default_workers()`. pin_memory None: when CUDA is available.
    seed: the shuffling order and the workers' augmentation seeds (None: from torch's global RNG)."""
    return _loader(dataset, batch_size=batch_size, num_workers=num_workers, sampler=sampler, shuffle=True,
                   drop_last=drop_last, seed=seed, pin_memory=pin_memory, persistent_workers=persistent_workers,
                   prefetch_factor=prefetch_factor, timeout=timeout)


def eval_loader(dataset: Dataset, *, batch_size: int = 50, num_workers: int | None = None, sampler=None,
                pin_memory: bool | None = None, persistent_workers: bool = True, prefetch_factor: int = 2,
                timeout: float = 0) -> SkippingDataLoader:
    """Batches in file order, none dropped: [B, 10, 3, crop, crop] (10 views) or [B, 3, crop, crop].

    The default batch of 50 ten-view samples is 500 crops for the network."""
    return _loader(dataset, batch_size=batch_size, num_workers=num_workers, sampler=sampler, shuffle=False,
                   drop_last=False, seed=None, pin_memory=pin_memory, persistent_workers=persistent_workers,
                   prefetch_factor=prefetch_factor, timeout=timeout)


# --- 5. evaluation --------------------------------------------------------------------------

def _topk_wrong(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    # The training loop's helper (delving.train.topk_wrong), imported here, not at the top:
    # delving.train imports delving.data.
    from delving.train import topk_wrong
    return topk_wrong(scores, labels, tuple(ks))


@torch.inference_mode()
def _evaluate(model: nn.Module, loader: Iterable, device, *, ten_view: bool, bf16: bool,
              ks: Sequence[int]) -> tuple[float, ...]:
    device = torch.device(device)
    was_training = model.training
    model.eval()
    wrong = torch.zeros(len(ks), dtype=torch.long, device=device)
    n = torch.zeros((), dtype=torch.long, device=device)
    try:
        for x, y in loader:
            x = x.to(device, non_blocking=True).float()
            y = y.to(device, non_blocking=True)
            if ten_view:
                if x.ndim != 5:
                    raise ValueError(f"evaluate_ten_view: expected batches [B, V, 3, H, W], got {tuple(x.shape)} "
                                     "(use views='ten', or evaluate_center_crop)")
                b, v = x.shape[:2]
                x = x.flatten(0, 1)
            elif x.ndim != 4:
                raise ValueError(f"evaluate_center_crop: expected batches [B, 3, H, W], got {tuple(x.shape)}")
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            scores = logits.float()
            if ten_view:
                # The paper's multi-view testing averages the softmax outputs over the views.
                scores = scores.softmax(dim=1).view(b, v, -1).mean(dim=1)
            wrong += _topk_wrong(scores, y, ks)
            n += len(y)
    finally:
        model.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Under a DistributedSampler every rank scores its share (padded to equal shares, so a few
        # images may count twice): sum the counts.
        torch.distributed.all_reduce(wrong)
        torch.distributed.all_reduce(n)
    if int(n) == 0:
        raise ValueError("evaluation: the loader yielded no images")
    return tuple((wrong.double() / n).tolist())


def evaluate_ten_view(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu", *,
                      bf16: bool = False, ks: Sequence[int] = (1, 5)) -> tuple[float, ...]:
    """(top-1, top-5) error (fractions) with the softmax averaged over each sample's views.

    loader: (images [B, V, 3, H, W], labels [B]) batches, e.g. `eval_loader` of a views="ten" val set."""
    return _evaluate(model, loader, device, ten_view=True, bf16=bf16, ks=ks)


def evaluate_center_crop(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu", *,
                         bf16: bool = False, ks: Sequence[int] = (1, 5)) -> tuple[float, ...]:
    """(top-1, top-5) error (fractions) of single views (images [B, 3, H, W]), e.g. a views="center" val set."""
    return _evaluate(model, loader, device, ten_view=False, bf16=bf16, ks=ks)


# --- 6. checking the files ahead of time ----------------------------------------------------

def check_file(path: str, decode: bool = False) -> str | None:
    """None if the file looks fine, else why not. decode=False: PIL's verify() (headers and
    structure; fast, but a truncated JPEG passes); decode=True: decode every pixel (slow, sure)."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        if decode:
            load_rgb(path)
        else:
            with Image.open(path) as img:
                img.verify()
    except Exception as e:  # noqa: BLE001 - as in ImageFolderDataset.__getitem__
        return f"{type(e).__name__}: {e}"
    return None


def scan(root: str | Path, *, decode: bool = False, num_threads: int | None = None) -> list[tuple[str, str]]:
    """[(path, reason)] of the image files under `root` that fail `check_file` (sorted by path).

    root: a data folder (its train/ and val/, or whatever class folders lie below) or one split.
    Threads suffice: PIL releases the GIL while decoding."""
    paths = [os.path.join(d, f) for d, _, files in os.walk(root, followlinks=True) for f in files if _is_image(f)]
    if not paths and not Path(root).is_dir():
        raise FileNotFoundError(f"{root}: not found")
    num_threads = num_threads or min(32, (os.cpu_count() or 1) * 2)
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        reasons = list(pool.map(lambda p: check_file(p, decode), paths, chunksize=64))
    return sorted((p, r) for p, r in zip(paths, reasons) if r is not None)


# --- 7. the mean, computed once and kept in a small file ------------------------------------

def compute_mean(root: str | Path, *, kind: str = "pixel", n_images: int = 10_000, resize: int = 256,
                 crop: int = 224, seed: int = 0, num_workers: int | None = None,
                 train_dir: str = "train") -> tuple[torch.Tensor, int]:
    """(mean, images used): the mean of the centre crop x crop views (shorter side `resize`) of
    n_images training images drawn at random (all if fewer), [0, 1] RGB.

    kind "pixel": the mean image [3, crop, crop] (the paper's per-pixel mean); "channel": [3]."""
    if kind not in ("pixel", "channel"):
        raise ValueError(f"kind: got {kind!r}; allowed: 'pixel', 'channel'")
    split = Path(root) / train_dir
    _, samples, _, _ = list_split(split)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(samples), generator=g)[:n_images].sort().values.tolist()
    ds = ImageFolderDataset(split, [], [samples[i] for i in pick],
                            EvalTransform(resize, crop, "center", mean=(0.0, 0.0, 0.0)))
    loader = eval_loader(ds, batch_size=64, num_workers=num_workers, pin_memory=False, persistent_workers=False)
    total, n = torch.zeros(3, crop, crop, dtype=torch.float64), 0
    for x, _ in loader:
        total += x.double().sum(dim=0)
        n += len(x)
    if n == 0:
        raise ValueError(f"{split}: no readable images to compute the mean from")
    mean = (total / n).float()
    return (mean if kind == "pixel" else mean.mean(dim=(1, 2))), n


def _load_mean_file(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_or_compute_mean(path: str | Path, root: str | Path, *, kind: str = "pixel", n_images: int = 10_000,
                         resize: int = 256, crop: int = 224, seed: int = 0,
                         num_workers: int | None = None) -> torch.Tensor:
    """The mean kept in `path` (a small torch file next to the results), computed and saved if absent.

    The file records how it was computed; a file computed otherwise is an error, not reused."""
    path = Path(path)
    want = {"kind": kind, "n_images": n_images, "resize": resize, "crop": crop, "seed": seed}
    if path.exists():
        saved = _load_mean_file(path)
        differ = {k: (saved.get(k), v) for k, v in want.items() if saved.get(k) != v}
        if differ:
            raise ValueError(f"{path}: mean computed with other settings {differ} (saved, wanted); "
                             "delete it or point to another file")
        return saved["mean"]
    mean, used = compute_mean(root, kind=kind, n_images=n_images, resize=resize, crop=crop, seed=seed,
                              num_workers=num_workers)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"mean": mean, **want, "images_used": used, "root": str(Path(root).resolve())}, tmp)
    os.replace(tmp, path)
    return mean
