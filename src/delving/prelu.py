"""Chapter 3 (03_prelu): ReLU against PReLU on the 14-layer model, Tables 1 and 2 of He et al. (2015).

    records = prelu.run_all(P)            # every (activation, seed) run, and Xavier + ReLU runs
    table = prelu.runs_table(records)     # one row per run: final top-1 / top-5 error
    prelu.activation_summary(table)       # Table 2: mean, spread over seeds
    prelu.coefficient_table(records)      # Table 1: the learned a per layer
    F = prelu.findings(P, records)        # what the scorecard reads

`P` is the notebook's validated parameters (`delving.params.SPECS["03_prelu"]`). Every run is a
`delving.train` run of experiment "prelu"; everything shown is read back from the records.
On a machine with several GPUs each run is trained by DDP over all of them (`torchrun`, see
`delving.train`); on a CPU, `processes` runs go side by side in worker processes.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch

from delving import results
from delving.train import TrainConfig, resolve_device, train, train_torchrun

EXPERIMENT = "prelu"
ACTIVATIONS = ("relu", "prelu-shared", "prelu-channel-wise")
LABELS = {"relu": "ReLU", "prelu-shared": "PReLU, channel-shared", "prelu-channel-wise": "PReLU, channel-wise"}
LAYERS = ("conv1", "conv21", "conv22", "conv23", "conv24", "conv31", "conv32", "conv33", "conv34", "conv35",
          "conv36", "fc1", "fc2")

# Table 2 (small model, ImageNet val, 10-view): top-1 / top-5 error, %; and the Xavier line of Sec. 3.
PAPER_TABLE2 = {"relu": (33.82, 13.34), "prelu-shared": (32.71, 12.87), "prelu-channel-wise": (32.64, 12.75)}
PAPER_XAVIER_RELU = (33.90, 13.44)
# Table 1: learned coefficients, channel-shared and channel-wise (mean over channels).
PAPER_TABLE1 = {
    "prelu-shared": dict(zip(LAYERS, (0.681, 0.103, 0.099, 0.228, 0.561, 0.126, 0.089, 0.124, 0.062, 0.008,
                                      0.210, 0.063, 0.031))),
    "prelu-channel-wise": dict(zip(LAYERS, (0.596, 0.321, 0.204, 0.294, 0.464, 0.196, 0.152, 0.145, 0.124, 0.134,
                                            0.198, 0.074, 0.075))),
}

PRELU_INIT = 0.25  # Sec. 2.1: every a starts here
STILL = 0.03  # a layer's mean coefficient within this of PRELU_INIT everywhere: it has not moved yet

# The notebook parameters that are TrainConfig fields of the same name.
_CONFIG_FIELDS = ("width", "dropout", "prelu_aware", "dataset", "data_dir", "input_size", "scale_range", "eval_views",
                  "train_subset", "eval_subset", "test_subset", "epochs", "batch_size", "lr", "lr_schedule",
                  "patience", "weight_decay", "augment", "evals_per_epoch", "device", "bf16", "threads", "num_workers")


# --- the runs -----------------------------------------------------------------------------------

def train_config(P: dict[str, Any], activation: str, seed: int, init: str | None = None) -> TrainConfig:
    """The TrainConfig of one run of the chapter: small14 with `activation`, `seed`, and `init`
    (default: the chapter's, P["init"])."""
    fields = {k: P[k] for k in _CONFIG_FIELDS}
    fields["scale_range"] = list(fields["scale_range"])
    fields["lr_steps"] = list(P["lr_steps"] or []) if P["lr_schedule"] == "steps" else []
    return TrainConfig(experiment=EXPERIMENT, model="small14", activation=activation, seed=seed,
                       init=init or P["init"], grad_norm_every=0, grad_norm_first=0, **fields)


def configs(P: dict[str, Any]) -> list[TrainConfig]:
    """Every run of the chapter: each activation with each seed (He init, P["init"]), then ReLU with
    the paper's Xavier init for the first `xavier_seeds` seeds."""
    out = [train_config(P, activation, seed) for seed in P["seeds"] for activation in P["activations"]]
    out += [train_config(P, "relu", seed, "xavier") for seed in P["seeds"][:P["xavier_seeds"]]]
    return out


def _train_in_worker(config: dict[str, Any]) -> str:
    return str(train(TrainConfig.from_dict(config), progress=False).dir)


def gpu_count(P: dict[str, Any]) -> int:
    """GPUs a run is spread over: 0 on a CPU; P["gpus"] or all visible ones on CUDA."""
    if resolve_device(P["device"]).type != "cuda":
        return 0
    return min(P["gpus"] or torch.cuda.device_count(), torch.cuda.device_count())


def _reusable(config: TrainConfig) -> results.Record | None:
    wanted = json.loads(json.dumps(config.to_dict()))
    done = [r for r in results.find_runs(EXPERIMENT) if r.params == wanted]
    return done[-1] if done else None


def run_all(P: dict[str, Any], *, progress: bool = False) -> list[results.Record]:
    """Train every run of `configs(P)` and return their records, in that order.

    Several GPUs: one run after another, each on all of them (torchrun, DDP). One GPU or a CPU:
    in this process, or `P["processes"]` runs at a time in worker processes (spawned: each
    imports torch once and takes the next run). P["reuse"]: a finished run with the same params is
    taken instead of training again (a rerun of the notebook after a crash, or a GPU profile run
    in pieces); unfinished ones are resumed from their checkpoint."""
    todo = configs(P)
    found = {i: _reusable(c) for i, c in enumerate(todo)} if P["reuse"] else {}
    pending = [i for i in range(len(todo)) if found.get(i) is None]
    dirs: dict[int, Any] = {i: r.dir for i, r in found.items() if r is not None}
    gpus = gpu_count(P)
    if gpus > 1:
        for i in pending:
            dirs[i] = train_torchrun(todo[i], gpus, resume="auto" if P["reuse"] else None).dir
    elif P["processes"] > 1 and len(pending) > 1:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(P["processes"], len(pending)), mp_context=context) as pool:
            futures = {i: pool.submit(_train_in_worker, todo[i].to_dict()) for i in pending}
            dirs.update({i: f.result() for i, f in futures.items()})
    else:
        for i in pending:
            dirs[i] = train(todo[i], resume="auto" if P["reuse"] else None, progress=progress).dir
    return [results.load_run(dirs[i]) for i in range(len(todo))]


