"""Chapter 1: the variance derivation of Sec. 2.2 (Eq. 7-15), measured layer by layer.

`run(P)` measures Var[y_l] and Var[Delta x_l] of every layer (``delving.probe``) for a list of
*cases* (an architecture, an init scheme, the activation's initial coefficient a, whether He
uses Eq. 15, a dtype), writes them with their closed forms (``delving.theory``) into one run
record of experiment "variance", and returns that record read back from disk. Everything the
chapter shows is computed from the record by the functions below (`layer_summary`,
`last_layer_table`, `findings`, ...).

The cases (`plan`):

    schemes    the conv stack and the MLP, under every scheme of P["schemes"]
    prelu      He (fan-in) with PReLU of initial a for each a of P["prelu_a"]: Eq. 15 (conv, MLP)
               and, on the MLP, the ReLU form Eq. 10 that ignores a
    widening   an MLP whose width doubles twice (like the 64/128/256 stages of the 30-layer
               model): He fan-in, He fan-out, Xavier and Glorot differ there (c_2 / d_L)
    underflow  fixed std 0.01 on the MLP, deeper than float32 can follow, in float32 and float64

Ratios. forward: Var[y_l] / Var[y_1]; backward: Var[Delta x_l] / Var[Delta x_{L+1}] (as
``theory.forward_ratios`` / ``backward_ratios``). "measured / predicted" divides the measured
ratio by the closed form; 1 is on the line. Per weight draw this is roughly log-normal in deep,
narrow stacks (each layer multiplies it by an independent factor of relative variance about
5 / width), so its median sits below 1 by about exp(-s^2 / 2), s the spread of its logarithm,
while the *pooled* ratio (means over draws divided) estimates the paper's expectation.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from delving import results
from delving.init import init_model
from delving.probe import conv_stack, deep_mlp, layer_specs, variance_profile
from delving.theory import (LayerSpec, activation_gain, backward_ratios, fan_out_only_forward_product,
                            forward_ratios, vgg_b_layers, vgg_fixed_std_gradient_ratio, weight_variance,
                            weight_layer_specs, xavier_factor)

EXPERIMENT = "variance"
FIXED_STD = 0.01
INPUT_VAR = 1.0  # the probe feeds N(0, 1) inputs and N(0, 1) output gradients
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)  # smallest normal float32, 1.2e-38
FLOAT32_SUBNORMAL = 2.0 ** -149  # smallest positive float32, 1.4e-45: below it, 0
UNDERFLOW_MAX_DEPTH = 400
UNDERFLOW_DRAWS = 8  # the underflow study shows where float32 gives out; a few draws show it
PAPER_MODELS = ("small14", "deep30", "model_a", "model_b", "model_c")
STUDIES = ("schemes", "prelu", "widening", "underflow")
WIDENING_SCHEMES = ("he-fan-in", "he-fan-out", "xavier", "glorot")


@dataclass(frozen=True)
class Case:
    """One measured configuration (a row of the run's `cases` table)."""

    study: str
    arch: str  # "conv" | "mlp" | "widening"
    scheme: str
    activation: str  # "relu" | "prelu" (nn.PReLU, whatever its a)
    a: float  # initial coefficient of the activation between layers: 0 ReLU, 1 linear
    prelu_aware: bool  # He schemes use Eq. 15 with this a (else Eq. 10/14, i.e. a = 0)
    depth: int
    dtype: str = "float32"

    @property
    def key(self) -> str:
        return (f"{self.study}/{self.arch}/{self.scheme}/{self.activation}/a={self.a:g}/"
                f"{'eq15' if self.prelu_aware else 'relu-form'}/{self.dtype}")


# --- architectures --------------------------------------------------------------------------

def widening_widths(depth: int, width: int) -> list[int]:
    """Output widths of the widening MLP: a third of the layers at `width`, 2 `width`, 4 `width`
    (the 64 / 128 / 256 stages of the 30-layer model, scaled); input width `width`."""
    return [width * 2 ** min(2, (3 * i) // depth) for i in range(depth)]


def widening_mlp(depth: int, width: int) -> nn.Sequential:
    """Linear layers of `widening_widths`, each but the last followed by a ReLU."""
    modules: list[nn.Module] = []
    c = width
    for i, d in enumerate(widening_widths(depth, width)):
        modules.append(nn.Linear(c, d))
        if i < depth - 1:
            modules.append(nn.ReLU())
        c = d
    return nn.Sequential(*modules)


def _builder(case: Case, P: dict[str, Any]) -> tuple[Callable[[], nn.Module], tuple[int, ...]]:
    """(model builder, input shape) of a case."""
    if case.arch == "conv":
        return (functools.partial(conv_stack, case.depth, P["width"], P["kernel_size"], case.activation, case.a),
                (P["width"], P["spatial"], P["spatial"]))
    if case.arch == "mlp":
        return functools.partial(deep_mlp, case.depth, P["width"], case.activation, case.a), (P["width"],)
    if case.arch == "widening":
        return functools.partial(widening_mlp, case.depth, P["width"]), (P["width"],)
    raise ValueError(f"unknown architecture {case.arch!r}")


def _reused(build: Callable[[], nn.Module], device: str) -> Callable[[], nn.Module]:
    """A model builder for the probe that builds once and hands back the same model at every draw.

    Equivalent to a fresh model per draw: `init_model` overwrites every Conv2d/Linear weight and
    bias at each draw, and nothing else in these models changes (PReLU's a keeps its init value;
    the probe runs without parameter gradients). Building 30 layers per draw cost more than
    measuring them."""
    model = build().to(device)
    return lambda: model


@contextlib.contextmanager
def _temporarily(get: Callable[[], Any], set_: Callable[[Any], None], value: Any) -> Iterator[None]:
    """Set a torch global (thread count, default dtype) for a block, then restore it."""
    previous = get()
    set_(value)
    try:
        yield
    finally:
        set_(previous)


# --- theory ---------------------------------------------------------------------------------

def specs_of(case: Case, P: dict[str, Any]) -> list[LayerSpec]:
    """The case's layers as theory sees them (``probe.layer_specs`` of the model it measures)."""
    return list(_specs(case.arch, case.activation, case.a, case.depth, P["width"], P["kernel_size"], P["spatial"]))


@functools.lru_cache(maxsize=64)
def _specs(arch: str, activation: str, a: float, depth: int, width: int, kernel_size: int,
           spatial: int) -> tuple[LayerSpec, ...]:
    case = Case("", arch, "", activation, a, False, depth)
    build, shape = _builder(case, {"width": width, "kernel_size": kernel_size, "spatial": spatial})
    with torch.random.fork_rng():  # a throwaway build must not move the global RNG
        model = build()
    return tuple(layer_specs(model, shape))


def bias_variance(spec: LayerSpec, scheme: str) -> float:
    """Var[b] of a scheme: 1 / (3 n) for PyTorch's U(+-1 / sqrt(n)) bias, 0 for the others (b = 0)."""
    return 1.0 / (3.0 * spec.n) if scheme == "pytorch" else 0.0


def forward_variances(layers: Sequence[LayerSpec], scheme: str, *, std: float = FIXED_STD,
                      prelu_aware: bool = False, input_var: float = INPUT_VAR,
                      with_bias: bool = False) -> list[float]:
    """Predicted absolute Var[y_l], l = 1..L, for N(0, input_var) input: Eq. 7 layer by layer,
    E[x_1^2] = input_var, E[x_l^2] = gain(a_{l-1}) Var[y_{l-1}] (Eq. 8, 15); with_bias adds the
    bias's variance to every layer (only PyTorch's default has one). Without bias the ratios to
    l = 1 are ``theory.forward_ratios``."""
    out: list[float] = []
    for i, spec in enumerate(layers):
        e_x2 = input_var if i == 0 else activation_gain(layers[i - 1].a) * out[-1]
        var = spec.n * weight_variance(spec, scheme, std=std, prelu_aware=prelu_aware) * e_x2
        out.append(var + (bias_variance(spec, scheme) if with_bias else 0.0))
    return out


def theory_table(case: Case, P: dict[str, Any]) -> pd.DataFrame:
    """Per layer: fans, a, predicted ratios (Eq. 9, 13, 15), and the absolute variances."""
    specs = specs_of(case, P)
    kw = dict(std=FIXED_STD, prelu_aware=case.prelu_aware)
    forward = forward_ratios(specs, case.scheme, **kw)
    backward = backward_ratios(specs, case.scheme, **kw)
    absolute = forward_variances(specs, case.scheme, **kw)
    biased = forward_variances(specs, case.scheme, with_bias=True, **kw)
    # Var[Delta x_l] for Var[g] = 1: the backward ratio itself; its std is what float32 must hold.
    return pd.DataFrame({
        "case": case.key, "layer": range(len(specs)), "n": [s.n for s in specs], "n_hat": [s.n_hat for s in specs],
        "a_after": [s.a for s in specs], "forward_theory": forward, "backward_theory": backward,
        "forward_var_theory": absolute, "forward_theory_with_bias": [b / biased[0] for b in biased],
        "forward_var_theory_with_bias": biased,
    })


def min_predicted_std(theory: pd.DataFrame) -> float:
    """Smallest predicted std of the forward or backward signal over the layers (unit input and g)."""
    return math.sqrt(min(theory.forward_var_theory.min(), (theory.backward_theory * INPUT_VAR).min()))


def float32_underflow_layer(width: int, std: float = FIXED_STD) -> int | None:
    """First layer (1-based) at which the fixed-std MLP's predicted forward std falls below the
    smallest positive float32 (there float32 holds only zeros); None if it never does within
    UNDERFLOW_MAX_DEPTH layers (fan-in * std^2 / 2 >= 1 grows or keeps the signal)."""
    specs = [LayerSpec.fc(width, width)] * UNDERFLOW_MAX_DEPTH
    for layer, var in enumerate(forward_variances(specs, "fixed", std=std), start=1):
        if math.sqrt(var) < FLOAT32_SUBNORMAL:
            return layer
    return None


# --- the plan -------------------------------------------------------------------------------

def activation_a(P: dict[str, Any]) -> float:
    """The coefficient between layers in the scheme comparison: 0 (ReLU) or the first of prelu_a."""
    return 0.0 if P["activation"] == "relu" else float(P["prelu_a"][0])


def plan(P: dict[str, Any]) -> list[Case]:
    """Every case the chapter measures, in order (see the module docstring)."""
    depth, act, a0 = P["depth"], P["activation"], activation_a(P)
    cases = [Case("schemes", arch, s, act, a0, act == "prelu", depth) for arch in ("conv", "mlp") for s in P["schemes"]]
    for a in P["prelu_a"]:
        cases += [Case("prelu", "conv", "he-fan-in", "prelu", float(a), True, depth),
                  Case("prelu", "mlp", "he-fan-in", "prelu", float(a), True, depth)]
        if a != 0:
            cases.append(Case("prelu", "mlp", "he-fan-in", "prelu", float(a), False, depth))
    cases += [Case("widening", "widening", s, "relu", 0.0, False, depth)
              for s in P["schemes"] if s in WIDENING_SCHEMES]
    if "fixed" in P["schemes"]:
        layer = float32_underflow_layer(P["width"])
        if layer is not None:
            deep = max(depth, layer + max(3, math.ceil(0.2 * layer)))
            cases += [Case("underflow", "mlp", "fixed", "relu", 0.0, False, deep, dtype)
                      for dtype in ("float32", "float64")]
    # Where theory says float32 cannot hold a case's signal, measure it in float64 (the
    # underflow study shows what float32 does there).
    out = []
    for case in cases:
        if case.study != "underflow" and min_predicted_std(theory_table(case, P)) < 100 * FLOAT32_TINY:
            case = Case(**{**asdict(case), "dtype": "float64"})
        out.append(case)
    return out


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch sees no CUDA device; use 'cpu' or 'auto'")
    return device


def scale(P: dict[str, Any]) -> str:
    """The measurement's scale, in words (shown on the scorecard)."""
    k, w, s = P["kernel_size"], P["width"], P["spatial"]
    return (f"conv stack {P['depth']} x {w} ch, {k}x{k}, {s}x{s}; MLP {P['depth']} x {w} units; "
            f"{P['draws']} draws of batch {P['batch_size']}")


# --- running --------------------------------------------------------------------------------

def draws_of(case: Case, P: dict[str, Any]) -> int:
    return min(P["draws"], UNDERFLOW_DRAWS) if case.study == "underflow" else P["draws"]


def measure(case: Case, P: dict[str, Any], seed: int, device: str) -> pd.DataFrame:
    """The probe's per-(draw, layer) variances for one case."""
    build, shape = _builder(case, P)
    init_fn = functools.partial(init_model, scheme=case.scheme, std=FIXED_STD, prelu_aware=case.prelu_aware)
    with _temporarily(torch.get_default_dtype, torch.set_default_dtype, getattr(torch, case.dtype)):
        profile = variance_profile(_reused(build, device), init_fn, shape,
                                   draws=draws_of(case, P), batches=1, batch_size=P["batch_size"], seed=seed,
                                   device=device)
    return profile.drop(columns="name").assign(case=case.key)


def run(P: dict[str, Any], *, cases: Sequence[Case] | None = None, root=None,
        progress: Callable[[str], None] | None = None) -> results.Record:
    """Measure every case of `plan(P)` (or `cases`); write the run record; return it as read back from disk.

    Tables: `cases` (one row per case), `layers` (per case, draw and layer: forward_var,
    backward_var, output_grad_var), `theory` (per case and layer: the closed forms),
    `paper_numbers` and `models` (the paper's figures recomputed). summary.json holds the findings.
    """
    device = resolve_device(P["device"])
    run_ = results.start_run(EXPERIMENT, P, device=device, seed=P["seed"], root=root)
    cases = plan(P) if cases is None else list(cases)
    case_rows, theory, layers = [], [], []
    # On CPU one thread: the probe's tensors are small, and OpenMP threads that spin-wait for a busy
    # core made the CPU profile ~9x slower on a shared 2-core machine (442 s against 50 s).
    with _temporarily(torch.get_num_threads, torch.set_num_threads, 1 if device == "cpu" else torch.get_num_threads()):
        for i, case in enumerate(cases):
            seed = P["seed"] + 1000 * i  # independent draws per case (draws <= 1000)
            if progress:
                progress(f"[{i + 1}/{len(cases)}] {case.key}")
            theory.append(theory_table(case, P))
            layers.append(measure(case, P, seed, device))
            case_rows.append({**asdict(case), "case": case.key, "seed": seed, "width": P["width"],
                              "layers": len(theory[-1]), "draws": draws_of(case, P)})
    run_.write_table("cases", case_rows)
    run_.write_table("layers", pd.concat(layers, ignore_index=True))
    run_.write_table("theory", pd.concat(theory, ignore_index=True))
    run_.write_table("paper_numbers", paper_numbers())
    run_.write_table("models", model_products())
    record = results.load_run(run_.dir)
    return run_.finish({"findings": findings(record), "cases": len(cases)})


# --- reading a record -------------------------------------------------------------------------

def per_draw(record: results.Record) -> pd.DataFrame:
    """Per case, draw and layer: measured ratios and measured / predicted."""
    layers, theory = record.table("layers"), record.table("theory")
    first = layers[layers.layer == 0].set_index(["case", "draw"]).forward_var.rename("first_var")
    df = layers.join(first, on=["case", "draw"]).merge(theory, on=["case", "layer"])
    df["forward_ratio"] = df.forward_var / df.first_var
    df["backward_ratio"] = df.backward_var / df.output_grad_var
    df["forward_over_theory"] = df.forward_ratio / df.forward_theory
    df["backward_over_theory"] = df.backward_ratio / df.backward_theory
    meta = ["case", "study", "arch", "scheme", "activation", "a", "prelu_aware", "dtype", "depth"]
    return df.merge(record.table("cases")[meta], on="case")


def layer_summary(record: results.Record) -> pd.DataFrame:
    """Per case and layer: pooled ratio (means over draws divided), median and quartiles of the
    per-draw ratio, for forward and backward, with the predictions and measured / predicted."""
    df = per_draw(record)
    keys = ["case", "study", "arch", "scheme", "activation", "a", "prelu_aware", "dtype", "depth", "layer"]
    g = df.groupby(keys, sort=False)
    out = g[["forward_theory", "backward_theory", "forward_theory_with_bias"]].first()
    out["draws"] = g.draw.nunique()
    out["forward_pooled"] = g.forward_var.mean() / g.first_var.mean()
    out["backward_pooled"] = g.backward_var.mean() / g.output_grad_var.mean()
    for direction in ("forward", "backward"):
        col = f"{direction}_ratio"
        out[f"{direction}_median"] = g[col].median()
        out[f"{direction}_q25"] = g[col].quantile(0.25)
        out[f"{direction}_q75"] = g[col].quantile(0.75)
        out[f"{direction}_zero_draws"] = (df[col] == 0).groupby([df[k] for k in keys], sort=False).sum()
        logs = np.log(df[col].where(df[col] > 0))  # zeros (float32 underflow) left out
        out[f"{direction}_log_std"] = logs.groupby([df[k] for k in keys], sort=False).std()
    return out.reset_index()


def _sig(x: float, digits: int = 3) -> float:
    """x to `digits` significant digits (quartiles over a few dozen draws have no more)."""
    return float(f"{float(x):.{digits}g}")


def endpoint(summary: pd.DataFrame, case: str) -> dict[str, Any]:
    """The comparison that matters most for one case: forward at the last layer (Eq. 9: L - 1
    factors from y_1 to y_L), backward at the first layer (Eq. 13: all L factors)."""
    rows = summary[summary.case == case]
    last, first = rows[rows.layer == rows.layer.max()].iloc[0], rows[rows.layer == 0].iloc[0]
    out: dict[str, Any] = {}
    for direction, row, name in (("forward", last, "forward_last"), ("backward", first, "backward_first")):
        theory = row[f"{direction}_theory"]
        out[f"{name}_predicted"] = float(theory)
        out[f"{name}_ratio_median"] = float(row[f"{direction}_median"] / theory)
        out[f"{name}_ratio_iqr"] = [_sig(row[f"{direction}_q25"] / theory), _sig(row[f"{direction}_q75"] / theory)]
        out[f"{name}_ratio_pooled"] = float(row[f"{direction}_pooled"] / theory)
        out[f"{name}_log_std"] = float(row[f"{direction}_log_std"])
        out[f"{name}_zero_draws"] = int(row[f"{direction}_zero_draws"])
    if rows.scheme.iloc[0] == "pytorch":  # against what Eq. 7 predicts once PyTorch's bias is counted
        theory = last.forward_theory_with_bias
        out["forward_last_predicted_with_bias"] = float(theory)
        out["forward_last_ratio_median_with_bias"] = float(last.forward_median / theory)
        out["forward_last_ratio_iqr_with_bias"] = [_sig(last.forward_q25 / theory), _sig(last.forward_q75 / theory)]
        out["forward_last_ratio_pooled_with_bias"] = float(last.forward_pooled / theory)
    return out


def last_layer_table(record: results.Record, study: str = "schemes",
                     summary: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per case of a study: the endpoint ratios (measured / predicted).
    `summary`: `layer_summary(record)`, if already at hand."""
    summary = layer_summary(record) if summary is None else summary
    cases = record.table("cases")
    rows = []
    for _, c in cases[cases.study == study].iterrows():
        e = endpoint(summary, c["case"])
        rows.append({"arch": c["arch"], "scheme": c["scheme"], "activation": c["activation"], "a": c["a"],
                     "Eq. 15": bool(c["prelu_aware"]), "dtype": c["dtype"], "layers": int(c["layers"]), **e})
    return pd.DataFrame(rows)


def first_layer_table(record: results.Record) -> pd.DataFrame:
    """Measured Var[y_1] against n_1 Var[w_1] E[x_1^2] (+ Var[b_1]) for N(0, 1) input, per scheme case."""
    df = per_draw(record)
    df = df[(df.study == "schemes") & (df.layer == 0)]
    g = df.groupby(["arch", "scheme"], sort=False)
    out = pd.DataFrame({"measured Var[y_1]": g.forward_var.mean(),
                        "predicted, Eq. 7": g.forward_var_theory.first(),
                        "predicted, Eq. 7 + bias": g.forward_var_theory_with_bias.first()})
    out["measured / predicted"] = out["measured Var[y_1]"] / out["predicted, Eq. 7 + bias"]
    return out.reset_index()


# --- the paper's numbers ----------------------------------------------------------------------

def paper_numbers() -> pd.DataFrame:
    """Sec. 2.2's figures recomputed from the closed forms, beside the paper's."""
    rows = []
    for L in (22, 30):
        rows.append({"quantity": f"std factor of Xavier vs He after L = {L} layers, 1/sqrt(2)^L",
                     "key": f"xavier_std_factor_{L}", "paper": f"1/sqrt(2)^{L}", "ours": xavier_factor(L)})
    for d, paper in zip((64, 128, 256, 512), (0.059, 0.042, 0.029, 0.021)):
        spec = LayerSpec.conv(3, d, d)
        rows.append({"quantity": f"Eq. 14 std, 3x3 conv with {d} filters, sqrt(2 / (9 d))",
                     "key": f"vgg_std_{d}", "paper": f"{paper}", "ours": math.sqrt(weight_variance(spec, "he-fan-out"))})
    ratio = 1.0 / vgg_fixed_std_gradient_ratio(FIXED_STD)
    rows.append({"quantity": "VGG model B, std 0.01: Delta x_2 std is 1 / (this) of Eq. 14's (conv10 to conv2)",
                 "key": "fixed_std_gradient_ratio", "paper": "1.7 x 10^4", "ours": ratio})
    rounded = 5.9 * 4.2 ** 2 * 2.9 ** 2 * 2.1 ** 4
    rows.append({"quantity": "the paper's product with its rounded stds, 5.9 x 4.2^2 x 2.9^2 x 2.1^4",
                 "key": "fixed_std_gradient_ratio_rounded", "paper": "1.7 x 10^4", "ours": rounded})
    n_layers = len(vgg_b_layers()) - 1
    rows.append({"quantity": f"layers whose factors enter that ratio (Eq. 13 from conv{n_layers + 1} down to conv2)",
                 "key": "fixed_std_gradient_layers", "paper": "9 (conv10 to conv2)", "ours": n_layers})
    return pd.DataFrame(rows)


def model_products(names: Sequence[str] = PAPER_MODELS) -> pd.DataFrame:
    """Eq. 14 alone: the forward product prod n_l / n^_l = c_2 / d_L for the paper's models (their
    ImageNet form, 224 x 224), over their conv layers (where c_{l+1} = d_l, so it telescopes) and
    over all layers (the SPP multiplies the width by its bins before fc1)."""
    from delving.models import build_model  # only here: the chapter's other parts need no models

    rows = []
    for name in names:
        with torch.device("meta"):  # full width, nothing allocated
            model = build_model(name)
        specs = weight_layer_specs(model)
        conv = [s for s in specs if s.kind == "conv"]
        rows.append({"model": name, "weight layers": len(specs), "conv layers": len(conv), "c_2": conv[1].c,
                     "d_L (last conv)": conv[-1].d, "c_2 / d_L": conv[1].c / conv[-1].d,
                     "product over conv layers": fan_out_only_forward_product(conv),
                     "product over all layers": fan_out_only_forward_product(specs)})
    return pd.DataFrame(rows)


# --- findings for the scorecard ----------------------------------------------------------------

def findings(record: results.Record) -> dict[str, Any]:
    """The chapter's findings (schema of tests/test_scorecard.py VARIANCE): the conv stack's
    endpoint ratios per scheme, the MLP's too, Xavier's factor and the paper's numbers."""
    P = record.params
    summary = layer_summary(record)
    cases = record.table("cases")
    by = lambda study, arch: {c["scheme"]: endpoint(summary, c["case"])
                              for _, c in cases[(cases.study == study) & (cases.arch == arch)].iterrows()}
    conv, mlp = by("schemes", "conv"), by("schemes", "mlp")
    numbers = record.table("paper_numbers").set_index("key").ours
    out: dict[str, Any] = {
        "depth": int(P["depth"]), "scale": scale(P), "arch": "conv stack", "schemes": conv,
        "mlp": {"schemes": mlp},
        "paper_numbers": {"vgg_stds": [float(numbers[f"vgg_std_{d}"]) for d in (64, 128, 256, 512)],
                          "fixed_std_gradient_ratio": float(numbers["fixed_std_gradient_ratio"]),
                          "xavier_std_factor": {str(L): float(numbers[f"xavier_std_factor_{L}"]) for L in (22, 30)},
                          "c2_over_dL": {r["model"]: float(r["c_2 / d_L"])
                                         for _, r in record.table("models").iterrows()}},
    }
    if "xavier" in conv and "he-fan-in" in conv:
        he, xa = conv["he-fan-in"], conv["xavier"]
        measured = xa["forward_last_predicted"] * xa["forward_last_ratio_pooled"] / (
            he["forward_last_predicted"] * he["forward_last_ratio_pooled"])
        measured_median = xa["forward_last_predicted"] * xa["forward_last_ratio_median"] / (
            he["forward_last_predicted"] * he["forward_last_ratio_median"])
        out["xavier_factor"] = {"layers": int(P["depth"]) - 1, "measured": float(measured),
                                "measured_median": float(measured_median),
                                "predicted": float(xa["forward_last_predicted"] / he["forward_last_predicted"])}
    prelu = cases[(cases.study == "prelu") & (cases.arch == "conv")]
    out["prelu"] = {f"{c['a']:g}": endpoint(summary, c["case"]) for _, c in prelu.iterrows()}
    return out
