"""Chapter 2: do deep plain rectifier networks converge from He's and from Xavier's initialisation?

Figs. 2 and 3 of He et al. (2015) train the 22-layer model B and the 30-layer model twice each,
from He's initialisation (Eq. 14, the one the paper's models used) and from the paper's
"Xavier" (n Var[w] = 1), and plot top-1 error on 3,000 held-out images against epochs: at 22
layers both converge and He starts earlier; at 30 layers Xavier "completely stalls", its
gradients diminishing. The paper's 30-layer model is also worse than the 14-layer one (Sec. 5).

`plan(P)` turns the chapter's parameters into training configurations (`delving.train`):

    main    model_b and deep30, He (P["he_init"]: Eq. 14 or Eq. 10) and Xavier: the same seed,
            data, schedule and lr
    depth   small14 with He, under exactly the settings of the deep30 He run (30 vs 14 layers)
    sweep   `sweep_model` with every init of `sweep_inits` at every lr of `sweep_lrs`

`run(P)` trains each configuration, or reuses a finished run of experiment "convergence" whose
params are identical (so re-running the chapter costs nothing), resumes an unfinished one, and
returns the records. Everything the chapter reports is computed from the records by the
functions below: `curve`, `left_chance_epoch`, `first_steps_grad_norms`, `grad_ratio`, `findings`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd

from delving import results, train

EXPERIMENT = "convergence"
SCHEMES = ("he-fan-out", "he-fan-in", "he-fan-out-conv", "xavier")  # the paper's models used Eq. 14 (fan-out)
INIT_LABELS = {"he-fan-out": "He, Eq. 14 (fan-out)", "he-fan-in": "He, Eq. 10 (fan-in)",
               "he-fan-out-conv": "He, Eq. 14 on convs, Eq. 10 on fc", "xavier": "Xavier (paper's)"}
MODELS = ("model_b", "deep30")  # Fig. 2, Fig. 3
MODEL_LABELS = {"model_b": "22 layers (model B)", "deep30": "30 layers", "small14": "14 layers"}
FIGURE = {"model_b": "Fig. 2", "deep30": "Fig. 3"}
STALLED_TOP1 = 0.85  # the scorecard's default: at or above this (10 classes: chance 0.90) = still at chance

# PAPER.md Sec. 5: top-1 error on 3,000 ImageNet val images (1000 classes, chance 0.999), centre
# crop, *approx.*: read off the plots of Figs. 2 and 3, not tabulated by the paper.
PAPER_CURVES: dict[str, dict[str, list[tuple[float, float]]]] = {
    "model_b": {"he": [(1, 0.956), (2, 0.861), (3, 0.788)],
                "xavier": [(1, 0.980), (2, 0.924), (3, 0.855)]},
    # "about 0.795 at the end" of Fig. 3's ~10 epochs; Xavier "flat at 0.999" over the whole plot
    "deep30": {"he": [(1, 0.974), (3, 0.897), (5, 0.842), (8, 0.807), (10, 0.795)],
               "xavier": [(0.5, 0.999), (10, 0.999)]},
}
PAPER_CHANCE = 0.999


class DatasetUnavailable(RuntimeError):
    """The chosen data set is not supported by this version of `delving.train`."""


# --- the runs ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """One training run of the chapter: its role, what distinguishes it, and its configuration."""

    role: str  # "main" | "depth" | "sweep"
    model: str
    init: str  # an init scheme: "he-fan-out" | "he-fan-in" | "xavier"
    lr: float
    config: train.TrainConfig

    @property
    def key(self) -> str:
        return f"{self.role}/{self.model}/{self.init}/lr={self.lr:g}"


def require_dataset(P: dict[str, Any]) -> None:
    """Stop before any work if `delving.train` cannot load the chosen data set."""
    if P["dataset"] not in train.DATASETS:
        raise DatasetUnavailable(
            f"dataset {P['dataset']!r} needs the ImageNet image-folder loader in delving.train "
            f"(TrainConfig(dataset={P['dataset']!r}, data_dir=...)), which this version does not have "
            f"(it supports: {', '.join(train.DATASETS)}). Nothing was trained.")
    if P["dataset"] == "imagefolder" and not P.get("data_dir"):
        raise DatasetUnavailable("dataset 'imagefolder' needs data_dir: the folder holding train/ and val/")


def config_for(P: dict[str, Any], model: str, init: str, lr: float, *, epochs: int | None = None,
               max_steps: int | None = None) -> train.TrainConfig:
    """The training configuration of one run: everything but model, init, lr and length from P."""
    fields = train.TrainConfig.__dataclass_fields__
    kwargs: dict[str, Any] = dict(
        experiment=EXPERIMENT, model=model, init=init, activation="relu", width=P["width"],
        dataset=P["dataset"], train_subset=P["train_subset"], eval_subset=P["eval_subset"],
        test_subset=P["test_subset"], evals_per_epoch=P["evals_per_epoch"],
        epochs=P["epochs"] if epochs is None else epochs, max_steps=max_steps, batch_size=P["batch_size"], lr=lr,
        lr_schedule="steps", lr_steps=[],  # constant lr: Figs. 2-3 span the paper's first lr (1e-2)
        seed=P["seed"], device=P["device"], bf16=P["bf16"], threads=P["threads"],
        grad_norm_first=P["grad_steps"], grad_norm_every=P["grad_norm_every"])
    if P["dataset"] == "imagefolder":
        kwargs["data_dir"] = P["data_dir"]
        if model == "small14" and "scale_range" in fields:
            kwargs["scale_range"] = [256, 256]  # Sec. 4: the small model trains on 256-side images
    return train.TrainConfig(**kwargs)


def plan(P: dict[str, Any]) -> list[Spec]:
    """The chapter's runs, main runs first. Runs of identical configuration appear once each role
    but are trained once (`run` reuses them)."""
    main_steps = P["max_steps"]
    specs = []
    for model in MODELS:
        epochs = P["model_b_epochs"] if model == "model_b" and P["model_b_epochs"] else P["epochs"]
        for init in (P["he_init"], "xavier"):
            specs.append(Spec("main", model, init, P["lr"],
                              config_for(P, model, init, P["lr"], epochs=epochs, max_steps=main_steps)))
    specs.append(Spec("depth", "small14", P["he_init"], P["lr"],
                      config_for(P, "small14", P["he_init"], P["lr"], max_steps=main_steps)))
    sweep_steps = P["sweep_max_steps"] if P["sweep_max_steps"] is not None else main_steps
    sweep_epochs = P["model_b_epochs"] if P["sweep_model"] == "model_b" and P["model_b_epochs"] else P["epochs"]
    for lr in P["sweep_lrs"]:
        for init in P["sweep_inits"]:
            specs.append(Spec("sweep", P["sweep_model"], init, lr,
                              config_for(P, P["sweep_model"], init, lr, epochs=sweep_epochs, max_steps=sweep_steps)))
    return specs


def _as_json(config: train.TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(config.to_dict()))


def find_finished(config: train.TrainConfig) -> results.Record | None:
    """The newest finished run (completed or diverged) of this exact configuration, if any."""
    want = _as_json(config)
    for record in reversed(results.find_runs(config.experiment, finished=True)):
        if record.params == want:
            return record
    return None


@dataclass
class Runs:
    """The chapter's records by spec key, with which of them were reused and the time spent."""

    specs: list[Spec]
    records: dict[str, results.Record]
    reused: dict[str, bool]
    wall_s: float

    def get(self, role: str, model: str, init: str, lr: float | None = None) -> results.Record:
        for s in self.specs:
            if s.role == role and s.model == model and s.init == init and (lr is None or math.isclose(s.lr, lr)):
                return self.records[s.key]
        raise KeyError(f"no {role} run of {model} with {init}" + ("" if lr is None else f" at lr {lr:g}"))

    def unique(self) -> list[results.Record]:
        """Each distinct run record once, in plan order."""
        seen, out = set(), []
        for s in self.specs:
            r = self.records[s.key]
            if r.dir not in seen:
                seen.add(r.dir)
                out.append(r)
        return out