# --- what the runs say --------------------------------------------------------------------------

def runs_table(records: Iterable[results.Record]) -> pd.DataFrame:
    """One row per run: activation, init, seed, status, final held-out top-1 / top-5 error (fractions)."""
    rows = []
    for r in records:
        s = r.summary or {}
        top1, top5 = s.get("final_test_top1"), s.get("final_test_top5")
        rows.append({"activation": r.params["activation"], "init": r.params["init"], "seed": r.params["seed"],
                     "status": r.status, "top1": math.nan if top1 is None else top1,
                     "top5": math.nan if top5 is None else top5, "epochs": s.get("epochs"),
                     "images_per_s": s.get("images_per_s"), "wall_time_s": s.get("wall_time_s"), "run": r.run_id})
    return pd.DataFrame(rows)


def _std(values: pd.Series) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def activation_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per (init, activation): mean and standard deviation over seeds of the final top-1 / top-5
    error of the runs that completed; `diverged` counts the others."""
    rows = []
    for (init, activation), g in table.groupby(["init", "activation"], sort=False):
        ok = g[g.status == "completed"]
        rows.append({"init": init, "activation": activation, "n_seeds": len(ok), "diverged": len(g) - len(ok),
                     "top1_mean": ok.top1.mean(), "top1_std": _std(ok.top1),
                     "top5_mean": ok.top5.mean(), "top5_std": _std(ok.top5), "top1_all": ok.top1.tolist()})
    return pd.DataFrame(rows)


def paired_differences(table: pd.DataFrame, init: str) -> pd.DataFrame:
    """Per seed and PReLU kind: its top-1 error minus ReLU's of the same seed (points); same seed =
    same data order and the same initial weights up to Eq. 15's factor."""
    he = table[(table.init == init) & (table.status == "completed")]
    relu = he[he.activation == "relu"].set_index("seed").top1
    rows = []
    for activation in ("prelu-shared", "prelu-channel-wise"):
        other = he[he.activation == activation].set_index("seed").top1
        for seed in sorted(set(relu.index) & set(other.index)):
            rows.append({"activation": activation, "seed": seed, "diff_points": 100 * (other[seed] - relu[seed])})
    return pd.DataFrame(rows, columns=["activation", "seed", "diff_points"])


