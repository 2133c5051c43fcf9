"""Train one network the way Sec. 3 of He et al. (2015) trains theirs, and keep a record of it.

    python -m delving.train --model deep30 --init he-fan-out --epochs 1

The whole path, top to bottom (one function, `train`):

1. `TrainConfig` says everything a run depends on; it is checked first and becomes the run's
   params.json, so a run is reproduced by its params alone.
2. `make_data` loads the data into memory (`InMemoryBatches`: no DataLoader, no per-sample
   Python) and fixes the evaluation sets: a fixed random `eval_subset` of held-out images,
   evaluated `evals_per_epoch` times an epoch (the paper's 3,000 random val images of
   Figs. 2-3), and the whole held-out set at every epoch end.
3. `make_model` builds the network (`delving.models`) and initialises it (`delving.init`) from a
   generator seeded with `seed`; `param_groups` keeps weight decay off biases and PReLU
   coefficients (Sec. 2.1: decay would push a toward 0).
4. SGD with momentum 0.9, weight decay 5e-4, mini-batches, lr 1e-2 divided by 10 at fixed epochs
   (`lr_steps`) or when held-out error plateaus (`lr_schedule="plateau"`), dropout 0.5 on fc1, fc2.
5. Every step: forward (bf16 autocast if asked), a finiteness check of the loss (a non-finite
   loss ends the run as "diverged"), backward, per-layer gradient norms every `grad_norm_every`
   steps (the "diminishing gradients" of Sec. 2.2), the update.
6. At each evaluation point a row goes to metrics.csv and the training state to checkpoint.pt
   (atomically), so a killed run resumes (`resume="auto"` or a run directory) and ends with the
   same numbers as an uninterrupted one.

Runs are read back with `delving.results` (`load_run`, `find_runs`, `latest_run`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from delving import results
from delving.data import InMemoryBatches, channel_stats, load_fashion_mnist
from delving.init import SCHEMES, init_model
from delving.models import ACTIVATIONS, MODELS, build_model

DATASETS = ("fashion-mnist",)  # an image-folder data set plugs in here and in `make_data`
DEVICES = ("auto", "cpu", "cuda")
LR_SCHEDULES = ("steps", "plateau")
PLATEAU_MAX_DROPS = 2  # the paper's 1e-2 -> 1e-3 -> 1e-4: two drops, then the lr stays
DATA_SEED = 0  # the train/eval subsets are the same in every run; `seed` draws init, order, dropout
EVAL_BATCH_SIZE = 1000
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
    dataset: str = _f("fashion-mnist", "data set", choices=DATASETS)
    train_subset: int | None = _f(None, "train on this many random training images (None: all)")
    eval_subset: int = _f(3000, "size of the fixed random held-out subset evaluated within epochs "
                                "(the paper's 3,000 val images)")
    test_subset: int | None = _f(None, "evaluate at epoch ends on this many held-out images (None: all; "
                                       "smaller for smoke runs)")
    evals_per_epoch: int = _f(4, "evaluations of the eval subset per epoch (the last one at epoch end)")
    augment: bool = _f(False, "random flips and 2-pixel translations of training images")
    # the optimisation (Sec. 3)
    epochs: int = _f(10, "training epochs")
    batch_size: int = _f(128, "mini-batch size (Sec. 3: 128)")
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
        if isinstance(self.lr_steps, tuple):
            self.lr_steps = list(self.lr_steps)
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

        for name in ("model", "activation", "init", "dataset", "lr_schedule", "device"):
            choices = type(self).__dataclass_fields__[name].metadata["choices"]
            need(name, getattr(self, name) in choices, "one of " + ", ".join(map(repr, choices)))
        need("experiment", isinstance(self.experiment, str) and self.experiment.strip() not in ("", ".", "..")
             and "/" not in self.experiment and "\\" not in self.experiment, "a non-empty name without '/'")
        need("width", is_num(self.width, 0, low_open=True), "a number > 0")
        need("extra_layers", is_int(self.extra_layers, 0), "an integer >= 0")
        need("dropout", is_num(self.dropout, 0, 1, high_open=True), "a number in [0, 1)")
        need("init_std", is_num(self.init_std, 0, low_open=True), "a number > 0")
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


def make_data(config: TrainConfig, device: torch.device | str | None = None
              ) -> tuple[InMemoryBatches, dict[str, InMemoryBatches]]:
    """(training batches, {"eval": fixed held-out subset, "test": whole held-out set}).

    What `train` needs of a data set (an image-folder set adds a branch here):
    - train batches: `len()` = batches an epoch, and `.epoch(epoch, start=b)` yielding (images
      float [B, C, H, W], labels int64 [B]) from batch b on, in an order that depends only on
      (seed, epoch), so a resumed run sees the batches an uninterrupted one would;
    - eval sets: iterables of (images, labels) batches, in a fixed order;
    - `data_shape` can tell (channels, input size, classes): in-memory sets from their tensors,
      others from attributes `in_channels`, `input_size`, `num_classes` on the train batches.
    Batches may live on the CPU: `train` moves them to the device."""
    device = resolve_device(config.device) if device is None else torch.device(device)
    if config.dataset == "fashion-mnist":
        train_images, train_labels = load_fashion_mnist("train")
        test_images, test_labels = load_fashion_mnist("test")  # Fashion-MNIST's held-out 10k
    else:  # unreachable after validation; the hook for the next data set
        raise ConfigError("dataset", config.dataset, "one of " + ", ".join(map(repr, DATASETS)))

    train_images, train_labels = _random_subset(train_images, train_labels, config.train_subset, DATA_SEED)
    # One fixed shuffle of the held-out set: the eval subset is its first `eval_subset` images.
    test_images, test_labels = _random_subset(test_images, test_labels, len(test_labels), DATA_SEED + 1)
    eval_images, eval_labels = test_images[:config.eval_subset], test_labels[:config.eval_subset]
    if config.test_subset is not None:
        test_images, test_labels = test_images[:config.test_subset], test_labels[:config.test_subset]
    mean, std = channel_stats(train_images)
    common = dict(mean=mean, std=std, device=device, channels_last=config.channels_last)
    train_batches = InMemoryBatches(train_images, train_labels, batch_size=config.batch_size, shuffle=True,
                                    augment=config.augment, drop_last=True, seed=config.seed, **common)
    eval_sets = {
        "eval": InMemoryBatches(eval_images, eval_labels, batch_size=EVAL_BATCH_SIZE, shuffle=False, **common),
        "test": InMemoryBatches(test_images, test_labels, batch_size=EVAL_BATCH_SIZE, shuffle=False, **common),
    }
    return train_batches, eval_sets


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
def evaluate(model: nn.Module, batches, *, bf16: bool = False, ks=(1, 5)) -> list[float]:
    """Top-k errors of `model` over a whole evaluation set (batches of (images, labels)), in eval
    mode (no dropout)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    wrong, n = 0, 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        wrong = wrong + topk_wrong(logits.float(), y, ks)
        n += len(y)
    model.train(was_training)
    return (wrong.double() / n).tolist()


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
    params, else a new one. A run directory: that run (same params, not finished)."""
    if resume == "auto":
        candidates = [r for r in results.find_runs(config.experiment, finished=False)
                      if not r.finished and _same_params(r.params, config)]
        if candidates:
            return results.open_run(candidates[-1].dir)
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


def train(config: TrainConfig, *, resume: str | Path | None = None, progress: bool = True) -> results.Record:
    """Train as `config` says; returns the finished record ("completed" or "diverged")."""
    config.validate()  # before any work: a bad value costs nothing
    device = resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)

    # Data, model and optimiser. The same seed gives the same weights, data order and dropout.
    torch.manual_seed(config.seed)
    train_batches, eval_sets = make_data(config, device)
    in_channels, input_size, num_classes = data_shape(train_batches, eval_sets)
    model = make_model(config, in_channels=in_channels, input_size=input_size, num_classes=num_classes)
    model = model.to(device, memory_format=torch.channels_last if config.channels_last else torch.preserve_format)
    optimizer = torch.optim.SGD(param_groups(model, config.weight_decay), lr=config.lr, momentum=config.momentum)
    steps_per_epoch = len(train_batches)
    n = config.evals_per_epoch  # evaluate after these many batches of an epoch; the last is its end
    eval_points = {round(k * steps_per_epoch / n) for k in range(1, n + 1)}
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16)

    # The run record, and where training stands: from scratch, or from the last checkpoint.
    run = open_or_start_run(config, resume, device)
    state = {"epoch": 0, "batch": 0, "step": 0, "steps_per_epoch": steps_per_epoch,
             "lr": config.lr, "best_test_top1": math.inf, "bad_epochs": 0, "lr_drops": 0,  # schedule
             "loss_sum": 0.0, "loss_count": 0, "row_images": 0, "row_time": 0.0,  # since the last row
             "images": 0, "train_time": 0.0, "metric_rows": 0, "grad_rows": 0}
    if run.checkpoint_path.exists():
        state = load_checkpoint(run.checkpoint_path, config, model, optimizer)
    for table, keep in (("metrics", state["metric_rows"]), ("grad_norms", state["grad_rows"])):
        if len(run.rows(table)) > keep:  # rows logged after the checkpoint are done again
            run.truncate(table, keep)
    grad_rows = run.rows("grad_norms")  # kept in memory, written with each checkpoint

    def save():
        if grad_rows:
            run.write_table("grad_norms", grad_rows)
        state["metric_rows"], state["grad_rows"] = len(run.rows("metrics")), len(grad_rows)
        save_checkpoint(run.checkpoint_path, config, model, optimizer, state)
        run.save_elapsed()

    def log_row(test: bool) -> dict[str, Any]:
        eval_top1, eval_top5 = evaluate(model, eval_sets["eval"], bf16=config.bf16)
        test_top1, test_top5 = evaluate(model, eval_sets["test"], bf16=config.bf16) if test else (math.nan,) * 2
        row = {"epoch": round(state["step"] / steps_per_epoch, 4), "step": state["step"], "lr": state["lr"],
               "train_loss": state["loss_sum"] / state["loss_count"] if state["loss_count"] else math.nan,
               "eval_top1": eval_top1, "eval_top5": eval_top5, "test_top1": test_top1, "test_top5": test_top5,
               "images_per_s": state["row_images"] / state["row_time"] if state["row_time"] > 0 else math.nan}
        run.log(row)
        state.update(loss_sum=0.0, loss_count=0, row_images=0, row_time=0.0)
        return row

    if state["step"] == 0 and not run.rows("metrics"):
        log_row(test=False)  # epoch 0: the untrained network (the left end of Figs. 2-3)
    total = min(config.epochs * steps_per_epoch, config.max_steps or math.inf)
    bar = tqdm(total=total, initial=min(state["step"], total), disable=not progress, unit="step",
               desc=f"{config.experiment}/{run.run_id}", dynamic_ncols=True)
    last_err = _number(run.rows("metrics")[-1]["eval_top1"]) if run.rows("metrics") else math.nan
    model.train()
    stop = state["step"] >= total
    while state["epoch"] < config.epochs and not stop:
        if config.lr_schedule == "steps":
            state["lr"] = config.lr * 0.1 ** sum(state["epoch"] >= s for s in config.lr_steps)
        for group in optimizer.param_groups:
            group["lr"] = state["lr"]
        t0 = time.perf_counter()
        for x, y in train_batches.epoch(state["epoch"], start=state["batch"]):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # no-op if there
            with autocast():
                loss = F.cross_entropy(model(x), y)
            loss_value = loss.item()  # the one sync a step: is the loss still finite?
            step = state["step"] + 1
            if not math.isfinite(loss_value):
                bar.close()
                if grad_rows:
                    run.write_table("grad_norms", grad_rows)
                state["train_time"] += time.perf_counter() - t0
                return run.finish({**_summary(run, state), "diverged_at_step": step,
                                   "message": f"diverged at step {step} (loss {loss_value})"}, status="diverged")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if step <= config.grad_norm_first or (config.grad_norm_every and step % config.grad_norm_every == 0):
                grad_rows.extend(grad_norm_rows(model, step))
            optimizer.step()

            state["step"], state["batch"] = step, state["batch"] + 1
            state["loss_sum"] += loss_value
            state["loss_count"] += 1
            state["row_images"] += len(y)
            state["images"] += len(y)
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
                    last_err = log_row(test=epoch_end or stop)["eval_top1"]
                    bar.set_postfix(loss=f"{loss_value:.3f}", err=f"{last_err:.3f}")
                if epoch_end:
                    state["epoch"], state["batch"] = state["epoch"] + 1, 0
                    if config.lr_schedule == "plateau":
                        _plateau_step(config, state, _number(run.rows("metrics")[-1]["test_top1"]))
                if checkpoint_now:
                    save()
                t0 = time.perf_counter()
            if stop:
                break
    bar.close()  # the last step was checkpointed (epoch end or max_steps)
    return run.finish(_summary(run, state), status="completed")


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
        elif f.name == "lr_steps":
            parser.add_argument(option, type=int, nargs="*", metavar="EPOCH", **kw)
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
    except ValueError as e:
        if args.resume is None:
            raise
        parser.error(f"argument --resume: {e}")  # a run or checkpoint that cannot be resumed
    print(record.summary.get("message") or record.status, file=sys.stderr)
    print(record.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