def run(P: dict[str, Any], *, progress: bool = False) -> Runs:
    """Train every run of `plan(P)` that has no finished record with identical params (resuming an
    unfinished one: train's resume="auto"); return all of them read back from disk."""
    require_dataset(P)
    specs = plan(P)
    t0 = time.time()
    records: dict[str, results.Record] = {}
    reused: dict[str, bool] = {}
    done: dict[str, results.Record] = {}  # by config, within this call
    for spec in specs:
        key = json.dumps(_as_json(spec.config), sort_keys=True)
        if key in done:
            records[spec.key], reused[spec.key] = done[key], True
            continue
        record = find_finished(spec.config)
        reused[spec.key] = record is not None
        if record is None:
            record = train.train(spec.config, resume="auto", progress=progress)
        records[spec.key] = done[key] = results.load_run(record.dir)
    return Runs(specs, records, reused, time.time() - t0)


# --- what the records say -----------------------------------------------------------------------

def curve(record: results.Record) -> pd.DataFrame:
    """The record's evaluation points: epoch, step, eval-subset and (at epoch ends) test top-1 error."""
    m = record.metrics
    cols = [c for c in ("epoch", "step", "lr", "train_loss", "eval_top1", "eval_top5", "test_top1") if c in m]
    return m[cols].apply(pd.to_numeric, errors="coerce").reset_index(drop=True)