def coefficients(records: Iterable[results.Record]) -> pd.DataFrame:
    """The learned a of each layer at the end of each completed PReLU run (from its prelu table):
    activation, seed, layer, channels, mean (over channels), std, min, max."""
    frames = []
    for r in records:
        t = r.table("prelu")
        if r.status != "completed" or t.empty:
            continue
        last = t[t.step == t.step.max()].copy()
        last.insert(0, "activation", r.params["activation"])
        last.insert(1, "seed", r.params["seed"])
        frames.append(last)
    columns = ["activation", "seed", "step", "epoch", "layer", "channels", "mean", "std", "min", "max"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def coefficient_table(records: Iterable[results.Record]) -> pd.DataFrame:
    """Table 1 beside ours: per layer, each PReLU kind's learned a (channel mean for channel-wise)
    as mean and standard deviation over seeds, and the paper's value."""
    c = coefficients(records)
    out = pd.DataFrame({"layer": list(LAYERS)})
    for activation in ("prelu-shared", "prelu-channel-wise"):
        g = c[c.activation == activation].groupby("layer")["mean"]
        out[f"{activation} mean"] = out.layer.map(g.mean())
        out[f"{activation} sd over seeds"] = out.layer.map(g.std(ddof=1))  # NaN with one seed
        out[f"{activation} paper"] = out.layer.map(PAPER_TABLE1[activation])
    return out


def scale(P: dict[str, Any]) -> str:
    """What the runs are, in a phrase (for the scorecard's "scale" column)."""
    width = "full width" if P["width"] == 1 else f"width {P['width']:g}"
    seeds = f"{len(P['seeds'])} seed{'s' if len(P['seeds']) != 1 else ''}"
    if P["dataset"] == "fashion-mnist":
        images = f"{P['train_subset']:,}" if P["train_subset"] else "all 60,000"
        return (f"Fashion-MNIST, {images} training images x {P['epochs']} epochs, small14 at {width} "
                f"(3x3 stem for 28x28), {seeds}")
    if P["dataset"] == "imagefolder":
        images = f"{P['train_subset']:,} training images" if P["train_subset"] else "the whole training set"
        return f"image folder {P['data_dir']}, {images} x {P['epochs']} epochs, {P['input_size']} crops, " \
               f"small14 at {width}, {seeds}"
    return f"synthetic random images (throughput only), small14 at {width}, {seeds}"


def protocol(P: dict[str, Any]) -> str:
    """How the reported errors were measured."""
    if P["dataset"] == "imagefolder":
        views = ("10-view (four corners and centre, and their flips; softmax averaged)" if P["eval_views"] == "ten"
                 else "centre crop")
        n = f"{P['test_subset']:,} val images" if P["test_subset"] else "the whole val set"
        return f"{views} {P['input_size']}x{P['input_size']} views of the image resized to shorter side 256, on {n}"
    n = f"{P['test_subset']:,}" if P["test_subset"] else "10,000"
    if P["dataset"] == "fashion-mnist":
        return (f"single view of the full 28x28 image, on {n} Fashion-MNIST test images "
                "(the paper: 10-view on ImageNet val)")
    return "single view of random images with random labels (no accuracy to speak of)"


def findings(P: dict[str, Any], records: list[results.Record]) -> dict[str, Any]:
    """The chapter's numbers in the scorecard's schema (fractions, not percent)."""
    table = runs_table(records)
    summary = activation_summary(table)
    he = summary[summary.init == P["init"]].set_index("activation")
    number = lambda x: None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)
    activations = {a: {"top1_mean": number(he.loc[a, "top1_mean"]), "top1_std": number(he.loc[a, "top1_std"]),
                       "top5_mean": number(he.loc[a, "top5_mean"]), "top5_std": number(he.loc[a, "top5_std"]),
                       "n_seeds": int(he.loc[a, "n_seeds"]), "top1_all": [float(v) for v in he.loc[a, "top1_all"]]}
                   for a in P["activations"] if a in he.index and he.loc[a, "n_seeds"] > 0}
    c = coefficients(records)
    coefs = {a: {layer: float(v) for layer, v in c[c.activation == a].groupby("layer")["mean"].mean()
                 .reindex(list(LAYERS)).dropna().items()}
             for a in ("prelu-shared", "prelu-channel-wise") if a in set(c.activation)}
    xavier = summary[(summary.init == "xavier") & (summary.activation == "relu")]
    xavier_relu = None
    if len(xavier) and xavier.iloc[0].n_seeds > 0:
        x = xavier.iloc[0]
        xavier_relu = {"top1_mean": float(x.top1_mean), "top1_std": float(x.top1_std), "n_seeds": int(x.n_seeds)}
    return {"scale": scale(P), "protocol": protocol(P), "activations": activations, "coefficients": coefs,
            "xavier_relu": xavier_relu}


