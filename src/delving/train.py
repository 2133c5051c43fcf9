"""Train one network the way Sec. 3 of He et al. (2015) trains theirs, and keep a record of it.

    python -m delving.train --model deep30 --init he-fan-out --epochs 1
    torchrun --nproc_per_node 4 -m delving.train --dataset imagefolder --data-dir /data/imagenet ...

The whole path, top to bottom (one function, `train`):

1. `TrainConfig` says everything a run depends on; it is checked first and becomes the run's
   params.json, so a run is reproduced by its params alone.
2. `make_data` loads the data into memory (`InMemoryBatches`: no DataLoader, no per-sample
   Python), or, for an ImageNet-style folder, wraps `delving.data.imagefolder`'s loaders
   (`FolderBatches`: worker processes decode and augment as in Sec. 4), and fixes the
   evaluation sets: a fixed random `eval_subset` of held-out images, evaluated
   `evals_per_epoch` times an epoch (the paper's 3,000 random val images of Figs. 2-3; centre
   crop), and the whole held-out set at every epoch end (10-view for image folders).
3. `make_model` builds the network (`delving.models`) and initialises it (`delving.init`) from a
   generator seeded with `seed`; `param_groups` keeps weight decay off biases and PReLU
   coefficients (Sec. 2.1: decay would push a toward 0).
4. SGD with momentum 0.9, weight decay 5e-4, mini-batches, lr 1e-2 divided by 10 at fixed epochs
   (`lr_steps`) or when held-out error plateaus (`lr_schedule="plateau"`), dropout 0.5 on fc1, fc2.
5. Every step: forward (bf16 autocast if asked), a finiteness check of the loss (a non-finite
   loss ends the run as "diverged"), backward, per-layer gradient norms every `grad_norm_every`
   steps (the "diminishing gradients" of Sec. 2.2), the update.
6. At each evaluation point a row goes to metrics.csv (and the PReLU coefficients a, per layer,
   to prelu.csv) and the training state to checkpoint.pt (atomically), so a killed run resumes
   (`resume="auto"` or a run directory) and ends with the same numbers as an uninterrupted one.

Several GPUs (or CPU processes): under `torchrun --nproc_per_node N -m delving.train ...` every
process runs this same path on its own share of each mini-batch, as DistributedDataParallel
(NCCL on GPUs, gloo on CPUs; `process_group` joins from torchrun's RANK / WORLD_SIZE /
LOCAL_RANK). `batch_size` stays the global batch: each global batch of the single-process run
is split into N equal parts (`RankShard`, `EpochSampler`), so the data order, the batches and
(dropout aside) the updates are the single-process run's. Losses and error counts are summed
over the processes; only rank 0 writes the run record, the checkpoints and the progress bar,
and prints the run directory. `torchrun_command` builds the command line from a config.

Runs are read back with `delving.results` (`load_run`, `find_runs`, `latest_run`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm  # text bars also in notebooks (no ipywidgets here)

from delving import results
from delving.data import (InMemoryBatches, channel_stats, eval_loader, imagefolder_datasets, load_fashion_mnist,
                           train_loader)
from delving.data.imagefolder import ImageFolderDataset
from delving.init import SCHEMES, init_model
from delving.models import ACTIVATIONS, MODELS, build_model

DATASETS = ("fashion-mnist", "imagefolder", "synthetic")
EVAL_VIEWS = ("ten", "center")
DEVICES = ("auto", "cpu", "cuda")
LR_SCHEDULES = ("steps", "plateau")
PLATEAU_MAX_DROPS = 2  # the paper's 1e-2 -> 1e-3 -> 1e-4: two drops, then the lr stays
DATA_SEED = 0  # the train/eval subsets are the same in every run; `seed` draws init, order, dropout
EVAL_BATCH_SIZE = 1000
FOLDER_EVAL_BATCH = {"center": 250, "ten": 50}  # images per rank and eval batch (10-view: 500 crops)
SYNTHETIC_IMAGES, SYNTHETIC_CLASSES = 10_000, 1000  # default train size of dataset "synthetic"; its classes
CHECKPOINT_FORMAT = 1


# --- 1. the configuration -----------------------------------------------------------------

def _f(default, help, **kw):
    """A config field with its help text (the CLI's --help is built from these)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything a training run depends on. JSON-serialisable: it is the run's params.json."""

    experiment: str = _f("train", "experiment name: runs are kept in results/<experiment>/<run-id>/")
    # the network and its initialisation
    model: str = _f("small14", "network (delving.models)", choices=tuple(MODELS))
    activation: str = _f("relu", "activation after every conv and fc1, fc2", choices=ACTIVATIONS)
    width: float = _f(0.125, "multiplier on every conv and fc1/fc2 width (1.0 = the paper's)")
    extra_layers: int = _f(16, "deep30 only: extra 2x2, 256-filter convs in stage 3 (Fig. 3: 16)")
    dropout: float = _f(0.5, "dropout on fc1 and fc2 (Sec. 3: 50 %)")
    init: str = _f("he-fan-out", "weight init (delving.init); the paper's models used Eq. 14 (fan-out)",
                   choices=SCHEMES)
    prelu_aware: bool = _f(False, "He init with Eq. 15's (1 + a^2) for the initial PReLU coefficient a")
    init_std: float = _f(0.01, "std of the 'fixed' init")
    # the data
    dataset: str = _f("fashion-mnist", "'fashion-mnist' (in memory); 'imagefolder': an ImageNet-style folder "
                                       "(data_dir, Sec. 4's augmentation and testing); 'synthetic': random uint8 "
                                       "images made on the device (throughput checks)", choices=DATASETS)
    data_dir: str | None = _f(None, "imagefolder: the folder holding train/<class>/ and val/<class>/ images")
    input_size: int = _f(224, "imagefolder: side of the training and test views (Sec. 4: 224); synthetic: image "
                              "side; fashion-mnist: not used (28x28)")
    scale_range: list[int] = _f([256, 512], "imagefolder: the shorter side of a training image is drawn from "
                                            "[low, high] before the crop (Sec. 4: [256, 512] for the large "
                                            "models; [256, 256] for the small one)")
    eval_resize: int = _f(256, "imagefolder: the shorter side of test images before their views (Sec. 4: 256)")
    eval_views: str = _f("ten", "imagefolder: epoch-end test views, 'ten' (4 corners + centre and their flips, "
                                "softmax averaged: Sec. 3) or 'center'; the in-epoch eval subset uses the centre",
                         choices=EVAL_VIEWS)
    num_workers: int | None = _f(None, "imagefolder: worker processes per loader (None: the CPUs per local "
                                       "rank, minus one; 0: load in the training process)")
    train_subset: int | None = _f(None, "train on this many random training images (None: all)")
    eval_subset: int = _f(3000, "size of the fixed random held-out subset evaluated within epochs "
                                "(the paper's 3,000 val images)")
    test_subset: int | None = _f(None, "evaluate at epoch ends on this many held-out images (None: all; "
                                       "smaller for smoke runs)")
    evals_per_epoch: int = _f(4, "evaluations of the eval subset per epoch (the last one at epoch end)")
    augment: bool = _f(False, "in memory: random flips and 2-pixel translations of training images; imagefolder: "
                              "flips and PCA colour jitter (the scale and crop jitter is always on)")
    # the optimisation (Sec. 3)
    epochs: int = _f(10, "training epochs")
    batch_size: int = _f(128, "mini-batch size (Sec. 3: 128); under torchrun the global batch, split over "
                              "the processes")
    lr: float = _f(0.01, "initial learning rate (Sec. 3: 1e-2)")
    lr_schedule: str = _f("steps", "'steps': divide lr by 10 at each epoch in lr_steps; 'plateau': when "
                                   "held-out top-1 error has not improved for `patience` epochs (at most "
                                   f"{PLATEAU_MAX_DROPS} times)", choices=LR_SCHEDULES)
    lr_steps: list[int] = _f([], "epochs at which lr is divided by 10 (lr_schedule='steps')")
    patience: int = _f(2, "epochs without improvement before a plateau drop")
    momentum: float = _f(0.9, "SGD momentum (Sec. 3: 0.9)")
    weight_decay: float = _f(5e-4, "weight decay on conv/fc weights only (Sec. 3: 0.0005)")
    seed: int = _f(0, "seeds the init, the data order and dropout")
    # the machine
    device: str = _f("auto", "'auto': cuda if available, else cpu", choices=DEVICES)
    # Measured on the 2-core AVX2 CPU (deep30, width 1/8, 28x28, batch 64, 1 thread): fp32 ~630 images/s,
    # channels-last ~810 (+25 %), bf16 autocast ~75 (no native bf16 there: 8x slower).
    bf16: bool = _f(False, "bf16 autocast for forward passes (for GPUs; slow on CPUs without bf16 units)")
    channels_last: bool = _f(True, "channels-last memory format for model and images")
    threads: int | None = _f(None, "torch.set_num_threads (None: leave torch's default)")
    # what is recorded
    grad_norm_every: int = _f(50, "log per-layer gradient norms every k steps (0: never) ...")
    grad_norm_first: int = _f(20, "... and at each of the first k steps")
    checkpoint_every: int | None = _f(None, "checkpoint every k steps and at epoch ends "
                                            "(None: at every evaluation; 0: at epoch ends only)")
    max_steps: int | None = _f(None, "stop after this many steps in all (for tests and smoke runs)")

    def __post_init__(self):
        for name in ("lr_steps", "scale_range"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the field, the value given and what is allowed."""
        def need(name, ok, allowed):
            if not ok:
                raise ConfigError(name, getattr(self, name), allowed)

        def is_int(v, low=None):
            return isinstance(v, int) and not isinstance(v, bool) and (low is None or v >= low)

        def is_num(v, low=None, high=None, low_open=False, high_open=False):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                return False
            return ((low is None or (v > low if low_open else v >= low))
                    and (high is None or (v < high if high_open else v <= high)))

        for name in ("model", "activation", "init", "dataset", "eval_views", "lr_schedule", "device"):
            choices = type(self).__dataclass_fields__[name].metadata["choices"]
            need(name, getattr(self, name) in choices, "one of " + ", ".join(map(repr, choices)))
        need("experiment", isinstance(self.experiment, str) and self.experiment.strip() not in ("", ".", "..")
             and "/" not in self.experiment and "\\" not in self.experiment, "a non-empty name without '/'")
        need("width", is_num(self.width, 0, low_open=True), "a number > 0")
        need("extra_layers", is_int(self.extra_layers, 0), "an integer >= 0")
        need("dropout", is_num(self.dropout, 0, 1, high_open=True), "a number in [0, 1)")
        need("init_std", is_num(self.init_std, 0, low_open=True), "a number > 0")
        need("data_dir", self.data_dir is None or (isinstance(self.data_dir, str) and self.data_dir.strip() != ""),
             "a folder, or None")
        need("data_dir", self.dataset != "imagefolder" or self.data_dir is not None,
             "a folder with train/<class>/ and val/<class>/ images (dataset 'imagefolder' needs one)")
        need("input_size", is_int(self.input_size, 8), "an integer >= 8")
        need("scale_range", isinstance(self.scale_range, list) and len(self.scale_range) == 2
             and all(is_int(s, 1) for s in self.scale_range) and self.scale_range[0] <= self.scale_range[1],
             "[low, high], integers with low <= high")
        need("eval_resize", is_int(self.eval_resize, 1), "an integer >= 1")
        if self.dataset == "imagefolder":  # a view cannot be larger than the image it is cut from
            need("scale_range", self.scale_range[0] >= self.input_size, f"low >= input_size ({self.input_size})")
            need("eval_resize", self.eval_resize >= self.input_size, f"an integer >= input_size ({self.input_size})")
        need("num_workers", self.num_workers is None or is_int(self.num_workers, 0), "an integer >= 0, or None")
        for name in ("prelu_aware", "augment", "bf16", "channels_last"):
            need(name, isinstance(getattr(self, name), bool), "true or false")
        for name in ("train_subset", "test_subset"):
            need(name, getattr(self, name) is None or is_int(getattr(self, name), 1), "an integer >= 1, or None")
        for name in ("eval_subset", "evals_per_epoch", "epochs", "batch_size", "patience"):
            need(name, is_int(getattr(self, name), 1), "an integer >= 1")
        need("lr", is_num(self.lr, 0, low_open=True), "a number > 0")
        need("lr_steps", isinstance(self.lr_steps, list) and all(is_int(s, 1) for s in self.lr_steps)
             and self.lr_steps == sorted(set(self.lr_steps)), "a list of increasing epochs >= 1")
        need("lr_steps", self.lr_schedule == "steps" or not self.lr_steps, "[] when lr_schedule='plateau'")
        need("momentum", is_num(self.momentum, 0, 1, high_open=True), "a number in [0, 1)")
        need("weight_decay", is_num(self.weight_decay, 0), "a number >= 0")
        need("seed", is_int(self.seed, 0), "an integer >= 0")
        need("threads", self.threads is None or is_int(self.threads, 1), "an integer >= 1, or None")
        need("grad_norm_every", is_int(self.grad_norm_every, 0), "an integer >= 0")
        need("grad_norm_first", is_int(self.grad_norm_first, 0), "an integer >= 0")
        need("checkpoint_every", self.checkpoint_every is None or is_int(self.checkpoint_every, 0),
             "an integer >= 0, or None")
        need("max_steps", self.max_steps is None or is_int(self.max_steps, 1), "an integer >= 1, or None")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(sorted(unknown)[0], d[sorted(unknown)[0]], "a TrainConfig field")
        return cls(**d)


class ConfigError(ValueError):
    """A TrainConfig value that is refused; `.field` names the field."""

    def __init__(self, name: str, value: Any, allowed: str):
        self.field = name
        super().__init__(f"TrainConfig.{name}: got {value!r}; allowed: {allowed}")


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "'cpu' or 'auto' (CUDA is not available here)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# --- 2. the data --------------------------------------------------------------------------

def _random_subset(images, labels, n, seed):
    if n is None:
        return images, labels
    index = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
    return images[index], labels[index]


def make_data(config: TrainConfig, device: torch.device | str | None = None, *, rank: int = 0,
              world: int = 1) -> tuple[Any, dict[str, Any]]:
    """(training batches, {"eval": fixed held-out subset, "test": whole held-out set}) of this rank.

    What `train` needs of a data set:
    - train batches: `len()` = batches an epoch, and `.epoch(epoch, start=b)` yielding (images
      float [B, C, H, W], labels int64 [B]) from batch b on, in an order that depends only on
      (seed, epoch), so a resumed run sees the batches an uninterrupted one would;
    - eval sets: iterables of (images [B, C, H, W] or [B, V, C, H, W] for V views, labels) batches;
    - `data_shape` can tell (channels, input size, classes): in-memory sets from their tensors,
      others from attributes `in_channels`, `input_size`, `num_classes` on the train batches.
    Batches may live on the CPU: `train` moves them to the device. Under torchrun (world > 1)
    each rank gets its part of every batch: the global batch is `batch_size` in all cases.
    An image folder that is missing, empty or laid out wrongly is a ConfigError naming data_dir."""
    device = resolve_device(config.device) if device is None else torch.device(device)
    if config.dataset == "imagefolder":
        return _folder_data(config, rank, world)
    if config.dataset == "fashion-mnist":
        train_images, train_labels = load_fashion_mnist("train")
        test_images, test_labels = load_fashion_mnist("test")  # Fashion-MNIST's held-out 10k
    else:  # "synthetic": uint8 noise made where it is used, random labels
        g = torch.Generator(device=device).manual_seed(DATA_SEED)
        n_train, n_test = config.train_subset or SYNTHETIC_IMAGES, config.test_subset or config.eval_subset
        size = (3, config.input_size, config.input_size)
        train_images, test_images = (torch.randint(0, 256, (n, *size), generator=g, device=device, dtype=torch.uint8)
                                     for n in (n_train, n_test))
        train_labels, test_labels = (torch.randint(0, SYNTHETIC_CLASSES, (n,), generator=g, device=device)
                                     for n in (n_train, n_test))

    train_images, train_labels = _random_subset(train_images, train_labels, config.train_subset, DATA_SEED)
    # One fixed shuffle of the held-out set: the eval subset is its first `eval_subset` images.
    test_images, test_labels = _random_subset(test_images, test_labels, len(test_labels), DATA_SEED + 1)
    eval_images, eval_labels = test_images[:config.eval_subset], test_labels[:config.eval_subset]
    if config.test_subset is not None:
        test_images, test_labels = test_images[:config.test_subset], test_labels[:config.test_subset]
    mean, std = channel_stats(train_images[:1000] if config.dataset == "synthetic" else train_images)
    common = dict(mean=mean, std=std, device=device, channels_last=config.channels_last)
    train_batches = InMemoryBatches(train_images, train_labels, batch_size=config.batch_size, shuffle=True,
                                    augment=config.augment, drop_last=True, seed=config.seed, **common)
    eval_sets = {
        "eval": InMemoryBatches(eval_images, eval_labels, batch_size=EVAL_BATCH_SIZE, shuffle=False, **common),
        "test": InMemoryBatches(test_images, test_labels, batch_size=EVAL_BATCH_SIZE, shuffle=False, **common),
    }
    if config.dataset == "synthetic":  # random labels need not reach the last class: say how many there are
        train_batches.in_channels, train_batches.input_size, train_batches.num_classes = \
            3, config.input_size, SYNTHETIC_CLASSES
    if world > 1:
        return RankShard(train_batches, rank, world), {k: RankShard(v, rank, world) for k, v in eval_sets.items()}
    return train_batches, eval_sets


class RankShard:
    """Rank `rank`'s part of every batch of an in-memory set: the batch split into `world` equal
    parts (in order). Every rank builds the same global batch (same seed, same augmentation) and
    keeps its part, so under DDP the global batch and the data order are the single-process run's.
    Other attributes are the wrapped set's."""

    def __init__(self, batches, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __getattr__(self, name):
        return getattr(self.batches, name)

    def _part(self, batches):
        for x, y in batches:
            yield x.tensor_split(self.world)[self.rank], y.tensor_split(self.world)[self.rank]

    def epoch(self, epoch: int, start: int = 0):
        return self._part(self.batches.epoch(epoch, start=start))

    def __iter__(self):
        return self._part(self.batches)


class EpochSampler(torch.utils.data.Sampler):
    """The training indices of one epoch for one rank of an image folder's DataLoader.

    A permutation of range(n) drawn from (seed, epoch) is cut into global batches of
    `batch_size` (a partial last one is dropped); this rank takes the `rank`-th of `world` equal
    parts of each, from global batch `start` on. Unlike torch's DistributedSampler (a strided
    slice of the whole epoch per rank, with no way to start mid-epoch), every step's global batch
    is the single-process run's, and a resumed run skips batches without decoding them.
    Call `set_epoch(epoch, start)` before iterating the loader."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.steps = n // batch_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return (self.steps - self.start) * (self.batch_size // self.world)

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        per = self.batch_size // self.world
        for b in range(self.start, self.steps):
            first = b * self.batch_size + self.rank * per
            yield from order[first:first + per].tolist()


class FolderBatches:
    """An image folder's training batches as the loop wants them (what `InMemoryBatches` offers):
    `len()` batches an epoch, `.epoch(epoch, start=)`, and the data's shape as attributes.
    The DataLoader's worker processes decode and augment (delving.data.imagefolder's
    `TrainTransform`); `EpochSampler` fixes the order."""

    def __init__(self, dataset: ImageFolderDataset, config: TrainConfig, rank: int, world: int):
        self.sampler = EpochSampler(len(dataset), config.batch_size, config.seed, rank, world)
        # The loader's generator seeds the workers' augmentation draws: one stream per (seed, rank).
        self.loader = train_loader(dataset, batch_size=config.batch_size // world, num_workers=config.num_workers,
                                   sampler=self.sampler, drop_last=True, seed=config.seed * 1_000_003 + rank)
        self.in_channels, self.input_size, self.num_classes = 3, config.input_size, len(dataset.classes)

    def __len__(self) -> int:
        return self.sampler.steps

    def epoch(self, epoch: int, start: int = 0):
        self.sampler.set_epoch(epoch, start)
        yield from self.loader


def _subset(dataset: ImageFolderDataset, index) -> ImageFolderDataset:
    subset = dataset.with_transform(dataset.transform)
    subset.samples = [dataset.samples[i] for i in index]
    subset.targets = [t for _, t in subset.samples]
    return subset


def _folder_data(config: TrainConfig, rank: int, world: int) -> tuple[FolderBatches, dict[str, Any]]:
    """Sec. 4's pipeline over config.data_dir: a random `input_size` crop of the image with its
    shorter side in `scale_range` (and, with `augment`, flips and PCA colour jitter), the
    per-channel ImageNet mean subtracted; held out: shorter side `eval_resize`, centre crop for the
    eval subset, `eval_views` at epoch ends. Each rank evaluates every world-th image."""
    try:
        train_set, val_set = imagefolder_datasets(
            config.data_dir, crop=config.input_size, scale_range=tuple(config.scale_range),
            eval_resize=config.eval_resize, views=config.eval_views, flip_p=0.5 if config.augment else 0.0,
            pca_std=0.1 if config.augment else 0.0)
    except (OSError, ValueError) as e:
        raise ConfigError("data_dir", config.data_dir, f"an ImageNet-style folder; {e}") from None
    g = lambda seed: torch.Generator().manual_seed(seed)
    if config.train_subset is not None:
        train_set = _subset(train_set, torch.randperm(len(train_set), generator=g(DATA_SEED))[:config.train_subset])
    shuffled = torch.randperm(len(val_set), generator=g(DATA_SEED + 1)).tolist()  # as for in-memory sets
    eval_set = _subset(val_set, shuffled[:config.eval_subset]).with_views("center")
    test_set = _subset(val_set, shuffled[:config.test_subset]) if config.test_subset is not None else val_set
    if config.batch_size > len(train_set):
        raise ConfigError("batch_size", config.batch_size, f"at most the {len(train_set)} training images")
    loader = lambda ds, views: eval_loader(ds, batch_size=FOLDER_EVAL_BATCH[views], num_workers=config.num_workers,
                                           sampler=range(rank, len(ds), world))
    return (FolderBatches(train_set, config, rank, world),
            {"eval": loader(eval_set, "center"), "test": loader(test_set, config.eval_views)})


def data_shape(train_batches, eval_sets) -> tuple[int, int, int]:
    """(in_channels, input_size, num_classes) of a data set from `make_data`."""
    if all(hasattr(train_batches, a) for a in ("in_channels", "input_size", "num_classes")):
        return train_batches.in_channels, train_batches.input_size, train_batches.num_classes
    _, in_channels, _, input_size = train_batches.images.shape
    num_classes = int(max(train_batches.labels.max(), *(e.labels.max() for e in eval_sets.values()))) + 1
    return in_channels, input_size, num_classes


# --- 3. the model ---------------------------------------------------------------------------

def make_model(config: TrainConfig, *, in_channels: int, input_size: int, num_classes: int) -> nn.Module:
    """The network, initialised from a generator seeded with config.seed (on the CPU, so the same
    seed gives the same weights on any device)."""
    kwargs = dict(activation=config.activation, num_classes=num_classes, in_channels=in_channels,
                  input_size=input_size, width=config.width, dropout=config.dropout)
    if config.model == "deep30":
        kwargs["extra_layers"] = config.extra_layers
    model = build_model(config.model, **kwargs)
    generator = torch.Generator().manual_seed(config.seed)
    return init_model(model, config.init, std=config.init_std, prelu_aware=config.prelu_aware,
                      generator=generator)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two SGD groups: Conv2d/Linear weights with `weight_decay`; everything else (biases, PReLU
    coefficients a) with none: Sec. 2.1, decay on a would push it toward 0, i.e. toward ReLU."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            is_weight = isinstance(module, (nn.Conv2d, nn.Linear)) and name == "weight"
            (decay if is_weight else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --- 4. evaluation ----------------------------------------------------------------------------

def topk_wrong(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """How many labels are not among the top-k logits, for each k (a long tensor, no sync)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # [N, kmax]
    hit = top == labels[:, None]
    return torch.stack([~hit[:, :k].any(dim=1) for k in ks]).sum(dim=1)


def topk_errors(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[float]:
    """Top-k error rates (fractions in [0, 1]) of one batch, for each k."""
    return (topk_wrong(logits, labels, ks).double() / len(labels)).tolist()


@torch.inference_mode()
def evaluate(model: nn.Module, batches, *, bf16: bool = False, ks=(1, 5), channels_last: bool = False,
             distributed: bool = False) -> list[float]:
    """Top-k errors of `model` over a whole evaluation set (batches of (images, labels)), in eval
    mode (no dropout). Batches of images [B, V, C, H, W] hold V views of each image (10-view
    testing): an image's scores are its views' softmax outputs averaged, as in the paper.
    distributed: each rank scored its share; the counts are summed over the ranks."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    wrong, n = torch.zeros(len(ks), dtype=torch.long, device=device), torch.zeros((), dtype=torch.long, device=device)
    for x, y in batches:
        views = x.shape[1] if x.ndim == 5 else 1
        x = x.flatten(0, 1) if x.ndim == 5 else x
        x = x.to(device, non_blocking=True, memory_format=memory_format).float()
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            scores = model(x).float()
        if views > 1:
            scores = scores.softmax(dim=1).view(len(y), views, -1).mean(dim=1)
        wrong += topk_wrong(scores, y, ks)
        n += len(y)
    model.train(was_training)
    if distributed:
        dist.all_reduce(wrong)
        dist.all_reduce(n)
    return (wrong.double() / n).tolist()


def prelu_rows(model: nn.Module, step: int, epoch: float) -> list[dict[str, Any]]:
    """The PReLU coefficients a after each layer (Table 1's columns): mean, spread and range over
    the layer's channels (one a for channel-shared PReLU); [] for ReLU networks."""
    rows = []
    for layer, a in model.prelu_coefficients().items():
        a = a.detach().float().cpu()
        rows.append({"step": step, "epoch": epoch, "layer": layer, "channels": a.numel(), "mean": a.mean().item(),
                     "std": a.std().item() if a.numel() > 1 else 0.0, "min": a.min().item(), "max": a.max().item()})
    return rows


def grad_norm_rows(model: nn.Module, step: int) -> list[dict[str, Any]]:
    """L2 norm of each weight layer's weight.grad (and of the weight), by the paper's layer names."""
    layers = model.weight_layers()
    norms = torch.stack([torch.stack([m.weight.grad.detach().float().norm(), m.weight.detach().float().norm()])
                         for _, m in layers]).tolist()  # one sync for all layers
    return [{"step": step, "layer": name, "index": i, "grad_norm": g, "weight_norm": w}
            for i, ((name, _), (g, w)) in enumerate(zip(layers, norms), start=1)]


# --- 5. checkpoints ---------------------------------------------------------------------------

def save_checkpoint(path: Path, config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> None:
    """Everything needed to continue exactly: tensors and plain containers only (weights_only load)."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    results.atomic_torch_save({"format": CHECKPOINT_FORMAT, "config": config.to_dict(),
                               "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "rng": rng, "state": dict(state)}, path)


def load_checkpoint(path: Path, config: TrainConfig, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Restore model, optimizer and RNG from `path` and return the loop state saved with them.
    Refuses, naming the file, a checkpoint written for another configuration or model."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} cannot be read: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a delving.train checkpoint (format {CHECKPOINT_FORMAT})")
    saved, wanted = ckpt["config"], config.to_dict()
    diff = [f"{k}={saved.get(k)!r} there, {wanted.get(k)!r} here" for k in wanted if saved.get(k) != wanted[k]]
    if diff:
        raise ValueError(f"checkpoint {path} was written for another configuration: " + "; ".join(diff))
    try:
        model.load_state_dict(ckpt["model"])
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"checkpoint {path} does not fit this model: {e}") from None
    torch.set_rng_state(ckpt["rng"]["torch"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["state"]


def _same_params(params: dict[str, Any], config: TrainConfig) -> bool:
    return params == json.loads(json.dumps(config.to_dict()))


def open_or_start_run(config: TrainConfig, resume: str | Path | None, device: torch.device) -> results.Run:
    """resume=None: a new run. "auto": the newest unfinished run of the experiment with identical
    params that no live process is writing, else a new one. A run directory: that run (same params,
    not finished, not in use)."""
    if resume == "auto":
        candidates = [r for r in results.find_runs(config.experiment, finished=False)
                      if not r.finished and _same_params(r.params, config)]
        for candidate in reversed(candidates):  # newest first; one a live process holds is not ours
            try:
                return results.open_run(candidate.dir)
            except results.RunInUse:
                continue
    elif resume is not None:
        run = results.open_run(Path(resume))
        if (run.dir / "summary.json").exists():
            raise ValueError(f"run {run.dir} is finished ({results.load_run(run.dir).status}); nothing to resume")
        if not _same_params(run.params, config):
            diff = [k for k, v in config.to_dict().items() if run.params.get(k) != json.loads(json.dumps(v))]
            raise ValueError(f"run {run.dir} was started with other params ({', '.join(diff)} differ)")
        return run
    return results.start_run(config.experiment, config.to_dict(), device=str(device), seed=config.seed)


# --- 6. training ------------------------------------------------------------------------------

def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _summary(run: results.Run, state: dict[str, Any]) -> dict[str, Any]:
    rows = run.rows("metrics")
    last = lambda key: next((_number(r[key]) for r in reversed(rows) if math.isfinite(_number(r.get(key)))), None)
    trained = [r for r in rows if _number(r["step"]) > 0]  # "best" of a trained network, not of the init
    best = lambda key: min((_number(r[key]) for r in trained if math.isfinite(_number(r.get(key)))), default=None)
    return {
        "final_test_top1": last("test_top1"), "final_test_top5": last("test_top5"),
        "final_eval_top1": last("eval_top1"), "final_eval_top5": last("eval_top5"),
        "best_test_top1": best("test_top1"), "best_eval_top1": best("eval_top1"),
        "steps": state["step"], "epochs": round(state["step"] / max(state["steps_per_epoch"], 1), 4),
        "train_time_s": state["train_time"],
        "images_per_s": state["images"] / state["train_time"] if state["train_time"] > 0 else None,
    }


@contextlib.contextmanager
def process_group(device: torch.device):
    """Under torchrun (WORLD_SIZE > 1 in the environment): join the process group from torchrun's
    RANK / WORLD_SIZE / LOCAL_RANK (NCCL on GPUs, each process on GPU LOCAL_RANK; gloo on CPUs),
    yield (rank, world size, device), and leave the group at the end. Otherwise yield (0, 1, device).
    A group that the caller set up already is used and left for the caller to destroy."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield 0, 1, device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    ours = not dist.is_initialized()
    if ours:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    try:
        yield dist.get_rank(), dist.get_world_size(), device
    finally:
        if ours:
            dist.destroy_process_group()


def _mean_over_ranks(loss: torch.Tensor, world: int) -> float:
    """The loss of the global batch: this rank's part's, averaged over the ranks (the one sync a step)."""
    if world == 1:
        return loss.item()
    total = loss.detach().float().clone()
    dist.all_reduce(total)
    return total.item() / world


def train(config: TrainConfig, *, resume: str | Path | None = None, progress: bool = True) -> results.Record | None:
    """Train as `config` says; returns the finished record ("completed" or "diverged").
    Under torchrun every process calls this; rank 0 returns the record, the others None."""
    config.validate()  # before any work: a bad value costs nothing
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    with process_group(resolve_device(config.device)) as (rank, world, device):
        distributed = world > 1
        if config.batch_size % world:
            raise ConfigError("batch_size", config.batch_size, f"a multiple of the {world} processes")
        torch.backends.cudnn.benchmark = device.type == "cuda"

        # Data, model and optimiser. The same seed gives the same weights, data order and dropout.
        torch.manual_seed(config.seed)
        train_batches, eval_sets = make_data(config, device, rank=rank, world=world)
        in_channels, input_size, num_classes = data_shape(train_batches, eval_sets)
        memory_format = torch.channels_last if config.channels_last else torch.preserve_format
        net = make_model(config, in_channels=in_channels, input_size=input_size, num_classes=num_classes)
        net = net.to(device, memory_format=memory_format)
        optimizer = torch.optim.SGD(param_groups(net, config.weight_decay), lr=config.lr, momentum=config.momentum)
        steps_per_epoch = len(train_batches)
        n = config.evals_per_epoch  # evaluate after these many batches of an epoch; the last is its end
        eval_points = {round(k * steps_per_epoch / n) for k in range(1, n + 1)}
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16)

        # The run record (rank 0's), and where training stands: from scratch, or from the last checkpoint.
        run = open_or_start_run(config, resume, device) if rank == 0 else None
        try:
            run_dir = run.dir if run else None
            if distributed:  # every rank reads the same checkpoint
                shared = [str(run_dir) if run else None]
                dist.broadcast_object_list(shared, src=0)
                run_dir = Path(shared[0])
            state = {"epoch": 0, "batch": 0, "step": 0, "steps_per_epoch": steps_per_epoch,
                     "lr": config.lr, "best_test_top1": math.inf, "bad_epochs": 0, "lr_drops": 0,  # schedule
                     "loss_sum": 0.0, "loss_count": 0, "row_images": 0, "row_time": 0.0,  # since the last row
                     "images": 0, "train_time": 0.0, "metric_rows": 0, "grad_rows": 0, "prelu_rows": 0}
            if (run_dir / "checkpoint.pt").exists():
                state = load_checkpoint(run_dir / "checkpoint.pt", config, net, optimizer)
            if rank > 0:  # dropout: rank 0 draws the single-process run's masks, the others their own
                torch.manual_seed(config.seed + 1_000_003 * rank + state["step"])
            model = DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None) \
                if distributed else net  # the forward/backward of training; `net` for everything else
            tables = {"metrics": state["metric_rows"], "grad_norms": state["grad_rows"], "prelu": state["prelu_rows"]}
            for table, keep in tables.items() if run else ():
                if len(run.rows(table)) > keep:  # rows logged after the checkpoint are done again
                    run.truncate(table, keep)
            grad_rows = run.rows("grad_norms") if run else []  # kept in memory, written with each checkpoint
            a_rows = run.rows("prelu") if run else []

            def save():  # rank 0
                if grad_rows:
                    run.write_table("grad_norms", grad_rows)
                state["metric_rows"], state["grad_rows"] = len(run.rows("metrics")), len(grad_rows)
                state["prelu_rows"] = len(a_rows)
                save_checkpoint(run.checkpoint_path, config, net, optimizer, state)
                run.save_elapsed()

            def log_row(test: bool) -> dict[str, Any]:  # every rank evaluates its share; rank 0 writes
                ev = dict(bf16=config.bf16, channels_last=config.channels_last, distributed=distributed)
                eval_top1, eval_top5 = evaluate(net, eval_sets["eval"], **ev)
                test_top1, test_top5 = evaluate(net, eval_sets["test"], **ev) if test else (math.nan,) * 2
                epoch = round(state["step"] / steps_per_epoch, 4)
                row = {"epoch": epoch, "step": state["step"], "lr": state["lr"],
                       "train_loss": state["loss_sum"] / state["loss_count"] if state["loss_count"] else math.nan,
                       "eval_top1": eval_top1, "eval_top5": eval_top5, "test_top1": test_top1, "test_top5": test_top5,
                       "images_per_s": state["row_images"] / state["row_time"] if state["row_time"] > 0 else math.nan}
                if run:
                    run.log(row)
                    a_rows.extend(prelu_rows(net, state["step"], epoch))
                    if a_rows:
                        run.write_table("prelu", a_rows)
                state.update(loss_sum=0.0, loss_count=0, row_images=0, row_time=0.0)
                return row

            if state["step"] == 0 and state["metric_rows"] == 0:
                log_row(test=False)  # epoch 0: the untrained network (the left end of Figs. 2-3)
            total = min(config.epochs * steps_per_epoch, config.max_steps or math.inf)
            bar = tqdm(total=total, initial=min(state["step"], total), disable=not progress or rank > 0, unit="step",
                       desc=f"{config.experiment}/{run_dir.name}", dynamic_ncols=True)
            last_err = _number(run.rows("metrics")[-1]["eval_top1"]) if run and run.rows("metrics") else math.nan
            model.train()
            stop = state["step"] >= total
            while state["epoch"] < config.epochs and not stop:
                if config.lr_schedule == "steps":
                    state["lr"] = config.lr * 0.1 ** sum(state["epoch"] >= s for s in config.lr_steps)
                for group in optimizer.param_groups:
                    group["lr"] = state["lr"]
                t0 = time.perf_counter()
                for x, y in train_batches.epoch(state["epoch"], start=state["batch"]):
                    x = x.to(device, non_blocking=True, memory_format=memory_format)  # no-op if there
                    y = y.to(device, non_blocking=True)
                    with autocast():
                        loss = F.cross_entropy(model(x), y)
                    loss_value = _mean_over_ranks(loss, world)  # the one sync a step: is the loss still finite?
                    step = state["step"] + 1
                    if not math.isfinite(loss_value):  # the same on every rank: all stop here
                        bar.close()
                        state["train_time"] += time.perf_counter() - t0
                        if not run:
                            return None
                        if grad_rows:
                            run.write_table("grad_norms", grad_rows)
                        return run.finish({**_summary(run, state), "diverged_at_step": step,
                                           "message": f"diverged at step {step} (loss {loss_value})"}, status="diverged")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()  # under DDP: the gradients are averaged over the ranks here
                    if run and (step <= config.grad_norm_first
                                or (config.grad_norm_every and step % config.grad_norm_every == 0)):
                        grad_rows.extend(grad_norm_rows(net, step))
                    optimizer.step()

                    state["step"], state["batch"] = step, state["batch"] + 1
                    state["loss_sum"] += loss_value
                    state["loss_count"] += 1
                    state["row_images"] += len(y) * world
                    state["images"] += len(y) * world
                    bar.update(1)
                    if step % 10 == 0:
                        bar.set_postfix(loss=f"{loss_value:.3f}", err=f"{last_err:.3f}", refresh=False)

                    epoch_end, stop = state["batch"] == steps_per_epoch, step >= total
                    evaluate_now = state["batch"] in eval_points or stop
                    if config.checkpoint_every is None:
                        checkpoint_now = evaluate_now
                    else:
                        every = config.checkpoint_every
                        checkpoint_now = epoch_end or stop or (every > 0 and step % every == 0)
                    if evaluate_now or checkpoint_now:
                        elapsed = time.perf_counter() - t0  # training time only: evaluation is not counted
                        state["row_time"] += elapsed
                        state["train_time"] += elapsed
                        if evaluate_now:
                            row = log_row(test=epoch_end or stop)
                            last_err = row["eval_top1"]
                            bar.set_postfix(loss=f"{loss_value:.3f}", err=f"{last_err:.3f}")
                        if epoch_end:
                            state["epoch"], state["batch"] = state["epoch"] + 1, 0
                            if config.lr_schedule == "plateau":
                                _plateau_step(config, state, row["test_top1"])
                        if checkpoint_now and run:
                            save()
                        t0 = time.perf_counter()
                    if stop:
                        break
            bar.close()  # the last step was checkpointed (epoch end or max_steps)
            return run.finish(_summary(run, state), status="completed") if run else None
        except BaseException:
            if run:  # a failed or interrupted run is released: the next process may resume it
                run.close()
            raise


def _plateau_step(config: TrainConfig, state: dict[str, Any], test_top1: float) -> None:
    """Divide lr by 10 when held-out top-1 error has not improved for `patience` epochs."""
    if test_top1 < state["best_test_top1"]:
        state["best_test_top1"], state["bad_epochs"] = test_top1, 0
        return
    state["bad_epochs"] += 1
    if state["bad_epochs"] >= config.patience and state["lr_drops"] < PLATEAU_MAX_DROPS:
        state["lr"], state["bad_epochs"], state["lr_drops"] = state["lr"] / 10, 0, state["lr_drops"] + 1


# --- 7. the command line ------------------------------------------------------------------------

def _optional_int(text: str) -> int | None:
    if text.lower() == "none":
        return None
    return int(text)


def _optional_str(text: str) -> str | None:
    return None if text.lower() == "none" else text


def build_parser() -> argparse.ArgumentParser:
    """One option per TrainConfig field (--batch-size for batch_size), plus --resume, --no-progress."""
    parser = argparse.ArgumentParser(prog="python -m delving.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        option, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        kw = {"help": f.metadata["help"].replace("%", "%%"), "default": default}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if isinstance(default, bool):
            parser.add_argument(option, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, list):
            parser.add_argument(option, type=int, nargs="*", metavar="N", **kw)
        elif default is None and str(f.type).startswith("str"):
            parser.add_argument(option, type=_optional_str, metavar="PATH|none", **kw)
        elif default is None:
            parser.add_argument(option, type=_optional_int, metavar="N|none", **kw)
        else:
            parser.add_argument(option, type=type(default), **kw)
    parser.add_argument("--resume", default=None, metavar="auto|RUN_DIR",
                        help="'auto': continue the newest unfinished run with the same params (else start "
                             "one); RUN_DIR: continue that run, with the params it was started with")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    try:
        if args.resume not in (None, "auto"):  # a run directory: its own params
            run_dir = Path(args.resume)
            if not (run_dir / "params.json").is_file():
                parser.error(f"argument --resume: {run_dir} is not a run directory (no params.json)")
            options = json.loads((run_dir / "params.json").read_text())
        config = TrainConfig.from_dict(options)
        resolve_device(config.device)
    except ConfigError as e:
        parser.error(f"argument --{e.field.replace('_', '-')}: {e}")
    try:
        record = train(config, resume=args.resume, progress=args.progress)
    except ConfigError as e:  # found when the data is opened: a missing or empty data folder
        parser.error(f"argument --{e.field.replace('_', '-')}: {e}")
    except ValueError as e:
        if args.resume is None:
            raise
        parser.error(f"argument --resume: {e}")  # a run or checkpoint that cannot be resumed
    if record is None:  # a torchrun process other than rank 0: rank 0 reports
        return 0
    print(record.summary.get("message") or record.status, file=sys.stderr)
    print(record.dir)
    return 0


def config_argv(config: TrainConfig) -> list[str]:
    """The command-line options that give `config` back (build_parser's inverse)."""
    argv = []
    for f in dataclasses.fields(TrainConfig):
        option, value = "--" + f.name.replace("_", "-"), getattr(config, f.name)
        if isinstance(value, bool):
            argv.append(option if value else "--no-" + option[2:])
        elif isinstance(value, list):
            argv += [option, *map(str, value)]
        else:
            argv += [option, "none" if value is None else str(value)]
    return argv


def torchrun_command(config: TrainConfig, nproc: int, *, resume: str | Path | None = None) -> list[str]:
    """`torchrun --standalone --nproc_per_node <nproc> -m delving.train <config's options> --no-progress`."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    extra = ["--resume", str(resume)] if resume is not None else []
    return [*launcher, "--standalone", "--nproc_per_node", str(nproc), "-m", "delving.train",
            *config_argv(config), *extra, "--no-progress"]


def train_torchrun(config: TrainConfig, nproc: int, *, resume: str | Path | None = None,
                   timeout: float | None = None) -> results.Record:
    """Train `config` with DDP in `nproc` processes (one per GPU, or gloo on CPUs) started by
    torchrun, and return the record rank 0 wrote (it prints the run directory last).
    A failure raises RuntimeError with the end of the processes' output."""
    proc = subprocess.run(torchrun_command(config, nproc, resume=resume), capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"torchrun exited with {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return results.load_run(lines[-1])


if __name__ == "__main__":
    sys.exit(main())