def left_chance_epoch(metrics: pd.DataFrame, stalled_top1: float = STALLED_TOP1) -> float | None:
    """The epoch of the first evaluation after training started (step > 0) whose eval-subset top-1
    error is below `stalled_top1`; None if the run never got there."""
    m = metrics.apply(pd.to_numeric, errors="coerce") if len(metrics) else metrics
    if not len(m) or "eval_top1" not in m:
        return None
    below = m[(m["step"] > 0) & (m["eval_top1"] < stalled_top1)]
    return None if below.empty else float(below["epoch"].iloc[0])


def final_top1(record: results.Record) -> float | None:
    """Top-1 error at the end: on the whole held-out set (test) if evaluated, else the eval subset."""
    s = record.summary or {}
    for key in ("final_test_top1", "final_eval_top1"):
        v = s.get(key)
        if v is not None and math.isfinite(v):
            return float(v)
    return None


def first_steps_grad_norms(grad_norms: pd.DataFrame, steps: int) -> pd.DataFrame:
    """Per layer (input to output): the mean, min and max of the weight-gradient norm over the first
    `steps` steps logged."""
    g = grad_norms[grad_norms["step"] <= steps]
    out = g.groupby(["index", "layer"], sort=True)["grad_norm"].agg(["mean", "min", "max"]).reset_index()
    return out.sort_values("index").reset_index(drop=True)


def grad_ratio(he: pd.DataFrame, xavier: pd.DataFrame, steps: int, layer: str = "conv1") -> float | None:
    """Mean `layer` weight-gradient norm over the steps 1..`steps` that both runs logged, He over Xavier."""
    def norms(g):
        g = g[(g["layer"] == layer) & (g["step"] <= steps)]
        return g.set_index("step")["grad_norm"].astype(float)

    a, b = norms(he), norms(xavier)
    common = a.index.intersection(b.index)
    if not len(common) or b[common].mean() == 0:
        return None
    return float(a[common].mean() / b[common].mean())


def layer_ratios(he: pd.DataFrame, xavier: pd.DataFrame, steps: int) -> pd.DataFrame:
    """Per layer: mean gradient norm over the first `steps` steps for both inits and He / Xavier."""
    a, b = first_steps_grad_norms(he, steps), first_steps_grad_norms(xavier, steps)
    t = a[["index", "layer", "mean"]].merge(b[["index", "layer", "mean"]], on=["index", "layer"],
                                            suffixes=("_he", "_xavier"))
    t["he_over_xavier"] = t["mean_he"] / t["mean_xavier"]
    return t


def run_summary(record: results.Record, stalled_top1: float = STALLED_TOP1) -> dict[str, Any]:
    """One run as the scorecard reads it (final_top1, status, left_chance_epoch) plus context."""
    s = record.summary or {}
    return {"final_top1": final_top1(record), "status": record.status,
            "left_chance_epoch": left_chance_epoch(record.metrics, stalled_top1),
            "final_eval_top1": s.get("final_eval_top1"), "best_eval_top1": s.get("best_eval_top1"),
            "epochs": s.get("epochs"), "steps": s.get("steps"), "run": record.run_id}


def num_classes(P: dict[str, Any]) -> int | None:
    """Classes of the data set (for the chance level): 10 for Fashion-MNIST, the class folders of
    an image folder's train/ (None if it cannot be read here)."""
    if P["dataset"] == "fashion-mnist":
        return 10
    from pathlib import Path

    train_dir = Path(P["data_dir"] or "") / "train"
    return sum(1 for d in train_dir.iterdir() if d.is_dir()) if train_dir.is_dir() else None