# --- the verdict --------------------------------------------------------------------------------

def difference(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
    """Top-1 error a - b in points, and its standard error over seeds (as the scorecard computes it)."""
    diff = 100 * (a["top1_mean"] - b["top1_mean"])
    se = 100 * math.sqrt(sum((r.get("top1_std") or 0.0) ** 2 / max(r.get("n_seeds", 1), 1) for r in (a, b)))
    return diff, se


def spread_class(diff: float, se: float, margin: float = 0.5, z: float = 2.0) -> str:
    """"within margin" (|diff| <= margin points), "within spread" (larger, but not beyond z
    standard errors: the seeds disagree as much as the runs, undecided) or "beyond" (both)."""
    if abs(diff) <= margin:
        return "within margin"
    return "within spread" if abs(diff) <= z * se else "beyond"


def _judge(diff: float, se: float, margin: float = 0.5, z: float = 2.0) -> str:
    return {"within margin": f"no clear difference (within {margin:g} points)",
            "within spread": f"too noisy to tell (within {z:g} standard errors, which exceed the difference)",
            "beyond": "beyond the spread"}[spread_class(diff, se, margin, z)]


def verdict(F: dict[str, Any], margin: float = 0.5, z: float = 2.0) -> list[str]:
    """The chapter's verdict as Markdown bullet points, every number from the findings `F`.
    A difference counts when it exceeds both `margin` points and `z` standard errors (the
    scorecard's default thresholds)."""
    a, lines = F["activations"], []
    relu = a.get("relu")
    pct = lambda x: f"{100 * x:.2f} %"
    for kind, paper_gain in (("prelu-channel-wise", PAPER_TABLE2["relu"][0] - PAPER_TABLE2["prelu-channel-wise"][0]),
                             ("prelu-shared", PAPER_TABLE2["relu"][0] - PAPER_TABLE2["prelu-shared"][0])):
        if relu is None or kind not in a:
            continue
        diff, se = difference(relu, a[kind])  # > 0: PReLU better
        helps = "lowers" if diff > 0 else "raises"
        lines.append(f"- **{LABELS[kind]} against ReLU**: top-1 error {pct(a[kind]['top1_mean'])} vs "
                     f"{pct(relu['top1_mean'])}: PReLU {helps} it by {abs(diff):.2f} points "
                     f"(standard error {se:.2f} over {relu['n_seeds']} and {a[kind]['n_seeds']} seeds, "
                     f"{abs(diff) / se if se > 0 else math.inf:.1f} standard errors): {_judge(diff, se, margin, z)}. "
                     f"The paper: {paper_gain:.2f} points lower on ImageNet.")
    if "prelu-shared" in a and "prelu-channel-wise" in a:
        diff, se = difference(a["prelu-shared"], a["prelu-channel-wise"])
        lines.append(f"- **Channel-shared against channel-wise**: {pct(a['prelu-shared']['top1_mean'])} vs "
                     f"{pct(a['prelu-channel-wise']['top1_mean'])} ({diff:+.2f} points, standard error {se:.2f}): "
                     f"{_judge(diff, se, margin, z)}. The paper: 32.71 vs 32.64 %, 13 extra parameters doing about "
                     "as well as thousands.")
    for kind, coefs in F["coefficients"].items():
        convs = {k: v for k, v in coefs.items() if k.startswith("conv")}
        if not convs:
            continue
        largest = max(convs, key=convs.get)
        stage3 = [v for k, v in convs.items() if k.startswith("conv3")]
        fcs = [v for k, v in coefs.items() if k.startswith("fc")]
        paper = PAPER_TABLE1[kind]
        common = [k for k in LAYERS if k in coefs]
        ours_rank = pd.Series([coefs[k] for k in common]).rank()
        rho = ours_rank.corr(pd.Series([paper[k] for k in common]).rank())  # Spearman's: Pearson's of the ranks
        moved = max(abs(v - PRELU_INIT) for v in coefs.values())
        lines.append(
            f"- **Learned coefficients, {LABELS[kind]}**: conv1 {coefs.get('conv1', math.nan):.3f} "
            f"(paper {paper['conv1']:.3f}); the largest conv layer is {largest}"
            f"{' as in the paper' if largest == 'conv1' else ' (paper: conv1)'}; conv3x mean "
            f"{np.mean(stage3):.3f} (paper {np.mean([paper[k] for k in LAYERS[5:11]]):.3f})"
            + (f", fc1/fc2 mean {np.mean(fcs):.3f} (paper {np.mean([paper['fc1'], paper['fc2']]):.3f})" if fcs else "")
            + f"; rank correlation with Table 1 over the {len(common)} layers {rho:+.2f}. "
            + (f"The coefficients have hardly left their initial 0.25 (at most {moved:.3f} away): there is no "
               "pattern yet to set against the paper's." if moved < STILL else
               "The paper's pattern (conv1 largest, deeper conv layers smaller) holds."
               if largest == "conv1" and np.mean(stage3) < coefs["conv1"] else
               "The deeper conv layers are smaller than conv1, but conv1 is not the largest."
               if np.mean(stage3) < coefs.get("conv1", -math.inf) else
               "The paper's pattern (conv1 largest, deeper conv layers smaller) does not hold here."))
    x = F.get("xavier_relu")
    if x and relu:
        diff, se = difference(x, relu)
        lines.append(f"- **He against Xavier (ReLU)**: top-1 error Xavier {pct(x['top1_mean'])} ({x['n_seeds']} "
                     f"seed{'s' if x['n_seeds'] != 1 else ''}), He {pct(relu['top1_mean'])} ({diff:+.2f} points, "
                     f"standard error {se:.2f}): "
                     f"{_judge(diff, se, margin, z)}. The paper: 33.90 vs 33.82 %, no clear difference.")
    return lines