def weight_layers(runs: Runs, model: str) -> int:
    """Weight layers (conv and fc) of a main run's model, from its gradient-norm table."""
    spec = next(s for s in runs.specs if s.role == "main" and s.model == model)
    return int(runs.records[spec.key].table("grad_norms")["layer"].nunique())


def fan_out_products(P: dict[str, Any], model: str) -> dict[str, dict[str, float]]:
    """Eq. 14 alone, in closed form: the forward variance gain prod n_l / n^_l
    (`delving.theory.fan_out_only_forward_product`) over a network's conv layers (c_2 / d_L), over
    its fully connected ones (fc1's input is SPP's bins x channels, fc3's output the classes) and
    over all, for the model as this chapter builds it ("ours") and in the paper's form ("paper":
    224 x 224 RGB, 1000 classes, full width). Built on the meta device: no weights are drawn."""
    import torch

    from delving.models import build_model
    from delving.theory import fan_out_only_forward_product, weight_layer_specs

    if P["dataset"] == "fashion-mnist":
        ours = dict(num_classes=10, in_channels=1, input_size=28, width=P["width"])
    else:
        ours = dict(num_classes=num_classes(P) or 1000, in_channels=3, input_size=224, width=P["width"])
    out = {}
    for key, build in (("ours", ours), ("paper", {})):
        with torch.device("meta"):
            net = build_model(model, **build)
        specs = weight_layer_specs(net)
        conv = [s for s in specs if s.kind == "conv"]
        # fc1's own factor counts: it follows a conv layer, so the fc product starts there
        out[key] = {"conv": fan_out_only_forward_product(conv),
                    "fc": math.prod(s.n / s.n_hat for s in specs if s.kind == "fc"),
                    "all": fan_out_only_forward_product(specs)}
    return out


def scale(P: dict[str, Any], runs: Runs | None = None) -> str:
    """A short description of the scale the chapter ran at."""
    data = "Fashion-MNIST 28x28" if P["dataset"] == "fashion-mnist" else f"{P['dataset']} ({P['data_dir']})"
    length = ""
    if runs is not None:
        steps = {m: runs.get("main", m, P["he_init"]).summary.get("steps") for m in ("deep30", "model_b")}
        length = f", {steps['deep30']} steps" + (f" (22 layers: {steps['model_b']})"
                                                if steps["model_b"] != steps["deep30"] else "")
    subset = f" of {P['train_subset']} images" if P["train_subset"] else ""
    return f"{data}, width {P['width']:g}, batch {P['batch_size']}, lr {P['lr']:g}{length}{subset}"


def sweep_table(runs: Runs, stalled_top1: float = STALLED_TOP1) -> pd.DataFrame:
    """One row per sweep run: lr, init, final top-1 error, status, the epoch it left chance."""
    rows = []
    for s in runs.specs:
        if s.role != "sweep":
            continue
        r = runs.records[s.key]
        summary = run_summary(r, stalled_top1)
        rows.append({"model": s.model, "lr": s.lr, "init": s.init, "final_top1": summary["final_top1"],
                     "best_eval_top1": summary["best_eval_top1"], "status": summary["status"],
                     "left_chance_epoch": summary["left_chance_epoch"], "steps": summary["steps"],
                     "run": r.run_id})
    return pd.DataFrame(rows)


def findings(P: dict[str, Any], runs: Runs) -> dict[str, Any]:
    """The chapter's measured numbers in the scorecard's schema (`scorecard._fig2`, `_fig3`,
    `_deeper_worse`), plus the learning-rate sweep and the settings."""
    stalled = P["stalled_top1"]
    models: dict[str, Any] = {}
    ratios: dict[str, float | None] = {}
    for model in MODELS:
        he, xa = runs.get("main", model, P["he_init"]), runs.get("main", model, "xavier")
        models[model] = {"he": run_summary(he, stalled), "xavier": run_summary(xa, stalled)}
        ratios[model] = grad_ratio(he.table("grad_norms"), xa.table("grad_norms"), P["grad_steps"])
    models["small14"] = {"he": run_summary(runs.get("depth", "small14", P["he_init"]), stalled)}
    sweep = sweep_table(runs, stalled)
    return {
        "scale": scale(P, runs),
        "stalled_top1": stalled,
        "lr": P["lr"],
        "he_init": P["he_init"],
        "models": models,
        "grad_ratio_first_layer": ratios,
        "grad_ratio_steps": P["grad_steps"],
        "sweep": {"model": P["sweep_model"],
                  "runs": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
                           for row in sweep.to_dict("records")]},
    }

